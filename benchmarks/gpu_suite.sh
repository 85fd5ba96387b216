#!/usr/bin/env bash
# One command for the GPU evidence of mgm_fast, on a fresh machine with torch preinstalled and no
# network: build the CUDA extension, check Triton compiles, measure the card's dense bf16 matmul
# rate, run the gpu-marked tests and every benchmark suite, and write the reports to OUT_DIR:
#
#   env.json           card, driver, CUDA, cuDNN, torch/triton versions, CPU, date, commit
#   info.txt           python -m mgm_fast.info (ops x backends as this machine sees them)
#   triton_check.json  a Triton kernel compiled for this card and checked
#   matmul_rate.json   dense bf16 matmul TFLOP/s (the MFU denominator)
#   tests-gpu.xml      junit XML of pytest -m gpu tests
#   benchmarks.json    pytest-benchmark JSON of benchmarks/ (+ benchmarks.xml, junit)
#   README.md, *.png   python -m mgm_fast.bench report OUT_DIR --plots
#   stages.tsv, logs/  every stage's status, seconds and full output
#
# Every stage runs even when an earlier one failed (its report is still written); the exit
# code is 1 when any stage failed. Usage:
#
#   benchmarks/gpu_suite.sh [--dry-run] [--wheels DIR] [--skip STAGE]... OUT_DIR
#
#   --dry-run     print the stages and their commands; run and write nothing
#   --wheels DIR  install missing pytest / pytest-benchmark (and ninja) from wheels in DIR
#                 (pip --no-index); also taken from $MGM_FAST_WHEELS
#   --skip STAGE  leave a stage out (e.g. --skip build when the extension is already built)
#
# Environment: PYTHON (default python, else python3), TORCH_CUDA_ARCH_LIST (default: the
# present card's capability), CUDA_HOME (default /usr/local/cuda when it exists), MATMUL_SIZE
# (default 8192), SUITE_BUDGET_S (default 570: stage limits shrink so that the whole run,
# report included, ends within this many seconds).
set -u

usage() { sed -n '2,/^set -u$/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

DRY_RUN=0
WHEELS="${MGM_FAST_WHEELS:-}"
OUT=""
SKIP=" "
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --wheels) [ $# -ge 2 ] || { echo "error: --wheels needs a directory" >&2; exit 2; }; WHEELS="$2"; shift ;;
    --wheels=*) WHEELS="${1#--wheels=}" ;;
    --skip) [ $# -ge 2 ] || { echo "error: --skip needs a stage name" >&2; exit 2; }; SKIP="$SKIP$2 "; shift ;;
    --skip=*) SKIP="$SKIP${1#--skip=} " ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) [ -z "$OUT" ] || { echo "error: one OUT_DIR only (got $OUT and $1)" >&2; exit 2; }; OUT="$1" ;;
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
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel and treats "1", "true" and
# "on" as "interpret". tests/conftest.py and benchmarks/conftest.py only setdefault it to 1, so
# an explicit 0 keeps every kernel compiled for the GPU (the triton stage checks that it is).
export TRITON_INTERPRET=0
export PYTHON OUT WHEELS
export MATMUL_SIZE="${MATMUL_SIZE:-8192}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -z "${MAX_JOBS:-}" ]; then MAX_JOBS="$(nproc 2>/dev/null || echo 4)"; export MAX_JOBS; fi
BUDGET="${SUITE_BUDGET_S:-570}"
REPORT_RESERVE=45  # seconds kept for the report stage whatever the earlier stages take

# ---- the stages: name, time limit in seconds, bash code ------------------------------------
STAGES=()
LIMITS=()
CODES=()
add_stage() { STAGES+=("$1"); LIMITS+=("$2"); CODES+=("$3"); }

add_stage preflight 120 '
"$PYTHON" - <<"EOF" || exit 1
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
if torch.version.cuda is None:
    sys.exit("error: this torch has no CUDA support (a CPU wheel); the suite needs a CUDA torch")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no CUDA device")
print("device:", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
EOF
missing=$("$PYTHON" -c "
import importlib.util as u
print(\" \".join(p for p, m in ((\"pytest\", \"pytest\"), (\"pytest-benchmark\", \"pytest_benchmark\"),
                                (\"ninja\", \"ninja\")) if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
  echo "missing python packages: $missing"
  if [ -n "$WHEELS" ]; then
    "$PYTHON" -m pip install --no-index --find-links "$WHEELS" $missing || \
      { echo "error: could not install $missing from $WHEELS (pip --no-index)"; exit 1; }
  else
    case " $missing " in *" pytest "*|*" pytest-benchmark "*)
      echo "error: pytest and pytest-benchmark are needed and this machine has no network."
      echo "  On a machine with network: pip download pytest pytest-benchmark ninja -d WHEELS_DIR"
      echo "  then rerun with --wheels WHEELS_DIR (or MGM_FAST_WHEELS=WHEELS_DIR)."
      exit 1 ;;
    esac
    echo "note: no ninja module; the extension build falls back to a slower serial build"
  fi
fi
"$PYTHON" -c "import pytest, pytest_benchmark; print(\"pytest\", pytest.__version__, \"| pytest-benchmark\", pytest_benchmark.__version__)"
echo "TRITON_INTERPRET=$TRITON_INTERPRET CUDA_HOME=${CUDA_HOME:-unset} MAX_JOBS=$MAX_JOBS"
command -v nvcc >/dev/null && nvcc --version | tail -n 2
command -v nvidia-smi >/dev/null && nvidia-smi
true'

add_stage build 420 '
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PYTHON" -c "import torch; print(\"%d.%d\" % torch.cuda.get_device_capability(0))") || exit 1
  export TORCH_CUDA_ARCH_LIST
fi
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
"$PYTHON" -m pip install -e . --no-build-isolation --no-deps || exit 1
"$PYTHON" -c "
from mgm_fast import _native
reason = _native.cuda_reason()
print(\"mgm_fast._C build:\", _native.build_info())
raise SystemExit(f\"error: CUDA kernels unusable: {reason}\" if reason else 0)"'

add_stage env 120 '
"$PYTHON" -m mgm_fast.bench env --out "$OUT/env.json" || exit 1
"$PYTHON" -m mgm_fast.info > "$OUT/info.txt"; rc=$?; cat "$OUT/info.txt"; exit $rc'

add_stage triton 180 '"$PYTHON" -m mgm_fast.bench triton-check --require-compiled --out "$OUT/triton_check.json"'

add_stage matmul 180 '"$PYTHON" -m mgm_fast.bench matmul-rate --dtype bf16 --size "$MATMUL_SIZE" --out "$OUT/matmul_rate.json"'

add_stage tests 420 '"$PYTHON" -m pytest tests -m gpu -q -p no:cacheprovider --benchmark-disable --junitxml="$OUT/tests-gpu.xml"'

# pytest-benchmark times with a timer that synchronises the CUDA device before reading the
# clock, and runs warm-up rounds first (compilation, cuDNN autotuning, allocator growth).
add_stage bench 480 '"$PYTHON" -m pytest benchmarks -q -p no:cacheprovider --benchmark-only \
  --benchmark-json="$OUT/benchmarks.json" --benchmark-timer=mgm_fast.benchtools.synced_timer \
  --benchmark-warmup=on --benchmark-warmup-iterations=3 --junitxml="$OUT/benchmarks.xml"'

add_stage report 120 '"$PYTHON" -m mgm_fast.bench report "$OUT" --plots && cat "$OUT/README.md"'

for name in $SKIP; do
  case " ${STAGES[*]} " in *" $name "*) ;; *) echo "error: --skip $name: no such stage (${STAGES[*]})" >&2; exit 2 ;; esac
done

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: nothing is executed; OUT_DIR would be $OUT"
  echo "environment: PYTHON=$PYTHON TRITON_INTERPRET=$TRITON_INTERPRET CUDA_HOME=${CUDA_HOME:-unset}" \
       "MAX_JOBS=$MAX_JOBS MATMUL_SIZE=$MATMUL_SIZE TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<from the card>}" \
       "WHEELS=${WHEELS:-none} SUITE_BUDGET_S=$BUDGET"
  for i in "${!STAGES[@]}"; do
    case "$SKIP" in *" ${STAGES[$i]} "*) echo; echo "== stage $((i + 1)) ${STAGES[$i]}: skipped"; continue ;; esac
    echo
    echo "== stage $((i + 1)) ${STAGES[$i]} (limit ${LIMITS[$i]} s)"
    printf '%s\n' "${CODES[$i]}" | sed -e '/^$/d' -e 's/^/    /'
  done
  exit 0
fi

mkdir -p "$OUT/logs" || exit 2
now() { date +%s.%N; }
STATUS=()
SECS=()
t_all=$(now)
deadline=$(( $(date +%s) + BUDGET ))
for i in "${!STAGES[@]}"; do
  name=${STAGES[$i]}
  log="$OUT/logs/$((i + 1))-$name.log"
  case "$SKIP" in *" $name "*) STATUS+=("skipped"); SECS+=("0.0"); echo "== $name: skipped"; continue ;; esac
  left=$(( deadline - $(date +%s) ))
  [ "$name" = report ] || left=$(( left - REPORT_RESERVE ))
  limit=${LIMITS[$i]}
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    STATUS+=("no time left"); SECS+=("0.0"); echo "== $name: not run, the suite budget ($BUDGET s) is spent"
    continue
  fi
  echo "== stage $((i + 1))/${#STAGES[@]} $name (limit ${limit} s, log $log)"
  t0=$(now)
  if command -v timeout >/dev/null 2>&1; then
    timeout --kill-after=10 "$limit" bash -c "${CODES[$i]}" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    bash -c "${CODES[$i]}" </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  secs=$(awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
  if [ "$rc" = 0 ]; then st=ok; elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then st="timed out"; else st="failed (exit $rc)"; fi
  STATUS+=("$st")
  SECS+=("$secs")
  echo "== $name: $st in $secs s"
done
total=$(awk -v a="$t_all" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')

failed=0
{
  printf 'stage\tstatus\tseconds\n'
  for i in "${!STAGES[@]}"; do printf '%s\t%s\t%s\n' "${STAGES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"; done
  printf 'total\t-\t%s\n' "$total"
} > "$OUT/stages.tsv"
echo
echo "stage      status             seconds"
for i in "${!STAGES[@]}"; do
  printf '%-10s %-18s %7s\n' "${STAGES[$i]}" "${STATUS[$i]}" "${SECS[$i]}"
  case "${STATUS[$i]}" in ok|skipped) ;; *) failed=1 ;; esac
done
printf '%-10s %-18s %7s\n' total "" "$total"
echo "reports in $OUT"
exit $failed
