#!/usr/bin/env bash
# The GPU checks, on a bare GPU machine, from the repository root, in at most 8 minutes:
#   1. shows the GPU and the python / torch / triton versions (no GPU: a one-line message, exit 2);
#   2. builds fastinfer with its CUDA extension (pip install -e . --no-build-isolation --no-deps;
#      skipped when an earlier run on this machine built the same sources) and checks that
#      fastinfer._C and fastinfer._C_cuda load;
#   3. runs every test marked gpu (pytest -m gpu) in tests/ops, tests/gpu and any other test
#      file holding "mark.gpu" (not tests/server or tests/bench: their imports need packages
#      the GPU machines lack), with a JUnit XML report;
#   4. runs benchmarks/gpu_bench.py with what is left of the time budget;
#   5. writes a summary.
# Everything goes to OUT (default bench_out/gpu): build.log, pytest-gpu.log, pytest-gpu.xml,
# gpu_bench.{json,md,log}, gpu-check-summary.md.
#
# Environment: PYTHON (python3), OUT, GPU_CHECK_BUDGET_S (480: the whole run), GPU_CHECK_TEST_S
# (at most this long for the tests, default 240), GPU_CHECK_WORKERS (pytest-xdist workers, 4), GPU_CHECK_BENCH_MIN_S (time kept for the
# benchmark when the tests would eat into it, default 150; with less budget than that the tests
# go first), GPU_TESTS (test paths, default as above),
# GPU_CHECK_SKIP_BUILD / GPU_CHECK_SKIP_TESTS / GPU_CHECK_SKIP_BENCH (=1), GPU_BENCH_ARGS
# (extra arguments of gpu_bench.py), PYTEST_ARGS (extra pytest arguments).
# Exit status: 0 all stages passed, 1 a stage failed, 2 no CUDA GPU here.
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
OUT="${OUT:-bench_out/gpu}"
BUDGET="${GPU_CHECK_BUDGET_S:-480}"
TEST_MAX="${GPU_CHECK_TEST_S:-240}"
BENCH_MIN="${GPU_CHECK_BENCH_MIN_S:-150}"
START=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(date +%s) + START )); }
log() { echo "[gpu-check $(elapsed)s] $*"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

echo "== gpu-check: GPU and versions"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi -L 2>&1 || true
else
  echo "nvidia-smi: not found"
fi
"$PY" - <<'EOF' 2>/dev/null || echo "python: $("$PY" --version 2>&1 || echo "$PY not found")"
import platform
print("python", platform.python_version())
try:
    import torch
    print("torch", torch.__version__, "| CUDA runtime", torch.version.cuda, "| cuda available:", torch.cuda.is_available())
except Exception as exc:
    print("torch: not importable:", type(exc).__name__, exc)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", type(exc).__name__)
EOF

# No GPU: say so in one line, no traceback.
if ! WHY=$("$PY" - 2>/dev/null <<'EOF'
import sys
try:
    import torch
except Exception as exc:
    print(f"torch is not importable: {type(exc).__name__}")
    sys.exit(1)
if not torch.cuda.is_available():
    print(f"torch {torch.__version__}: torch.cuda.is_available() is False")
    sys.exit(1)
print(f"{torch.cuda.get_device_name(0)}, compute capability {'.'.join(map(str, torch.cuda.get_device_capability(0)))}")
EOF
); then
  echo "gpu-check: no CUDA GPU here (${WHY:-$PY failed to run}); the GPU checks need one"
  exit 2
fi
log "GPU: $WHY"

mkdir -p "$OUT"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
SUMMARY="$OUT/gpu-check-summary.md"
STATUS=0
declare -a LINES=()
note() { LINES+=("$*"); log "$*"; }

# ---------------------------------------------------------------- 2. build
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then export CUDA_HOME=/usr/local/cuda; fi
if [ -n "${CUDA_HOME:-}" ] && [ -d "$CUDA_HOME/bin" ]; then export PATH="$PATH:$CUDA_HOME/bin"; fi
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0))')
  export TORCH_CUDA_ARCH_LIST
fi
stamp_now() { cat pyproject.toml setup.py $(find csrc -type f | sort) 2>/dev/null | sha256sum | cut -d' ' -f1; echo "$PY $TORCH_CUDA_ARCH_LIST"; }
STAMP_FILE=build/.gpu-check-stamp
imports_ok() { "$PY" -c 'import fastinfer._C, fastinfer._C_cpu, fastinfer._C_cuda' >/dev/null 2>&1; }

BUILD_T0=$(date +%s)
if [ "${GPU_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  note "build: skipped (GPU_CHECK_SKIP_BUILD=1)"
elif [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$(stamp_now)" ] && imports_ok; then
  note "build: up to date (same sources built earlier on this machine)"
else
  log "build: pip install -e . --no-build-isolation --no-deps (CUDA_HOME=${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS; log in $OUT/build.log)"
  BUILD_LIMIT=$(min 330 $(( $(left) - 120 )))
  if [ "$BUILD_LIMIT" -lt 90 ]; then BUILD_LIMIT=$(( $(left) - 10 )); fi  # a short budget: the build first
  if [ "$BUILD_LIMIT" -lt 10 ]; then BUILD_LIMIT=10; fi
  : > "$OUT/build.log"
  built=0
  if timeout "$BUILD_LIMIT" "$PY" -m pip install -e . --no-build-isolation --no-deps -q >>"$OUT/build.log" 2>&1 \
     && "$PY" -c 'import fastinfer._C' >/dev/null 2>&1; then
    built=1
  else
    # pip missing, or the modules not importable from the checkout: build in place (ninja)
    log "build: pip install did not give importable modules here; python setup.py build_ext --inplace"
    BUILD_LIMIT=$(( $(left) - 120 ))  # what the first attempt left of the budget
    if [ "$BUILD_LIMIT" -lt 10 ]; then BUILD_LIMIT=10; fi
    if timeout "$BUILD_LIMIT" "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1; then built=1; fi
  fi
  if [ "$built" = 1 ] && ! "$PY" -c 'import fastinfer._C_cuda' >/dev/null 2>&1 \
     && ! grep -q "_C_cuda" "$OUT/build.log"; then
    note "build: WARNING: the CUDA extension was not part of the build (nvcc or CUDA_HOME missing?)"
  fi
  if [ "$built" = 1 ]; then
    mkdir -p build && stamp_now > "$STAMP_FILE"
    note "build: ok in $(( $(date +%s) - BUILD_T0 ))s"
  else
    note "build: FAILED after $(( $(date +%s) - BUILD_T0 ))s (end of $OUT/build.log below)"
    tail -n 40 "$OUT/build.log" || true
    STATUS=1
  fi
fi

# the modules, and which backends each op has here
if "$PY" - >"$OUT/backends.txt" 2>&1 <<'EOF'
import importlib
for mod in ("fastinfer._C", "fastinfer._C_cpu", "fastinfer._C_cuda"):
    try:
        importlib.import_module(mod)
        print(f"{mod}: loads")
    except Exception as exc:
        print(f"{mod}: DOES NOT LOAD: {type(exc).__name__}: {exc}")
from fastinfer import ops
for op in ("paged_attention", "reshape_and_cache", "rms_norm", "add_rms_norm", "rotary_embedding", "silu_and_mul",
           "linear", "quantized_linear"):
    try:
        print(f"{op}: {', '.join(i.backend for i in ops.implementations(op))}")
    except Exception as exc:
        print(f"{op}: {type(exc).__name__}: {exc}")
EOF
then
  cat "$OUT/backends.txt"
  if grep -q "_C_cuda: loads" "$OUT/backends.txt"; then
    note "fastinfer._C_cuda: loads"
  else
    note "fastinfer._C_cuda: DOES NOT LOAD ($(grep '_C_cuda' "$OUT/backends.txt" | head -1))"
    STATUS=1
  fi
else
  cat "$OUT/backends.txt"
  note "import fastinfer: FAILED (see $OUT/backends.txt)"
  STATUS=1
fi

# tensor parallelism over NCCL needs 2 GPUs; its tests (tests/test_tp_engine.py, marked gpu) skip on one
NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [ "$NGPU" -ge 2 ]; then
  note "tensor parallelism over NCCL: $NGPU GPUs here, its tests run with the others"
else
  note "tensor parallelism over NCCL: skipped, this machine has $NGPU GPU and it needs 2"
fi

# ---------------------------------------------------------------- 3. tests
if [ "${GPU_CHECK_SKIP_TESTS:-0}" = 1 ]; then
  note "tests: skipped (GPU_CHECK_SKIP_TESTS=1)"
else
  if [ -n "${GPU_TESTS:-}" ]; then
    read -r -a TEST_PATHS <<< "$GPU_TESTS"
  else
    TEST_PATHS=(tests/gpu tests/ops)  # the engine on the GPU first: it matters most if time runs short
    while IFS= read -r f; do
      case "$f" in tests/ops/*|tests/gpu/*|tests/server/*|tests/bench/*) ;; *) TEST_PATHS+=("$f") ;; esac
    done < <(grep -rl --include='test_*.py' -e 'mark\.gpu' tests 2>/dev/null | sort)
  fi
  TEST_LIMIT=$(min "$TEST_MAX" $(( $(left) - BENCH_MIN )))
  if [ "$TEST_LIMIT" -lt 60 ]; then TEST_LIMIT=$(min "$TEST_MAX" $(( $(left) - 20 ))); fi  # the tests before the benchmark
fi
if [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ] && [ "$TEST_LIMIT" -lt 20 ]; then
  note "tests: skipped (only $(left)s of the ${BUDGET}s budget left)"
  STATUS=1
elif [ "${GPU_CHECK_SKIP_TESTS:-0}" != 1 ]; then
  PER_TEST=()
  if "$PY" -c 'import pytest_timeout' >/dev/null 2>&1; then PER_TEST=(--timeout=150); fi
  # Triton compiles each kernel variant on the host: spread the files over 4 workers (one GPU).
  if "$PY" -c 'import xdist' >/dev/null 2>&1; then PER_TEST+=(-n "${GPU_CHECK_WORKERS:-4}" --dist loadfile); fi
  log "tests: pytest -m gpu ${TEST_PATHS[*]} (at most ${TEST_LIMIT}s; log in $OUT/pytest-gpu.log)"
  TEST_T0=$(date +%s)
  set +e
  # shellcheck disable=SC2086
  timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider "${PER_TEST[@]}" \
    --junitxml="$OUT/pytest-gpu.xml" ${PYTEST_ARGS:-} "${TEST_PATHS[@]}" 2>&1 | tee "$OUT/pytest-gpu.log" | tail -n 60
  rc=${PIPESTATUS[0]}
  set -e
  counts=$("$PY" - "$OUT/pytest-gpu.xml" 2>/dev/null <<'EOF' || echo "no JUnit report"
import sys
import xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
t = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print(f"{t['tests']} tests: {t['tests'] - t['failures'] - t['errors'] - t['skipped']} passed, "
      f"{t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped")
EOF
)
  if [ "$rc" = 0 ]; then
    note "tests: passed in $(( $(date +%s) - TEST_T0 ))s ($counts)"
  elif [ "$rc" = 124 ]; then
    note "tests: TIMED OUT after ${TEST_LIMIT}s ($counts so far; see $OUT/pytest-gpu.log)"
    STATUS=1
  else
    note "tests: FAILED (pytest exit $rc) in $(( $(date +%s) - TEST_T0 ))s ($counts)"
    grep -E '^(FAILED|ERROR) ' "$OUT/pytest-gpu.log" | head -n 30 > "$OUT/pytest-gpu-failures.txt" || true
    mapfile -t FAILED_LINES < "$OUT/pytest-gpu-failures.txt"
    for l in "${FAILED_LINES[@]}"; do LINES+=("  ${l:0:300}"); done
    STATUS=1
  fi
fi

# ---------------------------------------------------------------- 4. benchmark
if [ "${GPU_CHECK_SKIP_BENCH:-0}" = 1 ]; then
  note "benchmark: skipped (GPU_CHECK_SKIP_BENCH=1)"
else
  HARD=$(( $(left) - 15 ))
  SOFT=$(( HARD - 45 ))
  if [ "$SOFT" -lt 30 ]; then
    note "benchmark: skipped (only $(left)s of the ${BUDGET}s budget left)"
  else
    log "benchmark: gpu_bench.py --budget-s $SOFT (hard limit ${HARD}s; log in $OUT/gpu_bench.log)"
    set +e
    # shellcheck disable=SC2086
    timeout "$HARD" "$PY" benchmarks/gpu_bench.py --out "$OUT" --budget-s "$SOFT" ${GPU_BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/gpu_bench.log" | grep -v -E 'Loading weights|Writing model shards'
    rc=${PIPESTATUS[0]}
    set -e
    if [ "$rc" = 0 ]; then
      nerr=$("$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); print(len(d["errors"]), len(d["skipped"]))' \
             "$OUT/gpu_bench.json" 2>/dev/null || echo "? ?")
      note "benchmark: done ($(echo "$nerr" | cut -d' ' -f1) section(s) failed, $(echo "$nerr" | cut -d' ' -f2) skipped; $OUT/gpu_bench.md)"
      [ "$(echo "$nerr" | cut -d' ' -f1)" = 0 ] || STATUS=1
    elif [ "$rc" = 124 ]; then
      note "benchmark: cut at the hard limit (${HARD}s); what it measured is in $OUT/gpu_bench.md"
      STATUS=1
    else
      note "benchmark: FAILED (exit $rc; see $OUT/gpu_bench.log)"
      STATUS=1
    fi
  fi
fi

# ---------------------------------------------------------------- 5. summary
{
  echo "# gpu-check summary"
  echo
  echo "- GPU: $WHY; $("$PY" -c 'import torch, triton, platform; print(f"python {platform.python_version()}, torch {torch.__version__}, triton {triton.__version__}")' 2>/dev/null || echo versions unknown)"
  echo "- total: $(elapsed)s of the ${BUDGET}s budget; result: $([ "$STATUS" = 0 ] && echo PASSED || echo FAILED)"
  for l in "${LINES[@]}"; do echo "- $l"; done
  echo
  if [ -f "$OUT/gpu_bench.md" ]; then echo "Benchmark: gpu_bench.md"; fi
} > "$SUMMARY"
echo
echo "== gpu-check summary ($SUMMARY)"
cat "$SUMMARY"
exit "$STATUS"
