"""The training CLI end to end on tiny synthetic data: every method runs and leaves its run folder."""

import json
import math

import pytest
import torch
import yaml

from mgm_fast import train


def _run(tmp_path, *extra):
    out = tmp_path / "run"
    argv = ["--data", "synthetic:40", "--steps", "2", "--log-every", "1", "--quiet", "--out", str(out),
            "--set", "schedule.batch_size=4", *extra]
    assert train.main(argv) == 0
    return out


def test_mgm_run_folder_has_everything(tmp_path):
    out = _run(tmp_path)
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "mgm" and cfg["config"]["schedule"]["batch_size"] == 4
    split = json.loads((out / "split.json").read_text())
    assert len(split["train_labelled"]) > 0 and len(split["val"]) > 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows]
    assert phases.count("gan-pretrain") == 2 and phases.count("mgm") == 2 and phases[-1] == "eval"
    assert {"mt/seg", "ref/synth", "clr/synth", "gan/d", "gan/g"} <= set(rows[-2])
    metrics = json.loads((out / "eval.json").read_text())
    assert {"seg/miou", "depth/abs_err", "normal/mean", "scene/acc"} <= set(metrics)
    assert 0.0 <= metrics["seg/pix_acc"] <= 1.0
    assert (out / "samples" / "final.png").stat().st_size > 0
    assert "seg/miou" in (out / "eval.md").read_text()


@pytest.mark.parametrize("method, phase_names", [("mt", {"mt"}), ("mgm-light", {"mgm-light"}),
                                                 ("st", {"st-seg", "st-depth"})])
def test_baselines_run(tmp_path, method, phase_names):
    extra = ["--method", method] + (["--tasks", "seg,depth"] if method == "st" else [])
    out = _run(tmp_path, *extra)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in rows} == phase_names | {"eval"}
    metrics = json.loads((out / "eval.json").read_text())
    assert ("scene/acc" in metrics) == (method == "mgm-light")
    if method == "st":
        assert "normal/mean" not in metrics and "seg/miou" in metrics and "depth/abs_err" in metrics


def test_same_seed_same_losses(tmp_path):
    a = _run(tmp_path / "a", "--method", "mt")
    b = _run(tmp_path / "b", "--method", "mt")

    def losses(out):
        return [{k: v for k, v in json.loads(line).items() if k.startswith("mt/")}
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    assert losses(a) == losses(b)


def test_two_fresh_processes_with_one_seed_compute_the_same(tmp_path):
    """Two fresh processes of the default (fast) engine with one seed, MGM: the same losses and
    the same final weights, bit for bit. Nothing a process picks by timing (the cpp ops'
    algorithms are cost models of the shape) may change the arithmetic between them."""
    import subprocess
    import sys

    outs = [tmp_path / "a", tmp_path / "b"]
    for out in outs:
        cmd = [sys.executable, "-m", "mgm_fast.train", "--data", "synthetic:40", "--steps", "3", "--quiet",
               "--ckpt-every", "0", "--out", str(out), "--set", "schedule.batch_size=4"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k not in ("time", "images_per_s")} for row in rows]

    assert any("mt/seg" in row for row in losses(outs[0]))  # the MGM phase ran
    assert losses(outs[0]) == losses(outs[1])
    a, b = (torch.load(out / "final_weights.pt", map_location="cpu") for out in outs)
    flat_a = {k: v for k, v in _tensors(a)}
    flat_b = {k: v for k, v in _tensors(b)}
    assert flat_a.keys() == flat_b.keys() and flat_a
    for k, v in flat_a.items():
        assert torch.equal(v, flat_b[k]), k


def _tensors(tree, prefix=""):
    """(path, tensor) of every tensor in nested dicts and lists."""
    if isinstance(tree, torch.Tensor):
        yield prefix, tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}/{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}/{i}")


def test_bad_arguments_are_reported():
    with pytest.raises(SystemExit):
        train.main(["--tasks", "seg,colour"])
    with pytest.raises(KeyError, match="unknown config field"):
        train.main(["--set", "schedule.nope=1", "--quiet"])


def _weights(out):
    return torch.load(out / "final_weights.pt", weights_only=True)["nets"]


def _loss_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if "/" in k} for r in rows if r["phase"] != "eval"}


@pytest.mark.parametrize("method, stop_at", [("mgm", 3), ("mgm-light", 2)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, method, stop_at):
    common = ["--method", method, "--data", "synthetic:40", "--steps", "4", "--log-every", "1", "--quiet",
              "--set", "schedule.batch_size=4", "--ckpt-every", "0"]
    straight = tmp_path / "straight"
    assert train.main([*common, "--out", str(straight)]) == 0
    interrupted = tmp_path / "interrupted"
    assert train.main([*common, "--out", str(interrupted), "--stop-at", str(stop_at)]) == 0
    assert not (interrupted / "final_weights.pt").exists()
    assert train.main(["--resume", str(interrupted), "--quiet"]) == 0
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _loss_rows(straight) == _loss_rows(interrupted)
    assert json.loads((straight / "eval.json").read_text()) == json.loads((interrupted / "eval.json").read_text())


def test_resume_takes_the_genblock_algorithms_of_the_checkpoint(tmp_path, monkeypatch):
    """With the timed mode, the checkpoint records the cpp GenBlock's convolution algorithm per
    shape, and a resumed run computes with those instead of timing again (a new timing may pick
    another algorithm, which rounds differently). auto's cost model needs no record."""
    from mgm_fast import _native
    from mgm_fast.engine.checkpoint import CheckpointManager
    from mgm_fast.ops import genblock

    if _native.cpp_reason() is not None:
        pytest.skip(f"C++ extension unavailable: {_native.cpp_reason()}")
    monkeypatch.setenv("MGM_FAST_GENBLOCK_ALGO", "timed")
    monkeypatch.setenv("MGM_FAST_GENBLOCK_CONV2_ALGO", "timed")
    out = tmp_path / "run"
    _native.extension().genblock_algos_clear_cpu()
    assert train.main(["--data", "synthetic:40", "--steps", "4", "--quiet", "--out", str(out), "--ckpt-every", "0",
                       "--set", "schedule.batch_size=4", "--stop-at", "2"]) == 0  # fmt: skip
    recorded = CheckpointManager(out / "checkpoints").load_latest()["extra"]["genblock_algorithms"]
    assert recorded and sorted(recorded) == sorted(genblock.chosen_algorithms())
    _native.extension().genblock_algos_clear_cpu()
    assert train.main(["--resume", str(out), "--quiet"]) == 0
    for row in recorded:  # the resumed run kept the recorded choices (nothing timed for them)
        assert row in genblock.chosen_algorithms()
    timed = {tuple(r[:7]): r[9] for r in _native.extension().genblock_algos_cpu()}
    assert all(timed[tuple(row[:7])] == {} for row in recorded)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"args": vars(train.build_parser().parse_args([]))}))
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        train.main(["--resume", str(out)])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_and_channels_last_train_on_cpu(tmp_path, precision):
    out = _run(tmp_path, "--method", "mt", "--precision", precision, "--channels-last")
    rows = _loss_rows(out)
    assert rows and all(math.isfinite(v) for row in rows.values() for v in row.values())


def test_precision_context_really_autocasts():
    ctx = train.precision_context("bf16", torch.device("cpu"))
    conv = torch.nn.Conv2d(3, 4, 3)
    with ctx():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.bfloat16
    with train.precision_context("fp32", torch.device("cpu"))():
        assert conv(torch.randn(1, 3, 8, 8)).dtype == torch.float32


def test_compile_trains_like_eager(tmp_path):
    """--compile (torch.compile of every network, inductor C++ on the CPU) gives the eager
    losses up to the float reassociation of the compiled kernels."""
    torch._dynamo.reset()  # this test's networks only: other tests' entries count toward the recompile limit
    eager = _run(tmp_path / "eager", "--method", "mt", "--steps", "1")
    compiled = _run(tmp_path / "compiled", "--method", "mt", "--steps", "1", "--compile")
    a, b = _loss_rows(eager), _loss_rows(compiled)
    assert a.keys() == b.keys()
    for step, row in a.items():
        for key, value in row.items():
            assert b[step][key] == pytest.approx(value, rel=1e-4), key
    assert _weights(eager).keys() == _weights(compiled).keys()  # no _orig_mod prefixes


def test_a_failing_compiler_stops_the_run_naming_the_way_to_eager(tmp_path, monkeypatch, capsys):
    def no_compiler(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    original = train.compile_nets
    monkeypatch.setattr(train, "compile_nets", lambda nets, mode="default": original(nets, backend=no_compiler))
    argv = ["--method", "mt", "--data", "synthetic:40", "--steps", "1", "--quiet", "--compile",
            "--out", str(tmp_path / "run"), "--set", "schedule.batch_size=4"]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "compiling the networks (--compile default) failed" in err and "no compiler on this machine" in err
    assert "--compile off" in err


_EXPLODE = ["--method", "mt", "--steps", "3", "--set", "optim.multi_lr=1e30"]  # step 2's loss is inf/NaN


def test_nonfinite_loss_stops_naming_step_loss_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--data", "synthetic:40", "--log-every", "1", "--quiet", "--out", str(out), "--ckpt-every", "1",
            "--set", "schedule.batch_size=4", *_EXPLODE]
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert "mt/seg" in err and "not finite at step 2" in err and "ckpt-00000001.pt" in err
    assert not (out / "final_weights.pt").exists()


def test_nonfinite_loss_skip_policy_skips_the_update(tmp_path):
    skipped = _run(tmp_path / "skip", *_EXPLODE, "--on-nonfinite", "skip")
    one_step = _run(tmp_path / "one", *_EXPLODE[:2], "--steps", "1", "--set", "optim.multi_lr=1e30")
    rows = [json.loads(line) for line in (skipped / "metrics.jsonl").read_text().splitlines()]
    assert rows[-2]["skipped"] == {"mt": 2} and "mt/seg" not in rows[-2]
    # The parameters are those after step 1: the later updates were skipped.
    a, b = _weights(skipped), _weights(one_step)
    params = dict(train.build_models(train.preset("tiny").model, ("seg", "depth", "normal")).named_parameters())
    for key in params:
        assert torch.equal(a[key], b[key]), key


def test_eval_every_keeps_best_by_delta_m_against_a_baseline(tmp_path):
    st = _run(tmp_path / "st", "--method", "st", "--tasks", "seg,depth,normal", "--steps", "2")
    out = _run(tmp_path / "mt", "--method", "mt", "--steps", "4", "--eval-every", "2", "--baseline", str(st))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["phase"] == "mt/val"]
    assert [r["step"] for r in val] == [2, 4]
    baseline = json.loads((st / "eval.json").read_text())
    for r in val:
        keys = [k for k in r if k in baseline and k in train.METRIC_DIRECTIONS and baseline[k] != 0]
        assert len(keys) >= 5
        assert r["delta_m"] == pytest.approx(train.delta_m(r, baseline, keys=keys))
    best = max(val, key=lambda r: r["delta_m"])
    ckpt = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["step"] == best["step"] and ckpt["metrics"]["delta_m"] == pytest.approx(best["delta_m"])
    with pytest.raises(SystemExit, match="no such run folder"):
        _run(tmp_path / "bad", "--method", "mt", "--baseline", str(tmp_path / "missing"))


_OLD_RECORD = ("engine", "precision", "loader", "channels_last", "views")
"""The execution fields a config.yaml had at its top level before the record was complete; its
saved options held the resolved values of the last four."""


def test_resume_reads_an_old_style_config_yaml(tmp_path):
    common = ["--method", "mt", "--data", "synthetic:40", "--steps", "3", "--log-every", "1", "--quiet",
              "--set", "schedule.batch_size=4", "--ckpt-every", "0"]
    straight = tmp_path / "straight"
    assert train.main([*common, "--out", str(straight)]) == 0
    interrupted = tmp_path / "interrupted"
    assert train.main([*common, "--out", str(interrupted), "--stop-at", "1"]) == 0
    path = interrupted / "config.yaml"
    saved = yaml.safe_load(path.read_text())
    old = {k: saved[k] for k in ("method", "tasks", "data", "seed", "regime", *_OLD_RECORD)}
    old["args"] = {**saved["args"], **{k: saved[k] for k in _OLD_RECORD[1:]}, "compile": False}  # then a flag
    old["config"] = saved["config"]
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    assert train.main(["--resume", str(interrupted), "--quiet"]) == 0
    a, b = _weights(straight), _weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _loss_rows(straight) == _loss_rows(interrupted)
