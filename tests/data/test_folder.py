"""Released-code folder layout (mgm_fast.data.folder) and the sample format (mgm_fast.data.sample),
on tiny datasets written to disk in the real layout."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mgm_fast.data.folder import FolderDataset, write_folder
from mgm_fast.data.registry import open_dataset
from mgm_fast.data.sample import IGNORE_INDEX, DataError, collate, validate_sample

C = 5
SCENES = ["kitchen", "bedroom", "office"]  # deliberately not sorted: indices must survive


def make_sample(rng, h, w, scene, sid, num_classes=C):
    """A valid random sample; RGB on exact 8-bit levels, labels with void, holes in depth/normals."""
    rgb = rng.integers(0, 256, (3, h, w)) / 255.0 * 2 - 1
    seg = rng.integers(0, num_classes, (h, w))
    seg[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    dmask = rng.random((1, h, w)) > 0.2
    depth = np.where(dmask, rng.uniform(0.4, 9.0, (1, h, w)), 0)
    n = rng.normal(size=(3, h, w))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    nmask = rng.random((1, h, w)) > 0.25
    n = np.where(nmask, n, 0)
    return {
        "rgb": torch.tensor(rgb, dtype=torch.float32),
        "seg": torch.tensor(seg, dtype=torch.int64),
        "depth": torch.tensor(depth, dtype=torch.float32),
        "depth_mask": torch.tensor(dmask),
        "normal": torch.tensor(n, dtype=torch.float32),
        "normal_mask": torch.tensor(nmask),
        "scene": torch.tensor(scene, dtype=torch.int64),
        "id": sid,
    }


def samples(n=7, h=12, w=16, seed=0):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, h, w, i % len(SCENES), f"img{i:03d}") for i in range(n)]


def by_id(ds):
    return {ds[i]["id"].split("/", 1)[1]: ds[i] for i in range(len(ds))}


def assert_same(got, want, rgb_atol=1 / 255 + 1e-6, normal_atol=0.01, depth_atol=0.0):
    assert torch.equal(got["seg"], want["seg"])
    assert torch.equal(got["depth_mask"], want["depth_mask"])
    assert torch.equal(got["normal_mask"], want["normal_mask"])
    assert int(got["scene"]) == int(want["scene"])
    torch.testing.assert_close(got["rgb"], want["rgb"], atol=rgb_atol, rtol=0)
    torch.testing.assert_close(got["depth"], want["depth"], atol=depth_atol, rtol=0)
    torch.testing.assert_close(got["normal"], want["normal"], atol=normal_atol, rtol=0)


@pytest.fixture
def written(tmp_path):
    data = samples()
    root = write_folder(data, tmp_path / "ds", SCENES, seg_class_names=[f"c{i}" for i in range(C)])
    return root, data


# -------------------------------------------------------------------------------------------
# Round trips.


def test_round_trip_exact_labels_depth_masks(written):
    root, data = written
    ds = FolderDataset(root, image_size=None)
    assert len(ds) == len(data)
    assert ds.info.num_seg_classes == C and ds.info.scene_names == tuple(SCENES)
    assert ds.info.seg_class_names == tuple(f"c{i}" for i in range(C))
    assert ds.normal_dir == "nm" and ds.has_mask
    got = by_id(ds)
    for s in data:
        g = got[s["id"]]
        assert_same(g, s)
        assert g["rgb"].dtype == torch.float32 and g["seg"].dtype == torch.int64
        assert g["depth_mask"].dtype == torch.bool and g["scene"].dim() == 0
        validate_sample(g, C, "test", num_scenes=len(SCENES))


def test_scene_index_follows_sorted_folders(written):
    root, _ = written
    ds = FolderDataset(root, image_size=None)
    # indices come from sorted folder names; the writer prefixes the index so order == index
    assert [r[1] for r in ds.records] == sorted(r[1] for r in ds.records)
    for i in range(len(ds)):
        s, scene_dir, _, _ = ds.records[i]
        assert scene_dir.endswith(SCENES[s])
        assert int(ds[i]["scene"]) == s


def test_nyu_style_offset_round_trip(tmp_path):
    data = samples(4)
    root = write_folder(data, tmp_path / "ds", SCENES, seg_offset=1)
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["label_offset"] == -1
    ss = next((root / "ss").rglob("*.npy"))
    stored = np.load(ss)
    assert stored.dtype == np.int16 and stored.min() >= 0  # void stored as 0, classes 1..C
    got = by_id(FolderDataset(root, image_size=None))
    for s in data:
        assert torch.equal(got[s["id"]]["seg"], s["seg"])
    # an explicit label_offset overrides dataset.json
    raw = FolderDataset(root, image_size=None, label_offset=0, num_seg_classes=C + 1)
    g = by_id(raw)[data[0]["id"]]
    assert torch.equal(g["seg"], torch.where(data[0]["seg"] == IGNORE_INDEX, 0, data[0]["seg"] + 1))


def test_ignore_value(tmp_path):
    data = samples(2)
    root = write_folder(data, tmp_path / "ds", SCENES)
    for p in (root / "ss").rglob("*.npy"):
        a = np.load(p)
        np.save(p, np.where(a == IGNORE_INDEX, 255, a).astype(np.uint8))
    got = by_id(FolderDataset(root, image_size=None, ignore_value=255))
    for s in data:
        assert torch.equal(got[s["id"]]["seg"], s["seg"])


# -------------------------------------------------------------------------------------------
# Resizing.


def test_resize_semantics(tmp_path):
    rng = np.random.default_rng(1)
    s = make_sample(rng, 30, 44, 0, "big")
    root = write_folder([s], tmp_path / "ds", SCENES)
    size = (13, 17)
    g = FolderDataset(root, image_size=size)[0]
    assert g["rgb"].shape == (3, *size) and g["seg"].shape == size
    assert g["depth"].shape == (1, *size) and g["normal_mask"].shape == (1, *size)

    # RGB: antialiased bilinear of the decoded 8-bit image
    png = next((root / "rgb").rglob("*.png"))
    x = torch.from_numpy(np.asarray(Image.open(png), dtype=np.float32) / 255).permute(2, 0, 1)[None]
    ref = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)[0] * 2 - 1
    torch.testing.assert_close(g["rgb"], ref, atol=1e-5, rtol=0)
    # ... and PIL's bilinear resize (what the released code uses) within one 8-bit level
    pil = np.asarray(Image.open(png).resize(size[::-1], Image.BILINEAR), dtype=np.float32) / 255 * 2 - 1
    assert float((g["rgb"] - torch.from_numpy(pil).permute(2, 0, 1)).abs().max()) <= 2 / 255 + 1e-5

    # labels / depth / masks: centred nearest neighbour, source pixel floor((i + 0.5) * in / out)
    rows = np.array([(2 * i + 1) * 30 // (2 * size[0]) for i in range(size[0])])
    cols = np.array([(2 * j + 1) * 44 // (2 * size[1]) for j in range(size[1])])

    def nearest(t):
        return t[:, rows[:, None], cols[None, :]]

    assert torch.equal(g["seg"], nearest(s["seg"][None])[0])
    assert set(g["seg"].unique().tolist()) <= set(s["seg"].unique().tolist())
    assert torch.equal(g["depth_mask"], nearest(s["depth_mask"]))
    assert torch.equal(g["depth"], nearest(s["depth"]))
    assert bool((g["depth"][~g["depth_mask"]] == 0).all()) and bool((g["depth"][g["depth_mask"]] > 0).all())
    assert torch.equal(g["normal_mask"], nearest(s["normal_mask"]))
    norms = g["normal"].norm(dim=0)[g["normal_mask"][0]]
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_nearest_matches_torch_nearest_exact(tmp_path):
    rng = np.random.default_rng(2)
    s = make_sample(rng, 30, 44, 0, "big")
    root = write_folder([s], tmp_path / "ds", SCENES)
    for size in [(15, 22), (60, 88), (10, 11)]:
        g = FolderDataset(root, image_size=size)[0]
        ref = F.interpolate(s["seg"][None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        assert torch.equal(g["seg"], ref)


def test_square_int_size_and_upsampling(written):
    root, _ = written
    ds = FolderDataset(root, image_size=32)
    s = ds[0]
    assert s["rgb"].shape == (3, 32, 32) and s["seg"].shape == (32, 32)
    batch = collate([ds[i] for i in range(3)])
    assert batch["rgb"].shape == (3, 3, 32, 32) and batch["scene"].shape == (3,)
    assert batch["id"] == [ds[i]["id"] for i in range(3)]


# -------------------------------------------------------------------------------------------
# Pairing by stem.


def _write_manual(root, stems_by_mod, scene="s0", h=6, w=5):
    """Write every modality file by hand; each stem's content encodes the stem's number so that
    a wrong pairing is visible in the loaded tensors."""
    for mod, stems in stems_by_mod.items():
        d = root / mod / scene
        d.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            k = int(stem[-2:])
            if mod == "rgb":
                Image.fromarray(np.full((h, w, 3), 10 * k, np.uint8)).save(d / f"{stem}.png")
            elif mod == "ss":
                np.save(d / f"{stem}.npy", np.full((h, w), k, np.int16))
            elif mod == "de":
                np.save(d / f"{stem}.npy", np.full((h, w), 1.0 + k, np.float32))
            elif mod in ("nm", "sn"):
                Image.fromarray(np.full((h, w, 3), (128, 128, 255), np.uint8)).save(d / f"{stem}.png")
    (root / "dataset.json").write_text(json.dumps({"num_seg_classes": 20}))


def test_pairs_by_stem_not_by_creation_or_sort_order(tmp_path):
    stems = [f"frame_{k:02d}" for k in range(8)]
    rng = np.random.default_rng(0)
    order = {m: list(rng.permutation(stems)) for m in ("rgb", "ss", "de", "nm")}
    _write_manual(tmp_path, order)
    ds = FolderDataset(tmp_path, image_size=None)
    assert len(ds) == 8
    for i in range(len(ds)):
        s = ds[i]
        k = int(s["id"][-2:])
        assert int(s["seg"][0, 0]) == k
        assert float(s["depth"][0, 0, 0]) == 1.0 + k
        assert abs(float(s["rgb"][0, 0, 0]) - (20 * k / 255 - 1)) < 1e-6


def test_missing_and_extra_stems_are_named(tmp_path):
    stems = [f"frame_{k:02d}" for k in range(4)]
    _write_manual(tmp_path, {"rgb": stems, "ss": [*stems[:3], "frame_77"], "de": stems, "nm": stems})
    with pytest.raises(DataError) as e:
        FolderDataset(tmp_path, image_size=None)
    msg = str(e.value)
    assert "frame_03" in msg and "frame_77" in msg and str(tmp_path / "ss" / "s0") in msg


def test_missing_scene_folder_and_extra_scene_folder(tmp_path):
    stems = ["frame_00"]
    _write_manual(tmp_path, {"rgb": stems, "ss": stems, "de": stems, "nm": stems})
    (tmp_path / "de" / "zz_extra").mkdir()
    with pytest.raises(DataError, match="zz_extra"):
        FolderDataset(tmp_path, image_size=None)
    shutil.rmtree(tmp_path / "de" / "zz_extra")
    shutil.rmtree(tmp_path / "ss" / "s0")
    with pytest.raises(DataError, match="frame_00"):
        FolderDataset(tmp_path, image_size=None)


def test_nm_and_sn_both_accepted_but_not_together(tmp_path):
    data = samples(3)
    a = write_folder(data, tmp_path / "a", SCENES, normals_dir="nm")
    b = write_folder(data, tmp_path / "b", SCENES, normals_dir="sn")
    da, db = FolderDataset(a, image_size=None), FolderDataset(b, image_size=None)
    assert (da.normal_dir, db.normal_dir) == ("nm", "sn")
    for i in range(3):
        assert torch.equal(da[i]["normal"], db[i]["normal"])
    shutil.copytree(a / "nm", b / "nm")
    with pytest.raises(DataError, match="both nm/ and sn/"):
        FolderDataset(b, image_size=None)


def test_mask_is_optional(written):
    root, data = written
    shutil.rmtree(root / "msk")
    ds = FolderDataset(root, image_size=None)
    assert not ds.has_mask
    got = by_id(ds)
    for s in data:  # invalid normals are encoded as grey 128 and decode as invalid on their own
        assert torch.equal(got[s["id"]]["normal_mask"], s["normal_mask"])


def test_mask_restricts_normals(written):
    root, _ = written
    for p in (root / "msk").rglob("*.png"):
        Image.fromarray(np.zeros((12, 16), np.uint8)).save(p)
    s = FolderDataset(root, image_size=None)[0]
    assert not bool(s["normal_mask"].any()) and bool((s["normal"] == 0).all())


# -------------------------------------------------------------------------------------------
# Bad input: every error names the file.


def _first(root, mod, ext):
    return sorted((root / mod).rglob(f"*{ext}"))[0]


def _error_for(root, index=0, **kw):
    ds = FolderDataset(root, image_size=None, **kw)
    with pytest.raises(DataError) as e:
        ds[index]
    return str(e.value)


def _index_of(root, path):
    ds = FolderDataset(root, image_size=None)
    for i in range(len(ds)):
        if path in ds.files(i).values():
            return i
    raise AssertionError(path)


def test_corrupt_png(written):
    root, _ = written
    p = _first(root, "rgb", ".png")
    p.write_bytes(p.read_bytes()[:40])  # truncated
    assert str(p) in _error_for(root, _index_of(root, p))


def test_corrupt_normal_png_and_garbage(written):
    root, _ = written
    p = _first(root, "nm", ".png")
    p.write_bytes(b"not a png at all")
    assert str(p) in _error_for(root, _index_of(root, p))


def test_corrupt_npy(written):
    root, _ = written
    for mod in ("ss", "de"):
        p = _first(root, mod, ".npy")
        good = p.read_bytes()
        p.write_bytes(good[: len(good) // 2])
        assert str(p) in _error_for(root, _index_of(root, p))
        p.write_bytes(good)


def test_label_out_of_range(written):
    root, _ = written
    p = _first(root, "ss", ".npy")
    a = np.load(p)
    a[0, 0] = C + 2
    np.save(p, a)
    msg = _error_for(root, _index_of(root, p))
    assert str(p) in msg and str(C + 2) in msg


def test_non_integer_float_labels(written):
    root, _ = written
    p = _first(root, "ss", ".npy")
    np.save(p, np.load(p).astype(np.float32) + 0.5)
    assert str(p) in _error_for(root, _index_of(root, p))


@pytest.mark.parametrize("bad", [np.nan, -1.0, np.inf])
def test_nan_negative_inf_depth(written, bad):
    root, _ = written
    p = _first(root, "de", ".npy")
    a = np.load(p)
    a[2, 3] = bad
    np.save(p, a)
    i = _index_of(root, p)
    assert str(p) in _error_for(root, i)
    s = FolderDataset(root, image_size=None, allow_invalid_depth=True)[i]
    assert not bool(s["depth_mask"][0, 2, 3]) and float(s["depth"][0, 2, 3]) == 0.0


def test_integer_depth_rejected(written):
    root, _ = written
    p = _first(root, "de", ".npy")
    np.save(p, (np.load(p) * 1000).astype(np.uint16))
    msg = _error_for(root, _index_of(root, p))
    assert str(p) in msg and "millimetres" in msg


@pytest.mark.parametrize("mod", ["ss", "de"])
def test_wrong_shape(written, mod):
    root, _ = written
    p = _first(root, mod, ".npy")
    a = np.load(p)
    np.save(p, np.stack([a, a, a], -1))
    assert str(p) in _error_for(root, _index_of(root, p))


def test_modalities_of_different_size_need_image_size(written):
    root, _ = written
    p = _first(root, "ss", ".npy")
    np.save(p, np.zeros((24, 32), np.int16))
    i = _index_of(root, p)
    msg = _error_for(root, i)
    assert "image_size" in msg
    assert FolderDataset(root, image_size=8)[i]["seg"].shape == (8, 8)


def test_num_seg_classes_required(tmp_path):
    root = write_folder(samples(2), tmp_path / "ds", SCENES)
    (root / "dataset.json").unlink()
    with pytest.raises(DataError, match="num_seg_classes"):
        FolderDataset(root)
    ds = FolderDataset(root, image_size=None, num_seg_classes=C)
    assert ds.info.scene_names == tuple(sorted(d.name for d in (root / "rgb").iterdir()))
    (root / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"dataset\.json"):
        FolderDataset(root, num_seg_classes=C)


def test_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        FolderDataset(tmp_path / "nope")
    (tmp_path / "rgb" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="ss"):
        FolderDataset(tmp_path, num_seg_classes=3)


# -------------------------------------------------------------------------------------------
# Sample format helpers and the registry.


def test_validate_sample_errors_name_source():
    s = samples(1)[0]
    validate_sample(s, C, "src.png", num_scenes=3)
    for key, bad, what in [
        ("seg", s["seg"].int(), "dtype"),
        ("rgb", s["rgb"] * 2, "[-1, 1]"),
        ("seg", torch.full_like(s["seg"], C), "outside"),
        ("depth", s["depth"] + 1, "depth_mask is False"),
        ("normal", s["normal"] * 2, "unit length"),
        ("scene", torch.tensor(7), "scene"),
        ("depth_mask", s["depth_mask"][:, :3], "shape"),
    ]:
        bad_sample = dict(s, **{key: bad})
        with pytest.raises(DataError, match=r"src\.png") as e:
            validate_sample(bad_sample, C, "src.png", num_scenes=3)
        assert what in str(e.value)
    with pytest.raises(DataError, match="lacks"):
        validate_sample({k: v for k, v in s.items() if k != "depth"}, C, "src.png")


def test_collate_mismatch_names_ids():
    a = samples(1, h=4, w=4)[0]
    b = samples(1, h=5, w=4, seed=1)[0] | {"id": "odd"}
    with pytest.raises(DataError, match="odd"):
        collate([a, b])


def test_open_dataset_official_and_unknown(written):
    root, _ = written
    ds, info = open_dataset(f"official:{root}", 16)
    assert info.layout == "official" and ds[0]["rgb"].shape == (3, 16, 16)
    with pytest.raises(DataError) as e:
        open_dataset("nyu:/x", 16)
    for form in ("synthetic", "official:DIR", "mtan:DIR", "taskonomy:DIR"):
        assert form in str(e.value)
