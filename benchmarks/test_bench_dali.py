"""Images/s of one epoch through the DALI loader (mgm_fast.data.dali) vs the folder dataset
through torch's DataLoader (``TorchLoader``, 0 and 2 worker processes), batch 32.

Data: 256 synthetic scenes exported once per size in the released folder layout by
``write_folder`` (PNG rgb / normals / mask, npy labels and depth), read at their own size
(64x64, 128x128) and, for the resize path, 128x128 files read at 64x64. Every round iterates
one full epoch in a fresh permutation: reading and decoding every file, resizing, masks,
normals, batches on the host (``device="cpu"``; DALI runs its CPU pipeline with 2 threads).
The DALI loader builds its pipeline per epoch, inside the timing. ``TorchLoader`` with workers
keeps them alive across epochs (``persistent_workers``); the warm-up round starts them. The
``gpu``-marked case runs DALI's GPU pipeline into CUDA tensors. Compare with:
    pytest benchmarks/test_bench_dali.py --benchmark-group-by=group
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks.conftest import record_rate
from mgm_fast.data.folder import FolderDataset, write_folder
from mgm_fast.data.loader import TorchLoader
from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_CLASSES, SyntheticScenes

pytest.importorskip("nvidia.dali")

from mgm_fast.data.dali import make_dali_loader

N, BATCH = 256, 32
CASES = [(64, 64), (128, 128), (128, 64)]  # (file size, image_size)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOADERS = ["dali-cpu", "torch-0", "torch-2", pytest.param("dali-gpu", marks=[pytest.mark.gpu, NO_CUDA])]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """size -> exported folder of N synthetic scenes at that size."""
    out = {}
    for size in sorted({src for src, _ in CASES}):
        scenes = SyntheticScenes(N, size, seed=0)
        root = tmp_path_factory.mktemp(f"official{size}")
        chunks = (scenes.__getitems__(range(s, min(N, s + 64))) for s in range(0, N, 64))
        write_folder(
            (s for c in chunks for s in c), root, SCENE_CLASSES, seg_offset=1, seg_class_names=SEG_CLASSES
        )
        out[size] = root
    return out


def _loader(kind: str, ds):
    if kind == "dali-cpu":
        return make_dali_loader(ds, range(N), BATCH, "cpu", seed=0, num_threads=2)
    if kind == "dali-gpu":
        return make_dali_loader(ds, range(N), BATCH, "cuda", seed=0, num_threads=2)
    workers = int(kind.split("-")[1])
    extra = {"persistent_workers": True} if workers else {}
    return TorchLoader(ds, range(N), BATCH, "cpu", seed=0, num_workers=workers, **extra)


def _epoch(loader) -> int:
    images = 0
    for batch in loader:  # one full epoch; the loader then moves on to the next one
        images += batch["rgb"].shape[0]
    if loader.device.type == "cuda":
        torch.cuda.synchronize()
    return images


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("case", CASES, ids=[f"{a}to{b}" for a, b in CASES])
def test_bench_folder_epoch(benchmark, folders, case, kind):
    src, out = case
    ds = FolderDataset(folders[src], image_size=out)
    loader = _loader(kind, ds)
    benchmark.group = f"folder epoch {src}px files -> {out}px, batch {BATCH}, {N} images"
    images = benchmark.pedantic(_epoch, args=(loader,), rounds=3, iterations=1, warmup_rounds=1)
    record_rate(
        benchmark,
        images,
        "images",
        loader=kind,
        files=src,
        image_size=out,
        batch=BATCH,
        torch_threads=torch.get_num_threads(),
        cpus=os.cpu_count(),
    )
    assert images == N  # 256 is a multiple of 32: drop_last drops nothing
    assert loader.position == 0 and loader.epoch >= 1
