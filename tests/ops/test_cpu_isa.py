"""The C++ CPU kernels at every instruction-set level this CPU supports (baseline x86-64,
x86-64-v3 / AVX2, x86-64-v4 / AVX-512), forced with ``mgm_fast._native.forced_cpu_isa``.

Every op with a ``cpp`` backend -- multitask_loss, ntxent_loss, ntxent_rows, sagan_attention,
genblock, noisy, simclr_views -- runs forward and backward on a small odd shape and on one above
its parallel threshold, at each level with 1 and 2 threads. Each level follows the 2x-error rule
against float64 (the fused error is at most twice the float32 reference's, with the helpers of
the op's own tests) and is bit-identical across thread counts; the levels really run different
code (FMA contraction changes bits). Then the choice itself: set_cpu_isa errors, and
MGM_FAST_CPU_ISA in a fresh interpreter (honoured; a bad value fails loudly, even under
``impl="auto"``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mgm_fast
from mgm_fast import _native
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.ops import gan_losses as gl
from mgm_fast.ops import genblock as gb
from mgm_fast.ops import ntxent as nx
from mgm_fast.ops.simclr_views import simclr_views
from tests.ops import test_attention as t_at
from tests.ops import test_genblock as t_gb
from tests.ops import test_multitask_loss as t_mtl
from tests.ops import test_ntxent as t_nx
from tests.ops.test_multitask_loss_triton import _two_x_error_rule as mtl_two_x_error_rule
from tests.ops.test_simclr_views import _images, _two_view_params

HAS_CPP = _native.cpp_reason() is None
pytestmark = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")
ALL_LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")
LEVELS = _native.supported_cpu_isas() if HAS_CPP else []
UNSUPPORTED = [level for level in ALL_LEVELS if level not in LEVELS]


def _at(level: str, threads: int, fn):
    """fn() with the kernels forced to ``level`` on ``threads`` OpenMP threads."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with _native.forced_cpu_isa(level):
            return fn()
    finally:
        torch.set_num_threads(before)


def _tensors(result) -> list[torch.Tensor]:
    """The tensors of a nested result (tuples, lists, dicts), in order."""
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return [t for v in result.values() for t in _tensors(v)]
    if isinstance(result, (tuple, list)):
        return [t for v in result for t in _tensors(v)]
    return []


def _same_bits(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(torch.equal(x, y) for x, y in zip(ta, tb))


def _two_x_rule(name, fused, plain, truth):
    """The ops' 2x-error rule for one float32 result: its error against the float64 truth is at
    most twice the plain float32 path's, plus 1e-6 of the largest true entry."""
    assert fused.dtype == torch.float32 and fused.shape == truth.shape, name
    err = lambda x: (x.double() - truth).abs().max().item()  # noqa: E731
    floor = 1e-6 * truth.abs().max().item()
    assert err(fused) <= 2 * err(plain) + floor, (name, err(fused), err(plain))


# ---------------------------------------------------------------------------------------------
# one case per op: the cpp run, a check of its result against the float64 twin, and optionally
# the part of the result that must not depend on the thread count (default: all of it)


def _multitask_loss(batch, classes, h, w):
    inputs = t_mtl.make_inputs(batch, classes, h, w, ignore_index=255)
    weights = (0.3, 2.0, 5.0)
    plain = t_mtl.run("reference", inputs, "valid", weights)
    truth_losses, leaves = t_mtl._fp64_truth(inputs, "valid")
    total = sum(wt * loss for wt, loss in zip(weights, truth_losses))
    truth_grads = torch.autograd.grad(total, [leaves[k] for k in t_mtl.PREDS])

    def check(fused):
        mtl_two_x_error_rule(fused, plain, truth_losses, truth_grads, torch.float32)

    return lambda: t_mtl.run("cpp", inputs, "valid", weights), check


def _ntxent_loss(b, d, tau):
    z = t_nx.views(b, d)
    loss = lambda impl: lambda a, c: nx.ntxent_loss(a, c, tau, impl=impl)  # noqa: E731
    plain = t_nx.loss_and_grads(loss("reference"), z)
    truth = t_nx._fp64_truth(*z, tau)
    return (lambda: t_nx.loss_and_grads(loss("cpp"), z),
            lambda fused: t_nx._two_x_error_rule(fused, plain, truth, torch.float32))  # fmt: skip


def _ntxent_rows_fp64(rows, cols, index, tau):
    """mgm_fast.ops.ntxent.ntxent_rows_reference (which casts to float32) in the inputs' dtype."""
    sim = F.normalize(rows, dim=1) @ F.normalize(cols, dim=1).t() / tau
    ar = torch.arange(rows.shape[0])
    sim = sim.index_put((ar, index), torch.tensor(float("-inf"), dtype=sim.dtype))
    pos = (index + cols.shape[0] // 2) % cols.shape[0]
    return (torch.logsumexp(sim, dim=1) - sim[ar, pos]).sum()


def _ntxent_rows(n, r, d, tau):
    rows, cols, index = t_nx.rows_case(n, r, d)
    loss = lambda impl: lambda x, y: nx.ntxent_rows(x, y, index, tau, impl=impl)  # noqa: E731
    plain = t_nx.loss_and_grads(loss("reference"), (rows, cols))
    truth = t_nx.loss_and_grads(lambda x, y: _ntxent_rows_fp64(x, y, index, tau), (rows.double(), cols.double()))
    return (lambda: t_nx.loss_and_grads(loss("cpp"), (rows, cols)),
            lambda fused: t_nx._two_x_error_rule(fused, plain, truth, torch.float32))  # fmt: skip


def _attention(b, dq, dv, n, m):
    tensors = t_at.qkv(b, dq, dv, n, m)
    weight = t_at._weight(tensors)
    plain = t_at.out_and_grads(t_at._impl("reference"), tensors, weight)
    truth = t_at._fp64_truth(tensors, weight)
    return (lambda: t_at.out_and_grads(t_at._impl("cpp"), tensors, weight),
            lambda fused: t_at._two_x_error_rule(fused, plain, truth))  # fmt: skip


def _genblock(batch, cin, cout, h, w, training):
    a = t_gb.block_inputs(batch, cin, cout, h, w)

    def run(impl, inputs):
        out, grads, after = t_gb.run(gb.genblock, inputs, t_gb.BLOCK_GRADS, impl, training=training)
        return out, grads, {k: after[k] for k in t_gb.BLOCK_STATE}

    plain = run("reference", a)
    truth = run("reference", t_gb.clone(a, torch.float64))

    def thread_invariant(result):
        # oneDNN's conv weight gradients may round differently for another thread count
        # (mgm_fast/ops/genblock.py); everything the C++ kernels produce may not
        out, grads, state = result
        return out, {k: g for k, g in grads.items() if k not in ("weight0", "weight1", "weight2")}, state

    return lambda: run("cpp", a), lambda fused: t_gb.two_x_rule(fused, plain, truth), thread_invariant


# The documented stream of the fused noise backends (mgm_fast/ops/gan_losses.py,
# csrc/kernels/cpu/gan_noise.h): Philox4x32-10 integers, uniforms rounded as the kernel does.
_PHILOX_ROUND = (np.uint64(0xD2511F53), np.uint64(0xCD9E8D57))
_PHILOX_KEY_STEP = (np.uint32(0x9E3779B9), np.uint32(0xBB67AE85))


def _philox_uniforms(seed: int, groups: int) -> np.ndarray:
    """(groups, 4) float32 uniforms of the groups q < groups."""
    q = np.arange(groups, dtype=np.uint64)
    c = [(q & np.uint64(0xFFFFFFFF)).astype(np.uint32), (q >> np.uint64(32)).astype(np.uint32),
         np.zeros(groups, np.uint32), np.zeros(groups, np.uint32)]  # fmt: skip
    k0, k1 = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
    a_mul, b_mul = _PHILOX_ROUND
    with np.errstate(over="ignore"):
        for _ in range(10):
            p0 = c[0].astype(np.uint64) * a_mul
            p2 = c[2].astype(np.uint64) * b_mul
            c = [(p2 >> np.uint64(32)).astype(np.uint32) ^ c[1] ^ k0, p2.astype(np.uint32),
                 (p0 >> np.uint64(32)).astype(np.uint32) ^ c[3] ^ k1, p0.astype(np.uint32)]  # fmt: skip
            k0, k1 = k0 + _PHILOX_KEY_STEP[0], k1 + _PHILOX_KEY_STEP[1]
    v = np.stack(c, axis=1).view(np.int32)
    folded = np.where(v < 0, ~v, v)
    return folded.astype(np.float32) * np.float32(4.6566127342e-10)


def _box_muller(u: torch.Tensor) -> torch.Tensor:
    """(groups, 4) uniforms -> the (groups * 4,) normals, in u's dtype."""
    r = torch.sqrt(-2 * torch.log(u[:, 0::2].clamp_min(1e-7)))
    t = 2 * torch.pi * u[:, 1::2]
    return torch.stack((r[:, 0] * torch.cos(t[:, 0]), r[:, 0] * torch.sin(t[:, 0]),
                        r[:, 1] * torch.cos(t[:, 1]), r[:, 1] * torch.sin(t[:, 1])), 1).reshape(-1)  # fmt: skip


def _noise(shape, std, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    u = torch.from_numpy(_philox_uniforms(seed, (x.numel() + 3) // 4))
    plain = _box_muller(u)[: x.numel()].reshape(shape)
    truth = _box_muller(u.double())[: x.numel()].reshape(shape)

    def check(fused):
        out, noise = fused
        assert torch.equal(out, x + std * noise), "out must be x + std * noise, rounded twice"
        _two_x_rule("noise", noise, plain, truth)

    return lambda: gl.noisy(x, std, seed, return_noise=True, impl="cpp"), check


def _simclr_views(b, h, w, out_hw, kernel):
    x = _images(b, h, w, seed=7)
    params, src = _two_view_params(SimCLRAugment(blur_p=0.7), b, h, w, seed=7)
    views = lambda x, impl: simclr_views(x, params, src, out_hw, kernel, impl=impl)  # noqa: E731
    plain, truth = views(x, "reference"), views(x.double(), "reference")
    return lambda: views(x, "cpp"), lambda fused: _two_x_rule("views", fused, plain, truth)


# Each op twice: a small odd shape, and one above the kernel's threshold for a parallel region,
# so the thread count matters.
CASES = {
    "multitask_loss-small": lambda: _multitask_loss(1, 13, 7, 5),
    "multitask_loss-parallel": lambda: _multitask_loss(3, 13, 61, 29),  # 2 chunks of rows
    "ntxent_loss-small": lambda: _ntxent_loss(5, 7, 0.5),
    "ntxent_loss-parallel": lambda: _ntxent_loss(67, 61, 0.1),  # (2B)^2 D > 2^20
    "ntxent_rows-small": lambda: _ntxent_rows(9, 7, 5, 0.5),
    "ntxent_rows-parallel": lambda: _ntxent_rows(150, 287, 63, 0.3),
    "sagan_attention-small": lambda: _attention(1, 1, 4, 37, 9),
    "sagan_attention-parallel": lambda: _attention(2, 5, 17, 197, 99),
    "genblock-small": lambda: _genblock(3, 5, 7, 3, 5, training=True),
    "genblock-eval-parallel": lambda: _genblock(3, 7, 6, 25, 21, training=False),
    "genblock-parallel": lambda: _genblock(3, 7, 6, 25, 21, training=True),
    "noisy-small": lambda: _noise((3, 5, 7), 0.3, 2**40 + 17),
    "noisy-parallel": lambda: _noise((3, 3, 61, 53), 0.05, 1234),  # 2 chunks of 16K elements
    "simclr_views-small": lambda: _simclr_views(2, 13, 11, (9, 15), 3),
    "simclr_views-parallel": lambda: _simclr_views(3, 23, 31, (23, 31), 5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_level_follows_the_two_x_rule_on_any_thread_count(case):
    run, check, *rest = CASES[case]()
    thread_invariant = rest[0] if rest else lambda result: result
    for level in LEVELS:
        one = _at(level, 1, run)
        check(one)
        two = _at(level, 2, run)
        assert _same_bits(thread_invariant(one), thread_invariant(two)), f"{case} at {level}: 1 and 2 threads differ"


def test_levels_run_different_code():
    """With FMA, x86-64-v3/v4 round a * b + c once where baseline rounds twice: forcing a level
    changes bits (else forced_cpu_isa would not reach the kernels)."""
    if len(LEVELS) < 2:
        pytest.skip(f"this CPU supports only {LEVELS}")
    runs = [CASES[name]()[0] for name in ("ntxent_loss-small", "sagan_attention-small")]
    baseline = [_at("baseline", 1, run) for run in runs]
    for level in LEVELS[1:]:
        at_level = [_at(level, 1, run) for run in runs]
        assert not all(_same_bits(a, b) for a, b in zip(baseline, at_level)), level


# ---------------------------------------------------------------------------------------------
# choosing the level


def test_supported_levels_and_the_active_one():
    assert LEVELS[0] == "baseline" and LEVELS == [lv for lv in ALL_LEVELS if lv in LEVELS]
    assert _native.cpu_isa() in LEVELS
    assert _native.build_info()["cpu_isa"] == _native.cpu_isa()
    assert _native.build_info()["cpu_isas_supported"] == LEVELS


def test_forced_level_is_restored_even_after_an_error():
    before = _native.cpu_isa()
    with pytest.raises(KeyError):
        with _native.forced_cpu_isa("baseline") as level:
            assert level == "baseline" == _native.cpu_isa()
            raise KeyError("inside")
    assert _native.cpu_isa() == before
    with _native.forced_cpu_isa("auto") as level:
        assert level == LEVELS[-1]


@pytest.mark.parametrize("name", ["x86-64-v2", "avx512", "", "X86-64-V3", "auto "])
def test_unknown_level_is_refused(name):
    before = _native.cpu_isa()
    with pytest.raises(ValueError, match=r"unknown CPU ISA level .*: use auto, baseline, x86-64-v3 or x86-64-v4"):
        with _native.forced_cpu_isa(name):
            pytest.fail("the block must not run")
    with pytest.raises(ValueError, match="this CPU supports baseline"):
        _native.extension().set_cpu_isa(name)
    assert _native.cpu_isa() == before


@pytest.mark.skipif(not UNSUPPORTED, reason="this CPU supports every level")
def test_unsupported_level_is_refused():
    for level in UNSUPPORTED:
        with pytest.raises(ValueError, match=f"{level} is not supported here: this CPU supports baseline"):
            _native.extension().set_cpu_isa(level)


def _python(env_value: str, code: str) -> subprocess.CompletedProcess:
    """A fresh interpreter running code with MGM_FAST_CPU_ISA=env_value."""
    root = str(Path(mgm_fast.__file__).resolve().parents[1])
    env = {**os.environ, "MGM_FAST_CPU_ISA": env_value,
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def test_environment_variable_is_honoured():
    for value, want in (("baseline", "baseline"), ("auto", LEVELS[-1]), ("", LEVELS[-1])):
        proc = _python(value, "from mgm_fast import _native; print(_native.cpu_isa())")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [want], (value, proc.stdout)


@pytest.mark.parametrize("value", ["sse9", *UNSUPPORTED])
def test_bad_environment_value_fails_loudly(value):
    """Even ``impl="auto"`` raises instead of quietly taking the reference backend."""
    code = "import torch; from mgm_fast.ops import ntxent; ntxent.ntxent_loss(torch.ones(2, 3), torch.ones(2, 3))"
    proc = _python(value, code)
    assert proc.returncode != 0
    if value in ALL_LEVELS:
        want = f"MGM_FAST_CPU_ISA={value} asks for a level this CPU lacks: it supports baseline"
    else:
        want = f"MGM_FAST_CPU_ISA='{value}' is not a CPU ISA level: use auto, baseline, x86-64-v3 or x86-64-v4 (this CPU supports baseline"
    assert want in proc.stderr, proc.stderr
