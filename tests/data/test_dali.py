"""DALI loader (mgm_fast.data.dali) against the datasets' own loaders, on tiny datasets written
to disk in the real layouts: values batch by batch, order, sharding, resume, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali")

from mgm_fast.data.dali import (
    RGB_BORDER_ATOL,
    RGB_INTERIOR_ATOL,
    make_dali_loader,
    nearest_gather,
    nearest_index,
    not_supported_reasons,
)
from mgm_fast.data.folder import FolderDataset, write_folder
from mgm_fast.data.loader import TorchLoader, make_loader
from mgm_fast.data.mtan import MTANDataset, write_mtan
from mgm_fast.data.sample import (
    IGNORE_INDEX,
    TENSOR_KEYS,
    DataError,
    collate,
    resize_nearest,
    validate_sample,
)
from mgm_fast.data.synthetic import SCENE_CLASSES, SEG_CLASSES, SyntheticScenes
from mgm_fast.data.taskonomy import TaskonomyDataset, write_taskonomy

C = 5
SCENES = ["kitchen", "bedroom", "office"]
EXACT = ("seg", "depth", "depth_mask", "normal", "normal_mask", "scene")


def make_sample(rng, h, w, scene, sid, num_classes=C):
    """A valid random sample: RGB on 8-bit levels, void labels, holes in depth and normals."""
    rgb = rng.integers(0, 256, (3, h, w)) / 255.0 * 2 - 1
    seg = rng.integers(0, num_classes, (h, w))
    seg[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    dmask = rng.random((1, h, w)) > 0.2
    depth = np.where(dmask, rng.uniform(0.4, 9.0, (1, h, w)), 0)
    n = rng.normal(size=(3, h, w))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    nmask = rng.random((1, h, w)) > 0.25
    return {
        "rgb": torch.tensor(rgb, dtype=torch.float32),
        "seg": torch.tensor(seg, dtype=torch.int64),
        "depth": torch.tensor(depth, dtype=torch.float32),
        "depth_mask": torch.tensor(dmask),
        "normal": torch.tensor(np.where(nmask, n, 0), dtype=torch.float32),
        "normal_mask": torch.tensor(nmask),
        "scene": torch.tensor(scene, dtype=torch.int64),
        "id": sid,
    }


def samples(n=11, h=12, w=16, seed=0, num_classes=C):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, h, w, i % len(SCENES), f"img{i:03d}", num_classes) for i in range(n)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Official layout, NYUv2-style labels (void stored as 0), with msk/."""
    return write_folder(samples(), tmp_path_factory.mktemp("dali") / "ds", SCENES, seg_offset=1)


def all_batches(loader) -> list[dict]:
    return list(loader)


def reference(ds, ids: list[str]) -> dict:
    """The dataset's own samples of ``ids``, collated."""
    where = {ds.sample_id(i): i for i in range(len(ds))}
    return collate([ds[where[s]] for s in ids])


def assert_rgb(got: torch.Tensor, want: torch.Tensor, resized: bool) -> None:
    assert got.dtype == torch.float32 and got.shape == want.shape
    if not resized:
        assert torch.equal(got, want)
        return
    diff = (got - want).abs()
    assert float(diff[..., 1:-1, 1:-1].max()) <= RGB_INTERIOR_ATOL
    assert float(diff.max()) <= RGB_BORDER_ATOL


def assert_batch(got: dict, want: dict, resized: bool, keys=TENSOR_KEYS) -> None:
    assert list(got) == [*keys, "id"]
    assert got["id"] == want["id"]
    for k in keys:
        if k == "rgb":
            assert_rgb(got[k], want[k], resized)
            continue
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert torch.equal(got[k], want[k]), f"{k}: {int((got[k] != want[k]).sum())} elements differ"


# -------------------------------------------------------------------------------------------
# Values equal the folder loader's.


@pytest.mark.parametrize("size", [None, (12, 16), 8, (20, 9)], ids=["native", "same", "down", "up-down"])
def test_unshuffled_pass_equals_folder_loader(root, size):
    ds = FolderDataset(root, image_size=size)
    loader = make_dali_loader(ds, range(len(ds)), 4, "cpu", seed=0, shuffle=False, drop_last=False)
    assert loader.kind == "dali" and len(loader) == 3
    got = all_batches(loader)
    assert [len(b["id"]) for b in got] == [4, 4, 3]
    assert [i for b in got for i in b["id"]] == [ds.sample_id(i) for i in range(len(ds))]
    resized = size not in (None, (12, 16))
    for b in got:
        assert_batch(b, reference(ds, b["id"]), resized)
        for j in range(len(b["id"])):
            sample = {k: v[j] for k, v in b.items()}
            validate_sample(sample, C, "dali", num_scenes=len(SCENES), allow_unknown_scene=False)


@pytest.mark.parametrize("size", [8, (20, 9)])
def test_rgb_resize_in_torch_is_exact(root, size):
    ds = FolderDataset(root, image_size=size)
    loader = make_dali_loader(ds, range(len(ds)), 4, "cpu", seed=0, shuffle=False, rgb_resize="torch")
    for b in loader:
        assert_batch(b, reference(ds, b["id"]), resized=False)


def test_synthetic_export_batch_for_batch_like_torch_loader(tmp_path):
    """Exported synthetic scenes, shuffled selection: the same batches as TorchLoader (order,
    ids, exact labels / depth / normals / masks / scenes), RGB within the resize tolerance."""
    scenes = SyntheticScenes(14, 32, seed=3)
    path = write_folder(
        scenes.__getitems__(range(14)),
        tmp_path / "syn",
        SCENE_CLASSES,
        seg_offset=1,
        seg_class_names=SEG_CLASSES,
    )
    ds = FolderDataset(path, image_size=24)
    selection = [1, 2, 3, 5, 7, 8, 9, 10, 12, 13]
    dali = make_dali_loader(ds, selection, 3, "cpu", seed=7)
    torch_loader = TorchLoader(ds, selection, 3, "cpu", seed=7)
    for epoch in (0, 1):
        a, b = list(dali), list(torch_loader)
        assert len(a) == len(b) == 3 and dali.epoch == torch_loader.epoch == epoch + 1
        for x, y in zip(a, b):
            assert_batch(x, y, resized=True)


def test_mixed_source_sizes_and_modality_sizes(tmp_path):
    """Samples of two sizes in one batch (DALI pads, torch gathers per sample), and a label map
    stored at a lower resolution than its image: same values as the dataset."""
    data = samples(4, 12, 16, seed=1) + samples(3, 10, 14, seed=2)
    for k, s in enumerate(data):
        s["id"] = f"mix{k}"
    path = write_folder(data, tmp_path / "mix", SCENES, seg_offset=1)
    ss = sorted((path / "ss").rglob("mix0.npy"))[0]
    np.save(ss, resize_nearest(np.load(ss), (6, 8)))  # allowed when an image_size is given
    ds = FolderDataset(path, image_size=(9, 11))
    for rgb_resize in ("dali", "torch"):
        loader = make_dali_loader(ds, range(len(ds)), 7, "cpu", seed=0, shuffle=False, rgb_resize=rgb_resize)
        (b,) = list(loader)
        assert_batch(b, reference(ds, b["id"]), resized=rgb_resize == "dali")
    native = FolderDataset(path, image_size=None)
    loader = make_dali_loader(native, range(len(native)), 7, "cpu", seed=0, shuffle=False)
    with pytest.raises(DataError, match=r"different sizes|one image_size"):
        list(loader)


def test_label_and_depth_options(tmp_path):
    """uint8 labels with an ignore value, float labels, depth with NaN / inf / negative values
    masked by allow_invalid_depth: exactly the dataset's decoding."""
    data = samples(6, seed=4)
    path = write_folder(data, tmp_path / "opt", SCENES)
    for p in (path / "ss").rglob("*.npy"):
        a = np.load(p)
        np.save(p, np.where(a == IGNORE_INDEX, 255, a).astype(np.uint8))
    for p in (path / "de").rglob("*.npy"):
        a = np.load(p).astype(np.float64)  # float64 metres are read as float32, as the dataset does
        a[0, :3] = [np.nan, np.inf, -2.0]
        np.save(p, a)
    ds = FolderDataset(path, image_size=8, ignore_value=255, allow_invalid_depth=True)
    for b in make_dali_loader(ds, range(6), 3, "cpu", seed=1, shuffle=False):
        assert_batch(b, reference(ds, b["id"]), resized=True)
        assert not bool(b["depth_mask"][:, 0, 0, 0].any())

    for p in (path / "ss").rglob("*.npy"):  # float label maps, 255 void
        np.save(p, np.load(p).astype(np.float32))
    ds = FolderDataset(path, image_size=None, ignore_value=255, allow_invalid_depth=True)
    for b in make_dali_loader(ds, range(6), 2, "cpu", seed=1):
        assert_batch(b, reference(ds, b["id"]), resized=False)


def test_image_modes_decode_like_pil(tmp_path):
    """Grey, palette and RGBA colour PNGs, RGBA normal maps and RGB masks: PIL's conversions."""
    data = samples(3, seed=5)
    path = write_folder(data, tmp_path / "modes", SCENES, seg_offset=1)
    rgbs = sorted((path / "rgb").rglob("*.png"))
    Image.open(rgbs[0]).convert("L").save(rgbs[0])
    Image.open(rgbs[1]).convert("P", palette=Image.Palette.ADAPTIVE, colors=40).save(rgbs[1])
    Image.open(rgbs[2]).convert("RGBA").save(rgbs[2])
    nm = sorted((path / "nm").rglob("*.png"))[0]
    Image.open(nm).convert("RGBA").save(nm)
    msk = sorted((path / "msk").rglob("*.png"))[1]
    m = np.asarray(Image.open(msk))
    Image.fromarray(np.stack([m, 255 - m // 2, m // 3], -1).astype(np.uint8), "RGB").save(msk)
    ds = FolderDataset(path, image_size=None)
    (b,) = list(make_dali_loader(ds, range(3), 3, "cpu", seed=0, shuffle=False))
    assert_batch(b, reference(ds, b["id"]), resized=False)


def test_keys_read_only_what_they_need(root):
    ds = FolderDataset(root, image_size=8)
    for keys in (("rgb", "scene"), ("seg",), ("depth_mask", "normal"), ("scene",)):
        loader = make_dali_loader(ds, range(len(ds)), 5, "cpu", seed=2, keys=keys)
        for b in loader:
            want = reference(ds, b["id"])
            assert_batch(b, {**{k: want[k] for k in keys}, "id": want["id"]}, resized=True, keys=keys)
    assert list(make_dali_loader(ds, range(4), 4, "cpu", seed=0, keys=("seg",)).modalities) == ["ss"]


def test_nearest_gather_is_resize_nearest():
    rng = np.random.default_rng(0)
    for h, w, out in [
        (1, 1, (5, 3)),
        (2, 23, (23, 2)),
        (480, 640, (128, 128)),
        (288, 384, (127, 255)),
        (7, 9, (7, 9)),
    ]:
        x = rng.integers(0, 1000, (2, h, w))
        got = nearest_gather(torch.from_numpy(x), torch.tensor([[h, w], [h, w]]), out).numpy()
        assert np.array_equal(got[0], resize_nearest(x[0], out))
    for n_in in range(1, 60):
        for n_out in range(1, 60):
            want = resize_nearest(np.arange(n_in)[:, None], (n_out, 1))[:, 0]
            assert nearest_index(torch.tensor([n_in]), n_out)[0].tolist() == want.tolist()


def test_nearest_gather_does_not_block_on_its_index_upload():
    # the meta device stands in for a GPU: the host-computed indices go up with non_blocking,
    # so fetching a batch does not wait for the previous step's queued kernels
    from mgm_fast.stepcost import DispatchCounter

    x = torch.empty(2, 6, 8, 3, device="meta")
    hw = torch.tensor([[6, 8], [4, 5]])
    counter = DispatchCounter()
    with counter:
        out = nearest_gather(x, hw, (3, 4))
    assert out.shape == (2, 3, 4, 3) and out.device.type == "meta"
    # the one read left is of hw, a host tensor by contract (no device involved)
    assert dict(counter.syncs) == {"other": {"aten._local_scalar_dense": 1}}, dict(counter.syncs)


# -------------------------------------------------------------------------------------------
# Order, sharding, resume.


def test_shuffled_epochs_cover_the_selection_once(root):
    ds = FolderDataset(root, image_size=8)
    selection = [0, 2, 3, 4, 5, 6, 8, 9, 10]
    loader = make_dali_loader(ds, selection, 2, "cpu", seed=5, keys=("scene",))
    assert len(loader) == 4
    epochs = [[i for b in loader for i in b["id"]] for _ in range(3)]
    names = {ds.sample_id(i) for i in selection}
    for ids in epochs:
        assert len(ids) == 8 and len(set(ids)) == 8 and set(ids) <= names  # 9 selected, drop_last
    assert epochs[0] != epochs[1] != epochs[2]
    again = make_dali_loader(ds, selection, 2, "cpu", seed=5, keys=("scene",))
    assert [i for b in again for i in b["id"]] == epochs[0]  # same seed, same order
    other = make_dali_loader(ds, selection, 2, "cpu", seed=6, keys=("scene",))
    assert [i for b in other for i in b["id"]] != epochs[0]
    loader.set_epoch(1)
    assert [i for b in loader for i in b["id"]] == epochs[1]


def test_sharding_gives_disjoint_equal_shards_like_torch_loader(root):
    ds = FolderDataset(root, image_size=8)
    shards = []
    for rank in range(3):
        loader = make_dali_loader(
            ds, range(11), 2, "cpu", seed=3, rank=rank, world_size=3, keys=("seg", "scene")
        )
        ref = TorchLoader(ds, range(11), 2, "cpu", seed=3, rank=rank, world_size=3, keys=("seg", "scene"))
        assert len(loader) == len(ref) == 1
        got = list(loader)
        for a, b in zip(got, list(ref)):
            assert_batch(a, b, resized=True, keys=("seg", "scene"))
        shards.append([i for b in got for i in b["id"]])
    assert [len(s) for s in shards] == [2, 2, 2]
    assert len({i for shard in shards for i in shard}) == 6
    with pytest.raises(ValueError, match="drop_last"):
        make_dali_loader(ds, range(11), 2, "cpu", seed=3, rank=0, world_size=2, drop_last=False)


def test_resume_mid_epoch_equals_uninterrupted(root):
    ds = FolderDataset(root, image_size=8)
    full = make_dali_loader(ds, range(11), 2, "cpu", seed=9)
    straight = [b for _ in range(2) for b in full]  # epochs 0 and 1, 5 batches each
    run = make_dali_loader(ds, range(11), 2, "cpu", seed=9)
    head = []
    for b in run:
        head.append(b)
        if len(head) == 3:
            break
    state = run.state_dict()
    assert (state["epoch"], state["position"]) == (0, 3)
    resumed = make_dali_loader(ds, range(11), 2, "cpu", seed=9)
    resumed.load_state_dict(state)
    tail = list(resumed) + list(resumed)
    assert len(head) + len(tail) == len(straight)
    for a, b in zip(head + tail, straight):
        assert_batch(a, b, resized=False)  # same pipeline on both sides: bit-identical
    # iterating the interrupted loader again continues the same epoch too
    rest = list(run)
    assert [b["id"] for b in rest] == [b["id"] for b in straight[3:5]]
    with pytest.raises(ValueError, match="seed"):
        make_dali_loader(ds, range(11), 2, "cpu", seed=10).load_state_dict(state)
    # the state is the other loaders' state: a torch loader resumes it on the same samples
    other = TorchLoader(ds, range(11), 2, "cpu", seed=9)
    other.load_state_dict(state)
    assert [b["id"] for b in other] == [b["id"] for b in straight[3:5]]


def test_make_loader_builds_it(root):
    ds = FolderDataset(root, image_size=8)
    loader = make_loader(ds, range(11), 2, "cpu", seed=0, loader="dali", keys=("rgb",))
    assert loader.kind == "dali" and list(next(iter(loader))) == ["rgb", "id"]
    auto = make_loader(ds, range(11), 2, "cpu", seed=0, memory_budget_bytes=1)
    assert auto.kind == "dali", auto.reason
    assert not_supported_reasons(ds, "cpu") == []
    assert "SyntheticScenes" in " ".join(not_supported_reasons(SyntheticScenes(4, 16), "cpu"))


# -------------------------------------------------------------------------------------------
# Bad files: the error names the file.


def fresh(tmp_path, n=6):
    return write_folder(samples(n, seed=8), tmp_path / "bad", SCENES, seg_offset=1)


def test_missing_file_is_named(tmp_path):
    path = fresh(tmp_path)
    ds = FolderDataset(path, image_size=8)
    victim = ds.files(4)["normals"]
    victim.unlink()  # after indexing: only reading can notice
    loader = make_dali_loader(ds, range(6), 2, "cpu", seed=0, shuffle=False)
    with pytest.raises(DataError, match=str(victim)):
        list(loader)


@pytest.mark.parametrize("modality", ["rgb", "normals", "msk", "ss", "de"])
def test_corrupt_file_is_named(tmp_path, modality):
    path = fresh(tmp_path)
    ds = FolderDataset(path, image_size=8)
    victim = ds.files(3)[modality]
    head = b"\x89PNG\r\n\x1a\n" if victim.suffix == ".png" else b"\x93NUMPY\x01\x00"
    victim.write_bytes(head + b"\x00garbage" * 4)
    loader = make_dali_loader(ds, range(6), 2, "cpu", seed=0, shuffle=False)
    with pytest.raises(DataError, match=str(victim)):
        list(loader)


def test_bad_values_are_named(tmp_path):
    path = fresh(tmp_path)
    ds = FolderDataset(path, image_size=8)
    ss = ds.files(2)["ss"]
    a = np.load(ss)
    a[1, 1] = C + 3  # stored label C + 2 after the offset: out of range
    np.save(ss, a)
    with pytest.raises(DataError, match=f"{ss}.*label"):
        list(make_dali_loader(ds, range(6), 3, "cpu", seed=0, shuffle=False))
    np.save(ss, np.load(ss).clip(0, C))
    de = ds.files(5)["de"]
    d = np.load(de)
    d[0, 0] = np.nan
    np.save(de, d)
    with pytest.raises(DataError, match=f"{de}.*NaN"):
        list(make_dali_loader(ds, range(6), 3, "cpu", seed=0, shuffle=False))


def test_error_only_dali_sees_names_the_files(tmp_path):
    """Label files of two dtypes in one batch: the dataset reads each one, DALI cannot batch
    them; the error carries DALI's reason, which names both files."""
    path = fresh(tmp_path)
    ds = FolderDataset(path, image_size=8)
    odd = ds.files(1)["ss"]
    np.save(odd, np.load(odd).astype(np.uint8))
    with pytest.raises(DataError, match=rf"reads without error.*same data type.*{odd}"):
        list(make_dali_loader(ds, range(6), 3, "cpu", seed=0, shuffle=False))


def test_jpeg_decodes_like_pil(tmp_path):
    path = fresh(tmp_path)
    for p in (path / "rgb").rglob("*.png"):
        Image.open(p).save(p.with_suffix(".jpg"), quality=90)
        p.unlink()
    ds = FolderDataset(path, image_size=None)
    for b in make_dali_loader(ds, range(6), 3, "cpu", seed=0, shuffle=False):
        assert_batch(b, reference(ds, b["id"]), resized=False)


def test_unsupported_dataset_and_options(root):
    with pytest.raises(TypeError, match="SyntheticScenes"):
        make_dali_loader(SyntheticScenes(4, 16), range(4), 2, "cpu", seed=0)
    ds = FolderDataset(root, image_size=8)
    with pytest.raises(ValueError, match="rgb_resize"):
        make_dali_loader(ds, range(4), 2, "cpu", seed=0, rgb_resize="pil")
    with pytest.raises(DataError, match="no full batch"):
        make_dali_loader(ds, range(3), 4, "cpu", seed=0)


# -------------------------------------------------------------------------------------------
# Taskonomy and MTAN layouts.


def taskonomy_samples(n, seed, scenes=(3, 7, 3, 200)):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        s = make_sample(rng, 10, 12, scenes[k % len(scenes)], "x", num_classes=17)
        s["depth"] = torch.where(s["depth_mask"], torch.round(s["depth"] * 512) / 512, 0.0)
        out.append(s)
    return out


@pytest.mark.parametrize("size", [None, 7])
@pytest.mark.parametrize("mask", [False, True])
def test_taskonomy_equals_dataset(tmp_path, size, mask):
    write_taskonomy(taskonomy_samples(3, 0), tmp_path, "allensville", write_mask=mask)
    write_taskonomy(taskonomy_samples(3, 1), tmp_path, "beechwood", start_point=10, write_mask=mask)
    for kw in (
        {},
        {"scene_classes": [3, 7], "scene_other": "other"},
        {"scene_classes": [7, 200], "scene_other": "restrict"},
    ):
        ds = TaskonomyDataset(tmp_path, image_size=size, **kw)
        for b in make_dali_loader(ds, range(len(ds)), 3, "cpu", seed=4):
            assert_batch(b, reference_taskonomy(ds, b["id"]), resized=size is not None)


def test_taskonomy_keys(tmp_path):
    write_taskonomy(taskonomy_samples(4, 2), tmp_path, "allensville", write_mask=True)
    ds = TaskonomyDataset(tmp_path, image_size=6)
    for keys in (("rgb", "scene"), ("depth", "normal_mask")):
        loader = make_dali_loader(ds, range(4), 2, "cpu", seed=0, keys=keys)
        for b in loader:
            want = reference_taskonomy(ds, b["id"])
            assert_batch(b, {**{k: want[k] for k in keys}, "id": want["id"]}, resized=True, keys=keys)


def test_taskonomy_8bit_depth_is_named(tmp_path):
    write_taskonomy(taskonomy_samples(2, 3), tmp_path, "allensville")
    ds = TaskonomyDataset(tmp_path, image_size=6)
    depth = ds.files(0)["depth_zbuffer"]
    Image.fromarray((np.asarray(Image.open(depth)) >> 8).astype(np.uint8), "L").save(depth)
    with pytest.raises(DataError, match=str(depth)):
        make_dali_loader(ds, range(2), 2, "cpu", seed=0)


def reference_taskonomy(ds, ids):
    where = {f"{b}/point_{p}_view_{v}": i for i, (b, p, v, _) in enumerate(ds.records)}
    return collate([ds[where[s]] for s in ids])


@pytest.mark.parametrize("size", [None, (9, 7)])
def test_mtan_equals_dataset(tmp_path, size):
    rng = np.random.default_rng(3)
    data = []
    for k in range(5):
        s = make_sample(rng, 12, 16, k % 3, f"s{k}", num_classes=13)
        s["rgb"] = torch.tensor(rng.uniform(-1, 1, (3, 12, 16)), dtype=torch.float32)  # not on 8-bit levels
        data.append(s)
    write_mtan(data, tmp_path, "train", scene_names=SCENES)
    ds = MTANDataset(tmp_path, "train", image_size=size)
    loader = make_dali_loader(ds, range(5), 2, "cpu", seed=1, drop_last=False)
    got = list(loader)
    assert [len(b["id"]) for b in got] == [2, 2, 1]
    for b in got:
        want = collate([ds[int(s.split("/")[1])] for s in b["id"]])
        assert_batch(b, want, resized=size is not None)


# -------------------------------------------------------------------------------------------
# GPU pipeline (mixed decoding, GPU resize): same values as the CPU pipeline.


@pytest.mark.gpu
@pytest.mark.parametrize("size", [None, 8])
def test_gpu_pipeline_equals_cpu_pipeline(root, size):
    ds = FolderDataset(root, image_size=size)
    gpu = make_dali_loader(ds, range(len(ds)), 4, "cuda", seed=0, drop_last=False, shuffle=False)
    cpu = make_dali_loader(ds, range(len(ds)), 4, "cpu", seed=0, drop_last=False, shuffle=False)
    assert gpu.pipeline_device == "gpu"
    for a, b in zip(gpu, cpu):
        assert all(a[k].is_cuda for k in TENSOR_KEYS)
        a = {k: (v.cpu() if k != "id" else v) for k, v in a.items()}
        assert_batch(a, reference(ds, b["id"]), resized=size is not None)
        torch.testing.assert_close(a["rgb"], b["rgb"], atol=1e-5, rtol=0)
