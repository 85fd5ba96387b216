"""The tap map of the phase split of a 3x3 convolution after nearest-2x upsampling, shared by the
GenBlock op (:mod:`mgm_fast.ops.genblock`) and its Triton kernels
(:mod:`mgm_fast.ops._triton.genblock`), which both build 2x2 phase kernels from it."""

PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))
"""PHASE_TAPS[p][r][k] = 1 if 3x3 tap k lands on low-resolution offset r for output phase p
(rewrite 1 of mgm_fast/ops/genblock.py)."""
