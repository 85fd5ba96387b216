"""The fast engine with ``--compile``: every network compiled with ``fullgraph=True`` through the
public entry (``train.build_parser`` / ``setup`` / ``build_nets`` / ``make_context`` and the
engine's loader, as :func:`mgm_fast.stepcost.prepare` builds them), stepping phase A
(``gan_pretrain_step``), MGM (``mgm_step``) and MGM-light (``mgm_light_step``):

* no graph break anywhere (``fullgraph=True`` would raise on one; dynamo's counter stays empty),
* no recompilation after the first step of each kind (the graphs of every sub-step's
  trainability / grad mode / train-eval combination are compiled once),
* the losses and every weight and buffer after one step equal an eager run from the same seed
  (tolerances below).

The CI variant compiles with the ``aot_eager`` backend: dynamo (graph capture, the trace-safe
backend choice of the fused ops), AOTAutograd (fake kernels, functionalized buffer updates,
autograd of the custom ops), but no inductor code generation, which on two CPU cores costs
minutes. The slow variant runs the default inductor backend, as ``python -m mgm_fast.train
--compile`` does.

Tolerances. aot_eager runs the same kernels in the same order as eager: losses, weights and
buffers agree exactly (the comparison allows rtol 1e-5 on the losses and 1e-6 on the weights).
Inductor fuses and reorders float32 arithmetic, so activations and gradients differ from eager by
rounding, and Adam's first update is lr * m / (sqrt(v) + eps) = +-lr per element (m / sqrt(v) =
sign g): where a gradient is rounding noise (a conv bias before BatchNorm, whose true gradient is
0) or near 0, the sign can flip, moving that weight by up to 2 lr -- once per optimiser step that
touches it (an encoder weight takes seven in one MGM step). So with inductor:

* every weight and buffer within atol = 2 * steps * lr_max (lr_max the config's largest learning
  rate) -- the bound of those flips;
* at most 1% of all weight and buffer elements more than 1e-5 + 1e-3 |w| away from eager (the
  flips are rare: 0.2-0.3% on the tiny networks; a wrong kernel would move most of its layers);
* the losses within rtol 1e-2: a loss computed after earlier updates of the same step sees the
  flipped weights (largest seen: 1.8e-3, SimCLR on the weak batch after three encoder updates),
  the others agree to rounding (below 1e-6).
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch._dynamo.utils import counters

from mgm_fast import _native, stepcost, train
from mgm_fast.engine import schedule

pytestmark = pytest.mark.skipif(_native.cpp_reason() is not None,
                                reason=f"C++ extension unavailable: {_native.cpp_reason()}")  # fmt: skip

SMALL = [a for s in stepcost.FLOOR_SET for a in ("--set", s)]
"""The tiny preset's topology at the floor size of the step accounting (32x32, thin layers)."""
BATCH = 2
DIAGNOSE = False  # print every tensor's largest difference (for calibrating the tolerances, with -s)
ADAM_STEPS = {"phase-a": 1, "mgm": 7, "mgm-light": 5}
"""Most Adam updates one parameter takes in one step (gan_iters = 1 in the tiny preset; the
encoder in MGM: 3 multi_opt + 4 encoder_opt steps; in MGM-light 3 + 2)."""


def _prepare(method: str, compiled: bool, tmp_path, device: str = "cpu", mode: str = "default"):
    # Both runs on torch's BatchNorm: compiled networks keep nn.BatchNorm2d, while the eager fast
    # engine's BatchNorm on the CPU is the extension's (other rounding; tests/ops/test_batch_norm.py).
    # Both take the convolution op, which picks the same ATen algorithm per shape either way.
    extra = [*SMALL, "--precision", "fp32", "--compile", mode if compiled else "off",
             "--set", "model.batch_norm_impl=reference"]
    return stepcost.prepare(method, "fast", device, "tiny", BATCH, extra, out=tmp_path / f"{method}-{compiled}")


def _step(ctx, step_name: str, batches) -> dict[str, float]:
    schedule.execute(getattr(schedule, step_name), ctx, *next(batches))
    return {k: float(v) for k, v in ctx.pop_means().items()}


def _state(ctx) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in ctx.nets.state_dict().items()}


def _graphs() -> int:
    return counters["stats"].get("unique_graphs", 0)


def _warm_genblock_algorithms(ctx) -> None:
    """One generator forward on a copy (the run's own state stays untouched): the cpp GenBlock
    picks its up-conv algorithm by timing the first call of each shape, and that timing draws
    its stand-in input from the global RNG. Warmed here, neither run draws it mid-step, so both
    see the same random stream (and use the same algorithm)."""
    device = next(ctx.nets.generator.parameters()).device
    with torch.no_grad():
        z = torch.zeros(BATCH, ctx.cfg.model.z_dim, device=device)
        copy.deepcopy(ctx.nets.generator)(z, torch.zeros(BATCH, dtype=torch.int64, device=device))


def _compare(method: str, ctx, losses_c, losses_e, state_c, state_e, exact: bool) -> None:
    assert losses_c.keys() == losses_e.keys()
    rtol = 1e-5 if exact else 1e-2
    for name in losses_e:
        assert losses_c[name] == pytest.approx(losses_e[name], rel=rtol, abs=1e-6), (method, name)
    lr_max = max(group["lr"] for opt in ctx.optimizers.values() for group in opt.param_groups)
    atol = 1e-6 if exact else 2 * ADAM_STEPS[method] * lr_max
    assert state_c.keys() == state_e.keys()
    far = total = 0
    for name, eager in state_e.items():
        got = state_c[name]
        if not eager.is_floating_point():
            assert torch.equal(got, eager), name  # num_batches_tracked
            continue
        torch.testing.assert_close(got, eager, rtol=0 if exact else 1e-3, atol=atol, msg=f"{method}: {name}")
        n_far = ((got - eager).abs() > 1e-5 + 1e-3 * eager.abs()).sum().item()
        if DIAGNOSE:
            diff = (got - eager).abs().max().item()
            print(method, name, f"max |diff| {diff:.3e}", f"far {n_far / eager.numel():.4f}")
        far, total = far + n_far, total + eager.numel()
    assert far <= (0 if exact else 0.01 * total), f"{method}: {far} of {total} weight and buffer elements differ"


def _run(method_steps: list[tuple[str, str]], tmp_path, exact: bool, device: str = "cpu",
         mode: str = "default") -> None:  # fmt: skip
    """For each (prepare() method, schedule step) in order on one compiled and one eager context:
    one step compared with eager, then a second compiled step that must neither break nor
    recompile."""
    method = method_steps[0][0]
    torch._dynamo.reset()
    counters.clear()
    ctx_c, _, batches_c = _prepare(method, True, tmp_path, device, mode)
    ctx_e, _, batches_e = _prepare(method, False, tmp_path, device)
    _warm_genblock_algorithms(ctx_e)
    for name, step_name in method_steps:
        losses_c, losses_e = _both(ctx_c, ctx_e, step_name, batches_c, batches_e)
        assert not counters["graph_break"], dict(counters["graph_break"])
        _compare(name, ctx_e, losses_c, losses_e, _state(ctx_c), _state(ctx_e), exact)
        graphs = _graphs()
        assert graphs > 0, "nothing was compiled"
        _both(ctx_c, ctx_e, step_name, batches_c, batches_e)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert _graphs() == graphs, f"{name}: recompiled after the first step ({graphs} -> {_graphs()} graphs)"
        if device == "cpu":  # the compiled graphs run the convolution algorithms eager steps run
            rng = torch.get_rng_state()
            algos_c = _convolution_algorithms(_step, ctx_c, step_name, batches_c)
            torch.set_rng_state(rng)
            algos_e = _convolution_algorithms(_step, ctx_e, step_name, batches_e)
            assert algos_c == algos_e and algos_e["aten::_slow_conv2d_forward"] > 0, (name, algos_c, algos_e)
            assert _graphs() == graphs


def _convolution_algorithms(step, *args) -> dict[str, int]:
    """How many oneDNN and im2col + GEMM convolution forwards ``step(*args)`` runs (torch's
    profiler)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(*args)
    names = ("aten::mkldnn_convolution", "aten::_slow_conv2d_forward")
    counts = {e.key: e.count for e in prof.key_averages() if e.key in names}
    return {name: counts.get(name, 0) for name in names}


def _both(ctx_c, ctx_e, step_name, batches_c, batches_e):
    """One step of each run from the same global random state (the latents come from it)."""
    rng = torch.get_rng_state()
    losses_c = _step(ctx_c, step_name, batches_c)
    torch.set_rng_state(rng)
    return losses_c, _step(ctx_e, step_name, batches_e)


@pytest.fixture
def aot_eager(monkeypatch):
    """compile_nets with the aot_eager backend (what build_nets calls under --compile)."""
    monkeypatch.setattr(train, "compile_nets", functools.partial(train.compile_nets, backend="aot_eager"))


def test_compile_nets_compiles_every_network_with_fullgraph(monkeypatch):
    from mgm_fast.config import preset
    from mgm_fast.models import build_models

    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append((self, kw)))
    nets = build_models(preset("tiny").model, ("seg", "depth", "normal"))
    train.compile_nets(nets)
    mt = nets.multitask
    expected = [mt.encoder, *mt.decoders.values(), mt.clr_head, nets.refine, nets.bridge, nets.generator,
                nets.discriminator]  # fmt: skip
    assert [module for module, _ in seen] == expected
    assert all(kw == {"backend": "inductor", "dynamic": False, "fullgraph": True} for _, kw in seen), seen
    seen.clear()
    train.compile_nets(nets, mode="cudagraphs")  # CUDA graph replay: inductor's reduce-overhead mode
    assert [module for module, _ in seen] == expected
    assert all(kw == {"backend": "inductor", "dynamic": False, "fullgraph": True, "mode": "reduce-overhead"}
               for _, kw in seen), seen  # fmt: skip


def test_each_step_of_a_cuda_graphs_run_begins_a_new_generation(monkeypatch, tmp_path):
    """With CUDA graph replay every training step first marks a new step (the replays of the
    last one may then reuse their memory); an eager run never does."""
    from mgm_fast.engine import schedule

    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(len(marks)))
    ctx, _, batches = _prepare("mt", False, tmp_path)
    schedule.execute(lambda c, b: None, ctx, next(batches)[0])
    assert marks == []
    ctx.cuda_graphs = True
    for _ in range(2):
        schedule.execute(lambda c, b: None, ctx, next(batches)[0])
    assert marks == [0, 1]


def test_phase_a_and_mgm_compiled_match_eager(aot_eager, tmp_path):
    _run([("phase-a", "gan_pretrain_step"), ("mgm", "mgm_step")], tmp_path, exact=True)


def test_mgm_light_compiled_matches_eager(aot_eager, tmp_path):
    _run([("mgm-light", "mgm_light_step")], tmp_path, exact=True)


@pytest.mark.slow
@pytest.mark.parametrize("method_steps", [[("phase-a", "gan_pretrain_step"), ("mgm", "mgm_step")],
                                          [("mgm-light", "mgm_light_step")]], ids=["phase-a+mgm", "mgm-light"])
def test_inductor_compiled_steps_match_eager(method_steps, tmp_path):
    _run(method_steps, tmp_path, exact=False)


@pytest.mark.gpu
@pytest.mark.cuda_graphs
@pytest.mark.parametrize("method_steps", [[("phase-a", "gan_pretrain_step"), ("mgm", "mgm_step")],
                                          [("mgm-light", "mgm_light_step")]], ids=["phase-a+mgm", "mgm-light"])
def test_cuda_graph_steps_match_eager(method_steps, tmp_path):
    """The fast engine's default on CUDA (``--compile cudagraphs``): the inductor tolerances
    against eager, no break or recompile, every graph replayed as a CUDA graph (inductor counts
    each graph it leaves to plain launches as a skip), and the networks' state at the addresses
    it started at."""
    _run(method_steps, tmp_path, exact=False, device="cuda", mode="cudagraphs")
    assert not counters["inductor"]["cudagraph_skips"], "a graph was not recorded as a CUDA graph"


def _state_stays_at_its_addresses(tmp_path, device: str, mode: str) -> None:
    """Three compiled MGM steps leave every parameter and buffer (BatchNorm statistics, the
    spectral-norm vectors) at the address it started at: what CUDA graph replays need. On CUDA a
    fourth step, whose graphs are all replays, makes no synchronising CUDA call."""
    torch._dynamo.reset()
    ctx, _, batches = _prepare("mgm", True, tmp_path, device, mode)
    buffers = {k: b.data_ptr() for k, b in ctx.nets.named_buffers()}
    params = {k: p.data_ptr() for k, p in ctx.nets.named_parameters()}
    for _ in range(3):
        _step(ctx, "mgm_step", batches)
    assert {k: b.data_ptr() for k, b in ctx.nets.named_buffers()} == buffers
    assert {k: p.data_ptr() for k, p in ctx.nets.named_parameters()} == params
    if device == "cuda":
        args = next(batches)
        with stepcost.cuda_sync_errors():
            schedule.execute(schedule.mgm_step, ctx, *args)
        ctx.pop_means()


def test_compiled_state_stays_at_its_addresses(aot_eager, tmp_path):
    _state_stays_at_its_addresses(tmp_path, "cpu", "default")


@pytest.mark.gpu
@pytest.mark.cuda_graphs
def test_cuda_graph_state_stays_at_its_addresses(tmp_path):
    _state_stays_at_its_addresses(tmp_path, "cuda", "cudagraphs")
