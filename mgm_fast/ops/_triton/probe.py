"""The Triton launch probe of :func:`mgm_fast.ops._dispatch.triton_reason`: the smallest kernel
that proves Triton compiles and launches on the device."""

import torch
import triton
import triton.language as tl


@triton.jit
def _add_one_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1.0, mask=mask)


def add_one(x: torch.Tensor) -> torch.Tensor:
    """x + 1 for a 1-d float32 tensor of at most 1024 elements."""
    out = torch.empty_like(x)
    _add_one_kernel[(1,)](x, out, x.numel(), BLOCK=triton.next_power_of_2(max(x.numel(), 16)))
    return out
