"""Triton kernels of the GAN losses (the ``triton`` backend of :mod:`mgm_fast.ops.gan_losses`).

* ``_noisy`` -- instance noise ``out = x + std * n`` with n drawn in the kernel by
  ``tl.randn4x(seed, q)`` (Philox4x32-10 on the counter q = e // 4, Box-Muller on both pairs of
  its four uniforms; element e takes lane e % 4): one read of x and one write of out, where the
  eager path writes a noise tensor, reads it back and reads x. The seed is a scalar argument or
  is loaded from a device tensor (drawn from a CUDA generator without a host synchronisation).
  The CPU kernel (csrc/kernels/cpu/gan_noise.*) computes the same stream.
* ``_hinge_d_fwd`` / ``_hinge_d_bwd``, ``_hinge_g_fwd`` / ``_hinge_g_bwd`` -- the hinge losses
  of the discriminator scores (B values): one single-program launch for the loss (float32 lane
  sums, fixed order) and one launch for both gradients, computed from the saved scores and the
  device-side grad_output (eager autograd runs about eight small kernels each way).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mgm_fast.ops._dispatch import triton_interpreting

__all__ = ["hinge_d_backward", "hinge_d_forward", "hinge_g_backward", "hinge_g_forward", "noisy"]


@triton.jit(do_not_specialize=["seed"])
def _noisy(x_ptr, out_ptr, noise_ptr, seed_ptr, seed, n, std,
           SEED_FROM_PTR: tl.constexpr, WRITE_NOISE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    groups = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4).to(tl.int64)
    if SEED_FROM_PTR:
        key = tl.load(seed_ptr)
    else:
        key = seed
    n0, n1, n2, n3 = tl.randn4x(key, groups)
    # interleave to element order 4q + lane
    z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    x = tl.load(x_ptr + offs, mask=keep, other=0.0)
    out = x.to(tl.float32) + std * z
    tl.store(out_ptr + offs, out.to(x.dtype), mask=keep)
    if WRITE_NOISE:
        tl.store(noise_ptr + offs, z, mask=keep)


@triton.jit
def _hinge_sum(ptr, n, sign, BLOCK: tl.constexpr):
    """sum_e relu(1 + sign * x_e) in float32 lanes, then one fixed-order tree sum."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        acc += tl.where(offs < n, tl.maximum(1.0 + sign * x, 0.0), 0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _hinge_d_fwd(real_ptr, fake_ptr, loss_ptr, n_real, n_fake, BLOCK: tl.constexpr):
    real = _hinge_sum(real_ptr, n_real, -1.0, BLOCK) / n_real
    fake = _hinge_sum(fake_ptr, n_fake, 1.0, BLOCK) / n_fake
    tl.store(loss_ptr, real + fake)


@triton.jit
def _hinge_d_bwd(real_ptr, fake_ptr, grad_output_ptr, grad_real_ptr, grad_fake_ptr, n_real, n_fake,
                 BLOCK: tl.constexpr):  # fmt: skip
    go = tl.load(grad_output_ptr).to(tl.float32)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r = tl.load(real_ptr + offs, mask=offs < n_real, other=0.0).to(tl.float32)
    g_r = tl.where(1.0 - r > 0.0, -(go / n_real), 0.0)  # relu'(0) = 0, as torch
    tl.store(grad_real_ptr + offs, g_r.to(grad_real_ptr.dtype.element_ty), mask=offs < n_real)
    f = tl.load(fake_ptr + offs, mask=offs < n_fake, other=0.0).to(tl.float32)
    g_f = tl.where(1.0 + f > 0.0, go / n_fake, 0.0)
    tl.store(grad_fake_ptr + offs, g_f.to(grad_fake_ptr.dtype.element_ty), mask=offs < n_fake)


@triton.jit
def _hinge_g_fwd(fake_ptr, loss_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(fake_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(loss_ptr, -(tl.sum(acc, axis=0) / n))


@triton.jit
def _hinge_g_bwd(grad_output_ptr, grad_ptr, n, BLOCK: tl.constexpr):
    go = tl.load(grad_output_ptr).to(tl.float32)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.zeros([BLOCK], dtype=tl.float32) - go / n
    tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < n)


# ---------------------------------------------------------------------------------------------
# launchers


def _block(large: int, small: int) -> int:
    return small if triton_interpreting() else large


def is_dense(t: torch.Tensor) -> bool:
    """The elements fill [data_ptr, data_ptr + numel) exactly once (any dimension order)."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def noisy(x: torch.Tensor, std: float, seed: int | torch.Tensor, return_noise: bool):
    """(x + std * n in x's dtype and strides, float32 n or None). ``seed`` is an int in
    [0, 2^63) or a 1-element int64 tensor on x's device. A dense x (any dimension order) is
    read in memory order; other strides are made contiguous first."""
    if not is_dense(x):
        x = x.contiguous()
    out = torch.empty_like(x)
    noise = torch.empty_like(x, dtype=torch.float32) if return_noise else None
    n = x.numel()
    if n:
        block = _block(4096, 1024)
        from_ptr = isinstance(seed, torch.Tensor)
        _noisy[(triton.cdiv(n, block),)](
            x, out, noise if noise is not None else out, seed if from_ptr else x,
            0 if from_ptr else int(seed), n, float(std),
            SEED_FROM_PTR=from_ptr, WRITE_NOISE=noise is not None, BLOCK=block,
        )  # fmt: skip
    return out, noise


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1) if t.is_contiguous() else t.contiguous().reshape(-1)


def hinge_d_forward(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """mean relu(1 - d_real) + mean relu(1 + d_fake); 0-dim float32."""
    real, fake = _flat(d_real), _flat(d_fake)
    loss = torch.empty((), device=d_real.device, dtype=torch.float32)
    _hinge_d_fwd[(1,)](real, fake, loss, real.numel(), fake.numel(), BLOCK=_block(1024, 128))
    return loss


def hinge_d_backward(d_real: torch.Tensor, d_fake: torch.Tensor, grad_output: torch.Tensor):
    """(grad d_real, grad d_fake) of :func:`hinge_d_forward`, contiguous, in the scores' dtypes."""
    real, fake = _flat(d_real), _flat(d_fake)
    grad_real, grad_fake = torch.empty_like(real), torch.empty_like(fake)
    go = grad_output.to(device=real.device, dtype=torch.float32).reshape(1)
    block = _block(1024, 128)
    grid = (max(triton.cdiv(max(real.numel(), fake.numel()), block), 1),)
    _hinge_d_bwd[grid](real, fake, go, grad_real, grad_fake, real.numel(), fake.numel(), BLOCK=block)
    return grad_real.view(d_real.shape), grad_fake.view(d_fake.shape)


def hinge_g_forward(d_fake: torch.Tensor) -> torch.Tensor:
    """-mean d_fake; 0-dim float32."""
    fake = _flat(d_fake)
    loss = torch.empty((), device=d_fake.device, dtype=torch.float32)
    _hinge_g_fwd[(1,)](fake, loss, fake.numel(), BLOCK=_block(1024, 128))
    return loss


def hinge_g_backward(shape: torch.Size, device: torch.device, dtype: torch.dtype, grad_output: torch.Tensor):
    """grad d_fake of :func:`hinge_g_forward` (-grad_output / numel everywhere), contiguous."""
    numel = shape.numel()
    n = max(1, numel)
    grad = torch.empty(n, device=device, dtype=dtype)
    go = grad_output.to(device=device, dtype=torch.float32).reshape(1)
    block = _block(1024, 128)
    _hinge_g_bwd[(triton.cdiv(n, block),)](go, grad, numel, BLOCK=block)
    return grad[:numel].view(shape)


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile specialisations (mgm_fast.ops._triton.aot)


def aot_specs() -> list[tuple]:
    specs = []
    for dtype, from_ptr in (("fp32", False), ("bf16", True), ("fp16", False)):
        specs.append((
            f"noisy[{dtype},seed_from_ptr={from_ptr}]", _noisy,
            dict(x_ptr=f"*{dtype}", out_ptr=f"*{dtype}", noise_ptr="*fp32", seed_ptr="*i64", seed="i64",
                 n="i64", std="fp32"),
            dict(SEED_FROM_PTR=from_ptr, WRITE_NOISE=dtype == "fp32", BLOCK=4096),
        ))  # fmt: skip
    for dtype in ("fp32", "bf16"):
        ptr = f"*{dtype}"
        specs += [
            (f"hinge_d_fwd[{dtype}]", _hinge_d_fwd,
             dict(real_ptr=ptr, fake_ptr=ptr, loss_ptr="*fp32", n_real="i32", n_fake="i32"), dict(BLOCK=1024)),
            (f"hinge_d_bwd[{dtype}]", _hinge_d_bwd,
             dict(real_ptr=ptr, fake_ptr=ptr, grad_output_ptr="*fp32", grad_real_ptr=ptr, grad_fake_ptr=ptr,
                  n_real="i32", n_fake="i32"), dict(BLOCK=1024)),
            (f"hinge_g_fwd[{dtype}]", _hinge_g_fwd, dict(fake_ptr=ptr, loss_ptr="*fp32", n="i32"), dict(BLOCK=1024)),
            (f"hinge_g_bwd[{dtype}]", _hinge_g_bwd, dict(grad_output_ptr="*fp32", grad_ptr=ptr, n="i32"),
             dict(BLOCK=1024)),
        ]  # fmt: skip
    return specs
