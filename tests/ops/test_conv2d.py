"""The convolution op (mgm_fast.ops.conv2d): each algorithm of the cpp backend against the reference
twin (outputs and gradients; within the 2x-error rule against float64 truth), auto's cost model,
the timed mode and its record, the remembered backend selection, forced backends that cannot run,
argument errors, and the networks' convolution layers with the op."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mgm_fast import _native
from mgm_fast.config import ModelConfig
from mgm_fast.models.layers import Conv2d, SNConv2d, use_conv_impl
from mgm_fast.models.multitask import MultiTaskNet
from mgm_fast.ops import BackendUnavailable
from mgm_fast.ops._selftest import run_op
from mgm_fast.ops.conv2d import OP, chosen_algorithms, conv2d, restore_algorithms

needs_cpp = pytest.mark.skipif(_native.cpp_reason() is not None, reason="C++ extension unavailable")

# (input shape, cout, kernel, stride, padding, bias): odd sizes, 1x1 / 3x3 / 5x5, strides 1 and 2
SHAPES = [
    ((3, 5, 9, 11), 7, 3, 1, 1, True),
    ((2, 8, 10, 10), 3, 5, 2, 2, False),
    ((2, 6, 7, 7), 4, 1, 2, 0, True),
    ((4, 16, 4, 4), 32, 3, 2, 1, False),
    ((1, 3, 6, 5), 2, 2, 2, 0, True),
]


@pytest.fixture
def algo(monkeypatch):
    """Sets how the cpp backend picks its algorithm ("auto", "timed", "conv" or "gemm") through the
    environment."""
    if _native.cpp_reason() is not None:
        pytest.skip("C++ extension unavailable")

    def force(name):
        monkeypatch.setenv("MGM_FAST_CONV2D_ALGO", name)

    return force


def _inputs(shape, cout, kernel, bias, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(cout, shape[1], kernel, kernel, generator=gen) / (shape[1] * kernel)).to(dtype)
    w = w.contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=gen).to(dtype) if bias else None
    return x, w, b


def _run(impl, x, w, b, stride, padding, seed=1):
    """(output, [grad x, grad w, grad b]) for a random output gradient."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    out = conv2d(leaves[0], leaves[1], leaves[2], stride, padding, impl=impl)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    out.backward(grad)
    return out.detach(), [t.grad if t is not None else None for t in leaves]


@needs_cpp
def test_selftest_cases_pass_on_the_cpu():
    """Every small case follows the 2x-error rule for the output and the input, weight and bias
    gradients (channels_last: NCHW inputs are not the backend's)."""
    results = run_op(OP, "cpu", sizes=("small",))
    ran = [r for r in results if r.verdict != "n/a"]
    assert ran and all(r.verdict == "pass" for r in ran), [(r.case, r.layout, r.detail) for r in ran]
    assert {r.layout for r in ran} == {"channels_last"}


@pytest.mark.parametrize("name", ["conv", "gemm"])
@pytest.mark.parametrize(("shape", "cout", "kernel", "stride", "padding", "bias"), SHAPES)
def test_each_algorithm_within_the_two_x_error_rule(algo, name, shape, cout, kernel, stride, padding, bias):
    algo(name)
    x, w, b = _inputs(shape, cout, kernel, bias)
    got_out, got_grads = _run("cpp", x, w, b, stride, padding)
    plain_out, plain_grads = _run("reference", x, w, b, stride, padding)
    truth_out, truth_grads = _run("reference", *(t.double() if t is not None else None for t in (x, w, b)),
                                  stride, padding)  # fmt: skip
    assert got_out.is_contiguous(memory_format=torch.channels_last)
    assert got_grads[0].is_contiguous(memory_format=torch.channels_last)
    for got, plain, truth in zip([got_out, *got_grads], [plain_out, *plain_grads], [truth_out, *truth_grads]):
        if truth is None:
            continue
        err = (got.double() - truth).abs().max().item()
        bound = max(2 * (plain.double() - truth).abs().max().item(), 1e-6 * truth.abs().max().item())
        assert err <= bound, (name, err, bound)


def test_eager_path_runs_atens_own_op_per_algorithm(algo):
    """The eager path adds no autograd node: the output's backward is ATen's own for the
    algorithm (ConvolutionBackward for oneDNN, SlowConv2DBackward for im2col + GEMM)."""
    x, w, _ = _inputs((2, 4, 6, 6), 4, 3, False)
    x.requires_grad_()
    for name, node in (("conv", "ConvolutionBackward0"), ("gemm", "SlowConv2DBackward0")):
        algo(name)
        assert type(conv2d(x, w, None, 1, 1, impl="cpp").grad_fn).__name__ == node


# (input shape, cout, kernel, stride, padding) -> the cost model's algorithm, on shapes where one
# algorithm is at least 1.7x faster than the other on the machine the model was fitted on
CLEAR_CUT = [
    ((8, 32, 4, 4), 32, 3, 1, 1, "gemm"),
    ((8, 16, 16, 16), 24, 1, 2, 0, "gemm"),
    ((8, 48, 2, 2), 48, 3, 1, 1, "gemm"),
    ((8, 8, 64, 64), 8, 3, 1, 1, "conv"),
    ((8, 3, 64, 64), 16, 5, 2, 2, "conv"),
    ((8, 16, 32, 32), 16, 3, 1, 1, "conv"),
]


def test_auto_is_a_cost_model_of_the_shape(algo):
    """auto's pick is a function of the shape (no timing, nothing cached: every process and rank
    picks the same), the faster algorithm on clear-cut shapes."""
    algo("auto")
    ext = _native.extension()
    ext.conv2d_algos_clear_cpu()
    for shape, cout, kernel, stride, padding, want in CLEAR_CUT:
        x = torch.zeros(shape).contiguous(memory_format=torch.channels_last)
        w = torch.zeros(cout, shape[1], kernel, kernel).contiguous(memory_format=torch.channels_last)
        got = ext.conv2d_algo_cpu(x, w, None, [stride, stride], [padding, padding])
        assert ("gemm" if got == 1 else "conv") == want, (shape, cout, kernel)
    assert ext.conv2d_algos_cpu() == [] and chosen_algorithms() == []


TIMINGS = Path(__file__).resolve().parents[2] / "benchmarks/results/cpu-2core-xeon/conv2d/algo_timings.json"


def test_cost_model_reproduces_its_fit(algo):
    """The model's picks against the timings it was fitted to (both algorithms timed per shape on
    the 2-core Xeon): the faster one for 85 of 87 shapes, and the picks' total time within 0.5 %
    of the best picks' (oneDNN for all is 32 % over)."""
    algo("auto")
    ext = _native.extension()
    ext.conv2d_algos_clear_cpu()
    rows = json.loads(TIMINGS.read_text())["rows"]
    right, picked, best = 0, 0.0, 0.0
    for n, cin, h, w, cout, kh, kw, sh, sw, ph, pw, seconds in rows:
        x = torch.empty(n, cin, h, w).contiguous(memory_format=torch.channels_last)
        weight = torch.empty(cout, cin, kh, kw).contiguous(memory_format=torch.channels_last)
        pick = "gemm" if ext.conv2d_algo_cpu(x, weight, None, [sh, sw], [ph, pw]) == 1 else "conv"
        fastest = min(seconds, key=seconds.get)
        right += pick == fastest
        picked += seconds.get(pick, seconds["conv"])
        best += seconds[fastest]
    assert len(rows) == 87 and right >= 85, right
    assert picked <= 1.005 * best, (picked, best)


def test_timed_mode_times_once_records_a_valid_choice_and_restores_it(algo):
    algo("timed")
    ext = _native.extension()
    ext.conv2d_algos_clear_cpu()
    x, w, b = _inputs((2, 8, 6, 6), 8, 3, True)
    first = _run("cpp", x, w, b, 1, 1)
    rows = ext.conv2d_algos_cpu()
    assert len(rows) == 1
    row = rows[0]
    assert row[:11] == (2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1)
    timed = row[13]
    assert set(timed) == {"conv", "gemm"} and row[12] == min(timed, key=timed.get)
    assert chosen_algorithms() == [[2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, row[12]]]
    # cached: the next call does not time again, and runs the same algorithm (same bits)
    again = _run("cpp", x, w, b, 1, 1)
    assert ext.conv2d_algos_cpu() == rows
    assert torch.equal(again[0], first[0]) and all(torch.equal(p, q) for p, q in zip(again[1], first[1]))
    # a resumed run takes the recorded choice back instead of timing, and auto keeps it too
    other = "conv" if row[12] == "gemm" else "gemm"
    for mode in ("timed", "auto"):
        algo(mode)
        ext.conv2d_algos_clear_cpu()
        restore_algorithms([[2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, other]])
        _run("cpp", x, w, b, 1, 1)
        assert chosen_algorithms() == [[2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, other]]
        assert ext.conv2d_algo_cpu(x, w, b, [1, 1], [1, 1]) == (1 if other == "gemm" else 0)
    with pytest.raises(ValueError, match="unknown algorithm 'winograd'"):
        restore_algorithms([[2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1, "winograd"]])
    ext.conv2d_algos_clear_cpu()


def test_oneDNN_untimed_where_the_columns_are_too_large(algo):
    algo("timed")
    ext = _native.extension()
    ext.conv2d_algos_clear_cpu()
    # im2col columns of 8 x (64 x 25) x 64 x 64 floats (210 MB): beyond auto's 64 MiB limit
    x = torch.zeros(8, 64, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(4, 64, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        conv2d(x, w, None, 1, 2, impl="cpp")
    (row,) = ext.conv2d_algos_cpu()
    assert row[12] == "conv" and row[13] == {}
    ext.conv2d_algos_clear_cpu()
    algo("auto")
    assert ext.conv2d_algo_cpu(x, w, None, [1, 1], [2, 2]) == 0


def test_a_bad_forced_algorithm_is_an_error_naming_the_variable(algo):
    algo("winograd")
    x, w, _ = _inputs((1, 2, 4, 4), 2, 3, False)
    with pytest.raises(ValueError, match="MGM_FAST_CONV2D_ALGO=winograd is not one of auto, timed, conv, gemm"):
        conv2d(x, w, None, 1, 1, impl="cpp")


@needs_cpp
def test_auto_takes_cpp_for_channels_last_float32_and_remembers_per_kind(monkeypatch):
    x, w, _ = _inputs((1, 2, 4, 4), 2, 3, False)
    assert OP.select("auto", x, w, None).name == "cpp"
    assert OP.select("auto", x.contiguous(), w, None).name == "reference"
    assert OP.select("auto", x.double(), w.double(), None).name == "reference"
    # the remembered selection follows the layout, the forced backend and the exclusions
    OP._selected.clear()
    conv2d(x, w, None, 1, 1)
    conv2d(x.contiguous(), w, None, 1, 1)
    assert sorted(b.name for b in OP._selected.values()) == ["cpp", "reference"]
    monkeypatch.setenv("MGM_FAST_IMPL_CONV2D", "reference")
    calls = []

    def counted(input, weight, bias, stride=(1, 1), padding=(0, 0)):  # the reference's argument list
        calls.append(input)
        return F.conv2d(input, weight, bias, stride, padding)

    monkeypatch.setattr(OP.backends["reference"], "fn", counted)
    conv2d(x, w, None, 1, 1)
    assert len(calls) == 1
    monkeypatch.delenv("MGM_FAST_IMPL_CONV2D")
    monkeypatch.setitem(OP.exclusions, "cpp", "failed its self-test here")
    conv2d(x, w, None, 1, 1)
    assert len(calls) == 2


@needs_cpp
def test_forced_cpp_refuses_what_it_cannot_run():
    x, w, _ = _inputs((1, 2, 4, 4), 2, 3, False)
    with pytest.raises(BackendUnavailable, match="channels_last"):
        conv2d(x.contiguous(), w, None, 1, 1, impl="cpp")
    with pytest.raises(BackendUnavailable, match="dtype"):
        conv2d(x.double(), w.double(), None, 1, 1, impl="cpp")
    # ATen's im2col + GEMM backward needs the weight in the input's layout
    with pytest.raises(BackendUnavailable, match="weight must be channels_last"):
        conv2d(x, w.contiguous(), None, 1, 1, impl="cpp")
    assert OP.select("auto", x, w.contiguous(), None).name == "reference"


def test_argument_errors_name_the_tensor():
    x, w, _ = _inputs((1, 2, 4, 4), 2, 3, False)
    conv2d(x, w, None, 1, 1)  # a good call first: the check runs once per kind of call
    for _ in range(2):  # a bad call is never remembered: the second raises too
        with pytest.raises(ValueError, match="input must be a floating"):
            conv2d(x[0], w, None)
        with pytest.raises(ValueError, match="weight must be"):
            conv2d(x, w[:, :1], None)
        with pytest.raises(ValueError, match="bias must be"):
            conv2d(x, w, torch.zeros(3))
        with pytest.raises(ValueError, match="stride must be positive"):
            conv2d(x, w, None, 0)
        with pytest.raises(ValueError, match="smaller than the kernel"):
            conv2d(x[:, :, :1, :1], w, None)


def test_traced_call_times_and_restores_like_an_eager_one(algo):
    """torch.compile asks for the algorithm while it traces: in timed mode the shape is timed then
    (and recorded, as an eager call's choice is); a restored choice is the one the graph runs."""
    ext = _native.extension()
    x, w, b = _inputs((2, 8, 6, 6), 8, 3, True)
    key = [2, 8, 6, 6, 8, 3, 3, 1, 1, 1, 1]

    def compiled_grad_fn():
        torch._dynamo.reset()
        fn = torch.compile(lambda *a: conv2d(*a, 1, 1, impl="cpp"), fullgraph=True, backend="aot_eager",
                           dynamic=False)  # fmt: skip
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        out = fn(*leaves)
        grads = torch.autograd.grad(out.square().sum(), leaves)
        return out.detach(), grads

    algo("timed")
    ext.conv2d_algos_clear_cpu()
    compiled_grad_fn()
    assert [row[:11] for row in chosen_algorithms()] == [key]
    for chosen in ("conv", "gemm"):
        ext.conv2d_algos_clear_cpu()
        restore_algorithms([[*key, chosen]])
        out, grads = compiled_grad_fn()
        algo(chosen)  # the eager call of the same algorithm: the same bits
        want = [t.clone().requires_grad_() for t in (x, w, b)]
        want_out = conv2d(*want, 1, 1, impl="cpp")
        want_grads = torch.autograd.grad(want_out.square().sum(), want)
        assert torch.equal(out, want_out.detach()) and all(map(torch.equal, grads, want_grads))
        algo("timed")
    ext.conv2d_algos_clear_cpu()
    torch._dynamo.reset()


def test_layers_are_nn_conv2d_and_take_the_op(algo, monkeypatch):
    algo("gemm")
    layer = Conv2d(4, 6, 3, 2, 1).to(memory_format=torch.channels_last)
    assert isinstance(layer, torch.nn.Conv2d) and set(layer.state_dict()) == {"weight", "bias"}
    sn = SNConv2d(4, 6, 3, padding=1).to(memory_format=torch.channels_last)
    use_conv_impl(layer, "auto")
    use_conv_impl(sn, "auto")
    x = torch.randn(2, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    assert type(layer(x).grad_fn).__name__ == "SlowConv2DBackward0"
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 2, 1), rtol=1e-5, atol=1e-6)
    assert type(sn(x).grad_fn).__name__ == "SlowConv2DBackward0"


def test_networks_with_the_op_compute_what_torch_computes(algo):
    """A whole multi-task network (tiny widths) with every convolution on im2col + GEMM, against
    the same network on torch's convolutions: outputs and every weight gradient agree to float32
    rounding."""
    algo("gemm")
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, stem_width=8, encoder_widths=(8, 8, 8, 8), decoder_widths=(8, 8, 8, 8, 8))
    nets = {impl: MultiTaskNet(ModelConfig(**{**cfg.__dict__, "conv_impl": impl})) for impl in ("reference", "auto")}
    nets["auto"].load_state_dict(nets["reference"].state_dict())
    x = torch.randn(4, 3, 32, 32)
    outs = {}
    for impl, net in nets.items():
        net = net.to(memory_format=torch.channels_last)
        out = net(x)
        sum(o.square().mean() for o in out.values()).backward()
        outs[impl] = (out, {n: p.grad for n, p in net.named_parameters()})
    slow = [m for m in nets["auto"].modules() if isinstance(m, Conv2d)]
    assert slow and all(m.impl == "auto" for m in slow)
    for task in outs["reference"][0]:
        torch.testing.assert_close(outs["auto"][0][task], outs["reference"][0][task], rtol=1e-4, atol=1e-4)
    for name, grad in outs["reference"][1].items():
        torch.testing.assert_close(outs["auto"][1][name], grad, rtol=1e-3, atol=1e-4, msg=name)
