"""``python -m mgm_fast.study``: the paper's protocol — methods x labelled-data regimes x seeds.

Each (method, regime, seed) is one ``python -m mgm_fast.train`` run in
``OUT/<method>/r<regime>/s<seed>``. The grid is resumable: a run with ``eval.json`` is done and
skipped, a run with a checkpoint is continued (``--resume``), anything else starts fresh. At the
end ``OUT/study.md`` / ``study.json`` hold, per method and regime, every metric as mean ± std over
the seeds, and delta-m (in %, positive = better; Maninis et al. 2019) of each run against the
single-task (``st``) run of the same regime and seed, averaged over seeds.

Example::

    python -m mgm_fast.study --methods st,mt,mgm-light,mgm --regimes 0.1,0.25,0.5 \\
        --seeds 0,1,2,3,4 --out studies/nyu --train-args "--preset paper --data official:./nyu-std"
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from mgm_fast import train
from mgm_fast.metrics import delta_m, mean_std_table


def run_dir(out: Path, method: str, regime: float, seed: int) -> Path:
    return out / method / f"r{regime:g}" / f"s{seed}"


def run_one(folder: Path, method: str, regime: float, seed: int, train_args: list[str]) -> str:
    """Train one grid cell unless it is finished; returns what happened."""
    if (folder / "eval.json").exists():
        return "done"
    if any((folder / "checkpoints").glob("ckpt-*.pt")):
        train.main(["--resume", str(folder), "--quiet"])
        return "resumed"
    train.main([*train_args, "--method", method, "--regime", str(regime), "--seed", str(seed),
                "--out", str(folder), "--quiet"])
    return "trained"


def summarise(out: Path, methods, regimes, seeds) -> tuple[str, dict]:
    """Mean ± std tables per regime and delta-m against st (when st is in the grid)."""
    sections, data = [], {}
    for regime in regimes:
        rows, dms = {}, {}
        for method in methods:
            runs = []
            for seed in seeds:
                path = run_dir(out, method, regime, seed) / "eval.json"
                if path.exists():
                    runs.append(json.loads(path.read_text()))
            if not runs:
                continue
            rows[method] = runs
            if "st" in methods and method != "st":
                values = []
                for seed, metrics in zip(seeds, runs):
                    base = run_dir(out, "st", regime, seed) / "eval.json"
                    if base.exists():
                        baseline = json.loads(base.read_text())
                        keys = [k for k in metrics if k in baseline]
                        values.append(delta_m(metrics, baseline, keys=keys))
                if values:
                    mean = sum(values) / len(values)
                    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
                    dms[method] = {"mean": mean, "std": std, "n": len(values)}
        if not rows:
            continue
        table = mean_std_table(rows, percent=True)
        dm_lines = [f"- delta-m vs st, {m}: {d['mean']:+.2f} ± {d['std']:.2f} % (n={d['n']})" for m, d in dms.items()]
        sections.append(f"## regime {regime:g} (labelled fraction)\n\n{table}\n" + "\n".join(dm_lines))
        data[f"{regime:g}"] = {"table": json.loads(mean_std_table(rows, fmt="json")), "delta_m": dms}
    return "\n\n".join(sections) + "\n", data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgm_fast.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="st,mt,mgm-light,mgm", help="comma-separated methods")
    p.add_argument("--regimes", default="0.1,0.25,0.5", help="comma-separated labelled fractions")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--train-args", default="", help="extra options for every run, e.g. \"--preset paper\"")
    p.add_argument("--summary-only", action="store_true", help="only rebuild the tables from finished runs")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in train.METHODS]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {list(train.METHODS)}")
    regimes = [float(r) for r in args.regimes.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    train_args = shlex.split(args.train_args)
    if not args.summary_only:
        cells = [(m, r, s) for r in regimes for m in methods for s in seeds]
        for i, (method, regime, seed) in enumerate(cells, 1):
            folder = run_dir(out, method, regime, seed)
            status = run_one(folder, method, regime, seed, train_args)
            print(f"[{i}/{len(cells)}] {method} regime {regime:g} seed {seed}: {status} ({folder})", flush=True)
    text, data = summarise(out, methods, regimes, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text(text)
    (out / "study.json").write_text(json.dumps(data, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
