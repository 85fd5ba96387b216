"""``python -m mgm_fast.data prepare-nyuv2`` (mgm_fast.data.nyuv2) on a small file the tests write in
the structure of the real nyu_depth_v2_labeled.mat (MATLAB v7.3 = HDF5, transposed axes, cell
arrays of strings as object references): a few 480x640 frames rendered from known planes, so the
computed normals can be checked against the truth."""

import json
import os
import struct
import zlib

import numpy as np
import pytest

from mgm_fast.data.__main__ import main
from mgm_fast.data.check import check_dataset
from mgm_fast.data.folder import FolderDataset
from mgm_fast.data.mtan import MTANDataset
from mgm_fast.data.nyuv2 import (
    KINECT_RGB,
    MANIFEST_NAME,
    compute_normals,
    load_tables,
    prepare_nyuv2,
    read_mat_v5,
    read_splits,
)
from mgm_fast.data.sample import IGNORE_INDEX, DataError
from mgm_fast.data.splits import Split

h5py = pytest.importorskip("h5py")

H, W = 480, 640
SCENE_TYPES = ["kitchen", "bedroom", "excercise_room", "kitchen", "bathroom"]
TRAIN, TEST = [1, 3, 4], [2, 5]
# raw class ids (1-based into `names`) of the surfaces of the rendered frames
RAW_WALL, RAW_FLOOR, RAW_BED, RAW_CHAIR, RAW_BOOK = 21, 11, 157, 5, 1


def raw_names():
    """894 raw class names: the named classes of the 40-class table at their raw ids (as in the
    release), placeholders elsewhere."""
    names = [f"raw class {k}" for k in range(1, 895)]
    for raw, name in load_tables().anchors().items():
        names[raw - 1] = name
    names[RAW_BOOK - 1] = "book"
    return names


def rays():
    """Unnormalised viewing rays (H, W, 3) of the toolbox camera (cx, cy are 1-based)."""
    u = np.arange(W) + 1.0
    v = np.arange(H) + 1.0
    rx = np.broadcast_to(((u - KINECT_RGB.cx) / KINECT_RGB.fx)[None, :], (H, W))
    ry = np.broadcast_to(((v - KINECT_RGB.cy) / KINECT_RGB.fy)[:, None], (H, W))
    return np.stack([rx, ry, np.ones((H, W))], axis=-1)


def unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def render(k, noise=0.0):
    """Frame k: a tilted back wall, a floor and a fronto-parallel box in front of them.

    Returns depth (H, W) float32, true normals (H, W, 3), surface id (H, W) (0 wall, 1 floor,
    2 box), raw labels (H, W) uint16 and RGB (H, W, 3) uint8.
    """
    r = rays()
    yaw = np.radians(10 + 7 * k)
    planes = [  # (normal facing the camera, a point on the plane)
        (unit([np.sin(yaw), 0.0, -np.cos(yaw)]), np.array([0.0, 0.0, 3.0 + 0.2 * k])),  # wall
        (unit([0.0, -1.0, -0.15 * (k % 2)]), np.array([0.0, 1.2, 0.0])),  # floor 1.2 m below, y down
    ]
    depth = np.full((H, W), np.inf)
    normal = np.zeros((H, W, 3))
    surface = np.zeros((H, W), dtype=np.int64)
    for s, (n, p0) in enumerate(planes):
        z = (n @ p0) / (r @ n)
        take = (z > 0) & (z < depth)
        depth[take], normal[take], surface[take] = z[take], n, s
    box = (slice(150 + 10 * k, 300), slice(380, 520))  # a box face at 1.8 m, facing the camera
    depth[box], normal[box], surface[box] = 1.8, (0.0, 0.0, -1.0), 2
    rng = np.random.default_rng(k)
    depth = depth + noise * rng.standard_normal((H, W))
    labels = np.choose(surface, [RAW_WALL, RAW_FLOOR, RAW_BED]).astype(np.uint16)
    labels[20:60, 30:90] = 0  # unlabelled
    labels[400:440, 100:160] = RAW_CHAIR
    labels[60:80, 560:600] = RAW_BOOK  # "book" is otherprop (40) in the 40-class table
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[..., 0] = (surface * 90 + 30).astype(np.uint8)
    rgb[..., 1] = (np.arange(W)[None, :] * 255 // W).astype(np.uint8)
    rgb[..., 2] = (np.arange(H)[:, None] * 255 // H).astype(np.uint8)
    return depth.astype(np.float32), normal, surface, labels, rgb


MAT73_HEADER = (
    b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 ."
)


def write_labelled_mat(path, frames, scene_types, names, drop=(), label_hook=None):
    """Write frames [(depth, normal, surface, labels, rgb), ...] as MATLAB v7.3 does: HDF5 behind a
    512-byte header, every array with its axes reversed, cells as references into #refs#."""
    n = len(frames)
    images = np.stack([f[4] for f in frames])  # (N, H, W, 3)
    depths = np.stack([f[0] for f in frames])
    raw = depths.copy()
    raw[:, 200:240, 100:180] = 0  # a sensor hole, as rawDepths has
    labels = np.stack([f[3] for f in frames])
    if label_hook is not None:
        label_hook(labels)
    with h5py.File(path, "w", userblock_size=512) as f:

        def put(name, arr, cls):
            if name in drop:
                return
            ds = f.create_dataset(name, data=arr)
            ds.attrs["MATLAB_class"] = np.bytes_(cls)

        put("images", images.transpose(0, 3, 2, 1), "uint8")  # MATLAB 480x640x3xN
        put("depths", depths.transpose(0, 2, 1), "single")  # MATLAB 480x640xN
        put("rawDepths", raw.transpose(0, 2, 1), "single")
        put("labels", labels.transpose(0, 2, 1), "uint16")
        put("instances", np.zeros((n, W, H), dtype=np.uint8), "uint8")
        refs = f.create_group("#refs#")

        def cell(name, strings):
            if name in drop:
                return
            handles = []
            for k, s in enumerate(strings):
                ds = refs.create_dataset(f"{name}{k}", data=np.array([[ord(c)] for c in s], dtype=np.uint16))
                ds.attrs["MATLAB_class"] = np.bytes_("char")
                ds.attrs["MATLAB_int_decode"] = np.int32(2)
                handles.append(ds.ref)
            ds = f.create_dataset(name, data=np.array([handles], dtype=h5py.ref_dtype))  # MATLAB Nx1 cell
            ds.attrs["MATLAB_class"] = np.bytes_("cell")

        cell("names", names)
        cell("sceneTypes", scene_types)
    header = MAT73_HEADER.ljust(116, b" ") + bytes(8) + struct.pack("<H", 0x0200) + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)
    return path


def mat_v5_bytes(variables, compress=False, int_storage=False):
    """A MATLAB v5 MAT-file with double column vectors (as splits.mat), written by hand."""

    def element(dtype, payload):
        pad = (-len(payload)) % 8
        return struct.pack("<II", dtype, len(payload)) + payload + bytes(pad)

    out = b"MATLAB 5.0 MAT-file, Platform: GLNXA64, Created on: test".ljust(116, b" ")
    out += bytes(8) + struct.pack("<H", 0x0100) + b"IM"
    for name, values in variables.items():
        values = np.asarray(values, dtype=np.float64)
        # MATLAB stores integer-valued doubles in a smaller type (here uint16, miUINT16 = 4)
        data = (
            element(4, values.astype("<u2").tobytes())
            if int_storage
            else element(9, values.astype("<f8").tobytes())
        )
        body = (
            element(6, struct.pack("<II", 6, 0))  # array flags: mxDOUBLE_CLASS
            + element(5, struct.pack("<ii", len(values), 1))  # dimensions N x 1
            + element(1, name.encode())
            + data
        )
        matrix = element(14, body)
        if compress:
            z = zlib.compress(matrix)
            out += struct.pack("<II", 15, len(z)) + z
        else:
            out += matrix
    return out


@pytest.fixture(scope="module")
def frames():
    return [render(k, noise=0.0005) for k in range(len(SCENE_TYPES))]


@pytest.fixture(scope="module")
def nyu(tmp_path_factory, frames):
    """(mat path, splits path) of the fake release."""
    root = tmp_path_factory.mktemp("nyu")
    mat = write_labelled_mat(root / "nyu_depth_v2_labeled.mat", frames, SCENE_TYPES, raw_names())
    splits = root / "splits.mat"
    splits.write_bytes(mat_v5_bytes({"trainNdxs": TRAIN, "testNdxs": TEST}, compress=True))
    return mat, splits


@pytest.fixture(scope="module")
def official(tmp_path_factory, nyu):
    """The fake release prepared in the official layout at 96x128."""
    mat, splits = nyu
    out = tmp_path_factory.mktemp("prep") / "official"
    summary = prepare_nyuv2(mat, out, splits=splits, size="96x128", progress=False, log=None, workers=2)
    return out, summary


def angle_deg(a, b):
    """Angle between unit vectors along the last axis, degrees."""
    return np.degrees(np.arccos(np.clip((a * b).sum(-1), -1.0, 1.0)))


def interior(surface, r):
    """Pixels whose (2r+1)^2 window holds one surface only."""
    pad = np.pad(surface, r, mode="edge")
    lo = hi = surface.copy()
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            win = pad[dy : dy + H, dx : dx + W]
            lo, hi = np.minimum(lo, win), np.maximum(hi, win)
    return lo == hi


# -------------------------------------------------------------------------------------------
# Tables.


def test_tables_lengths_and_known_entries():
    t = load_tables()
    assert t.nyu40_of_raw.shape == (895,) and t.nyu40_of_raw[0] == 0
    assert set(np.unique(t.nyu40_of_raw[1:]).tolist()) == set(range(1, 41))
    assert len(t.nyu40_names) == 40 and len(t.nyu13_names) == 13 and len(t.nyu13_of_40) == 41
    # raw name -> 40-class id, confirmed against the raw names of the release: wall, floor, bed,
    # chair are 1, 2, 4, 5; "book" (not "books") is otherprop, "light" otherstructure
    known = {21: (1, "wall"), 11: (2, "floor"), 157: (4, "bed"), 5: (5, "chair"), 4: (22, "ceiling"),
             85: (23, "books"), 172: (25, "television"), 1: (40, "otherprop"), 62: (38, "otherstructure")}  # fmt: skip
    for raw, (c40, name) in known.items():
        assert t.nyu40_of_raw[raw] == c40 and t.nyu40_names[c40 - 1] == name
    # each named class 1..37 has exactly one raw class; 38-40 collect the rest
    counts = np.bincount(t.nyu40_of_raw[1:], minlength=41)
    assert (counts[1:38] == 1).all() and counts[38:].tolist() == [68, 82, 707]
    assert len(t.anchors()) == 37
    # 40 -> 13 (Couprie): wall->wall, floor->floor, bed->bed, chair->chair, door->wall,
    # television->tv, books->books, blinds->window, pillow->objects, otherfurniture->furniture
    for c40, name13 in {1: "wall", 2: "floor", 4: "bed", 5: "chair", 8: "wall", 25: "tv", 23: "books",
                        13: "window", 18: "objects", 39: "furniture", 11: "painting"}.items():  # fmt: skip
        assert t.nyu13_names[t.nyu13_of_40[c40] - 1] == name13
    lut40, lut13 = t.class_lut(40), t.class_lut(13)
    assert lut40[0] == IGNORE_INDEX and lut13[0] == IGNORE_INDEX
    assert lut40[21] == 0 and lut13[21] == t.nyu13_names.index("wall")
    assert lut40[1:].min() == 0 and lut40.max() == 39 and lut13[1:].min() == 0 and lut13.max() == 12


def test_scene_tables():
    t = load_tables()
    assert len(t.scene_types) == 27 and list(t.scene_types) == sorted(t.scene_types)
    assert sum(t.scene_frames) == 1449
    s27, s10 = t.scene_index(27), t.scene_index(10)
    assert s27["basement"] == 0 and s27["study_room"] == 26 and s27["kitchen"] == 16
    assert t.scene_frames[s27["bedroom"]] == 383 and t.scene_frames[s27["kitchen"]] == 225
    assert "excercise_room" in s27  # spelled as in the release
    assert t.group10_names[s10["bedroom"]] == "bedroom" and t.group10_names[s10["cafe"]] == "others"
    assert [t.group10_names[s10[n]] for n in ("kitchen", "living_room", "bookstore", "study")] == [
        "kitchen", "living_room", "bookstore", "others"]  # fmt: skip
    # the 10 groups: 9 scene types kept, the other 18 merged
    kept = [n for n in t.scene_types if t.group10_names[s10[n]] != "others"]
    assert len(kept) == 9 and sorted(kept) == sorted(t.group10_names[:9])


# -------------------------------------------------------------------------------------------
# Normals.


@pytest.mark.parametrize("noise", [0.0, 0.001])
def test_normals_of_known_planes(noise):
    depth, truth, surface, _, _ = render(2, noise=noise)
    n, valid = compute_normals(depth)
    assert n.dtype == np.float32 and valid.dtype == bool and n.shape == (H, W, 3)
    assert np.allclose(np.linalg.norm(n[valid], axis=-1), 1, atol=1e-5) and (n[~valid] == 0).all()
    inner = interior(surface, 7)
    assert valid[inner].mean() > 0.97
    err = angle_deg(n[valid & inner], truth[valid & inner])
    # 0.5 mm noise on 15x15 windows: a fraction of a degree; never more than a few degrees
    assert np.percentile(err, 99) < (0.05 if noise == 0 else 2.0) and err.max() < (0.5 if noise == 0 else 5.0)
    # facing the camera everywhere: dot(n, ray) < 0
    assert ((n * rays()).sum(-1)[valid] < 0).all()
    # the 1.2 m step between the box and the wall behind it is no plane: masked on both sides
    row = 225
    edge_col = 380
    assert not valid[row, edge_col - 7 : edge_col + 7].any()
    assert valid[row, edge_col + 20] and valid[row, edge_col - 30]
    # evaluated on a grid only (what prepare-nyuv2 does before a nearest resize): same values
    rows, cols = np.arange(3, H, 5), np.arange(0, W, 7)
    ng, vg = compute_normals(depth, rows=rows, cols=cols)
    np.testing.assert_array_equal(ng, n[rows[:, None], cols[None, :]])
    np.testing.assert_array_equal(vg, valid[rows[:, None], cols[None, :]])


def test_closed_form_eigenvectors_match_eigh():
    """The closed-form smallest eigenvector against numpy.linalg.eigh (its reference twin) on
    random covariances, including thin ones (planes) and near-degenerate ones."""
    from mgm_fast.data.nyuv2.normals import _smallest_eigenvectors

    rng = np.random.default_rng(1)
    k = 4000
    q, _ = np.linalg.qr(rng.normal(size=(k, 3, 3)))
    scales = np.exp(rng.uniform(-14, 0, size=(k, 3)))  # eigenvalues from 1e-6 to 1
    scales[: k // 4, 0] = 0.0  # exact planes
    c = np.einsum("kij,kj,klj->kil", q, scales, q)
    vec, l0, l1, l2, ok = _smallest_eigenvectors(
        c[:, 0, 0], c[:, 1, 1], c[:, 2, 2], c[:, 0, 1], c[:, 0, 2], c[:, 1, 2]
    )
    w, v = np.linalg.eigh(c)
    np.testing.assert_allclose(np.stack([l0, l1, l2], 1), w, rtol=0, atol=1e-9)
    assert ok.all()
    # where the smallest eigenvalue is separated, the same vector up to sign
    sep = (w[:, 1] - w[:, 0]) > 1e-3 * w[:, 2]
    assert sep.sum() > k // 2
    cos = np.abs(np.einsum("ki,ki->k", vec, v[:, :, 0]))
    assert np.degrees(np.arccos(np.clip(cos[sep], 0, 1))).max() < 1e-4


def test_normals_mask_missing_depth_and_crop_offset():
    depth, truth, surface, _, _ = render(0)
    depth[100:140, 200:260] = 0
    _, valid = compute_normals(depth)
    assert not valid[100:140, 200:260].any()
    # the crop offset keeps the geometry: a cropped depth map gives the same normals
    r0, c0 = 44, 40
    nc, vc = compute_normals(depth[r0:471, c0:601], offset=(r0, c0))
    inner = interior(surface, 7)[r0:471, c0:601] & vc
    assert angle_deg(nc[inner], truth[r0:471, c0:601][inner]).max() < 0.1
    # without the offset the rays are wrong and so are the normals of the tilted planes
    nw, vw = compute_normals(depth[r0:471, c0:601])
    assert angle_deg(nw[inner & vw], truth[r0:471, c0:601][inner & vw]).max() > 2.0


# -------------------------------------------------------------------------------------------
# MATLAB files.


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("int_storage", [False, True])
def test_read_mat_v5_and_splits(tmp_path, compress, int_storage):
    path = tmp_path / "splits.mat"
    path.write_bytes(mat_v5_bytes({"trainNdxs": [4, 1, 3], "testNdxs": [2, 5]}, compress, int_storage))
    v = read_mat_v5(path)
    assert v["trainNdxs"].shape == (3, 1) and v["trainNdxs"].dtype == np.float64
    assert v["trainNdxs"].ravel().tolist() == [4, 1, 3]
    assert read_splits(path, 5) == ([1, 3, 4], [2, 5])


def test_read_splits_v73_and_errors(tmp_path):
    path = tmp_path / "splits73.mat"
    with h5py.File(path, "w", userblock_size=512) as f:
        f["trainNdxs"] = np.array([[1.0, 2.0, 5.0]])  # MATLAB 3x1 double, transposed
        f["testNdxs"] = np.array([[3.0, 4.0]])
    assert read_splits(path, 5) == ([1, 2, 5], [3, 4])
    bad = tmp_path / "bad.mat"
    for variables, msg in (
        ({"trainNdxs": [1, 2], "testNdxs": [2, 3]}, "in both trainNdxs and testNdxs"),
        ({"trainNdxs": [1, 9], "testNdxs": [2]}, "outside 1..5"),
        ({"trainNdxs": [1, 1], "testNdxs": [2]}, "repeats"),
        ({"trainNdxs": [1, 2]}, "lacks testNdxs"),
    ):
        bad.write_bytes(mat_v5_bytes(variables))
        with pytest.raises(DataError, match=msg) as e:
            read_splits(bad, 5)
        assert str(bad) in str(e.value)
    bad.write_bytes(mat_v5_bytes({"trainNdxs": [1, 2], "testNdxs": [3]})[:-20])
    with pytest.raises(DataError, match="truncated"):
        read_splits(bad, 5)


# -------------------------------------------------------------------------------------------
# The official layout.


def test_official_layout_check_passes(official):
    out, summary = official
    result = check_dataset(f"official:{out}", image_size=None, raise_on_error=False)
    assert result["num_problems"] == 0 and result["num_ok"] == len(SCENE_TYPES)
    assert result["sizes"] == {"96x128": len(SCENE_TYPES)}
    assert summary["frames"] == 5 and summary["frames_per_split"] == {"test": 2, "train": 3}
    assert summary["scene_counts"]["kitchen"] == {"test": 0, "train": 2}
    assert summary["scene_counts"]["bathroom"] == {"test": 1, "train": 0}


def test_official_layout_labels_scenes_depth_normals(official, frames):
    out, _ = official
    ds = FolderDataset(out, image_size=None)
    t = load_tables()
    assert ds.info.num_seg_classes == 40 and ds.info.seg_class_names == t.nyu40_names
    assert ds.info.num_scenes == 27 and ds.info.scene_names == t.scene_types
    samples = {ds.sample_id(i).split("/")[1]: ds[i] for i in range(len(ds))}
    assert sorted(samples) == ["0001", "0002", "0003", "0004", "0005"]
    rows = (np.arange(96) * 2 + 1) * H // (2 * 96)  # nearest-neighbour rows / columns of the resize
    cols = (np.arange(128) * 2 + 1) * W // (2 * 128)
    for k, (depth, truth, surface, labels, _) in enumerate(frames):
        s = samples[f"{k + 1:04d}"]
        assert t.scene_types[int(s["scene"])] == SCENE_TYPES[k]
        raw = labels[rows[:, None], cols[None, :]]
        seg = s["seg"].numpy()
        assert (seg[raw == 0] == IGNORE_INDEX).all()
        assert (seg[raw == RAW_WALL] == t.nyu40_names.index("wall")).all()
        assert (seg[raw == RAW_FLOOR] == t.nyu40_names.index("floor")).all()
        assert (seg[raw == RAW_BED] == t.nyu40_names.index("bed")).all()
        assert (seg[raw == RAW_CHAIR] == t.nyu40_names.index("chair")).all()
        assert (seg[raw == RAW_BOOK] == t.nyu40_names.index("otherprop")).all()
        np.testing.assert_array_equal(s["depth"][0].numpy(), depth[rows[:, None], cols[None, :]])
        nm = s["normal_mask"][0].numpy()
        inner = interior(surface, 7)[rows[:, None], cols[None, :]]
        assert nm[inner].mean() > 0.95
        err = angle_deg(
            s["normal"].numpy().transpose(1, 2, 0)[nm & inner],
            truth[rows[:, None], cols[None, :]][nm & inner],
        )
        assert err.max() < 3.0  # plane fit + 8-bit PNG quantisation


def test_official_layout_manifest_and_split(official):
    out, _ = official
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert (
        manifest["source"]["file"] == "nyu_depth_v2_labeled.mat" and len(manifest["source"]["sha256"]) == 64
    )
    assert manifest["options"]["classes"] == 40 and manifest["options"]["size"] == [96, 128]
    assert [f["index"] for f in manifest["frames"]] == [1, 2, 3, 4, 5]
    assert [f["split"] for f in manifest["frames"]] == ["train", "test", "train", "train", "test"]
    assert [f["scene_type"] for f in manifest["frames"]] == SCENE_TYPES
    ds = FolderDataset(out, image_size=None, validate=False)
    ids = [ds.sample_id(i) for i in range(len(ds))]
    split = Split.from_json(out / "split.json", dataset_ids=ids)
    by_index = {f["index"]: f["id"] for f in manifest["frames"]}
    assert sorted(split.train) == sorted(by_index[i] for i in TRAIN)
    assert sorted(split.val) == sorted(by_index[i] for i in TEST) and split.test == []
    assert split.fixed and split.counts()["train_labelled"] == 3


def test_deterministic_bytes(tmp_path, nyu, official):
    """Same input -> byte-identical files, whatever the number of worker threads."""
    mat, splits = nyu
    out, _ = official
    again = tmp_path / "again"
    prepare_nyuv2(mat, again, splits=splits, size="96x128", progress=False, log=None, workers=1)

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    a, b = files(out), files(again)
    assert sorted(a) == sorted(b) and len(a) > 5 * 5
    assert [k for k in a if a[k] != b[k]] == []


# -------------------------------------------------------------------------------------------
# MTAN layout, 13 classes, 10 scene groups, raw depth, crop, CLI.


def test_mtan_layout_13_classes_10_scenes(tmp_path, nyu):
    mat, splits = nyu
    out = tmp_path / "mtan"
    prepare_nyuv2(
        mat, out, splits=splits, layout="mtan", size="24x32", classes=13, scene_set=10, depth="raw",
        crop="toolbox", progress=False, log=None,
    )  # fmt: skip
    t = load_tables()
    for part, idx in (("train", TRAIN), ("val", TEST)):
        result = check_dataset(f"mtan:{out}:{part}", image_size=None, raise_on_error=False)
        assert result["num_problems"] == 0 and result["num_ok"] == len(idx)
        ds = MTANDataset(out, part, image_size=None)
        assert ds.info.seg_class_names == t.nyu13_names and ds.info.scene_names == t.group10_names
        for k, i in enumerate(idx):
            s = ds[k]
            assert t.group10_names[int(s["scene"])] == t.group10_names[t.scene_index(10)[SCENE_TYPES[i - 1]]]
            seg = s["seg"].numpy()
            assert set(np.unique(seg).tolist()) <= {IGNORE_INDEX, *range(13)}
            assert t.nyu13_names.index("bed") in seg and t.nyu13_names.index("wall") in seg
            assert s["seg"].shape == (24, 32)
    assert t.scene_index(10)["excercise_room"] == t.group10_names.index("others")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert [f["id"] for f in manifest["frames"]] == ["train/0", "val/0", "train/1", "train/2", "val/1"]
    assert not (out / "split.json").exists()


def test_raw_depth_holes_are_masked(tmp_path, nyu):
    mat, _ = nyu
    out = tmp_path / "raw"
    prepare_nyuv2(mat, out, size="native", depth="raw", limit=1, progress=False, log=None)
    ds = FolderDataset(out, image_size=None)
    s = ds[0]
    assert s["depth"].shape == (1, H, W)
    assert not s["depth_mask"][0, 200:240, 100:180].any() and s["depth_mask"][0, 300:320, 100:180].all()
    assert not s["normal_mask"][0, 200:240, 100:180].any()
    assert (s["depth"][0, 200:240, 100:180] == 0).all()


def test_cli_prepare_and_check(tmp_path, nyu, capsys):
    mat, splits = nyu
    out = tmp_path / "cli"
    rc = main(["prepare-nyuv2", str(mat), "--out", str(out), "--splits", str(splits), "--size", "32",
               "--quiet", "--check", "--labelled-fraction", "0.5"])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "prepared 5 frame(s)" in text and "problems: 0" in text
    assert (
        "class histogram" in text
        and "kitchen" in text
        and "python -m mgm_fast.train --data official:" in text
    )
    split = Split.from_json(out / "split.json")
    assert split.counts() == {"train_labelled": 2, "train_weak": 1, "val": 2, "test": 0}
    assert main(["check", str(out), "--layout", "official"]) == 0


def test_precomputed_normals(tmp_path, nyu):
    mat, _ = nyu
    folder = tmp_path / "normals"
    folder.mkdir()
    rng = np.random.default_rng(0)
    given = rng.normal(size=(H, W, 3)).astype(np.float32)
    given /= np.linalg.norm(given, axis=-1, keepdims=True)
    given[:10] = 0  # invalid rows
    np.save(folder / "0001.npy", given)
    out = tmp_path / "given"
    prepare_nyuv2(mat, out, size="native", normals=folder, limit=1, progress=False, log=None)
    s = FolderDataset(out, image_size=None)[0]
    assert not s["normal_mask"][0, :10].any() and s["normal_mask"][0, 10:].all()
    got = s["normal"].numpy().transpose(1, 2, 0)[10:]
    assert angle_deg(got, given[10:]).max() < 1.0  # 8-bit PNG quantisation only
    with pytest.raises(DataError, match=r"0002\.npy or 0002\.png"):
        prepare_nyuv2(mat, tmp_path / "given2", size=32, normals=folder, limit=2, progress=False, log=None)
    assert not (tmp_path / "given2").exists()


def test_precomputed_normals_array_with_toolbox_crop(tmp_path, nyu):
    """One (N, H, W, 3) .npy for all frames, full-size maps cut by --crop toolbox like the rest."""
    mat, _ = nyu
    rng = np.random.default_rng(1)
    given = rng.normal(size=(len(SCENE_TYPES), H, W, 3)).astype(np.float32)
    given /= np.linalg.norm(given, axis=-1, keepdims=True)
    np.save(tmp_path / "normals.npy", given)
    out = tmp_path / "arr"
    prepare_nyuv2(mat, out, size="native", crop="toolbox", normals=tmp_path / "normals.npy", limit=2,
                  progress=False, log=None)  # fmt: skip
    ds = FolderDataset(out, image_size=None)
    by_id = {ds.sample_id(i).split("/")[1]: ds[i] for i in range(len(ds))}
    for k in (1, 2):
        s = by_id[f"{k:04d}"]
        assert s["rgb"].shape == (3, 427, 561) and s["normal_mask"].all()
        want = given[k - 1, 44:471, 40:601]
        assert angle_deg(s["normal"].numpy().transpose(1, 2, 0), want).max() < 1.0
    np.save(tmp_path / "short.npy", given[:2])
    with pytest.raises(DataError, match=r"short\.npy: normals array has shape \(2, 480, 640, 3\)"):
        prepare_nyuv2(mat, tmp_path / "x", normals=tmp_path / "short.npy", progress=False, log=None)
    folder = tmp_path / "small"
    folder.mkdir()
    np.save(folder / "0001.npy", given[0, :100, :100])
    with pytest.raises(DataError, match=r"0001\.npy: normals are 100x100; expected 480x640"):
        prepare_nyuv2(mat, tmp_path / "y", normals=folder, limit=1, progress=False, log=None)


# -------------------------------------------------------------------------------------------
# Bad input: every error names the file and what is missing.


def test_v5_and_non_mat_files_are_refused(tmp_path):
    v5 = tmp_path / "old.mat"
    v5.write_bytes(mat_v5_bytes({"images": [1, 2]}))
    with pytest.raises(DataError, match=r"MATLAB v5 MAT-file.*v7\.3 \(HDF5\)") as e:
        prepare_nyuv2(v5, tmp_path / "o", progress=False, log=None)
    assert str(v5) in str(e.value)
    junk = tmp_path / "junk.mat"
    junk.write_bytes(b"not a mat file at all" * 20)
    with pytest.raises(DataError, match=r"not an HDF5 / MATLAB v7\.3 file"):
        prepare_nyuv2(junk, tmp_path / "o", progress=False, log=None)
    with pytest.raises(DataError, match="file not found"):
        prepare_nyuv2(tmp_path / "missing.mat", tmp_path / "o", progress=False, log=None)
    assert not (tmp_path / "o").exists()


def test_truncated_file(tmp_path, nyu):
    mat, _ = nyu
    cut = tmp_path / "cut.mat"
    cut.write_bytes(mat.read_bytes()[: os.path.getsize(mat) // 2])
    with pytest.raises(DataError, match="truncated") as e:
        prepare_nyuv2(cut, tmp_path / "o", progress=False, log=None)
    assert str(cut) in str(e.value)


def test_missing_variables_and_wrong_names(tmp_path, frames):
    few = frames[:2]
    mat = write_labelled_mat(
        tmp_path / "a.mat", few, SCENE_TYPES[:2], raw_names(), drop=("labels", "sceneTypes")
    )
    with pytest.raises(DataError, match="lacks variable\\(s\\) 'labels', 'sceneTypes'") as e:
        prepare_nyuv2(mat, tmp_path / "o", progress=False, log=None)
    assert str(mat) in str(e.value)
    mat = write_labelled_mat(tmp_path / "b.mat", few, SCENE_TYPES[:2], raw_names(), drop=("rawDepths",))
    with pytest.raises(DataError, match="'rawDepths'"):
        prepare_nyuv2(mat, tmp_path / "o", depth="raw", progress=False, log=None)
    names = raw_names()
    names[20], names[10] = names[10], names[20]  # wall <-> floor
    mat = write_labelled_mat(tmp_path / "c.mat", few, SCENE_TYPES[:2], names)
    with pytest.raises(DataError, match="raw 11 is 'wall', expected 'floor'"):
        prepare_nyuv2(mat, tmp_path / "o", progress=False, log=None)
    mat = write_labelled_mat(tmp_path / "d.mat", few, SCENE_TYPES[:2], raw_names()[:40])
    with pytest.raises(DataError, match="'names' has 40 raw classes"):
        prepare_nyuv2(mat, tmp_path / "o", progress=False, log=None)
    assert not (tmp_path / "o").exists()


def test_bad_scene_labels_split_and_output(tmp_path, frames, nyu):
    few = frames[:2]
    mat = write_labelled_mat(tmp_path / "s.mat", few, ["kitchen", "garage"], raw_names())
    with pytest.raises(DataError, match=r"'garage' \(frame\(s\) '2'\)"):
        prepare_nyuv2(mat, tmp_path / "o", progress=False, log=None)

    def bump(labels):
        labels[1, 5, 5] = 900

    mat = write_labelled_mat(tmp_path / "l.mat", few, SCENE_TYPES[:2], raw_names(), label_hook=bump)
    with pytest.raises(DataError, match=r"frame 2: raw label\(s\) '900' outside 0\.\.894"):
        prepare_nyuv2(mat, tmp_path / "o", size=16, progress=False, log=None)
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
    good, _ = nyu
    with pytest.raises(DataError, match="pass --splits"):
        prepare_nyuv2(good, tmp_path / "o", layout="mtan", progress=False, log=None)
    bad_split = tmp_path / "splits.mat"
    bad_split.write_bytes(mat_v5_bytes({"trainNdxs": [1, 2, 9], "testNdxs": [3]}))
    with pytest.raises(DataError, match=r"outside 1\.\.5"):
        prepare_nyuv2(good, tmp_path / "o", splits=bad_split, progress=False, log=None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(DataError, match="not an empty folder"):
        prepare_nyuv2(good, tmp_path / "full", progress=False, log=None)
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_partial_output_removed_on_error(tmp_path, nyu, monkeypatch):
    """A failure half-way leaves no output folder and no temporary folder behind."""
    mat, splits = nyu
    import mgm_fast.data.nyuv2.prepare as mod

    calls = {"n": 0}
    real = mod.compute_normals

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise DataError("simulated failure")
        return real(*a, **k)

    monkeypatch.setattr(mod, "compute_normals", failing)
    with pytest.raises(DataError, match="simulated failure"):
        prepare_nyuv2(mat, tmp_path / "o", splits=splits, size=16, progress=False, log=None, workers=1)
    assert list(tmp_path.iterdir()) == []


def test_shapes_must_match(tmp_path, frames):
    path = tmp_path / "shape.mat"
    write_labelled_mat(path, frames[:2], SCENE_TYPES[:2], raw_names())
    with h5py.File(path, "r+") as f:
        del f["labels"]
        f.create_dataset("labels", data=np.zeros((2, W, H - 1), dtype=np.uint16))
    with pytest.raises(DataError, match=r"'labels' has shape \(2, 640, 479\)"):
        prepare_nyuv2(path, tmp_path / "o", progress=False, log=None)
