"""Batched SimCLR views (mgm_fast.data.augment) against the per-sample reference twin."""

import colorsys
import math
import random

import pytest
import torch

from mgm_fast import _native
from mgm_fast.data.augment import SimCLRAugment, identity_params
from mgm_fast.ops.simclr_views import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    PARAM_KEYS,
    SATURATION,
    clear_workspace,
    gaussian_kernel1d,
    hsv_to_rgb,
    params_for_sample,
    rgb_to_hsv,
)
from mgm_fast.ops.simclr_views import view_reference as augment_reference

MODES = ("index", "where", "cpp")
"""Paths of SimCLRAugment.apply: the torch path (impl="reference") with either select mode, and
the fused C++ kernel (impl="cpp", skipped when the extension is not built)."""
HAS_CPP = _native.cpp_reason() is None
AVAILABLE_MODES = tuple(m for m in MODES if m != "cpp" or HAS_CPP)
MODE_PARAMS = [
    "index",
    "where",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")),
]


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 3, h, w), generator=g) * 2 - 1  # never constant images


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _aug(mode, **kwargs):
    """SimCLRAugment on the path ``mode`` (one of MODES)."""
    return SimCLRAugment(impl="cpp" if mode == "cpp" else "reference", **kwargs)


def _select(mode):
    return "auto" if mode == "cpp" else mode


def _check_twin(aug, x, params, mode, atol):
    out = aug.apply(x, params, select=_select(mode))
    assert out.shape[0] == x.shape[0] and out.dtype == x.dtype
    for n in range(x.shape[0]):
        ref = aug.reference(x[n], params_for_sample(params, n))
        torch.testing.assert_close(out[n], ref, atol=atol, rtol=0, msg=f"sample {n} ({mode})")
    return out


def _only(params, batch, height, width, **keep):
    """Identity parameters except the given keys, taken from ``params``."""
    p = identity_params(batch, height, width)
    for key, value in keep.items():
        p[key] = params[key] if value is True else value
    return p


# -- determinism, shapes -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_same_seed_same_views_and_different_seeds_differ(mode):
    aug = _aug(mode)
    x = _images(6, 32, 32)
    a1, a2 = aug.two_views(x, _gen(5), select=_select(mode))
    b1, b2 = aug.two_views(x, _gen(5), select=_select(mode))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    c1, c2 = aug.two_views(x, _gen(6), select=_select(mode))
    assert not torch.equal(a1, c1) and not torch.equal(a2, c2)
    assert not torch.equal(a1, a2)  # the two views of an image are independent


def test_two_views_params_reproducible_and_batch_independent():
    aug = SimCLRAugment()
    x = _images(4, 20, 28)
    v1, v2, p1, p2 = aug.two_views(x, _gen(1), return_params=True)
    g = _gen(1)
    q1, q2 = aug.sample_params(4, 20, 28, g), aug.sample_params(4, 20, 28, g)
    for key in PARAM_KEYS:
        assert torch.equal(p1[key], q1[key]) and torch.equal(p2[key], q2[key])
    torch.testing.assert_close(v1, aug.apply(x, p1), atol=1e-6, rtol=0)
    torch.testing.assert_close(v2, aug.apply(x, p2), atol=1e-6, rtol=0)
    big = aug.sample_params(9, 20, 28, _gen(1))
    for key in PARAM_KEYS:  # a sample's parameters do not depend on the batch size
        assert torch.equal(big[key][:4], p1[key])


@pytest.mark.parametrize(
    ("b", "h", "w", "out_size", "expect"),
    [
        (5, 24, 40, None, (24, 40)),
        (1, 17, 9, None, (17, 9)),
        (3, 32, 32, 16, (16, 16)),
        (2, 30, 20, (12, 44), (12, 44)),
    ],
)
@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_shape_range_and_odd_sizes(b, h, w, out_size, expect, mode):
    aug = _aug(mode, out_size=out_size)
    x = _images(b, h, w)
    v1, v2 = aug.two_views(x, _gen(0), select=_select(mode))
    for v in (v1, v2):
        assert v.shape == (b, 3, *expect) and v.dtype == torch.float32
        assert v.is_contiguous() and torch.isfinite(v).all()
        assert v.min() >= -1 and v.max() <= 1
    p = aug.sample_params(b, h, w, _gen(3))
    _check_twin(aug, x, p, mode, atol=2e-5)


def test_dtype_preserved():
    aug = SimCLRAugment()
    x = _images(3, 16, 16).double()
    assert aug(x, _gen(0)).dtype == torch.float64


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_identity_params_return_input(mode):
    aug = _aug(mode)
    x = _images(4, 19, 26)
    out = aug.apply(x, identity_params(4, 19, 26), select=_select(mode))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


def test_outputs_are_fresh_tensors():
    # scratch buffers are reused between calls; returned views must never alias them
    aug = SimCLRAugment()
    x = _images(4, 24, 24)
    v1, v2 = aug.two_views(x, _gen(0))
    keep = v1.clone(), v2.clone()
    aug.two_views(_images(4, 24, 24, seed=1), _gen(1))
    aug.two_views(_images(8, 24, 24, seed=2), _gen(2))
    assert torch.equal(v1, keep[0]) and torch.equal(v2, keep[1])
    clear_workspace()
    torch.testing.assert_close(aug.two_views(x, _gen(0))[0], keep[0], atol=0, rtol=0)


# -- each transform against the reference ---------------------------------------------------------
@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("shape", [(12, 3, 23, 31), (1, 3, 16, 16)])
def test_crop_resize_flip_matches_interpolate(mode, shape):
    b, _, h, w = shape
    x = _images(*[b, h, w])
    for out_size in (None, (h + 5, w - 3), (8, 8)):
        aug = _aug(mode, out_size=out_size)
        p = aug.sample_params(b, h, w, _gen(11))
        p["flip"] = torch.arange(b) % 2 == 0
        _check_twin(aug, x, _only(p, b, h, w, crop=True, flip=True), mode, atol=1e-5)


def test_crop_edge_cases():
    aug = SimCLRAugment()
    x = _images(4, 10, 12)
    crops = torch.tensor([[0, 0, 1, 1], [9, 11, 1, 1], [0, 0, 10, 12], [3, 2, 7, 1]])
    p = _only({}, 4, 10, 12, crop=crops, flip=torch.tensor([True, False, True, True]))
    out = _check_twin(aug, x, p, "index", atol=1e-5)
    assert torch.equal(out[0], x[0, :, :1, :1].expand(3, 10, 12).clamp(-1, 1)) or torch.allclose(
        out[0], x[0, :, :1, :1].expand(3, 10, 12), atol=1e-6
    )
    torch.testing.assert_close(out[2], x[2].flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
def test_single_jitter_op_matches_reference(mode, op):
    b, h, w = 16, 21, 18
    x = _images(b, h, w, seed=op)
    aug = _aug(mode, hue=0.5)
    p = aug.sample_params(b, h, w, _gen(op))
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(b, 1)
    factors[:, op] = p["factors"][:, op]
    order = torch.tensor([op, *[k for k in range(4) if k != op]]).repeat(b, 1)
    jitter = torch.ones(b, dtype=torch.bool)
    jitter[0] = False
    q = _only(p, b, h, w, jitter=jitter, order=order, factors=factors)
    out = _check_twin(aug, x, q, mode, atol=1e-5)
    assert not torch.allclose(out[1:], x[1:], atol=1e-3)  # the op did something
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_jitter_in_random_order_matches_reference(mode):
    b, h, w = 48, 15, 22
    x = _images(b, h, w, seed=3)
    aug = _aug(mode, jitter_p=0.9)
    p = aug.sample_params(b, h, w, _gen(4))
    assert len({tuple(o) for o in p["order"].tolist()}) > 10  # many different orders
    _check_twin(aug, x, _only(p, b, h, w, jitter=True, order=True, factors=True), mode, atol=1e-5)


def test_extreme_jitter_factors_and_hue_zero():
    b, h, w = 6, 9, 9
    x = _images(b, h, w, seed=8)
    factors = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.5],
            [1.8, 1.8, 1.8, -0.5],
            [5.0, 0.2, 3.0, 0.25],
            [1.0, 1.0, 1.0, 0.0],
            [0.2, 4.0, 0.0, -0.2],
            [1, 1, 1, 1e-7],
        ]
    )
    order = torch.stack([torch.randperm(4, generator=_gen(k)) for k in range(b)])
    p = _only({}, b, h, w, jitter=torch.ones(b, dtype=torch.bool), order=order, factors=factors)
    for mode in AVAILABLE_MODES:
        _check_twin(_aug(mode), x, p, mode, atol=1e-5)


def test_hue_on_known_colours():
    # pure colours in HSV: red (h 0) rotated by 1/3 turn is green, by 2/3 blue; grays stay gray
    colours = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.0, 0.0, 0.0], [0.2, 0.4, 0.8], [1.0, 0.0, 1.0]]
    )
    x = (colours.T.reshape(1, 3, 1, 6).expand(3, 3, 2, 6) * 2 - 1).contiguous()
    shifts = [1 / 3, 2 / 3 - 1, 0.25]
    p = _only({}, 3, 2, 6, jitter=torch.ones(3, dtype=torch.bool), order=torch.tensor([[3, 0, 1, 2]] * 3))
    p["factors"] = torch.tensor([[1.0, 1.0, 1.0, s] for s in shifts])
    for mode in AVAILABLE_MODES:
        out = (_aug(mode).apply(x, p, select=_select(mode)) + 1) / 2
        for n, s in enumerate(shifts):
            for k, rgb in enumerate(colours.tolist()):
                hh, ss, vv = colorsys.rgb_to_hsv(*rgb)
                want = colorsys.hsv_to_rgb((hh + s) % 1.0, ss, vv)
                torch.testing.assert_close(out[n, :, 0, k], torch.tensor(want), atol=1e-6, rtol=0)


def test_reference_hsv_against_colorsys():
    g = _gen(0)
    rgb = torch.rand((3, 7, 9), generator=g)
    rgb[:, 0, 0] = 0.3  # a gray
    rgb[0, 1, 1] = rgb[2, 1, 1]  # ties
    rgb[1, 1, 2] = rgb[0, 1, 2] = 0.9
    hsv = rgb_to_hsv(rgb)
    for i in range(7):
        for j in range(9):
            want = colorsys.rgb_to_hsv(*rgb[:, i, j].tolist())
            got = hsv[:, i, j].tolist()
            assert math.isclose(got[1], want[1], abs_tol=1e-6) and math.isclose(got[2], want[2], abs_tol=1e-6)
            assert min(abs(got[0] - want[0]), 1 - abs(got[0] - want[0])) < 1e-6
    torch.testing.assert_close(hsv_to_rgb(hsv), rgb, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODE_PARAMS)
def test_grayscale_matches_reference(mode):
    b, h, w = 10, 13, 17
    x = _images(b, h, w, seed=5)
    aug = _aug(mode)
    gray = torch.tensor([True, False] * 5)
    out = _check_twin(aug, x, _only({}, b, h, w, gray=gray), mode, atol=1e-5)
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]  # affine in [-1, 1] too
    torch.testing.assert_close(out[gray], luma[gray].unsqueeze(1).expand(-1, 3, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[~gray], x[~gray], atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize(
    ("kernel", "sigma"), [(3, (0.01, 1.0)), (5, (0.1, 2.0)), (13, (0.1, 2.0)), (1, (0.5, 1.0))]
)
def test_blur_matches_conv2d(mode, kernel, sigma):
    b, h, w = 8, 20, 15
    x = _images(b, h, w, seed=kernel)
    aug = _aug(mode, blur_kernel=kernel, blur_sigma=sigma)
    p = aug.sample_params(b, h, w, _gen(kernel))
    blur = torch.ones(b, dtype=torch.bool)
    blur[3] = False
    out = _check_twin(aug, x, _only(p, b, h, w, blur=blur, sigma=True), mode, atol=2e-6)
    torch.testing.assert_close(out[3], x[3], atol=1e-6, rtol=0)


def test_gaussian_kernel_matches_formula():
    k = gaussian_kernel1d(torch.tensor([0.5, 1.0, 0.01]), 5).double()
    for row, s in zip(k, (0.5, 1.0, 0.01)):
        e = torch.tensor([math.exp(-(t * t) / (2 * s * s)) for t in range(-2, 3)], dtype=torch.float64)
        torch.testing.assert_close(row, e / e.sum(), atol=1e-7, rtol=0)
    assert k[2].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0]


@pytest.mark.parametrize("mode", MODE_PARAMS)
@pytest.mark.parametrize(("b", "h", "w"), [(24, 32, 32), (7, 19, 33), (1, 8, 8)])
def test_full_pipeline_matches_reference(mode, b, h, w):
    x = _images(b, h, w, seed=b)
    aug = _aug(mode)
    p = aug.sample_params(b, h, w, _gen(b + 1))
    _check_twin(aug, x, p, mode, atol=2e-5)


def test_modes_agree():
    x = _images(32, 24, 24, seed=9)
    aug = SimCLRAugment(impl="reference")
    p = aug.sample_params(32, 24, 24, _gen(9))
    index = aug.apply(x, p, select="index")
    torch.testing.assert_close(index, aug.apply(x, p, select="where"), atol=1e-6, rtol=0)
    if HAS_CPP:
        torch.testing.assert_close(SimCLRAugment(impl="cpp").apply(x, p), index, atol=1e-5, rtol=0)


# -- parameter distributions ----------------------------------------------------------------------
def _binomial_ok(flags, p, n):
    count = int(flags.sum())
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1


def _torchvision_style_area(h, w, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Plain-Python RandomResizedCrop sampling (independent of the vectorised draw)."""
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if 0 < cw <= w and 0 < ch <= h:
            return ch * cw / (h * w)
    return 1.0


def test_parameter_distributions():
    n, h, w = 4000, 96, 128
    aug = SimCLRAugment()
    p = aug.sample_params(n, h, w, _gen(123))
    assert _binomial_ok(p["flip"], 0.5, n)
    assert _binomial_ok(p["jitter"], 0.8, n)
    assert _binomial_ok(p["gray"], 0.2, n)
    assert _binomial_ok(p["blur"], 0.5, n)
    top, left, ch, cw = p["crop"].T
    assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
    # areas within the scale bounds up to the rounding of width and height to pixels
    lo = ((ch - 0.5).clamp_min(0) * (cw - 0.5).clamp_min(0)) / (h * w)
    hi = ((ch + 0.5) * (cw + 0.5)) / (h * w)
    assert (hi >= 0.08).all() and (lo <= 1.0).all()
    ratio_lo, ratio_hi = (cw - 0.5) / (ch + 0.5), (cw + 0.5) / (ch - 0.5).clamp_min(0.5)
    assert (ratio_hi >= 3 / 4).all() and (ratio_lo <= 4 / 3).all()
    area = (ch * cw).double() / (h * w)
    rng = random.Random(0)
    expected = sum(_torchvision_style_area(h, w, rng) for _ in range(20000)) / 20000
    assert abs(area.mean().item() - expected) < 0.015, (area.mean().item(), expected)
    assert 0.3 < expected < 0.6
    # the offset is uniform: the crop centre averages to the image centre
    assert abs((top + ch / 2).double().mean().item() - h / 2) < 1.5
    assert abs((left + cw / 2).double().mean().item() - w / 2) < 1.5
    f = p["factors"]
    for k, (a, b) in enumerate([(0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2)]):
        assert f[:, k].min() >= a and f[:, k].max() <= b
        assert abs(f[:, k].mean().item() - (a + b) / 2) < 0.03
    assert (p["sigma"] >= 0.01).all() and (p["sigma"] <= 1.0).all()
    assert abs(p["sigma"].mean().item() - 0.505) < 0.02
    assert (p["order"].sort(1).values == torch.arange(4)).all()
    first = torch.bincount(p["order"][:, 0], minlength=4)
    assert all(_binomial_ok(p["order"][:, 0] == k, 0.25, n) for k in range(4)), first


def test_crop_fallback_is_clamped_centre_crop():
    aug = SimCLRAugment(crop_scale=(0.9, 1.0))
    p = aug.sample_params(50, 10, 40, _gen(0))  # no 10-attempt draw fits a 10 x 40 image
    assert (p["crop"] == torch.tensor([0, 13, 10, 13])).all()  # h = 10, w = round(10 * 4/3)
    tall = aug.sample_params(5, 40, 10, _gen(0))
    assert (tall["crop"] == torch.tensor([13, 0, 13, 10])).all()  # w = 10, h = round(10 / (3/4))


def test_disabled_ops_and_probabilities():
    aug = SimCLRAugment(flip_p=0, jitter_p=0, gray_p=0, blur_p=0, crop_scale=(1, 1), crop_ratio=(1, 1))
    x = _images(5, 16, 16)
    torch.testing.assert_close(aug(x, _gen(0)), x, atol=1e-6, rtol=0)
    always = SimCLRAugment(flip_p=1, jitter_p=1, gray_p=1, blur_p=1)
    p = always.sample_params(100, 16, 16, _gen(0))
    assert p["flip"].all() and p["jitter"].all() and p["gray"].all() and p["blur"].all()
    fixed = SimCLRAugment(brightness=0, contrast=(0.5, 0.5), saturation=0, hue=0)
    f = fixed.sample_params(10, 8, 8, _gen(0))["factors"]
    assert (f == torch.tensor([1.0, 0.5, 1.0, 0.0])).all()


# -- errors ---------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    aug = SimCLRAugment()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.rand(2, 4, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        aug(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    x = _images(2, 8, 8)
    p = aug.sample_params(2, 8, 8, _gen(0))
    with pytest.raises(ValueError, match="missing keys"):
        aug.apply(x, {k: v for k, v in p.items() if k != "sigma"})
    with pytest.raises(ValueError, match=r"params\['crop'\]: expected shape \(2, 4\)"):
        aug.apply(x, {**p, "crop": p["crop"][:1]})
    bad = {**p, "crop": torch.tensor([[0, 0, 8, 8], [4, 4, 5, 2]])}
    with pytest.raises(ValueError, match=r"crop'\]\[1\].*not inside a 8x8 image"):
        aug.apply(x, bad)
    with pytest.raises(ValueError, match="select"):
        aug.apply(x, p, select="fast")
    with pytest.raises(ValueError, match="blur_kernel 17"):
        SimCLRAugment(blur_kernel=17).apply(x, p)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.5, 0.4)},
        {"crop_ratio": (2.0, 1.0)},
        {"flip_p": 1.5},
        {"hue": 0.6},
        {"brightness": -0.1},
        {"blur_kernel": 4},
        {"blur_sigma": (0.0, 1.0)},
        {"out_size": (0, 4)},
    ],
)
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        SimCLRAugment(**kwargs)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    aug = SimCLRAugment()
    x = _images(16, 32, 32)
    p = aug.sample_params(16, 32, 32, _gen(0))
    cpu = aug.apply(x, p)
    gpu = aug.apply(x.cuda(), {k: v.cuda() for k, v in p.items()})
    torch.testing.assert_close(gpu.cpu(), cpu, atol=2e-5, rtol=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    v1, _ = aug.two_views(x.cuda(), g)
    assert v1.is_cuda and v1.shape == x.shape
    ref = [augment_reference(x[n], params_for_sample(p, n)) for n in range(16)]
    torch.testing.assert_close(gpu.cpu(), torch.stack(ref), atol=2e-5, rtol=0)
