"""MTAN's preprocessed NYUv2 npy layout (mgm_fast.data.mtan), on tiny splits written to disk."""

import json

import numpy as np
import pytest
import torch

from mgm_fast.data.mtan import MTAN_SEG_CLASSES, MTANDataset, write_mtan
from mgm_fast.data.registry import open_dataset
from mgm_fast.data.sample import IGNORE_INDEX, DataError, validate_sample

SCENES = ["bedroom", "kitchen", "office", "bathroom"]


def make_sample(rng, h, w, scene, sid, num_classes=13):
    rgb = rng.uniform(-1, 1, (3, h, w))
    seg = rng.integers(0, num_classes, (h, w))
    seg[rng.random((h, w)) < 0.15] = IGNORE_INDEX
    dmask = rng.random((1, h, w)) > 0.2
    depth = np.where(dmask, rng.uniform(0.5, 10, (1, h, w)), 0)
    n = rng.normal(size=(3, h, w))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    nmask = rng.random((1, h, w)) > 0.3
    return {
        "rgb": torch.tensor(rgb, dtype=torch.float32),
        "seg": torch.tensor(seg),
        "depth": torch.tensor(depth, dtype=torch.float32),
        "depth_mask": torch.tensor(dmask),
        "normal": torch.tensor(np.where(nmask, n, 0), dtype=torch.float32),
        "normal_mask": torch.tensor(nmask),
        "scene": torch.tensor(scene),
        "id": sid,
    }


def samples(n=5, h=12, w=16, seed=0):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, h, w, i % len(SCENES), f"s{i}") for i in range(n)]


@pytest.fixture
def written(tmp_path):
    train, val = samples(5), samples(3, seed=1)
    write_mtan(train, tmp_path, "train", scene_names=SCENES)
    write_mtan(val, tmp_path, "val", scene_names=SCENES)
    return tmp_path, train, val


def test_round_trip(written):
    root, train, val = written
    for split, data in (("train", train), ("val", val)):
        ds = MTANDataset(root, split, image_size=None)
        assert len(ds) == len(data)
        assert ds.info.num_seg_classes == 13 and ds.info.seg_class_names == MTAN_SEG_CLASSES
        assert ds.info.scene_names == tuple(SCENES)
        for i, want in enumerate(data):
            got = ds[i]
            assert got["id"] == f"{split}/{i}" == ds.sample_id(i)
            assert torch.equal(got["seg"], want["seg"])
            assert torch.equal(got["depth"], want["depth"]) and torch.equal(
                got["depth_mask"], want["depth_mask"]
            )
            assert torch.equal(got["normal_mask"], want["normal_mask"])
            torch.testing.assert_close(got["normal"], want["normal"], atol=1e-6, rtol=0)
            torch.testing.assert_close(got["rgb"], want["rgb"], atol=1e-6, rtol=0)
            assert int(got["scene"]) == int(want["scene"])
            validate_sample(got, 13, "t", num_scenes=len(SCENES))


def test_reads_the_release_format_written_by_hand(tmp_path):
    """Files as in MTAN's release: float64 arrays, label float with -1, depth (H, W, 1) with 0
    holes, normals (H, W, 3) with zero vectors where missing."""
    rng = np.random.default_rng(3)
    h, w = 6, 8
    for mod in ("image", "label", "depth", "normal"):
        (tmp_path / "val" / mod).mkdir(parents=True)
    image = rng.uniform(0, 1, (h, w, 3))
    label = rng.integers(-1, 13, (h, w)).astype(np.float64)
    depth = rng.uniform(1, 5, (h, w, 1))
    depth[0, 0] = 0
    normal = rng.normal(size=(h, w, 3))
    normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
    normal[1, 1] = 0
    normal[2, 2] *= 0.97  # slightly short vectors (resampled data) are renormalised
    for mod, arr in (("image", image), ("label", label), ("depth", depth), ("normal", normal)):
        np.save(tmp_path / "val" / mod / "0.npy", arr)
    ds = MTANDataset(tmp_path, "val", image_size=None, scenes="none")
    s = ds[0]
    assert int(s["scene"]) == -1 and ds.info.num_scenes == 0
    assert torch.equal(s["seg"], torch.from_numpy(label.astype(np.int64)))
    assert not bool(s["depth_mask"][0, 0, 0]) and float(s["depth"][0, 0, 0]) == 0
    torch.testing.assert_close(s["depth"][0, 1:, 1:], torch.from_numpy(depth[1:, 1:, 0]).float())
    assert not bool(s["normal_mask"][0, 1, 1]) and bool((s["normal"][:, 1, 1] == 0).all())
    torch.testing.assert_close(s["normal"][:, 2, 2].norm(), torch.tensor(1.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        s["rgb"], torch.from_numpy(image * 2 - 1).permute(2, 0, 1).float(), atol=1e-6, rtol=0
    )


def test_scene_labels_required_with_clear_message(tmp_path):
    write_mtan(samples(2), tmp_path, "train")  # no scene_names: no scenes.json
    with pytest.raises(DataError) as e:
        MTANDataset(tmp_path, "train")
    msg = str(e.value)
    assert "scenes.json" in msg and "scene_names" in msg and 'scenes="none"' in msg
    ds = MTANDataset(tmp_path, "train", image_size=None, scenes="none")
    assert int(ds[0]["scene"]) == -1


def test_scenes_path_argument_and_checks(tmp_path):
    write_mtan(samples(3), tmp_path, "train")
    p = tmp_path / "elsewhere.json"
    p.write_text(json.dumps({"scene_names": ["a", "b"], "train": [1, 0, 1]}))
    ds = MTANDataset(tmp_path, "train", image_size=None, scenes=p)
    assert [int(ds[i]["scene"]) for i in range(3)] == [1, 0, 1] and ds.info.scene_names == ("a", "b")
    p.write_text(json.dumps({"scene_names": ["a", "b"], "train": [1, 0]}))
    with pytest.raises(DataError, match="2 scene labels for 3 images"):
        MTANDataset(tmp_path, "train", scenes=p)
    p.write_text(json.dumps({"scene_names": ["a", "b"], "train": [1, 0, 5]}))
    with pytest.raises(DataError, match=r"outside \[0, 2\)"):
        MTANDataset(tmp_path, "train", scenes=p)
    p.write_text(json.dumps({"scene_names": ["a", "b"], "val": [0]}))
    with pytest.raises(DataError, match="no 'train' list"):
        MTANDataset(tmp_path, "train", scenes=p)


def test_index_gap_and_odd_names(written):
    root, _, _ = written
    (root / "train" / "depth" / "3.npy").unlink()
    with pytest.raises(DataError) as e:
        MTANDataset(root, "train")
    assert "'3'" in str(e.value) and str(root / "train" / "depth") in str(e.value)
    np.save(root / "train" / "depth" / "3.npy", np.ones((12, 16, 1), np.float32))
    np.save(root / "train" / "label" / "extra.npy", np.zeros((12, 16)))
    with pytest.raises(DataError, match=r"extra\.npy"):
        MTANDataset(root, "train")


def _err(root, split="train", i=0, **kw):
    ds = MTANDataset(root, split, image_size=None, **kw)
    with pytest.raises(DataError) as e:
        ds[i]
    return str(e.value)


def test_image_in_0_255_rejected(written):
    root, _, _ = written
    p = root / "train" / "image" / "1.npy"
    np.save(p, np.load(p) * 255)
    assert str(p) in _err(root, i=1)


def test_label_out_of_range_and_non_integer(written):
    root, _, _ = written
    p = root / "train" / "label" / "2.npy"
    a = np.load(p)
    a[0, 0] = 13
    np.save(p, a)
    msg = _err(root, i=2)
    assert str(p) in msg and "13" in msg
    a[0, 0] = 2.5
    np.save(p, a)
    assert str(p) in _err(root, i=2)


def test_nan_and_negative_depth(written):
    root, _, _ = written
    p = root / "train" / "depth" / "0.npy"
    a = np.load(p)
    a[1, 1, 0] = np.nan
    a[2, 2, 0] = -3
    np.save(p, a)
    assert str(p) in _err(root)
    s = MTANDataset(root, "train", image_size=None, allow_invalid_depth=True)[0]
    assert not bool(s["depth_mask"][0, 1, 1]) and not bool(s["depth_mask"][0, 2, 2])


@pytest.mark.parametrize("mod,shape", [("normal", (12, 16)), ("depth", (12, 15, 1)), ("image", (12, 16, 4))])
def test_wrong_shapes(written, mod, shape):
    root, _, _ = written
    p = root / "train" / mod / "4.npy"
    np.save(p, np.zeros(shape, np.float32))
    assert str(p) in _err(root, i=4)


def test_corrupt_npy(written):
    root, _, _ = written
    p = root / "train" / "normal" / "1.npy"
    p.write_bytes(b"\x93NUMPY garbage")
    assert str(p) in _err(root, i=1)


def test_resize_keeps_label_set_and_depth_validity(written):
    root, train, _ = written
    ds = MTANDataset(root, "train", image_size=(6, 7))
    s = ds[0]
    assert s["rgb"].shape == (3, 6, 7) and s["seg"].shape == (6, 7) and s["normal"].shape == (3, 6, 7)
    assert set(s["seg"].unique().tolist()) <= set(train[0]["seg"].unique().tolist())
    assert bool((s["depth"][~s["depth_mask"]] == 0).all()) and bool((s["depth"][s["depth_mask"]] > 0).all())
    assert set(s["depth"][s["depth_mask"]].tolist()) <= set(train[0]["depth"].flatten().tolist())


def test_registry_split_and_class_metadata(tmp_path):
    names = [f"k{i}" for i in range(7)]
    write_mtan(samples(2, seed=4), tmp_path, "val", scene_names=SCENES, seg_class_names=names)
    # labels up to 12 do not fit 7 classes: the class count from scenes.json is enforced
    ds, info = open_dataset(f"mtan:{tmp_path}:val", None)
    assert info.num_seg_classes == 7 and info.seg_class_names == tuple(names) and len(ds) == 2
    with pytest.raises(DataError, match="outside"):
        ds[0]
    ds, info = open_dataset(f"mtan:{tmp_path}:val", 8, num_seg_classes=13, seg_class_names=None)
    assert info.seg_class_names == MTAN_SEG_CLASSES and ds[1]["rgb"].shape == (3, 8, 8)
    with pytest.raises(DataError, match="train"):
        open_dataset(f"mtan:{tmp_path}", 8)
