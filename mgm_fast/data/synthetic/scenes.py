"""Scene recipes of the synthetic dataset: class tables, the per-sample random stream, and the
resolution-independent :class:`Scene` that :func:`sample_scene` draws for (seed, index).

Scene model (all units metres, world frame y up)
    A room spans x in [0, Lx], y in [0, Hc], z in [0, Lz]. Its six faces are floor, ceiling and
    four walls. Furniture is built from axis-aligned boxes, vertical cylinders and spheres
    (beds, cabinets, tables, chairs, sofas, lamps, bathtubs) and placed against walls or free
    on the floor, following a per-scene-type recipe (object kinds, counts, sizes, room size,
    palettes). Wall decorations (pictures, windows, doors, mirrors) are thin boxes labelled
    ``wall``; rugs are thin boxes labelled ``floor``. A pinhole camera (``FOV_DEG``, square
    pixels, principal point at the image centre) stands near a wall at eye height, looks into
    the room with a random yaw, a slight downward pitch and a small roll.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "MAX_SLOTS",
    "ROOM_FACES",
    "SCENE_CLASSES",
    "SEG_CLASSES",
    "SEG_PALETTE",
    "Scene",
    "sample_scene",
    "sample_scenes",
    "uniform_block",
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

# Surface slots: 0..5 are the room faces, objects follow (one slot per primitive). The slot
# shares an int32 z-buffer key with the hit distance, in the low SLOT_BITS bits.
SLOT_BITS = 8
MAX_SLOTS = 1 << SLOT_BITS
ROOM_FACES = 6  # floor, ceiling, wall z=0, wall x=Lx, wall z=Lz, wall x=0

# Texture types.
TEX_PLAIN, TEX_STRIPES, TEX_TILES, TEX_PLANKS = 0, 1, 2, 3


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


def uniform_block(seed: int, indices: np.ndarray, start: int, count: int) -> np.ndarray:
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

    BLOCK = 384

    def __init__(self, seed: int, index: int, first: list[float] | None = None):
        self.seed, self.index = seed, index
        self.used = 0
        block = first if first is not None else self._block(0)
        self._rev = block[::-1]  # list.pop() from the end is the cheapest way to consume it

    def _block(self, start: int) -> list[float]:
        return uniform_block(self.seed, np.array([self.index]), start, self.BLOCK)[0].tolist()

    def __call__(self) -> float:
        try:
            return self._rev.pop()
        except IndexError:
            self.used += self.BLOCK
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
        return ROOM_FACES + len(self.mats) - 1

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
    if len(b.mats) > MAX_SLOTS - ROOM_FACES:
        raise RuntimeError(f"scene {index} has {len(b.mats)} primitives, more than the renderer's slots")
    # Lights: a point light at the first lamp shade if there is one, else near the ceiling centre.
    shades = [p for p in b.sphs] + [
        (c[0], (c[3] + c[4]) / 2, c[1]) for c in b.cyls if b.mats[c[5] - ROOM_FACES][11] > 0
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


def sample_scenes(seed: int, indices) -> list[Scene]:
    """The scenes of samples ``indices`` (ints) of a dataset with ``seed``: :func:`sample_scene`
    of each, with the first block of every sample's stream drawn in one vectorised call."""
    indices = [int(i) for i in indices]
    first = uniform_block(seed, np.asarray(indices, dtype=np.int64), 0, _Stream.BLOCK).tolist()
    return [sample_scene(seed, i, row) for i, row in zip(indices, first)]
