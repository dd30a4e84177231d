#!/usr/bin/env bash
# One command for a GPU machine (no network needed): install, build the CUDA extension when
# csrc/bindings.cpp exists, run the test suite on the GPU, the latency table (make bench) and
# the micro-benchmarks, summarise — all within GPU_CHECK_BUDGET_S (default 570 s, for a
# 10-minute command limit). Every stage has a timeout; a failed or timed-out stage is
# recorded and the next one still runs. The short summary table is printed last.
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from the repo root
#   OUT=/tmp/gpucheck GPU_CHECK_QUICK=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh  # CPU smoke
#
# Environment:
#   OUT                  results folder (default benchmarks/results/<gpu-slug>-<date>); it gets at
#                        most 8 files: logs.txt (every stage's log), summary.md, micro.json,
#                        micro.md, micro.png (with matplotlib), latency-<device>-<date>.{json,md,png}
#   PYTHON               interpreter (default python3)
#   GPU_CHECK_QUICK=1    tiny configuration (CPU smoke test): a few tests, latency --quick,
#                        micro-benchmarks BENCH_SHAPES=quick without torch.compile
#   GPU_CHECK_BUDGET_S   total seconds for all stages (default 570)
#   GPU_CHECK_SKIP_INSTALL=1   use the package as it is (no pip install)
#   GPU_CHECK_STAGES     which of the long stages run (default tests,sanitizer,latency,micro);
#                        e.g. =tests,sanitizer in one 10-minute call and =latency,micro in the next
#                        give each half the whole budget (set-up stages always run)
#   GPU_CHECK_TESTS      pytest arguments for the test stage (default: tests -q --maxfail=25,
#                        spread over GPU_CHECK_TEST_WORKERS=8 processes when pytest-xdist is there)
#   GPU_CHECK_COMMIT     git commit to tag results with when the tree has no .git
#   BENCH_FULL=1         every shape of the issues in the micro-benchmarks (longer than 10 min)
set -u
set -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
QUICK=${GPU_CHECK_QUICK:-0}
BUDGET=${GPU_CHECK_BUDGET_S:-570}
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
STAGES="$WORK/stages.tsv"
: > "$STAGES"

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export LORA_KERNELS_POISON=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

STAGES_WANTED=",${GPU_CHECK_STAGES:-tests,sanitizer,latency,micro},"
has() { case $STAGES_WANTED in *",$1,"*) return 0 ;; esac; return 1; }
# wanted NAME: true when NAME is among GPU_CHECK_STAGES, else records it as skipped
wanted() {
  has "$1" && return 0
  printf '%s\tSKIPPED\t0\tnot in GPU_CHECK_STAGES\n' "$1" >> "$STAGES"
  return 1
}

elapsed() { echo $(( $(date +%s) - T0 )); }
say() { printf '[gpu_check %4ds] %s\n' "$(elapsed)" "$*"; }

SLUG=$("$PY" - <<'EOF' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device")
EOF
)
SLUG=${SLUG:-unknown}
OUT=${OUT:-benchmarks/results/$SLUG-$(date +%F)}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG="$OUT/logs.txt"
: > "$LOG"
COMMIT=${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
if [ "$COMMIT" != unknown ] && [ -z "${GPU_CHECK_COMMIT:-}" ] && [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  COMMIT="$COMMIT (dirty)"
fi
export LK_BENCH_COMMIT="$COMMIT"
say "repo $REPO, python $PY, device $SLUG, commit $COMMIT, quick=$QUICK, budget ${BUDGET}s, OUT=$OUT"

# stage NAME TIMEOUT RESERVE STREAM_REGEX CMD...
#   Runs CMD with a timeout of min(TIMEOUT, what is left of the budget minus RESERVE, the time
#   kept for the later stages). Its output goes to logs.txt; lines matching STREAM_REGEX (if
#   not empty) are also printed as they come. Records name, status, seconds and a note.
stage() {
  local name=$1 want=$2 reserve=$3 stream=$4
  shift 4
  local left=$(( BUDGET - $(elapsed) - reserve ))
  local t=$(( want < left ? want : left ))
  if [ "$t" -lt 5 ]; then
    say "stage $name: SKIPPED (no time left in the ${BUDGET}s budget)"
    printf '%s\tSKIPPED\t0\tno time left in the budget\n' "$name" >> "$STAGES"
    return 99
  fi
  say "stage $name: start (timeout ${t}s)"
  local tmp="$WORK/$name.log" start rc
  start=$(date +%s)
  if [ -n "$stream" ]; then
    timeout -k 10 "$t" "$@" 2>&1 | tee "$tmp" | grep --line-buffered -oE "$stream.*"
    rc=${PIPESTATUS[0]}
  else
    timeout -k 10 "$t" "$@" > "$tmp" 2>&1
    rc=$?
  fi
  local dur=$(( $(date +%s) - start )) status note
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status="FAIL(rc=$rc)" ;;
  esac
  # the note: pytest's last summary line, else the last non-empty line of the output
  note=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|skipped)|[0-9]+ (passed|failed)' "$tmp" | tail -n 1)
  [ -z "$note" ] && note=$(grep -v '^[[:space:]]*$' "$tmp" | tail -n 1)
  note=$(printf '%s' "$note" | sed -e 's/=//g' -e 's/^ *//' -e 's/ *$//' | tr '\t' ' ' | cut -c1-150)
  {
    echo "=================== stage $name: $status, ${dur}s (timeout ${t}s)"
    echo "\$ $*"
    if [ "$(wc -c < "$tmp")" -gt 2000000 ]; then
      head -n 300 "$tmp"; echo "... [truncated] ..."; tail -n 2000 "$tmp"
    else
      cat "$tmp"
    fi
    echo
  } >> "$LOG"
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$dur" "$note" >> "$STAGES"
  say "stage $name: $status in ${dur}s${note:+ — $note}"
  return $rc
}

# ---------------------------------------------------------------- 1. environment
stage env 60 0 '' bash -c "
  nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: not available'
  nvcc --version 2>/dev/null | tail -n 1 || true
  '$PY' - <<'EOF'
import importlib, platform, torch
for mod in ('triton', 'transformers', 'peft', 'pytest_benchmark', 'matplotlib', 'pybind11', 'ninja', 'setuptools', 'wheel'):
    try:
        print(mod, getattr(importlib.import_module(mod), '__version__', '?'))
    except Exception as err:
        print(mod, 'missing:', type(err).__name__)
print('python', platform.python_version(), '| torch', torch.__version__, '| CUDA', torch.version.cuda,
      '| GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
EOF"

# ---------------------------------------------------------------- 2. install, CUDA extension
# (later stages are guaranteed at least: tests 60 s, latency 40 s, micro 90 s, summarize 20 s;
# the sanitizer stage gets what the budget leaves)
# The package first (pure Python, seconds); PYTHONPATH covers a failed install. Then the
# extension, built in place (lora_kernels/_C*.so), which the editable install and PYTHONPATH see.
if [ "${GPU_CHECK_SKIP_INSTALL:-0}" = 1 ]; then
  printf 'install\tSKIPPED\t0\tGPU_CHECK_SKIP_INSTALL=1\n' >> "$STAGES"
else
  LORA_KERNELS_BUILD_CUDA=0 stage install 120 210 '' \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e .
fi
if [ ! -f csrc/bindings.cpp ]; then
  printf 'cuda-ext\tSKIPPED\t0\tno csrc/bindings.cpp yet\n' >> "$STAGES"
elif ! "$PY" -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null; then
  printf 'cuda-ext\tSKIPPED\t0\tthis torch is not a CUDA build\n' >> "$STAGES"
else
  # CUTLASS's headers: the nvidia-cutlass wheel, else the .cutlass/include that `make cutlass-headers`
  # made on a machine with network and that travelled with the working tree (README: CUDA backend).
  # setup.py builds a visible capability-9.0 GPU as 9.0a (the wgmma/TMA LoRA forward) by itself.
  say "CUTLASS headers: $("$PY" benchmarks/cuda_ptx_check.py --cutlass-include 2>&1)"
  LORA_KERNELS_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} stage cuda-ext 300 210 '' \
    "$PY" setup.py build_ext --inplace
fi

stage backends 60 210 '^(backend|lora_kernels)' "$PY" - <<'EOF'
import torch
import lora_kernels as lk
from lora_kernels import backend
print("lora_kernels", lk.__version__, "from", lk.__file__)
for name in ("triton", "cuda", "torch"):
    print(f"backend {name}: {backend.why_unavailable(name) or 'available'}")
EOF

# ---------------------------------------------------------------- 3. tests on the GPU
if [ -n "${GPU_CHECK_TESTS:-}" ]; then
  read -r -a TEST_ARGS <<< "$GPU_CHECK_TESTS"
elif [ "$QUICK" = 1 ]; then
  TEST_ARGS=(tests/test_layer_norm_op.py -q -x -k "not slow")
else
  # A first run on new hardware should report many failures, not stop at the first one.
  TEST_ARGS=(tests -q --maxfail=25)
  # Most of the stage is Triton compiling kernels on one core: spread it over processes.
  if "$PY" -c "import xdist" 2>/dev/null; then
    TEST_ARGS+=(-n "${GPU_CHECK_TEST_WORKERS:-8}")
  fi
fi
# Tests need no tuning: one Triton config per key (LORA_KERNELS_AUTOTUNE=0) saves minutes of compiles.
# Without the benchmark stages after it, the tests may use what they would have kept.
if has latency || has micro; then tests_t=220 tests_keep=150; else tests_t=440 tests_keep=110; fi
if wanted tests; then
  LORA_KERNELS_AUTOTUNE=0 stage tests "$tests_t" "$tests_keep" '' "$PY" -m pytest "${TEST_ARGS[@]}" -p no:cacheprovider --durations=15
fi

# The CUDA kernels once more under compute-sanitizer's memcheck (the cross-checks against
# Triton exercise every op); skipped in quick runs and without the extension.
if ! wanted sanitizer; then
  :
elif [ "$QUICK" != 1 ] && command -v compute-sanitizer >/dev/null && "$PY" -c "import lora_kernels._C" 2>/dev/null; then
  LORA_KERNELS_AUTOTUNE=0 stage sanitizer 100 150 '' compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PY" -m pytest tests/test_cuda_backend.py tests/test_cuda_paths.py -q -x -p no:cacheprovider
else
  printf 'sanitizer\tSKIPPED\t0\tquick run, no compute-sanitizer or no lora_kernels._C\n' >> "$STAGES"
fi

# ---------------------------------------------------------------- 4. latency table (make bench)
if [ "$QUICK" = 1 ]; then
  LAT_ARGS=(--quick)
else
  LAT_ARGS=(--time-budget 60)   # GPU defaults otherwise: GPT-2 medium, fp16, 32x512,16x256,1x128
fi
if wanted latency; then
  stage latency 150 110 '' "$PY" benchmarks/latency_table.py "${LAT_ARGS[@]}" --out-dir "$OUT"
fi

# ---------------------------------------------------------------- 5. micro-benchmarks
micro_t=$(( BUDGET - $(elapsed) - 20 ))   # the last long stage: whatever the budget has left
margin=$(( micro_t / 6 > 45 ? 45 : micro_t / 6 ))
if [ "$QUICK" = 1 ]; then
  export BENCH_SHAPES=${BENCH_SHAPES:-quick} BENCH_COMPILE=${BENCH_COMPILE:-0}
fi
if wanted micro; then
  BENCH_BUDGET_S=$(( micro_t - margin > 1 ? micro_t - margin : 1 )) stage micro "$micro_t" 20 '\[ *[0-9.]+s\] ' \
    "$PY" -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$OUT/micro.json" \
    --benchmark-columns=median,iqr,rounds --benchmark-sort=name
fi

# ---------------------------------------------------------------- 6. summary
if [ -s "$OUT/micro.json" ]; then
  stage summarize 60 0 '' "$PY" benchmarks/summarize.py "$OUT/micro.json" --out "$OUT" --stem micro --short
else
  printf 'summarize\tSKIPPED\t0\tno micro.json\n' >> "$STAGES"
fi

# at most 8 files in $OUT: pack any extras (none expected) into extras.tar.gz
n=$(find "$OUT" -maxdepth 1 -type f | wc -l)
if [ "$n" -gt 7 ]; then
  keep='^(logs\.txt|summary\.md|micro\.json|micro\.md|micro\.png|latency-.*\.(json|md|png))$'
  extras=$(cd "$OUT" && find . -maxdepth 1 -type f -printf '%f\n' | grep -vE "$keep")
  if [ -n "$extras" ]; then
    (cd "$OUT" && tar czf extras.tar.gz $extras && rm -f $extras)
  fi
fi

{
  echo "# gpu_check — $SLUG, $(date +%F), commit $COMMIT"
  echo
  echo "| stage | status | seconds | note |"
  echo "|---|---|---:|---|"
  while IFS=$'\t' read -r name status secs note; do
    echo "| $name | $status | $secs | ${note//|//} |"
  done < "$STAGES"
  echo
  echo "total $(elapsed)s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
} > "$OUT/summary.md"
if [ -s "$OUT/micro.md" ]; then
  { echo; sed -n '/^## digest/,$p' "$OUT/micro.md"; } >> "$OUT/summary.md"
fi

echo
if [ -s "$OUT/micro.md" ]; then
  echo "micro-benchmarks, our fastest kernel per row (full table: $OUT/micro.md):"
  sed -n '/^## digest/,$p' "$OUT/micro.md" | tail -n +3
  echo
fi
echo "gpu_check summary ($SLUG, commit $COMMIT, $(elapsed)s, results in $OUT):"
printf '%-18s %-12s %7s  %s\n' stage status seconds note
while IFS=$'\t' read -r name status secs note; do
  printf '%-18s %-12s %7s  %s\n' "$name" "$status" "$secs" "$note"
done < "$STAGES"
# exit status: 0 when every stage that ran passed
failed=$(grep -cE $'\t(FAIL|TIMEOUT)' "$STAGES")
rm -rf "$WORK"
[ "$failed" = 0 ]
