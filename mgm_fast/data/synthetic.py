"""Procedural indoor scenes: the embedded default dataset of mgm_fast.

Real NYUv2 / Taskonomy cannot ship with the package, so the default job and the tests run on
box rooms rendered here by vectorised ray casting. The data has the structure MGM needs
(docs/method.md section 4): an RGB image, a dense semantic label map, metric depth with holes,
camera-frame surface normals with a validity mask, and one scene label per image that is
predictable from the layout and the objects in the room.

Scene model (all units metres, world frame y up)
    A room spans x in [0, Lx], y in [0, Hc], z in [0, Lz]. Its six faces are floor, ceiling and
    four walls. Furniture is built from axis-aligned boxes, vertical cylinders and spheres
    (beds, cabinets, tables, chairs, sofas, lamps, bathtubs) and placed against walls or free
    on the floor, following a per-scene-type recipe (object kinds, counts, sizes, room size,
    palettes). Wall decorations (pictures, windows, doors, mirrors) are thin boxes labelled
    ``wall``; rugs are thin boxes labelled ``floor``. A pinhole camera (``FOV_DEG``, square
    pixels, principal point at the image centre) stands near a wall at eye height, looks into
    the room with a random yaw, a slight downward pitch and a small roll.

Sample format (the project's one format; ``H = W = image_size``)
    ``rgb``          float32 (3, H, W) in [-1, 1]: Lambertian shading (one point light, one
                     directional light, hemispherical ambient, fake corner occlusion), procedural
                     textures (planks, tiles, stripes, panels), mild fixed-pattern noise, gamma 2;
                     quantised to 8 bits per channel (``2 * p / 255 - 1``, p in 0..255) as a
                     camera image is, so storing it as uint8 or PNG loses nothing.
    ``seg``          int64 (H, W) in [0, num_seg_classes). Every pixel of a synthetic image hits
                     a labelled surface, so ``IGNORE_INDEX`` never occurs here: like NYUv2, labels
                     are dense even where the depth sensor has holes. ``IGNORE_INDEX`` is the
                     value loaders of real data use for void pixels.
    ``depth``        float32 (1, H, W) z-depth along the optical axis in metres (as a Kinect
                     reports it, not the ray length); 0 where ``depth_mask`` is false.
    ``depth_mask``   bool (1, H, W): false in small sensor holes, on glass / mirrors, and on about
                     half of the pixels at depth discontinuities (the Kinect's shadow band).
    ``normal``       float32 (3, H, W) unit surface normal in CAMERA coordinates: x right, y down,
                     z forward (OpenCV convention), oriented towards the camera, i.e.
                     dot(n, ray) < 0 for the viewing ray through the pixel; 0 where invalid.
    ``normal_mask``  bool (1, H, W): false where depth is missing, at depth discontinuities and
                     at grazing angles (angle between normal and view ray above ~84 degrees).
    ``scene``        int64 0-dim tensor, index into ``SCENE_CLASSES``.
    ``id``           str, ``"synthetic-s{seed}-{index:06d}"``.

Determinism
    Sample ``index`` of a dataset with ``seed`` is a pure function of (seed, index): every random
    number of the scene comes from a counter-based hash stream keyed by (seed, index), and the
    rendering is elementwise per pixel, so the sample is the same whatever batch it is rendered
    in and in whatever order. The geometry, camera, materials and hole positions never depend
    on the resolution: the same (seed, index) at 32x32 and at 256x256 is the same scene.

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

from mgm_fast.data.sample import IGNORE_INDEX  # re-exported; synthetic scenes never emit it

__all__ = [
    "FOV_DEG",
    "IGNORE_INDEX",
    "SCENE_CLASSES",
    "SEG_CLASSES",
    "SEG_PALETTE",
    "Scene",
    "SyntheticScenes",
    "intrinsics",
    "render_scenes",
    "sample_scene",
]


SEG_CLASSES = ["wall", "floor", "ceiling", "bed", "cabinet", "table", "chair", "sofa", "lamp", "bathtub"]
WALL, FLOOR, CEILING, BED, CABINET, TABLE, CHAIR, SOFA, LAMP, BATHTUB = range(len(SEG_CLASSES))

SCENE_CLASSES = ["bedroom", "kitchen", "office", "living_room", "bathroom", "dining_room"]
BEDROOM, KITCHEN, OFFICE, LIVING_ROOM, BATHROOM, DINING_ROOM = range(len(SCENE_CLASSES))

SEG_PALETTE = np.array(
    [
        [174, 199, 232],  # wall
        [152, 223, 138],  # floor
        [200, 200, 200],  # ceiling
        [255, 127, 14],  # bed
        [140, 86, 75],  # cabinet
        [255, 187, 120],  # table
        [214, 39, 40],  # chair
        [148, 103, 189],  # sofa
        [255, 235, 60],  # lamp
        [23, 190, 207],  # bathtub
    ],
    dtype=np.uint8,
)
"""(num_seg_classes, 3) uint8 colours for visualising ``seg``."""

FOV_DEG = 58.0
"""Horizontal (= vertical) field of view: between the Kinect's ~62 degrees across 640 pixels and
the ~50 degrees of a centred square crop of it."""

# Surface slots: 0..5 are the room faces, objects follow (one slot per primitive). The slot
# shares an int32 z-buffer key with the hit distance, in the low _SLOT_BITS bits.
_SLOT_BITS = 8
_MAX_SLOTS = 1 << _SLOT_BITS
_ROOM_FACES = 6  # floor, ceiling, wall z=0, wall x=Lx, wall z=Lz, wall x=0

# Texture types.
TEX_PLAIN, TEX_STRIPES, TEX_TILES, TEX_PLANKS = 0, 1, 2, 3

_EPS_T = 1e-4  # smallest accepted hit distance (metres along the z=1 ray)


def intrinsics(image_size: int) -> tuple[float, float, float, float]:
    """Pinhole intrinsics (fx, fy, cx, cy) in pixels for a square ``image_size`` image.

    Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); its camera-frame ray is
    ((j + 0.5 - cx) / fx, (i + 0.5 - cy) / fy, 1) with x right, y down, z forward.
    """
    f = 0.5 * image_size / math.tan(math.radians(FOV_DEG) / 2)
    return f, f, image_size / 2, image_size / 2


# -------------------------------------------------------------------------------------------
# Random numbers: a counter-based stream per (seed, index).

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(_GOLDEN)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform_block(seed: int, indices: np.ndarray, start: int, count: int) -> np.ndarray:
    """(len(indices), count) float64 uniforms in [0, 1): numbers start..start+count-1 of the
    stream of each (seed, index). Pure function of its arguments, vectorised over samples."""
    with np.errstate(over="ignore"):
        key = _splitmix64(np.array([seed & _M64], dtype=np.uint64))
        key = _splitmix64(key ^ indices.astype(np.uint64))  # (B,)
        ctr = np.arange(start, start + count, dtype=np.uint64) * np.uint64(_GOLDEN)
        bits = _splitmix64(key[:, None] + ctr[None, :])
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Stream:
    """Uniform numbers of one sample, consumed in order. The first block is usually handed in
    precomputed for a whole batch; later blocks are hashed on demand (long rejection loops)."""

    _BLOCK = 384

    def __init__(self, seed: int, index: int, first: list[float] | None = None):
        self.seed, self.index = seed, index
        self.used = 0
        block = first if first is not None else self._block(0)
        self._rev = block[::-1]  # list.pop() from the end is the cheapest way to consume it

    def _block(self, start: int) -> list[float]:
        return _uniform_block(self.seed, np.array([self.index]), start, self._BLOCK)[0].tolist()

    def __call__(self) -> float:
        try:
            return self._rev.pop()
        except IndexError:
            self.used += self._BLOCK
            self._rev = self._block(self.used)[::-1]
            return self._rev.pop()


# -------------------------------------------------------------------------------------------
# Scene description.


@dataclass
class Scene:
    """Resolution-independent description of one sample (world frame: y up, metres).

    ``materials[s]`` describes surface slot ``s``: slots 0..5 are the room faces (floor, ceiling,
    walls z=0, x=Lx, z=Lz, x=0), then one slot per primitive in creation order. A material is
    (class, albedo A rgb, albedo B rgb, texture type, texture scale m, orientation 0/1, duty,
    emissive, no-depth flag); albedos are linear RGB.
    """

    scene: int
    room: tuple[float, float, float]  # Lx, Hc, Lz
    cam_pos: tuple[float, float, float]
    cam_rot: tuple[tuple[float, float, float], ...]  # columns right, down, forward (3 rows)
    boxes: list[tuple]  # (x0, y0, z0, x1, y1, z1, slot)
    cylinders: list[tuple]  # (cx, cz, radius, y0, y1, slot), vertical axis
    spheres: list[tuple]  # (cx, cy, cz, radius, slot)
    materials: list[tuple]
    light_pos: tuple[float, float, float]
    light_power: float
    sun_dir: tuple[float, float, float]  # direction the light travels (unit)
    sun_power: float
    ambient: float
    exposure: float
    tint: tuple[float, float, float]
    holes: list[tuple]  # (u, v, ru, rv) in normalised image coordinates [0, 1]
    noise_offset: int  # offset into the fixed noise pattern


# Palettes (sRGB-ish; squared to linear when a material is made). Scene recipes draw from them
# with different weights, so colours hint at the scene type without giving it away.
_WALL_COLOURS = [
    (0.90, 0.89, 0.85), (0.88, 0.80, 0.66), (0.75, 0.77, 0.78), (0.68, 0.78, 0.86),
    (0.74, 0.82, 0.68), (0.92, 0.86, 0.60), (0.80, 0.58, 0.48), (0.62, 0.62, 0.70),
]  # fmt: skip
_WOOD = [(0.55, 0.38, 0.24), (0.68, 0.50, 0.32), (0.42, 0.28, 0.18), (0.78, 0.62, 0.42), (0.30, 0.20, 0.14)]
_WHITE = [(0.93, 0.93, 0.91), (0.86, 0.86, 0.83), (0.95, 0.92, 0.86)]
_GREY = [(0.55, 0.56, 0.58), (0.36, 0.37, 0.40), (0.20, 0.20, 0.22), (0.70, 0.71, 0.72)]
_FABRIC = [
    (0.60, 0.20, 0.20), (0.25, 0.35, 0.60), (0.35, 0.50, 0.35), (0.75, 0.70, 0.55),
    (0.50, 0.45, 0.60), (0.80, 0.55, 0.30), (0.45, 0.45, 0.45), (0.20, 0.25, 0.35),
]  # fmt: skip
_TILE = [(0.92, 0.92, 0.90), (0.75, 0.80, 0.82), (0.85, 0.80, 0.70), (0.40, 0.45, 0.50), (0.60, 0.75, 0.70)]
_CARPET = [(0.50, 0.48, 0.45), (0.35, 0.40, 0.55), (0.60, 0.35, 0.30), (0.70, 0.65, 0.55), (0.30, 0.32, 0.30)]
_LAMP = [(1.0, 0.95, 0.80), (1.0, 0.90, 0.70), (0.95, 0.95, 1.0)]

# Per scene type: room size ranges (Lx, Lz short/long side, height), wall palette weights,
# floor kind weights (planks, tiles, carpet).
_ROOMS = {
    BEDROOM: ((2.8, 4.2), (3.2, 5.0), (2.4, 2.8)),
    KITCHEN: ((2.4, 3.6), (3.0, 4.6), (2.4, 2.8)),
    OFFICE: ((3.0, 4.8), (3.6, 6.0), (2.6, 3.0)),
    LIVING_ROOM: ((3.6, 5.6), (4.2, 6.5), (2.5, 3.0)),
    BATHROOM: ((1.8, 2.8), (2.2, 3.4), (2.3, 2.6)),
    DINING_ROOM: ((3.2, 4.6), (3.6, 5.2), (2.5, 3.0)),
}
_WALL_WEIGHTS = {
    BEDROOM: (2, 3, 1, 2, 2, 1, 1, 2),
    KITCHEN: (4, 2, 2, 1, 1, 2, 1, 0),
    OFFICE: (3, 1, 4, 1, 1, 0, 0, 2),
    LIVING_ROOM: (2, 3, 1, 1, 2, 2, 2, 1),
    BATHROOM: (4, 1, 2, 3, 1, 0, 0, 0),
    DINING_ROOM: (2, 3, 1, 1, 1, 2, 3, 1),
}
_FLOOR_WEIGHTS = {
    BEDROOM: (4, 1, 4),
    KITCHEN: (3, 7, 0),
    OFFICE: (3, 1, 6),
    LIVING_ROOM: (5, 1, 4),
    BATHROOM: (0.5, 9.5, 0),
    DINING_ROOM: (6, 3, 1),
}


class _Frame:
    """A placement on the floor: origin (ox, oz) and a facing direction n (unit, axis-aligned).
    Local coordinates: lx along t = (nz, -nx) (sideways), lz along n (forwards), y up."""

    __slots__ = ("nx", "nz", "ox", "oz")

    def __init__(self, ox: float, oz: float, nx: float, nz: float):
        self.ox, self.oz, self.nx, self.nz = ox, oz, nx, nz

    def world(self, lx: float, lz: float) -> tuple[float, float]:
        return self.ox + lx * self.nz + lz * self.nx, self.oz - lx * self.nx + lz * self.nz

    def rect(self, lx0: float, lx1: float, lz0: float, lz1: float) -> tuple[float, float, float, float]:
        """World (x0, z0, x1, z1) of a local rectangle."""
        ox, oz, nx, nz = self.ox, self.oz, self.nx, self.nz
        ax, az = ox + lx0 * nz + lz0 * nx, oz - lx0 * nx + lz0 * nz
        bx, bz = ox + lx1 * nz + lz1 * nx, oz - lx1 * nx + lz1 * nz
        # Conditional expressions: this runs tens of times per scene and builtins cost more.
        return (
            (ax if ax < bx else bx),
            (az if az < bz else bz),
            (bx if ax < bx else ax),
            (bz if az < bz else az),
        )

    def turned(self, ox: float, oz: float, quarter_turns: int) -> _Frame:
        """A frame at world (ox, oz) facing this frame's n rotated by quarter turns."""
        nx, nz = self.nx, self.nz
        for _ in range(quarter_turns % 4):
            nx, nz = nz, -nx
        return _Frame(ox, oz, nx, nz)


class _Builder:
    """Collects the primitives and materials of one scene while the recipe places furniture."""

    def __init__(self, rnd: _Stream, scene: int):
        self.r = rnd
        self.scene = scene
        (lx0, lx1), (lz0, lz1), (h0, h1) = _ROOMS[scene]
        a, b = self.u(lx0, lx1), self.u(lz0, lz1)
        if self.r() < 0.5:
            a, b = b, a
        self.lx, self.lz, self.hc = a, b, self.u(h0, h1)
        self.boxes: list[tuple] = []
        self.cyls: list[tuple] = []
        self.sphs: list[tuple] = []
        self.mats: list[tuple] = []  # object slots only; room faces are prepended at the end
        self.foot: list[tuple[float, float, float, float]] = []  # occupied floor rectangles
        self.targets: list[tuple[float, float, float, float]] = []  # main furniture, for the camera
        self.last_rect = (0.0, 0.0, 0.0, 0.0)  # footprint of the last successful placement

    # -- random helpers
    def u(self, a: float = 0.0, b: float = 1.0) -> float:
        return a + (b - a) * self.r()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] inclusive."""
        i = lo + int(self.r() * (hi - lo + 1))
        return i if i <= hi else hi

    def pick(self, seq):
        n = len(seq)
        i = int(self.r() * n)
        return seq[i if i < n else n - 1]

    def weighted(self, weights) -> int:
        x = self.r() * sum(weights)
        for i, w in enumerate(weights):
            x -= w
            if x < 0:
                return i
        return len(weights) - 1

    def colour(self, palette, jitter: float = 0.08) -> tuple[float, float, float]:
        """A palette colour with a shared brightness jitter and a smaller per-channel one."""
        r_, g_, b_ = self.pick(palette)
        rnd = self.r
        k = 1.0 + jitter * (2 * rnd() - 1)
        j = 0.5 * jitter
        r_, g_, b_ = (
            r_ * k * (1.0 + j * (2 * rnd() - 1)),
            g_ * k * (1.0 + j * (2 * rnd() - 1)),
            b_ * k * (1.0 + j * (2 * rnd() - 1)),
        )
        return (r_ if r_ < 1.0 else 1.0), (g_ if g_ < 1.0 else 1.0), (b_ if b_ < 1.0 else 1.0)

    # -- materials and primitives
    @staticmethod
    def mat(cls, a, b=None, tex=TEX_PLAIN, scale=1.0, orient=0, duty=0.5, emissive=0.0, nodepth=0.0):
        b = a if b is None else b
        # Palettes are gamma-2 encoded; materials store linear albedo.
        return (float(cls), a[0] * a[0], a[1] * a[1], a[2] * a[2], b[0] * b[0], b[1] * b[1], b[2] * b[2],
                float(tex), float(scale), float(orient), float(duty), float(emissive), float(nodepth))  # fmt: skip

    def _slot(self, mat: tuple) -> int:
        self.mats.append(mat)
        return _ROOM_FACES + len(self.mats) - 1

    def box(self, x0, y0, z0, x1, y1, z1, mat) -> None:
        if x1 - x0 > 1e-3 and y1 - y0 > 1e-3 and z1 - z0 > 1e-3:
            self.boxes.append((x0, y0, z0, x1, y1, z1, self._slot(mat)))

    def lbox(self, fr: _Frame, lx0, lx1, y0, y1, lz0, lz1, mat) -> None:
        """Box given in a frame's local coordinates."""
        x0, z0, x1, z1 = fr.rect(lx0, lx1, lz0, lz1)
        self.box(x0, y0, z0, x1, y1, z1, mat)

    def cyl(self, cx, cz, r, y0, y1, mat) -> None:
        self.cyls.append((cx, cz, r, y0, y1, self._slot(mat)))

    def sph(self, cx, cy, cz, r, mat) -> None:
        self.sphs.append((cx, cy, cz, r, self._slot(mat)))

    # -- placement
    def wall_frame(self, k: int, s: float, gap: float = 0.0) -> _Frame:
        """Frame on wall k (0: z=0, 1: x=Lx, 2: z=Lz, 3: x=0) at distance s along the wall,
        facing into the room, ``gap`` metres off the wall."""
        lx, lz = self.lx, self.lz
        ox, oz, nx, nz = ((s, 0.0, 0, 1), (lx, s, -1, 0), (lx - s, lz, 0, -1), (0.0, lz - s, 1, 0))[k]
        return _Frame(ox + gap * nx, oz + gap * nz, nx, nz)

    def wall_len(self, k: int) -> float:
        return self.lx if k % 2 == 0 else self.lz

    def free(self, rect, margin: float = 0.05) -> bool:
        """True if a world floor rectangle lies inside the room and at least ``margin`` metres
        from every placed footprint."""
        x0, z0, x1, z1 = rect
        if x0 < -1e-6 or z0 < -1e-6 or x1 > self.lx + 1e-6 or z1 > self.lz + 1e-6:
            return False
        for a0, b0, a1, b1 in self.foot:
            if x0 < a1 + margin and a0 < x1 + margin and z0 < b1 + margin and b0 < z1 + margin:
                return False
        return True

    def on_wall(self, w: float, d: float, tries: int = 8, margin: float = 0.05):
        """Find a free spot for a w x d footprint with its back on a wall; register the footprint
        (also as ``last_rect``) and return the frame (origin = back centre), or None."""
        for _ in range(tries):
            k = self.randint(0, 3)
            length = self.wall_len(k)
            if w > length - 0.04:
                continue
            fr = self.wall_frame(k, self.u(w / 2 + 0.02, length - w / 2 - 0.02))
            rect = fr.rect(-w / 2, w / 2, 0.0, d)
            if self.free(rect, margin):
                self.foot.append(rect)
                self.last_rect = rect
                return fr
        return None

    def in_room(self, w: float, d: float, tries: int = 8, margin: float = 0.3, centre_bias: float = 0.5):
        """Free-standing w x d footprint (frame origin = centre), biased towards the room centre."""
        for _ in range(tries):
            k = self.randint(0, 3)
            ww, dd = (w, d) if k % 2 == 0 else (d, w)
            cx = self.lx / 2 + (1 - centre_bias) * self.u(-1, 1) * max(0.0, self.lx / 2 - ww / 2 - margin)
            cz = self.lz / 2 + (1 - centre_bias) * self.u(-1, 1) * max(0.0, self.lz / 2 - dd / 2 - margin)
            fr = _Frame(cx, cz, *((0, 1), (-1, 0), (0, -1), (1, 0))[k])
            rect = fr.rect(-w / 2, w / 2, -d / 2, d / 2)
            if self.free(rect, 0.1):
                self.foot.append(rect)
                self.last_rect = rect
                return fr
        return None

    # -- furniture (frames: origin at back centre on the floor unless said otherwise)
    def bed(self, fr: _Frame, w: float, length: float) -> None:
        wood = self.colour(_WOOD)
        frame_mat = self.mat(BED, wood, tex=TEX_STRIPES, scale=0.05, orient=1, duty=0.15,
                             b=tuple(c * 0.85 for c in wood))  # fmt: skip
        base_h = self.u(0.22, 0.32)
        top = base_h + self.u(0.18, 0.28)
        self.lbox(fr, -w / 2, w / 2, 0.0, base_h, 0.05, length, frame_mat)
        cover = self.colour(_FABRIC + _WHITE)
        tex = self.pick((TEX_PLAIN, TEX_STRIPES, TEX_TILES))
        cover_mat = self.mat(BED, cover, b=self.colour(_FABRIC + _WHITE), tex=tex, scale=self.u(0.12, 0.3),
                             orient=self.randint(0, 1), duty=0.5)  # fmt: skip
        self.lbox(fr, -w / 2 + 0.02, w / 2 - 0.02, base_h, top, 0.08, length - 0.02, cover_mat)
        self.lbox(fr, -w / 2 - 0.03, w / 2 + 0.03, 0.0, top + self.u(0.35, 0.6), 0.0, 0.07, frame_mat)
        pillow = self.mat(BED, self.colour(_WHITE + _FABRIC[3:4]))
        n_p = 2 if w > 1.2 else 1
        pw = (w - 0.2) / n_p
        for i in range(n_p):
            x0 = -w / 2 + 0.1 + i * pw
            self.lbox(fr, x0 + 0.03, x0 + pw - 0.03, top, top + 0.12, 0.12, 0.5, pillow)

    def cabinet(self, fr: _Frame, w: float, d: float, h: float, y0: float = 0.0, kind: str = "doors") -> None:
        col = self.colour(self.pick((_WOOD, _WHITE, _GREY)))
        dark = tuple(c * 0.45 for c in col)
        if kind == "shelf":  # book shelves: horizontal bands of books and boards
            m = self.mat(CABINET, col, b=self.colour(_FABRIC), tex=TEX_STRIPES, scale=self.u(0.3, 0.4), orient=1,
                         duty=0.7)  # fmt: skip
        elif kind == "drawers":
            m = self.mat(CABINET, col, b=dark, tex=TEX_STRIPES, scale=self.u(0.2, 0.3), orient=1, duty=0.08)
        else:  # door panels: thin dark vertical seams
            m = self.mat(CABINET, col, b=dark, tex=TEX_STRIPES, scale=self.u(0.35, 0.6), orient=0, duty=0.04)
        self.lbox(fr, -w / 2, w / 2, y0, y0 + h, 0.0, d, m)

    def table(self, fr: _Frame, w: float, d: float, h: float, round_top: bool = False) -> None:
        """Frame origin at the table centre."""
        col = self.colour(_WOOD + _WHITE[:1] + _GREY[2:3])
        top_mat = self.mat(TABLE, col, b=tuple(c * 0.9 for c in col), tex=self.pick((TEX_PLAIN, TEX_PLANKS)),
                           scale=0.12, orient=self.randint(0, 1))  # fmt: skip
        leg_mat = self.mat(TABLE, self.colour(_WOOD + _GREY))
        t = self.u(0.03, 0.05)
        if round_top:
            cx, cz = fr.world(0.0, 0.0)
            r = min(w, d) / 2
            self.cyl(cx, cz, r, h - t, h, top_mat)
            self.cyl(cx, cz, self.u(0.04, 0.07), 0.0, h - t, leg_mat)
            self.cyl(cx, cz, r * 0.45, 0.0, 0.03, leg_mat)
            return
        self.lbox(fr, -w / 2, w / 2, h - t, h, -d / 2, d / 2, top_mat)
        lw, inset = self.u(0.035, 0.06), self.u(0.02, 0.08)
        for sx in (-1, 1):
            for sz in (-1, 1):
                x = sx * (w / 2 - inset - lw / 2)
                z = sz * (d / 2 - inset - lw / 2)
                self.lbox(fr, x - lw / 2, x + lw / 2, 0.0, h - t, z - lw / 2, z + lw / 2, leg_mat)

    def desk(self, fr: _Frame, w: float, d: float) -> None:
        """Office desk against a wall: top, two side panels, sometimes a drawer block."""
        col = self.colour(_WOOD + _WHITE + _GREY[:2])
        m = self.mat(TABLE, col)
        side = self.mat(TABLE, tuple(c * 0.8 for c in col))
        h, t = self.u(0.72, 0.76), 0.03
        self.lbox(fr, -w / 2, w / 2, h - t, h, 0.0, d, m)
        self.lbox(fr, -w / 2, -w / 2 + 0.03, 0.0, h - t, 0.02, d - 0.02, side)
        self.lbox(fr, w / 2 - 0.03, w / 2, 0.0, h - t, 0.02, d - 0.02, side)
        if self.r() < 0.5:
            dm = self.mat(CABINET, self.colour(_WHITE + _GREY[:2]), b=_GREY[2], tex=TEX_STRIPES, scale=0.2,
                          orient=1, duty=0.06)  # fmt: skip
            self.lbox(fr, w / 2 - 0.45, w / 2 - 0.04, 0.0, h - t - 0.02, 0.05, d - 0.05, dm)

    def chair(self, fr: _Frame, office: bool = False) -> None:
        """Frame origin at the back edge of the seat, facing the way the sitter looks."""
        sw, sd = self.u(0.4, 0.48), self.u(0.4, 0.46)
        sh, bh = self.u(0.42, 0.48), self.u(0.35, 0.5)
        col = self.colour(_WOOD + _FABRIC[:3] + _GREY[1:3])
        m = self.mat(CHAIR, col)
        self.lbox(fr, -sw / 2, sw / 2, sh - 0.05, sh, 0.0, sd, m)
        self.lbox(fr, -sw / 2, sw / 2, sh, sh + bh, 0.0, 0.05, m)
        if office:
            cx, cz = fr.world(0.0, sd / 2)
            metal = self.mat(CHAIR, self.colour(_GREY[1:3]))
            self.cyl(cx, cz, 0.03, 0.06, sh - 0.05, metal)
            self.cyl(cx, cz, 0.28, 0.0, 0.06, metal)
            return
        lw = 0.035
        for x in (-sw / 2 + lw / 2, sw / 2 - lw / 2):
            for z in (lw / 2, sd - lw / 2):
                self.lbox(fr, x - lw / 2, x + lw / 2, 0.0, sh - 0.05, z - lw / 2, z + lw / 2, m)

    def sofa(self, fr: _Frame, w: float, d: float) -> None:
        col = self.colour(_FABRIC)
        m = self.mat(SOFA, col)
        cushion = self.mat(SOFA, tuple(min(1.0, c * 1.1) for c in col), b=tuple(c * 0.7 for c in col),
                           tex=TEX_STRIPES, scale=w / self.randint(2, 3), orient=0, duty=0.03)  # fmt: skip
        arm = self.u(0.12, 0.22)
        seat_h, arm_h, back_h = self.u(0.38, 0.45), self.u(0.55, 0.65), self.u(0.75, 0.9)
        self.lbox(fr, -w / 2 + arm, w / 2 - arm, 0.0, seat_h, 0.2, d, cushion)
        self.lbox(fr, -w / 2, w / 2, 0.0, back_h, 0.0, 0.2, m)
        self.lbox(fr, -w / 2, -w / 2 + arm, 0.0, arm_h, 0.2, d, m)
        self.lbox(fr, w / 2 - arm, w / 2, 0.0, arm_h, 0.2, d, m)

    def lamp_shade(self, cx: float, cy: float, cz: float, r: float, sphere: bool) -> None:
        m = self.mat(LAMP, self.colour(_LAMP, 0.03), emissive=self.u(0.8, 1.5))
        if sphere:
            self.sph(cx, cy, cz, r, m)
        else:
            self.cyl(cx, cz, r, cy - r * 0.8, cy + r * 0.6, m)

    def floor_lamp(self, x: float, z: float) -> None:
        h = self.u(1.3, 1.7)
        pole = self.mat(LAMP, self.colour(_GREY[1:3] + _WOOD[2:3]))
        self.cyl(x, z, 0.015, 0.02, h - 0.1, pole)
        self.cyl(x, z, 0.14, 0.0, 0.03, pole)
        self.lamp_shade(x, h, z, self.u(0.14, 0.22), self.r() < 0.4)

    def table_lamp(self, x: float, y: float, z: float) -> None:
        base = self.mat(LAMP, self.colour(_WHITE + _GREY + _WOOD))
        self.cyl(x, z, 0.05, y, y + 0.18, base)
        self.lamp_shade(x, y + 0.27, z, self.u(0.09, 0.13), self.r() < 0.5)

    def pendant(self, x: float, z: float) -> None:
        drop = self.u(0.5, 0.9)
        cord = self.mat(LAMP, _GREY[2])
        y = self.hc - drop
        self.cyl(x, z, 0.01, y, self.hc, cord)
        self.lamp_shade(x, y, z, self.u(0.15, 0.25), self.r() < 0.5)

    def ceiling_light(self, x: float, z: float) -> None:
        m = self.mat(LAMP, self.colour(_LAMP, 0.03), emissive=self.u(1.0, 1.6))
        self.cyl(x, z, self.u(0.15, 0.3), self.hc - 0.06, self.hc, m)

    def decor(self, kind: str) -> None:
        """A thin box on a wall, labelled wall: "door", "window" or "picture"."""
        for _ in range(6):
            k = self.randint(0, 3)
            length = self.wall_len(k)
            if kind == "door":
                w, h, y0 = 0.9, min(2.05, self.hc - 0.2), 0.0
            elif kind == "window":
                w, h = self.u(0.8, 1.6), self.u(0.9, 1.4)
                y0 = self.u(0.8, self.hc - h - 0.2)
            else:
                w, h, y0 = self.u(0.3, 1.0), self.u(0.3, 0.8), self.u(1.2, 1.6)
            if w > length - 0.3:
                continue
            fr = self.wall_frame(k, self.u(w / 2 + 0.1, length - w / 2 - 0.1))
            rect = fr.rect(-w / 2, w / 2, 0.0, 0.03)
            # Doors keep 0.8 m in front of them free; other decorations avoid furniture.
            clear = fr.rect(-w / 2, w / 2, 0.0, 0.8) if kind == "door" else rect
            if not self.free(clear, 0.05 if kind == "door" else 0.02):
                continue
            break
        else:
            return
        if kind == "door":
            col = self.colour(_WOOD + _WHITE)
            m = self.mat(WALL, col, b=(col[0] * 0.6, col[1] * 0.6, col[2] * 0.6), tex=TEX_STRIPES, scale=0.45,
                         duty=0.04)  # fmt: skip
            self.foot.append(clear)
        elif kind == "window":  # bright sky, no depth through the glass
            sky = (self.u(0.6, 0.8), self.u(0.75, 0.9), self.u(0.85, 1.0))
            m = self.mat(WALL, sky, b=_WHITE[0], tex=TEX_TILES, scale=w / 2, duty=0.05, emissive=self.u(0.6, 1.2),
                         nodepth=1.0)  # fmt: skip
        else:
            m = self.mat(WALL, self.colour(_FABRIC + _WOOD), b=self.colour(_FABRIC + _WHITE),
                         tex=self.pick((TEX_PLAIN, TEX_STRIPES, TEX_TILES)), scale=self.u(0.08, 0.3),
                         orient=self.randint(0, 1))  # fmt: skip
        x0, z0, x1, z1 = rect
        self.box(x0, y0, z0, x1, min(y0 + h, self.hc - 0.05), z1, m)

    def rug(self, cx: float, cz: float, w: float, d: float) -> None:
        col = self.colour(_CARPET + _FABRIC)
        m = self.mat(FLOOR, col, b=self.colour(_CARPET + _WHITE), tex=self.pick((TEX_PLAIN, TEX_STRIPES, TEX_TILES)),
                     scale=self.u(0.1, 0.4), orient=self.randint(0, 1), duty=self.u(0.2, 0.5))  # fmt: skip
        x0, x1 = max(0.02, cx - w / 2), min(self.lx - 0.02, cx + w / 2)
        z0, z1 = max(0.02, cz - d / 2), min(self.lz - 0.02, cz + d / 2)
        self.box(x0, 0.0, z0, x1, 0.012, z1, m)


# -------------------------------------------------------------------------------------------
# Scene recipes.


def _chairs_around(b: _Builder, tf: _Frame, w: float, d: float, n: int) -> None:
    """Up to n chairs facing a rectangular table (frame at its centre), long sides first."""
    # (edge point in table-local coordinates, outward direction, quarter turns that make the
    # chair face back towards the table: the table's +lz is 0 turns, +lx is 1 turn).
    spots = []
    per_side = max(1, min(3, int(w / 0.55)))
    for side in (-1, 1):  # long sides (along lx)
        for i in range(per_side):
            lx = -w / 2 + (i + 0.5) * w / per_side
            spots.append((lx, side * (d / 2), 0.0, float(side), 0 if side < 0 else 2))
    spots.append((-w / 2, 0.0, -1.0, 0.0, 1))
    spots.append((w / 2, 0.0, 1.0, 0.0, 3))
    order = sorted(range(len(spots)), key=lambda i: (i >= 2 * per_side, b.r()))
    placed = 0
    for i in order:
        if placed >= n:
            break
        lx, lz, ox, oz, turns = spots[i]
        sd = 0.44
        back = sd + b.u(-0.12, 0.1)  # how far the chair back stands from the table edge
        wx, wz = tf.world(lx + ox * back, lz + oz * back)
        fr = tf.turned(wx, wz, turns)
        rect = fr.rect(-0.25, 0.25, 0.0, sd)
        if b.free(rect, 0.02):
            b.chair(fr)
            b.foot.append(rect)
            placed += 1


def _recipe_bedroom(b: _Builder) -> None:
    w = b.pick((0.9, 1.4, 1.6, 1.8))
    length = b.u(1.95, 2.1)
    fr = b.on_wall(w + 1.1, length, tries=10)  # reserve room for night stands
    if fr is not None:
        b.targets.append(b.last_rect)
        b.bed(fr, w, length)
        for side in (-1, 1):
            if b.r() < 0.75:
                ns = b.u(0.4, 0.5)
                nf = fr.turned(*fr.world(side * (w / 2 + 0.05 + ns / 2), 0.0), 0)
                h = b.u(0.45, 0.6)
                b.cabinet(nf, ns, 0.4, h, kind="drawers")
                if b.r() < 0.7:
                    lx, lz = nf.world(0.0, 0.2)
                    b.table_lamp(lx, h, lz)
    for _ in range(b.randint(1, 2)):
        ww = b.u(0.8, 1.8)
        f2 = b.on_wall(ww, 0.6)
        if f2 is not None:
            b.cabinet(f2, ww, 0.6, b.u(1.8, min(2.2, b.hc - 0.1)), kind=b.pick(("doors", "doors", "drawers")))
    if b.r() < 0.4:
        dw = b.u(1.0, 1.4)
        f3 = b.on_wall(dw, 1.1)
        if f3 is not None:
            b.targets.append(b.last_rect)
            b.desk(f3, dw, 0.6)
            b.chair(f3.turned(*f3.world(0.0, 1.05), 2))
    if b.r() < 0.5:
        b.rug(b.lx * b.u(0.35, 0.65), b.lz * b.u(0.35, 0.65), b.u(1.2, 2.0), b.u(0.8, 1.6))
    if b.r() < 0.6:
        b.ceiling_light(b.lx / 2, b.lz / 2)


def _recipe_kitchen(b: _Builder) -> None:
    k = b.randint(0, 3)
    front = b.colour(_WHITE + _WOOD + _GREY[:2])
    counter = b.colour(_GREY + _WHITE[:1] + _WOOD[4:])
    for j, wall in enumerate((k, (k + 1) % 4)):
        if j == 1 and b.r() < 0.35:
            break
        length = b.wall_len(wall)
        run = b.u(0.6, 1.0) * (length - 0.7) if j == 0 else b.u(0.5, 0.9) * (length - 0.7)
        s0 = 0.65 if j == 1 else b.u(0.0, length - 0.65 - run)  # L-shape: skip the corner
        fr = b.wall_frame(wall, s0 + run / 2)
        rect = fr.rect(-run / 2, run / 2, 0.0, 0.62)
        if run < 0.6 or not b.free(rect, 0.0):
            continue
        b.foot.append(rect)
        b.targets.append(rect)
        body = b.mat(CABINET, front, b=tuple(c * 0.5 for c in front), tex=TEX_STRIPES, scale=b.u(0.4, 0.6),
                     duty=0.04)  # fmt: skip
        top = b.mat(CABINET, counter)
        b.lbox(fr, -run / 2, run / 2, 0.08, 0.86, 0.0, 0.58, body)
        b.lbox(fr, -run / 2, run / 2, 0.0, 0.08, 0.0, 0.52, b.mat(CABINET, tuple(c * 0.4 for c in front)))
        b.lbox(fr, -run / 2, run / 2, 0.86, 0.9, 0.0, 0.62, top)
        if b.r() < 0.8:
            up = run * b.u(0.5, 1.0)
            off = b.u(-1, 1) * (run - up) / 2
            y0 = b.u(1.4, 1.55)
            b.lbox(fr, off - up / 2, off + up / 2, y0, min(b.hc - 0.05, y0 + b.u(0.6, 0.8)), 0.0, 0.35, body)
    if b.r() < 0.7:  # fridge: a tall cabinet
        ff = b.on_wall(0.7, 0.7)
        if ff is not None:
            m = b.mat(CABINET, b.colour(_WHITE + _GREY[3:]), b=_GREY[1], tex=TEX_STRIPES, scale=1.0, orient=1,
                      duty=0.02)  # fmt: skip
            b.lbox(ff, -0.35, 0.35, 0.0, b.u(1.7, 2.0), 0.0, 0.7, m)
    if b.r() < 0.5:
        tw, td = b.u(0.7, 1.1), b.u(0.6, 0.8)
        tf = b.in_room(tw + 1.0, td + 1.0, margin=0.2)
        if tf is not None:
            b.foot[-1] = tf.rect(-tw / 2, tw / 2, -td / 2, td / 2)
            b.targets.append(b.foot[-1])
            b.table(tf, tw, td, b.u(0.72, 0.76), round_top=b.r() < 0.3)
            _chairs_around(b, tf, tw, td, b.randint(0, 2))
    if b.r() < 0.5:
        b.pendant(b.lx * b.u(0.35, 0.65), b.lz * b.u(0.35, 0.65))
    elif b.r() < 0.7:
        b.ceiling_light(b.lx / 2, b.lz / 2)


def _recipe_office(b: _Builder) -> None:
    n_desk = b.randint(1, 3)
    for _ in range(n_desk):
        dw, dd = b.u(1.2, 1.7), b.u(0.6, 0.8)
        fr = b.on_wall(dw, dd + 0.75)
        if fr is None:
            continue
        b.targets.append(b.last_rect)
        b.desk(fr, dw, dd)
        if b.r() < 0.9:
            b.chair(fr.turned(*fr.world(b.u(-0.2, 0.2), dd + b.u(0.25, 0.6)), 2), office=b.r() < 0.7)
    for _ in range(b.randint(1, 3)):
        w = b.u(0.6, 1.2)
        kind = b.pick(("shelf", "shelf", "drawers", "doors"))
        d = 0.35 if kind == "shelf" else 0.5
        fr = b.on_wall(w, d)
        if fr is not None:
            b.cabinet(
                fr, w, d, b.u(0.8, 1.2) if kind == "drawers" else b.u(1.6, min(2.2, b.hc - 0.1)), kind=kind
            )
    if b.r() < 0.3:
        tw, td = b.u(1.2, 2.0), b.u(0.8, 1.0)
        tf = b.in_room(tw, td + 1.2)
        if tf is not None:
            b.targets.append(b.last_rect)
            b.table(tf, tw, td, 0.74)
            _chairs_around(b, tf, tw, td, b.randint(1, 3))
    for _ in range(b.randint(1, 2)):
        b.ceiling_light(b.lx * b.u(0.3, 0.7), b.lz * b.u(0.3, 0.7))


def _recipe_living(b: _Builder) -> None:
    sw, sd = b.u(1.6, 2.4), b.u(0.85, 0.95)
    fr = b.on_wall(sw, sd + 1.0, tries=10)
    if fr is not None:
        b.foot[-1] = fr.rect(-sw / 2, sw / 2, 0.0, sd)
        b.targets.append(b.foot[-1])
        b.sofa(fr, sw, sd)
        cw, cd = b.u(0.8, 1.2), b.u(0.5, 0.7)
        cz = sd + b.u(0.35, 0.55) + cd / 2
        tf = fr.turned(*fr.world(0.0, cz), 0)
        if b.r() < 0.85 and b.free(tf.rect(-cw / 2, cw / 2, -cd / 2, cd / 2), 0.02):
            b.table(tf, cw, cd, b.u(0.38, 0.46), round_top=b.r() < 0.25)
            b.foot.append(tf.rect(-cw / 2, cw / 2, -cd / 2, cd / 2))
        if b.r() < 0.6:
            b.rug(*fr.world(0.0, cz), sw * 1.1, b.u(1.4, 2.0))
        if b.r() < 0.6:
            side = b.pick((-1, 1))
            lx, lz = fr.world(side * (sw / 2 + 0.3), 0.3)
            if b.free((lx - 0.15, lz - 0.15, lx + 0.15, lz + 0.15), 0.02):
                b.floor_lamp(lx, lz)
                b.foot.append((lx - 0.15, lz - 0.15, lx + 0.15, lz + 0.15))
    for _ in range(b.randint(0, 2)):  # armchairs: small sofas
        aw = b.u(0.8, 1.0)
        fa = b.on_wall(aw, 0.85)
        if fa is not None:
            b.sofa(fa, aw, 0.85)
    if b.r() < 0.8:  # TV stand
        tw = b.u(1.0, 1.8)
        ft = b.on_wall(tw, 0.45)
        if ft is not None:
            b.cabinet(ft, tw, 0.45, b.u(0.4, 0.6), kind=b.pick(("drawers", "doors")))
    if b.r() < 0.6:
        w = b.u(0.7, 1.2)
        fs = b.on_wall(w, 0.35)
        if fs is not None:
            b.cabinet(fs, w, 0.35, b.u(1.5, 2.0), kind="shelf")
    if b.r() < 0.4:
        b.ceiling_light(b.lx / 2, b.lz / 2)


def _recipe_bathroom(b: _Builder) -> None:
    tl, tw = b.u(1.4, 1.7), b.u(0.7, 0.8)
    fr = b.on_wall(tl, tw, tries=10)
    if fr is not None:
        b.targets.append(b.last_rect)
        white = b.colour(_WHITE + _TILE[1:2], 0.03)
        m = b.mat(BATHTUB, white)
        inner = b.mat(BATHTUB, tuple(c * 0.9 for c in white))
        h, t = b.u(0.5, 0.6), 0.07
        b.lbox(fr, -tl / 2, tl / 2, 0.0, h * 0.35, 0.0, tw, inner)
        b.lbox(fr, -tl / 2, tl / 2, 0.0, h, 0.0, t, m)
        b.lbox(fr, -tl / 2, tl / 2, 0.0, h, tw - t, tw, m)
        b.lbox(fr, -tl / 2, -tl / 2 + t, 0.0, h, t, tw - t, m)
        b.lbox(fr, tl / 2 - t, tl / 2, 0.0, h, t, tw - t, m)
    vw = b.u(0.6, 1.0)
    fv = b.on_wall(vw, 0.5)
    if fv is not None:
        b.targets.append(b.last_rect)
        b.cabinet(fv, vw, 0.5, 0.82, kind="doors")
        b.lbox(fv, -vw / 2, vw / 2, 0.82, 0.86, 0.0, 0.52, b.mat(CABINET, b.colour(_WHITE + _GREY[3:])))
        w = min(vw, 0.8)
        x0, z0, x1, z1 = fv.rect(-w / 2, w / 2, 0.0, 0.02)
        b.box(
            x0,
            1.1,
            z0,
            x1,
            min(b.hc - 0.2, 1.1 + b.u(0.6, 0.9)),
            z1,
            b.mat(WALL, (0.78, 0.82, 0.85), nodepth=1.0),
        )
    if b.r() < 0.5:
        w = b.u(0.4, 0.6)
        fc = b.on_wall(w, 0.3)
        if fc is not None:
            b.cabinet(fc, w, 0.3, b.u(0.6, 1.6), kind="doors")
    if b.r() < 0.7:
        b.ceiling_light(b.lx / 2, b.lz / 2)


def _recipe_dining(b: _Builder) -> None:
    rnd = b.r() < 0.3
    tw = b.u(0.9, 1.2) if rnd else b.u(1.4, 2.2)
    td = tw if rnd else b.u(0.85, 1.05)
    tf = b.in_room(tw, td, margin=0.6, centre_bias=0.7)
    if tf is not None:
        b.targets.append(b.last_rect)
        b.table(tf, tw, td, b.u(0.73, 0.77), round_top=rnd)
        _chairs_around(b, tf, tw, td, b.randint(2, 4) if rnd else b.randint(4, 6))
        cx, cz = tf.world(0.0, 0.0)
        if b.r() < 0.8:
            b.pendant(cx, cz)
        if b.r() < 0.3:
            b.rug(cx, cz, tw + 1.4, td + 1.4)
    for _ in range(b.randint(0, 2)):
        w = b.u(1.0, 1.8)
        fs = b.on_wall(w, 0.45)
        if fs is not None:
            b.cabinet(
                fs,
                w,
                0.45,
                b.u(0.8, 1.0) if b.r() < 0.7 else b.u(1.6, 2.0),
                kind=b.pick(("doors", "drawers")),
            )
    if b.r() < 0.3:
        b.ceiling_light(b.lx * b.u(0.3, 0.7), b.lz * b.u(0.3, 0.7))


_RECIPES = {
    BEDROOM: _recipe_bedroom,
    KITCHEN: _recipe_kitchen,
    OFFICE: _recipe_office,
    LIVING_ROOM: _recipe_living,
    BATHROOM: _recipe_bathroom,
    DINING_ROOM: _recipe_dining,
}


def _room_materials(b: _Builder) -> list[tuple]:
    """Floor, ceiling and four walls. One wall may be an accent wall; tiles in wet rooms."""
    kind = b.weighted(_FLOOR_WEIGHTS[b.scene])
    if kind == 0:
        col = b.colour(_WOOD)
        floor = b.mat(FLOOR, col, b=tuple(c * 0.75 for c in col), tex=TEX_PLANKS, scale=b.u(0.1, 0.2),
                      orient=b.randint(0, 1))  # fmt: skip
    elif kind == 1:
        floor = b.mat(FLOOR, b.colour(_TILE), b=b.colour(_TILE), tex=TEX_TILES, scale=b.u(0.25, 0.5),
                      duty=b.u(0.02, 0.05))  # fmt: skip
    else:
        floor = b.mat(FLOOR, b.colour(_CARPET))
    ceiling = b.mat(CEILING, b.colour(_WHITE, 0.04))
    wall_col = _WALL_COLOURS[b.weighted(_WALL_WEIGHTS[b.scene])]
    wall_col = tuple(c * b.u(0.92, 1.05) for c in wall_col)
    tiled = b.scene in (BATHROOM, KITCHEN) and b.r() < (0.75 if b.scene == BATHROOM else 0.3)
    if tiled:
        base = b.mat(WALL, b.colour(_TILE), b=tuple(c * 0.75 for c in b.colour(_TILE)), tex=TEX_TILES,
                     scale=b.u(0.15, 0.3), duty=0.04)  # fmt: skip
    elif b.r() < 0.25:
        base = b.mat(
            WALL, wall_col, b=tuple(c * 0.88 for c in wall_col), tex=TEX_STRIPES, scale=b.u(0.1, 0.3)
        )
    else:
        base = b.mat(WALL, wall_col)
    walls = [base] * 4
    if b.r() < 0.3:
        walls[b.randint(0, 3)] = b.mat(WALL, b.colour(_WALL_COLOURS))
    return [floor, ceiling, *walls]


def _camera(b: _Builder) -> tuple[tuple, tuple]:
    """Eye-height camera standing clear of furniture, usually aimed at a piece of furniture (as
    people photograph rooms), otherwise towards the room centre."""
    target = None
    if b.targets and b.r() < 0.85:
        x0, z0, x1, z1 = b.pick(b.targets)
        target = ((x0 + x1) / 2, (z0 + z1) / 2)
    height = b.u(1.1, 1.65)
    far = 0
    if target is not None:  # the wall farthest from the target: room to step back
        tx, tz = target
        far = max(range(4), key=lambda k: (tz, b.lx - tx, b.lz - tz, tx)[k])
    best, best_score = None, -1e9
    for attempt in range(16):
        k = far if target is not None and attempt < 4 and b.r() < 0.7 else b.randint(0, 3)
        length = b.wall_len(k)
        fr = b.wall_frame(k, b.u(0.35, length - 0.35), gap=b.u(0.35, 1.3))
        x, z = min(max(fr.ox, 0.3), b.lx - 0.3), min(max(fr.oz, 0.3), b.lz - 0.3)
        clear = min((max(a0 - x, x - a1, b0 - z, z - b1) for a0, b0, a1, b1 in b.foot), default=9.0)
        dist = math.hypot(target[0] - x, target[1] - z) if target else 2.5
        score = min(clear, 0.35) - 10.0 * (dist < 1.3) - 1.0 * (dist < 1.9)
        if score > best_score:
            best, best_score = (x, z, fr.nx, fr.nz, dist), score
        if score >= 0.35:
            break
    x, z, nx, nz, dist = best
    if target is not None and dist > 0.5:
        yaw = math.atan2(target[0] - x, target[1] - z) + math.radians(b.u(-20, 20))
        pitch = -math.atan2(height - 0.45, dist) * b.u(0.6, 1.1)
        pitch = min(max(pitch, math.radians(-40)), math.radians(-3))
    else:
        tx, tz = b.lx / 2 - x, b.lz / 2 - z
        base = math.atan2(tx, tz) if math.hypot(tx, tz) > 0.5 else math.atan2(nx, nz)
        yaw = base + math.radians(b.u(-35, 35))
        pitch = math.radians(b.u(-20, 8))  # sometimes up: ceilings get into view
    roll = math.radians(b.u(-3, 3))
    fwd = (math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch))
    # right = fwd x up, down = fwd x right: (right, down, fwd) is right-handed like the camera.
    right = (-fwd[2], 0.0, fwd[0])
    rn = math.hypot(right[0], right[2])
    right = (right[0] / rn, 0.0, right[2] / rn)
    down = (
        fwd[1] * right[2] - fwd[2] * right[1],
        fwd[2] * right[0] - fwd[0] * right[2],
        fwd[0] * right[1] - fwd[1] * right[0],
    )
    cr, sr = math.cos(roll), math.sin(roll)
    r2 = tuple(cr * a + sr * d for a, d in zip(right, down))
    d2 = tuple(-sr * a + cr * d for a, d in zip(right, down))
    rot = tuple((r2[i], d2[i], fwd[i]) for i in range(3))  # rows; columns are the camera axes
    return (x, height, z), rot


def sample_scene(seed: int, index: int, first: list[float] | None = None) -> Scene:
    """The scene of sample ``index`` of a dataset with ``seed`` (independent of resolution).

    ``first`` optionally passes the first block of this sample's uniform stream (precomputed
    for a batch); the result is the same either way.
    """
    rnd = _Stream(seed, index, first)
    scene = min(int(rnd() * len(SCENE_CLASSES)), len(SCENE_CLASSES) - 1)
    b = _Builder(rnd, scene)
    room = _room_materials(b)
    if b.r() < 0.5:
        b.decor("door")
    _RECIPES[scene](b)
    if b.r() < 0.6:
        b.decor("window")
    for _ in range(b.randint(0, 2)):
        b.decor("picture")
    cam_pos, cam_rot = _camera(b)
    if len(b.mats) > _MAX_SLOTS - _ROOM_FACES:
        raise RuntimeError(f"scene {index} has {len(b.mats)} primitives, more than the renderer's slots")
    # Lights: a point light at the first lamp shade if there is one, else near the ceiling centre.
    shades = [p for p in b.sphs] + [
        (c[0], (c[3] + c[4]) / 2, c[1]) for c in b.cyls if b.mats[c[5] - _ROOM_FACES][11] > 0
    ]
    if shades and b.r() < 0.8:
        lp = tuple(shades[0][:3])
        lp = (lp[0], min(lp[1], b.hc - 0.15), lp[2])
    else:
        lp = (b.lx * b.u(0.3, 0.7), b.hc - 0.2, b.lz * b.u(0.3, 0.7))
    az, el = b.u(0, 2 * math.pi), math.radians(b.u(25, 60))
    sun = (math.cos(az) * math.cos(el), -math.sin(el), math.sin(az) * math.cos(el))
    holes = [
        (b.u(0.05, 0.95), b.u(0.05, 0.95), b.u(0.01, 0.05), b.u(0.01, 0.05)) for _ in range(b.randint(0, 3))
    ]
    return Scene(
        scene=scene,
        room=(b.lx, b.hc, b.lz),
        cam_pos=cam_pos,
        cam_rot=cam_rot,
        boxes=b.boxes,
        cylinders=b.cyls,
        spheres=b.sphs,
        materials=room + b.mats,
        light_pos=lp,
        light_power=b.u(1.2, 2.6),
        sun_dir=sun,
        sun_power=b.u(0.1, 0.45),
        ambient=b.u(0.22, 0.38),
        exposure=b.u(0.85, 1.15),
        tint=(b.u(0.95, 1.05), 1.0, b.u(0.95, 1.05)),
        holes=holes,
        noise_offset=int(b.r() * (1 << 20)),
    )


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
        rows = _uniform_block(12345, np.arange(3), 0, length)
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
    face = mj < _ROOM_FACES
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
    the low _SLOT_BITS mantissa bits of the distance by the surface slot gives keys whose
    minimum is the nearest surface (distances are kept to a relative 2^-15, ~0.1 mm at 3 m)."""
    return (t.view(np.int32) & np.int32(~(_MAX_SLOTS - 1))) | slot


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
    depth = (zkey & np.int32(~(_MAX_SLOTS - 1))).view(f32)
    slot = zkey & np.int32(_MAX_SLOTS - 1)
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


def _empty_outputs(bsz: int, size: int) -> dict[str, np.ndarray]:
    """Flat-pixel output arrays: (B, C, N) for multi-channel fields, (B, N) otherwise."""
    n = size * size
    return {k: np.empty((bsz, c, n) if c > 1 else (bsz, n), dt) for k, (c, dt) in _OUTPUTS.items()}


def _render_into(scenes: list[Scene], size: int, out: dict, start: int) -> None:
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


def _as_tensors(out: dict, size: int) -> dict[str, torch.Tensor]:
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
    out = _empty_outputs(len(scenes), size)
    _render_into(scenes, size, out, 0)
    res = _as_tensors(out, size)
    res["scene"] = torch.tensor([s.scene for s in scenes], dtype=torch.int64)
    return res


_pool: tuple[int, int, ThreadPoolExecutor] | None = None


def _executor(workers: int) -> ThreadPoolExecutor:
    """A process-wide thread pool, rebuilt after fork (DataLoader workers) or for a new size."""
    global _pool
    if _pool is None or _pool[0] != os.getpid() or _pool[1] != workers:
        _pool = (
            os.getpid(),
            workers,
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mgm-synthetic"),
        )
    return _pool[2]


# -------------------------------------------------------------------------------------------
# Dataset.


class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural indoor scenes in the project's sample format (see the module docstring).

    Args:
        num_samples: dataset length.
        image_size: square output resolution in pixels (any size >= 8; 32, 64, 128, 256 are the
            usual ones). The scenes do not depend on it.
        seed: dataset seed; sample i of seed s is always the same scene.
    """

    SEG_CLASSES = SEG_CLASSES
    SCENE_CLASSES = SCENE_CLASSES
    SEG_PALETTE = SEG_PALETTE
    IGNORE_INDEX = IGNORE_INDEX

    def __init__(self, num_samples: int, image_size: int = 64, seed: int = 0):
        if int(num_samples) < 0:
            raise ValueError(f"SyntheticScenes: num_samples must be >= 0, got {num_samples}")
        if int(image_size) < 8:
            raise ValueError(f"SyntheticScenes: image_size must be >= 8 pixels, got {image_size}")
        self.num_samples = int(num_samples)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.num_seg_classes = len(SEG_CLASSES)
        self.num_scenes = len(SCENE_CLASSES)

    def __len__(self) -> int:
        return self.num_samples

    def _index(self, i: int) -> int:
        i = int(i)
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"SyntheticScenes: index {i} out of range for {self.num_samples} samples")
        return i

    def sample_id(self, i: int) -> str:
        return f"synthetic-s{self.seed}-{self._index(i):06d}"

    def scene(self, i: int) -> Scene:
        """The resolution-independent scene description of sample i."""
        return sample_scene(self.seed, self._index(i))

    def __getitem__(self, i: int) -> dict:
        batch = self.render_batch([i])
        out = {k: v[0] for k, v in batch.items() if k != "id"}
        out["id"] = batch["id"][0]
        return out

    def __getitems__(self, indices) -> list[dict]:
        """Samples ``indices`` rendered in one batch: torch's DataLoader calls this with a whole
        batch of indices when the dataset defines it, so ``DataLoader(ds, batch_size=...)`` takes
        the fast path without a custom sampler. The samples are views into the batch tensors."""
        batch = self.render_batch(indices)
        keys = [k for k in batch if k != "id"]
        return [{**{k: batch[k][j] for k in keys}, "id": sid} for j, sid in enumerate(batch["id"])]

    def render_batch(self, indices, num_threads: int | None = None) -> dict:
        """Render samples ``indices`` at once: the batched fast path.

        Returns a dict of stacked tensors (B = len(indices)): rgb (B, 3, H, W), seg (B, H, W),
        depth / depth_mask (B, 1, H, W), normal (B, 3, H, W), normal_mask (B, 1, H, W),
        scene (B,), plus ``id``: a list of B strings. Row k equals ``self[indices[k]]``.

        ``num_threads`` (default: ``torch.get_num_threads()``, which is 1 inside DataLoader
        workers) groups of images are sampled and rendered concurrently. numpy releases the GIL
        inside its loops, so one thread's rendering overlaps another's Python scene sampling.
        The result does not depend on it.
        """
        idx = [self._index(i) for i in (indices.tolist() if hasattr(indices, "tolist") else indices)]
        if not idx:
            raise ValueError("SyntheticScenes.render_batch: no indices given")
        workers = torch.get_num_threads() if num_threads is None else int(num_threads)
        size = self.image_size
        out = _empty_outputs(len(idx), size)
        scene = np.empty(len(idx), dtype=np.int64)
        # Groups small enough to keep every worker busy, large enough to amortise culling.
        group = max(8, min(64, -(-len(idx) // (2 * max(1, workers)))))
        starts = range(0, len(idx), group)

        def work(start: int) -> None:
            part = idx[start : start + group]
            first = _uniform_block(self.seed, np.asarray(part, dtype=np.int64), 0, _Stream._BLOCK).tolist()
            scenes = [sample_scene(self.seed, i, row) for i, row in zip(part, first)]
            scene[start : start + len(part)] = [s.scene for s in scenes]
            _render_into(scenes, size, out, start)

        if workers <= 1 or len(starts) == 1:
            for start in starts:
                work(start)
        else:
            list(_executor(workers).map(work, starts))
        res = _as_tensors(out, size)
        res["scene"] = torch.from_numpy(scene)
        res["id"] = [f"synthetic-s{self.seed}-{i:06d}" for i in idx]
        return res
