"""Images/s of the training loaders (mgm_fast.data.loader): one epoch of 64x64 images, batch 32.

Sources: the in-process synthetic scenes (``SyntheticScenes``, rendered on demand) and the same
scenes exported once in the released folder layout (PNG rgb / normals / mask, npy labels and
depth) by ``write_folder``. Loaders: ``MemoryLoader`` (decoded once, batches gathered from
resident tensors) and ``TorchLoader`` (``torch.utils.data.DataLoader``, num_workers 0, decoding
every epoch). Each round iterates one full epoch (a fresh permutation) and touches every batch;
on CUDA the round ends with a synchronize, so queued gathers are inside the timing. The one-time
decode of the memory loader is timed separately (``build``). Compare with:
    pytest benchmarks/test_bench_loader.py --benchmark-group-by=group
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import record_rate
from mgm_fast.data.folder import FolderDataset, write_folder
from mgm_fast.data.loader import MemoryLoader, TorchLoader
from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_CLASSES, SyntheticScenes

SIZE, BATCH, N = 64, 32, 256
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = {"memory": (20, 1), "torch": (3, 0)}  # (rounds, warmup rounds)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    synthetic = SyntheticScenes(N, SIZE, seed=0)
    root = tmp_path_factory.mktemp("official64")
    chunks = (synthetic.__getitems__(range(s, min(N, s + 64))) for s in range(0, N, 64))
    write_folder((s for chunk in chunks for s in chunk), root, SCENE_CLASSES, seg_class_names=SEG_CLASSES)
    return {"synthetic": synthetic, "folder": FolderDataset(root, image_size=SIZE)}


def _epoch(loader) -> int:
    images = 0
    for batch in loader:  # one full epoch: the loader moves on to the next one afterwards
        images += batch["rgb"].shape[0]
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return images


@pytest.mark.parametrize("kind", ["memory", "torch"])
@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_bench_loader_epoch(benchmark, sources, source, kind):
    ds = sources[source]
    cls = MemoryLoader if kind == "memory" else TorchLoader
    loader = cls(ds, range(N), BATCH, DEVICE, seed=0)
    benchmark.group = f"loader epoch {SIZE}x{SIZE}, batch {BATCH}, {N} images, {DEVICE.type}"
    rounds, warmup = ROUNDS[kind]
    images = benchmark.pedantic(_epoch, args=(loader,), rounds=rounds, iterations=1, warmup_rounds=warmup)
    record_rate(benchmark, images, "images", loader=kind, source=source, device=str(DEVICE), batch=BATCH)
    assert images == N  # 256 is a multiple of 32: drop_last drops nothing
    assert loader.position == 0 and loader.epoch >= 1  # whole epochs only (one when benchmarks are disabled)


@pytest.mark.parametrize("source", ["synthetic", "folder"])
def test_bench_memory_loader_build(benchmark, sources, source):
    ds = sources[source]
    benchmark.group = f"memory loader build (decode once) {SIZE}x{SIZE}, {N} images, {DEVICE.type}"
    loader = benchmark.pedantic(MemoryLoader, args=(ds, range(N), BATCH, DEVICE, 0), rounds=1, iterations=1)
    record_rate(benchmark, N, "images", source=source, device=str(DEVICE), nbytes=loader.nbytes())
    assert loader.nbytes() == N * SIZE * SIZE * (3 + 2 + 4 + 1 + 12 + 1) + N * 8
