"""The procedural default dataset: format, determinism, resolution independence, geometry
consistency (depth vs normals), culling against a brute-force cast, and learnability (the scene
is predictable from the segmentation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mgm_fast.data.sample import validate_sample
from mgm_fast.data.synthetic import (
    IGNORE_INDEX,
    SCENE_CLASSES,
    SEG_CLASSES,
    SEG_PALETTE,
    SyntheticScenes,
    intrinsics,
)
from mgm_fast.data.synthetic import render as syn_render
from mgm_fast.data.synthetic.scenes import FLOOR
from mgm_fast.data.visualize import contact_sheet

FIELDS = ("rgb", "seg", "depth", "depth_mask", "normal", "normal_mask", "scene")


@pytest.fixture(scope="module")
def many32():
    """200 samples at 32x32 (seed 7), rendered once for the statistical tests."""
    ds = SyntheticScenes(200, 32, seed=7)
    return ds, ds.render_batch(range(200))


def _rays(size: int) -> torch.Tensor:
    """(3, H, W) camera-frame rays (x right, y down, z = 1) through the pixel centres."""
    fx, fy, cx, cy = intrinsics(size)
    i, j = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return torch.stack([(j - cx) / fx, (i - cy) / fy, torch.ones(size, size)]).double()


def test_metadata():
    ds = SyntheticScenes(5, 32)
    assert ds.num_seg_classes == len(SEG_CLASSES) >= 8
    assert ds.num_scenes == len(SCENE_CLASSES) >= 5
    assert {"wall", "floor", "ceiling", "bed", "table", "chair", "sofa", "cabinet", "lamp"} <= set(
        SEG_CLASSES
    )
    assert SEG_PALETTE.shape == (ds.num_seg_classes, 3) and SEG_PALETTE.dtype == np.uint8
    assert len({tuple(c) for c in SEG_PALETTE.tolist()}) == ds.num_seg_classes
    assert IGNORE_INDEX == -1 and len(ds) == 5
    assert ds.sample_id(4) == "synthetic-s0-000004"


@pytest.mark.parametrize("size", [16, 32, 40, 64])
def test_format_shapes_dtypes_ranges(size):
    ds = SyntheticScenes(6, size, seed=3)
    for i in range(len(ds)):
        s = ds[i]
        # The project's own format check (dtypes, shapes, ranges, unit normals, zero where invalid).
        validate_sample(s, ds.num_seg_classes, s["id"], ds.num_scenes, allow_unknown_scene=False)
        assert s["id"] == f"synthetic-s3-{i:06d}"
        assert s["rgb"].shape == (3, size, size) and s["rgb"].dtype == torch.float32
        assert s["seg"].shape == (size, size) and s["seg"].dtype == torch.int64
        assert s["depth"].shape == s["depth_mask"].shape == s["normal_mask"].shape == (1, size, size)
        assert s["normal"].shape == (3, size, size)
        assert s["scene"].dim() == 0 and s["scene"].dtype == torch.int64
        assert -1 <= float(s["rgb"].min()) and float(s["rgb"].max()) <= 1
        assert float(s["rgb"].std()) > 0.05  # an image, not a flat fill
        assert int(s["seg"].min()) >= 0 and int(s["seg"].max()) < ds.num_seg_classes  # never IGNORE_INDEX
        d = s["depth"][s["depth_mask"]]
        assert float(d.min()) > 0.05 and float(d.max()) < 12.0  # metres inside a room
        assert bool((s["depth"][~s["depth_mask"]] == 0).all())
        assert bool((s["normal_mask"] <= s["depth_mask"]).all())  # normals need depth
        assert bool((s["normal"][:, ~s["normal_mask"][0]] == 0).all())


def test_deterministic_and_independent_of_batch_order_chunking_threads():
    a = SyntheticScenes(300, 64, seed=11)
    b = SyntheticScenes(300, 64, seed=11)
    one = a[7]
    batch = b.render_batch([3, 7, 250])
    # 100 images spans several render chunks and thread groups; order reversed.
    big = a.render_batch(list(range(120, 20, -1)), num_threads=2)
    big1 = a.render_batch(np.arange(120, 20, -1), num_threads=1)
    for k in FIELDS:
        assert torch.equal(one[k], batch[k][1]), k
        assert torch.equal(one[k], a[7][k]), k  # rendering again gives the same bits
        assert torch.equal(big[k], big1[k]), k
        assert torch.equal(big[k][120 - 30], a[30][k]), k
    assert batch["id"] == ["synthetic-s11-000003", "synthetic-s11-000007", "synthetic-s11-000250"]
    assert a.scene(7) == b.scene(7)
    # Different index or seed: a different scene.
    assert not torch.equal(a[8]["rgb"], one["rgb"])
    assert a.scene(8) != a.scene(7)
    assert not torch.equal(SyntheticScenes(300, 64, seed=12)[7]["rgb"], one["rgb"])


def test_dataloader_uses_the_batched_path_and_matches_getitem():
    ds = SyntheticScenes(10, 32, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    batches = list(loader)
    assert [len(b["id"]) for b in batches] == [4, 4, 2]
    ref = ds.render_batch(range(4, 8))
    for k in FIELDS:
        assert torch.equal(batches[1][k], ref[k]), k
        assert torch.equal(batches[2][k][1], ds[9][k]), k
    assert batches[2]["id"] == ["synthetic-s4-000008", "synthetic-s4-000009"]


def test_getitem_negative_and_errors():
    ds = SyntheticScenes(4, 16)
    assert ds[-1]["id"] == ds[3]["id"] == "synthetic-s0-000003"
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    with pytest.raises(IndexError):
        ds.render_batch([0, 9])
    with pytest.raises(ValueError, match="no indices"):
        ds.render_batch([])
    with pytest.raises(ValueError, match="image_size"):
        SyntheticScenes(4, 4)


def test_resolution_independent_scene():
    lo, hi = SyntheticScenes(30, 32, seed=2), SyntheticScenes(30, 64, seed=2)
    agree = []
    for i in range(30):
        assert lo.scene(i) == hi.scene(i)  # same geometry, camera, materials
        a, b = lo[i], hi[i]
        assert int(a["scene"]) == int(b["scene"])
        agree.append((b["seg"][::2, ::2] == a["seg"]).double().mean().item())
        both = a["depth_mask"][0] & b["depth_mask"][0, ::2, ::2]
        rel = (a["depth"][0][both] - b["depth"][0, ::2, ::2][both]).abs() / a["depth"][0][both]
        assert (rel < 0.05).double().mean() > 0.85
    # Half a 64-pixel of sampling offset only moves silhouette pixels.
    assert min(agree) > 0.85 and np.mean(agree) > 0.93


def test_normals_unit_and_facing_the_camera(many32):
    _, b = many32
    n, m = b["normal"].double(), b["normal_mask"][:, 0]
    rays = _rays(32)
    length = n.norm(dim=1)[m]
    assert float((length - 1).abs().max()) < 1e-4
    cos = (n * rays).sum(1) / rays.norm(dim=0)  # cos(normal, viewing ray)
    assert float(cos[m].max()) < -0.09  # every valid normal faces the camera, none grazing
    assert m.double().mean() > 0.7  # most pixels carry a normal


def test_floor_points_lie_on_the_plane_of_the_rendered_floor_normal():
    """Back-project floor pixels with the intrinsics: they must lie on one plane whose normal
    is the rendered floor normal, at the camera's height."""
    size = 64
    ds = SyntheticScenes(40, size, seed=5)
    rays = _rays(size)
    checked = 0
    for i in range(len(ds)):
        s = ds[i]
        m = (s["seg"] == FLOOR) & s["normal_mask"][0]
        if int(m.sum()) < 300:
            continue
        normals = s["normal"][:, m].double()
        n_med = normals.median(dim=1).values
        n_med /= n_med.norm()
        flat = (normals * n_med[:, None]).sum(0) > math.cos(math.radians(1))
        # Rug edges (1.2 cm tall, labelled floor) are the only floor pixels off the plane.
        assert flat.double().mean() > 0.98
        pts = (rays[:, m] * s["depth"][0][m].double()).T[flat]  # (P, 3) camera-frame points
        centre = pts.mean(0)
        n_fit = torch.linalg.svd(pts - centre, full_matrices=False).Vh[-1]
        angle = math.degrees(math.acos(min(1.0, abs(float(n_fit @ n_med)))))
        assert angle < 2.0, (i, angle)
        assert float(((pts - centre) @ n_fit).abs().max()) < 0.03  # rugs add <= 1.2 cm
        # The plane passes at the camera's height below the camera (eye height 1.1 - 1.65 m).
        assert 1.05 < abs(float(centre @ n_med)) < 1.7
        checked += 1
    assert checked >= 15


def test_depth_holes_and_edges_like_a_kinect(many32):
    _, b = many32
    missing = 1 - b["depth_mask"].double().mean()
    assert 0.002 < float(missing) < 0.2
    assert int((~b["depth_mask"]).flatten(1).any(1).sum()) == len(b["depth"])  # every image has some
    # Normals are invalid across depth discontinuities between surfaces (a class change with a
    # depth jump; within one object a jump can be a continuous face seen at a grazing angle).
    d, m, seg = b["depth"][:, 0], b["normal_mask"][:, 0], b["seg"]
    dm = b["depth_mask"][:, 0]
    a_, c_ = d[:, :, :-1], d[:, :, 1:]
    jump = dm[:, :, :-1] & dm[:, :, 1:] & ((a_ - c_).abs() > 0.3 * torch.minimum(a_, c_) + 0.05)
    jump &= seg[:, :, :-1] != seg[:, :, 1:]
    assert int(jump.sum()) > 50
    assert not bool((jump & (m[:, :, :-1] | m[:, :, 1:])).any())


def test_all_classes_and_scenes_occur(many32):
    ds, b = many32
    seen = set(b["seg"].unique().tolist())
    assert seen == set(range(ds.num_seg_classes)), sorted(set(range(ds.num_seg_classes)) - seen)
    counts = torch.bincount(b["scene"], minlength=ds.num_scenes)
    assert int(counts.min()) >= 200 // ds.num_scenes // 2  # roughly balanced
    # Objects are in view: most images show some furniture, not only room surfaces.
    furniture = (b["seg"] > 2).flatten(1).double().mean(1)
    assert float((furniture > 0.05).double().mean()) > 0.7


def test_scene_predictable_from_segmentation_histogram():
    """Nearest-centroid on per-image class histograms (held-out) beats 2x chance clearly,
    while the mean colour of the image alone does not give the scene away."""
    ds = SyntheticScenes(450, 32, seed=21)
    b = ds.render_batch(range(450))
    hist = torch.nn.functional.one_hot(b["seg"].flatten(1), ds.num_seg_classes).double().mean(1)
    y = b["scene"]
    chance = 1 / ds.num_scenes

    def nearest_centroid(feat):
        tr, te = slice(0, 300), slice(300, 450)
        cent = torch.stack([feat[tr][y[tr] == k].mean(0) for k in range(ds.num_scenes)])
        return (torch.cdist(feat[te], cent).argmin(1) == y[te]).double().mean().item()

    acc = nearest_centroid(hist)
    assert acc > 3 * chance, acc
    colour = nearest_centroid(b["rgb"].double().flatten(2).mean(2))
    assert colour < acc - 0.2, (colour, acc)


def _brute_force_pairs(lo, hi, valid, cam, size, ts):
    """Every (image, primitive, tile) pair of valid primitives: no culling at all."""
    nt2 = (size // ts) ** 2
    b, p = np.nonzero(valid)
    bb, pp = np.repeat(b, nt2), np.repeat(p, nt2)
    rows = bb * nt2 + np.tile(np.arange(nt2), len(b))
    order = np.lexsort((pp, rows))
    return bb[order], pp[order], rows[order]


@pytest.mark.parametrize("size", [32, 48])
def test_culling_is_conservative(monkeypatch, size):
    """Screen-tile culling must never drop a visible primitive: the output equals a cast of
    every ray against every primitive, bit for bit."""
    ds = SyntheticScenes(24, size, seed=9)
    fast = ds.render_batch(range(24), num_threads=1)
    monkeypatch.setattr(syn_render, "_cull_pairs", _brute_force_pairs)
    slow = ds.render_batch(range(24), num_threads=1)
    for k in FIELDS:
        assert torch.equal(fast[k], slow[k]), k


def test_contact_sheet(tmp_path):
    ds = SyntheticScenes(3, 32, seed=1)
    samples = [ds[i] for i in range(3)]
    path = contact_sheet(samples, tmp_path / "sub" / "sheet.png", scale=2, pad=2)
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (3 * (64 + 2) + 2, 4 * (64 + 2) + 2, 3)
    s = samples[0]
    # Segmentation column uses the palette; depth and normal columns are black where invalid.
    y0, x_seg, x_dep, x_nrm = 2, 2 + 66, 2 + 2 * 66, 2 + 3 * 66
    i, j = 31, 16  # bottom half: below the scene-name label
    assert tuple(img[y0 + 2 * i, x_seg + 2 * j]) == tuple(SEG_PALETTE[int(s["seg"][i, j])])
    bad = (~s["depth_mask"][0]).nonzero()
    bad = bad[bad[:, 0] > 6]  # skip the label area
    assert len(bad)
    i, j = bad[0].tolist()
    assert tuple(img[y0 + 2 * i, x_dep + 2 * j]) == (0, 0, 0)
    assert tuple(img[y0 + 2 * i, x_nrm + 2 * j]) == (0, 0, 0)
    ok = s["normal_mask"][0].nonzero()
    i, j = ok[ok[:, 0] > 6][0].tolist()
    expect = ((s["normal"][:, i, j] + 1) * 127.5).clamp(0, 255).to(torch.uint8).tolist()
    assert np.abs(img[y0 + 2 * i, x_nrm + 2 * j].astype(int) - expect).max() <= 1
    with pytest.raises(ValueError, match="no samples"):
        contact_sheet([], tmp_path / "x.png")
