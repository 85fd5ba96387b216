"""The algorithms of the cpp GenBlock's two convolutions (csrc/bindings/genblock_impl.h).

conv1 (nearest x2 + conv3x3): ``phase`` (one 2x2 conv with 4*Cout outputs on the padded
low-resolution grid), ``gemm`` (one GEMM per phase on the unpadded grid), ``upsample`` (the plain
3x3 conv of the upsampled map); conv2 (conv3x3 at the output size): ``conv`` (oneDNN) and
``gemm`` (3x3 im2col + GEMMs with the weight in place). Each combination is forced through
MGM_FAST_GENBLOCK_ALGO / MGM_FAST_GENBLOCK_CONV2_ALGO and checked against the reference (values,
every gradient, the running statistics; float64 to 1e-10, float32 by the 2x-error rule of
tests/ops/test_genblock.py), on small odd shapes with 4x4 and odd-sized inputs, NCHW and
channels_last, training and eval. ``auto`` (the default) is a cost model of the shape: nothing is
timed or cached, and its picks are checked on clear-cut shapes and against the committed timings it
was fitted to. ``timed`` times the candidates once per shape and caches the fastest (per shape and
dtype, for any thread count): the tests check that it records a valid choice and keeps it. A
forward and its backward always use the same algorithms; a checkpoint's choices win.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from mgm_fast import _native
from mgm_fast.ops import genblock as gb
from tests.ops.test_genblock import (
    BLOCK_GRADS,
    BLOCK_STATE,
    HAS_CPP,
    _gen,
    assert_close_all,
    block_inputs,
    clone,
    run,
    two_x_rule,
)

pytestmark = pytest.mark.skipif(not HAS_CPP, reason=f"C++ extension unavailable: {_native.cpp_reason()}")

CONV1 = ("phase", "gemm", "upsample")
CONV2 = ("conv", "gemm")
ENV1, ENV2 = "MGM_FAST_GENBLOCK_ALGO", "MGM_FAST_GENBLOCK_CONV2_ALGO"


@pytest.fixture
def algos(monkeypatch):
    """Sets the two algorithm variables for the test (auto when None)."""

    def set_algos(conv1: str | None, conv2: str | None) -> None:
        for name, value in ((ENV1, conv1), (ENV2, conv2)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    return set_algos


def _ext():
    return _native.extension()


def _chosen(n, cin, cout, h, w, dtype=torch.float32) -> dict[str, str]:
    """conv -> algorithm that was timed or restored for a block call on (n, cin, h, w) -> cout."""
    want = {"conv1": (n, cin, cout, h, w), "conv2": (n, cout, cout, 2 * h, 2 * w)}
    dt = {torch.float32: "Float", torch.float64: "Double"}[dtype]
    return {row[0]: row[8] for row in _ext().genblock_algos_cpu() if tuple(row[1:6]) == want[row[0]] and row[6] == dt}


# (batch, cin, cout, h, w): 4x4 input, odd channels and sizes, a 1-pixel-wide map, batch 1
SHAPES = [(2, 6, 5, 4, 4), (3, 5, 7, 3, 5), (1, 3, 4, 2, 1)]


@pytest.mark.parametrize(("conv1", "conv2"), list(itertools.product(CONV1, CONV2)))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_forced_algorithms_match_reference_fp64(algos, conv1, conv2, channels_last, training):
    algos(conv1, conv2)
    for batch, cin, cout, h, w in SHAPES:
        a = block_inputs(batch, cin, cout, h, w, dtype=torch.float64, channels_last=channels_last)
        got = run(gb.genblock, a, BLOCK_GRADS, "cpp", training=training)
        want = run(gb.genblock, a, BLOCK_GRADS, "reference", training=training)
        assert_close_all(got, want, BLOCK_STATE, rtol=1e-10, atol=1e-12)
        out, grads, _ = got
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert grads["x"].is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize(("conv1", "conv2"), list(itertools.product(CONV1, CONV2)))
@pytest.mark.parametrize(("cin", "cout", "h", "w"), [(16, 8, 4, 4), (9, 12, 5, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_forced_algorithms_two_x_error_rule_fp32(algos, conv1, conv2, cin, cout, h, w, training):
    algos(conv1, conv2)
    a = block_inputs(3, cin, cout, h, w, channels_last=w == 3)
    fused = run(gb.genblock, a, BLOCK_GRADS, "cpp", training=training)
    plain = run(gb.genblock, a, BLOCK_GRADS, "reference", training=training)
    truth = run(gb.genblock, clone(a, torch.float64), BLOCK_GRADS, "reference", training=training)
    two_x_rule(fused, plain, truth)
    for k in BLOCK_STATE:
        torch.testing.assert_close(fused[2][k], plain[2][k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("conv1", "conv2"), [("gemm", "gemm"), ("upsample", "conv")])
def test_forced_algorithms_gradcheck_fp64(algos, conv1, conv2):
    algos(conv1, conv2)
    a = block_inputs(2, 3, 2, 2, 3, dtype=torch.float64)
    leaves = [a[k].clone().requires_grad_(True) for k in BLOCK_GRADS]

    def f(*t):  # fresh running statistics each call: the gradient does not depend on them
        return gb.genblock(**{**clone(a), **dict(zip(BLOCK_GRADS, t))}, impl="cpp")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_timed_mode_times_once_records_a_valid_choice_and_matches_reference(algos):
    algos("timed", "timed")
    _ext().genblock_algos_clear_cpu()
    shape = (3, 8, 6, 4, 4)
    a = block_inputs(*shape)
    got = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    chosen = _chosen(*shape)
    assert set(chosen) == {"conv1", "conv2"}
    assert chosen["conv1"] in CONV1 and chosen["conv2"] in CONV2
    rows = {row[0]: row for row in _ext().genblock_algos_cpu()}
    for conv, candidates in (("conv1", CONV1), ("conv2", CONV2)):
        timed = rows[conv][9]  # {algorithm: seconds} of the timed candidates
        assert set(timed) <= set(candidates) and len(timed) >= 2, timed  # small maps: gemm is a candidate
        assert rows[conv][8] == min(timed, key=timed.get)
    want = run(gb.genblock, a, BLOCK_GRADS, "reference")
    assert_close_all(got, want, BLOCK_STATE, rtol=2e-4, atol=2e-6)
    # cached: the next call of the shape does not time again, and runs the same algorithms
    before = _ext().genblock_algos_cpu()
    again = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    assert _ext().genblock_algos_cpu() == before
    assert torch.equal(again[0], got[0])
    for k in BLOCK_GRADS:
        assert torch.equal(again[1][k], got[1][k]), k


def test_without_candidates_phase_and_conv_are_kept_untimed(algos):
    algos("timed", "timed")
    _ext().genblock_algos_clear_cpu()
    # 16x16 -> 32x32 maps at batch 1100 (few channels: cheap): both im2col matrices exceed the
    # limit for the gemm algorithms (64 MiB, or 4x the weight) and the map is too large for the
    # upsampled conv
    a = block_inputs(1100, 4, 4, 16, 16, classes=2)
    with torch.no_grad():
        gb.genblock(**a, impl="cpp")
    rows = {row[0]: row for row in _ext().genblock_algos_cpu()}
    assert rows["conv1"][8] == "phase" and rows["conv1"][9] == {}
    assert rows["conv2"][8] == "conv" and rows["conv2"][9] == {}
    algos("auto", "auto")  # the cost model picks among the same candidates
    _ext().genblock_algos_clear_cpu()
    assert _ext().genblock_algo_cpu("conv1", 1100, 4, 4, 16, 16) == "phase"
    assert _ext().genblock_algo_cpu("conv2", 1100, 4, 4, 32, 32) == "conv"


# (conv, n, cin, cout, h, w) -> auto's algorithm, on shapes where it is at least 1.7x faster than
# each other candidate on the machine the model was fitted on (h, w: the conv's input size)
CLEAR_CUT = [
    (("conv1", 8, 1024, 1024, 4, 4), "gemm"),
    (("conv1", 32, 16, 16, 32, 32), "phase"),
    (("conv1", 2, 8, 8, 4, 4), "gemm"),
    (("conv2", 8, 1024, 1024, 8, 8), "gemm"),
    (("conv2", 32, 32, 32, 32, 32), "conv"),
    (("conv2", 2, 8, 8, 8, 8), "gemm"),
]


def test_auto_is_a_cost_model_of_the_shape(algos):
    """auto's pick is a function of the shape: nothing is timed or cached (every process and rank
    picks the same), a block call runs the modelled algorithms, and they are the fastest on
    clear-cut shapes."""
    algos(None, "auto")
    _ext().genblock_algos_clear_cpu()
    for shape, want in CLEAR_CUT:
        assert _ext().genblock_algo_cpu(*shape) == want, shape
    a = block_inputs(3, 8, 6, 4, 4)
    b = clone(a)
    b["x"].requires_grad_(True)
    out = gb.genblock(**b, impl="cpp")
    assert _ext().genblock_algos_cpu() == [] and gb.chosen_algorithms() == []
    modelled = [_ext().genblock_algo_cpu("conv1", 3, 8, 6, 4, 4), _ext().genblock_algo_cpu("conv2", 3, 6, 6, 8, 8)]
    assert _saved_algos(out) == [CONV1.index(modelled[0]), CONV2.index(modelled[1])]
    algos("timed", None)  # the timed mode has nothing for the shape yet
    assert _ext().genblock_algo_cpu("conv1", 3, 8, 6, 4, 4) is None
    assert _ext().genblock_algo_cpu("conv2", 3, 6, 6, 8, 8) == modelled[1]
    algos("upsample", None)
    assert _ext().genblock_algo_cpu("conv1", 3, 8, 6, 4, 4) == "upsample"
    with pytest.raises(ValueError, match="unknown conv 'conv3'"):
        _ext().genblock_algo_cpu("conv3", 3, 8, 6, 4, 4)


TIMINGS = Path(__file__).resolve().parents[2] / "benchmarks/results/cpu-2core-xeon/genblock/algo_timings.json"


def test_cost_model_reproduces_its_fit(algos):
    """The model's picks against the timings it was fitted to (every candidate timed per shape on
    the 2-core Xeon): the fastest for 74 of 76 convs (the other two are near ties), and the picks'
    total time within 1.5 % of the best picks'."""
    algos(None, None)
    _ext().genblock_algos_clear_cpu()
    rows = json.loads(TIMINGS.read_text())["rows"]
    right, picked, best = 0, 0.0, 0.0
    for *shape, dtype, seconds in rows:
        pick = _ext().genblock_algo_cpu(*shape, dtype)
        fastest = min(seconds, key=seconds.get)
        right += pick == fastest
        picked += seconds[pick]
        best += seconds[fastest]
    assert len(rows) == 76 and right >= 74, right
    assert picked <= 1.015 * best, (picked, best)


def test_timed_choice_holds_for_any_thread_count(algos):
    """The timed choice is per shape and dtype, not per thread count: results stay bit-identical
    across thread counts (weight gradients aside: oneDNN and the GEMMs may block them
    differently)."""
    algos("timed", "timed")
    _ext().genblock_algos_clear_cpu()
    a = block_inputs(3, 8, 6, 12, 10)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(gb.genblock, a, BLOCK_GRADS, "cpp")
        rows = _ext().genblock_algos_cpu()
        torch.set_num_threads(2)
        two = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    finally:
        torch.set_num_threads(threads)
    assert _ext().genblock_algos_cpu() == rows
    assert torch.equal(one[0], two[0])
    for k in ("x", "embed1", "bias1", "embed2", "bias2", "bias0"):
        assert torch.equal(one[1][k], two[1][k]), k


def _saved_algos(out: torch.Tensor) -> list[int]:
    """The algorithm record among the tensors autograd saved for out's backward (an int64 tensor
    of 2 values; the test inputs have batch 3, so it is the only one)."""
    found = [t for t in out.grad_fn.saved_tensors if t.dtype == torch.int64 and t.shape == (2,)]
    assert len(found) == 1
    return found[0].tolist()


@pytest.mark.parametrize(("first", "then"), [(("gemm", "gemm"), ("phase", "conv")),
                                             (("phase", "conv"), ("upsample", "gemm"))])  # fmt: skip
def test_backward_runs_the_algorithms_its_forward_recorded(algos, first, then):
    a = block_inputs(3, 6, 5, 4, 4)
    algos(*first)
    want = run(gb.genblock, a, BLOCK_GRADS, "cpp")  # forward and backward under `first`

    b = clone(a)
    for k in BLOCK_GRADS:
        b[k].requires_grad_(True)
    out = gb.genblock(**b, impl="cpp")
    assert _saved_algos(out) == [CONV1.index(first[0]), CONV2.index(first[1])]
    algos(*then)  # changed between forward and backward: the backward keeps `first`
    go = torch.randn(out.shape, generator=_gen("go", tuple(out.shape), 1)).to(out)  # as run() draws it
    got = torch.autograd.grad(out, [b[k] for k in BLOCK_GRADS], go)
    assert torch.equal(out.detach(), want[0])
    for k, g in zip(BLOCK_GRADS, got):
        assert torch.equal(g, want[1][k]), k


def test_bad_algorithm_name_is_an_error_naming_the_choices(algos):
    a = block_inputs(2, 3, 4, 2, 2)
    algos("winograd", None)
    with pytest.raises(ValueError, match=f"{ENV1}=winograd is not one of auto, timed, phase, gemm, upsample"):
        gb.genblock(**a, impl="cpp")
    algos(None, "fft")
    with pytest.raises(ValueError, match=f"{ENV2}=fft is not one of auto, timed, conv, gemm"):
        gb.genblock(**a, impl="cpp")


@pytest.mark.parametrize(("conv1", "conv2"), [("upsample", "gemm"), ("gemm", "conv")])
@pytest.mark.parametrize("mode", ["auto", "timed"])
def test_restored_choices_win_over_the_model_and_a_new_timing(algos, conv1, conv2, mode):
    """chosen_algorithms() rows put back with restore_algorithms() (a resumed run) are the
    choices for their shapes in either mode: no timing, and the same numbers as forcing those
    algorithms."""
    shape = (2, 6, 5, 4, 4)
    a = block_inputs(*shape)
    algos(conv1, conv2)
    forced = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    algos(mode, mode)
    _ext().genblock_algos_clear_cpu()
    n, cin, cout, h, w = shape
    gb.restore_algorithms([["conv1", n, cin, cout, h, w, "Float", conv1],
                           ["conv2", n, cout, cout, 2 * h, 2 * w, "Float", conv2]])  # fmt: skip
    assert _chosen(*shape) == {"conv1": conv1, "conv2": conv2}
    restored = run(gb.genblock, a, BLOCK_GRADS, "cpp")
    rows = {row[0]: row for row in _ext().genblock_algos_cpu()}
    assert rows["conv1"][9] == {} and rows["conv2"][9] == {}  # nothing was timed
    assert torch.equal(restored[0], forced[0])
    for k in BLOCK_GRADS:
        assert torch.equal(restored[1][k], forced[1][k]), k
    assert sorted(gb.chosen_algorithms()) == sorted([["conv1", n, cin, cout, h, w, "Float", conv1],
                                                     ["conv2", n, cout, cout, 2 * h, 2 * w, "Float", conv2]])  # fmt: skip


def test_restore_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown conv1 algorithm 'fft'"):
        gb.restore_algorithms([["conv1", 1, 2, 3, 4, 4, "Float", "fft"]])
    with pytest.raises(ValueError, match="unknown conv 'conv3'"):
        gb.restore_algorithms([["conv3", 1, 2, 3, 4, 4, "Float", "gemm"]])
