"""GAN losses of MGM as fused ops: hinge losses and instance noise.

* ``hinge_d_loss(d_real, d_fake, *, impl="auto")`` -- mean ReLU(1 - D(real)) + mean
  ReLU(1 + D(fake)), 0-dim float32 (reference: :func:`mgm_fast.losses.hinge_d`).
* ``hinge_g_loss(d_fake, *, impl="auto")`` -- -mean D(fake), 0-dim float32 (reference:
  :func:`mgm_fast.losses.hinge_g`).
* ``noisy(x, std, seed_or_generator, *, return_noise=False, impl="auto")`` -- instance noise
  x + std * N(0, 1) of x's shape, dtype and device (reference:
  :func:`mgm_fast.losses.instance_noise`); differentiable w.r.t. x (the identity).
  ``return_noise=True`` returns ``(out, noise)`` with the float32 draw, so tests can check
  ``out == x + std * noise`` exactly.

Backends:

* hinge losses: ``reference`` and ``triton`` (one launch for the loss, one for both
  gradients). The scores are B values; there is no ``cpp`` / ``cuda`` backend because a pass
  over B floats costs less than a kernel launch -- on the CPU the eager reference is the
  fast path.
* ``noisy``: ``reference`` (torch.randn, then x + std * noise), ``triton`` (CUDA; the draw
  happens inside the kernel, so no noise tensor is written and read back: one read of x, one
  write of the result) and ``cpp`` (CPU float32, OpenMP, csrc/kernels/cpu/gan_noise.*).

The noise streams. ``reference`` draws with ``torch.randn`` (the generator's Philox/MT stream).
The fused backends draw a different, documented stream: Philox4x32-10 keyed by a 64-bit seed,
counter q = e // 4 for element e (e = position in memory), Box-Muller on the two pairs of
uniforms of each counter, lane e % 4 (exactly Triton's ``tl.randn4x(seed, q)``). ``triton`` and
``cpp`` therefore produce the same integers and normals equal to a few ulp (their log / sin /
cos implementations differ), but NOT the numbers torch.randn would give for the same seed. Both
are N(0, 1) and independent across elements; the tests check moments, neighbour and lane
correlations, reproducibility for equal seeds, and ``out == x + std * noise``.

``seed_or_generator``: an int in [0, 2^63) is the Philox key itself (reference: a fresh
torch.Generator on x's device seeded with it), equal seeds give equal noise. A
``torch.Generator`` advances: the fused backends draw their key from it (a CPU generator on the
host; a CUDA generator on the device, read by the kernel, so no host synchronisation), the
reference draws its noise from it. A dense x of any dimension order (channels_last included) is
processed in memory order and the result keeps x's strides; other strides are made contiguous
first.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from mgm_fast import _native
from mgm_fast.ops._dispatch import (
    Backend,
    FusedOp,
    register_op,
    triton_auto_exclusion,
    triton_devices,
    triton_reason,
)

__all__ = ["HINGE_D_OP", "HINGE_G_OP", "NOISY_OP", "hinge_d_loss", "hinge_g_loss", "noisy"]

_SEED_LIMIT = 2**63


def _losses():
    from mgm_fast import losses  # late: losses may build on ops

    return losses


# ---------------------------------------------------------------------------------------------
# checks


def _check_scores(name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a floating tensor of discriminator scores, got {got}")


def _check_noise_args(x, std, seed_or_generator) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"noisy: x must be a floating tensor, got {got}")
    if not isinstance(std, (int, float)) or not std >= 0:
        raise ValueError(f"noisy: std must be a number >= 0, got {std!r}")
    if isinstance(seed_or_generator, torch.Generator):
        return
    if isinstance(seed_or_generator, bool) or not isinstance(seed_or_generator, int):
        raise ValueError(
            f"noisy: seed_or_generator must be an int seed or a torch.Generator, got {type(seed_or_generator).__name__}"
        )
    if not 0 <= seed_or_generator < _SEED_LIMIT:
        raise ValueError(f"noisy: the seed must lie in [0, 2^63), got {seed_or_generator}")


# ---------------------------------------------------------------------------------------------
# references


def _hinge_d_reference(d_real, d_fake):
    _check_scores("hinge_d_loss: d_real", d_real)
    _check_scores("hinge_d_loss: d_fake", d_fake)
    return _losses().hinge_d(d_real, d_fake)


def _hinge_g_reference(d_fake):
    _check_scores("hinge_g_loss: d_fake", d_fake)
    return _losses().hinge_g(d_fake)


def _noisy_reference(x, std, seed_or_generator, *, return_noise=False):
    _check_noise_args(x, std, seed_or_generator)
    if isinstance(seed_or_generator, torch.Generator):
        gen = seed_or_generator
    else:
        gen = torch.Generator(device=x.device).manual_seed(seed_or_generator)
    if not return_noise:
        return _losses().instance_noise(x, std, gen)
    noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=gen)
    return x + std * noise, noise


# ---------------------------------------------------------------------------------------------
# fused noise (triton, cpp)


def _fused_seed(seed_or_generator, device: torch.device):
    """The Philox key: the int itself, or one drawn from the generator (a device tensor for a
    generator on an accelerator: the kernel reads it there, no host synchronisation)."""
    if not isinstance(seed_or_generator, torch.Generator):
        return seed_or_generator
    gen = seed_or_generator
    if gen.device.type == "cpu":
        return int(torch.randint(0, _SEED_LIMIT - 1, (), generator=gen))
    other_index = None not in (gen.device.index, device.index) and gen.device.index != device.index
    if gen.device.type != device.type or other_index:
        raise ValueError(f"noisy: the generator is on {gen.device} but x on {device}")
    return torch.randint(0, _SEED_LIMIT - 1, (1,), generator=gen, device=gen.device)


class _Noisy(torch.autograd.Function):
    """out = x + std * n with a fused draw; d out / d x = identity."""

    @staticmethod
    def forward(ctx, x, std, seed, return_noise, draw):
        out, noise = draw(x, std, seed, return_noise)
        if noise is not None:
            ctx.mark_non_differentiable(noise)
        return out, noise

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_noise):
        return grad_out, None, None, None, None


def _apply(draw, x, std, seed_or_generator, return_noise):
    _check_noise_args(x, std, seed_or_generator)
    seed = _fused_seed(seed_or_generator, x.device)
    out, noise = _Noisy.apply(x, float(std), seed, bool(return_noise), draw)
    return (out, noise) if return_noise else out


def _triton_draw(x, std, seed, return_noise):
    from mgm_fast.ops._triton import gan_losses as tg

    return tg.noisy(x, std, seed, return_noise)


def _cpp_draw(x, std, seed, return_noise):
    if isinstance(seed, torch.Tensor):
        raise ValueError("noisy (cpp backend): pass an int seed or a CPU torch.Generator")
    return _native.extension().instance_noise_cpu(x, std, seed, return_noise)


def _noisy_triton(x, std, seed_or_generator, *, return_noise=False):
    return _apply(_triton_draw, x, std, seed_or_generator, return_noise)


def _noisy_cpp(x, std, seed_or_generator, *, return_noise=False):
    return _apply(_cpp_draw, x, std, seed_or_generator, return_noise)


def _cpp_noise_reasons(x, std, seed_or_generator, *, return_noise=False) -> list[str]:
    if isinstance(seed_or_generator, torch.Generator) and seed_or_generator.device.type != "cpu":
        return [f"the generator is on {seed_or_generator.device} (the cpp backend draws its key on the CPU)"]
    return []


# ---------------------------------------------------------------------------------------------
# hinge losses (triton)


def _hinge_d_triton(d_real, d_fake):
    from mgm_fast.ops._triton.gan_losses import HingeD

    _check_scores("hinge_d_loss: d_real", d_real)
    _check_scores("hinge_d_loss: d_fake", d_fake)
    if d_real.device != d_fake.device:
        raise ValueError(f"hinge_d_loss: d_real is on {d_real.device} but d_fake on {d_fake.device}")
    return HingeD.apply(d_real, d_fake)


def _hinge_g_triton(d_fake):
    from mgm_fast.ops._triton.gan_losses import HingeG

    _check_scores("hinge_g_loss: d_fake", d_fake)
    return HingeG.apply(d_fake)


# ---------------------------------------------------------------------------------------------
# dispatch

_ANY = ("cpu", "cuda", "mps", "xpu")
_ALL_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_FUSED = (torch.float32, torch.float16, torch.bfloat16)

HINGE_D_OP = register_op(FusedOp(name="hinge_d_loss", summary="discriminator hinge loss, fused fwd/bwd"))
HINGE_G_OP = register_op(FusedOp(name="hinge_g_loss", summary="generator hinge loss, fused fwd/bwd"))
NOISY_OP = register_op(FusedOp(name="noisy", summary="instance noise x + std * N(0, 1), drawn in-kernel"))

for _op, _ref, _tri in ((HINGE_D_OP, _hinge_d_reference, _hinge_d_triton),
                        (HINGE_G_OP, _hinge_g_reference, _hinge_g_triton)):  # fmt: skip
    _op.register(Backend(name="reference", fn=_ref, devices=_ANY, dtypes=_ALL_FLOATS))
    _op.register(Backend(name="triton", fn=_tri, devices=triton_devices(), dtypes=_FUSED,
                         availability=triton_reason, auto_exclusion=triton_auto_exclusion))  # fmt: skip

NOISY_OP.register(Backend(name="reference", fn=_noisy_reference, devices=_ANY, dtypes=_ALL_FLOATS))
NOISY_OP.register(Backend(name="triton", fn=_noisy_triton, devices=triton_devices(), dtypes=_FUSED,
                          availability=triton_reason, auto_exclusion=triton_auto_exclusion))  # fmt: skip
NOISY_OP.register(Backend(name="cpp", fn=_noisy_cpp, devices=("cpu",), dtypes=(torch.float32,),
                          availability=_native.cpp_reason, extra_check=_cpp_noise_reasons))  # fmt: skip


def hinge_d_loss(d_real: torch.Tensor, d_fake: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """mean ReLU(1 - d_real) + mean ReLU(1 + d_fake), 0-dim float32 (any shapes)."""
    return HINGE_D_OP(d_real, d_fake, impl=impl)


def hinge_g_loss(d_fake: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """-mean d_fake, 0-dim float32 (any shape)."""
    return HINGE_G_OP(d_fake, impl=impl)


def noisy(
    x: torch.Tensor,
    std: float,
    seed_or_generator: int | torch.Generator,
    *,
    return_noise: bool = False,
    impl: str = "auto",
):
    """x + std * N(0, 1) (x's shape, dtype, device); ``(out, noise)`` with ``return_noise``.
    See the module docstring for the streams of the backends."""
    return NOISY_OP(x, std, seed_or_generator, return_noise=return_noise, impl=impl)
