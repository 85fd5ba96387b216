"""The ray-cast renderer of the synthetic scenes: pinhole camera, :func:`render_scenes`, and the
flat-pixel output buffers that :class:`~mgm_fast.data.synthetic.dataset.SyntheticScenes` fills
from several threads.

Speed
    Scenes are sampled in plain Python (~0.1 ms each); rendering is numpy over all pixels of a
    group of images at once, with no per-pixel Python. Each primitive is tested only against the
    screen tiles that its near-plane-clipped, projected bounding box overlaps (conservative
    culling: the result equals testing every pixel, see the tests), and the nearest hit is kept
    by a segmented minimum over packed (depth bits, surface slot) int32 keys, so thin chair legs
    or far-away lamps cost a few tiles rather than the whole image. ``render_batch`` spreads
    groups of images over ``torch.get_num_threads()`` threads (numpy releases the GIL in its
    loops). See benchmarks/test_bench_synthetic.py.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from mgm_fast.data.synthetic.scenes import MAX_SLOTS, ROOM_FACES, Scene, uniform_block

__all__ = [
    "FOV_DEG",
    "as_tensors",
    "empty_outputs",
    "intrinsics",
    "render_into",
    "render_scenes",
    "thread_pool",
]

FOV_DEG = 58.0
"""Horizontal (= vertical) field of view: between the Kinect's ~62 degrees across 640 pixels and
the ~50 degrees of a centred square crop of it."""

_EPS_T = 1e-4  # smallest accepted hit distance (metres along the z=1 ray)


def intrinsics(image_size: int) -> tuple[float, float, float, float]:
    """Pinhole intrinsics (fx, fy, cx, cy) in pixels for a square ``image_size`` image.

    Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); its camera-frame ray is
    ((j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, 1) with x right, y down, z forward.
    """
    f = 0.5 * image_size / math.tan(math.radians(FOV_DEG) / 2)
    return f, f, image_size / 2, image_size / 2


# -------------------------------------------------------------------------------------------
# Rendering.
#
# Implementation notes (measured on the 2-core CPU, numpy 2 / torch 2.13):
# * The renderer is numpy on chunks of about _CHUNK_PIXELS pixels. Its ufuncs run one thread
#   with ~1 us of call overhead and stay in the L2 cache at that chunk size; the same code in
#   eager torch was 2-3x slower, and torch's two-thread pool stalls for milliseconds per op when
#   other processes occupy the cores. Outputs become torch tensors without a copy.
# * Elementwise arithmetic, min / max, floor and sign are cheap; per-pixel gathers cost about ten
#   of them, so per-surface attributes are gathered once per pixel and type choices are made
#   with 0/1 float weights.
# * All per-pixel work is elementwise within one image and uses only IEEE-exact operations
#   (+ - * /, sqrt, floor, min / max): an image renders to the same bits whatever chunk or batch
#   it is in.

_NOISE_LEN = 1 << 18
_CHUNK_PIXELS = 1 << 15
_noise_cache: dict[int, np.ndarray] = {}
_grid_cache: dict[int, tuple] = {}

# Columns of the per-slot table (one row per surface slot of each image).
_C_KIND = 0  # 0 room face, 1 box, 2 vertical cylinder, 3 sphere
_C_CEN = 1  # 3 columns: centre (box / room: box centre; cylinder: axis point at mid height)
_C_IH = 4  # 3 columns: inverse half extents (cylinder: 1/r, 2/height, 1/r; sphere: 1/r x 3)
_C_CLS = 7
_C_A, _C_DB = 8, 11  # albedo A (linear rgb) and B - A
_C_TEX = 14  # texture type + 4 * orientation
_C_ISCALE, _C_DUTY, _C_EMIT, _C_NODEPTH = 15, 16, 17, 18
_N_COLS = 19


def _noise_pattern(length: int) -> np.ndarray:
    """Fixed (2, length) float32 pattern: row 0 ~ N(0, 1) pixel noise, row 1 ~ U[0, 1) for depth
    dropout. Each image reads a contiguous window at its own offset: cheaper than hashing every
    pixel, and fixed once computed (it depends on nothing but its length)."""
    if length not in _noise_cache:
        rows = uniform_block(12345, np.arange(3), 0, length)
        normal = np.sqrt(-2 * np.log1p(-rows[0])) * np.cos(2 * np.pi * rows[1])
        _noise_cache[length] = np.stack([normal, rows[2]]).astype(np.float32)
    return _noise_cache[length]


def _tile_size(size: int) -> int:
    ts = min(16, max(4, size // 8))
    while size % ts:
        ts -= 1
    return ts


def _grid(size: int):
    """Per-resolution constants: camera-frame ray x and y components and normalised pixel
    coordinates u, v (all (N,) float32, row-major image order), the tile size, and 1 / |ray|
    (the same in every camera orientation)."""
    if size not in _grid_cache:
        fx, fy, cx, cy = intrinsics(size)
        j = np.tile(np.arange(size, dtype=np.float64) + 0.5, size)
        i = np.repeat(np.arange(size, dtype=np.float64) + 0.5, size)
        f32 = np.float32
        rx, ry = (j - cx) / fx, (i - cy) / fy
        _grid_cache[size] = (rx.astype(f32), ry.astype(f32), (j / size).astype(f32), (i / size).astype(f32),
                             _tile_size(size), (1 / np.sqrt(rx * rx + ry * ry + 1)).astype(f32))  # fmt: skip
    return _grid_cache[size]


@dataclass
class _Packed:
    """Scenes of a batch as padded float32 arrays (B images)."""

    tab: np.ndarray  # (B, S, _N_COLS) per-slot attributes
    boxes: np.ndarray  # (B, Pb, 7) x0 y0 z0 x1 y1 z1 slot
    cyls: np.ndarray  # (B, Pc, 6) cx cz r y0 y1 slot
    sphs: np.ndarray  # (B, Ps, 5) cx cy cz r slot
    valid: list  # [(B, Pb), (B, Pc), (B, Ps)] bool
    cam: np.ndarray  # (B, 12) position, rotation (row-major, columns = camera axes)
    light: np.ndarray  # (B, 16) room(3) light pos(3) power sun dir(3) power ambient exposure tint(3)
    holes: np.ndarray  # (B, 3, 4) u v ru rv
    n_holes: np.ndarray  # (B,) int64 holes in use
    offsets: np.ndarray  # (B,) int64 noise offsets

    def rows(self, b0: int, b1: int) -> _Packed:
        sl = slice(b0, b1)
        return _Packed(self.tab[sl], self.boxes[sl], self.cyls[sl], self.sphs[sl], [v[sl] for v in self.valid],
                       self.cam[sl], self.light[sl], self.holes[sl], self.n_holes[sl], self.offsets[sl])  # fmt: skip


def _ragged(lists: list[list[tuple]], width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of per-scene lists as one float64 array plus (image, position-in-image) indices."""
    flat = [row for rows in lists for row in rows]
    arr = np.asarray(flat, dtype=np.float64).reshape(len(flat), width)
    counts = np.fromiter((len(rows) for rows in lists), np.int64, len(lists))
    img = np.repeat(np.arange(len(lists)), counts)
    pos = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    return arr, img, pos


def _pack(scenes: list[Scene]) -> _Packed:
    """Stack the scenes' Python lists into padded arrays, vectorised over the whole batch."""
    bsz = len(scenes)
    mats, mi, mj = _ragged([s.materials for s in scenes], 13)
    bxs, bi, bj = _ragged([s.boxes for s in scenes], 7)
    cys, ci, cj = _ragged([s.cylinders for s in scenes], 6)
    sps, si, sj = _ragged([s.spheres for s in scenes], 5)
    tab = np.zeros((bsz, int(mj.max()) + 1, _N_COLS), dtype=np.float32)
    t = np.zeros((len(mats), _N_COLS))
    t[:, _C_CLS] = mats[:, 0]
    t[:, _C_A : _C_A + 3] = mats[:, 1:4]
    t[:, _C_DB : _C_DB + 3] = mats[:, 4:7] - mats[:, 1:4]
    t[:, _C_TEX] = mats[:, 7] + 4 * mats[:, 9]
    t[:, _C_ISCALE] = 1.0 / np.maximum(mats[:, 8], 1e-3)
    t[:, _C_DUTY : _C_DUTY + 3] = mats[:, 10:13]
    rooms = np.asarray([s.room for s in scenes], dtype=np.float64)
    face = mj < ROOM_FACES
    t[face, _C_CEN : _C_CEN + 3] = rooms[mi[face]] / 2
    t[face, _C_IH : _C_IH + 3] = 2 / rooms[mi[face]]
    tab[mi, mj] = t
    # Geometry of the primitives' slots (kind, centre, inverse half extents).
    sl = bxs[:, 6].astype(np.int64)
    tab[bi, sl, _C_KIND] = 1
    tab[bi, sl, _C_CEN : _C_CEN + 3] = (bxs[:, 0:3] + bxs[:, 3:6]) / 2
    tab[bi, sl, _C_IH : _C_IH + 3] = 2 / np.maximum(bxs[:, 3:6] - bxs[:, 0:3], 1e-6)
    sl = cys[:, 5].astype(np.int64)
    tab[ci, sl, _C_KIND] = 2
    tab[ci, sl, _C_CEN : _C_CEN + 3] = np.stack([cys[:, 0], (cys[:, 3] + cys[:, 4]) / 2, cys[:, 1]], 1)
    tab[ci, sl, _C_IH : _C_IH + 3] = np.stack([1 / cys[:, 2], 2 / (cys[:, 4] - cys[:, 3]), 1 / cys[:, 2]], 1)
    sl = sps[:, 4].astype(np.int64)
    tab[si, sl, _C_KIND] = 3
    tab[si, sl, _C_CEN : _C_CEN + 3] = sps[:, 0:3]
    tab[si, sl, _C_IH : _C_IH + 3] = 1 / sps[:, 3:4]
    prims = []
    for arr, i, j, width in ((bxs, bi, bj, 7), (cys, ci, cj, 6), (sps, si, sj, 5)):
        padded = np.zeros((bsz, max(1, int(j.max(initial=0)) + 1), width), dtype=np.float32)
        padded[i, j] = arr
        valid = np.zeros(padded.shape[:2], dtype=bool)
        valid[i, j] = True
        prims.append((padded, valid))
    cam = np.asarray([(*s.cam_pos, *(v for row in s.cam_rot for v in row)) for s in scenes], dtype=np.float32)
    light = np.asarray([(*s.room, *s.light_pos, s.light_power, *s.sun_dir, s.sun_power, s.ambient, s.exposure, *s.tint)
                        for s in scenes], dtype=np.float32)  # fmt: skip
    holes = np.zeros((bsz, 3, 4), dtype=np.float32)
    holes[:, :, :2] = -10.0  # unused holes sit far outside the image
    holes[:, :, 2:] = 1e-3
    hs, hi, hj = _ragged([s.holes for s in scenes], 4)
    holes[hi, hj] = hs
    n_holes = np.asarray([len(s.holes) for s in scenes], dtype=np.int64)
    offsets = np.asarray([s.noise_offset % _NOISE_LEN for s in scenes], dtype=np.int64)
    return _Packed(
        tab, prims[0][0], prims[1][0], prims[2][0], [v for _, v in prims], cam, light, holes, n_holes, offsets
    )


_CORNERS = np.array([[(i >> a) & 1 for a in range(3)] for i in range(8)], dtype=bool)  # (8, 3)
_EDGES = np.array([(i, i | bit) for i in range(8) for bit in (1, 2, 4) if not i & bit])  # (12, 2)
_NEAR = 0.02


def _cull_pairs(lo, hi, valid, cam, size, ts):
    """(image, primitive, tile) triples whose tile may see the primitive's world AABB.

    lo, hi: (B, P, 3) AABB corners; valid: (B, P) bool; cam: (B, 12). The AABB is clipped to
    the near plane (corners in front plus edge crossings) and its projection's bounding
    rectangle selects tiles. Returns (b, p, rows) int64 arrays sorted by row, where
    row = b * tiles + tile indexes the tile-major ray arrays.
    """
    bsz, npr = valid.shape
    nt = size // ts
    fx, _, cx, _ = intrinsics(size)
    bi, pi = np.nonzero(valid)
    rot = cam[bi, 3:12].reshape(-1, 1, 3, 3)  # (V, 1, axis, camera component)
    o = cam[bi, None, :3]
    # Camera coordinates of the 8 corners, R^T (corner - o), as sums of per-axis terms: each
    # corner takes the lo or hi bound on each world axis.
    terms = (np.stack([lo[bi, pi], hi[bi, pi]], 1) - o)[..., None] * rot  # (V, 2, 3, 3)
    cc = terms[:, _CORNERS[:, 0].astype(np.intp), 0]
    cc = cc + terms[:, _CORNERS[:, 1].astype(np.intp), 1] + terms[:, _CORNERS[:, 2].astype(np.intp), 2]
    z = cc[..., 2]  # (V, 8)
    front = z >= _NEAR
    big = np.float32(1e9)
    zs = np.maximum(z, _NEAR)
    px, py = cc[..., 0] / zs * fx + cx, cc[..., 1] / zs * fx + cx
    x0, x1 = np.where(front, px, big).min(1), np.where(front, px, -big).max(1)
    y0, y1 = np.where(front, py, big).min(1), np.where(front, py, -big).max(1)
    # Boxes crossing the near plane (few): add the points where their edges cross it.
    straddle = np.flatnonzero(front.any(1) & ~front.all(1))
    if len(straddle):
        ci, cj = cc[straddle][:, _EDGES[:, 0]], cc[straddle][:, _EDGES[:, 1]]  # (S, 12, 3)
        zi, zj = ci[..., 2:3], cj[..., 2:3]
        cross = ((zi - _NEAR) * (zj - _NEAR) < 0)[..., 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            pts = ci + (_NEAR - zi) / (zj - zi) * (cj - ci)  # on the near plane
        ex, ey = pts[..., 0] / _NEAR * fx + cx, pts[..., 1] / _NEAR * fx + cx
        x0[straddle] = np.minimum(x0[straddle], np.where(cross, ex, big).min(1))
        x1[straddle] = np.maximum(x1[straddle], np.where(cross, ex, -big).max(1))
        y0[straddle] = np.minimum(y0[straddle], np.where(cross, ey, big).min(1))
        y1[straddle] = np.maximum(y1[straddle], np.where(cross, ey, -big).max(1))
    # Tile ranges per (image, primitive); primitives behind the camera or off screen get none.
    tr = np.full((4, bsz, npr), -1.0, dtype=np.float32)
    vis = (x1 >= 0) & (x0 <= size) & (y1 >= 0) & (y0 <= size)
    bv, pv = bi[vis], pi[vis]
    for k, v in enumerate((x0, x1, y0, y1)):
        tr[k, bv, pv] = np.floor(v[vis] / ts)
    tr[0, bv, pv] = np.maximum(tr[0, bv, pv], 0)
    tr[2, bv, pv] = np.maximum(tr[2, bv, pv], 0)
    tiles = np.arange(nt, dtype=np.float32)
    inx = (tiles >= tr[0][..., None]) & (tiles <= tr[1][..., None])  # (B, P, nt)
    iny = (tiles >= tr[2][..., None]) & (tiles <= tr[3][..., None])
    # (B, ty, tx, P) order makes nonzero() return pairs sorted by tile row.
    over = iny.transpose(0, 2, 1)[:, :, None, :] & inx.transpose(0, 2, 1)[:, None, :, :]
    b, ty, tx, p = np.nonzero(over)
    return b, p, (b * nt + ty) * nt + tx


def _keys(t: np.ndarray, slot) -> np.ndarray:
    """int32 z-buffer keys. Positive float32 bit patterns order like the floats, so replacing
    the low SLOT_BITS mantissa bits of the distance by the surface slot gives keys whose
    minimum is the nearest surface (distances are kept to a relative 2^-15, ~0.1 mm at 3 m)."""
    return (t.view(np.int32) & np.int32(~(MAX_SLOTS - 1))) | slot


def _zmin(zkey: np.ndarray, rows: np.ndarray, t: np.ndarray, hit: np.ndarray, slot: np.ndarray) -> None:
    """z-buffer update: rows are sorted, so one segmented minimum per tile row, then one
    gather-min-scatter over distinct rows."""
    keys = _keys(np.where(hit, t, np.float32(np.inf)), slot.astype(np.int32)[:, None])
    starts = np.flatnonzero(np.concatenate([[True], rows[1:] != rows[:-1]]))
    seg = np.minimum.reduceat(keys, starts, axis=0)
    urows = rows[starts]
    zkey[urows] = np.minimum(zkey[urows], seg)


def _step(x: np.ndarray) -> np.ndarray:
    """1.0 where x > 0, 0.0 where x < 0 (0.5 at exactly 0), as float32."""
    return np.sign(x) * np.float32(0.5) + np.float32(0.5)


def _hash01(x: np.ndarray) -> np.ndarray:
    """Cheap float hash to [0, 1) from multiplications and floors only (bitwise reproducible)."""
    x = x * np.float32(0.1031)
    x -= np.floor(x)
    x *= x + np.float32(33.33)
    x *= x + x
    return x - np.floor(x)


def _render_chunk(pk: _Packed, size: int, out: dict, b0: int, pairs: list) -> None:
    """Render the images of ``pk`` into rows b0.. of the output arrays in ``out``. ``pairs``
    holds the culled (image, primitive, tile row) triples of boxes, cylinders and spheres."""
    f32 = np.float32
    bsz = pk.tab.shape[0]
    rx, ry, gu, gv, ts, inv_ray = _grid(size)
    n = size * size
    nt = size // ts
    tp = ts * ts
    cam, light = pk.cam, pk.light
    o = cam[:, :3]
    rot = cam[:, 3:12].reshape(bsz, 3, 3)

    # World ray directions with unit camera-z component: a hit at parameter t has z-depth t.
    dirs = [rot[:, a, 0:1] * rx + rot[:, a, 1:2] * ry + rot[:, a, 2:3] for a in range(3)]  # (B, N)
    # Tile-major copies (B * tiles, pixels per tile): a (primitive, tile) pair reads one row.
    dtm = [d.reshape(bsz, nt, ts, nt, ts).transpose(0, 1, 3, 2, 4).reshape(bsz * nt * nt, tp) for d in dirs]
    with np.errstate(divide="ignore"):
        inv = [f32(1.0) / d for d in dtm]  # d == 0 gives inf, which the slab tests handle

    # Room: the camera is inside the box, so each axis contributes its exit distance (the larger
    # of its two plane distances); the nearest axis wins. The slot says which face.
    zkey = None
    with np.errstate(invalid="ignore"):
        for a, (pos_face, neg_face) in enumerate(((3, 5), (1, 0), (4, 2))):
            iv = inv[a].reshape(bsz, -1)
            o_a = o[:, a : a + 1]
            ta = np.maximum(-o_a * iv, (light[:, a : a + 1] - o_a) * iv)
            face = np.where(iv > 0, np.int32(pos_face), np.int32(neg_face))
            key = _keys(ta, face)
            zkey = key if zkey is None else np.minimum(zkey, key)
    zkey = zkey.reshape(bsz * nt * nt, tp)

    # Boxes: slab test.
    b, p, rows = pairs[0]
    if len(rows):
        bx = pk.boxes
        prm, ob = bx[b, p], o[b]
        tn = tf = None
        for a in range(3):
            iv = inv[a][rows]
            t1 = (prm[:, a] - ob[:, a])[:, None] * iv
            t2 = (prm[:, 3 + a] - ob[:, a])[:, None] * iv
            if tn is None:
                tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
            else:
                np.maximum(tn, np.minimum(t1, t2), out=tn)
                np.minimum(tf, np.maximum(t1, t2), out=tf)
        _zmin(zkey, rows, tn, (tn <= tf) & (tn > _EPS_T), prm[:, 6])
    # Vertical cylinders: quadratic for the side, a plane for the visible cap.
    b, p, rows = pairs[1]
    if len(rows):
        c = pk.cyls
        prm, ob = c[b, p], o[b]
        ocx, ocz = (ob[:, 0] - prm[:, 0])[:, None], (ob[:, 2] - prm[:, 1])[:, None]
        r, y0, y1, oy = prm[:, 2:3], prm[:, 3:4], prm[:, 4:5], ob[:, 1:2]
        dx, dy, dz = (d[rows] for d in dtm)
        qa = dx * dx + dz * dz
        qb = ocx * dx + ocz * dz
        disc = qb * qb - qa * (ocx * ocx + ocz * ocz - r * r)
        with np.errstate(divide="ignore", invalid="ignore"):
            t_side = (-qb - np.sqrt(np.maximum(disc, 0))) / qa
            ys = oy + t_side * dy
            side = (disc > 0) & (t_side > _EPS_T) & (ys >= y0) & (ys <= y1)
            # A cap can only be seen from above its top or from below its bottom.
            above = oy > y1
            t_cap = (np.where(above, y1, y0) - oy) / dy
            xc, zc = ocx + t_cap * dx, ocz + t_cap * dz
            cap = (above | (oy < y0)) & (t_cap > _EPS_T) & (xc * xc + zc * zc <= r * r)
        _zmin(zkey, rows, np.where(side, t_side, t_cap), side | cap, prm[:, 5])
    # Spheres.
    b, p, rows = pairs[2]
    if len(rows):
        s = pk.sphs
        prm = s[b, p]
        oc = o[b] - prm[:, :3]
        dx, dy, dz = (d[rows] for d in dtm)
        qa = dx * dx + dy * dy + dz * dz
        qb = oc[:, 0:1] * dx + oc[:, 1:2] * dy + oc[:, 2:3] * dz
        disc = qb * qb - qa * ((oc * oc).sum(1, keepdims=True) - prm[:, 3:4] ** 2)
        t = (-qb - np.sqrt(np.maximum(disc, 0))) / qa
        _zmin(zkey, rows, t, (disc > 0) & (t > _EPS_T), prm[:, 4])

    # Back to image layout; everything below is per pixel, shape (B, N).
    zkey = zkey.reshape(bsz, nt, nt, ts, ts).transpose(0, 1, 3, 2, 4).reshape(bsz, n)
    depth = (zkey & np.int32(~(MAX_SLOTS - 1))).view(f32)
    slot = zkey & np.int32(MAX_SLOTS - 1)
    n_slots = pk.tab.shape[1]
    gidx = (slot + (np.arange(bsz, dtype=np.int32) * n_slots)[:, None]).astype(np.intp)
    tab = pk.tab.copy()
    tab[:, :, _C_A : _C_A + 6] *= np.tile(light[:, 12:13] * light[:, 13:16], 2)[:, None, :]  # exposure, tint
    tab_t = np.ascontiguousarray(tab.reshape(-1, _N_COLS).T)

    def col(k: int) -> np.ndarray:
        return np.take(tab_t[k], gidx)

    p_ = [o[:, a : a + 1] + depth * dirs[a] for a in range(3)]
    px, py, pz = p_
    kind = col(_C_KIND)
    sgn = (kind == 1).astype(f32) - (kind == 0)  # +1 box, -1 room (normals point inwards)
    w_cyl = (kind == 2).astype(f32)
    w_sph = (kind == 3).astype(f32)

    # World normals from local coordinates q = (p - centre) / half extent:
    # boxes / room faces: the axis of the largest |q|; cylinders: side or cap, whichever the
    # hit point is closer to; spheres: q itself.
    q = [(p_[a] - col(_C_CEN + a)) * col(_C_IH + a) for a in range(3)]
    aq = [np.abs(qa) for qa in q]
    qmax = np.maximum(np.maximum(aq[0], aq[1]), aq[2])
    box_n = [np.floor(aq[a] / qmax) * np.sign(q[a]) * sgn for a in range(3)]  # x / x is exactly 1
    rq = np.maximum(np.sqrt(q[0] * q[0] + q[2] * q[2]), f32(1e-6))
    w_cap = w_cyl * _step(aq[1] - rq)
    coef = (w_cyl - w_cap) / rq + w_sph
    nwx = box_n[0] + q[0] * coef
    nwy = box_n[1] + w_cap * np.sign(q[1]) + w_sph * q[1]
    nwz = box_n[2] + q[2] * coef
    inv_len = f32(1.0) / np.sqrt(nwx * nwx + nwy * nwy + nwz * nwz)
    facing = nwx * dirs[0] + nwy * dirs[1] + nwz * dirs[2]
    # Unit length, facing the camera (guards box edges where the nearest-face rule can pick a
    # hidden face).
    flip = -np.copysign(inv_len, facing)
    nwx *= flip
    nwy *= flip
    nwz *= flip
    cos_view = np.abs(facing) * inv_len * inv_ray

    # Texture coordinates: the two world axes spanning the surface's dominant plane.
    anx, any_, anz = np.abs(nwx), np.abs(nwy), np.abs(nwz)
    amax = np.maximum(np.maximum(anx, any_), anz)
    x_dom, y_dom = np.floor(anx / amax), np.floor(any_ / amax)
    iscale = col(_C_ISCALE)
    su = (px + (pz - px) * x_dom) * iscale  # x-dominant surfaces use (z, y), floors (x, z)
    sv = (py + (pz - py) * y_dom) * iscale
    tex = col(_C_TEX)
    orient = (tex >= 4).astype(f32)
    tex -= 4 * orient
    w_str, w_til, w_plk = (tex == 1).astype(f32), (tex == 2).astype(f32), (tex == 3).astype(f32)
    duty = col(_C_DUTY)
    cls = col(_C_CLS)
    along = su + (sv - su) * orient
    plank = np.floor(along)
    fa = along - plank
    stripes = _step(duty - fa)
    iu, iv = np.floor(su), np.floor(sv)
    parity = iu + iv
    checker = parity - 2 * np.floor(parity * f32(0.5))
    grout = _step(duty - np.minimum(su - iu, sv - iv))
    h = _hash01(plank + f32(17.0) * cls)  # one random number per plank
    mix = w_str * stripes + w_til * checker + w_plk * h
    plank_shade = (f32(0.85) + f32(0.3) * h) * (f32(1.0) - f32(0.45) * _step(f32(0.04) - fa)) - 1
    shade_tex = 1 - f32(0.3) * w_til * grout + w_plk * plank_shade

    # Lighting (linear RGB): point light, directional light, hemispherical ambient.
    lx_, ly_, lz_ = light[:, 3:4] - px, light[:, 4:5] - py, light[:, 5:6] - pz
    dist2 = lx_ * lx_ + ly_ * ly_ + lz_ * lz_
    ndl = np.maximum(nwx * lx_ + nwy * ly_ + nwz * lz_, 0) / np.sqrt(np.maximum(dist2, f32(1e-6)))
    point = light[:, 6:7] * ndl / (1 + f32(0.25) * dist2)
    sun = light[:, 10:11] * np.maximum(-(nwx * light[:, 7:8] + nwy * light[:, 8:9] + nwz * light[:, 9:10]), 0)
    amb = light[:, 11:12] * (f32(0.85) + f32(0.15) * nwy)
    # Fake occlusion: room faces darken towards edges and corners (distance to the nearest other
    # face; the normal's own axis is pushed out of the minimum), objects towards the floor.
    dmin = None
    for a, an in enumerate((anx, any_, anz)):
        da = np.maximum(np.minimum(p_[a], light[:, a : a + 1] - p_[a]), 0) + f32(1e3) * an
        dmin = da if dmin is None else np.minimum(dmin, da)
    occ_room = 1 - f32(0.35) / (1 + dmin * f32(1 / 0.12)) ** 2
    occ_obj = 1 - f32(0.3) / (1 + np.maximum(py, 0) * f32(1 / 0.08)) ** 2
    w_room = (kind == 0).astype(f32)
    lum = (amb * (occ_obj + w_room * (occ_room - occ_obj)) + point + sun) * shade_tex + col(_C_EMIT)
    pat = _noise_pattern(_NOISE_LEN + n + 16)
    noise = np.lib.stride_tricks.as_strided(pat[0], (_NOISE_LEN + 16, n), (4, 4))  # row k = pat[k:k+n]
    rgb = out["rgb"][b0 : b0 + bsz]
    for ch in range(3):
        c = (col(_C_A + ch) + col(_C_DB + ch) * mix) * lum  # albedos carry exposure and tint
        c = np.sqrt(np.clip(c / (1 + f32(0.25) * c), 0, 1))  # soft highlight roll-off, gamma 2
        c += f32(0.015) * noise[pk.offsets + 5 * ch]
        np.clip(c, 0, 1, out=c)
        # On the 8-bit grid like a camera image, with the file loaders' float32 formula: every
        # loader (memory uint8 store, PNG export, DataLoader) then yields bit-identical RGB.
        rgb[:, ch] = np.rint(c * f32(255)) * f32(1 / 255) * f32(2) - f32(1)

    # Masks. Discontinuity: a 4-neighbour on another surface more than 4 % (+2 cm) away.
    d_img = depth.reshape(bsz, size, size)
    s_img = slot.reshape(bsz, size, size)
    edge = np.zeros((bsz, size, size), dtype=bool)
    for ax in (1, 2):
        a_ = np.moveaxis(d_img, ax, 0)
        s_ = np.moveaxis(s_img, ax, 0)
        e_ = np.moveaxis(edge, ax, 0)
        jump = (s_[:-1] != s_[1:]) & (
            np.abs(a_[:-1] - a_[1:]) > f32(0.04) * np.minimum(a_[:-1], a_[1:]) + f32(0.02)
        )
        e_[:-1] |= jump
        e_[1:] |= jump
    edge = edge.reshape(bsz, n)
    drop_u = np.lib.stride_tricks.as_strided(pat[1], (_NOISE_LEN + 16, n), (4, 4))[pk.offsets]
    # Sensor holes: ellipses in normalised image coordinates with ragged borders.
    ragged = 1 + f32(0.6) * (drop_u - f32(0.5))
    hole = np.ones_like(ragged)
    for k in range(int(pk.n_holes.max(initial=0))):  # padded holes lie outside the image: skip
        hu, hv, hru, hrv = (pk.holes[:, k, a : a + 1] for a in range(4))
        r2 = ((gu - hu) / hru) ** 2 + ((gv - hv) / hrv) ** 2 - ragged
        hole = np.minimum(hole, r2)
    dmask = (hole > 0) & (col(_C_NODEPTH) < 0.5) & (drop_u > f32(0.002)) & ~(edge & (drop_u < f32(0.5)))
    nmask = dmask & ~edge & (cos_view > f32(0.1))
    keep = nmask.astype(f32)
    for a in range(3):  # camera frame: n_cam = R^T n_world; zero where invalid
        out["normal"][b0 : b0 + bsz, a] = (rot[:, 0, a : a + 1] * nwx + rot[:, 1, a : a + 1] * nwy
                                           + rot[:, 2, a : a + 1] * nwz) * keep  # fmt: skip
    out["seg"][b0 : b0 + bsz] = cls
    out["depth"][b0 : b0 + bsz] = depth * dmask
    out["depth_mask"][b0 : b0 + bsz] = dmask
    out["normal_mask"][b0 : b0 + bsz] = nmask


_OUTPUTS = {"rgb": (3, np.float32), "seg": (0, np.int64), "depth": (1, np.float32), "depth_mask": (1, bool),
            "normal": (3, np.float32), "normal_mask": (1, bool)}  # fmt: skip


def empty_outputs(bsz: int, size: int) -> dict[str, np.ndarray]:
    """Flat-pixel output arrays: (B, C, N) for multi-channel fields, (B, N) otherwise."""
    n = size * size
    return {k: np.empty((bsz, c, n) if c > 1 else (bsz, n), dt) for k, (c, dt) in _OUTPUTS.items()}


def render_into(scenes: list[Scene], size: int, out: dict, start: int) -> None:
    """Render scenes into rows start.. of flat-pixel output arrays."""
    n = size * size
    pk = _pack(scenes)
    ts = _tile_size(size)
    n_tiles = (size // ts) ** 2
    # Cull the whole group at once (per-call overhead dominates these small arrays), then hand
    # every chunk its slice: the pairs are sorted by image, then tile row.
    c, s = pk.cyls, pk.sphs
    bounds = (
        (pk.boxes[..., 0:3], pk.boxes[..., 3:6]),
        (np.stack([c[..., 0] - c[..., 2], c[..., 3], c[..., 1] - c[..., 2]], -1),
         np.stack([c[..., 0] + c[..., 2], c[..., 4], c[..., 1] + c[..., 2]], -1)),
        (s[..., 0:3] - s[..., 3:4], s[..., 0:3] + s[..., 3:4]),
    )  # fmt: skip
    culled = [_cull_pairs(lo, hi, v, pk.cam, size, ts) for (lo, hi), v in zip(bounds, pk.valid)]
    step = max(1, _CHUNK_PIXELS // n)
    for b0 in range(0, len(scenes), step):
        b1 = min(len(scenes), b0 + step)
        pairs = []
        for b, p, rows in culled:
            i0, i1 = np.searchsorted(b, [b0, b1])
            pairs.append((b[i0:i1] - b0, p[i0:i1], rows[i0:i1] - b0 * n_tiles))
        _render_chunk(pk.rows(b0, b1), size, out, start + b0, pairs)


def as_tensors(out: dict, size: int) -> dict[str, torch.Tensor]:
    """Flat-pixel arrays -> (B, C, H, W) / (B, H, W) tensors sharing their memory."""
    res = {}
    for k, v in out.items():
        c = _OUTPUTS[k][0]
        res[k] = torch.from_numpy(v.reshape((len(v), c, size, size) if c else (len(v), size, size)))
    return res


def render_scenes(scenes: list[Scene], image_size: int) -> dict[str, torch.Tensor]:
    """Render scenes to stacked tensors (B = len(scenes), H = W = image_size), single-threaded.

    Returns rgb (B, 3, H, W) float32 in [-1, 1], seg (B, H, W) int64, depth (B, 1, H, W) float32
    metres, depth_mask (B, 1, H, W) bool, normal (B, 3, H, W) float32 camera frame,
    normal_mask (B, 1, H, W) bool, scene (B,) int64. Each image depends only on its scene.
    """
    size = int(image_size)
    out = empty_outputs(len(scenes), size)
    render_into(scenes, size, out, 0)
    res = as_tensors(out, size)
    res["scene"] = torch.tensor([s.scene for s in scenes], dtype=torch.int64)
    return res


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide thread pool, rebuilt after fork (DataLoader workers) or for a new size."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
        _pool = (
            os.getpid(),
            workers,
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mgm-synthetic"),
        )
    return _pool[2]
