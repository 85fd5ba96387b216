"""Taskonomy layout (mgm_fast.data.taskonomy): decoding conventions on hand-made files, both
folder structures, scene-class selection and bad input, on buildings written to disk."""

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from mgm_fast.data.registry import open_dataset
from mgm_fast.data.sample import IGNORE_INDEX, DataError, validate_sample
from mgm_fast.data.taskonomy import (
    NUM_PLACES,
    TaskonomyDataset,
    decode_depth_zbuffer,
    decode_segment_semantic,
    write_taskonomy,
)


def make_sample(rng, h, w, scene, num_classes=17):
    rgb = rng.integers(0, 256, (3, h, w)) / 255.0 * 2 - 1
    seg = rng.integers(0, num_classes, (h, w))
    seg[rng.random((h, w)) < 0.1] = IGNORE_INDEX
    dmask = rng.random((1, h, w)) > 0.2
    depth = np.where(dmask, rng.integers(1, 60000, (1, h, w)) / 512.0, 0)  # on the 1/512 m grid
    n = rng.normal(size=(3, h, w))
    n /= np.linalg.norm(n, axis=0, keepdims=True)
    nmask = rng.random((1, h, w)) > 0.25
    return {
        "rgb": torch.tensor(rgb, dtype=torch.float32),
        "seg": torch.tensor(seg),
        "depth": torch.tensor(depth, dtype=torch.float32),
        "depth_mask": torch.tensor(dmask),
        "normal": torch.tensor(np.where(nmask, n, 0), dtype=torch.float32),
        "normal_mask": torch.tensor(nmask),
        "scene": torch.tensor(scene),
        "id": "x",
    }


def samples(n=4, h=10, w=12, seed=0, scenes=(3, 7, 3, 200)):
    rng = np.random.default_rng(seed)
    return [make_sample(rng, h, w, scenes[i % len(scenes)]) for i in range(n)]


def write_two_buildings(root, layout="building_first", **kw):
    a, b = samples(3, seed=0), samples(2, seed=1)
    write_taskonomy(a, root, "allensville", layout=layout, **kw)
    write_taskonomy(b, root, "beechwood", layout=layout, start_point=10, **kw)
    return {"allensville": a, "beechwood": b}


def view_file(root, building, task, point, layout="building_first", ext=".png"):
    d = root / building / task if layout == "building_first" else root / task / building
    return d / f"point_{point}_view_0_domain_{task}{ext}"


# -------------------------------------------------------------------------------------------
# Decoding conventions.


def test_depth_zbuffer_units_and_invalid_value(tmp_path):
    raw = np.array([[1024, 65535], [0, 512]], dtype=np.uint16)
    p = tmp_path / "d.png"
    Image.fromarray(raw).save(p)
    arr = np.asarray(Image.open(p))
    assert arr.dtype == np.uint16  # really a 16-bit PNG
    depth, valid = decode_depth_zbuffer(arr, p)
    np.testing.assert_array_equal(depth, [[2.0, 0.0], [0.0, 1.0]])
    np.testing.assert_array_equal(valid, [[True, False], [False, True]])
    depth, valid = decode_depth_zbuffer(arr, p, max_depth=1.5)
    np.testing.assert_array_equal(valid, [[False, False], [False, True]])


def test_segment_semantic_values():
    raw = np.array([[0, 1, 2, 17]])
    np.testing.assert_array_equal(decode_segment_semantic(raw, "f.png"), [[IGNORE_INDEX, 0, 1, 16]])
    np.testing.assert_array_equal(
        decode_segment_semantic(raw, "f.png", background_as_ignore=True),
        [[IGNORE_INDEX, IGNORE_INDEX, 0, 15]],
    )
    with pytest.raises(DataError, match=r"f.png.*18"):
        decode_segment_semantic(np.array([[18]]), "f.png")


def _hand_building(root, depth_raw, seg_raw, normal_rgb, scene_probs, h=2, w=2):
    d = root / "b0"
    for t in ("rgb", "segment_semantic", "depth_zbuffer", "normal", "class_scene"):
        (d / t).mkdir(parents=True, exist_ok=True)
    name = "point_5_view_2_domain_"
    Image.fromarray(np.full((h, w, 3), 255, np.uint8)).save(d / "rgb" / f"{name}rgb.png")
    Image.fromarray(np.asarray(seg_raw, np.uint8)).save(
        d / "segment_semantic" / f"{name}segment_semantic.png"
    )
    Image.fromarray(np.asarray(depth_raw, np.uint16)).save(d / "depth_zbuffer" / f"{name}depth_zbuffer.png")
    Image.fromarray(np.asarray(normal_rgb, np.uint8)).save(d / "normal" / f"{name}normal.png")
    np.save(d / "class_scene" / f"{name}class_scene.npy", np.asarray(scene_probs, np.float32))


def test_known_values_through_the_loader(tmp_path):
    probs = np.full(NUM_PLACES, 0.001, np.float32)
    probs[52] = 0.9  # Places365 index 52 ('bedroom' in the standard order)
    _hand_building(
        tmp_path,
        depth_raw=[[1024, 65535], [0, 2560]],
        seg_raw=[[0, 1], [5, 17]],
        normal_rgb=[[[255, 128, 128], [128, 128, 128]], [[128, 255, 128], [0, 0, 0]]],
        scene_probs=probs,
    )
    ds = TaskonomyDataset(tmp_path, image_size=None)
    assert ds.folder_layout == "building_first" and len(ds) == 1
    s = ds[0]
    assert s["id"] == "b0/point_5_view_2"
    assert s["depth"].tolist() == [[[2.0, 0.0], [0.0, 5.0]]]
    assert s["depth_mask"].tolist() == [[[True, False], [False, True]]]
    assert s["seg"].tolist() == [[IGNORE_INDEX, 0], [4, 16]]
    assert s["normal_mask"].tolist() == [[[True, False], [True, False]]]  # grey 128 and black are invalid
    torch.testing.assert_close(s["normal"][:, 0, 0], torch.tensor([1.0, 0.0039, 0.0039]), atol=1e-3, rtol=0)
    torch.testing.assert_close(s["normal"][:, 1, 0], torch.tensor([0.0039, 1.0, 0.0039]), atol=1e-3, rtol=0)
    assert int(s["scene"]) == 52 and ds.info.num_scenes == NUM_PLACES
    assert ds.info.num_seg_classes == 17 and ds.info.seg_class_names[0] == "background"
    assert bool((s["rgb"] == 1).all())


def test_round_trip_both_layouts_and_omnitools_level(tmp_path):
    results = {}
    for layout in ("building_first", "task_first"):
        root = tmp_path / layout
        data = write_two_buildings(root, layout=layout)
        ds = TaskonomyDataset(root, image_size=None)
        assert ds.folder_layout == layout and ds.buildings == ["allensville", "beechwood"]
        got = {ds[i]["id"]: ds[i] for i in range(len(ds))}
        assert list(got) == [ds.sample_id(i) for i in range(len(ds))]
        for b, items in data.items():
            start = 0 if b == "allensville" else 10
            for k, want in enumerate(items):
                g = got[f"{b}/point_{start + k}_view_0"]
                assert torch.equal(g["seg"], want["seg"])
                assert torch.equal(g["depth_mask"], want["depth_mask"])
                assert torch.equal(g["normal_mask"], want["normal_mask"])
                torch.testing.assert_close(g["depth"], want["depth"], atol=1 / 1024, rtol=0)
                torch.testing.assert_close(g["rgb"], want["rgb"], atol=1 / 255 + 1e-6, rtol=0)
                torch.testing.assert_close(g["normal"], want["normal"], atol=0.01, rtol=0)
                assert int(g["scene"]) == int(want["scene"])
                validate_sample(g, 17, "t", num_scenes=NUM_PLACES)
        results[layout] = got
    assert results["building_first"].keys() == results["task_first"].keys()
    # omnitools adds a component level: root/<task>/taskonomy/<building>/
    omni = tmp_path / "omni"
    for task_dir in (tmp_path / "task_first").iterdir():
        shutil.copytree(task_dir, omni / task_dir.name / "taskonomy")
    ds = TaskonomyDataset(omni, image_size=None)
    assert ds.folder_layout == "task_first" and len(ds) == 5


def test_ambiguous_layout_and_explicit_choice(tmp_path):
    write_two_buildings(tmp_path, layout="building_first")
    write_taskonomy(samples(1), tmp_path, "carpio", layout="task_first")
    with pytest.raises(DataError, match="both"):
        TaskonomyDataset(tmp_path)
    assert len(TaskonomyDataset(tmp_path, layout="task_first")) == 1
    assert len(TaskonomyDataset(tmp_path, layout="building_first")) == 5
    with pytest.raises(DataError, match="no Taskonomy data"):
        TaskonomyDataset(tmp_path / "allensville" / "rgb")


def test_building_whitelist(tmp_path):
    write_two_buildings(tmp_path)
    ds = TaskonomyDataset(tmp_path, buildings=["beechwood"])
    assert len(ds) == 2 and all(ds.records[i][0] == "beechwood" for i in range(2))
    lst = tmp_path / "val_models.txt"
    lst.write_text("# buildings\nallensville\n")
    assert len(TaskonomyDataset(tmp_path, buildings=lst)) == 3
    with pytest.raises(DataError, match="nowhere"):
        TaskonomyDataset(tmp_path, buildings=["allensville", "nowhere"])


def test_scene_class_selection(tmp_path):
    write_two_buildings(tmp_path)  # scenes (Places indices) 3, 7, 3 and 3, 7
    ds = TaskonomyDataset(tmp_path, scene_classes=[7, 3], image_size=None)
    assert [int(ds[i]["scene"]) for i in range(len(ds))] == [1, 0, 1, 1, 0]
    assert ds.info.scene_names == ("places365_007", "places365_003", "other")

    ds = TaskonomyDataset(tmp_path, scene_classes=[7], image_size=None)  # "other" by default
    assert [int(ds[i]["scene"]) for i in range(len(ds))] == [1, 0, 1, 1, 0]
    ds = TaskonomyDataset(tmp_path, scene_classes=[7], scene_other="drop", image_size=None)
    assert len(ds) == 2 and ds.dropped == 3 and ds.info.num_scenes == 1
    assert all(int(ds[i]["scene"]) == 0 for i in range(2))
    ds = TaskonomyDataset(tmp_path, scene_classes=[7, 100], scene_other="restrict", image_size=None)
    assert ds.info.num_scenes == 2  # the arg-max over the kept classes only
    assert [int(ds[i]["scene"]) for i in range(len(ds))] == [0, 0, 0, 0, 0]

    names = tmp_path / "categories_places365.txt"
    names.write_text("".join(f"/{chr(97 + i % 26)}/place_{i} {i}\n" for i in range(NUM_PLACES)))
    ds = TaskonomyDataset(tmp_path, scene_classes=["place_3", "/h/place_7"], places_names=names)
    assert ds.info.scene_names == ("/d/place_3", "/h/place_7", "other")
    with pytest.raises(DataError, match="places_names"):
        TaskonomyDataset(tmp_path, scene_classes=["bedroom"])
    ds = TaskonomyDataset(tmp_path, scenes="none", image_size=None)
    assert ds.info.num_scenes == 0 and int(ds[0]["scene"]) == -1


def test_mask_valid_masks_depth_and_normals(tmp_path):
    data = samples(1)
    write_taskonomy(data, tmp_path, "b0", write_mask=True)
    p = view_file(tmp_path, "b0", "mask_valid", 0)
    m = np.full((10, 12), 255, np.uint8)
    m[:, :6] = 0
    Image.fromarray(m).save(p)
    s = TaskonomyDataset(tmp_path, image_size=None)[0]
    assert not bool(s["depth_mask"][..., :6].any()) and not bool(s["normal_mask"][..., :6].any())
    assert torch.equal(s["depth_mask"][..., 6:], data[0]["depth_mask"][..., 6:])


# -------------------------------------------------------------------------------------------
# Bad input.


def test_missing_and_extra_views_named(tmp_path):
    write_two_buildings(tmp_path)
    view_file(tmp_path, "beechwood", "normal", 11).unlink()
    extra = view_file(tmp_path, "allensville", "depth_zbuffer", 99)
    shutil.copy(view_file(tmp_path, "allensville", "depth_zbuffer", 0), extra)
    with pytest.raises(DataError) as e:
        TaskonomyDataset(tmp_path)
    msg = str(e.value)
    assert "point_11_view_0" in msg and str(tmp_path / "beechwood" / "normal") in msg
    assert "point_99_view_0" in msg and str(tmp_path / "allensville" / "depth_zbuffer") in msg


def test_wrong_domain_and_odd_names(tmp_path):
    write_two_buildings(tmp_path)
    good = view_file(tmp_path, "allensville", "normal", 0)
    good.rename(good.with_name("point_0_view_0_domain_depth_zbuffer.png"))
    with pytest.raises(DataError, match="another domain"):
        TaskonomyDataset(tmp_path)
    good.with_name("point_0_view_0_domain_depth_zbuffer.png").rename(good.with_name("point_0_view_0.png"))
    assert len(TaskonomyDataset(tmp_path)) == 5  # the domain suffix is optional
    (good.parent / "notes.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"notes\.png"):
        TaskonomyDataset(tmp_path)


def _err(root, i, **kw):
    ds = TaskonomyDataset(root, image_size=None, **kw)
    with pytest.raises(DataError) as e:
        ds[i]
    return str(e.value)


def test_bad_files_named(tmp_path):
    write_two_buildings(tmp_path)
    # 8-bit depth (e.g. a visualisation saved by mistake)
    p = view_file(tmp_path, "allensville", "depth_zbuffer", 1)
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(p)
    assert str(p) in _err(tmp_path, 1)
    # label value out of range
    p = view_file(tmp_path, "allensville", "segment_semantic", 2)
    Image.fromarray(np.full((10, 12), 30, np.uint8)).save(p)
    msg = _err(tmp_path, 2)
    assert str(p) in msg and "30" in msg
    # truncated normal PNG
    p = view_file(tmp_path, "beechwood", "normal", 10)
    p.write_bytes(p.read_bytes()[:50])
    assert str(p) in _err(tmp_path, 3)
    # class_scene of the wrong length, and a corrupt one
    p = view_file(tmp_path, "beechwood", "class_scene", 11, ext=".npy")
    np.save(p, np.ones(10, np.float32))
    assert str(p) in _err(tmp_path, 4)
    p.write_bytes(b"junk")
    assert str(p) in _err(tmp_path, 4)
    # RGB label PNG where a single channel is expected
    p = view_file(tmp_path, "allensville", "segment_semantic", 0)
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(p)
    assert str(p) in _err(tmp_path, 0)


def test_registry_and_resize(tmp_path):
    write_two_buildings(tmp_path)
    ds, info = open_dataset(f"taskonomy:{tmp_path}", 8, buildings=["allensville"])
    assert info.layout == "taskonomy" and len(ds) == 3
    s = ds[0]
    assert s["rgb"].shape == (3, 8, 8) and s["seg"].shape == (8, 8) and s["depth"].shape == (1, 8, 8)
    validate_sample(s, info.num_seg_classes, "t", info.num_scenes)
