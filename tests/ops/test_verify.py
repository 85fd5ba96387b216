"""First-use verification of fused backends (mgm_fast.ops._verify), the environment overrides
and the record of what ran -- proven with a deliberately wrong backend injected into a real op."""

import json

import pytest
import torch

from mgm_fast import _native, train
from mgm_fast.ops import REGISTRY, BackendUnavailable
from mgm_fast.ops import _verify as verify
from mgm_fast.ops._selftest import cases_of, run_op

HAS_CPP = _native.cpp_reason() is None
needs_cpp = pytest.mark.skipif(not HAS_CPP, reason="C++ extension not built")
OP = "sagan_attention"  # cpp on the CPU, differentiable, used by the generator and discriminator


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(verify.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def clean_ops():
    """Exclusions and resolutions are process-wide: every test leaves them as it found them."""
    saved = {name: (dict(op.exclusions), dict(op.resolutions), dict(op.backends)) for name, op in REGISTRY.items()}
    yield
    for name, op in REGISTRY.items():
        op.exclusions, op.resolutions, op.backends = (dict(x) for x in saved[name])


@pytest.fixture
def broken_cpp(clean_ops):
    """The op's cpp backend with a wrong gradient: 1e-3 added to d theta (the output is right)."""
    op = REGISTRY[OP]
    good = op.backends["cpp"]

    class _WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, theta):
            return theta.view_as(theta)

        @staticmethod
        def backward(ctx, grad):
            return grad + 1e-3

    def wrong(theta, phi, g):
        return good.fn(_WrongGrad.apply(theta), phi, g)

    op.register(type(good)(name="cpp", fn=wrong, devices=good.devices, dtypes=good.dtypes,
                           availability=good.availability, extra_check=good.extra_check))
    return op


def _attention_inputs():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 2, 16, generator=gen), torch.randn(2, 2, 4, generator=gen), torch.randn(2, 4, 4, generator=gen)]


@needs_cpp
def test_selftest_catches_the_wrong_backend(broken_cpp):
    results = run_op(broken_cpp, "cpu", backends=["cpp"], sizes=("small",))
    assert results and all(r.verdict == "fail" for r in results if r.dtype == "float32")
    assert "d(arg 0)" in results[0].detail  # names the gradient that is wrong


@needs_cpp
def test_auto_excludes_a_failing_backend_with_a_warning(broken_cpp, fresh_cache):
    warnings = []
    verdicts = verify.verify_for_run("cpu", log=warnings.append)
    verdict = verdicts[OP]["cpp"]
    assert not verdict.passed and "d(arg 0)" in verdict.detail
    assert len(warnings) == 1 and "WARNING" in warnings[0] and OP in warnings[0] and "'cpp'" in warnings[0]
    assert broken_cpp.select("auto", *_attention_inputs()).name == "reference"
    with pytest.raises(BackendUnavailable, match="failed its self-test"):
        broken_cpp.select("cpp", *_attention_inputs())
    assert all(v.passed for name, per_op in verdicts.items() if name != OP for v in per_op.values())


@needs_cpp
def test_strict_verification_stops(broken_cpp, fresh_cache):
    with pytest.raises(verify.BackendVerificationError, match=f"'cpp' of op '{OP}' failed its self-test"):
        verify.verify_for_run("cpu", strict=True, log=lambda text: None)


@needs_cpp
def test_training_excludes_or_stops_on_a_failing_backend(broken_cpp, fresh_cache, tmp_path, capsys):
    argv = ["--method", "mgm", "--data", "synthetic:40", "--steps", "1", "--quiet",
            "--set", "schedule.batch_size=4", "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit, match="--strict-backends stops the run"):
        train.main([*argv, "--strict-backends"])
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert "WARNING" in err and OP in err
    record = json.loads((tmp_path / "run" / "backends.json").read_text())["ops"][OP]
    assert not record["verification"]["cpp"]["passed"]
    assert record["auto_picks"] == "reference" and "failed its self-test" in record["not_picked"]["cpp"]
    assert {how["backend"] for how in record["resolved"].values()} == {"reference"}


@needs_cpp
def test_verdicts_are_cached_per_source(fresh_cache, monkeypatch, clean_ops):
    op = REGISTRY[OP]
    first = verify.verify(op, "cpp", "cpu")
    assert first.passed and not first.cached and "cases passed" in first.detail
    assert (fresh_cache / "verified" / f"{first.key}.json").is_file()
    again = verify.verify(op, "cpp", "cpu")
    assert again.cached and again.key == first.key
    monkeypatch.setattr(verify, "source_hash", lambda op, backend: "another build")
    changed = verify.verify(op, "cpp", "cpu")
    assert not changed.cached and changed.key != first.key


def test_every_op_has_cases():
    for name, op in REGISTRY.items():
        sizes = {c.size for c in cases_of(op)}
        assert sizes == {"small", "paper"}, name


def test_environment_forces_backends(monkeypatch, clean_ops):
    inputs = _attention_inputs()
    op = REGISTRY[OP]
    monkeypatch.setenv("MGM_FAST_IMPL", "reference")
    assert op.select("auto", *inputs).name == "reference"
    assert op.select("cpp", *inputs).name == "reference"  # the environment wins over impl=
    if HAS_CPP:
        monkeypatch.setenv("MGM_FAST_IMPL_SAGAN_ATTENTION", "cpp")  # one op differently
        assert op.select("auto", *inputs).name == "cpp"
    monkeypatch.setenv("MGM_FAST_IMPL", "cpp")
    monkeypatch.delenv("MGM_FAST_IMPL_SAGAN_ATTENTION", raising=False)
    with pytest.raises(ValueError, match=r"MGM_FAST_IMPL='cpp'.*MGM_FAST_IMPL_<OP>"):
        op.select("auto", *inputs)
    monkeypatch.setenv("MGM_FAST_IMPL", "auto")
    monkeypatch.setenv("MGM_FAST_IMPL_SAGAN_ATTENTION", "fast")
    with pytest.raises(ValueError, match="MGM_FAST_IMPL_SAGAN_ATTENTION='fast'"):
        op.select("auto", *inputs)


def test_selections_are_recorded(clean_ops):
    op = REGISTRY[OP]
    op.resolutions.clear()
    op(*_attention_inputs())
    (kind, how), = op.resolutions.items()
    assert kind == "cpu float32" and how["backend"] == ("cpp" if HAS_CPP else "reference")
    record = verify.backends_record("cpu", {})
    assert record["ops"][OP]["resolved"] == {kind: how}
    assert record["device"]["type"] == "cpu"


def test_triton_launch_probe_kernel_computes():
    pytest.importorskip("triton")
    from mgm_fast.ops._dispatch import triton_interpreting

    if not triton_interpreting() and not torch.cuda.is_available():
        pytest.skip("Triton needs the interpreter or a GPU")
    from mgm_fast.ops._triton import probe

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(5, dtype=torch.float32, device=device)
    assert torch.equal(probe.add_one(x).cpu(), torch.arange(1, 6, dtype=torch.float32))


@pytest.mark.gpu
def test_launch_probes_pass_on_this_gpu():
    from mgm_fast.ops._dispatch import triton_reason

    assert _native.cuda_reason() is None  # the extension's kernels launched
    assert triton_reason() is None  # the probe kernel compiled, ran and computed x + 1


def test_verification_leaves_the_global_random_streams_alone(tmp_path, monkeypatch):
    # A run's numbers must not depend on whether its backends were verified now or read from
    # the cache: self-tests that build modules or draw inputs may not consume the global RNG.
    monkeypatch.setenv("MGM_FAST_CACHE_DIR", str(tmp_path))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    ran = 0
    for op in REGISTRY.values():
        for backend in verify.candidates(op, torch.device("cpu")):
            verify.verify(op, backend, "cpu", dtypes=(torch.float32,), use_cache=False)
            ran += 1
            assert torch.equal(torch.get_rng_state(), before), f"{op.name}/{backend} moved the global RNG"
    assert ran >= 3
