"""benchmarks/gpu_suite.sh, checked on the CPU: what its dry run prints must exist (modules,
plugins, pytest selections), the bench priority list must split the benchmarks without gaps or
overlaps, option errors must exit 2, and the runner must keep going after failures, skip what
does not fit its time, and merge the results of several calls. Also the pieces it relies on:
the SIGTERM pytest plugin, `make gpu-wheels`, DALI-less collection and the TF32 test fixture."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"
STAGES = ["preflight", "build", "selftest", "env", "triton", "matmul", "tests", "cudagraphs", "bench", "report"]
CORE_ITEMS = ["train-step", "genblock-bf16", "losses"]


def _suite(*args, env=None, timeout=120, cwd=None):
    return subprocess.run(["bash", str(SUITE), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd or ROOT)


def _fake_python(tmp_path, body="exit 0"):
    """An executable standing in for PYTHON that appends its arguments to calls.txt."""
    path = tmp_path / "fakepython"
    path.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{tmp_path}/calls.txt"\n{body}\n')
    path.chmod(0o755)
    return path


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dry")
    out = tmp / "out"
    python = _fake_python(tmp)
    run = _suite("--dry-run", out, env={"PYTHON": str(python)}, cwd=tmp)
    assert run.returncode == 0, run.stdout + run.stderr
    assert not out.exists(), "a dry run writes nothing"
    assert not (tmp / "calls.txt").exists(), "a dry run executes nothing"
    assert sorted(p.name for p in tmp.iterdir()) == ["fakepython"]
    return run.stdout.replace(str(python), "python")


def _bench_items(text: str) -> list[tuple[str, str, int, list[str]]]:
    items = []
    for line in text.splitlines():
        if line.startswith("bench-item\t"):
            _, name, kind, est, selection = line.split("\t")
            items.append((name, kind, int(est), shlex.split(selection)))
    return items


def _collect(args: list[str], env: dict | None = None) -> tuple[int, list[str], str]:
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **(env or {})})
    ids = [line for line in run.stdout.splitlines() if "::" in line and " " not in line]
    return run.returncode, ids, run.stdout + run.stderr


# ---------------------------------------------------------------------------------------------
# the script, its dry run and what the dry run names


def test_script_is_executable_and_parses():
    assert os.access(SUITE, os.X_OK)
    subprocess.run(["bash", "-n", str(SUITE)], check=True)
    if shutil.which("shellcheck"):
        run = subprocess.run(["shellcheck", "-s", "bash", str(SUITE)], capture_output=True, text=True)
        assert run.returncode == 0, run.stdout


def test_dry_run_lists_the_stages_in_order_with_their_commands(dry_run):
    assert re.findall(r"^== stage \d+ (\w+) \(limit \d+ s, estimate \d+ s\)", dry_run, flags=re.M) == STAGES
    for needle in ("TRITON_INTERPRET=0", "pip install -e . --no-build-isolation --no-deps", "TORCH_CUDA_ARCH_LIST",
                   "-m mgm_fast.selftest --device cuda --json \"$OUT/selftest.json\"", "nvcc --version",
                   "triton-check --require-compiled", "matmul-rate", "-m pytest tests -m \"gpu and not cuda_graphs\"",
                   "-m pytest tests -m cuda_graphs", "--junitxml=",
                   "--benchmark-json=", "mgm_fast.benchtools.synced_timer", "-p mgm_fast.pytest_sigterm",
                   "--benchmark-min-rounds=5", "--benchmark-max-time=0.2", "mgm_fast.bench report"):
        assert needle in dry_run, needle
    # Triton autotuning off for the correctness stages, on for the timed ones
    for stage in ("selftest", "tests", "cudagraphs"):
        block = dry_run.split(f" {stage} (limit")[1].split("== stage")[0]
        assert "MGM_FAST_TRITON_AUTOTUNE=0" in block, stage
    assert "export MGM_FAST_TRITON_AUTOTUNE=1" in dry_run.split(" bench (limit")[1]
    # preflight checks every runtime and test dependency
    preflight = dry_run.split(" preflight (limit")[1].split("== stage")[0]
    for module in ("torch", "triton", "numpy", "PIL", "yaml", "tqdm", "pytest", "pytest_benchmark", "ninja",
                   "pybind11"):
        assert f'"{module}"' in preflight or f"import {module}" in preflight, module


def test_every_module_the_suite_runs_exists(dry_run):
    modules = set(re.findall(r'(?:"\$PYTHON"|python3?) -m ([A-Za-z_][\w.]*)', dry_run))
    plugins = set(re.findall(r"-p ([A-Za-z_][\w.]*)", dry_run)) - {"no"}
    assert {"pytest", "pip", "mgm_fast.bench", "mgm_fast.info", "mgm_fast.selftest"} <= modules
    assert plugins == {"mgm_fast.pytest_sigterm"}
    for name in sorted(modules | plugins):
        assert importlib.util.find_spec(name) is not None, f"python -m {name}: no such module"
    for dotted in set(re.findall(r"--benchmark-timer=([\w.]+)", dry_run)):
        module, attr = dotted.rsplit(".", 1)
        assert callable(getattr(importlib.import_module(module), attr)), dotted


def test_selftest_cli():
    """The selftest stage calls `python -m mgm_fast.selftest --device cuda --json FILE`."""
    run = subprocess.run([sys.executable, "-m", "mgm_fast.selftest", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "--device" in run.stdout and "--json" in run.stdout


def test_bench_items_select_benchmarks_disjoint_and_covering_all(dry_run):
    items = _bench_items(dry_run)
    names = [name for name, *_ in items]
    assert names[:3] == CORE_ITEMS and len(set(names)) == len(names)
    assert [kind for _, kind, *_ in items] == ["core"] * 3 + ["extra"] * (len(items) - 3)
    assert all(0 < est <= 600 for _, _, est, _ in items)
    dali = importlib.util.find_spec("nvidia.dali") is not None
    with ThreadPoolExecutor(4) as pool:
        everything = pool.submit(_collect, ["benchmarks"])
        # with the plugins the suite loads, so the selections are checked as the suite passes them
        collected = list(pool.map(lambda item: _collect([*item[3], "-p", "mgm_fast.pytest_sigterm",
                                                          "--benchmark-only"]), items))
    rc, all_ids, text = everything.result()
    assert rc == 0, text
    seen: dict[str, str] = {}
    for (name, _, _, selection), (rc, ids, text) in zip(items, collected):
        if not ids and name == "gpu-other" and not dali:
            continue  # today only DALI's GPU rows are there
        assert rc == 0 and ids, f"bench item {name} ({selection}) selects nothing:\n{text}"
        for node in ids:
            assert node not in seen, f"{node} is in bench items {seen.get(node)} and {name}"
            seen[node] = name
    assert sorted(seen) == sorted(all_ids), f"benchmarks in no bench item: {sorted(set(all_ids) - set(seen))}"
    # the headline item is exactly the engine comparison
    assert sorted(n for n, item in seen.items() if item == "train-step") == [
        "benchmarks/test_bench_train_step.py::test_bench_mgm_step[fast]",
        "benchmarks/test_bench_train_step.py::test_bench_mgm_step[reference]",
    ]


def test_without_dali_the_suite_collects_cleanly_and_dali_tests_skip(tmp_path):
    """The GPU machine has no DALI: nothing may fail to import, and the DALI tests skip."""
    (tmp_path / "hide_dali.py").write_text('import sys\nsys.modules["nvidia.dali"] = None\n')
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rc, ids, text = _collect(["-p", "hide_dali", "tests", "benchmarks", "-m", "gpu"], env=env)
    assert rc == 0 and ids, text
    assert not any("dali" in node for node in ids)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "hide_dali",
                          "--benchmark-disable", "tests/data/test_dali.py", "benchmarks/test_bench_dali.py"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, **env})
    # both modules skip at import (pytest.importorskip); with nothing else selected pytest exits 5
    assert run.returncode in (0, 5) and "2 skipped" in run.stdout and "error" not in run.stdout.lower(), (
        run.stdout + run.stderr)


def test_option_errors_exit_2_and_write_nothing(tmp_path):
    out = tmp_path / "out"
    for args, message in ((["--stage", "nope"], "no such stage: nope"),
                          (["--stage", "bench,nope"], "no such stage: nope"),
                          (["--skip", "nope"], "no such stage: nope"),
                          (["--skip=build,nope"], "no such stage: nope"),
                          (["--bogus"], "unknown option")):
        run = _suite(*args, out)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    run = _suite(out, "--stage")
    assert run.returncode == 2 and "--stage needs stage names" in run.stderr
    run = _suite("--stage", "bench", out, env={"BENCH_ITEMS": "losses,nope"})
    assert run.returncode == 2 and "no such bench item: nope" in run.stderr
    assert _suite().returncode == 2  # OUT_DIR is required
    assert not out.exists()
    run = _suite("--dry-run", "--stage", "tests,bench", "--skip", "bench", out)
    assert run.returncode == 0
    assert re.findall(r"^== stage \d+ (\w+) \(limit", run.stdout, flags=re.M) == ["tests"]
    assert "== stage 9 bench: skipped" in run.stdout and "== stage 1 preflight: not selected" in run.stdout


def test_make_gpu_wheels_target():
    run = subprocess.run(["make", "-n", "gpu-wheels"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    for needle in ("download", "--only-binary=:all:", "--python-version 3.12", "--implementation cp",
                   "--platform manylinux_2_28_x86_64", "--platform manylinux_2_17_x86_64",
                   "--platform manylinux2014_x86_64", "--platform any", "--no-deps", "requirements/lock.txt",
                   "--dry-run", "--no-index"):
        assert needle in text, needle
    for package in ("pytest", "pluggy", "iniconfig", "packaging", "Pygments", "pytest-benchmark", "py-cpuinfo2",
                    "numpy", "pillow", "PyYAML", "tqdm", "ninja", "pybind11"):
        assert re.search(rf"(?<![\w-]){re.escape(package)}(?![\w-])", text), package
    assert "gpu-wheels" in (ROOT / ".gitignore").read_text()


# ---------------------------------------------------------------------------------------------
# the runner, with a stand-in interpreter


def test_every_stage_runs_after_failures_and_is_reported(tmp_path):
    out = tmp_path / "out"
    # `false` as the interpreter: every stage (and bench item) fails at once; none may stop the rest
    run = _suite(out, env={"PYTHON": "false"})
    assert run.returncode == 1, run.stdout + run.stderr
    table = [line.split("\t") for line in (out / "stages.tsv").read_text().splitlines()]
    assert all(len(row) == 3 for row in table)
    keys = [row[0] for row in table]
    assert keys[0] == "stage" and keys[-1] == "total" and [k for k in keys if ":" not in k][1:-1] == STAGES
    assert [k for k in keys if k.startswith("bench:")][:3] == [f"bench:{n}" for n in CORE_ITEMS]
    assert all(row[1].startswith("failed") for row in table[1:-1]), table
    (call,) = (out / "logs").iterdir()
    assert sorted(p.name for p in call.glob("*.log")) == sorted(f"{i + 1}-{s}.log" for i, s in enumerate(STAGES))
    assert "report     failed" in run.stdout


def test_bench_items_done_are_not_rerun_and_calls_merge(tmp_path):
    out = tmp_path / "out"
    # every command succeeds at once; the report command writes a README
    python = _fake_python(tmp_path, 'case "$*" in *"mgm_fast.bench report"*) echo report > "$4/README.md" ;; esac')
    first = _suite("--stage", "bench,report", out, env={"PYTHON": str(python)})
    assert first.returncode == 0, first.stdout + first.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    bench_calls = [c for c in calls if "--benchmark-json=" in c]
    assert len(bench_calls) == 10 and "test_bench_mgm_step[reference]" in bench_calls[0]
    assert all("-p mgm_fast.pytest_sigterm" in c and "--benchmark-only" in c for c in bench_calls)
    rows = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert rows["bench"] == "ok" and rows["report"] == "ok" and rows["bench:train-step"] == "ok"
    assert "preflight" not in rows  # not selected
    # a later call: items done are not rerun, BENCH_ITEMS reruns the named ones, rows merge
    (tmp_path / "calls.txt").unlink()
    second = _suite("--stage", "bench", "--stage", "preflight", "--skip", "preflight", out,
                    env={"PYTHON": str(python)})
    assert second.returncode == 0, second.stdout + second.stderr
    assert "done in an earlier call" in second.stdout
    assert not (tmp_path / "calls.txt").exists() or not any(
        "--benchmark-json=" in c for c in (tmp_path / "calls.txt").read_text().splitlines())
    third = _suite("--stage", "bench", out, env={"PYTHON": str(python), "BENCH_ITEMS": "losses"})
    assert third.returncode == 0
    bench_calls = [c for c in (tmp_path / "calls.txt").read_text().splitlines() if "--benchmark-json=" in c]
    assert len(bench_calls) == 1 and "bench-losses.json" in bench_calls[0]
    rows = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert rows["report"] == "ok" and rows["preflight"] == "skipped" and rows["bench:cpu"] == "ok"
    assert len(list((out / "logs").iterdir())) == 3


def test_bench_items_that_do_not_fit_are_skipped_and_the_exit_code_says_so(tmp_path):
    out = tmp_path / "out"
    python = _fake_python(tmp_path)
    # 45 s budget - 30 s report reserve: the bench stage has 15 s, each item 5 s; nothing fits
    run = _suite("--stage", "bench", out, env={"PYTHON": str(python), "SUITE_BUDGET_S": "45"})
    assert run.returncode == 3, run.stdout + run.stderr
    rows = dict(line.split("\t")[:2] for line in (out / "stages.tsv").read_text().splitlines())
    assert rows["bench"] == "incomplete"
    assert rows["bench:train-step"].startswith("skipped: no time (estimate 240 s")
    assert all(v.startswith("skipped: no time") for k, v in rows.items() if k.startswith("bench:"))
    assert "--stage bench,report" in run.stdout
    assert not (tmp_path / "calls.txt").exists()


# ---------------------------------------------------------------------------------------------
# pieces the suite relies on


def test_sigterm_plugin_lets_pytest_write_its_reports(tmp_path):
    (tmp_path / "test_slow.py").write_text(textwrap.dedent("""
        import time
        import pytest

        @pytest.mark.parametrize("i", range(40))
        def test_slow(benchmark, i):
            benchmark.pedantic(time.sleep, args=(0.2,), rounds=2, iterations=1)
    """))
    cmd = ["timeout", "-s", "TERM", "6", sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           "-p", "mgm_fast.pytest_sigterm", "--rootdir", str(tmp_path), str(tmp_path / "test_slow.py"),
           f"--benchmark-json={tmp_path / 'b.json'}", f"--junitxml={tmp_path / 'j.xml'}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 124, run.stdout + run.stderr

    rounds = {b["name"]: b["stats"]["rounds"] for b in json.loads((tmp_path / "b.json").read_text())["benchmarks"]}
    assert 2 <= len(rounds) < 40 and "test_slow[0]" in rounds
    assert set(rounds.values()) == {2}  # the interrupted benchmark is left out, not half-recorded
    assert "test_slow[0]" in (tmp_path / "j.xml").read_text()


def test_triton_autotune_switch_keeps_one_tile(tmp_path):
    pytest.importorskip("triton")
    code = ("from mgm_fast.ops._triton import genblock as g; "
            "print([len(k.configs) for k in (g._fwd_kernel, g._dinput_kernel, g._dweight_kernel)], "
            "g._fwd_kernel.configs[0].kwargs == g.GPU_TILES['fwd'][0])")
    counts = {}
    for value in ("0", "1"):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                             env={**os.environ, "TRITON_INTERPRET": "0", "MGM_FAST_TRITON_AUTOTUNE": value})
        assert run.returncode == 0, run.stderr
        counts[value] = run.stdout.strip()
    assert counts["0"] == "[1, 1, 1] True"
    assert counts["1"] == "[4, 4, 4] True"


def test_tf32_fixture_a_test_that_leaks_tf32():
    torch.backends.cudnn.allow_tf32 = True  # as a careless test would; the fixture restores it
    torch.backends.cuda.matmul.allow_tf32 = True


def test_tf32_fixture_every_test_starts_with_tf32_off():
    assert torch.backends.cudnn.allow_tf32 is False and torch.backends.cuda.matmul.allow_tf32 is False


def test_tf32_fixture_monkeypatch_turns_it_on(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert torch.backends.cudnn.allow_tf32 is True
