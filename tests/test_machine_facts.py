"""Facts read from the machine: available memory for the memory estimate, and the environment a run records."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from condconv_bench.cases.memory_estimate import available_bytes
from condconv_bench.machine.environment import describe_environment, machine_differences, machine_fingerprint


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc/meminfo to compare")
def test_available_cpu_memory_is_what_linux_calls_available() -> None:
    (line,) = [line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:")]
    kernel = int(line.split()[1]) * 1024
    assert abs(available_bytes(torch.device("cpu")) - kernel) < 0.05 * kernel  # other jobs allocate in between


def test_available_memory_of_a_device_it_cannot_ask_is_unknown() -> None:
    assert isinstance(available_bytes(torch.device("cpu")), int)
    assert available_bytes(torch.device("meta")) is None


FINGERPRINT = {"cpu_model", "logical_cpus", "caches", "cpu_flags_sha256", "cpu_flags_count", "kernel", "machine"}


def test_the_fingerprint_keeps_its_fields_and_is_stable() -> None:
    fingerprint = machine_fingerprint()
    assert set(fingerprint) == FINGERPRINT  # recorded in every run.json and hashed into the autotune cache's name
    assert machine_fingerprint() == fingerprint
    environment = describe_environment()
    assert environment["machine"] == fingerprint and environment["cpu_model"] == fingerprint["cpu_model"]
    assert machine_differences(environment, describe_environment()) == []


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="reads Linux's /proc/cpuinfo to compare")
def test_the_cpu_is_described_as_the_kernel_reports_it() -> None:
    """The model of CPU 0 and the flags the kernel enabled, as earlier runs recorded them: a flag set
    read another way would make every saved baseline another machine."""
    text = Path("/proc/cpuinfo").read_text()
    first = {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in text.split("\n\n")[0].splitlines())}
    flags = sorted((first.get("flags") or first.get("Features") or "").split())
    fingerprint = machine_fingerprint()
    assert fingerprint["cpu_model"] == first.get("model name", fingerprint["cpu_model"])
    assert fingerprint["cpu_flags_count"] == len(flags)
    assert fingerprint["cpu_flags_sha256"] == (hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16] if flags else None)
