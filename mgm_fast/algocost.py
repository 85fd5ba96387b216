"""``python -m mgm_fast.algocost``: time the interchangeable algorithms of the cpp ops per shape,
and fit the cost models that pick among them.

Two ops of the C++ extension compute the same values by several algorithms and pick one per
shape: the plain convolution (``mgm_fast.ops.conv2d``: oneDNN or im2col + GEMM) and the GenBlock's
two convolutions (``mgm_fast.ops.genblock``: conv1 phase | gemm | upsample, conv2 conv | gemm).
By default the pick is a cost model, a function of the shape (every process, rank and machine
picks the same algorithm, so fresh runs with one seed repeat bit for bit); its coefficients live
in the bindings (``csrc/bindings/conv2d.cpp``, ``csrc/bindings/genblock.cpp``) and were fitted
with this module to timings committed under ``benchmarks/results/cpu-2core-xeon/``.

Model: for each algorithm, microseconds of one forward + backward =
``fixed + per_input * input + per_output * output + per_col * cols + per_mac * macs +
per_weight * weight``, counted in elements (``features``), with non-negative coefficients fitted
by least squares on the relative error (each shape weighs the same whatever its size).

Subcommands:
  collect {conv2d,genblock} --out FILE [--shapes-from FILE] [--repeats N]
      Times every candidate of each shape (the ops' ``timed`` mode: forward + backward on
      stand-in inputs), keeps each candidate's fastest of ``--repeats`` timings, writes rows as
      the committed ``algo_timings.json`` files hold them. conv2d needs ``--shapes-from`` (an
      earlier timings file: the same shapes re-timed on this machine); genblock defaults to the
      generator blocks of the tiny (batch 8), host-floor (batch 2) and paper (batch 4 and 8)
      presets plus a grid of 30 more shapes.
  fit FILE
      Fits the model of each algorithm to FILE's rows, prints the coefficients as the C++
      constants and how often the fitted model picks the fastest algorithm, and the total time
      of its picks against the best picks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

FEATURES = ("fixed", "per_input", "per_output", "per_col", "per_mac", "per_weight")
ALGORITHMS = {"conv2d": ("conv", "gemm"), "conv1": ("phase", "gemm", "upsample"), "conv2": ("conv", "gemm")}
"""The algorithms of each choice, in the order of the bindings' enums."""


def _conv2d_sizes(row: list) -> tuple[float, float, float, float, float]:
    """(input, output, cols, macs, weight) elements of a conv2d row (n, cin, h, w, cout, kh, kw,
    sh, sw, ph, pw, ...); cols: the im2col columns, 0 for a 1x1 stride-1 unpadded convolution,
    whose input is its own column matrix."""
    n, cin, h, w, cout, kh, kw, sh, sw, ph, pw = row[:11]
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    cols = n * cin * kh * kw * ho * wo
    im2col = kh * kw > 1 or sh * sw > 1 or ph + pw > 0
    return n * cin * h * w, n * cout * ho * wo, cols if im2col else 0, cols * cout, cout * cin * kh * kw


def _genblock_sizes(row: list, algo: str) -> tuple[float, float, float, float, float]:
    """(input, output, cols, macs, weight) elements of one conv of a GenBlock row (conv, n, cin,
    cout, h, w, ...): conv1 (nearest x2 + conv3x3 of the block's (n, cin, h, w) input) by
    ``algo``: phase -- a 2x2 conv with 4 cout outputs over the (h+1) x (w+1) padded map; gemm --
    4 taps per phase on the h x w map (16 n h w cin columns); upsample -- the 3x3 conv of the
    2h x 2w map; conv2 (conv3x3 at the block's (n, cout, h, w) output) either way 9 taps."""
    conv, n, cin, cout, h, w = row[:6]
    if conv == "conv2":
        cols = 9 * n * h * w * cin
        return n * cin * h * w, n * cout * h * w, cols, cols * cout, 9 * cin * cout
    cols = {"phase": 4 * n * (h + 1) * (w + 1) * cin, "gemm": 16 * n * h * w * cin, "upsample": 36 * n * h * w * cin}[algo]
    return n * cin * h * w, 4 * n * cout * h * w, cols, cols * cout, 9 * cin * cout


def choice_of(op: str, row: list) -> str:
    """conv2d, conv1 or conv2: which choice a timings row belongs to."""
    return "conv2d" if op == "conv2d" else row[0]


def features(op: str, row: list, algo: str) -> np.ndarray:
    """The model's feature vector (1, input, output, cols, macs, weight) of a row's shape for an
    algorithm."""
    sizes = _conv2d_sizes(row) if op == "conv2d" else _genblock_sizes(row, algo)
    return np.array([1.0, *map(float, sizes)])


def nnls(a: np.ndarray, b: np.ndarray, tol: float = 1e-12, max_iter: int = 500) -> np.ndarray:
    """argmin ||a x - b|| subject to x >= 0 (Lawson and Hanson's active-set method); a (m, k),
    b (m,) float64 -> x (k,)."""
    k = a.shape[1]
    x = np.zeros(k)
    passive = np.zeros(k, dtype=bool)
    for _ in range(max_iter):
        grad = a.T @ (b - a @ x)
        if passive.all() or grad[~passive].max() <= tol:
            return x
        passive[np.argmax(np.where(passive, -np.inf, grad))] = True
        while True:
            z = np.zeros(k)
            z[passive] = np.linalg.lstsq(a[:, passive], b, rcond=None)[0]
            if (z[passive] > 0).all():
                x = z
                break
            # step back to the boundary: the first passive coefficient to reach zero leaves
            shrink = passive & (z <= 0)
            alpha = np.min(x[shrink] / (x[shrink] - z[shrink]))
            x = x + alpha * (z - x)
            passive &= x > tol
    raise RuntimeError("nnls did not converge")


def fit(op: str, rows: list) -> dict[str, dict[str, np.ndarray]]:
    """{choice: {algorithm: coefficients (6,), microseconds per FEATURES}} fitted to rows whose
    last entry is {algorithm: seconds}: non-negative least squares on relative error."""
    models: dict[str, dict[str, np.ndarray]] = {}
    for choice, algos in ALGORITHMS.items():
        picked = [r for r in rows if choice_of(op, r) == choice]
        for algo in algos:
            timed = [r for r in picked if algo in r[-1]]
            if not timed:
                continue
            t = np.array([r[-1][algo] * 1e6 for r in timed])
            a = np.stack([features(op, r, algo) for r in timed]) / t[:, None]
            scale = np.linalg.norm(a, axis=0)
            scale[scale == 0] = 1.0
            models.setdefault(choice, {})[algo] = nnls(a / scale, np.ones(len(t))) / scale
    return models


def predicted_pick(op: str, models: dict, row: list) -> str:
    """The algorithm of least modelled time among those the row timed (its candidates)."""
    model = models[choice_of(op, row)]
    return min(row[-1], key=lambda algo: float(features(op, row, algo) @ model[algo]))


def score(op: str, models: dict, rows: list) -> tuple[int, int, float, float]:
    """(right picks, rows, seconds of the model's picks, seconds of the best picks) over rows with
    two or more timed candidates."""
    right, total, picked, best = 0, 0, 0.0, 0.0
    for row in rows:
        seconds = row[-1]
        if len(seconds) < 2:
            continue
        pick, fastest = predicted_pick(op, models, row), min(seconds, key=seconds.get)
        right += pick == fastest
        total += 1
        picked += seconds[pick]
        best += seconds[fastest]
    return right, total, picked, best


def cpp_constants(models: dict) -> str:
    """The fitted coefficients as the bindings' CostModel initialisers (4 significant digits)."""
    lines = []
    for choice, per_algo in models.items():
        for algo, c in per_algo.items():
            values = ", ".join(f"{v:.4g}" for v in c)
            lines.append(f"{choice} {algo}: {{{values}}}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# collecting timings (the ops' timed mode)

GENBLOCK_COLUMNS = ["conv", "n", "cin", "cout", "h", "w", "dtype", "seconds"]
CONV2D_COLUMNS = ["n", "cin", "h", "w", "cout", "kh", "kw", "sh", "sw", "ph", "pw", "seconds"]
GENBLOCK_GRID = [(32, 32, 4), (32, 32, 16), (64, 32, 8), (256, 128, 4), (256, 128, 16), (512, 512, 8),
                 (16, 16, 32), (128, 128, 32), (48, 24, 8), (96, 96, 4)]  # fmt: skip
"""(cin, cout, input resolution) of the extra GenBlock shapes, each at batch 2, 8 and 32."""


def default_genblock_shapes() -> list[tuple[int, int, int, int]]:
    """(n, cin, cout, res) block shapes: the tiny preset's generator at batch 8, the host floor's
    at batch 2, the paper preset's at batch 4 and 8, and GENBLOCK_GRID at batch 2, 8 and 32."""
    from mgm_fast.config import ModelConfig, preset
    from mgm_fast.models.gan import generator_blocks
    from mgm_fast.stepcost import FLOOR_BATCH, FLOOR_SET

    floor = {k.split("=")[0].split(".")[1]: k.split("=")[1] for k in FLOOR_SET}
    floor_model = ModelConfig(image_size=int(floor["image_size"]), g_conv_dim=int(floor["g_conv_dim"]),
                              g_channel_mults=tuple(int(v) for v in floor["g_channel_mults"].split(",")))  # fmt: skip
    shapes = [(8, *b) for b in generator_blocks(preset("tiny").model)]
    shapes += [(FLOOR_BATCH, *b) for b in generator_blocks(floor_model)]
    shapes += [(n, *b) for n in (4, 8) for b in generator_blocks(preset("paper").model)]
    shapes += [(n, *b) for n in (2, 8, 32) for b in GENBLOCK_GRID]
    return sorted(set(shapes))


def _shapes_from(path: Path, op: str) -> list:
    rows = json.loads(path.read_text())["rows"]
    if op == "conv2d":
        return sorted({tuple(r[:11]) for r in rows})
    # a conv1 row is its block's input; a conv2 row (n, c, c, 2h, 2w) is the output of a block
    # (n, c, c, h): conv2's time does not depend on the block's input channels
    return sorted({(r[1], r[2], r[3], r[4]) if r[0] == "conv1" else (r[1], r[3], r[3], r[4] // 2) for r in rows})


def _merge_fastest(best: dict, rows) -> None:
    for key, seconds in rows:
        if len(seconds) < 2:  # a single candidate is not timed
            continue
        kept = best.setdefault(key, {})
        for algo, t in seconds.items():
            kept[algo] = min(kept.get(algo, float("inf")), t)


def collect(op: str, shapes: list, repeats: int = 3, progress=None) -> list:
    """Times every candidate of each shape with the op's timed mode, ``repeats`` times (the cache
    cleared in between), and returns rows (key..., {algorithm: fastest seconds}) for the shapes
    with two or more candidates. conv2d shapes: (n, cin, h, w, cout, kh, kw, sh, sw, ph, pw);
    genblock shapes: (n, cin, cout, res) blocks (float32, square maps)."""
    import torch

    from mgm_fast import _native

    ext = _native.extension()  # raises with the reason when the extension is unavailable
    env = ("MGM_FAST_CONV2D_ALGO",) if op == "conv2d" else ("MGM_FAST_GENBLOCK_ALGO", "MGM_FAST_GENBLOCK_CONV2_ALGO")
    saved = {name: os.environ.get(name) for name in env}
    best: dict = {}
    try:
        for name in env:
            os.environ[name] = "timed"
        for rep in range(repeats):
            if op == "conv2d":
                ext.conv2d_algos_clear_cpu()
                for n, cin, h, w, cout, kh, kw, sh, sw, ph, pw in shapes:
                    x = torch.zeros(n, cin, h, w).contiguous(memory_format=torch.channels_last)
                    weight = torch.zeros(cout, cin, kh, kw).contiguous(memory_format=torch.channels_last)
                    ext.conv2d_algo_cpu(x, weight, None, [sh, sw], [ph, pw])
                _merge_fastest(best, [(tuple(r[:11]), r[13]) for r in ext.conv2d_algos_cpu()])
            else:
                from mgm_fast.models.gan import GenBlock

                ext.genblock_algos_clear_cpu()
                for n, cin, cout, res in shapes:
                    torch.manual_seed(0)
                    block = GenBlock(cin, cout, 2, impl="cpp").train()
                    x = torch.randn(n, cin, res, res).contiguous(memory_format=torch.channels_last)
                    with torch.no_grad():
                        block(x, torch.zeros(n, dtype=torch.long))
                _merge_fastest(best, [(tuple(r[:7]), r[9]) for r in ext.genblock_algos_cpu()])
            if progress is not None:
                progress(f"round {rep + 1}/{repeats}: {len(best)} timed shapes")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        (ext.conv2d_algos_clear_cpu if op == "conv2d" else ext.genblock_algos_clear_cpu)()
    return [[*key, seconds] for key, seconds in sorted(best.items())]


def _timings_op(doc: dict, path: Path) -> str:
    columns = doc.get("columns")
    if columns == CONV2D_COLUMNS:
        return "conv2d"
    if columns == GENBLOCK_COLUMNS:
        return "genblock"
    raise SystemExit(f"{path}: 'columns' is neither conv2d's {CONV2D_COLUMNS} nor genblock's {GENBLOCK_COLUMNS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mgm_fast.algocost", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("collect", help="time each candidate algorithm per shape (the ops' timed mode)")
    p.add_argument("op", choices=("conv2d", "genblock"))
    p.add_argument("--out", required=True, help="timings JSON to write")
    p.add_argument("--shapes-from", help="an earlier timings JSON: re-time its shapes (required for conv2d)")
    p.add_argument("--repeats", type=int, default=3, help="timings per shape; each candidate keeps its fastest")
    p = sub.add_parser("fit", help="fit the cost models to a timings JSON and print the C++ constants")
    p.add_argument("timings")
    args = parser.parse_args(argv)

    if args.cmd == "collect":
        if args.repeats < 1:
            parser.error("--repeats must be at least 1")
        if args.shapes_from:
            source = Path(args.shapes_from)
            if _timings_op(json.loads(source.read_text()), source) != args.op:
                parser.error(f"--shapes-from {source} holds {_timings_op(json.loads(source.read_text()), source)} timings, not {args.op}")
            shapes = _shapes_from(source, args.op)
        elif args.op == "conv2d":
            parser.error("conv2d needs --shapes-from (e.g. benchmarks/results/cpu-2core-xeon/conv2d/algo_timings.json)")
        else:
            shapes = default_genblock_shapes()
        print(f"timing {len(shapes)} {args.op} shapes, {args.repeats} rounds", file=sys.stderr)
        rows = collect(args.op, shapes, args.repeats, progress=lambda msg: print(msg, file=sys.stderr))
        from mgm_fast.benchenv import collect_env

        doc = {"note": f"Forward + backward seconds of each candidate algorithm of the cpp {args.op} per shape "
                       f"(timed mode, fastest of {args.repeats} rounds), written by python -m mgm_fast.algocost collect.",
               "env": collect_env(), "columns": CONV2D_COLUMNS if args.op == "conv2d" else GENBLOCK_COLUMNS,
               "rows": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
        return 0

    path = Path(args.timings)
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"{path}: cannot read timings JSON: {exc}") from exc
    op = _timings_op(doc, path)
    models = fit(op, doc["rows"])
    print("coefficients (microseconds): " + ", ".join(FEATURES))
    print(cpp_constants(models))
    right, total, picked, best = score(op, models, doc["rows"])
    print(f"fastest picked for {right} of {total} shapes; picks cost {100 * (picked / best - 1):.2f} % more than the best")
    return 0


if __name__ == "__main__":
    sys.exit(main())
