"""``python -m mgm_fast.selftest``: check every fused backend on this machine against float64.

Every op x backend x dtype x layout runs forward and backward on small odd shapes and on the
paper preset's shapes, and every output and input gradient must follow the 2x-error rule: its
error against a float64 twin is at most twice the plain-PyTorch path's in the same dtype (plus a
floor of ``slack(dtype)`` times the largest true entry). See :mod:`mgm_fast.ops._selftest`.

On the CPU it covers the C++ backends and, under the Triton interpreter (set here when the
device is the CPU), the Triton kernels at the small shapes. Exit status: 0 when nothing failed,
1 when a backend failed or raised, 2 on a usage error.

Examples::

    python -m mgm_fast.selftest                          # cuda if visible, else cpu
    python -m mgm_fast.selftest --device cuda --json selftest.json
    python -m mgm_fast.selftest --ops genblock,multitask_loss --sizes small --dtypes float32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mgm_fast.selftest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda if visible, else cpu)")
    p.add_argument("--ops", default=None, help="comma-separated op names (default: every op)")
    p.add_argument("--backends", default=None, help="comma-separated backends (default: every fused one)")
    p.add_argument("--dtypes", default="float32,bfloat16,float16",
                   help="comma-separated: float32, bfloat16, float16 (default: all three)")
    p.add_argument("--layouts", default="contiguous,channels_last",
                   help="comma-separated: contiguous, channels_last (4-d inputs only)")
    p.add_argument("--sizes", default="small,paper", help="comma-separated: small, paper")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every result as JSON")
    p.add_argument("--all-rows", action="store_true", help="also print the n/a rows")
    return p


def _split(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"error: --{what}: {bad or value!r} not in {sorted(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        # Triton kernels are decorated at import: the interpreter must be chosen before that.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2

    import mgm_fast.ops  # noqa: F401  (registers every op)
    from mgm_fast.ops import REGISTRY
    from mgm_fast.ops._dispatch import BACKEND_NAMES
    from mgm_fast.ops._selftest import DTYPES, LAYOUTS, SIZES, run_op

    ops = _split(args.ops, REGISTRY, "ops") if args.ops else sorted(REGISTRY)
    backends = _split(args.backends, set(BACKEND_NAMES) - {"reference"}, "backends") if args.backends else None
    dtypes = [DTYPES[d] for d in _split(args.dtypes, DTYPES, "dtypes")]
    layouts = _split(args.layouts, LAYOUTS, "layouts")
    sizes = _split(args.sizes, SIZES, "sizes")

    from mgm_fast.ops._verify import device_description

    def write_json(complete: bool) -> None:
        if args.json:  # rewritten after every op, so a run stopped by a time limit leaves its results
            report = {"device": device_description(device), "torch": torch.__version__, "complete": complete,
                      "seconds": time.perf_counter() - start, "counts": _counts(results),
                      "results": [r.to_dict() for r in results]}
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1, default=str)
            os.replace(tmp, args.json)

    start = time.perf_counter()
    results = []
    for size in sizes:  # every op's small cases first: they say the most per second
        for name in ops:
            op = REGISTRY[name]
            names = [b for b in op.backends if b != "reference" and (backends is None or b in backends)]
            results += run_op(op, device, names, dtypes, layouts, (size,))
            write_json(complete=False)
    elapsed = time.perf_counter() - start

    shown = [r for r in results if args.all_rows or r.verdict != "n/a"]
    header = ("op", "backend", "dtype", "layout", "case", "max error", "bound", "verdict", "ms")
    rows = [(r.op, r.backend, r.dtype, r.layout, r.case, f"{r.error:.2e}", f"{r.bound:.2e}",
             r.verdict if r.verdict == "pass" else f"{r.verdict}: {r.detail}", f"{r.seconds * 1e3:.1f}")
            for r in shown]  # fmt: skip
    widths = [max([len(h)] + [len(row[i]) for row in rows if i != 7]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i != 7 else c for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(f"mgm_fast self-test on {device} ({torch.__version__})")
    print(line(header))
    for row in rows:
        print(line(row))
    counts = _counts(results)
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['error']} errors, "
          f"{counts['n/a']} not applicable, in {elapsed:.1f} s")
    write_json(complete=True)
    return 1 if counts["fail"] or counts["error"] else 0


def _counts(results) -> dict[str, int]:
    return {v: sum(r.verdict == v for r in results) for v in ("pass", "fail", "error", "n/a")}


if __name__ == "__main__":
    raise SystemExit(main())
