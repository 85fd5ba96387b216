"""Per-sample views (the released uint8 pipeline, ``pil_views``) against the batched views.

Given the same parameters, the two must differ only by the released pipeline's 8-bit
arithmetic. Each test switches on one step (the rest are identity parameters) and bounds the
per-pixel difference by what that arithmetic can cause, in 8-bit levels (1 level = 1/255 of the
[0, 1] range). Every bound is the sum of:

* 0.5: the input is rounded to uint8 before the first step;
* each uint8 result the step rounds or truncates, scaled by how the step amplifies an
  incoming error (a jitter factor f scales it by f);
* the step's own 8-bit quantities (PIL's integer gray levels and contrast mean, its HSV).

The bounds were checked against the measured worst case; they are far below what a wrong
formula, a wrong parameter or an off-by-one crop produces (tens of levels).
"""

import pytest
import torch

from mgm_fast import _native
from mgm_fast.data.augment import SimCLRAugment, identity_params, pil_views
from mgm_fast.ops.simclr_views import BRIGHTNESS, CONTRAST, HUE, SATURATION

LEVEL = 2.0 / 255.0  # one 8-bit level in the views' [-1, 1] range
EPS = 0.02  # float arithmetic on top of the 8-bit bounds, in levels
IMPLS = ["reference", pytest.param("cpp", marks=pytest.mark.skipif(
    _native.cpp_reason() is not None, reason="C++ extension not built"))]
SHAPES = [(6, 13, 17), (4, 32, 32)]


def _smooth_images(b, h, w, seed):
    """Natural-looking images: a coarse random grid upsampled, plus mild noise, in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(b, 3, 5, 5, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    x = x + 0.05 * torch.randn(b, 3, h, w, generator=g)
    return (x * 2 - 1).clamp(-1, 1)


def _params(b, h, w, seed, **changes):
    """Identity parameters with ``changes`` applied; each value is a function of a generator."""
    g = torch.Generator().manual_seed(seed + 100)
    p = identity_params(b, h, w)
    for key, make in changes.items():
        p[key] = make(g)
    return p


def _diff_levels(x, p, impl):
    batched = SimCLRAugment(impl=impl).apply(x, p)
    per_sample = pil_views(x, p)
    assert batched.shape == per_sample.shape
    return (batched - per_sample).abs() / LEVEL  # (B, 3, H, W)


def _crops(b, h, w):
    def make(g):
        ch = torch.randint(1, h + 1, (b,), generator=g)
        cw = torch.randint(1, w + 1, (b,), generator=g)
        top = (torch.rand(b, generator=g) * (h - ch + 1)).long()
        left = (torch.rand(b, generator=g) * (w - cw + 1)).long()
        return torch.stack((top, left, ch, cw), 1)

    return make


def _jitter(b, op, lo, hi):
    """Jitter every sample with only ``op`` active, its factor uniform in [lo, hi]."""

    def factors(g):
        f = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(b, 1)
        f[:, op] = lo + (hi - lo) * torch.rand(b, generator=g)
        return f

    return {"jitter": lambda g: torch.ones(b, dtype=torch.bool), "factors": factors,
            "order": lambda g: torch.tensor([op] + [o for o in range(4) if o != op]).repeat(b, 1)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,h,w", SHAPES)
def test_identity_and_flip_differ_by_input_rounding(impl, b, h, w):
    x = _smooth_images(b, h, w, seed=1)
    assert _diff_levels(x, identity_params(b, h, w), impl).max() <= 0.5 + EPS
    p = _params(b, h, w, 1, flip=lambda g: torch.ones(b, dtype=torch.bool))
    assert _diff_levels(x, p, impl).max() <= 0.5 + EPS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,h,w", SHAPES)
def test_crop_resize(impl, b, h, w):
    """PIL resizes in two passes with a uint8 image between them: 0.5 (input) + 0.5 + 0.5."""
    x = _smooth_images(b, h, w, seed=2)
    p = _params(b, h, w, 2, crop=_crops(b, h, w), flip=lambda g: torch.rand(b, generator=g) < 0.5)
    assert _diff_levels(x, p, impl).max() <= 1.5 + EPS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op,name", [(BRIGHTNESS, "brightness"), (CONTRAST, "contrast"),
                                     (SATURATION, "saturation")])
def test_blend_ops(impl, op, name):
    """ImageEnhance blends with a truncating uint8 result (< 1 level) after scaling the input's
    rounding by f; contrast adds PIL's rounded integer mean (0.5 |1 - f|), saturation its
    rounded gray level, itself off by up to 1 level (|1 - f|)."""
    b, h, w = 8, 15, 19
    x = _smooth_images(b, h, w, seed=3 + op)
    p = _params(b, h, w, 3 + op, **_jitter(b, op, 0.2, 1.8))
    f = p["factors"][:, op].view(b, 1, 1, 1)
    own = {BRIGHTNESS: 0.0, CONTRAST: 0.5, SATURATION: 1.0}[op] * (1 - f).abs()
    bound = 0.5 * f + 1.0 + own + EPS
    assert (_diff_levels(x, p, impl) <= bound).all(), name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("hue_range", [0.2, 0.5])
def test_hue(impl, hue_range):
    """PIL keeps H and S in 8 bits, truncated: H is off by < 1/255 turn, the shift int(f * 255)
    by < 1/255 turn, and a shift that wraps past 255 by another 1/255 turn (the byte wraps at
    256, the turn is 255 steps). A channel moves by 6 C per turn of hue (C the chroma), so up to
    18 C levels; plus S (< 1 level), the input (0.5) and the output rounding (0.5)."""
    b, h, w = 8, 13, 17
    x = _smooth_images(b, h, w, seed=4)
    p = _params(b, h, w, 4, **_jitter(b, HUE, -hue_range, hue_range))
    rgb = (x + 1) / 2
    chroma = (rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True)) * 255  # levels
    bound = 18 * (chroma + 1) / 255 + 2.0 + EPS
    assert (_diff_levels(x, p, impl) <= bound).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_grayscale(impl):
    """PIL's L: the input's rounding (0.5, a convex combination keeps it) + its own rounding."""
    b, h, w = 6, 13, 17
    x = _smooth_images(b, h, w, seed=5)
    p = _params(b, h, w, 5, gray=lambda g: torch.ones(b, dtype=torch.bool))
    assert _diff_levels(x, p, impl).max() <= 1.0 + EPS


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("b,h,w", SHAPES)
def test_blur(impl, b, h, w):
    """Reflect-101 borders in both; a normalised kernel keeps the input's 0.5, then one rounding."""
    x = _smooth_images(b, h, w, seed=6)
    p = _params(b, h, w, 6, blur=lambda g: torch.ones(b, dtype=torch.bool),
                sigma=lambda g: 0.01 + 1.99 * torch.rand(b, generator=g))
    assert _diff_levels(x, p, impl).max() <= 1.0 + EPS


@pytest.mark.parametrize("impl", IMPLS)
def test_whole_pipeline(impl):
    """All steps with the default random parameters: the per-step errors compound through the
    jitter factors, so this bounds the mean (a broken step moves it by many levels) and the
    worst pixel by the hue bound plus the other steps' bounds scaled by the largest factors."""
    b, h, w = 32, 24, 24
    x = _smooth_images(b, h, w, seed=7)
    aug = SimCLRAugment(impl=impl)
    p = aug.sample_params(b, h, w, torch.Generator().manual_seed(7))
    d = _diff_levels(x, p, impl)
    assert d.mean() <= 1.5
    assert d.max() <= 30


def test_output_smaller_than_crop_is_antialiased_only_per_sample():
    """The one documented semantic difference: PIL antialiases a downscaling resize, the batched
    path does not; so a large crop to a small output differs by more than rounding."""
    b, h, w = 4, 32, 32
    x = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(8)) * 2 - 1  # detailed
    p = identity_params(b, h, w)
    per_sample = pil_views(x, p, out_size=(8, 8))
    batched = SimCLRAugment(out_size=8, impl="reference").apply(x, p)
    assert (per_sample - batched).abs().max() / LEVEL > 10
