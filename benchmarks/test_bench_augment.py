"""SimCLR views per second: the fused C++ kernel, the batched torch path and the released-style
per-sample PIL loop.

All three make two views of each image of a batch of 32 RGB 128 x 128 images in [-1, 1] (one MGM
SimCLR step on real images, docs/method.md section 3.2 step 3) on the CPU, with the same
augmentation parameters distribution (parameter sampling included in every timing), and sit in
one pytest-benchmark group. Run with ``pytest benchmarks/test_bench_augment.py``; ``extra_info``
records views/s and threads. The cpp case is skipped when the extension is not built.
"""

import pytest
import torch

from benchmarks.conftest import record_rate
from mgm_fast import _native
from mgm_fast.data.augment import SimCLRAugment, pil_views

BATCH, SIZE = 32, 128
VIEWS = 2 * BATCH
GROUP = f"simclr-two-views-b{BATCH}-{SIZE}px-cpu"


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand((BATCH, 3, SIZE, SIZE), generator=g) * 2 - 1


def _batched(aug, gen, x):
    v1, v2 = aug.two_views(x, gen)
    return v1, v2


def _pil_loop(aug, gen, x):
    # one parameter draw per view, then one PIL pipeline per image and view
    p1 = aug.sample_params(BATCH, SIZE, SIZE, gen)
    p2 = aug.sample_params(BATCH, SIZE, SIZE, gen)
    return pil_views(x, p1), pil_views(x, p2)


@pytest.mark.skipif(_native.cpp_reason() is not None, reason=f"C++ extension: {_native.cpp_reason()}")
def test_views_cpp(benchmark, images):
    benchmark.group = GROUP
    aug, gen = SimCLRAugment(impl="cpp"), torch.Generator().manual_seed(1)
    v1, v2 = benchmark(_batched, aug, gen, images)
    assert v1.shape == v2.shape == images.shape and torch.isfinite(v1).all()
    record_rate(benchmark, VIEWS, "views", views_per_call=VIEWS, torch_threads=torch.get_num_threads())


def test_views_batched(benchmark, images):
    benchmark.group = GROUP
    aug, gen = SimCLRAugment(impl="reference"), torch.Generator().manual_seed(1)
    v1, v2 = benchmark(_batched, aug, gen, images)
    assert v1.shape == v2.shape == images.shape and torch.isfinite(v1).all()
    record_rate(benchmark, VIEWS, "views", views_per_call=VIEWS, torch_threads=torch.get_num_threads())


def test_views_pil_loop(benchmark, images):
    benchmark.group = GROUP
    aug, gen = SimCLRAugment(), torch.Generator().manual_seed(1)
    v1, v2 = benchmark(_pil_loop, aug, gen, images)
    assert v1.shape == v2.shape == images.shape and torch.isfinite(v1).all()
    record_rate(benchmark, VIEWS, "views", views_per_call=VIEWS, torch_threads=torch.get_num_threads())
