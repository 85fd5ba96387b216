"""Surface normals from a NYUv2 depth map (:func:`compute_normals`).

Depth and surface normals
-------------------------
``--depth filled`` (default) uses ``depths``, which the NYU toolbox in-painted (dense, no holes);
``--depth raw`` uses ``rawDepths`` (0 where the Kinect gave no measurement, masked).

Normals are computed from that depth map at the file's resolution by :func:`compute_normals`:

1. Back-projection with the RGB intrinsics of the NYU toolbox (``camera_params.m``; the labelled
   frames are undistorted and registered to the RGB camera): ``fx = 518.857901``,
   ``fy = 519.469611``, ``cx = 325.582449``, ``cy = 253.736166`` (:data:`KINECT_RGB`). The
   toolbox states ``cx, cy`` in MATLAB's 1-based pixel coordinates (its
   ``rgb_plane2rgb_world.m`` uses ``meshgrid(1:640, 1:480)``), so the 0-based pixel (row v,
   column u) is the point ``X = (u + 1 - cx) Z / fx``, ``Y = (v + 1 - cy) Z / fy``, ``Z``.
   Camera frame: x right, y down, z forward (as :mod:`mgm_fast.data.synthetic`).
2. Depth discontinuities: two 4-adjacent valid pixels whose depths differ by more than
   ``tau = 5 %`` of the nearer one are both edge pixels (from pixel to pixel a plane changes
   depth by about ``tan(theta) / f``: 2 % at theta = 85 degrees between normal and viewing ray,
   5 % only beyond 88 degrees, so only occlusion boundaries exceed it).
3. A least-squares plane (total least squares: the eigenvector of the smallest eigenvalue of the
   3x3 covariance of the window's valid points) over the ``(2r+1) x (2r+1)`` window around each
   pixel, ``r = 7`` (15 x 15 pixels, about 4 x 3 output pixels at 128 x 128). The window
   moments come from integral images and the eigenvector from the closed-form eigenvalues of a
   symmetric 3x3 matrix (trigonometric method) and a cross product of two rows of
   ``C - lambda_min I`` -- ~10x faster than batched ``numpy.linalg.eigh``, which the tests
   compare it against. With ``--size`` other than native, only the pixels that the
   nearest-neighbour resize keeps are evaluated (same values, the windows still see the
   full-resolution depth).
4. Oriented towards the camera: ``dot(n, X) < 0``.
5. Invalid (``normal_mask`` False) where the centre depth is missing, fewer than half of the
   window's pixels have depth, the window touches a depth discontinuity, the fit is poor (surface
   variation ``lambda_0 / (lambda_0 + lambda_1 + lambda_2) > 0.1``: not a plane), the points do
   not span a plane (``lambda_1 <= 1e-6 lambda_2``), or the plane is seen at a grazing angle
   (angle between normal and viewing ray above 85 degrees, as the synthetic data).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mgm_fast.data.sample import (
    DataError,
)

__all__ = ["KINECT_RGB", "NORMAL_RADIUS", "NORMAL_THRESHOLDS", "Intrinsics", "compute_normals"]


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels; ``cx, cy`` in MATLAB's 1-based pixel coordinates."""

    fx: float
    fy: float
    cx: float
    cy: float


KINECT_RGB = Intrinsics(
    fx=5.1885790117450188e02,
    fy=5.1946961112127485e02,
    cx=3.2558244941119034e02,
    cy=2.5373616633400465e02,
)
"""RGB camera of the NYU Depth v2 toolbox (``camera_params.m``: fx_rgb, fy_rgb, cx_rgb, cy_rgb)."""

NORMAL_RADIUS = 7
"""Default window radius of :func:`compute_normals`: 15 x 15 pixels at 640 x 480."""
NORMAL_THRESHOLDS = {"min_valid": 0.5, "edge_jump": 0.05, "max_curvature": 0.1, "max_view_angle": 85.0}
"""Default validity thresholds of :func:`compute_normals` (module docstring)."""


# -------------------------------------------------------------------------------------------
# Surface normals.


def _window_sums(
    channels: np.ndarray, r: int, rows: np.ndarray | None = None, cols: np.ndarray | None = None
) -> np.ndarray:
    """Sums of float64 (C, H, W) ``channels`` over the (2r+1) x (2r+1) window around each pixel,
    zero outside the image: (C, H, W), or (C, len(rows), len(cols)) at the pixels
    (rows[i], cols[j]) only.

    One integral image per channel (two cumulative sums), then four corners per pixel, so a
    128 x 128 grid costs little more than the cumulative sums.
    """
    c, h, w = channels.shape
    integral = np.zeros((c, h + 1, w + 1))
    integral[:, 1:, 1:] = channels
    np.cumsum(integral, axis=1, out=integral)
    np.cumsum(integral, axis=2, out=integral)
    if rows is None:
        # every pixel: pad by repeating the border so that the clipped corners become slices
        k = 2 * r + 1
        p = np.pad(integral, ((0, 0), (r, r), (r, r)), mode="edge")
        return p[:, k : k + h, k : k + w] - p[:, :h, k : k + w] - p[:, k : k + h, :w] + p[:, :h, :w]
    y0, y1 = np.clip(rows - r, 0, h), np.clip(rows + r + 1, 0, h)
    x0, x1 = np.clip(cols - r, 0, w), np.clip(cols + r + 1, 0, w)
    top, bottom = integral[:, y0], integral[:, y1]
    return bottom[:, :, x1] - top[:, :, x1] - bottom[:, :, x0] + top[:, :, x0]


def _smallest_eigenvectors(a00, a11, a22, a01, a02, a12):
    """Per element, the eigenvalues (ascending) and the unit eigenvector of the smallest one of
    the symmetric 3x3 matrices [[a00, a01, a02], [a01, a11, a12], [a02, a12, a22]] (float64 (K,)).

    Eigenvalues by the trigonometric closed form; the eigenvector is the longest of the three
    cross products of rows of ``A - lambda_min I`` (each is orthogonal to the two rows, hence
    along the null vector). Returns ``(v (K, 3), l0, l1, l2, ok)``; ``ok`` False where no cross
    product is non-zero (e.g. an all-zero matrix).
    """
    q = (a00 + a11 + a22) / 3.0
    d0, d1, d2 = a00 - q, a11 - q, a22 - q
    p = np.sqrt((d0 * d0 + d1 * d1 + d2 * d2 + 2.0 * (a01 * a01 + a02 * a02 + a12 * a12)) / 6.0)
    ps = np.where(p > 0, p, 1.0)
    det = d0 * (d1 * d2 - a12 * a12) - a01 * (a01 * d2 - a12 * a02) + a02 * (a01 * a12 - d1 * a02)
    phi = np.arccos(np.clip(det / (2.0 * ps**3), -1.0, 1.0)) / 3.0
    l2 = q + 2.0 * p * np.cos(phi)
    l0 = q + 2.0 * p * np.cos(phi + 2.0 * np.pi / 3.0)
    l1 = 3.0 * q - l2 - l0
    b00, b11, b22 = a00 - l0, a11 - l0, a22 - l0
    # rows r0 = (b00, a01, a02), r1 = (a01, b11, a12), r2 = (a02, a12, b22)
    cands = (
        (a01 * a12 - a02 * b11, a02 * a01 - b00 * a12, b00 * b11 - a01 * a01),  # r0 x r1
        (a01 * b22 - a02 * a12, a02 * a02 - b00 * b22, b00 * a12 - a01 * a02),  # r0 x r2
        (b11 * b22 - a12 * a12, a12 * a02 - a01 * b22, a01 * a12 - b11 * a02),  # r1 x r2
    )
    best = np.zeros_like(q)
    v = np.zeros((3, *q.shape))
    for c in cands:
        norm2 = c[0] * c[0] + c[1] * c[1] + c[2] * c[2]
        take = norm2 > best
        best = np.where(take, norm2, best)
        for k in range(3):
            v[k] = np.where(take, c[k], v[k])
    ok = best > 0
    v /= np.sqrt(np.where(ok, best, 1.0))
    return v.T, l0, l1, l2, ok


def compute_normals(
    depth: np.ndarray,
    intrinsics: Intrinsics = KINECT_RGB,
    offset: tuple[int, int] = (0, 0),
    radius: int = NORMAL_RADIUS,
    min_valid: float = NORMAL_THRESHOLDS["min_valid"],
    edge_jump: float = NORMAL_THRESHOLDS["edge_jump"],
    max_curvature: float = NORMAL_THRESHOLDS["max_curvature"],
    max_view_angle: float = NORMAL_THRESHOLDS["max_view_angle"],
    rows: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Surface normals of a depth map by local least-squares plane fits (module docstring).

    Args:
        depth: float (H, W) z-depth in metres; 0, negative or non-finite = no measurement.
        intrinsics: camera of the full frame (cx, cy 1-based, as the NYU toolbox).
        offset: (row, column) of ``depth[0, 0]`` in the full frame (the crop origin).
        radius: window radius r; the window is (2r+1) x (2r+1) pixels.
        min_valid: minimum fraction of the window's pixels with depth.
        edge_jump: relative depth jump between 4-neighbours that marks a discontinuity.
        max_curvature: maximum surface variation lambda_0 / (lambda_0 + lambda_1 + lambda_2).
        max_view_angle: maximum angle in degrees between the normal and the reversed view ray.
        rows, cols: optional int arrays: evaluate only the pixels (rows[i], cols[j]), e.g. the
            grid a nearest-neighbour resize keeps; the values are those of the full map there
            (the windows still see the full-resolution depth).
    Returns:
        ``(normals float32 (R, C, 3), valid bool (R, C))`` with (R, C) = (H, W) or
        (len(rows), len(cols)): unit normals in the camera frame (x right, y down, z forward)
        facing the camera where valid, exactly 0 elsewhere.
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise DataError(f"compute_normals: depth has shape {depth.shape}, expected (H, W)")
    h, w = depth.shape
    full = rows is None and cols is None
    rows = np.arange(h) if rows is None else np.asarray(rows, dtype=np.int64)
    cols = np.arange(w) if cols is None else np.asarray(cols, dtype=np.int64)
    valid = np.isfinite(depth) & (depth > 0)
    z = np.where(valid, depth, 0).astype(np.float64)
    u = np.arange(w, dtype=np.float64) + offset[1] + 1.0  # MATLAB 1-based column
    v = np.arange(h, dtype=np.float64) + offset[0] + 1.0
    rx = (u - intrinsics.cx) / intrinsics.fx  # ray (rx, ry, 1) through each pixel
    ry = (v - intrinsics.cy) / intrinsics.fy

    edge = np.zeros((h, w), dtype=bool)
    jump = valid[:-1] & valid[1:] & (np.abs(z[:-1] - z[1:]) > edge_jump * np.minimum(z[:-1], z[1:]))
    edge[:-1] |= jump
    edge[1:] |= jump
    jump = (
        valid[:, :-1]
        & valid[:, 1:]
        & (np.abs(z[:, :-1] - z[:, 1:]) > edge_jump * np.minimum(z[:, :-1], z[:, 1:]))
    )
    edge[:, :-1] |= jump
    edge[:, 1:] |= jump

    # Points relative to the mean valid point: the covariance does not change, and smaller
    # values keep the integral images' rounding far below the window variances.
    zc = float(z[valid].mean()) if valid.any() else 0.0
    x = np.where(valid, rx[None, :] * z, 0.0)
    y = np.where(valid, ry[:, None] * z, 0.0)
    xc = float(x[valid].mean()) if valid.any() else 0.0
    yc = float(y[valid].mean()) if valid.any() else 0.0
    px, py, pz = np.where(valid, x - xc, 0.0), np.where(valid, y - yc, 0.0), np.where(valid, z - zc, 0.0)
    channels = np.stack(
        [valid, edge, px, py, pz, px * px, py * py, pz * pz, px * py, px * pz, py * pz]
    ).astype(np.float64, copy=False)
    sums = _window_sums(channels, radius) if full else _window_sums(channels, radius, rows, cols)
    count, edges_near = sums[0], sums[1]
    # 0.5 slack: window sums of 0/1 images are integers up to rounding
    cand = valid[rows[:, None], cols[None, :]]
    cand &= (count >= min_valid * (2 * radius + 1) ** 2 - 0.5) & (edges_near < 0.5)
    idx = np.flatnonzero(cand)
    normals = np.zeros((cand.size, 3), dtype=np.float32)
    ok_all = np.zeros(cand.size, dtype=bool)
    if idx.size:
        flat = sums.reshape(len(sums), -1)[:, idx]
        n = flat[0]
        mx, my, mz = flat[2] / n, flat[3] / n, flat[4] / n
        vec, l0, l1, l2, ok = _smallest_eigenvectors(
            flat[5] / n - mx * mx,
            flat[6] / n - my * my,
            flat[7] / n - mz * mz,
            flat[8] / n - mx * my,
            flat[9] / n - mx * mz,
            flat[10] / n - my * mz,
        )
        l0 = np.maximum(l0, 0.0)
        total = l0 + l1 + l2
        ok &= (total > 0) & (l1 > 1e-6 * l2) & (l0 <= max_curvature * np.where(total > 0, total, 1.0))
        r_i, c_i = np.divmod(idx, len(cols))
        ray = np.stack([rx[cols[c_i]], ry[rows[r_i]], np.ones(idx.size)], axis=1)
        ray /= np.linalg.norm(ray, axis=1, keepdims=True)
        cos = np.einsum("ij,ij->i", vec, ray)
        vec = np.where((cos > 0)[:, None], -vec, vec)  # face the camera: dot(n, ray) < 0
        ok &= np.abs(cos) >= math.cos(math.radians(max_view_angle))
        normals[idx] = np.where(ok[:, None], vec, 0.0).astype(np.float32)
        ok_all[idx] = ok
    return normals.reshape(len(rows), len(cols), 3), ok_all.reshape(len(rows), len(cols))
