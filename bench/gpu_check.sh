#!/usr/bin/env bash
# `make gpu-check`: the device check, one command that ends within 9 minutes on a GPU machine
# (H100/H200, 16 cores, torch 2.11 + CUDA 13.0, triton 3.6, nvcc 13.0, pytest, pytest-xdist,
# pytest-benchmark, pybind11, ninja, no network).
#
#   bash bench/gpu_check.sh                    # every step, budgets summing to <= 540 s
#   bash bench/gpu_check.sh --out DIR          # results folder (else $FASTATTN_GPU_RESULTS, else
#                                              #   bench/results/gpu-<gpu name>/)
#   bash bench/gpu_check.sh --full             # longer budgets, whole L sweep, the pytest-benchmark suites
#   bash bench/gpu_check.sh --plan             # print the steps and their budgets, run nothing
#   bash bench/gpu_check.sh build conformance  # only some steps (names as in --plan)
#
# Steps (each with a budget in seconds; the time left is printed before each, and no step runs past
# the overall deadline): preflight (GPU, versions), build (CUDA extension, MAX_JOBS = cores, CUDA
# headers/libraries from the toolkit or the nvidia wheels), conformance (the attention and
# feed-forward conformance matrix for the cuda and triton backends, pytest-xdist), tc-crosscheck
# (fp16/bf16 tensor-core CUDA kernels against the fp32 CUDA kernel), gpu-tests (every other test
# marked gpu), sanitize (compute-sanitizer memcheck on one small cuda and one small Triton case),
# speed (TFLOP/s table against SDPA's flash and cuDNN backends), report.
#
# Everything is written into the results folder as it happens: status.md (one row per finished
# step, rewritten after each), one log per step (pytest's output also streams to stdout), the
# speed table (speed.md, one row at a time) and report.md (status + summaries). A run cut off by a
# time limit therefore leaves every step it finished. Exit status: 0 all steps ok, 1 some step
# FAILED, 3 no CUDA device (nothing checked; recorded in status.md), 2 bad arguments.
#
# Environment: PYTHON (python3), GPU_ARCH (else the GPU's compute capability), MAX_JOBS (cores),
# FASTATTN_GPU_RESULTS (results folder), FASTATTN_GPU_CHECK_BUDGET (total seconds, default 540),
# FASTATTN_GPU_CHECK_ASSUME_GPU=1 (only for testing this script without a GPU).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
# `make gpu-check` here: the checkout's venv when the system python has no torch
if [ -z "${PYTHON:-}" ] && ! $PY -c "import torch" 2>/dev/null && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
unset TRITON_INTERPRET          # real Triton kernels on the GPU, never the interpreter
export PYTHONDONTWRITEBYTECODE=1
export FASTATTN_TEST_NO_INTERPRET=1

ALL_STEPS="preflight build conformance tc-crosscheck gpu-tests sanitize speed report"
FULL=0 PLAN=0 RES=${FASTATTN_GPU_RESULTS:-} STEPS=""
while [ $# -gt 0 ]; do
  case $1 in
    --full) FULL=1 ;;
    --plan) PLAN=1 ;;
    --out) shift; RES=${1:-}; [ -n "$RES" ] || { echo "gpu_check.sh: argument '--out' got nothing; expected a folder" >&2; exit 2; } ;;
    --out=*) RES=${1#--out=} ;;
    -h|--help) sed -n '2,28p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: argument '$1' is unknown; expected --full, --plan, --out DIR or steps: $ALL_STEPS" >&2; exit 2 ;;
    *) case " $ALL_STEPS bench-suites " in *" $1 "*) STEPS="$STEPS $1" ;;
         *) echo "gpu_check.sh: step '$1' is unknown; expected some of: $ALL_STEPS bench-suites" >&2; exit 2 ;; esac ;;
  esac
  shift
done

# Budgets in seconds. The quick run sums to <= 540 (9 minutes); --full keeps a longer run.
budget() {
  if [ $FULL = 1 ]; then
    case $1 in preflight) echo 20;; build) echo 900;; conformance) echo 900;; tc-crosscheck) echo 300;;
      gpu-tests) echo 300;; sanitize) echo 300;; speed) echo 600;; bench-suites) echo 900;; report) echo 30;; esac
  else
    case $1 in preflight) echo 15;; build) echo 190;; conformance) echo 110;; tc-crosscheck) echo 40;;
      gpu-tests) echo 45;; sanitize) echo 70;; speed) echo 60;; bench-suites) echo 0;; report) echo 10;; esac
  fi
}
if [ -z "$STEPS" ]; then
  STEPS=$ALL_STEPS
  [ $FULL = 1 ] && STEPS="preflight build conformance tc-crosscheck gpu-tests sanitize speed bench-suites report"
fi
STEPS=$(echo $STEPS)
TOTAL_BUDGET=0
for s in $STEPS; do TOTAL_BUDGET=$(( TOTAL_BUDGET + $(budget "$s") )); done
if [ $FULL = 0 ] && [ -n "${FASTATTN_GPU_CHECK_BUDGET:-}" ]; then TOTAL_BUDGET=$FASTATTN_GPU_CHECK_BUDGET; fi

if [ $PLAN = 1 ]; then
  echo "step budget_s ($([ $FULL = 1 ] && echo full || echo quick))"
  for s in $STEPS; do echo "$s $(budget "$s")"; done
  echo "total $TOTAL_BUDGET"
  exit 0
fi

START_ALL=$(date +%s)
DEADLINE=$(( START_ALL + TOTAL_BUDGET ))
left() { echo $(( DEADLINE - $(date +%s) )); }
RESERVE=0  # seconds kept back for the report at the end (set once the steps are known)

# ---- the results folder --------------------------------------------------------------------------
HAVE_GPU=0
GPU_NAME=$(timeout 60 $PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>/dev/null | tail -1)
[ -n "$GPU_NAME" ] && HAVE_GPU=1
# Testing the script's own mechanics on a machine without a GPU (tests/test_gpu_check_script.py):
# run the named steps as if there were one; their GPU tests skip and their tools are missing.
if [ "${FASTATTN_GPU_CHECK_ASSUME_GPU:-0}" = 1 ] && [ $HAVE_GPU = 0 ]; then HAVE_GPU=1; GPU_NAME="assumed gpu"; fi
SLUG=$(echo "${GPU_NAME:-no gpu}" | tr 'A-Z' 'a-z' | sed 's/[^a-z0-9][^a-z0-9]*/-/g; s/^-//; s/-$//')
RES=${RES:-bench/results/gpu-$SLUG}
mkdir -p "$RES" || { echo "gpu_check.sh: cannot create the results folder '$RES'" >&2; exit 2; }
RES=$(cd "$RES" && pwd)
STATUS="$RES/status.md"
FAILED=0
{
  echo "## fastattn gpu-check"
  echo
  echo "\`bash bench/gpu_check.sh $([ $FULL = 1 ] && echo --full)\` on $(hostname), GPU: ${GPU_NAME:-none}, started $(date -u '+%Y-%m-%d %H:%M:%S UTC'); budget $TOTAL_BUDGET s; steps: $STEPS."
  echo
  echo "| step | result | time | budget | detail |"
  echo "|---|---|---:|---:|---|"
} > "$STATUS"

record() {  # step result seconds budget detail
  local detail=${5//|//}
  echo "| $1 | $2 | $3 s | $4 s | ${detail//\`/\'} |" >> "$STATUS"
  echo "gpu_check: $1: $2 ($3 s of $4 s) $5"
  [ "$2" = FAILED ] && FAILED=1
  return 0
}

finish() {
  local overall=ok
  [ $FAILED = 1 ] && overall=FAILED
  [ $HAVE_GPU = 0 ] && overall="no CUDA device"
  echo "| total | $overall | $(( $(date +%s) - START_ALL )) s | $TOTAL_BUDGET s | |" >> "$STATUS"
  [ "${KERNELS_LINK:-0}" = 1 ] && rm -f fastattn/kernels
  [[ " $STEPS " == *" report "* ]] && [ $HAVE_GPU = 1 ] && write_report
  echo "gpu_check: results in $RES$([ $FAILED = 0 ] || echo '; some steps FAILED')"
}

if [ $HAVE_GPU = 0 ]; then
  why=$(timeout 60 $PY -c "import torch; print('torch', torch.__version__, 'built with CUDA', torch.version.cuda)" 2>&1 | tail -1)
  record preflight "no CUDA device" $(( $(date +%s) - START_ALL )) "$(budget preflight)" \
    "no CUDA device visible to torch ($why); nothing checked"
  echo "no CUDA device" > "$RES/NO_CUDA_DEVICE"
  finish
  exit 3
fi
rm -f "$RES/NO_CUDA_DEVICE"

# The step's time limit: its budget, cut to what is left of the overall deadline (less the report's
# reserve, so that a late step cannot eat the report; a killed step gets 5 s of grace).
[[ " $STEPS " == *" report "* ]] && RESERVE=$(budget report)
limit_for() {
  local b l
  b=$(budget "$1"); l=$(left)
  [ "$1" != report ] && l=$(( l - RESERVE ))
  [ "$l" -lt "$b" ] && b=$l
  echo $(( b > 0 ? b : 0 ))
}

pytest_summary() {  # the final "N passed, M failed ... in Xs" line
  grep -aE "^[0-9]+ (passed|failed|skipped|error|errors|deselected)|^=+ .*(passed|failed|skipped|error|no tests ran).* =+$|^no tests ran" "$1" \
    | tail -1 | sed 's/^=* //; s/ =*$//'
}

# cmd with SIGINT at the limit (pytest then still prints its summary), output to the log and stdout.
run_logged() {  # limit log cmd...
  local limit=$1 log=$2; shift 2
  timeout -s INT -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

XDIST=()
if $PY -c "import xdist" 2>/dev/null; then
  W=$(( $(nproc) / 2 )); [ $W -gt 8 ] && W=8; [ $W -lt 1 ] && W=1
  XDIST=(-n "$W")
fi

# fastattn.kernels is the top-level kernels/ folder, mapped by an install (package_dir). After an
# in-place build without an install, link it for the length of this call and put the checkout on
# PYTHONPATH, so that tests import this checkout with its kernels.
KERNELS_LINK=0 IMPORT_CHECKED=0
ensure_importable() {
  [ $IMPORT_CHECKED = 1 ] && return
  IMPORT_CHECKED=1
  if ! $PY -c "import fastattn.kernels" >/dev/null 2>&1 && [ ! -e fastattn/kernels ]; then
    ln -s ../kernels fastattn/kernels && KERNELS_LINK=1
    echo "gpu_check: linked fastattn/kernels -> ../kernels for this call (in-place build, no install)"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

# ---------------------------------------------------------------------------------------------------
step_preflight() {
  local log="$RES/preflight.log"
  {
    echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1 | head -25
    echo "== versions"
    $PY -c "import torch, sys; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| cudnn', torch.backends.cudnn.version())" 2>&1
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    echo "cores $(nproc); pytest-xdist: ${XDIST[*]:-not installed}"
  } > "$log" 2>&1
  cat "$log"
  record preflight ok "$(( $(date +%s) - T0 ))" "$B" "$(grep -m1 '^python' "$log"); $(grep -m1 '^triton' "$log")"
}

# CUDA headers/libraries: the toolkit's when it has cuBLASLt's, else the nvidia wheels' folders
# (site-packages/nvidia/cu13 or nvidia/<lib>), with unversioned .so links for the linker.
cuda_paths() {
  local nvcc_path cu_home site d lib so linkdir="$RES/.linklibs"
  nvcc_path=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
  if [ -z "${CUDA_HOME:-}" ]; then
    for cu_home in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "${nvcc_path:-/nonexistent}")")")"; do
      if [ -x "$cu_home/bin/nvcc" ] && [ -f "$cu_home/include/cuda_runtime_api.h" ]; then export CUDA_HOME=$cu_home; break; fi
    done
  fi
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  if [ -f "${CUDA_HOME:-/nonexistent}/include/cublasLt.h" ]; then echo "cuBLASLt headers: toolkit"; return; fi
  site=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  mkdir -p "$linkdir"
  for d in "$site"/nvidia/cu13 "$site"/nvidia/cu12 "$site"/nvidia/*; do
    [ -d "$d/include" ] && export CPATH="$d/include${CPATH:+:$CPATH}"
    if [ -d "$d/lib" ]; then
      export LIBRARY_PATH="$d/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
      for lib in cublasLt cublas cudart; do
        if [ ! -e "$d/lib/lib$lib.so" ] && [ ! -e "$linkdir/lib$lib.so" ]; then
          so=$(ls "$d/lib/lib$lib.so."* 2>/dev/null | head -1)
          [ -n "$so" ] && ln -sf "$so" "$linkdir/lib$lib.so"
        fi
      done
    fi
  done
  export LIBRARY_PATH="$linkdir${LIBRARY_PATH:+:$LIBRARY_PATH}"
  echo "cuBLASLt headers: nvidia wheels under $site/nvidia (CPATH=${CPATH:-})"
}

step_build() {
  local log="$RES/build.log" arch=${GPU_ARCH:-} how notes
  if [ -z "$arch" ]; then
    arch=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
  fi
  arch=${arch:-9.0}
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-$(nproc)}
  cuda_paths > "$RES/cuda-paths.txt" 2>&1   # not in a subshell: its exports must stay
  notes=$(tr '\n' ';' < "$RES/cuda-paths.txt")
  { echo "== $notes"; echo "== FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$MAX_JOBS ninja: $(command -v ninja || echo none)"; } | tee "$log"
  how="pip install -e"
  local t1=$(date +%s)
  PIP_BREAK_SYSTEM_PACKAGES=1 run_logged "$L" "$log" $PY -m pip install --no-build-isolation --no-deps --no-index -e .
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 130 ] && [ "$(limit_for build)" -gt 20 ]; then
    how="setup.py build_ext --inplace (pip install -e failed, rc $rc)"
    echo "== $how" | tee -a "$log"
    run_logged $(( L - ($(date +%s) - t1) )) "$log" $PY setup.py build_ext --inplace
  fi
  IMPORT_CHECKED=0; ensure_importable
  $PY - >> "$log" 2>&1 <<'EOF'
import fastattn, fastattn._C as C
print("build_info:", C.build_info())
print("backends:", fastattn.backend_status() if hasattr(fastattn, "backend_status") else fastattn.available_backends())
EOF
  local backends dt=$(( $(date +%s) - T0 ))
  backends=$($PY -c 'import fastattn; print(" ".join(fastattn.available_backends()))' 2>/dev/null)
  if [[ " $backends " == *" cuda "* ]]; then
    record build ok "$dt" "$B" "$how, arch $arch, MAX_JOBS $MAX_JOBS; backends: $backends"
  else
    record build FAILED "$dt" "$B" "$how, arch $arch: no cuda backend (backends: ${backends:-import failed}); first error: $(grep -a -m1 -iE 'error' "$log" | cut -c1-200)"
  fi
}

pytest_step() {  # name log-base pytest-args...
  local name=$1 base=$2; shift 2
  local log="$RES/$base.log"
  : > "$log"
  run_logged "$L" "$log" $PY -m pytest -q -ra -p no:cacheprovider "${XDIST[@]}" --junitxml="$RES/$base.xml" "$@"
  local rc=$? dt=$(( $(date +%s) - T0 )) summary
  summary=$(pytest_summary "$log"); summary=${summary:-"no pytest summary line"}
  if [ $rc -eq 0 ] || [ $rc -eq 5 ]; then record "$name" ok "$dt" "$B" "$summary"
  elif [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ] || grep -aq "KeyboardInterrupt" "$log"; then
    record "$name" FAILED "$dt" "$B" "stopped at the $L s limit: $summary"
  else
    record "$name" FAILED "$dt" "$B" "$summary; first: $(grep -aE '^(FAILED|ERROR) ' "$log" | head -3 | cut -c1-160 | tr '\n' ';')"
  fi
}

# The GPU conformance selection: the matrix for the cuda and triton backends (parametrized by
# backend name), the Triton kernels' own tests. No AOT, nvcc or CPU-kernel test is selected.
step_conformance() {
  local sel=(tests/test_attention_conformance.py tests/test_ffn_conformance.py)
  [ $FULL = 1 ] && sel+=(tests/test_triton_attention_kernels.py tests/test_triton_ffn_kernels.py)
  pytest_step conformance conformance "${sel[@]}" -k "cuda or triton"
}

step_tc_crosscheck() { pytest_step tc-crosscheck tc-crosscheck tests/test_cuda_tc_crosscheck.py; }

step_gpu_tests() {
  # the conformance files' gpu cases ran in the conformance step already
  pytest_step gpu-tests gpu-tests tests -m gpu --ignore=tests/test_cuda_tc_crosscheck.py \
    --ignore=tests/test_attention_conformance.py --ignore=tests/test_ffn_conformance.py \
    --ignore=tests/test_triton_aot_attention.py --ignore=tests/test_triton_aot_ffn.py \
    --ignore=tests/test_cuda_compile.py --ignore=tests/test_cuda_build.py --ignore=tests/test_gpu_check_script.py
}

# compute-sanitizer memcheck. Judged only when the tool attached (its "ERROR SUMMARY" line is in the
# log); missing or refused (no summary line, not a timeout) is recorded as "not available".
step_sanitize() {
  local cs backend log dt rc errs each results=()
  cs=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
       /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    record sanitize "not available" "$(( $(date +%s) - T0 ))" "$B" "compute-sanitizer not found"; return
  fi
  each=$(( L / 2 ))
  for backend in cuda triton; do
    log="$RES/sanitize-$backend.log"
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_logged "$each" "$log" "$cs" --tool memcheck --error-exitcode 7 --print-limit 20 \
      $PY bench/gpu_sanitize_case.py "$backend" > /dev/null
    rc=$?
    errs=$(grep -a "ERROR SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
    if [ -n "$errs" ] && [ $rc -eq 0 ] && grep -aq "sanitize case done" "$log"; then results+=("$backend ok ($errs)")
    elif [ -n "$errs" ]; then results+=("$backend FAILED (rc $rc; $errs)")
    elif [ $rc -eq 124 ] || [ $rc -eq 130 ] || [ $rc -eq 137 ]; then results+=("$backend FAILED (stopped at $each s)")
    else results+=("$backend not available ($(grep -a -m1 -iE 'error|not supported|permission|unable' "$log" | cut -c1-120))")
    fi
  done
  dt=$(( $(date +%s) - T0 ))
  local joined; joined=$(IFS=';'; echo "${results[*]}")
  if [[ "$joined" == *FAILED* ]]; then record sanitize FAILED "$dt" "$B" "$joined"
  elif [[ "$joined" == *"not available"* ]] && [[ "$joined" != *" ok ("* ]]; then record sanitize "not available" "$dt" "$B" "$joined"
  else record sanitize ok "$dt" "$B" "$joined"
  fi
}

step_speed() {
  local log="$RES/speed.log" args=()
  [ $FULL = 1 ] && args+=(--full)
  # the table starts no new row in the last 10 s of the limit; the rows it wrote stay in speed.md
  run_logged "$L" "$log" $PY bench/gpu_speed.py --out "$RES/speed.md" --seconds "$(( L > 15 ? L - 10 : 1 ))" "${args[@]}"
  local rc=$? dt=$(( $(date +%s) - T0 ))
  local rows; rows=$(grep -c '^| [a-z]' "$RES/speed.md" 2>/dev/null)
  if [ $rc -eq 0 ]; then record speed ok "$dt" "$B" "$(tail -1 "$log" | cut -c1-200)"
  else record speed FAILED "$dt" "$B" "rc $rc after ${rows:-0} rows: $(grep -a -m1 -E 'Error|error' "$log" | cut -c1-200)"
  fi
}

# --full only: the pytest-benchmark suites and bench/report.py's tables and plots.
step_bench_suites() {
  local log="$RES/bench-suites.log"
  : > "$log"
  run_logged "$L" "$log" $PY -m pytest -q -rs -p no:cacheprovider -m gpu bench/test_bench_attention.py bench/test_bench_ffn.py \
    --benchmark-json="$RES/bench.json"
  local rc=$? dt=$(( $(date +%s) - T0 ))
  [ -f "$RES/bench.json" ] && $PY bench/report.py "$RES/bench.json" --out "$RES/bench.md" --plots "$RES/bench-plots" \
    --title "fastattn gpu benchmarks — $SLUG" >> "$log" 2>&1
  if [ $rc -eq 0 ]; then record bench-suites ok "$dt" "$B" "$(pytest_summary "$log")"
  else record bench-suites FAILED "$dt" "$B" "rc $rc: $(pytest_summary "$log")"
  fi
}

write_report() {
  {
    echo "# fastattn gpu-check — ${GPU_NAME}"
    echo
    cat "$STATUS"
    for f in conformance tc-crosscheck gpu-tests; do
      if [ -f "$RES/$f.log" ] && grep -aqE "^(FAILED|ERROR) " "$RES/$f.log"; then
        echo; echo "### $f: failures (first 30; all in $f.log)"; echo; echo '```'
        grep -aE "^(FAILED|ERROR) " "$RES/$f.log" | head -30 | cut -c1-300; echo '```'
      fi
    done
    if [ -f "$RES/speed.md" ]; then echo; cat "$RES/speed.md"; fi
  } > "$RES/report.md"
}

step_report() {
  write_report
  record report ok "$(( $(date +%s) - T0 ))" "$B" "report.md (status, failures, speed table)"
}

for s in $STEPS; do
  B=$(budget "$s")
  L=$(limit_for "$s")
  T0=$(date +%s)
  echo "gpu_check: ---- $s: budget $B s, $(left) s left of $TOTAL_BUDGET s"
  if [ "$L" -lt 3 ] && [ "$s" != report ]; then
    record "$s" "not run" 0 "$B" "no time left"
    continue
  fi
  [ "$L" -lt 3 ] && L=3
  [ "$s" != build ] && [ "$s" != preflight ] && ensure_importable
  case $s in
    preflight) step_preflight ;;
    build) step_build ;;
    conformance) step_conformance ;;
    tc-crosscheck) step_tc_crosscheck ;;
    gpu-tests) step_gpu_tests ;;
    sanitize) step_sanitize ;;
    speed) step_speed ;;
    bench-suites) step_bench_suites ;;
    report) step_report ;;
  esac
done
finish
exit $FAILED
