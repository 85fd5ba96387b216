"""mgm_fast.ops.simclr_views: the fused C++ kernel against the batched torch path (reference
backend, both select modes) and the per-sample twin ``augment_reference``.

Random images and parameters; batch 1 and 5, non-square and odd sizes, outputs larger and
smaller than the input, every op on its own and all together, many jitter orders, blur kernels
3 and 5, extreme parameters (one-pixel crops at the borders, flips, hue +-0.5, zero factors,
grayscale, tiny and large sigma), strided inputs, thread-count independence, dispatch and errors.
"""

from __future__ import annotations

import pytest
import torch

from mgm_fast import _native
from mgm_fast.data.augment import SimCLRAugment, identity_params
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops.simclr_views import (
    BRIGHTNESS,
    CONTRAST,
    HUE,
    PARAM_KEYS,
    SATURATION,
    params_for_sample,
    simclr_views,
)
from mgm_fast.ops.simclr_views import view_reference as augment_reference

OP = REGISTRY["simclr_views"]
HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
ATOL = 1e-5  # cpp vs the batched torch path: same float32 formulas, rounding differences only
TWIN_ATOL = 2e-5  # vs the per-sample twin (F.interpolate, textbook HSV), as in test_augment.py


def _images(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((b, 3, h, w), generator=g) * 2 - 1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _two_view_params(aug, b, h, w, seed):
    """Parameters of two views per image (as SimCLRAugment.two_views draws them) and src_index."""
    g = _gen(seed)
    p1, p2 = aug.sample_params(b, h, w, g), aug.sample_params(b, h, w, g)
    return {k: torch.cat((p1[k], p2[k])) for k in PARAM_KEYS}, torch.arange(b).repeat(2)


def _only(batch, h, w, **keep):
    """Identity parameters for ``batch`` views except the given entries."""
    p = identity_params(batch, h, w)
    p.update(keep)
    return p


def _check(x, params, src, out_hw, kernel=3, twin=True):
    """cpp == reference ("index" and "where") within ATOL, and == the twin per view."""
    out = simclr_views(x, params, src, out_hw, kernel, impl="cpp")
    n = src.shape[0]
    assert out.shape == (n, 3, *out_hw) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.isfinite(out).all() and out.min() >= -1 and out.max() <= 1
    for select in ("index", "where"):
        ref = simclr_views(x, params, src, out_hw, kernel, select=select, impl="reference")
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0, msg=f"cpp vs reference ({select})")
    if twin:
        for k in range(n):
            want = augment_reference(x[int(src[k])], params_for_sample(params, k), out_hw, kernel)
            torch.testing.assert_close(out[k], want, atol=TWIN_ATOL, rtol=0, msg=f"view {k} vs twin")
    return out


# -- full pipeline on random parameters ------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize(
    ("b", "h", "w", "out_hw"),
    [
        (1, 16, 16, (16, 16)),
        (5, 23, 31, (23, 31)),  # odd, non-square
        (5, 17, 9, (12, 20)),  # output larger in one side, smaller in the other
        (3, 32, 32, (16, 16)),  # downsampling
        (2, 30, 20, (12, 44)),
        (1, 9, 40, (9, 40)),
    ],
)
@pytest.mark.parametrize("kernel", [3, 5])
def test_random_views_match_reference(b, h, w, out_hw, kernel):
    aug = SimCLRAugment(out_size=out_hw, blur_kernel=kernel, blur_sigma=(0.1, 2.0))
    x = _images(b, h, w, seed=b * h + w)
    params, src = _two_view_params(aug, b, h, w, seed=kernel)
    _check(x, params, src, out_hw, kernel)


@needs_cpp
def test_everything_on_with_many_jitter_orders():
    b, h, w = 48, 21, 18
    aug = SimCLRAugment(jitter_p=1, gray_p=0.3, blur_p=0.7, hue=0.5)
    x = _images(b, h, w, seed=1)
    params = aug.sample_params(b, h, w, _gen(2))
    assert len({tuple(o) for o in params["order"].tolist()}) > 12  # many different orders
    _check(x, params, torch.arange(b), (h, w))


# -- each op on its own ---------------------------------------------------------------------------
@needs_cpp
@pytest.mark.parametrize("out_hw", [(19, 26), (11, 33)])
def test_crop_resize_flip_only(out_hw):
    b, h, w = 5, 19, 26
    x = _images(b, h, w, seed=3)
    p = SimCLRAugment().sample_params(b, h, w, _gen(3))
    flip = torch.tensor([True, False, True, True, False])
    _check(x, _only(b, h, w, crop=p["crop"], flip=flip), torch.arange(b), out_hw)


@needs_cpp
@pytest.mark.parametrize("op", [BRIGHTNESS, CONTRAST, SATURATION, HUE])
def test_single_jitter_op(op):
    b, h, w = 5, 15, 22
    x = _images(b, h, w, seed=op)
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(b, 1)
    factors[:, op] = (
        torch.tensor([0.0, 0.3, 1.7, 4.0, 0.9]) if op != HUE else torch.tensor([0.5, -0.5, 0.2, -0.13, 1e-6])
    )
    order = torch.tensor([op, *[k for k in range(4) if k != op]]).repeat(b, 1)
    jitter = torch.tensor([True, True, True, True, False]) if op != HUE else torch.ones(b, dtype=torch.bool)
    out = _check(x, _only(b, h, w, jitter=jitter, order=order, factors=factors), torch.arange(b), (h, w))
    assert not torch.allclose(out[:3], x[:3], atol=1e-3)  # the op did something
    if op != HUE:
        torch.testing.assert_close(out[4], x[4], atol=1e-6, rtol=0)  # jitter off: identity


@needs_cpp
def test_grayscale_only():
    b, h, w = 4, 13, 17
    x = _images(b, h, w, seed=5)
    gray = torch.tensor([True, False, True, True])
    out = _check(x, _only(b, h, w, gray=gray), torch.arange(b), (h, w))
    assert torch.equal(out[0, 0], out[0, 1]) and torch.equal(out[0, 1], out[0, 2])


@needs_cpp
@pytest.mark.parametrize("kernel", [3, 5, 7])
def test_blur_only(kernel):
    b, h, w = 5, 20, 15
    x = _images(b, h, w, seed=kernel)
    sigma = torch.tensor([0.01, 0.5, 1.0, 2.0, 5.0])
    blur = torch.tensor([True, True, True, True, False])
    out = _check(x, _only(b, h, w, blur=blur, sigma=sigma), torch.arange(b), (h, w), kernel)
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)  # sigma 0.01: identity taps
    torch.testing.assert_close(out[4], x[4], atol=1e-6, rtol=0)


# -- extreme parameters ---------------------------------------------------------------------------
@needs_cpp
def test_extreme_crops_at_the_borders():
    b, h, w = 8, 10, 12
    x = _images(b, h, w, seed=8)
    crop = torch.tensor(
        [
            [0, 0, 1, 1],  # top-left pixel
            [9, 11, 1, 1],  # bottom-right pixel
            [0, 10, 2, 2],  # top-right corner
            [8, 0, 2, 12],  # the last two rows
            [0, 11, 10, 1],  # the last column
            [0, 0, 10, 12],  # the whole image
            [0, 0, 10, 12],  # the whole image, flipped
            [9, 0, 1, 12],
        ]
    )
    flip = torch.arange(b) % 2 == 0
    out = _check(x, _only(b, h, w, crop=crop, flip=flip), torch.arange(b), (h, w))
    torch.testing.assert_close(out[0], x[0, :, :1, :1].expand(3, h, w), atol=1e-6, rtol=0)
    torch.testing.assert_close(out[5], x[5], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[6], x[6].flip(-1), atol=1e-6, rtol=0)
    for out_hw in [(5, 7), (16, 3)]:
        _check(x, _only(b, h, w, crop=crop, flip=flip), torch.arange(b), out_hw)


@needs_cpp
def test_extreme_jitter_factors():
    b, h, w = 7, 9, 11
    x = _images(b, h, w, seed=9)
    factors = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.5],
            [1.8, 1.8, 1.8, -0.5],
            [5.0, 0.2, 3.0, 0.25],
            [1.0, 1.0, 1.0, 0.0],
            [0.2, 4.0, 0.0, -0.2],
            [1.0, 1.0, 1.0, 1e-7],
            [3.0, 0.0, 5.0, 0.499],
        ]
    )
    order = torch.stack([torch.randperm(4, generator=_gen(k)) for k in range(b)])
    gray = torch.tensor([False, True, False, True, False, False, True])
    p = _only(b, h, w, jitter=torch.ones(b, dtype=torch.bool), order=order, factors=factors, gray=gray)
    _check(x, p, torch.arange(b), (h, w))


@needs_cpp
def test_saturated_and_gray_images():
    # flat images (grays, black, white) and pure colours: hue ties, zero chroma, clamps at 0 and 1
    colours = torch.tensor([[0.3, 0.3, 0.3], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 1], [1, 1, 0]])
    x = (colours[:, :, None, None].expand(-1, -1, 6, 5) * 2 - 1).contiguous()
    b = x.shape[0]
    aug = SimCLRAugment(jitter_p=1, hue=0.5, gray_p=0.5, blur_p=0.5)
    p = aug.sample_params(b, 6, 5, _gen(4))
    _check(x, p, torch.arange(b), (6, 5))


# -- layout, indexing, threads --------------------------------------------------------------------
@needs_cpp
def test_strided_inputs_and_arbitrary_src_index():
    b, h, w = 4, 14, 18
    base = _images(b, h, w, seed=11)
    aug = SimCLRAugment()
    src = torch.tensor([3, 0, 3, 1, 2, 2, 0])
    p = aug.sample_params(src.shape[0], h, w, _gen(12))
    want = simclr_views(base, p, src, (h, w), impl="reference")
    channels_last = base.contiguous(memory_format=torch.channels_last)
    every_other_column = torch.zeros(b, 3, h, 2 * w)[..., ::2]
    every_other_column.copy_(base)
    for x in (base, channels_last, every_other_column, base.transpose(2, 3).contiguous().transpose(2, 3)):
        got = simclr_views(x, p, src, (h, w), impl="cpp")
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@needs_cpp
def test_bit_identical_for_any_thread_count():
    b, h, w = 6, 24, 24
    aug = SimCLRAugment(blur_p=0.7)
    x = _images(b, h, w, seed=13)
    params, src = _two_view_params(aug, b, h, w, seed=13)
    threads = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(simclr_views(x, params, src, (h, w), impl="cpp"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@needs_cpp
def test_simclr_augment_goes_through_the_op():
    b, h, w = 5, 20, 24
    x = _images(b, h, w, seed=14)
    fast, ref = SimCLRAugment(impl="cpp"), SimCLRAugment(impl="reference")
    v1, v2, p1, _ = fast.two_views(x, _gen(15), return_params=True)
    r1, r2 = ref.two_views(x, _gen(15))
    torch.testing.assert_close(v1, r1, atol=ATOL, rtol=0)
    torch.testing.assert_close(v2, r2, atol=ATOL, rtol=0)
    torch.testing.assert_close(SimCLRAugment().apply(x, p1), v1, atol=0, rtol=0)  # auto = cpp
    assert v1.is_contiguous() and v2.is_contiguous()
    keep = v1.clone()
    fast.two_views(_images(b, h, w, seed=16), _gen(16))
    assert torch.equal(v1, keep)  # outputs are fresh tensors


# -- dispatch -------------------------------------------------------------------------------------
@needs_cpp
def test_auto_picks_cpp_for_cpu_float32():
    x = _images(2, 8, 8)
    p = identity_params(2, 8, 8)
    assert OP.select("auto", x, p, torch.arange(2), (8, 8), 3).name == "cpp"


def test_auto_picks_reference_for_other_dtypes_and_grad():
    p = identity_params(2, 8, 8)
    src = torch.arange(2)
    x64 = _images(2, 8, 8).double()
    assert OP.select("auto", x64, p, src, (8, 8), 3).name == "reference"
    out = simclr_views(x64, p, src, (8, 8))
    assert out.dtype == torch.float64
    xg = _images(2, 8, 8).requires_grad_(True)
    assert OP.select("auto", xg, p, src, (8, 8), 3).name == "reference"
    if HAS_CPP:
        with pytest.raises(BackendUnavailable, match="dtype"):
            simclr_views(x64, p, src, (8, 8), impl="cpp")
        with pytest.raises(BackendUnavailable, match="requires grad"):
            simclr_views(xg, p, src, (8, 8), impl="cpp")


def test_forced_cpp_without_extension_raises(monkeypatch):
    cpp = OP.backends["cpp"]
    monkeypatch.setattr(cpp, "availability", lambda: "mgm_fast._C is not importable (test)")
    x = _images(2, 8, 8)
    p = identity_params(2, 8, 8)
    assert OP.select("auto", x, p, torch.arange(2), (8, 8), 3).name == "reference"
    with pytest.raises(BackendUnavailable, match=r"not importable \(test\)"):
        simclr_views(x, p, torch.arange(2), (8, 8), impl="cpp")
    with pytest.raises(BackendUnavailable, match=r"not importable \(test\)"):
        SimCLRAugment(impl="cpp").two_views(x, _gen(0))
    torch.testing.assert_close(SimCLRAugment().apply(x, p), x, atol=1e-6, rtol=0)  # auto: reference
    assert OP.status()["cpp"] == "mgm_fast._C is not importable (test)"


def test_backends_listed():
    status = OP.status()
    assert status["reference"] is None
    assert status["cuda"] == status["triton"] == "not implemented for this op"
    assert (status["cpp"] is None) == HAS_CPP


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["reference", pytest.param("cpp", marks=needs_cpp)])
def test_bad_inputs_raise_value_errors(impl):
    x = _images(2, 8, 8)
    p = identity_params(2, 8, 8)
    src = torch.arange(2)
    bad = {**p, "crop": torch.tensor([[0, 0, 8, 8], [4, 4, 5, 2]])}
    with pytest.raises(ValueError, match=r"crop'\]\[1\].*not inside a 8x8 image"):
        simclr_views(x, bad, src, (8, 8), impl=impl)
    with pytest.raises(ValueError, match="blur_kernel 17"):
        simclr_views(x, p, src, (8, 8), 17, impl=impl)
    with pytest.raises(ValueError, match="src_index"):
        simclr_views(x, p, torch.tensor([0, 2]), (8, 8), impl=impl)
    with pytest.raises(ValueError, match="src_index"):
        simclr_views(x, p, torch.arange(2).int(), (8, 8), impl=impl)
    with pytest.raises(ValueError, match=r"params\['sigma'\]: expected shape \(2,\)"):
        simclr_views(x, {**p, "sigma": torch.ones(3)}, src, (8, 8), impl=impl)
    with pytest.raises(ValueError, match="out_hw"):
        simclr_views(x, p, src, (0, 8), impl=impl)
    with pytest.raises(ValueError, match="select"):
        simclr_views(x, p, src, (8, 8), select="fast", impl=impl)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        simclr_views(x[:, :2], p, src, (8, 8), impl=impl)


@needs_cpp
def test_cpp_rejects_bad_op_codes_and_devices():
    x = _images(2, 8, 8)
    p = identity_params(2, 8, 8)
    with pytest.raises(ValueError, match=r"order'\]\[1\] = \[0, 1, 2, 4\]"):
        simclr_views(
            x, {**p, "order": torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]])}, torch.arange(2), (8, 8), impl="cpp"
        )
    ext = _native.extension()
    args = [p[k] for k in ("crop", "flip", "jitter", "order", "factors", "gray", "blur", "sigma")]
    with pytest.raises(TypeError, match=r"params\['flip'\] must be Bool"):
        ext.simclr_views_cpu(x, args[0], args[1].float(), *args[2:], torch.arange(2), 8, 8, 3)
    with pytest.raises(ValueError, match=r"params\['crop'\] must have shape \(2, 4\)"):
        ext.simclr_views_cpu(x, args[0][:, :3], *args[1:], torch.arange(2), 8, 8, 3)
    with pytest.raises(TypeError, match="x must be float32"):
        ext.simclr_views_cpu(x.double(), *args, torch.arange(2), 8, 8, 3)


def test_bad_impl_name():
    with pytest.raises(ValueError, match="impl"):
        SimCLRAugment(impl="fast")
