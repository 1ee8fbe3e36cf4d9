"""What every timed comparison shares: the instrument's workers, autotuning, model stages, the
machine's ceilings and the gates (one implementation each).

- `rounds`: shuffled interleaved rounds in one process, the same blocks each round or planned
  round by round;
- `samples`: a case's raw latency samples, and the sample statistics (percentiles, median, spread);
- `ratios`: paired ratios to a reference with (process, round) bootstrap intervals, and ties;
- `rank_tests`: the rank test and rule a gate uses to call two sets of samples different.
"""
