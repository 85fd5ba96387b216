"""Engines change how a step executes, never what it computes."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mgm_fast import _native, train
from mgm_fast.config import from_dict, preset, to_dict
from mgm_fast.data.augment import SimCLRAugment
from mgm_fast.engine import engines


def test_ablations_differ_from_fast_in_exactly_one_ingredient():
    fast, ref = engines.FAST, engines.REFERENCE
    differing = engines.differing_ingredients()
    assert {"loader", "views", "readback", "adam", "loss_impl", "precision", "channels_last"} <= set(differing)
    assert len(engines.ENGINES) == 2 + len(differing)
    for field in differing:
        engine = engines.get(f"fast-{field.replace('_', '-')}")
        changed = [f for f in engines.INGREDIENTS if getattr(engine, f) != getattr(fast, f)]
        assert changed == [field] and getattr(engine, field) == getattr(ref, field)
    with pytest.raises(ValueError, match="unknown engine"):
        engines.get("turbo")


def test_engine_defaults_depend_on_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert engines.FAST.resolved_precision(cpu) == "fp32" and engines.FAST.resolved_precision(cuda) == "bf16"
    assert engines.FAST.channels_last and not engines.REFERENCE.channels_last  # on every device
    assert engines.REFERENCE.autograd == "released"
    assert engines.REFERENCE.resolved_precision(cuda) == "fp32"
    cfg = engines.REFERENCE.configure(preset("tiny"))
    fields = {"optim.implementation": cfg.optim.implementation, "schedule.loss_impl": cfg.schedule.loss_impl,
              "schedule.noise_impl": cfg.schedule.noise_impl, "model.genblock_impl": cfg.model.genblock_impl,
              "model.attention_impl": cfg.model.attention_impl, "model.spectral_norm_impl": cfg.model.spectral_norm_impl}
    assert fields == {"optim.implementation": "for-loop", "schedule.loss_impl": "reference",
                      "schedule.noise_impl": "reference", "model.genblock_impl": "reference",
                      "model.attention_impl": "reference", "model.spectral_norm_impl": "reference"}


def test_per_sample_views_use_the_same_parameters_as_batched_views():
    aug = SimCLRAugment()
    x = torch.rand(6, 3, 32, 32) * 2 - 1
    a = aug.two_views(x, torch.Generator().manual_seed(3))
    b = aug.two_views_per_sample(x, torch.Generator().manual_seed(3))
    for batched, pil in zip(a, b, strict=True):
        assert pil.shape == batched.shape and pil.dtype == torch.float32
        # the released pipeline's 8-bit arithmetic: about one level on average (step by step
        # in tests/data/test_views_per_sample.py)
        assert (pil - batched).abs().mean() < 2 * 2 / 255
    c = aug.two_views_per_sample(x, torch.Generator().manual_seed(4))
    assert (c[0] - b[0]).abs().mean() > 0.1  # a different draw is really different


def _run(tmp_path, engine, method, steps=2, *extra):
    out = tmp_path / engine
    argv = ["--engine", engine, "--method", method, "--data", "synthetic:40", "--steps", str(steps),
            "--log-every", "1", "--quiet", "--out", str(out), "--set", "schedule.batch_size=4", *extra]
    assert train.main(argv) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, [r for r in rows if r["phase"] == method]


def test_reference_and_fast_engines_compute_the_same_losses(tmp_path):
    """Same seed, same config, same views: every loss agrees to float rounding.

    The first sub-step's losses (before any update) agree with every ingredient of ``fast``.
    Later losses start from weights that Adam's first update, lr * g / (|g| + eps), has moved:
    channels_last convolutions round gradients differently and that update amplifies it where
    g ~ 0, so they are compared in NCHW, and the losses after the SimCLR update (whose
    gradients are the least exact: a softmax over nearly equal similarities) at 2e-3 -- the
    largest difference seen there was 1.8e-4 (AVX-512 and AVX2 machines), against 1e-7 for the
    losses before it. The view path is held equal in each pair compared (batched on both
    sides, or per-sample on both sides): the per-sample views differ from the batched ones by
    the released pipeline's 8-bit arithmetic (a few levels per pixel, bounded step by step in
    tests/data/test_views_per_sample.py), and after Adam's first update the SimCLR losses are
    so sensitive to their input that rounding-level noise on the views alone moves the next
    one by several percent, so no tolerance on a loss can stand in for that test.
    """
    ref_out, ref = _run(tmp_path, "reference", "mgm-light", 1)
    _, ref_batched = _run(tmp_path / "batched", "reference", "mgm-light", 1, "--views", "batched")
    _, fast = _run(tmp_path, "fast", "mgm-light", 1)
    _, fast_nchw = _run(tmp_path / "nchw", "fast", "mgm-light", 1, "--no-channels-last")
    _, fast_views = _run(tmp_path, "fast-views", "mgm-light", 1, "--no-channels-last")
    for key in ("mt/seg", "mt/depth", "mt/normal"):
        assert fast[0][key] == pytest.approx(ref[0][key], rel=1e-5), key
    assert ref_batched[0]["clr/real"] != ref[0]["clr/real"]  # --views batched took effect
    tolerance = {"mt/seg": 1e-5, "mt/depth": 1e-5, "mt/normal": 1e-5, "ref/real": 1e-5, "clr/real": 1e-5,
                 "ref/weak": 2e-3, "clr/weak": 2e-3}
    assert set(tolerance) == {k for k in ref[0] if "/" in k}  # every loss of the step is compared
    for key, rel in tolerance.items():
        assert fast_nchw[0][key] == pytest.approx(ref_batched[0][key], rel=rel), key
        assert fast_views[0][key] == pytest.approx(ref[0][key], rel=rel), key
    cfg = yaml.safe_load((ref_out / "config.yaml").read_text())
    assert (cfg["engine"], cfg["loader"], cfg["precision"], cfg["channels_last"], cfg["views"]) == (
        "reference", "torch", "fp32", False, "per-sample")
    assert cfg["config"]["optim"]["implementation"] == "for-loop"
    assert cfg["config"]["schedule"]["loss_impl"] == "reference"


AVX2_ONLY = {"MGM_FAST_CPU_ISA": "x86-64-v3", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
"""An AVX2-only CPU on an AVX-512 one: our kernels, ATen's and oneDNN's at their AVX2 level."""


@pytest.mark.skipif(not _native.extension() or "x86-64-v4" not in _native.supported_cpu_isas(),
                    reason="needs the extension on an AVX-512 CPU (elsewhere the test above runs as is)")
def test_engines_agree_on_an_avx2_only_cpu():
    """The engine comparison again with every library at its AVX2 level: on such machines
    oneDNN's convolutions round differently, which once pushed a loss tolerance that was too
    tight over its bound."""
    node = f"{__file__}::test_reference_and_fast_engines_compute_the_same_losses"
    env = {**os.environ, **AVX2_ONLY}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                             node], env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_explicit_options_win_over_the_engine(tmp_path):
    out, rows = _run(tmp_path, "reference", "mt", 1, "--loader", "memory", "--set", "schedule.loss_impl=auto")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["loader"] == "memory" and cfg["config"]["schedule"]["loss_impl"] == "auto"
    assert rows


def test_step_readback_logs_the_same_values():
    from mgm_fast.engine.schedule import StepContext

    ctx = StepContext(cfg=None, nets=None, optimizers={}, augment=None, aug_generator=None)
    step = dataclasses.replace(ctx, readback="step")
    for c in (ctx, step):
        c.log("a", torch.tensor(1.5))
        c.log("a", torch.tensor(2.5))
    assert float(ctx.pop_means()["a"]) == float(step.pop_means()["a"]) == 2.0


def test_released_autograd_computes_the_same_updates(tmp_path):
    """``fast-autograd`` computes every discarded weight gradient and builds graphs for the
    detached synthesized batches, as released; the applied updates are unchanged, so every
    loss of three MGM steps (each after the previous steps' updates) is identical."""
    _, pruned = _run(tmp_path, "fast", "mgm", 3)
    _, released = _run(tmp_path, "fast-autograd", "mgm", 3)
    assert len(pruned) == len(released) == 3
    for a, b in zip(pruned, released, strict=True):
        losses = [k for k in a if "/" in k]
        assert losses and all(a[k] == b[k] for k in losses), (a, b)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_each_engine_resolves_to_its_own_ingredients(device):
    """resolve_run: with no explicit option the run's config and record hold exactly the engine's
    ingredients (the precision resolved for the device), whatever the config defaults are."""
    for name, engine in engines.ENGINES.items():
        args = train.build_parser().parse_args(["--engine", name])
        cfg, execution = train.resolve_run(args, torch.device(device))
        assert engine.configure(preset("tiny")) == cfg
        for field in engines.INGREDIENTS:
            expected = engine.resolved_precision(torch.device(device)) if field == "precision" else getattr(engine, field)
            assert getattr(execution, field) == expected, (name, field)
        assert execution.engine == name
        assert execution.compile == ("cudagraphs" if device == "cuda" and name != "reference" else "off")
        assert execution.cudnn_benchmark == (device == "cuda" and name != "reference")


def test_explicit_options_and_set_win_in_the_record():
    argv = ["--engine", "reference", "--loader", "memory", "--precision", "bf16", "--channels-last",
            "--views", "batched", "--compile", "--set", "schedule.loss_impl=auto", "--set", "schedule.batch_size=3",
            "--batch-size", "5"]
    cfg, execution = train.resolve_run(train.build_parser().parse_args(argv), torch.device("cpu"))
    assert (execution.loader, execution.precision, execution.channels_last, execution.views) == (
        "memory", "bf16", True, "batched")
    assert execution.compile == "default" and execution.loss_impl == cfg.schedule.loss_impl == "auto"
    assert execution.adam == cfg.optim.implementation == "for-loop"  # the engine's, not overridden
    assert cfg.schedule.batch_size == 5  # --batch-size after --set, as before


@pytest.mark.parametrize(("argv", "device", "expected"), [
    (["--compile", "off"], "cuda", "off"),  # eager on a GPU, explicitly
    (["--compile"], "cuda", "default"),  # a bare --compile: inductor without CUDA graphs
    (["--compile", "cudagraphs"], "cuda", "cudagraphs"),
    (["--engine", "reference", "--compile", "cudagraphs"], "cuda", "cudagraphs"),
    ([], "cpu", "off"),
])
def test_compile_mode_resolution(argv, device, expected):
    _, execution = train.resolve_run(train.build_parser().parse_args(argv), torch.device(device))
    assert execution.compile == expected


def test_cuda_graphs_on_the_cpu_are_refused_by_name():
    with pytest.raises(SystemExit, match=r"cudagraphs.*needs a CUDA device"):
        train.resolve_run(train.build_parser().parse_args(["--compile", "cudagraphs"]), torch.device("cpu"))


def test_a_record_of_the_compile_flag_reads_as_a_mode():
    _, execution = train.resolve_run(train.build_parser().parse_args([]), torch.device("cpu"))
    record = execution.to_dict()
    for flag, mode in ((True, "default"), (False, "off")):
        assert engines.Execution.from_dict({**record, "compile": flag}).compile == mode


@pytest.mark.parametrize("field", ["batch_norm_impl", "conv_impl"])
def test_a_record_from_before_an_op_reads_as_torchs_layers(field):
    """A config.yaml written before ``batch_norm_impl`` or ``conv_impl`` existed resumes on what it
    ran: torch's BatchNorm or convolutions ("reference"), in the record and in its config (the
    field's default)."""
    _, execution = train.resolve_run(train.build_parser().parse_args([]), torch.device("cpu"))
    assert getattr(execution, field) == "auto"
    record = {k: v for k, v in execution.to_dict().items() if k != field}
    assert getattr(engines.Execution.from_dict(record), field) == "reference"
    saved = to_dict(preset("tiny"))
    del saved["model"][field]
    assert getattr(from_dict(saved).model, field) == "reference"


def test_config_yaml_holds_the_whole_record(tmp_path):
    out, _ = _run(tmp_path, "fast-readback", "mt", 1)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    execution = engines.Execution.from_dict(saved)
    assert execution is not None and execution.readback == "step" and execution.autograd == "pruned"
    assert execution.loss_impl == saved["config"]["schedule"]["loss_impl"] == "auto"
    assert engines.Execution.from_dict({k: v for k, v in saved.items() if k != "readback"}) is None
