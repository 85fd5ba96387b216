"""Training loaders (mgm_fast.data.loader): in-memory and DataLoader paths, order, resume,
sharding, selection. Data: small synthetic scenes and a folder dataset written in the real layout."""

from __future__ import annotations

import io
import sys
import types

import pytest
import torch

from mgm_fast.data.folder import FolderDataset, write_folder
from mgm_fast.data.loader import (
    RGB_STEP,
    BatchPlan,
    MemoryBudgetError,
    MemoryLoader,
    TorchLoader,
    batches,
    default_memory_budget,
    dequantize_rgb,
    epoch_seed,
    estimate_nbytes,
    make_loader,
    quantize_rgb,
    resolve_indices,
)
from mgm_fast.data.sample import TENSOR_KEYS, DataError, collate
from mgm_fast.data.splits import make_split
from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_CLASSES, SyntheticScenes

SIZE = 16
SELECTION = list(range(3, 40))  # 37 samples: batch 4 leaves a remainder of 1
B = 4
EXACT = ("seg", "depth", "depth_mask", "normal", "normal_mask", "scene")
PER_SAMPLE = (
    3 * SIZE * SIZE * 1
    + SIZE * SIZE * 2
    + SIZE * SIZE * 4
    + SIZE * SIZE
    + 3 * SIZE * SIZE * 4
    + SIZE * SIZE
    + 8
)


@pytest.fixture(scope="module")
def ds():
    return SyntheticScenes(45, SIZE, seed=5)


@pytest.fixture(scope="module")
def mem(ds):
    """Shared loader for read-only checks; tests that iterate it reset its epoch first."""
    return MemoryLoader(ds, SELECTION, B, "cpu", seed=11)


def epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return list(loader)


def ids_of(batch_list):
    return [i for b in batch_list for i in b["id"]]


def index_of(ds):
    return {ds.sample_id(i): i for i in range(len(ds))}


def assert_batches_equal(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        assert g["id"] == w["id"]
        for k in g:
            if k != "id":
                assert g[k].dtype == w[k].dtype and torch.equal(g[k], w[k]), k


# -------------------------------------------------------------------------------------------
# RGB quantisation.


def test_rgb_levels_round_trip_bit_exactly_like_the_file_loaders():
    p = torch.arange(256, dtype=torch.uint8)
    file_value = (
        (p.float() * torch.tensor(1 / 255, dtype=torch.float32)).mul_(2.0).sub_(1.0)
    )  # image_to_rgb01
    assert torch.equal(dequantize_rgb(p), file_value)
    assert torch.equal(quantize_rgb(file_value), p)
    assert RGB_STEP == pytest.approx(2 / 255, rel=1e-7)
    x = torch.rand(4, 3, 9, 7) * 2 - 1  # off-grid values: error at most half a level
    err = (dequantize_rgb(quantize_rgb(x)) - x).abs().max()
    assert 0.3 / 255 < float(err) <= 1 / 255 + 1e-6


# -------------------------------------------------------------------------------------------
# Memory loader content and order.


def test_memory_batches_equal_collated_samples(ds, mem):
    where = index_of(ds)
    got = epoch_batches(mem, 0)
    assert len(got) == len(mem) == 37 // B
    for batch in got:
        want = collate([ds[where[i]] for i in batch["id"]])
        assert set(batch) == set(TENSOR_KEYS) | {"id"}
        for k in EXACT:
            assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k]), k
        assert batch["rgb"].dtype == torch.float32 and batch["rgb"].shape == (B, 3, SIZE, SIZE)
        assert torch.equal(batch["rgb"], dequantize_rgb(quantize_rgb(want["rgb"])))
        torch.testing.assert_close(batch["rgb"], want["rgb"], atol=1 / 255 + 1e-6, rtol=0)
    assert mem.data["rgb"].dtype == torch.uint8 and mem.data["seg"].dtype == torch.int16


def test_epoch_is_a_permutation_and_epochs_differ(mem):
    selected = {f"synthetic-s5-{i:06d}" for i in SELECTION}
    epochs = [ids_of(epoch_batches(mem, e)) for e in range(4)]
    for ids in epochs:
        assert len(ids) == len(set(ids)) == 36 and set(ids) <= selected  # one dropped by drop_last
    assert len({tuple(ids) for ids in epochs}) == 4
    assert set().union(*map(set, epochs)) == selected  # the dropped remainder changes with the epoch
    assert mem.epoch == 4 and mem.position == 0  # the loop moved on to the next epoch


def test_order_is_a_function_of_seed_and_epoch(ds, mem):
    same = MemoryLoader(ds, SELECTION, B, "cpu", seed=11, keys=("scene",))
    other = MemoryLoader(ds, SELECTION, B, "cpu", seed=12, keys=("scene",))
    a, b, c = (ids_of(epoch_batches(x, 2)) for x in (mem, same, other))
    assert a == b and a != c
    plan = BatchPlan(37, B, seed=11)
    pos = torch.randperm(37, generator=torch.Generator().manual_seed(epoch_seed(11, 2)))[:36]
    assert torch.equal(plan.positions(2), pos)
    assert a == [f"synthetic-s5-{SELECTION[i]:06d}" for i in pos.tolist()]


def test_no_shuffle_and_no_drop_last(ds):
    loader = MemoryLoader(ds, SELECTION, B, "cpu", seed=0, shuffle=False, drop_last=False, keys=("scene",))
    got = list(loader)
    assert len(loader) == len(got) == 10 and len(got[-1]["id"]) == 1 and got[-1]["scene"].shape == (1,)
    assert ids_of(got) == [f"synthetic-s5-{i:06d}" for i in SELECTION]


def test_resume_across_an_epoch_boundary_and_at_its_end(ds):
    ref = MemoryLoader(ds, SELECTION, B, "cpu", seed=3)
    want = list(batches(ref, 3 * len(ref)))
    for stop in (5, len(ref), len(ref) + 4):  # mid-epoch, right at the end, next epoch
        first = MemoryLoader(ds, SELECTION, B, "cpu", seed=3)
        head = list(batches(first, stop))
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        state = torch.load(buf, weights_only=True)
        again = MemoryLoader(ds, SELECTION, B, "cpu", seed=3)
        again.load_state_dict(state)
        tail = list(batches(again, 3 * len(ref) - stop))
        assert_batches_equal(head + tail, want)


def test_breaking_out_continues_the_same_epoch(mem):
    mem.set_epoch(1)
    whole = list(mem)
    mem.set_epoch(1)
    part = []
    for batch in mem:
        part.append(batch)
        if len(part) == 3:
            break
    assert (mem.epoch, mem.position) == (1, 3)
    part += list(mem)
    assert_batches_equal(part, whole)
    assert (mem.epoch, mem.position) == (2, 0)


def test_batches_walks_epochs(mem):
    mem.set_epoch(0)
    got = list(batches(mem, 2 * len(mem) + 3))
    assert len(got) == 2 * len(mem) + 3 and (mem.epoch, mem.position) == (2, 3)
    assert ids_of(got[: len(mem)]) == ids_of(epoch_batches(mem, 0))


def test_state_of_another_plan_is_refused(ds, mem):
    state = mem.state_dict()
    for other in (
        MemoryLoader(ds, SELECTION, B + 1, "cpu", seed=11, keys=("scene",)),
        MemoryLoader(ds, SELECTION, B, "cpu", seed=12, keys=("scene",)),
        MemoryLoader(ds, SELECTION[1:], B, "cpu", seed=11, keys=("scene",)),
    ):
        with pytest.raises(ValueError, match="data plan differs"):
            other.load_state_dict(state)


# -------------------------------------------------------------------------------------------
# Sharding.


@pytest.mark.parametrize("cls", [MemoryLoader, TorchLoader])
def test_two_ranks_are_disjoint_equal_and_cover_the_single_rank_epoch(ds, cls):
    ranks = [cls(ds, SELECTION, B, "cpu", seed=4, rank=r, world_size=2, keys=("scene",)) for r in range(2)]
    single = MemoryLoader(ds, SELECTION, 2 * B, "cpu", seed=4, keys=("scene",))
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 37 // (2 * B)
    for epoch in (0, 1):
        per_rank = [epoch_batches(r, epoch) for r in ranks]
        one = epoch_batches(single, epoch)
        a, b = (set(ids_of(x)) for x in per_rank)
        assert not a & b and len(a) == len(b) == 16
        assert a | b == set(ids_of(one))
        for k, batch in enumerate(one):  # rank r's batch k = global batch k, elements r::2
            for r in range(2):
                assert per_rank[r][k]["id"] == batch["id"][r::2]
                assert torch.equal(per_rank[r][k]["scene"], batch["scene"][r::2])


def test_sharding_needs_drop_last_and_full_batches(ds):
    with pytest.raises(ValueError, match="drop_last"):
        MemoryLoader(ds, SELECTION, B, "cpu", seed=0, rank=0, world_size=2, drop_last=False)
    with pytest.raises(DataError, match="empty"):
        MemoryLoader(ds, SELECTION, 20, "cpu", seed=0, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        MemoryLoader(ds, SELECTION, B, "cpu", seed=0, rank=2, world_size=2)


# -------------------------------------------------------------------------------------------
# Torch DataLoader path.


def test_torch_loader_yields_the_memory_loaders_batches(ds, mem):
    torch_loader = TorchLoader(ds, SELECTION, B, "cpu", seed=11)
    exact = MemoryLoader(ds, SELECTION, B, "cpu", seed=11, rgb_dtype=torch.float32)
    for epoch in (0, 1):
        t = epoch_batches(torch_loader, epoch)
        assert_batches_equal(t, epoch_batches(exact, epoch))  # same order, same tensors
        for tb, mb in zip(t, epoch_batches(mem, epoch)):
            assert tb["id"] == mb["id"]
            torch.testing.assert_close(tb["rgb"], mb["rgb"], atol=1 / 255 + 1e-6, rtol=0)
    assert len(torch_loader) == len(mem)


def test_torch_loader_resumes_like_the_memory_loader(ds):
    ref = MemoryLoader(ds, SELECTION, B, "cpu", seed=8, keys=("seg", "scene"))
    want = list(batches(ref, len(ref) + 5))
    first = TorchLoader(ds, SELECTION, B, "cpu", seed=8, keys=("seg", "scene"))
    head = list(batches(first, 6))
    again = TorchLoader(ds, SELECTION, B, "cpu", seed=8, keys=("seg", "scene"))
    again.load_state_dict(first.state_dict())
    assert_batches_equal(head + list(batches(again, len(ref) - 1)), want)
    mem_again = MemoryLoader(ds, SELECTION, B, "cpu", seed=8, keys=("seg", "scene"))
    mem_again.load_state_dict(first.state_dict())  # the state is shared by both loaders
    assert_batches_equal(list(batches(mem_again, len(ref) - 1)), want[6:])


def test_torch_loader_with_a_worker_process(ds):
    loader = TorchLoader(ds, SELECTION[:12], B, "cpu", seed=2, num_workers=1, keys=("depth", "scene"))
    want = MemoryLoader(ds, SELECTION[:12], B, "cpu", seed=2, keys=("depth", "scene"))
    assert_batches_equal(epoch_batches(loader, 1), epoch_batches(want, 1))


def test_loaders_leave_the_global_rng_alone(ds):
    state = torch.get_rng_state()
    for cls in (MemoryLoader, TorchLoader):
        list(batches(cls(ds, SELECTION, B, "cpu", seed=1, keys=("scene",)), 12))
    MemoryLoader(ds, SELECTION[:8], B, "cpu", seed=1, keys=("scene",), decode_workers=1)
    assert torch.equal(torch.get_rng_state(), state)


# -------------------------------------------------------------------------------------------
# Selection of fields, ids, memory.


@pytest.mark.parametrize("cls", [MemoryLoader, TorchLoader])
def test_keys_subset_for_the_weak_stream(ds, cls):
    loader = cls(ds, SELECTION, B, "cpu", seed=0, keys=("scene", "rgb"))
    batch = next(iter(loader))
    assert set(batch) == {"rgb", "scene", "id"}
    assert batch["rgb"].shape == (B, 3, SIZE, SIZE) and batch["scene"].dtype == torch.int64
    if cls is MemoryLoader:
        assert set(loader.data) == {"rgb", "scene"}
        assert loader.nbytes() == 37 * (3 * SIZE * SIZE + 8)
    with pytest.raises(ValueError, match="subset"):
        cls(ds, SELECTION, B, "cpu", seed=0, keys=("rgb", "label"))


def test_split_ids_select_the_same_samples_as_positions(ds):
    ids = [ds.sample_id(i) for i in range(len(ds))]
    split = make_split(ids, seed=0, labelled_fraction=0.5)
    by_id = MemoryLoader(ds, split.train_weak, 2, "cpu", seed=0, keys=("rgb", "scene"))
    by_pos = MemoryLoader(
        ds, [ids.index(s) for s in split.train_weak], 2, "cpu", seed=0, keys=("rgb", "scene")
    )
    assert_batches_equal(list(by_id), list(by_pos))
    assert torch.equal(resolve_indices(ds, split.train_weak), by_pos.indices)
    with pytest.raises(DataError, match="not in the dataset"):
        resolve_indices(ds, ["synthetic-s5-000999"])
    with pytest.raises(DataError, match="repeat"):
        resolve_indices(ds, [1, 2, 1])
    with pytest.raises(DataError, match="out of range"):
        resolve_indices(ds, [0, 45])


def test_nbytes_estimate_and_fits(ds, mem):
    assert mem.nbytes() == estimate_nbytes(ds, SELECTION) == 37 * PER_SAMPLE
    assert MemoryLoader.fits(ds, SELECTION, "cpu", budget_bytes=37 * PER_SAMPLE)
    assert not MemoryLoader.fits(ds, SELECTION, "cpu", budget_bytes=37 * PER_SAMPLE - 1)
    half = estimate_nbytes(ds, SELECTION, normal_dtype=torch.float16)
    assert half == 37 * (PER_SAMPLE - 3 * SIZE * SIZE * 2)
    assert 0 < default_memory_budget("cpu") < 2**50


def test_float16_normals_stay_unit_length(ds, mem):
    small = MemoryLoader(ds, SELECTION, B, "cpu", seed=11, normal_dtype=torch.float16)
    for got, want in zip(epoch_batches(small, 0), epoch_batches(mem, 0)):
        assert got["normal"].dtype == torch.float32
        assert torch.equal(got["normal_mask"], want["normal_mask"])
        torch.testing.assert_close(got["normal"], want["normal"], atol=2**-11, rtol=0)
        norm = got["normal"].norm(dim=1)[got["normal_mask"][:, 0]]
        assert float((norm - 1).abs().max()) < 1e-3


# -------------------------------------------------------------------------------------------
# A PNG dataset in the released layout: uint8 storage is exact.


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ds):
    root = tmp_path_factory.mktemp("official")
    write_folder(ds.__getitems__(range(12)), root, SCENE_CLASSES, seg_class_names=SEG_CLASSES)
    return FolderDataset(root, image_size=SIZE)


@pytest.mark.parametrize("decode_workers", [0, 1])
def test_png_dataset_is_stored_bit_exactly(folder, decode_workers):
    loader = MemoryLoader(folder, range(len(folder)), 5, "cpu", seed=0, decode_workers=decode_workers)
    where = index_of(folder)
    got = list(loader)
    assert len(got) == 2
    for batch in got:
        want = collate([folder[where[i]] for i in batch["id"]])
        for k in TENSOR_KEYS:
            assert batch[k].dtype == want[k].dtype and torch.equal(batch[k], want[k]), k


def test_torch_loader_on_png_dataset_matches_memory(folder):
    mem = MemoryLoader(folder, range(len(folder)), 5, "cpu", seed=1)
    tl = TorchLoader(folder, range(len(folder)), 5, "cpu", seed=1)
    assert_batches_equal(epoch_batches(tl, 3), epoch_batches(mem, 3))


# -------------------------------------------------------------------------------------------
# make_loader.


def test_auto_picks_memory_for_the_small_synthetic_set(ds):
    loader = make_loader(ds, SELECTION, B, "cpu", seed=0)
    assert isinstance(loader, MemoryLoader) and loader.kind == "memory"
    assert loader.reason.startswith("memory: fits")


def test_forced_memory_over_budget_raises_with_sizes(ds):
    need = estimate_nbytes(ds, SELECTION)
    with pytest.raises(MemoryBudgetError, match=rf"need {need} bytes .* budget is 1000 bytes"):
        make_loader(ds, SELECTION, B, "cpu", seed=0, loader="memory", memory_budget_bytes=1000)
    loader = make_loader(ds, SELECTION, B, "cpu", seed=0, loader="memory", memory_budget_bytes=need)
    assert loader.kind == "memory" and loader.nbytes() == need


def test_auto_without_room_or_dali_uses_torch_and_says_why(ds, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # makes `import nvidia.dali` fail
    loader = make_loader(ds, SELECTION, B, "cpu", seed=0, memory_budget_bytes=1000, num_workers=0)
    assert isinstance(loader, TorchLoader) and loader.kind == "torch"
    assert "does not fit" in loader.reason and "nvidia.dali is not installed" in loader.reason


def test_forced_torch_and_option_checks(ds):
    loader = make_loader(ds, SELECTION, B, "cpu", seed=0, loader="torch", keys=("scene",))
    assert loader.kind == "torch" and loader.reason == "torch: asked for"
    with pytest.raises(TypeError, match="num_wrokers"):
        make_loader(ds, SELECTION, B, "cpu", seed=0, loader="torch", num_wrokers=2)
    with pytest.raises(ValueError, match="loader must be one of"):
        make_loader(ds, SELECTION, B, "cpu", seed=0, loader="fast")


def test_forced_dali_without_the_module_names_the_extra(ds, monkeypatch):
    monkeypatch.setitem(sys.modules, "mgm_fast.data.dali", None)  # import of the module fails
    with pytest.raises(ImportError, match=r"pip install -e \.\[dali\]"):
        make_loader(ds, SELECTION, B, "cpu", seed=0, loader="dali")


def test_forced_dali_forwards_to_make_dali_loader(ds, monkeypatch):
    calls = []

    def make_dali_loader(dataset, indices, batch_size, device, seed, rank, world_size, **kw):
        calls.append((dataset, list(indices), batch_size, device, seed, rank, world_size, kw))
        return types.SimpleNamespace()

    module = types.ModuleType("mgm_fast.data.dali")
    module.make_dali_loader = make_dali_loader
    monkeypatch.setitem(sys.modules, "mgm_fast.data.dali", module)
    loader = make_loader(ds, SELECTION, B, "cpu", seed=7, loader="dali", rank=1, world_size=2, num_threads=3)
    assert loader.kind == "dali" and loader.reason == "dali: asked for"
    assert calls == [(ds, SELECTION, B, torch.device("cpu"), 7, 1, 2, {"num_threads": 3})]


# -------------------------------------------------------------------------------------------
# GPU: the data lives on the device and batches come out identical to the CPU loader.


@pytest.mark.gpu
def test_memory_loader_on_cuda_matches_cpu(ds, mem):
    gpu = MemoryLoader(ds, SELECTION, B, "cuda", seed=11)
    assert all(t.is_cuda for t in gpu.data.values())
    got = epoch_batches(gpu, 1)
    assert all(v.is_cuda for b in got for k, v in b.items() if k != "id")
    assert_batches_equal(
        [{k: v.cpu() if k != "id" else v for k, v in b.items()} for b in got], epoch_batches(mem, 1)
    )
    tl = TorchLoader(ds, SELECTION, B, "cuda", seed=11)
    assert tl.loader.pin_memory
    assert_batches_equal(
        [{k: v.cpu() if k != "id" else v for k, v in b.items()} for b in epoch_batches(tl, 1)],
        epoch_batches(MemoryLoader(ds, SELECTION, B, "cpu", seed=11, rgb_dtype=torch.float32), 1),
    )
