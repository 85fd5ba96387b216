"""Ahead-of-time compilation of the project's Triton kernels for a GPU target, without a GPU.

Each Triton module lists the specialisations worth proving in ``aot_specs()``: tuples
``(label, kernel, types, constexprs)`` where ``types`` maps every runtime argument to its
Triton type (``"*fp32"``, ``"*bf16"``, ``"i32"``, ``"i64"``, ``"fp32"``...) and ``constexprs``
maps the compile-time arguments to their values. :func:`compile_module` lowers every entry to
PTX and a cubin (``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``).

The interpreter replaces ``@triton.jit`` kernels by Python functions, so this must run in a
process without ``TRITON_INTERPRET=1`` -- the tests start it as a subprocess::

    python -m mgm_fast.ops._triton.aot mgm_fast.ops._triton.ntxent [--arch 90]

prints one JSON object: label -> {"ptx": characters, "cubin": bytes, "seconds": ...}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time


def compile_module(module_name: str, arch: int = 90) -> dict[str, dict]:
    """Compiles every ``aot_specs()`` entry of ``module_name`` for sm_<arch>."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter replaces the kernels)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = importlib.import_module(module_name)
    target = GPUTarget("cuda", arch, 32)
    report = {}
    for label, kernel, types, constexprs in module.aot_specs():
        missing = [a for a in kernel.arg_names if a not in types and a not in constexprs]
        if missing:
            raise ValueError(f"{module_name}: AOT spec {label!r} gives no type for {missing}")
        signature = {a: ("constexpr" if a in constexprs else types[a]) for a in kernel.arg_names}
        start = time.perf_counter()
        compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs), target=target)
        report[label] = {
            "ptx": len(compiled.asm.get("ptx", "")),
            "cubin": len(compiled.asm.get("cubin", b"")),
            "seconds": round(time.perf_counter() - start, 3),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="+", help="modules defining aot_specs()")
    parser.add_argument("--arch", type=int, default=90, help="SM version, e.g. 80 or 90")
    args = parser.parse_args(argv)
    report = {}
    for name in args.modules:
        report.update({f"{name}:{label}": v for label, v in compile_module(name, args.arch).items()})
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
