"""Reports from run directories: tables (data), then one renderer per output format."""
