#!/usr/bin/env bash
# `make gpu-check`: on a machine with a CUDA GPU, build fastattn with its CUDA kernels, run the whole
# test suite on the GPU, run compute-sanitizer memcheck on a small case through the cuda backend,
# run the GPU benchmarks, and write bench/results/<gpu>.md beside the raw pytest-benchmark JSON.
#
#   bash bench/gpu_check.sh                  # every step: build test sanitize bench report
#   bash bench/gpu_check.sh build test       # some steps (the report is always rewritten at the end)
#
# No network and no venv: the system python3 with what the image has (torch+CUDA, triton, nvcc,
# pytest, pytest-benchmark, pybind11); the build uses --no-build-isolation and downloads nothing.
# Every step runs even when an earlier one failed; failures go into the report, and the script
# exits non-zero when any step failed. Steps given on the command line append to the status of an
# earlier run (so the steps can be spread over several calls of a time-limited runner); a run of
# every step starts it afresh. Outputs also go, flat, into $OUT when that variable is set.
#
# Environment knobs: PYTHON (python3), GPU_ARCH (else nvidia-smi's compute_cap, else 9.0),
# MAX_JOBS (16), NINJA (a ninja binary when none is on PATH; .venv/bin/ninja is tried too: without
# ninja torch compiles the sources one after another), GPU_BENCH_ARGS (extra pytest arguments for
# the benchmarks, e.g. -k "not L2048 and not L8192" for a shorter run),
# FASTATTN_BENCH_SECONDS (timed seconds per benchmark, default 0.25 on a GPU),
# TIMEOUT_BUILD/TIMEOUT_TEST/TIMEOUT_SANITIZE/TIMEOUT_BENCH_ATTN/TIMEOUT_BENCH_FFN (seconds).
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
RES=bench/results
mkdir -p "$RES"
unset TRITON_INTERPRET          # real Triton kernels on the GPU, never the interpreter
export PYTHONDONTWRITEBYTECODE=1

ALL_STEPS="build test sanitize bench"
STEPS="${*:-$ALL_STEPS}"
for s in $STEPS; do
  case $s in build|test|sanitize|bench|report) ;; *) echo "gpu_check.sh: unknown step '$s'; expected some of: $ALL_STEPS report" >&2; exit 2;; esac
done

SLUG=$($PY - <<'EOF' 2>/dev/null
import re, torch
name = torch.cuda.get_device_name() if torch.cuda.is_available() else "no-gpu"
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"))
EOF
)
SLUG=${SLUG:-no-gpu}
P="$RES/$SLUG"
STATUS="$P.status.md"
FAILED=0
START_ALL=$(date +%s)

if [ "$STEPS" = "$ALL_STEPS" ] || [ ! -f "$STATUS" ]; then
  {
    echo "## gpu-check"
    echo
    echo "Steps of \`bash bench/gpu_check.sh\` on $(hostname), started $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo
    echo "| step | result | time | detail |"
    echo "|---|---|---:|---|"
  } > "$STATUS"
fi

record() {  # step result seconds detail
  local detail=${4//|//}
  echo "| $1 | $2 | $3 s | ${detail//\`/\'} |" >> "$STATUS"
  echo "gpu_check: $1: $2 ($3 s) $4"
  if [ "$2" = "FAILED" ]; then FAILED=1; fi
}

pytest_summary() {  # log: the final "N passed, M failed ... in Xs" line, with or without -q
  grep -E "^[0-9]+ (passed|failed|skipped|error|errors|deselected)|^=+ .*(passed|failed|skipped|error|no tests ran).* =+$|^no tests ran" "$1" \
    | tail -1 | sed 's/^=* //; s/ =*$//'
}

run_timed() {  # seconds logfile cmd... : runs with SIGINT at the limit (pytest then still writes its JSON)
  local limit=$1 log=$2; shift 2
  timeout -s INT -k 30 "$limit" "$@" > "$log" 2>&1
}

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  record "gpu" "FAILED" 0 "no CUDA device visible to torch ($($PY -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"
fi

# ---------------------------------------------------------------------------------------------------
# fastattn.kernels is the top-level kernels/ folder, mapped by an install (package_dir). After an
# in-place build without an install, link it for the length of this call and put the checkout on
# PYTHONPATH, so that tests and benchmarks import this checkout with its kernels.
ensure_importable() {
  if $PY -c "import fastattn._C" >/dev/null 2>&1 && ! $PY -c "import fastattn.kernels" >/dev/null 2>&1 \
     && [ ! -e fastattn/kernels ]; then
    ln -s ../kernels fastattn/kernels && KERNELS_LINK=1
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    echo "gpu_check: linked fastattn/kernels -> ../kernels for this call (in-place build, no install)"
  fi
}

# ---------------------------------------------------------------------------------------------------
# torch builds in parallel (MAX_JOBS) only through ninja; without it every source compiles in turn.
# No network here, so use a ninja binary that came along (e.g. this checkout's .venv/bin/ninja,
# carried to the GPU machine), linked alone into a PATH directory (never the venv's python).
find_ninja() {
  if command -v ninja >/dev/null; then echo "ninja $(ninja --version)"; return; fi
  local c abs
  for c in ${NINJA:-} .venv/bin/ninja .venv-cuda/bin/ninja; do
    if [ -x "$c" ] && "$c" --version >/dev/null 2>&1; then
      abs="$(cd "$(dirname "$c")" && pwd)/$(basename "$c")"
      mkdir -p /tmp/fastattn-ninja && ln -sf "$abs" /tmp/fastattn-ninja/ninja
      echo "ninja $("$abs" --version) from $c"
      return
    fi
  done
  echo "no ninja: the sources compile one after another"
}

step_build() {
  local t0=$(date +%s) arch=${GPU_ARCH:-}
  if [ -z "$arch" ] && command -v nvidia-smi >/dev/null; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' ')
  fi
  arch=${arch:-9.0}
  local log="$P-build.log" how="pip install --no-build-isolation -e ."
  {
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    echo "== versions"; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__)" 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -2
    echo "== build: FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=${MAX_JOBS:-16}"
  } > "$log" 2>&1
  local ninja_note
  ninja_note=$(find_ninja)
  if [ -x /tmp/fastattn-ninja/ninja ]; then export PATH="/tmp/fastattn-ninja:$PATH"; fi
  echo "== $ninja_note" >> "$log"
  export FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=${MAX_JOBS:-16}
  if ! PIP_BREAK_SYSTEM_PACKAGES=1 timeout "${TIMEOUT_BUILD:-900}" $PY -m pip install --no-build-isolation --no-deps --no-index -e . >> "$log" 2>&1; then
    how="setup.py build_ext --inplace (the editable install failed; see the log)"
    echo "== editable install failed; falling back to build_ext --inplace" >> "$log"
    timeout "${TIMEOUT_BUILD:-900}" $PY setup.py build_ext --inplace >> "$log" 2>&1
    ensure_importable
  fi
  local facts
  facts=$($PY - >> "$log" 2>&1 <<'EOF'
import fastattn, fastattn._C as C
print("build_info:", C.build_info() if hasattr(C, "build_info") else "?")
print("backends:", fastattn.backend_status())
import sys
sys.exit(0 if "cuda" in fastattn.available_backends() else 3)
EOF
  ); local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  if [ $rc -eq 0 ]; then
    record build ok $dt "$how, arch $arch, $ninja_note; backends: $($PY -c 'import fastattn; print(", ".join(fastattn.available_backends()))' 2>/dev/null)"
  elif [ $rc -eq 3 ]; then
    record build FAILED $dt "built ($how) but the cuda backend is not available: $(grep -o "'cuda': [^,}]*" "$log" | tail -1)"
  else
    record build FAILED $dt "$how, arch $arch, $ninja_note: $(grep -m1 -iE 'error' "$log" | cut -c1-200) (see $(basename "$log"))"
  fi
}

# ---------------------------------------------------------------------------------------------------
step_test() {
  local t0=$(date +%s) log="$P-tests.log" xml="$P-tests.xml"
  run_timed "${TIMEOUT_TEST:-600}" "$log" $PY -m pytest -q -ra -p no:cacheprovider tests --junitxml="$xml"
  local rc=$? dt=$(( $(date +%s) - t0 ))
  local summary
  summary=$(pytest_summary "$log")
  summary=${summary:-"no pytest summary line (rc $rc)"}
  {
    echo "- pytest on the GPU: \`$summary\`"
    if grep -qE "^(FAILED|ERROR) " "$log"; then
      echo; echo "Failed tests (first 40; all in $(basename "$log") and $(basename "$xml")):"; echo; echo '```'
      grep -E "^(FAILED|ERROR) " "$log" | head -40 | cut -c1-300; echo '```'
    fi
  } > "$P-tests.summary"
  if [ $rc -eq 0 ]; then record test ok $dt "$summary"
  elif [ $rc -eq 130 ] || [ $rc -eq 124 ] || [ $rc -eq 2 ] && grep -q "KeyboardInterrupt" "$log"; then
    record test FAILED $dt "stopped at the ${TIMEOUT_TEST:-600} s limit: $summary"
  else record test FAILED $dt "$summary (rc $rc; failures listed in $(basename "$log"))"
  fi
}

# ---------------------------------------------------------------------------------------------------
step_sanitize() {
  local t0=$(date +%s) log="$P-sanitizer.log" cs
  cs=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer \
       /usr/local/cuda*/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$cs" ]; then
    record sanitize "not run" 0 "compute-sanitizer not found (not a failure)"; return
  fi
  local script
  script=$(mktemp /tmp/fastattn-sanitize-XXXX.py)
  cat > "$script" <<'EOF'
# A small attention + feed-forward run through the cuda backend, forward and backward, checked
# against the reference; under compute-sanitizer memcheck every out-of-bounds access is reported.
import torch, fastattn
from fastattn.reference import attention_reference, ffn_reference
torch.manual_seed(0)
dev = "cuda"
for dtype in (torch.float16, torch.bfloat16):
    for (N, H, L, S, E, causal) in ((2, 3, 77, 77, 64, True), (1, 2, 33, 130, 25, False), (2, 2, 64, 64, 128, False)):
        q = torch.randn(N, H, L, E, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(N, H, S, E, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(N, H, S, E, device=dev, dtype=dtype, requires_grad=True)
        kpm = torch.zeros(N, S, dtype=torch.bool, device=dev); kpm[:, S // 2:] = True
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=causal, key_padding_mask=kpm, backend="cuda")
        ref = attention_reference(q.float(), k.float(), v.float(), None, kpm, 0.0, causal)
        err = (out.float() - ref).abs().max().item()
        assert err < 3e-2, f"attention {dtype} {(N, H, L, S, E, causal)}: max error {err}"
        out.backward(torch.randn_like(out))
        print("attention", dtype, (N, H, L, S, E, causal), "max err", err)
    x = torch.randn(97, 100, device=dev, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(250, 100, device=dev) / 10).to(dtype).requires_grad_()
    b1 = torch.randn(250, device=dev, dtype=dtype, requires_grad=True)
    w2 = (torch.randn(100, 250, device=dev) / 16).to(dtype).requires_grad_()
    b2 = torch.randn(100, device=dev, dtype=dtype, requires_grad=True)
    for act in ("relu", "gelu", "gelu_tanh"):
        y = fastattn.feed_forward(x, w1, b1, w2, b2, act, backend="cuda")
        ref = ffn_reference(x.float(), w1.float(), b1.float(), w2.float(), b2.float(), act)
        err = (y.float() - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
        assert err < 3e-2, f"ffn {dtype} {act}: relative max error {err}"
        y.backward(torch.randn_like(y))
        print("ffn", dtype, act, "rel err", err)
torch.cuda.synchronize()
print("sanitize script done")
EOF
  run_timed "${TIMEOUT_SANITIZE:-300}" "$log" "$cs" --tool memcheck --error-exitcode 7 --print-limit 20 $PY "$script"
  local rc=$? dt=$(( $(date +%s) - t0 ))
  rm -f "$script"
  local errs
  errs=$(grep -E "ERROR SUMMARY" "$log" | tail -1)
  if [ $rc -eq 0 ]; then record sanitize ok $dt "memcheck: ${errs:-no summary line}"
  else record sanitize FAILED $dt "rc $rc; ${errs:-$(tail -1 "$log" | cut -c1-200)}"
  fi
}

# ---------------------------------------------------------------------------------------------------
step_bench() {
  local t0 dt rc suite limit
  for suite in attention ffn; do
    t0=$(date +%s)
    if [ $suite = attention ]; then limit=${TIMEOUT_BENCH_ATTN:-420}; else limit=${TIMEOUT_BENCH_FFN:-300}; fi
    rm -f "$P-$suite.json"
    # shellcheck disable=SC2086
    run_timed "$limit" "$P-bench-$suite.log" $PY -m pytest -q -rs -p no:cacheprovider -m gpu \
      "bench/test_bench_$suite.py" --benchmark-json="$P-$suite.json" ${GPU_BENCH_ARGS:-}
    rc=$?; dt=$(( $(date +%s) - t0 ))
    local summary
    summary=$(pytest_summary "$P-bench-$suite.log")
    if [ $rc -eq 0 ]; then record "bench $suite" ok $dt "${summary:-?}"
    elif grep -q "KeyboardInterrupt" "$P-bench-$suite.log"; then record "bench $suite" FAILED $dt "stopped at the $limit s limit (results so far kept): ${summary:-?}"
    else record "bench $suite" FAILED $dt "rc $rc: ${summary:-?} (see $(basename "$P-bench-$suite.log"))"
    fi
  done
  # one JSON for the GPU: the suites' benchmarks together
  $PY - "$P.json" "$P-attention.json" "$P-ffn.json" <<'EOF'
import json, os, sys
out, parts = sys.argv[1], [p for p in sys.argv[2:] if os.path.exists(p)]
merged = None
for p in parts:
    with open(p) as f:
        d = json.load(f)
    if merged is None:
        merged = d
    else:
        merged["benchmarks"] += d["benchmarks"]
if merged is not None:
    with open(out, "w") as f:
        json.dump(merged, f, indent=1)
EOF
}

# ---------------------------------------------------------------------------------------------------
step_report() {
  local notes=("--notes" "$STATUS") jsons=()
  [ -f "$P-tests.summary" ] && notes+=("--notes" "$P-tests.summary")
  [ -f "$P.json" ] && jsons+=("$P.json")
  if [ ${#jsons[@]} -eq 0 ]; then
    echo '{"benchmarks": []}' > "$P.empty.json"; jsons=("$P.empty.json")
  fi
  if ! $PY bench/report.py "${jsons[@]}" --out "$P.md" --plots "$P-plots" "${notes[@]}" \
       --title "fastattn gpu-check — $SLUG" > "$P-report.log" 2>&1; then
    FAILED=1
    { echo "# fastattn gpu-check — $SLUG"; echo; cat "$STATUS"; echo; echo "report.py failed:"; echo '```';
      tail -20 "$P-report.log"; echo '```'; } > "$P.md"
  fi
  rm -f "$P.empty.json"
}

KERNELS_LINK=0
for s in $STEPS; do
  [ "$s" != build ] && ensure_importable
  case $s in
    build) step_build ;;
    test) step_test ;;
    sanitize) step_sanitize ;;
    bench) step_bench ;;
  esac
done
if [ "$KERNELS_LINK" = 1 ]; then rm -f fastattn/kernels; fi
echo "| total (this call: $STEPS) | $([ $FAILED = 0 ] && echo ok || echo FAILED) | $(( $(date +%s) - START_ALL )) s | |" >> "$STATUS"
step_report

if [ -n "${OUT:-}" ] && [ -d "${OUT:-}" ]; then
  # at most 8 flat files: the report, the raw JSON, the tests' log and XML, the other logs in one, plots
  for f in "$P-build.log" "$P-sanitizer.log" "$P-bench-attention.log" "$P-bench-ffn.log" "$P-report.log"; do
    [ -f "$f" ] && { echo "===== $(basename "$f")"; cat "$f"; echo; }
  done > "$OUT/$SLUG-logs.txt"
  for f in "$P.md" "$P.json" "$P-tests.xml" "$P-tests.log" "$P-plots/gpu-attention.png" "$P-plots/gpu-ffn.png"; do
    if [ -f "$f" ]; then cp "$f" "$OUT/"; fi
  done
fi
echo "gpu_check: report in $P.md$([ $FAILED = 0 ] || echo '; some steps FAILED')"
exit $FAILED
