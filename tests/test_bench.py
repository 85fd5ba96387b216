"""python -m mgm_fast.bench (reports, README block, env, matmul rate, Triton check), the timing
helpers of mgm_fast.benchtools, and benchmarks/gpu_suite.sh (syntax, dry run, failure handling)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgm_fast import bench, benchtools

ROOT = Path(__file__).resolve().parent.parent
CPU_RESULTS = ROOT / "benchmarks" / "results" / "cpu-2core-epyc"


def _bench(group, name, median, *, param=None, extra=None, rounds=7, minimum=None):
    return {
        "group": group, "name": name, "fullname": f"benchmarks/test_x.py::{name}", "param": param,
        "params": None, "extra_info": extra or {}, "options": {"timer": "perf_counter"},
        "stats": {"min": minimum if minimum is not None else median * 0.9, "max": median * 1.5,
                  "mean": median * 1.1, "median": median, "rounds": rounds},
    }


def _write_results(folder: Path, benchmarks, name="benchmarks.json", when="2026-01-02T03:04:05.000001+00:00"):
    folder.mkdir(parents=True, exist_ok=True)
    doc = {
        "machine_info": {"machine": "x86_64", "system": "Linux", "release": "6.1", "python_version": "3.11.7",
                         "python_implementation": "CPython", "cpu": {"brand_raw": "Test CPU 9000", "count": 8}},
        "commit_info": {"id": "0123456789abcdef", "branch": "main", "dirty": True},
        "benchmarks": benchmarks,
        "datetime": when,
        "version": "5.3.1",
    }
    (folder / name).write_text(json.dumps(doc))
    return doc


OP = "op fwd+bwd b4"
SMALL = [
    # group 1: baseline by name ("reference"); speed-ups 4x and 2x
    _bench(OP, "test_op[reference]", 4e-3, param="reference"),
    _bench(OP, "test_op[fused]", 1e-3, param="fused", extra={"items_per_s_median": 4000.0}),
    _bench(OP, "test_op[cpp]", 2e-3, param="cpp", extra={"items_per_s_median": 2000.0}),
    # group 2: baseline marked in extra_info, even though another name says "eager"
    _bench("views", "test_views_loop", 0.5, extra={"baseline": True, "views_per_s_median": 128.0}),
    _bench("views", "test_views_eager", 0.25, extra={"views_per_s_median": 256.0}),
    _bench("views", "test_views_fast", 0.05, extra={"views_per_s_median": 1280.0, "flops": 4e12,
                                                    "peak_memory_bytes": 3 * 2**20}),
    # group 3: no baseline at all
    _bench("loader epoch", "test_loader[a]", 2.5, param="a", rounds=3),
    _bench("loader epoch", "test_loader[b]", 1.25, param="b", rounds=3),
]


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """Cells of the first markdown table after ``heading``."""
    part = text.split(heading, 1)[1]
    rows = []
    for line in part.splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows[1:]  # without the header


# ---------------------------------------------------------------------------------------------
# report


def test_report_tables_speedups_and_plots(tmp_path):
    folder = tmp_path / "test-machine"
    _write_results(folder, SMALL)
    (folder / "matmul_rate.json").write_text(json.dumps({"tflops_median": 100.0, "dtype": "bf16", "size": 64}))
    (folder / "unrelated.json").write_text(json.dumps({"something": "else"}))  # ignored, not an error
    (folder / "triton_check.json").write_text(json.dumps({"triton": "3.6.0", "mode": "compiled", "ok": True,
                                                          "device": "cuda (H)", "artifacts": ["cubin", "ptx"]}))
    (folder / "stages.tsv").write_text("stage\tstatus\tseconds\nbuild\tok\t61.5\ntests\tfailed (exit 1)\t9.0\n")
    assert bench.main(["report", str(folder), "--plots"]) == 0
    text = (folder / "README.md").read_text()
    assert "Test CPU 9000, 8 logical cores" in text and "commit 0123456" in text
    assert "2026-01-02 03:04 UTC" in text and "uncommitted changes" in text
    assert "100.0 TFLOP/s" in text
    assert "Triton 3.6.0: a test kernel ran compiled on cuda (H), result correct (built: cubin, ptx)." in text
    assert _table_rows(text, "## Suite stages") == [["build", "ok", "61.5"], ["tests", "failed (exit 1)", "9.0"]]

    speed = _table_rows(text, "## Speed-ups")
    got = {(g, b): s for g, b, _, s in speed}
    assert got[(OP, "test_op[fused]")] == "4.00x"
    assert got[(OP, "test_op[cpp]")] == "2.00x"
    assert got[(OP, "test_op[reference] (baseline)")] == "1.00x"
    assert got[("views", "test_views_fast")] == "10.00x"
    assert got[("views", "test_views_eager")] == "2.00x"  # marked baseline wins over the name rule
    assert got[("views", "test_views_loop (baseline)")] == "1.00x"
    assert not any(g == "loader epoch" for g, _ in got)
    assert "no row is marked baseline and no name contains reference or eager: loader epoch" in text

    op_rows = _table_rows(text, f"### {OP}")
    assert [r[0] for r in op_rows] == ["test_op[fused]", "test_op[cpp]", "test_op[reference]"]  # fastest first
    assert op_rows[0][1:5] == ["1.000", "0.900", "7", "4,000 items/s"]
    assert op_rows[2][4] == "-"
    views = {r[0]: r for r in _table_rows(text, "### views")}
    # MFU from extra_info flops and the matmul rate: 4e12 / 0.05 s / 100e12 = 80%
    assert views["test_views_fast"][1:] == ["50.000", "45.000", "7", "1,280 views/s", "80.0%", "3.0"]
    assert views["test_views_loop"][5:] == ["-", "-"]
    loader = _table_rows(text, "### loader epoch")
    assert loader[0][:4] == ["test_loader[b]", "1.250", "1.125", "3"]  # seconds: group median >= 1 s

    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == ["speedup-op-fwd-bwd-b4.png", "speedup-views.png", "throughput-op-fwd-bwd-b4.png",
                    "throughput-views.png"]
    for name in pngs:
        assert f"]({name})" in text
        with Image.open(folder / name) as img:
            colours = {c for _, c in img.convert("RGB").getcolors(1 << 16)}
        assert (0x2B, 0x7B, 0xBA) in colours  # bars were drawn
    with Image.open(folder / "speedup-op-fwd-bwd-b4.png") as img:
        assert (0x9E, 0x9E, 0x9E) in {c for _, c in img.convert("RGB").getcolors(1 << 16)}  # baseline bar

    # a second run without the "views" group removes that group's stale plots
    _write_results(folder, [b for b in SMALL if b["group"] != "views"])
    assert bench.main(["report", str(folder), "--plots"]) == 0
    assert not (folder / "speedup-views.png").exists() and (folder / "speedup-op-fwd-bwd-b4.png").exists()


def test_report_out_file_and_no_plots(tmp_path):
    _write_results(tmp_path / "r", SMALL)
    out = tmp_path / "elsewhere" / "report.md"
    assert bench.main(["report", str(tmp_path / "r"), "--out", str(out)]) == 0
    assert out.is_file() and "## Speed-ups" in out.read_text()
    assert not list(tmp_path.rglob("*.png")) and not (tmp_path / "r" / "README.md").exists()


def test_report_of_a_suite_folder_without_benchmark_json(tmp_path):
    """The GPU suite's report stage runs on whatever exists, e.g. after no bench item finished."""
    (tmp_path / "stages.tsv").write_text("stage\tstatus\tseconds\nbuild\tok\t61.5\n"
                                         "bench:train-step\tskipped: no time (estimate 70 s, 20 s left)\t0.0\n")
    assert bench.main(["report", str(tmp_path), "--plots"]) == 0
    text = (tmp_path / "README.md").read_text()
    assert "No pytest-benchmark JSON in this folder" in text
    assert _table_rows(text, "## Suite stages")[1] == ["bench:train-step", "skipped: no time (estimate 70 s, 20 s left)",
                                                      "0.0"]


def test_report_errors_name_the_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert bench.main(["report", str(tmp_path / "empty")]) == 2
    assert "no pytest-benchmark JSON" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "benchmarks.json").write_text('{"benchmarks": [')
    assert bench.main(["report", str(bad)]) == 2
    assert f"{bad / 'benchmarks.json'}: not readable JSON" in capsys.readouterr().err
    dup = tmp_path / "dup"
    _write_results(dup, SMALL[:2], "a.json")
    _write_results(dup, SMALL[1:3], "b.json")
    assert bench.main(["report", str(dup)]) == 2
    assert "'benchmarks/test_x.py::test_op[fused]' is also in a.json" in capsys.readouterr().err


def test_report_merges_several_json_files(tmp_path):
    _write_results(tmp_path, SMALL[:3], "ops.json")
    _write_results(tmp_path, SMALL[3:], "data.json")
    results = bench.load_results(tmp_path)
    assert [s["file"] for s in results.sources] == ["data.json", "ops.json"]
    assert len(results.rows) == len(SMALL) and set(results.groups()) == {OP, "views", "loader epoch"}


def test_committed_cpu_report_is_the_generated_one(tmp_path):
    """benchmarks/results/cpu-2core-epyc/README.md is exactly what the tool makes of the committed
    JSON: no hand-edited numbers."""
    folder = tmp_path / CPU_RESULTS.name
    folder.mkdir()
    for path in CPU_RESULTS.glob("*.json"):
        shutil.copy(path, folder)
    bench.write_report(folder, plots=True)
    assert (folder / "README.md").read_text() == (CPU_RESULTS / "README.md").read_text()
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(p.name for p in CPU_RESULTS.glob("*.png"))

    # and the numbers in it are the JSON's: the fused loss vs its reference twin
    doc = json.loads((CPU_RESULTS / "benchmarks.json").read_text())
    med = {b["name"]: b["stats"]["median"] for b in doc["benchmarks"]}
    ratio = med["test_bench_multitask_loss_fwd_bwd_cpu[reference-released]"] / \
        med["test_bench_multitask_loss_fwd_bwd_cpu[cpp-released]"]
    text = (folder / "README.md").read_text()
    assert f"| test_bench_multitask_loss_fwd_bwd_cpu[cpp-released] | {med['test_bench_multitask_loss_fwd_bwd_cpu[cpp-released]'] * 1e3:.3f} ms | {ratio:.2f}x |" in text
    for name in med:
        assert f"| {name} |" in text


def test_speedup_rule():
    def rows(*specs):
        return [bench.Row("g", n, n, None, extra, m, m, 1, "t", "f") for n, m, extra in specs]

    base, why, ratios = bench.speedups(rows(("x[eager]", 3.0, {}), ("x[fast]", 1.0, {})))
    assert base.name == "x[eager]" and "name" in why and ratios == {"x[eager]": 1.0, "x[fast]": 3.0}
    base, _, _ = bench.speedups(rows(("x[Reference]", 3.0, {}), ("x[slow]", 6.0, {"baseline": True})))
    assert base.name == "x[slow]"  # a marked row wins over the name rule
    base, why, ratios = bench.speedups(rows(("x[reference-a]", 3.0, {}), ("x[reference-b]", 2.0, {})))
    assert base is None and ratios == {} and "x[reference-a], x[reference-b]" in why
    base, why, _ = bench.speedups(rows(("a", 1.0, {"baseline": True}), ("b", 1.0, {"baseline": True})))
    assert base is None and "several rows are marked" in why
    base, why, _ = bench.speedups(rows(("a", 1.0, {"baseline": "yes"}), ("b", 2.0, {})))
    assert base is None and "no row is marked" in why  # only a real true marks a baseline


# ---------------------------------------------------------------------------------------------
# README block


def test_readme_block_replaced_between_markers(tmp_path):
    results = tmp_path / "benchmarks" / "results" / "test-machine"
    _write_results(results, SMALL)
    assert bench.main(["report", str(results)]) == 0
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nintro\n\n<!-- bench:start -->\nold hand-typed 99x\n<!-- bench:end -->\n\ntail\n")
    assert bench.main(["readme-block", str(results), str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# Title\n\nintro\n\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\n\ntail\n")
    assert "old hand-typed" not in text
    assert "**test-machine** — Test CPU 9000 CPU, 8 logical cores; measured 2026-01-02" in text
    assert "[full report](benchmarks/results/test-machine/README.md)" in text
    block_rows = _table_rows(text, "<!-- bench:start -->")
    assert block_rows == [
        [OP, "`fused` 1.000 ms", "`reference` 4.000 ms", "**4.00x**"],  # parameter ids when all rows have one
        ["views", "`test_views_fast` 50.000 ms", "`test_views_loop` 500.0 ms", "**10.00x**"],
    ]
    assert "1 more group(s) without a baseline" in text
    assert bench.main(["readme-block", str(results), str(readme)]) == 0
    assert readme.read_text() == text  # idempotent


def test_readme_block_shows_each_group_from_its_newest_run_only(tmp_path):
    """A results folder collects runs (the folder itself, a sub-folder per rerun); a group measured
    in two runs is summarised once, from the later run, and the earlier run's section says so."""
    device = tmp_path / "benchmarks" / "results" / "test-machine"
    older = [_bench(OP, "test_op[reference]", 4e-3), _bench(OP, "test_op[fused]", 1e-3),
             _bench("views", "test_views_loop", 0.5, extra={"baseline": True}),
             _bench("views", "test_views_fast", 0.05)]
    newer = [_bench(OP, "test_op[reference-b4]", 6e-3), _bench(OP, "test_op[fused-b4]", 2e-3)]
    _write_results(device, older, when="2026-01-02T03:04:05+00:00")
    _write_results(device / "rerun", newer, when="2026-01-03T00:00:00+00:00")
    for folder in (device, device / "rerun"):
        assert bench.main(["report", str(folder)]) == 0
    readme = tmp_path / "docs" / "performance.md"
    readme.parent.mkdir()
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    assert bench.main(["readme-block", str(device), str(readme)]) == 0
    text = readme.read_text()
    assert text.count(f"| {OP} |") == 1
    assert _table_rows(text, "**test-machine/rerun**") == [[OP, "`test_op[fused-b4]` 2.000 ms",
                                                             "`test_op[reference-b4]` 6.000 ms", "**3.00x**"]]
    assert _table_rows(text, "**test-machine** ") == [["views", "`test_views_fast` 50.000 ms",
                                                        "`test_views_loop` 500.0 ms", "**10.00x**"]]
    assert f"Measured again in a later run, so shown under test-machine/rerun only: {OP}." in text
    assert "[full report](../benchmarks/results/test-machine/rerun/README.md)" in text
    # naming a run twice (the folder and its sub-folder) still gives each run one section
    assert bench.main(["readme-block", str(device), str(device / "rerun"), str(readme)]) == 0
    assert readme.read_text() == text

    # the dates decide, not the folder: an older sub-folder run gives way to the folder's
    _write_results(device / "rerun", newer, when="2026-01-01T00:00:00+00:00")
    assert bench.main(["readme-block", str(device), str(readme)]) == 0
    text = readme.read_text()
    assert text.count(f"| {OP} |") == 1 and "| `test_op[fused]` 1.000 ms |" in text
    assert f"shown under test-machine only: {OP}." in text


def test_committed_performance_block_is_one_generated_generation():
    """docs/performance.md's block is what the tool makes of the committed results, and no
    benchmark group appears in it twice."""
    doc = ROOT / "docs" / "performance.md"
    committed = doc.read_text()
    devices = sorted(p for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir())
    assert bench.render_block(devices, doc) in committed
    block = committed.split(bench.START_MARKER, 1)[1].split(bench.END_MARKER, 1)[0]
    groups = [line.split(" | ")[0].strip("| ") for line in block.splitlines()
              if line.startswith("| ") and not line.startswith("| benchmark group")]
    assert groups and len(groups) == len(set(groups))


def test_readme_block_errors_leave_the_file_alone(tmp_path, capsys):
    results = tmp_path / "r"
    _write_results(results, SMALL)
    readme = tmp_path / "README.md"
    for body in ("no markers here\n", "<!-- bench:end -->\nx\n<!-- bench:start -->\n",
                 "<!-- bench:start -->\n<!-- bench:start -->\n<!-- bench:end -->\n"):
        readme.write_text(body)
        assert bench.main(["readme-block", str(results), str(readme)]) == 2
        assert readme.read_text() == body
        assert str(readme) in capsys.readouterr().err
    readme.write_text("<!-- bench:start -->\n<!-- bench:end -->\n")
    assert bench.main(["readme-block", str(results), str(readme)]) == 2  # no report written yet
    assert "run `python -m mgm_fast.bench report" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# env, matmul rate, Triton check


def test_env_has_the_machine_and_versions(tmp_path, capsys):
    out = tmp_path / "env.json"
    assert bench.main(["env", "--out", str(out)]) == 0
    env = json.loads(out.read_text())
    assert env == json.loads(capsys.readouterr().out)
    for key in ("date", "python", "torch", "cuda", "cudnn", "triton", "device", "device_name", "driver",
                "cpu_model", "cpu_cores", "gpu_name", "commit", "TRITON_INTERPRET"):
        assert key in env
    assert env["torch"] == torch.__version__ and env["cpu_cores"] == os.cpu_count()
    assert env["device"] == ("cuda:0" if torch.cuda.is_available() else "cpu")
    assert env["TRITON_INTERPRET"] == os.environ.get("TRITON_INTERPRET")


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_matmul_rate_on_cpu_is_marked_a_cpu_number(tmp_path, dtype):
    out = tmp_path / "rate.json"
    argv = ["matmul-rate", "--device", "cpu", "--dtype", dtype, "--size", "48", "--iters", "4", "--warmup", "1",
            "--out", str(out)]
    assert bench.main(argv) == 0
    rate = json.loads(out.read_text())
    assert rate["device"] == "cpu" and rate["size"] == 48 and rate["timer"] == "perf_counter"
    assert rate["flops_per_matmul"] == 2 * 48**3
    assert rate["tflops_median"] == pytest.approx(rate["flops_per_matmul"] / rate["seconds_median"] / 1e12)
    assert 0 < rate["tflops_median"] <= rate["tflops_best"]
    assert "CPU number" in rate["note"]
    with pytest.raises(ValueError, match="dtype"):
        benchtools.matmul_rate("int8", 8, "cpu")


def test_triton_check_reports_interpreter_and_refuses_it_when_compiled_is_required():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "mgm_fast.bench", "triton-check", "--require-compiled"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 1, run.stderr
    result = json.loads(run.stdout)
    assert result["mode"] == "interpreter" and result["ok"] and result["max_abs_error"] == 0.0
    assert "set TRITON_INTERPRET=0" in run.stderr


# ---------------------------------------------------------------------------------------------
# timing helpers


def test_time_cpu_rotates_inputs_and_excludes_warmup():
    seen = []

    def fn(x, delay=0.0):
        seen.append(x)
        time.sleep(delay)

    inputs = [(0,), [1], {"x": 2, "delay": 0.002}]
    timing = benchtools.time_cpu(fn, inputs, warmup=2, iters=4)
    assert seen == [0, 1, 2, 0, 1, 2]  # 2 warm-up calls, then 4 timed ones, continuing the rotation
    assert len(timing.times_s) == 4 and timing.warmup == 2 and timing.input_sets == 3
    assert timing.times_s[0] >= 0.002 and timing.times_s[3] >= 0.002  # the two calls that slept
    assert timing.min_s <= timing.median_s <= timing.max_s and timing.timer == "perf_counter"
    assert timing.as_dict()["device"] == "cpu"
    seen.clear()
    benchtools.time_on("cpu", fn, [5], 0, 2)  # a single non-sequence input set is passed as one argument
    assert seen == [5, 5]
    for bad in ([], "ab", None):
        with pytest.raises(ValueError, match="inputs_list"):
            benchtools.time_cpu(fn, bad)
    with pytest.raises(ValueError, match="iters"):
        benchtools.time_cpu(fn, [(1,)], iters=0)
    with pytest.raises(ValueError, match="warmup"):
        benchtools.time_cpu(fn, [(1,)], warmup=-1)


def test_mfu_and_its_input_checks():
    assert benchtools.mfu(4e12, 0.05, 100e12) == pytest.approx(0.8)
    for args in ((0, 1, 1), (1, 0, 1), (1, 1, float("nan")), (1, -1, 1), (True, 1, 1)):
        with pytest.raises(ValueError, match="mfu"):
            benchtools.mfu(*args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU answers")
def test_cpu_has_no_peak_memory_and_no_cuda_timer():
    ran = []
    peak = benchtools.peak_memory(lambda: ran.append(1))
    assert peak.bytes is None and peak.mib is None and "CUDA caching allocator" in peak.reason and not ran
    with pytest.raises(RuntimeError, match="time_cuda needs a CUDA device"):
        benchtools.time_cuda(lambda: None, [()])
    t0 = benchtools.synced_timer()
    assert benchtools.synced_timer() >= t0 and not torch.cuda.is_initialized()


@pytest.mark.gpu
def test_time_cuda_and_peak_memory_on_the_gpu():
    dev = torch.device("cuda")
    sets = [(torch.randn(512, 512, device=dev), torch.randn(512, 512, device=dev)) for _ in range(3)]
    calls = []

    def fn(a, b):
        calls.append(a.data_ptr())
        return a @ b

    timing = benchtools.time_cuda(fn, sets, warmup=3, iters=6)
    assert timing.timer == "cuda-events" and len(timing.times_s) == 6 and timing.min_s > 0
    assert calls == [sets[k % 3][0].data_ptr() for k in range(9)]
    assert torch.cuda.get_device_name(dev) in timing.device
    slow = benchtools.time_cuda(lambda a: [a @ a for _ in range(20)], [sets[0][0]], warmup=1, iters=3)
    assert slow.median_s > timing.median_s  # events see the GPU work, not just the launch
    peak = benchtools.peak_memory(lambda: torch.empty(64 * 2**20, dtype=torch.uint8, device=dev))
    assert peak.reason is None and peak.bytes >= 64 * 2**20
    assert benchtools.synced_timer() > 0


def test_triton_check_kernel_lowers_for_sm90():
    """The kernel the GPU suite launches compiles to PTX and a cubin for sm_90 (no GPU needed). In
    a subprocess: this process decorated Triton's own helpers for the interpreter."""
    pytest.importorskip("triton")
    code = """if True:
        import json, triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
        from mgm_fast import bench
        kernel = bench.affine_kernel()
        assert isinstance(kernel, JITFunction), type(kernel)
        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
        compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK": 256}),
                                  target=GPUTarget("cuda", 90, 32))
        print(json.dumps({"ptx": compiled.asm["ptx"], "cubin": len(compiled.asm["cubin"])}))
    """
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "0"})
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert ".target sm_90" in out["ptx"] and out["cubin"] > 0
