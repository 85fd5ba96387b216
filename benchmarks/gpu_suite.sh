#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2317  # stage code is single-quoted on purpose; functions run via bash -c
# One command for the GPU evidence of mgm_fast, on a fresh machine with a CUDA torch and triton
# preinstalled and no network: check (and complete, from local wheels) the environment, build
# the CUDA extension, run the op selftest, check that Triton compiles, measure the card's dense
# bf16 matmul rate, run the gpu-marked tests and a priority list of benchmarks, and write the
# reports to OUT_DIR -- all within SUITE_BUDGET_S (560 s: one call of at most 600 s):
#
#   selftest.json      python -m mgm_fast.selftest --device cuda: every op x backend on the card
#   env.json           card, driver, CUDA, cuDNN, torch/triton versions, CPU, date, commit
#   info.txt           python -m mgm_fast.info (ops x backends as this machine sees them)
#   triton_check.json  a Triton kernel compiled for this card and checked
#   matmul_rate.json   dense bf16 matmul TFLOP/s (the MFU denominator)
#   tests-gpu.xml      junit XML of pytest -m gpu over tests/ (the CUDA-graph steps apart)
#   tests-cudagraphs.xml  junit XML of the CUDA-graph compiled steps (pytest -m cuda_graphs)
#   bench-ITEM.json    pytest-benchmark JSON of each bench item, written when the item ends
#                      (also when its time limit stops it); bench-ITEM.xml is its junit XML
#   README.md, *.png   python -m mgm_fast.bench report OUT_DIR --plots, from whatever JSON exists
#   stages.tsv         status and seconds of every stage and bench item, merged over calls
#   logs/CALL/         one folder per call: each stage's full output
#
# Usage:
#   benchmarks/gpu_suite.sh [--dry-run] [--wheels DIR] [--stage NAMES]... [--skip NAMES]... OUT_DIR
#
#   --dry-run      print the stages, the bench items and their commands; run and write nothing
#   --wheels DIR   install missing Python packages from the wheels in DIR (pip --no-index);
#                  `make gpu-wheels` builds that folder. Also taken from $MGM_FAST_WHEELS
#   --stage NAMES  run only these stages (comma-separated, repeatable). A later call into the
#                  same OUT_DIR finishes what an earlier one could not (results are kept and
#                  stages.tsv merged; bench items already done are not rerun):
#                    --stage bench,report                   (same machine, extension built)
#                    --stage preflight,build,bench,report   (a fresh machine)
#   --skip NAMES   leave these stages out (e.g. --skip build when the extension is built)
#
# Stages, in order: preflight build selftest env triton matmul tests cudagraphs bench report. Each runs
# even when an earlier one failed, within its own time limit; the report stage always keeps
# its reserve. Exit code: 0 every selected stage ran, 1 one failed or timed out, 2 usage
# error, 3 nothing failed but a stage or a core bench item was left for lack of time.
#
# Environment: PYTHON (default python3, else python), TORCH_CUDA_ARCH_LIST (default: the
# card's capability), CUDA_HOME (default /usr/local/cuda, else found from nvcc on PATH),
# MAX_JOBS (default: the core count), MATMUL_SIZE (8192), SUITE_BUDGET_S (560), BENCH_ITEMS
# (comma-separated bench items to run, rerunning ones already done), BENCH_MIN_ROUNDS (5) and
# BENCH_MAX_TIME (0.2 s): pytest-benchmark's rounds per benchmark.
set -u
set -f  # no pathname expansion of stage names, -k expressions or node ids ([reference]) here

usage() { sed -n '3,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }
usage_error() { echo "error: $*" >&2; exit 2; }
add_names() {  # add_names LIST "a,b" -> LIST with a and b appended (space-separated)
  local list=$1 name IFS=,
  for name in $2; do [ -z "$name" ] || list="$list$name "; done
  printf '%s' "$list"
}

DRY_RUN=0
WHEELS="${MGM_FAST_WHEELS:-}"
OUT=""
SKIP=" "
ONLY=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheels) [ $# -ge 2 ] || usage_error "--wheels needs a directory"; WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    --stage) [ $# -ge 2 ] || usage_error "--stage needs stage names"; ONLY=$(add_names "$ONLY" "$2"); shift ;;
    --stage=*) ONLY=$(add_names "$ONLY" "${1#--stage=}") ;;
    --skip) [ $# -ge 2 ] || usage_error "--skip needs stage names"; SKIP=$(add_names "$SKIP" "$2"); shift ;;
    --skip=*) SKIP=$(add_names "$SKIP" "${1#--skip=}") ;;
    -h|--help) usage; exit 0 ;;
    -*) usage_error "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || usage_error "one OUT_DIR only (got $OUT and $1)"; OUT="$1" ;;
  esac
  shift
done
if [ -z "$OUT" ]; then
  usage >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac

if [ -z "${PYTHON:-}" ]; then
  if command -v python3 >/dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel and treats "1", "true" and
# "on" as "interpret". tests/conftest.py and benchmarks/conftest.py only setdefault it to 1, so
# an explicit 0 keeps every kernel compiled for the GPU (the triton stage checks that it is).
export TRITON_INTERPRET=0
export PYTHON OUT WHEELS ROOT
export MATMUL_SIZE="${MATMUL_SIZE:-8192}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda
  elif nvcc_path=$(command -v nvcc 2>/dev/null) && [ "${nvcc_path%/bin/nvcc}" != "$nvcc_path" ]; then
    export CUDA_HOME="${nvcc_path%/bin/nvcc}"
  fi
fi
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ] && ! command -v nvcc >/dev/null 2>&1; then
  export PATH="$CUDA_HOME/bin:$PATH"
fi
if [ -z "${MAX_JOBS:-}" ]; then MAX_JOBS="$(nproc 2>/dev/null || echo 4)"; export MAX_JOBS; fi
BUDGET="${SUITE_BUDGET_S:-560}"
REPORT_RESERVE=30  # seconds kept for the report stage whatever the earlier stages take
export BENCH_MIN_ROUNDS="${BENCH_MIN_ROUNDS:-5}" BENCH_MAX_TIME="${BENCH_MAX_TIME:-0.2}"
export BENCH_ITEMS="${BENCH_ITEMS:-}"
case "$BUDGET" in ''|*[!0-9]*) usage_error "SUITE_BUDGET_S must be a number of seconds (got $BUDGET)" ;; esac

# ---- the bench priority list -----------------------------------------------------------------
# name | estimate (s) | core or extra | pytest paths / node ids / options | -m expression | -k expression
#
# Each item is its own pytest run, writing OUT_DIR/bench-<name>.json when it ends. An item runs
# only when its estimate fits in the bench stage's time left (else it is recorded as skipped and
# the next one is tried), and is stopped at twice its estimate (at least estimate + 30 s) or at
# the stage's end, whichever comes first; a stopped item still writes the JSON of the benchmarks
# that finished. Core items are the suite's purpose: one left out makes the exit code 3. The
# items are disjoint and together select every benchmark (tests/test_gpu_suite.py checks both).
#
# Estimates (H100, 16 cores; pytest + torch + CUDA start ~10 s per item; rounds: at least
# BENCH_MIN_ROUNDS and ~BENCH_MAX_TIME s per benchmark after 3 warm-up calls):
# * train-step 240: paper preset, batch 32. Per row: building the run (384 synthetic 128x128
#   images, nets, loader) ~4 s, 3 rounds x 4 steps ~4-8 s; the FLOP count (one extra reference
#   run, two steps) ~10 s once. Warm-up: reference one step ~5 s; fast, compiled with CUDA graph
#   replay (the engine's default on CUDA), three steps in which inductor compiles every
#   sub-step's graphs -- a guess of 2-3 minutes on 16 cores, not yet measured (its warmup_s is
#   in the report).
# * genblock-bf16 80: 18 rows (5 paper GenBlocks + the generator x reference/cuda/triton). Eager
#   and cuda rows ~1 s each; the triton rows compile and autotune: ~36 compiles (3 kernels x 4
#   tiles x ~3 specialisations) at ~1 s and ~30 keys x 4 tiles x ~0.13 s of timing.
# * losses 60: 40 rows (multitask loss, NT-Xent, instance noise; reference/triton/cuda, fp32 and
#   bf16), ~0.8 s each (inputs made on the CPU, a warm-up and a peak-memory call), plus ~10
#   Triton compiles.
# * genblock-fp32 80: as genblock-bf16 in fp32 (TF32 kernels).
# * gpu-other 30: gpu rows of other suites (today the DALI GPU rows: skipped without DALI).
# * train-step-ablations 200: the fast-<ingredient> rows and fast-eager, all eager, ~15 s each.
# * losses-compile 200: 12 torch.compile rows (inductor compiles fwd+bwd per dtype and shape).
# * cpu 150: the CPU rows of every suite on this machine's cores (no compile rows).
# * genblock-compile 450: 12 torch.compile rows of paper GenBlocks and of the paper generator.
# * cpu-compile 400: the CPU torch.compile rows.
TS=benchmarks/test_bench_train_step.py
LOSS_FILES="benchmarks/test_bench_multitask_loss.py benchmarks/test_bench_ntxent.py benchmarks/test_bench_gan_losses.py"
BENCH_TABLE=(
  "train-step|240|core|$TS::test_bench_mgm_step[reference] $TS::test_bench_mgm_step[fast]||"
  "genblock-bf16|80|core|benchmarks/test_bench_genblock.py|gpu|bfloat16 and not compile"
  "losses|60|core|$LOSS_FILES|gpu|not compile"
  "genblock-fp32|80|extra|benchmarks/test_bench_genblock.py|gpu|float32 and not compile"
  "gpu-other|30|extra|benchmarks|gpu|not (genblock or multitask_loss or ntxent or gan_losses)"
  "train-step-ablations|200|extra|$TS --deselect=$TS::test_bench_mgm_step[reference] --deselect=$TS::test_bench_mgm_step[fast]||"
  "losses-compile|200|extra|$LOSS_FILES|gpu|compile"
  "cpu|150|extra|benchmarks --ignore=$TS|not gpu|not compile"
  "genblock-compile|450|extra|benchmarks/test_bench_genblock.py|gpu|compile"
  "cpu-compile|400|extra|benchmarks --ignore=$TS|not gpu|compile"
)
BENCH_TABLE_STR=$(printf '%s\n' "${BENCH_TABLE[@]}")
export BENCH_TABLE_STR

bench_selection() {  # bench_selection LINE -> array SEL: the item's pytest selection arguments
  local name est kind targets mexpr kexpr
  IFS='|' read -r name est kind targets mexpr kexpr <<< "$1"
  read -r -a SEL <<< "$targets"
  [ -z "$mexpr" ] || SEL+=(-m "$mexpr")
  [ -z "$kexpr" ] || SEL+=(-k "$kexpr")
}

bench_command() {  # bench_command LINE -> array CMD: the item's whole pytest command
  local name
  name=${1%%|*}
  bench_selection "$1"
  # pytest-benchmark times with a timer that synchronises the CUDA device before reading the
  # clock, after warm-up calls (compilation, cuDNN autotuning, allocator growth)
  CMD=("$PYTHON" -m pytest -q -p no:cacheprovider -p mgm_fast.pytest_sigterm "${SEL[@]}" --benchmark-only
       "--benchmark-json=$OUT/bench-$name.json" "--junitxml=$OUT/bench-$name.xml"
       --benchmark-timer=mgm_fast.benchtools.synced_timer --benchmark-warmup=on --benchmark-warmup-iterations=3
       "--benchmark-min-rounds=$BENCH_MIN_ROUNDS" "--benchmark-max-time=$BENCH_MAX_TIME")
}

bench_item_done() {  # an earlier call into OUT_DIR ran this item to the end
  [ -f "$OUT/stages.tsv" ] && awk -F'\t' -v key="bench:$1" '$1 == key && $2 ~ /^ok/ { found = 1 }
    END { exit !found }' "$OUT/stages.tsv"
}

# The bench stage: the items in order, each within the time left (STAGE_DEADLINE, from the
# runner); rows for stages.tsv go to $CALL_DIR/bench-items.tsv.
run_bench_items() {
  local stop=0 failed=0 short=0 n=0 line name est kind left cap rc st t0 secs lines
  trap 'stop=1' TERM  # the stage's time limit: let the running pytest write its JSON, then stop
  local rows="$CALL_DIR/bench-items.tsv"
  : > "$rows"
  mapfile -t lines <<< "$BENCH_TABLE_STR"
  for line in "${lines[@]}"; do
    [ -n "$line" ] || continue
    IFS='|' read -r name est kind _ <<< "$line"
    n=$((n + 1))
    if [ -n "$BENCH_ITEMS" ]; then
      case ",$BENCH_ITEMS," in *",$name,"*) ;; *) continue ;; esac
    elif bench_item_done "$name"; then
      echo "== bench item $n $name: done in an earlier call (bench-$name.json); not rerun"
      continue
    fi
    if [ "$stop" = 1 ]; then
      printf 'bench:%s\t%s\t0.0\n' "$name" "not run: the stage was stopped" >> "$rows"
      [ "$kind" != core ] || short=1
      continue
    fi
    left=$(( STAGE_DEADLINE - $(date +%s) - 10 ))  # 10 s for pytest to write its reports
    if [ "$est" -gt "$left" ]; then
      [ "$left" -ge 0 ] || left=0
      st="skipped: no time (estimate $est s, $left s left)"
      echo "== bench item $n $name ($kind): $st"
      printf 'bench:%s\t%s\t0.0\n' "$name" "$st" >> "$rows"
      [ "$kind" != core ] || short=1
      continue
    fi
    cap=$(( 2 * est )); [ "$cap" -ge $(( est + 30 )) ] || cap=$(( est + 30 )); [ "$cap" -le "$left" ] || cap=$left
    bench_command "$line"
    echo "== bench item $n $name ($kind, estimate $est s, limit $cap s):$(printf ' %q' "${CMD[@]}")"
    t0=$(date +%s.%N)
    if command -v timeout >/dev/null 2>&1; then
      # --foreground: pytest stays in the stage's process group, so the stage's own limit
      # reaches it too; on this item's limit timeout sends it SIGTERM (-> reports written)
      timeout --foreground --kill-after=10 "$cap" "${CMD[@]}" </dev/null
      rc=$?
    else
      "${CMD[@]}" </dev/null
      rc=$?
    fi
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    case "$rc" in
      0) st=ok ;;
      5) st="ok (nothing selected here)" ;;
      124|137) st="timed out at $cap s (JSON of the finished benchmarks kept)"; [ "$kind" != core ] || short=1 ;;
      2) st="interrupted (JSON of the finished benchmarks kept)"; [ "$kind" != core ] || short=1 ;;
      *) st="failed (exit $rc)"; failed=1 ;;
    esac
    echo "== bench item $n $name: $st in $secs s"
    printf 'bench:%s\t%s\t%s\n' "$name" "$st" "$secs" >> "$rows"
  done
  if [ "$failed" = 1 ]; then return 1; fi
  if [ "$short" = 1 ]; then
    echo "core bench items were left out or cut short; finish them with --stage bench,report (see --help)"
    return 3
  fi
  return 0
}
export -f run_bench_items bench_command bench_selection bench_item_done

# ---- the stages: name, time limit (s), estimate (s), bash code ------------------------------
STAGES=()
LIMITS=()
ESTIMATES=()
CODES=()
add_stage() { STAGES+=("$1"); LIMITS+=("$2"); ESTIMATES+=("$3"); CODES+=("$4"); }

# pip puts the ninja program in the interpreter's scripts folder (or the user's, for a --user
# install), which need not be on PATH; torch.utils.cpp_extension runs `ninja` from PATH.
PY_SCRIPTS_ON_PATH='scripts=$("$PYTHON" -c "import os, site, sysconfig; print(sysconfig.get_path(\"scripts\") + os.pathsep + os.path.join(site.getuserbase(), \"bin\"))" 2>/dev/null) && PATH="$scripts:$PATH"
'

add_stage preflight 90 15 "$PY_SCRIPTS_ON_PATH"'
"$PYTHON" - <<"EOF" || exit 1
import sys
print("python", sys.version.split()[0], "at", sys.executable)
try:
    import torch
except Exception as err:
    sys.exit(f"error: torch does not import ({err}); the suite needs a CUDA build of torch preinstalled")
print("torch", torch.__version__, "| CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version())
if torch.version.cuda is None:
    sys.exit("error: this torch has no CUDA support (a CPU wheel); the suite needs a CUDA torch")
if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
    sys.exit("error: torch sees no CUDA device (driver? CUDA_VISIBLE_DEVICES?)")
for i in range(torch.cuda.device_count()):
    print(f"device {i}:", torch.cuda.get_device_name(i), "capability %d.%d" % torch.cuda.get_device_capability(i))
try:
    import triton
except Exception as err:
    sys.exit(f"error: triton does not import ({err}); the suite needs the triton that comes with torch")
print("triton", triton.__version__)
EOF
pip_ok=0
"$PYTHON" -m pip --version 2>/dev/null && pip_ok=1
if [ "$pip_ok" = 0 ] && [ -n "$WHEELS" ]; then
  pip_wheel=""
  for whl in "$WHEELS"/pip-*.whl; do [ -f "$whl" ] && pip_wheel=$whl; done
  if [ -n "$pip_wheel" ]; then
    echo "no pip for $PYTHON: installing it from $pip_wheel"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" "$pip_wheel/pip" install --no-index --find-links "$WHEELS" pip && pip_ok=1
  fi
fi
missing_packages() {
  "$PYTHON" - <<"EOF"
import importlib
needed = (("numpy", "numpy"), ("PIL", "pillow"), ("yaml", "PyYAML"), ("tqdm", "tqdm"), ("pytest", "pytest"),
          ("pytest_benchmark", "pytest-benchmark"), ("ninja", "ninja"), ("pybind11", "pybind11"),
          ("setuptools", "setuptools"))
missing = []
for module, package in needed:
    try:
        importlib.import_module(module)
    except Exception:
        missing.append(package)
print(" ".join(missing))
EOF
}
missing=$(missing_packages) || exit 1
if [ -n "$missing" ]; then
  echo "missing Python packages: $missing"
  if [ -z "$WHEELS" ]; then
    echo "error: cannot install $missing: no --wheels DIR given, and this machine has no network."
    echo "  On a machine with network: make gpu-wheels (writes gpu-wheels/, about 30 MiB); bring the"
    echo "  folder here and rerun with --wheels gpu-wheels (or MGM_FAST_WHEELS=gpu-wheels)."
    exit 1
  fi
  [ -d "$WHEELS" ] || { echo "error: --wheels $WHEELS is not a directory (missing: $missing)"; exit 1; }
  [ "$pip_ok" = 1 ] || { echo "error: $PYTHON has no pip and $WHEELS has no pip wheel (missing: $missing)"; exit 1; }
  read -r -a packages <<< "$missing"
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${packages[@]}" ||
    { echo "error: could not install $missing from $WHEELS (pip --no-index)"; exit 1; }
  missing=$(missing_packages) || exit 1
  [ -z "$missing" ] || { echo "error: still missing after installing from $WHEELS: $missing"; exit 1; }
fi
"$PYTHON" - <<"EOF" || exit 1
import importlib
for module in ("numpy", "PIL", "yaml", "tqdm", "pytest", "pytest_benchmark", "ninja", "pybind11", "setuptools"):
    print(module, getattr(importlib.import_module(module), "__version__", "?"))
EOF
ninja --version >/dev/null 2>&1 || { echo "error: no ninja program on PATH ($PATH), although the ninja package imports"; exit 1; }
echo "ninja program: $(command -v ninja) $(ninja --version)"
# pytest with this repository settings, pytest-benchmark and mgm_fast (its imports) all work:
"$PYTHON" -m pytest -q -p no:cacheprovider -p mgm_fast.pytest_sigterm --benchmark-only --collect-only \
  benchmarks/test_bench_train_step.py >/dev/null || { echo "error: pytest cannot collect the benchmarks (above)"; exit 1; }
if ! command -v nvcc >/dev/null 2>&1; then
  echo "error: no nvcc (CUDA_HOME=${CUDA_HOME:-unset}; PATH=$PATH): building the CUDA kernels needs the CUDA toolkit"
  exit 1
fi
nvcc_release=$(nvcc --version | sed -n "s/.*release \([0-9][0-9.]*\).*/\1/p" | head -n 1)
torch_cuda=$("$PYTHON" -c "import torch; print(torch.version.cuda)") || exit 1
echo "nvcc: $(command -v nvcc), CUDA $nvcc_release; torch built with CUDA $torch_cuda; CUDA_HOME=${CUDA_HOME:-unset}"
if [ "${nvcc_release%%.*}" != "${torch_cuda%%.*}" ]; then
  echo "error: nvcc is CUDA $nvcc_release but torch was built with CUDA $torch_cuda; torch.utils.cpp_extension refuses another major version (set CUDA_HOME)"
  exit 1
fi
command -v timeout >/dev/null || echo "warning: no timeout program: the stages run without time limits"
echo "TRITON_INTERPRET=$TRITON_INTERPRET MAX_JOBS=$MAX_JOBS nproc=$(nproc 2>/dev/null)"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,utilization.gpu,clocks.max.sm --format=csv
fi
true'

add_stage build 300 150 "$PY_SCRIPTS_ON_PATH"'
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability(0))") || exit 1
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CUDA_HOME=${CUDA_HOME:-unset} ninja=$(command -v ninja || echo none)"
if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -e . --no-build-isolation --no-deps --no-index || exit 1
else
  echo "no pip for $PYTHON: building the extension in place instead (setup.py build_ext --inplace)"
  "$PYTHON" setup.py build_ext --inplace || exit 1
fi
"$PYTHON" -c "
from mgm_fast import _native
reason = _native.cuda_reason()
print(\"mgm_fast._C build:\", _native.build_info())
raise SystemExit(f\"error: CUDA kernels unusable: {reason}\" if reason else 0)"'

# Correctness of every op x backend on the card (exit 0: all pass, 1: some fail, 2: usage).
# MGM_FAST_TRITON_AUTOTUNE=0: one tile per Triton kernel, no autotuning (see mgm_fast/ops/_triton/genblock.py)
add_stage selftest 90 40 'MGM_FAST_TRITON_AUTOTUNE=0 "$PYTHON" -m mgm_fast.selftest --device cuda --json "$OUT/selftest.json"'

add_stage env 45 10 '
"$PYTHON" -m mgm_fast.bench env --out "$OUT/env.json" || exit 1
"$PYTHON" -m mgm_fast.info > "$OUT/info.txt"; rc=$?; cat "$OUT/info.txt"; exit $rc'

add_stage triton 45 10 '"$PYTHON" -m mgm_fast.bench triton-check --require-compiled --out "$OUT/triton_check.json"'

add_stage matmul 45 10 '"$PYTHON" -m mgm_fast.bench matmul-rate --dtype bf16 --size "$MATMUL_SIZE" --out "$OUT/matmul_rate.json"'

# TF32 is off in every test (tests/conftest.py); tests that want it turn it on themselves.
add_stage tests 180 120 'MGM_FAST_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest tests -m "gpu and not cuda_graphs" -q \
  -p no:cacheprovider -p mgm_fast.pytest_sigterm --benchmark-disable --junitxml="$OUT/tests-gpu.xml"'

# The fast engine's default on CUDA: networks compiled with CUDA graph replay, stepped against
# eager (inductor compiles every sub-step's graphs first: minutes, hence a stage of its own).
add_stage cudagraphs 240 150 'MGM_FAST_TRITON_AUTOTUNE=0 "$PYTHON" -m pytest tests -m cuda_graphs -q \
  -p no:cacheprovider -p mgm_fast.pytest_sigterm --benchmark-disable --junitxml="$OUT/tests-cudagraphs.xml"'

# The bench priority list above, item by item (Triton autotuning on: the timed kernels are tuned).
add_stage bench "$BUDGET" 200 'export MGM_FAST_TRITON_AUTOTUNE=1
run_bench_items'

add_stage report 60 10 '"$PYTHON" -m mgm_fast.bench report "$OUT" --plots && cat "$OUT/README.md"'

for name in $SKIP $ONLY; do
  case " ${STAGES[*]} " in *" $name "*) ;; *) usage_error "no such stage: $name (stages: ${STAGES[*]})" ;; esac
done
IFS=, read -r -a wanted_items <<< "$BENCH_ITEMS"
for item in "${wanted_items[@]}"; do
  known=0
  for line in "${BENCH_TABLE[@]}"; do [ "${line%%|*}" != "$item" ] || known=1; done
  [ "$known" = 1 ] || usage_error "BENCH_ITEMS: no such bench item: $item (items: $(printf '%s ' "${BENCH_TABLE[@]%%|*}"))"
done
selected() {  # selected NAME: chosen by --stage (or no --stage given)
  [ "$ONLY" = " " ] && return 0
  case "$ONLY" in *" $1 "*) return 0 ;; esac
  return 1
}
ORDER=""
for name in "${STAGES[@]}"; do
  ORDER="$ORDER $name"
  if [ "$name" = bench ]; then
    for line in "${BENCH_TABLE[@]}"; do ORDER="$ORDER bench:${line%%|*}"; done
  fi
done

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing is executed; OUT_DIR would be $OUT"
  echo "environment: PYTHON=$PYTHON TRITON_INTERPRET=$TRITON_INTERPRET CUDA_HOME=${CUDA_HOME:-unset}" \
       "MAX_JOBS=$MAX_JOBS MATMUL_SIZE=$MATMUL_SIZE TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<from the card>}" \
       "WHEELS=${WHEELS:-none} SUITE_BUDGET_S=$BUDGET (report reserve $REPORT_RESERVE s)" \
       "BENCH_MIN_ROUNDS=$BENCH_MIN_ROUNDS BENCH_MAX_TIME=$BENCH_MAX_TIME BENCH_ITEMS=${BENCH_ITEMS:-all}"
  for i in "${!STAGES[@]}"; do
    name=${STAGES[$i]}
    echo
    if ! selected "$name"; then echo "== stage $((i + 1)) $name: not selected (--stage)"; continue; fi
    case "$SKIP" in *" $name "*) echo "== stage $((i + 1)) $name: skipped"; continue ;; esac
    echo "== stage $((i + 1)) $name (limit ${LIMITS[$i]} s, estimate ${ESTIMATES[$i]} s)"
    printf '%s\n' "${CODES[$i]}" | sed -e '/^$/d' -e 's/^/    /'
    if [ "$name" = bench ]; then
      n=0
      for line in "${BENCH_TABLE[@]}"; do
        n=$((n + 1))
        IFS='|' read -r item est kind _ <<< "$line"
        bench_command "$line"
        echo "    bench item $n $item ($kind, estimate $est s):$(printf ' %q' "${CMD[@]}")"
      done
    fi
  done
  echo
  echo "bench items, machine-readable (name, core|extra, estimate s, pytest selection):"
  for line in "${BENCH_TABLE[@]}"; do
    IFS='|' read -r item est kind _ <<< "$line"
    bench_selection "$line"
    printf 'bench-item\t%s\t%s\t%s\t%s\n' "$item" "$kind" "$est" "$(printf '%q ' "${SEL[@]}")"
  done
  exit 0
fi

# ---- run ---------------------------------------------------------------------------------------
CALL_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
export CALL_DIR="$OUT/logs/$CALL_ID"
mkdir -p "$CALL_DIR" || exit 2
CALL_ROWS="$CALL_DIR/stages.tsv"  # this call's rows; OUT_DIR/stages.tsv merges them with earlier calls'
: > "$CALL_ROWS"

merge_stages() {  # OUT_DIR/stages.tsv := earlier rows, replaced by this call's (a --skip never replaces)
  local old="$OUT/stages.tsv"
  [ -f "$old" ] || old=/dev/null
  awk -F'\t' -v OFS='\t' -v order="$ORDER" '
    function emit(key,   line, f) {
      if (key in done) return
      if (key in new) line = new[key]; else if (key in prev) line = prev[key]; else return
      done[key] = 1
      print line
      split(line, f, "\t")
      if (index(key, ":") == 0) total += f[3]
    }
    FILENAME == ARGV[1] {
      if (NF == 3 && $1 != "stage" && $1 != "total") { prev[$1] = $0; keys[++nk] = $1 }
      next
    }
    NF == 3 { if (!($2 == "skipped" && ($1 in prev))) new[$1] = $0; keys[++nk] = $1 }
    END {
      print "stage", "status", "seconds"
      n = split(order, names, " ")
      for (i = 1; i <= n; i++) emit(names[i])
      for (i = 1; i <= nk; i++) emit(keys[i])
      printf "total\t-\t%.1f\n", total
    }' "$old" "$CALL_ROWS" > "$OUT/.stages.tsv.tmp" && mv "$OUT/.stages.tsv.tmp" "$OUT/stages.tsv"
}

now() { date +%s.%N; }
STATUS=()
SECS=()
RAN=()
t_all=$(now)
deadline=$(( $(date +%s) + BUDGET ))
echo "mgm_fast GPU suite: OUT_DIR $OUT, call $CALL_ID, budget $BUDGET s (report reserve $REPORT_RESERVE s)"
for i in "${!STAGES[@]}"; do
  name=${STAGES[$i]}
  selected "$name" || continue
  RAN+=("$i")
  log="$CALL_DIR/$((i + 1))-$name.log"
  case "$SKIP" in *" $name "*)
    STATUS[i]="skipped"; SECS[i]="0.0"; echo "== $name: skipped"
    printf '%s\tskipped\t0.0\n' "$name" >> "$CALL_ROWS"; merge_stages; continue ;;
  esac
  left=$(( deadline - $(date +%s) ))
  [ "$name" = report ] || left=$(( left - REPORT_RESERVE ))
  limit=${LIMITS[$i]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    STATUS[i]="not run: no time left"; SECS[i]="0.0"
    echo "== $name: not run, the suite budget ($BUDGET s) is spent"
    printf '%s\t%s\t0.0\n' "$name" "${STATUS[i]}" >> "$CALL_ROWS"; merge_stages
    continue
  fi
  echo "== stage $((i + 1))/${#STAGES[@]} $name (limit ${limit} s, estimate ${ESTIMATES[$i]} s, log $log)"
  t0=$(now)
  # On its limit the stage gets SIGTERM (the whole process group): pytest writes its reports
  # (mgm_fast.pytest_sigterm), the stage's shell waits for it and stops; SIGKILL 15 s later.
  code="trap 'exit 143' TERM
${CODES[$i]}"
  if command -v timeout >/dev/null 2>&1; then
    STAGE_DEADLINE=$(( $(date +%s) + limit )) timeout --kill-after=15 "$limit" bash -c "$code" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    STAGE_DEADLINE=$(( $(date +%s) + limit )) bash -c "$code" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  case "$rc" in
    0) st=ok ;;
    124|137) st="timed out" ;;
    3) if [ "$name" = bench ]; then st="incomplete"; else st="failed (exit 3)"; fi ;;
    *) st="failed (exit $rc)" ;;
  esac
  STATUS[i]=$st
  SECS[i]=$secs
  printf '%s\t%s\t%s\n' "$name" "$st" "$secs" >> "$CALL_ROWS"
  if [ "$name" = bench ] && [ -f "$CALL_DIR/bench-items.tsv" ]; then cat "$CALL_DIR/bench-items.tsv" >> "$CALL_ROWS"; fi
  merge_stages
  echo "== $name: $st in $secs s"
done
total=$(awk -v a="$t_all" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')

failed=0
short=0
echo
echo "stage      status             seconds"
for i in "${RAN[@]}"; do
  printf '%-10s %-18s %7s\n' "${STAGES[$i]}" "${STATUS[i]}" "${SECS[i]}"
  case "${STATUS[i]}" in
    ok|skipped) ;;
    incomplete|"not run: no time left") short=1 ;;
    *) failed=1 ;;
  esac
done
printf '%-10s %-18s %7s\n' total "" "$total"
if [ -f "$CALL_DIR/bench-items.tsv" ] && [ -s "$CALL_DIR/bench-items.tsv" ]; then
  echo
  echo "bench items:"
  awk -F'\t' '{ printf "  %-28s %-60s %7s\n", substr($1, 7), $2, $3 }' "$CALL_DIR/bench-items.tsv"
fi
echo "reports in $OUT (stages.tsv merges every call; this call's logs: $CALL_DIR)"
if [ "$failed" = 1 ]; then exit 1; fi
if [ "$short" = 1 ]; then
  echo "not everything ran for lack of time: finish with $0 --stage bench,report $OUT"
  echo "(on a fresh machine: --stage preflight,build,bench,report, with --wheels)"
  exit 3
fi
exit 0
