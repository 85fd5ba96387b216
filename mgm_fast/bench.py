"""``python -m mgm_fast.bench``: benchmark reports, the environment record, the matmul rate.

Subcommands:
  report RESULTS_DIR [--out FILE] [--plots]
      Reads every pytest-benchmark JSON in RESULTS_DIR (plus ``env.json`` and
      ``matmul_rate.json`` when present) and writes RESULTS_DIR/README.md: machine and run
      header, a speed-ups table, and per group a table of median, min, rounds and throughput.
      ``--plots`` also draws PNG bar charts (speed-ups and throughput per group) next to it.
  readme-block RESULTS_DIR [RESULTS_DIR ...] MARKDOWN_FILE
      Replaces the text between ``<!-- bench:start -->`` and ``<!-- bench:end -->`` in
      MARKDOWN_FILE (docs/performance.md) with a generated summary of each run in RESULTS_DIR
      and its sub-folders (device, date, every group's best speed-up over its baseline), linking
      to each run's report. A group measured in several runs is shown from the newest only.
  env [--out FILE]
      Prints (and writes) the environment as JSON: python, torch, CUDA, cuDNN, triton, the
      device and driver (nvidia-smi), CPU model and core count, date, commit.
  matmul-rate [--dtype bf16] [--size N] [--iters N] [--warmup N] [--out FILE]
      Dense matmul TFLOP/s of this device (CUDA events or perf_counter, warm-up excluded,
      median): the denominator of MFU. Works on the CPU too (default size 1024) and says so.
  step-cost [--methods phase-a,mgm,mgm-light,mt] [--engine fast] [--compile] [--json FILE]
      One step of each method counted on any device: ATen ops per sub-step, host syncs,
      graph breaks and recompiles under --compile, and the host floor (median step time at a
      degenerate size). See mgm_fast/stepcost.py.
  triton-check [--require-compiled] [--out FILE]
      Launches a small Triton kernel, checks its result and says whether it was compiled for
      the GPU or ran under the interpreter (``TRITON_INTERPRET``).

Speed-up rule: within a group, speed-up = baseline median / row median (above 1 means faster
than the baseline). The baseline is the row whose ``extra_info`` has ``baseline: true``; if no
row is marked, the row whose name contains ``reference`` or ``eager`` (case-insensitive). A group
where that does not single out exactly one row has no speed-ups; the report lists it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mgm_fast.benchenv import collect_env

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
ENV_FILE = "env.json"
MATMUL_FILE = "matmul_rate.json"
TRITON_FILE = "triton_check.json"
STAGES_FILE = "stages.tsv"  # written by benchmarks/gpu_suite.sh
PLOT_PREFIXES = ("speedup-", "throughput-")


class BenchError(ValueError):
    """Bad or missing benchmark input (the message names the file)."""


# ---------------------------------------------------------------------------------------------
# reading results


@dataclass
class Row:
    """One benchmark of a pytest-benchmark JSON; times in seconds."""

    group: str
    name: str
    fullname: str
    param: str | None
    extra: dict
    median: float
    min: float
    rounds: int
    timer: str
    source: str

    def throughput(self) -> tuple[float, str] | None:
        """(items per second of the median round, unit) from ``extra_info['<unit>_per_s_median']``."""
        for key, value in self.extra.items():
            if key.endswith("_per_s_median") and isinstance(value, (int, float)):
                return float(value), key[: -len("_per_s_median")]
        return None


@dataclass
class Results:
    folder: Path
    sources: list[dict]
    rows: list[Row]
    env: dict | None = None
    matmul: dict | None = None
    skipped: list[str] = field(default_factory=list)
    triton: dict | None = None
    stages: list[list[str]] | None = None

    def groups(self) -> dict[str, list[Row]]:
        """group -> rows, groups by name, rows fastest first."""
        out: dict[str, list[Row]] = {}
        for row in self.rows:
            out.setdefault(row.group, []).append(row)
        return {g: sorted(out[g], key=lambda r: (r.median, r.name)) for g in sorted(out)}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BenchError(f"{path}: not readable JSON ({err})") from err


def _is_pytest_benchmark(doc) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list) and "machine_info" in doc


def load_results(folder: str | Path) -> Results:
    """Every pytest-benchmark JSON in ``folder`` (not recursive), plus the GPU suite's env.json,
    matmul_rate.json, triton_check.json and stages.tsv where present. Other JSON is ignored. A
    folder with none of these is an error; one with suite files but no benchmark JSON is not."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BenchError(f"{folder}: not a directory")
    sources, rows, skipped = [], [], []
    seen: dict[str, str] = {}
    env = matmul = triton = None
    for path in sorted(folder.glob("*.json")):
        doc = _read_json(path)
        if path.name == ENV_FILE:
            env = doc
            continue
        if path.name == MATMUL_FILE:
            matmul = doc
            continue
        if path.name == TRITON_FILE:
            triton = doc
            continue
        if not _is_pytest_benchmark(doc):
            continue  # another tool's JSON: not ours to read
        sources.append({"file": path.name, **{k: doc.get(k) for k in
                                              ("datetime", "version", "machine_info", "commit_info")}})
        for i, bench in enumerate(doc["benchmarks"]):
            try:
                name, stats = bench["name"], bench.get("stats")
                fullname = bench.get("fullname", name)
                if not stats:
                    skipped.append(f"{name} ({path.name}): no statistics")
                    continue
                if fullname in seen:
                    raise BenchError(f"{path}: benchmark {fullname!r} is also in {seen[fullname]}; "
                                     "keep one run per benchmark in a results folder")
                seen[fullname] = path.name
                if not (math.isfinite(stats["median"]) and stats["median"] > 0):
                    raise BenchError(f"{path}: benchmark {name!r} has median {stats['median']!r}; expected > 0")
                rows.append(Row(
                    group=bench.get("group") or "(no group)",
                    name=name,
                    fullname=fullname,
                    param=bench.get("param"),
                    extra=dict(bench.get("extra_info") or {}),
                    median=float(stats["median"]),
                    min=float(stats["min"]),
                    rounds=int(stats["rounds"]),
                    timer=str((bench.get("options") or {}).get("timer", "?")),
                    source=path.name,
                ))
            except (KeyError, TypeError, ValueError) as err:
                if isinstance(err, BenchError):
                    raise
                raise BenchError(f"{path}: benchmarks[{i}] is not in pytest-benchmark format ({err!r})") from err
    stages = None
    if (folder / STAGES_FILE).is_file():
        lines = (folder / STAGES_FILE).read_text().splitlines()
        stages = [line.split("\t") for line in lines[1:] if line.count("\t") == 2]
    if not sources and env is None and matmul is None and triton is None and stages is None:
        # a GPU suite folder (env.json, stages.tsv, ...) gets a report even when no benchmark
        # finished; a folder with none of them is most likely the wrong one
        raise BenchError(f"{folder}: no pytest-benchmark JSON (a file with 'benchmarks' and 'machine_info'); "
                         "write one with pytest --benchmark-json=FILE")
    return Results(folder, sources, rows, env, matmul, skipped, triton, stages)


# ---------------------------------------------------------------------------------------------
# speed-ups


def baseline_row(rows: list[Row]) -> tuple[Row | None, str]:
    """The group's baseline row and how it was chosen, or (None, why there is none)."""
    marked = [r for r in rows if r.extra.get("baseline") is True]
    if len(marked) == 1:
        return marked[0], "marked baseline in extra_info"
    if len(marked) > 1:
        return None, "several rows are marked baseline: " + ", ".join(r.name for r in marked)
    named = [r for r in rows if "reference" in r.name.lower() or "eager" in r.name.lower()]
    if len(named) == 1:
        return named[0], "name contains reference/eager"
    if len(named) > 1:
        return None, "several names contain reference/eager: " + ", ".join(r.name for r in named)
    return None, "no row is marked baseline and no name contains reference or eager"


def speedups(rows: list[Row]) -> tuple[Row | None, str, dict[str, float]]:
    """(baseline, how/why, name -> baseline median / row median) for one group."""
    base, why = baseline_row(rows)
    if base is None:
        return None, why, {}
    return base, why, {r.name: base.median / r.median for r in rows}


# ---------------------------------------------------------------------------------------------
# formatting


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 1e-4:
        return "µs", 1e6
    if seconds < 1.0:
        return "ms", 1e3
    return "s", 1.0


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.1f}"
    return f"{value:.3f}"


def _tflops(value: float) -> str:
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _rate(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}/s" if value >= 100 else f"{value:.3g} {unit}/s"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _when(stamp: str | None) -> str:
    if not stamp:
        return "unknown date"
    try:
        t = dt.datetime.fromisoformat(stamp)
    except ValueError:
        return stamp
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc)
    return t.strftime("%Y-%m-%d %H:%M UTC")


def _machine(info: dict | None) -> str:
    if not info:
        return "unknown machine"
    cpu = info.get("cpu") or {}
    brand = cpu.get("brand_raw") or info.get("processor") or info.get("machine") or "unknown CPU"
    count = cpu.get("count")
    parts = [brand + (f", {count} logical cores" if count else "")]
    if info.get("system"):
        parts.append(f"{info['system']} {info.get('release', '')}".strip())
    if info.get("python_version"):
        parts.append(f"{info.get('python_implementation', 'Python')} {info['python_version']}")
    return "; ".join(parts)


def _commit(info: dict | None) -> str:
    if not info or not info.get("id"):
        return "unknown commit"
    text = f"commit {info['id'][:7]}"
    if info.get("branch"):
        text += f" ({info['branch']})"
    if info.get("dirty"):
        text += ", with uncommitted changes"
    return text


def device_line(results: Results) -> str:
    """One line naming where the numbers were measured."""
    env = results.env or {}
    if env.get("gpu_name"):
        parts = [env["gpu_name"]]
        if env.get("driver"):
            parts.append(f"driver {env['driver']}")
        if env.get("cuda"):
            parts.append(f"CUDA {env['cuda']}")
        return ", ".join(parts)
    info = results.sources[0].get("machine_info") or {}
    cpu = info.get("cpu") or {}
    brand = cpu.get("brand_raw") or info.get("machine") or "unknown CPU"
    return f"{brand} CPU, {cpu['count']} logical cores" if cpu.get("count") else f"{brand} CPU"


def _matmul_line(matmul: dict) -> str:
    rate = matmul.get("tflops_median")
    if not isinstance(rate, (int, float)):
        return f"`{MATMUL_FILE}` has no tflops_median"
    n = matmul.get("size", "?")
    text = (f"Dense {matmul.get('dtype', '?')} matmul rate (the MFU denominator): **{_tflops(rate)} TFLOP/s** "
            f"(median; {n}x{n} @ {n}x{n}, {matmul.get('iters', '?')} timed calls after "
            f"{matmul.get('warmup', '?')} warm-up, {matmul.get('timer', '?')}, on {matmul.get('device', '?')})")
    if matmul.get("note"):
        text += f". {matmul['note']}"
    return text + "."


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:80].rstrip("-") or "group"


def _labels(rows: list[Row]) -> dict[str, str]:
    """Short plot labels: the parameter id when every row has a distinct one, else the name."""
    params = [r.param for r in rows]
    if all(params) and len(set(params)) == len(params):
        return {r.name: str(r.param) for r in rows}
    return {r.name: r.name for r in rows}


def _mfu(row: Row, matmul: dict | None) -> float | None:
    if isinstance(row.extra.get("mfu"), (int, float)):
        return float(row.extra["mfu"])
    flops = row.extra.get("flops")
    if isinstance(flops, (int, float)) and matmul and isinstance(matmul.get("tflops_median"), (int, float)):
        return flops / row.median / (matmul["tflops_median"] * 1e12)
    return None


# ---------------------------------------------------------------------------------------------
# plots (Pillow only)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:
        return ImageFont.load_default()


def bar_chart(path: Path, title: str, labels: list[str], values: list[float], texts: list[str],
              colours: list[str], reference: float | None = None, footer: str = "") -> None:
    """Horizontal bar chart as PNG: one labelled bar per value, its text right of the bar, and an
    optional vertical line at ``reference`` (1.0 for speed-ups)."""
    from PIL import Image, ImageDraw

    font, title_font = _font(14), _font(16)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(max(probe.textlength(s, font=font) for s in labels)) + 16
    text_w = int(max(probe.textlength(s, font=font) for s in texts)) + 16
    bar_w, row_h, top, bottom = 420, 28, 44, 34 if footer else 14
    width = max(label_w + bar_w + text_w + 20, int(probe.textlength(title, font=title_font)) + 24)
    height = top + row_h * len(values) + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((12, 12), title, fill="black", font=title_font)
    scale = max([*values, reference or 0.0]) or 1.0
    x0 = label_w + 8
    for i, (label, value, text, colour) in enumerate(zip(labels, values, texts, colours)):
        y = top + i * row_h
        draw.text((x0 - 8 - probe.textlength(label, font=font), y + 6), label, fill="black", font=font)
        length = max(1, round(bar_w * value / scale))
        draw.rectangle((x0, y + 4, x0 + length, y + row_h - 4), fill=colour)
        draw.text((x0 + length + 6, y + 6), text, fill="black", font=font)
    if reference is not None:
        xr = x0 + round(bar_w * reference / scale)
        draw.line((xr, top - 4, xr, top + row_h * len(values)), fill="#444444", width=1)
    if footer:
        draw.text((12, height - 24), footer, fill="#555555", font=font)
    img.save(path, optimize=True)


def write_plots(results: Results, out_dir: Path) -> dict[str, list[tuple[str, str]]]:
    """Draws the PNGs for every group; returns group -> [(caption, file name)]. Earlier PNGs of
    this tool (speedup-*.png, throughput-*.png) in ``out_dir`` are removed first, so the folder
    holds exactly the plots of the current report."""
    for old in out_dir.iterdir():
        if old.suffix == ".png" and old.name.startswith(PLOT_PREFIXES):
            old.unlink()
    made: dict[str, list[tuple[str, str]]] = {}
    used: set[str] = set()

    def name_for(prefix: str, group: str) -> str:
        base = f"{prefix}{_slug(group)}"
        name, k = f"{base}.png", 2
        while name in used:
            name, k = f"{base}-{k}.png", k + 1
        used.add(name)
        return name

    for group, rows in results.groups().items():
        labels = _labels(rows)
        base, _, ratios = speedups(rows)
        if base is not None and len(rows) > 1:
            order = sorted(rows, key=lambda r: -ratios[r.name])
            fname = name_for("speedup-", group)
            bar_chart(out_dir / fname, f"{group}: speed-up vs {labels[base.name]}",
                      [labels[r.name] for r in order], [ratios[r.name] for r in order],
                      [f"{ratios[r.name]:.2f}x" for r in order],
                      ["#9e9e9e" if r is base else ("#2b7bba" if ratios[r.name] >= 1 else "#e07b39")
                       for r in order],
                      reference=1.0, footer="baseline median / median; line at 1x")
            made.setdefault(group, []).append(("speed-ups", fname))
        rated = [(r, r.throughput()) for r in rows]
        rated = [(r, t) for r, t in rated if t is not None]
        if rated:
            unit = rated[0][1][1]
            rated = sorted([(r, t) for r, t in rated if t[1] == unit], key=lambda rt: -rt[1][0])
            fname = name_for("throughput-", group)
            bar_chart(out_dir / fname, f"{group}: {unit}/s (median round)",
                      [labels[r.name] for r, _ in rated], [t[0] for _, t in rated],
                      [_rate(t[0], unit) for _, t in rated], ["#2b7bba"] * len(rated))
            made.setdefault(group, []).append(("throughput", fname))
    return made


# ---------------------------------------------------------------------------------------------
# markdown


def render_report(results: Results, plots: dict[str, list[tuple[str, str]]] | None = None) -> str:
    plots = plots or {}
    groups = results.groups()
    lines = [f"# Benchmarks: {results.folder.name}", ""]
    lines.append("Generated by `python -m mgm_fast.bench report` from the JSON in this folder: rerun the "
                 "benchmarks and regenerate instead of editing it.")
    lines.append("")
    for src in results.sources:
        lines.append(f"* `{src['file']}`: pytest-benchmark {src.get('version') or '?'}, run "
                     f"{_when(src.get('datetime'))}, {_commit(src.get('commit_info'))}.")
        lines.append(f"  Machine: {_machine(src.get('machine_info'))}.")
    env = results.env
    if env:
        lines.append(f"* `{ENV_FILE}` ({_when(env.get('date'))}): device {env.get('device_name') or '?'}"
                     + (f", driver {env['driver']}" if env.get("driver") else "")
                     + f"; torch {env.get('torch') or '?'} (CUDA {env.get('cuda') or 'none'}, "
                     f"cuDNN {env.get('cudnn') or 'none'}), triton {env.get('triton') or 'none'}; "
                     f"CPU {env.get('cpu_model') or '?'}, {env.get('cpu_cores') or '?'} cores.")
    if results.matmul:
        lines.append(f"* {_matmul_line(results.matmul)}")
    if results.triton:
        tri = results.triton
        lines.append(f"* Triton {tri.get('triton', '?')}: a test kernel ran "
                     f"{ {'interpreter': 'in the interpreter'}.get(tri.get('mode'), tri.get('mode', '?')) } on "
                     f"{tri.get('device', '?')}, result {'correct' if tri.get('ok') else 'WRONG'}"
                     + (f" (built: {', '.join(tri['artifacts'])})" if tri.get("artifacts") else "") + ".")
    timers = sorted({r.timer for r in results.rows})
    lines.append(f"* Timer: {', '.join(f'`{t}`' for t in timers) or 'none'}. Times are per call of the timed "
                 "function: median and minimum over pytest-benchmark rounds. Compare rows within a group.")
    if not results.sources:
        lines.append("* No pytest-benchmark JSON in this folder: no benchmark finished (see the suite stages).")
    if results.skipped:
        lines.append(f"* Left out (no statistics): {', '.join(results.skipped)}.")
    lines += ["", "## Speed-ups", ""]
    lines.append("Speed-up = baseline median / median (above 1: faster than the baseline). The baseline is the "
                 "row whose `extra_info` has `baseline: true`; if none is marked, the row whose name contains "
                 "`reference` or `eager`. Groups where that picks no single row have no speed-ups.")
    lines.append("")
    without = []
    table = ["| group | benchmark | median | speed-up |", "|---|---|---:|---:|"]
    for group, rows in groups.items():
        base, why, ratios = speedups(rows)
        if base is None:
            without.append((group, why))
            continue
        unit, mult = _time_unit(min(r.median for r in rows))
        for r in sorted(rows, key=lambda r: -ratios[r.name]):
            tag = " (baseline)" if r is base else ""
            table.append(f"| {_cell(group)} | {_cell(r.name)}{tag} | {_num(r.median * mult)} {unit} "
                         f"| {ratios[r.name]:.2f}x |")
    lines += table if len(table) > 2 else ["No group has a baseline row."]
    if without:
        lines += ["", "Groups without a baseline (throughput only):"]
        for why in dict.fromkeys(w for _, w in without):
            lines.append(f"* {_cell(why)}: " + "; ".join(_cell(g) for g, w in without if w == why) + ".")
    if results.stages:
        lines += ["", "## Suite stages", "", "| stage | status | seconds |", "|---|---|---:|"]
        lines += [f"| {_cell(a)} | {_cell(b)} | {_cell(c)} |" for a, b, c in results.stages]
    lines += ["", "## Results by group"]
    for group, rows in groups.items():
        unit, mult = _time_unit(min(r.median for r in rows))
        mfus = [_mfu(r, results.matmul) for r in rows]
        peaks = [r.extra.get("peak_memory_bytes") for r in rows]
        show_mfu = any(m is not None for m in mfus)
        show_peak = any(isinstance(p, (int, float)) for p in peaks)
        head = f"| benchmark | median ({unit}) | min ({unit}) | rounds | throughput |"
        rule = "|---|---:|---:|---:|---:|"
        if show_mfu:
            head, rule = head + " MFU |", rule + "---:|"
        if show_peak:
            head, rule = head + " peak memory (MiB) |", rule + "---:|"
        lines += ["", f"### {_cell(group)}", "", head, rule]
        for r, m, p in zip(rows, mfus, peaks):
            rate = r.throughput()
            line = (f"| {_cell(r.name)} | {_num(r.median * mult)} | {_num(r.min * mult)} | {r.rounds} "
                    f"| {_rate(*rate) if rate else '-'} |")
            if show_mfu:
                line += f" {m * 100:.1f}% |" if m is not None else " - |"
            if show_peak:
                line += f" {p / 2**20:,.1f} |" if isinstance(p, (int, float)) else " - |"
            lines.append(line)
        for caption, fname in plots.get(group, []):
            lines += ["", f"![{caption}: {_cell(group)}]({fname})"]
    return "\n".join(lines) + "\n"


def _write_text(path: Path, text: str) -> None:
    # temp file + rename: a reader never sees half a report
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        umask = os.umask(0)  # mkstemp makes 0600 files; give the usual mode instead
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_report(folder: str | Path, out: str | Path | None = None, plots: bool = False) -> Path:
    """Writes the markdown report (default ``folder/README.md``) and, with ``plots``, the PNGs
    next to it; returns the report's path."""
    results = load_results(folder)
    path = Path(out) if out is not None else results.folder / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    made = write_plots(results, path.parent) if plots else {}
    _write_text(path, render_report(results, made))
    return path


# ---------------------------------------------------------------------------------------------
# summary block (docs/performance.md)


def _holds_results(folder: Path) -> bool:
    """Whether :func:`load_results` has something to read in ``folder``."""
    if (folder / STAGES_FILE).is_file():
        return True
    for path in folder.glob("*.json"):
        if path.name in (ENV_FILE, MATMUL_FILE, TRITON_FILE):
            return True
        try:
            if _is_pytest_benchmark(json.loads(path.read_text())):
                return True
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return True  # load_results will name the broken file
    return False


def result_runs(folders: list[Path]) -> list[Path]:
    """The benchmark runs under ``folders``: each folder itself when it holds results, then every
    folder below it that does, in path order, each run once. One folder is one run: ``make
    bench`` writes the device folder, a targeted rerun writes a sub-folder of it."""
    runs: dict[Path, None] = {}
    for folder in folders:
        if not folder.is_dir():
            raise BenchError(f"{folder}: not a directory")
        found = [d for d in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())] if _holds_results(d)]
        if not found:
            raise BenchError(f"{folder}: no pytest-benchmark JSON in it or below it; "
                             "write one with pytest --benchmark-json=FILE")
        runs.update(dict.fromkeys(found))
    return list(runs)


def _measured_at(results: Results, rows: list[Row]) -> dt.datetime:
    """When the rows were measured: the newest run date of their JSON files (unknown = oldest)."""
    oldest = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    stamps = {s["file"]: s.get("datetime") for s in results.sources}
    times = []
    for source in {r.source for r in rows}:
        try:
            t = dt.datetime.fromisoformat(stamps.get(source) or "")
        except ValueError:
            t = oldest
        times.append(t if t.tzinfo is not None else t.replace(tzinfo=dt.timezone.utc))
    return max(times, default=oldest)


def latest_runs(runs: list[Results]) -> dict[str, int]:
    """group -> index in ``runs`` of the newest run that measured it (the later run on a tie).
    A group measured again in a later run is shown from that run only: the summary holds one
    generation of numbers, however many runs a results folder has collected."""
    newest: dict[str, tuple[dt.datetime, int]] = {}
    for i, results in enumerate(runs):
        for group, rows in results.groups().items():
            key = (_measured_at(results, rows), i)
            if group not in newest or key > newest[group]:
                newest[group] = key
    return {group: i for group, (_, i) in newest.items()}


def render_block(folders: list[Path], readme: Path) -> str:
    """The marked block: one section per run under ``folders`` (see :func:`result_runs`) with
    every group's best speed-up, each group from the newest run that measured it."""
    parts = [START_MARKER,
             "<!-- generated by `python -m mgm_fast.bench readme-block`; regenerate, do not edit -->"]
    runs = [load_results(run) for run in result_runs(folders)]
    names = {}  # run folder -> its name in the block: the path from the given folder's parent
    for folder in (f.resolve() for f in folders):
        for results in runs:
            run = results.folder.resolve()
            if run == folder or folder in run.parents:
                names.setdefault(results.folder, run.relative_to(folder.parent).as_posix())
    newest = latest_runs(runs)
    for i, results in enumerate(runs):
        report = results.folder / "README.md"
        if not report.is_file():
            raise BenchError(f"{report}: no report to link to; "
                             f"run `python -m mgm_fast.bench report {results.folder}` first")
        link = Path(os.path.relpath(os.path.abspath(report), os.path.abspath(readme.parent))).as_posix()
        dates = sorted({_when(s.get("datetime")).split(" ")[0] for s in results.sources})
        parts += ["", f"**{names[results.folder]}** — {device_line(results)}; measured {', '.join(dates)} "
                      f"([full report]({link})).", ""]
        if results.matmul and isinstance(results.matmul.get("tflops_median"), (int, float)):
            parts += [f"Dense {results.matmul.get('dtype', '?')} matmul: "
                      f"{_tflops(results.matmul['tflops_median'])} TFLOP/s (the MFU denominator).", ""]
        rows, without, superseded = [], 0, {}
        for group, grows in results.groups().items():
            if newest[group] != i:
                superseded.setdefault(names[runs[newest[group]].folder], []).append(group)
                continue
            base, _, ratios = speedups(grows)
            others = [r for r in grows if r is not base]
            if base is None or not others:
                without += 1
                continue
            best = max(others, key=lambda r: ratios[r.name])
            unit, mult = _time_unit(min(best.median, base.median))
            label = _labels(grows)
            rows.append(f"| {_cell(group)} | `{_cell(label[best.name])}` {_num(best.median * mult)} {unit} "
                        f"| `{_cell(label[base.name])}` {_num(base.median * mult)} {unit} "
                        f"| **{ratios[best.name]:.2f}x** |")
        body = []
        if rows:
            body.append("\n".join(["| benchmark group | fastest | baseline | speed-up |", "|---|---|---|---:|", *rows]))
        elif not superseded:
            body.append("No group has a baseline row.")
        if without:
            body.append(f"{without} more group(s) without a baseline (throughput only) are in the full report.")
        body += [f"Measured again in a later run, so shown under {newer} only: {'; '.join(groups)}."
                 for newer, groups in superseded.items()]
        parts.append("\n\n".join(body))
    parts.append(END_MARKER)
    return "\n".join(parts)


def replace_block(readme: str | Path, folders: list[str | Path]) -> None:
    """Replaces the marked block of ``readme`` (markers kept) with :func:`render_block`."""
    readme = Path(readme)
    try:
        text = readme.read_text()
    except OSError as err:
        raise BenchError(f"{readme}: cannot read ({err})") from err
    starts, ends = text.count(START_MARKER), text.count(END_MARKER)
    if starts != 1 or ends != 1:
        raise BenchError(f"{readme}: needs exactly one {START_MARKER} and one {END_MARKER} line "
                         f"(found {starts} and {ends})")
    i, j = text.index(START_MARKER), text.index(END_MARKER)
    if j < i:
        raise BenchError(f"{readme}: {END_MARKER} comes before {START_MARKER}")
    block = render_block([Path(f) for f in folders], readme)
    _write_text(readme, text[:i] + block + text[j + len(END_MARKER):])


# ---------------------------------------------------------------------------------------------
# Triton: compiled or interpreted?


def affine_kernel():
    """A fresh ``@triton.jit`` kernel ``y = 2 x + 1`` over ``n`` fp32 elements (masked blocks).

    Decorated at call time, so it sees the current ``TRITON_INTERPRET``: Triton reads the
    variable when ``@triton.jit`` runs ("1", "true" and "on" mean interpret), which is why
    setting it after a kernel module was imported changes nothing for that module.
    """
    import triton
    import triton.language as tl

    @triton.jit
    def _affine_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2.0 + 1.0, mask=mask)

    return _affine_kernel


def triton_check() -> dict:
    """Launches :func:`affine_kernel` on 1000 elements, checks the result and says how it ran:
    compiled for the CUDA device, or on CPU tensors under the interpreter."""
    import torch
    import triton
    from triton.runtime.interpreter import InterpretedFunction

    _affine_kernel = affine_kernel()
    interpreted = isinstance(_affine_kernel, InterpretedFunction)
    if not interpreted and not torch.cuda.is_available():
        raise RuntimeError("Triton would compile for a GPU (TRITON_INTERPRET is "
                           f"{os.environ.get('TRITON_INTERPRET')!r}) but no CUDA device is visible")
    device = "cpu" if interpreted else "cuda"
    n = 1000  # not a multiple of the block: the mask is exercised
    x = torch.linspace(-3, 3, n, device=device)
    y = torch.full_like(x, float("nan"))  # poisoned: a kernel that writes nothing fails the check
    launched = _affine_kernel[(triton.cdiv(n, 256),)](x, y, n, BLOCK=256)
    err = float((y - (2 * x + 1)).abs().max())  # NaN anywhere (unwritten) makes err NaN
    out = {
        "mode": "interpreter" if interpreted else "compiled",
        "device": device if interpreted else f"cuda ({torch.cuda.get_device_name()})",
        "triton": triton.__version__,
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "max_abs_error": err,
        "ok": math.isfinite(err) and err <= 1e-6,
    }
    asm = getattr(launched, "asm", None)
    if isinstance(asm, dict):
        out["artifacts"] = sorted(asm)  # e.g. ttir, ttgir, llir, ptx, cubin
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def _dump(obj: dict, out: str | None) -> None:
    text = json.dumps(obj, indent=2, default=str)
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        _write_text(Path(out), text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgm_fast.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("report", help="markdown report (and PNG plots) of a results folder")
    p.add_argument("results_dir")
    p.add_argument("--out", help="report file (default RESULTS_DIR/README.md); plots go next to it")
    p.add_argument("--plots", action="store_true", help="draw PNG bar charts next to the report")
    p = sub.add_parser("readme-block", help="refresh the marked benchmark block of a markdown file")
    p.add_argument("results_dirs", nargs="+", metavar="RESULTS_DIR")
    p.add_argument("readme", metavar="MARKDOWN_FILE")
    p = sub.add_parser("env", help="environment as JSON")
    p.add_argument("--out", help="also write the JSON to this file")
    p = sub.add_parser("matmul-rate", help="dense matmul TFLOP/s of this device")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--size", type=int, help="matrix size (default 8192 on CUDA, 1024 on the CPU)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: CUDA when present)")
    p.add_argument("--out", help="also write the JSON to this file")
    p = sub.add_parser("triton-check", help="run a small Triton kernel; compiled or interpreted?")
    p.add_argument("--require-compiled", action="store_true", help="fail unless the kernel was compiled")
    p.add_argument("--out", help="also write the JSON to this file")
    p = sub.add_parser("step-cost", help="ATen ops, host syncs, graph breaks and host floor of one step per method",
                       description="See mgm_fast/stepcost.py.")
    # Imported here, not at the top: the other commands need none of the training stack that
    # stepcost brings in.
    from mgm_fast import stepcost

    stepcost.add_arguments(p)
    args = parser.parse_args(argv)
    if args.cmd == "step-cost":
        return stepcost.run_cli(args)
    try:
        if args.cmd == "report":
            path = write_report(args.results_dir, args.out, args.plots)
            print(f"wrote {path}")
        elif args.cmd == "readme-block":
            replace_block(args.readme, args.results_dirs)
            print(f"updated the benchmark block of {args.readme}")
        elif args.cmd == "env":
            _dump(collect_env(), args.out)
        elif args.cmd == "matmul-rate":
            from mgm_fast.benchtools import matmul_rate

            result = matmul_rate(args.dtype, args.size, args.device, args.iters, args.warmup)
            _dump(result, args.out)
            print(f"dense {result['dtype']} matmul on {result['device']}: {result['tflops_median']:.3f} TFLOP/s "
                  f"(median, best {result['tflops_best']:.3f}; {result['timer']})"
                  + (" -- a CPU number" if "note" in result else ""), file=sys.stderr)
        elif args.cmd == "triton-check":
            result = triton_check()
            _dump(result, args.out)
            if not result["ok"]:
                print(f"error: the Triton kernel gave wrong results (max error {result['max_abs_error']})",
                      file=sys.stderr)
                return 1
            if args.require_compiled and result["mode"] != "compiled":
                print("error: Triton ran the kernel in the interpreter (TRITON_INTERPRET="
                      f"{result['TRITON_INTERPRET']!r}); set TRITON_INTERPRET=0 for GPU runs", file=sys.stderr)
                return 1
    except (BenchError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
