"""Throughput of the embedded procedural dataset (mgm_fast.data.synthetic) on the CPU.

Each round renders a batch of fresh sample indices end to end (scene sampling, packing, culling,
ray casting, shading, masks) through ``SyntheticScenes.render_batch``; nothing is cached between
rounds, so the timing is real rendering. ``extra_info`` holds images/s of the median and the
best round. Compare thread counts with:
    pytest benchmarks/test_bench_synthetic.py --benchmark-group-by=group
"""

from __future__ import annotations

import itertools

import pytest

from benchmarks.conftest import record_rate
from mgm_fast.data.synthetic import SyntheticScenes

CASES = {64: 256, 128: 64}  # image size -> images per round


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("size", sorted(CASES))
def test_bench_synthetic_render_batch(benchmark, size, threads):
    batch = CASES[size]
    ds = SyntheticScenes(10**7, size, seed=0)
    rounds = itertools.count()

    def render():
        start = next(rounds) * batch  # fresh indices every round
        return ds.render_batch(range(start, start + batch), num_threads=threads)

    benchmark.group = f"synthetic render_batch {size}x{size}, batch {batch}"
    out = benchmark.pedantic(render, rounds=5, iterations=1, warmup_rounds=1)
    record_rate(benchmark, batch, "images", threads=threads, batch=batch)
    assert out["rgb"].shape == (batch, 3, size, size)
    assert float(out["depth_mask"].float().mean()) > 0.5
