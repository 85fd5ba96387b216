"""Shared helpers for the pytest-benchmark suites."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # same as tests/: Triton kernels on the CPU interpreter


def record_rate(benchmark, items: int, unit: str, **extra) -> None:
    """Store items/s (from the median and the best round) in the report's extra_info.

    With ``--benchmark-disable`` (CI) the benchmark body runs once untimed and there are no
    statistics, so nothing is recorded.
    """
    benchmark.extra_info.update(extra)
    if benchmark.stats is None:
        return
    stats = benchmark.stats.stats
    benchmark.extra_info[f"{unit}_per_s_median"] = items / stats.median
    benchmark.extra_info[f"{unit}_per_s_best"] = items / stats.min
