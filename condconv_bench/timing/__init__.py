"""What every timed comparison shares: the instrument's workers, autotuning and the gates.

- `rounds`: shuffled interleaved rounds in one process, blocks sized from a warm-up;
- `samples`: a case's raw latency samples and the statistics derived from them on demand;
- `ratios`: paired ratios to the floor with (process, round) bootstrap intervals, and ties;
- `rank_tests`: the rank test and rule a gate uses to call two sets of samples different.
"""
