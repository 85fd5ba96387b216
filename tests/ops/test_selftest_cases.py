"""The self-test cases of every fused op (``FusedOp.selftest_cases``, mgm_fast.ops._selftest).

1. Every registered op lists small and paper cases with unique names, and every case builds
   deterministically (the same generator seed gives equal inputs) as float64 / integer CPU tensors
   whose ``grad`` / ``channels_last`` / ``keep_float32`` entries name real arguments.
2. Every small case passes the 2x-error rule for every fused backend available here (cpp on the
   CPU; triton under the interpreter, which tests/conftest.py turns on) at float32 in both layouts.
3. The rule really checks: a backend wrong by 1e-3 in one tensor fails, naming it, for an op with
   gradients (multitask_loss: a gradient, a loss) and for results without autograd (simclr_views,
   noisy's draw); twins of another noise stream fail. A wrong float64 twin cannot fail the rule
   (its error shows in the plain path's error as much as in the fused one), so every twin is also
   checked against the reference backend.
4. The paper preset's cases on the cpp backend (triton under the interpreter for the hinge
   losses, which have no cpp backend and whose paper inputs are 32 scores), one test per op; the
   slow ones (> ~10 s on the 2-core CPU) are marked ``slow``. Known kernel findings xfail with
   their reason (:data:`KNOWN_PAPER_FAILURES`); any other failure fails.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import mgm_fast.ops  # noqa: F401  (registers every op)
from mgm_fast.ops import REGISTRY
from mgm_fast.ops import _selftest as st
from mgm_fast.ops._dispatch import FusedOp, triton_interpreting

OPS = sorted(REGISTRY)
FUSED = ("cpp", "triton", "cuda")
CPU = torch.device("cpu")


def _device_of(backend: str) -> torch.device | None:
    """Where the backend's tensors live in this process (None: nowhere here)."""
    if backend == "cpp" or (backend == "triton" and triton_interpreting()):
        return CPU
    return torch.device("cuda") if torch.cuda.is_available() else None


def _runnable(op: FusedOp) -> list[str]:
    return [b for b in FUSED if b in op.backends and op.backends[b].unavailable_reason() is None
            and _device_of(b) is not None]  # fmt: skip


def _values(inputs: st.Inputs) -> list[tuple[str, object]]:
    """Every argument of a case, dicts and sequences flattened: (path, value)."""
    out: list[tuple[str, object]] = []

    def walk(path, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{path}[{k!r}]", v)
        elif isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
            for i, v in enumerate(value):
                walk(f"{path}[{i}]", v)
        else:
            out.append((path, value))

    for i, v in enumerate(inputs.args):
        walk(f"arg {i}", v)
    for k, v in inputs.kwargs.items():
        walk(k, v)
    return out


def _members(value) -> list:
    """The tensors of a group argument (list/tuple), or the argument itself."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _argument(inputs: st.Inputs, key: int | str):
    return inputs.kwargs[key] if isinstance(key, str) else inputs.args[key]


# ops whose paper cases take more than ~10 s on the 2-core CPU (building and running them)
SLOW_PAPER = {"cbn_relu_conv3x3", "genblock", "multitask_loss"}


def _paper_param(name):
    return pytest.param(name, id=name, marks=[pytest.mark.slow] if name in SLOW_PAPER else [])


def _describe(r: st.Result) -> str:
    return f"{r.op} / {r.backend} / {r.case} / {r.dtype} / {r.layout}: {r.verdict} {r.detail}"


# ---------------------------------------------------------------------------------------------
# 1. every op lists its cases; they build deterministically


@pytest.mark.parametrize("name", OPS)
def test_every_op_has_small_and_paper_cases_with_unique_names(name):
    cases = st.cases_of(REGISTRY[name])
    assert {c.size for c in cases} == set(st.SIZES), f"{name}: sizes {sorted({c.size for c in cases})}"
    names = [c.name for c in cases]
    assert len(set(names)) == len(names), f"{name}: duplicate case names {names}"
    assert all(c.op == name for c in cases)
    assert 2 <= sum(c.size == "small" for c in cases) <= 4
    for c in cases:
        assert c.backends is None or set(c.backends) <= set(REGISTRY[name].backends) - {"reference"}


def _build_checks(case: st.Case) -> None:
    a = case.build(torch.Generator().manual_seed(0))
    b = case.build(torch.Generator().manual_seed(0))
    va, vb = _values(a), _values(b)
    assert [p for p, _ in va] == [p for p, _ in vb]
    for (path, x), (_, y) in zip(va, vb):
        if isinstance(x, torch.Tensor):
            assert x.device.type == "cpu", f"{case.name}: {path} on {x.device}"
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), f"{case.name}: {path} differs"
        else:
            assert x == y, f"{case.name}: {path} differs"
    # floating arguments are float64 (the self-test casts them; a dict argument passes untouched)
    for key, value in [*enumerate(a.args), *a.kwargs.items()]:
        for x in _members(value):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                assert x.dtype == torch.float64, f"{case.name}: {key!r} is {x.dtype}"
    for key in a.grad:  # a tensor, or a group (list/tuple) of tensors that all get gradients
        for t in _members(_argument(a, key)):
            assert isinstance(t, torch.Tensor) and t.is_floating_point(), f"{case.name}: grad {key!r}"
    for key in a.channels_last:  # a 4-d tensor, or a group with 4-d members (the others stay)
        t = _argument(a, key)
        if isinstance(t, (list, tuple)):
            assert any(isinstance(m, torch.Tensor) and m.dim() == 4 for m in t), f"{case.name}: channels_last {key!r}"
        else:
            assert t is None or (isinstance(t, torch.Tensor) and t.dim() == 4), f"{case.name}: channels_last {key!r}"
    for key in a.keep_float32:
        t = _argument(a, key)
        assert t is None or isinstance(t, torch.Tensor), f"{case.name}: keep_float32 {key!r}"
    other = case.build(torch.Generator().manual_seed(1))
    assert any(isinstance(x, torch.Tensor) and not torch.equal(x, y)
               for (_, x), (_, y) in zip(va, _values(other))), f"{case.name}: the seed changes nothing"  # fmt: skip


@pytest.mark.parametrize("name", OPS)
def test_small_cases_build_deterministically(name):
    for case in st.cases_of(REGISTRY[name], ("small",)):
        _build_checks(case)


@pytest.mark.parametrize("name", [_paper_param(n) for n in OPS])
def test_paper_cases_build_deterministically(name):
    for case in st.cases_of(REGISTRY[name], ("paper",)):
        _build_checks(case)


# ---------------------------------------------------------------------------------------------
# 2. every small case passes for every fused backend available here, float32, both layouts

SMALL = [pytest.param(name, backend, id=f"{name}-{backend}") for name in OPS for backend in _runnable(REGISTRY[name])]
# (op, backend) -> why n/a is expected: documented limitations only.
EXPECTED_NA: dict[tuple[str, str], str] = {
    ("batch_norm", "cpp"): "channels_last inputs only: torch's NCHW backward is fast",
    ("conv2d", "cpp"): "channels_last inputs only: the algorithms are timed for that layout",
}


@pytest.mark.parametrize(("name", "backend"), SMALL)
def test_small_cases_pass(name, backend):
    op = REGISTRY[name]
    results = st.run_op(op, _device_of(backend), [backend], (torch.float32,), st.LAYOUTS, ("small",))
    assert results, f"{name}: no small case ran on {backend}"
    for r in results:
        if r.verdict == "n/a":
            assert r.detail and (name, backend) in EXPECTED_NA, _describe(r)
        else:
            assert r.verdict == "pass", _describe(r)
            assert math.isfinite(r.error) and r.error <= r.bound, _describe(r)


# ---------------------------------------------------------------------------------------------
# 3. the rule really checks


class _NudgeGrad(torch.autograd.Function):
    """Identity forward; backward adds 1e-3 of the gradient's largest entry to its first element."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[(0,) * g.dim()] += 1e-3 * g.abs().max().clamp_min(1e-30)
        return g


def _with_backend(op: FusedOp, name: str, fn) -> FusedOp:
    """A copy of op whose backend ``name`` runs fn (same devices, dtypes and checks)."""
    fake = FusedOp(name=op.name, summary=op.summary, backends=dict(op.backends))
    fake.backends[name] = dataclasses.replace(op.backends[name], fn=fn)
    return fake


def _nudged_output(fn, index: int):
    """fn, plus 1e-3 on the first element of its output number ``index`` (flattened order)."""

    def wrong(*args, **kwargs):
        out = fn(*args, **kwargs)
        seq = list(out) if isinstance(out, (tuple, list)) else [out]
        t = seq[index]
        seq[index] = t + torch.zeros_like(t).flatten().index_fill(0, torch.tensor([0]), 1e-3).view_as(t)
        return tuple(seq) if isinstance(out, (tuple, list)) else seq[0]

    return wrong


def _returns_noise(case: st.Case) -> bool:
    return case.op != "noisy" or case.build(torch.Generator().manual_seed(0)).kwargs["return_noise"]


def _first_small(name: str) -> st.Case:
    return st.cases_of(REGISTRY[name], ("small",))[0]


def _some_fused(name: str) -> str:
    runnable = _runnable(REGISTRY[name])
    if not runnable:
        pytest.skip(f"{name}: no fused backend runs here")
    return runnable[0]


def test_rule_flags_a_wrong_gradient():
    """multitask_loss: a backend whose d depth_pred is off by 1e-3 of its scale in one element."""
    name = "multitask_loss"
    backend = _some_fused(name)
    op = REGISTRY[name]
    real = op.backends[backend].fn

    def wrong(*args, **kwargs):
        kwargs["depth_pred"] = _NudgeGrad.apply(kwargs["depth_pred"])
        return real(*args, **kwargs)

    case = _first_small(name)
    good = st.run_case(op, backend, case, _device_of(backend), torch.float32)
    assert good.verdict == "pass", _describe(good)
    bad = st.run_case(_with_backend(op, backend, wrong), backend, case, _device_of(backend), torch.float32)
    assert bad.verdict == "fail" and bad.detail.startswith("ddepth_pred:"), _describe(bad)


def test_rule_flags_a_wrong_loss():
    """multitask_loss: a backend whose depth loss (out1) is 1e-3 off."""
    name = "multitask_loss"
    backend = _some_fused(name)
    op = REGISTRY[name]
    wrong = _with_backend(op, backend, _nudged_output(op.backends[backend].fn, 1))
    bad = st.run_case(wrong, backend, _first_small(name), _device_of(backend), torch.float32)
    assert bad.verdict == "fail" and bad.detail.startswith("out1:"), _describe(bad)


@pytest.mark.parametrize(("name", "index", "tensor"), [("simclr_views", 0, "out0"), ("noisy", 1, "out1")])
def test_rule_flags_a_wrong_result_without_autograd(name, index, tensor):
    """simclr_views (no autograd) and noisy's draw (non-differentiable): a backend whose result
    is 1e-3 off in one element fails, naming that result."""
    backend = _some_fused(name)
    op = REGISTRY[name]
    case = next(c for c in st.cases_of(op, ("small",)) if _returns_noise(c))
    device = _device_of(backend)
    assert st.run_case(op, backend, case, device, torch.float32).verdict == "pass"
    bad = st.run_case(_with_backend(op, backend, _nudged_output(op.backends[backend].fn, index)), backend, case, device,
                      torch.float32)  # fmt: skip
    assert bad.verdict == "fail" and bad.detail.startswith(f"{tensor}:"), _describe(bad)


def test_rule_flags_a_twin_of_another_noise_stream():
    """noisy: twins drawing the Philox stream of another seed fail (the cases' twins draw the
    kernels' stream, not torch.randn's)."""
    from mgm_fast.ops.gan_losses import noisy_twin

    def other_seed(x, std, seed_or_generator, **kwargs):
        return noisy_twin(x, std, seed_or_generator + 1, **kwargs)

    backend = _some_fused("noisy")
    case = next(c for c in st.cases_of(REGISTRY["noisy"], ("small",)) if _returns_noise(c))
    wrong = dataclasses.replace(case, truth=other_seed, plain=other_seed)
    bad = st.run_case(REGISTRY["noisy"], backend, wrong, _device_of(backend), torch.float32)
    assert bad.verdict == "fail" and bad.detail.startswith("out0:"), _describe(bad)


def _close_to_reference(name: str, case: st.Case) -> None:
    op = REGISTRY[name]
    inputs = case.build(torch.Generator().manual_seed(0))
    twin = st.evaluate(case.truth, inputs, torch.float64, "contiguous", CPU)
    ref = st.evaluate(op.backends["reference"].fn, inputs, torch.float64, "contiguous", CPU)
    assert [n for n, _ in twin] == [n for n, _ in ref], case.name
    for (n, t), (_, r) in zip(twin, ref):
        assert t.dtype == torch.float64, f"{case.name}: {n} is {t.dtype}"
        scale = max(t.abs().max().item(), 1e-30)
        # the references accumulate in float32
        assert (t - r.double()).abs().max().item() <= 1e-5 * scale, f"{case.name}: {n}"


TWINS = [pytest.param(n, id=n) for n in OPS if n != "noisy" and any(c.truth for c in st.cases_of(REGISTRY[n], ("small",)))]


@pytest.mark.parametrize("name", TWINS)
def test_truth_twins_agree_with_the_reference(name):
    """A wrong float64 twin would not fail the rule (its error shows in plain's error as much as in
    the fused one), so each twin is checked against the reference backend on the small cases
    (the noise twin draws another stream than the reference: it is checked by the cases)."""
    for case in st.cases_of(REGISTRY[name], ("small",)):
        if case.truth is not None:
            _close_to_reference(name, case)


# ---------------------------------------------------------------------------------------------
# 4. the paper preset's cases

# Known kernel findings (reported; the cases are right): (op, backend, layout) -> why.
KNOWN_PAPER_FAILURES = {
    ("genblock", "cpp", "contiguous"): (
        "cpp genblock runs its convs with oneDNN on channels_last buffers, whose float32 accumulation is "
        "~7x less accurate than the NCHW conv at the 1024-channel blocks: on NCHW inputs its dx / dembed "
        "errors reach 4-6x the plain reference's (in channels_last both are alike and the cases pass)"
    ),
}


@pytest.mark.parametrize("name", [_paper_param(n) for n in OPS])
def test_paper_cases(name):
    op = REGISTRY[name]
    cases = st.cases_of(op, ("paper",))
    if "cpp" in op.backends:
        backend = "cpp"
        if op.backends[backend].unavailable_reason():
            pytest.skip(f"cpp: {op.backends[backend].unavailable_reason()}")
        results = st.run_op(op, CPU, [backend], (torch.float32,), st.LAYOUTS, ("paper",))
    else:  # the hinge losses: 32 scores, cheap even on the Triton interpreter
        backend = _some_fused(name)
        results = [st.run_case(op, backend, c, _device_of(backend), torch.float32) for c in cases]
    assert {r.case for r in results} == {c.name for c in cases}
    failed = [r for r in results if r.verdict != "pass" and not (r.verdict == "n/a" and (name, r.backend) in EXPECTED_NA)]
    unexpected = [r for r in failed if (name, r.backend, r.layout) not in KNOWN_PAPER_FAILURES]
    assert not unexpected, "\n".join(_describe(r) for r in unexpected)
    if failed:
        why = {KNOWN_PAPER_FAILURES[name, r.backend, r.layout] for r in failed}
        pytest.xfail("; ".join(sorted(why)) + "\n" + "\n".join(_describe(r) for r in failed))
