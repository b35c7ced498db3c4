#!/usr/bin/env bash
# The GPU check, on a machine with a CUDA GPU, in two commands of at most 8 minutes each on an H100
# (a GPU may be at hand for a few minutes only), both writing bench/RESULTS.md's GPU sections:
#
#   bash bench/gpu_check.sh --tests   # the GPU test selection (bench/gpu_tests.txt): every kernel
#                                     # family, dtype and Sigma mode in at most 150 kernel builds
#                                     # (counted without a GPU: TRITON_INTERPRET=1 python -m
#                                     # bench.count_builds), pinned configs but for one autotuned
#                                     # gradient check; the result goes to RESULTS.md's GPU section
#   bash bench/gpu_check.sh --bench   # the numbers the README quotes: the FAIMHead module against
#                                     # nn.Linear (+ F.cross_entropy, with the fused loss at large C),
#                                     # the fused cross-entropy at large C, the fused top-k (k = 10)
#   bash bench/gpu_check.sh           # both, one after the other
#   bash bench/gpu_check.sh --full-suite   # the whole test suite on the GPU (20-40 minutes)
#   bash bench/gpu_check.sh --smoke   # anywhere: a few tests and tiny benchmark sizes, the kernels
#                                     # through Triton's interpreter on CPU tensors
# No network and no install needed: the package runs from this checkout (PYTHONPATH); the C++
# CPU kernels are not built (the GPU selection does not use them). Environment: PYTHON (the
# interpreter), STEP_TIMEOUT (seconds per step, default 450), LOG_DIR (default build/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=all
for arg in "$@"; do
    case "$arg" in
        --smoke) mode=smoke ;;
        --tests|--tests-only) mode=tests ;;
        --bench|--bench-only) mode=bench ;;
        --full-suite) mode=full ;;
        --topk-only) mode=topk ;;
        *) echo "unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
LOG_DIR=${LOG_DIR:-build/gpu_check}
STEP_TIMEOUT=${STEP_TIMEOUT:-450}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTEST_OPTS=(-q -p no:cacheprovider -o "addopts=-ra --benchmark-disable")
# The selection file: one pytest argument per line, '#' comments.
mapfile -t SELECTION < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' -e '/^[[:space:]]*$/d' bench/gpu_tests.txt)

if [ "$mode" = smoke ]; then
    export TRITON_INTERPRET=1
    echo "[gpu_check] smoke: interpreter tests"
    "$PY" -m pytest tests/test_randers_logits.py "${PYTEST_OPTS[@]}" \
        -k "triton and (random_float32 and 37x45x33 or near_prototype_float32 or deterministic)" 2>&1 | tee "$LOG_DIR/tests.log"
    tests_rc=${PIPESTATUS[0]}
    echo "[gpu_check] smoke: benchmark"
    "$PY" -m bench.gpu_bench --smoke --results "$LOG_DIR/RESULTS.smoke.md" --log "$LOG_DIR/bench.jsonl" \
        --tests-status "$( [ "$tests_rc" = 0 ] && echo passed || echo FAILED )"
    bench_rc=$?
    echo "[gpu_check] smoke: fused cross-entropy benchmark"
    "$PY" -m bench.ce_bench --backend triton --sizes 8,50,16 --min-time 0.1 || bench_rc=1
    [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
    exit $?
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "[gpu_check] no CUDA device visible to $PY (use --smoke on a CPU-only machine)" >&2; exit 2; }
"$PY" -c "import torch, triton; print('[gpu_check]', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"

# bench/RESULTS.md's GPU check section: device, versions, date and the test result.
record() {  # record <what> <status>
    "$PY" - "$1" "$2" <<'EOF'
import datetime, sys
import torch, triton
from bench.results import write_section
what, status = sys.argv[1], sys.argv[2]
write_section(f"gpu-check-{what}", f"### GPU check, {what} ({datetime.date.today()})\n\n"
              f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
              f"CUDA {torch.version.cuda}: {status}\n")
EOF
}

xdist=()
if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 4 --dist loadfile); fi  # compiles in parallel

tests_rc=0
if [ "$mode" = tests ] || [ "$mode" = all ] || [ "$mode" = full ]; then
    if [ "$mode" = full ]; then args=(tests); limit=3600; else args=("${SELECTION[@]}"); limit=$STEP_TIMEOUT; fi
    echo "[gpu_check] tests on the GPU ($mode; pinned kernel configs: FAIM_TRITON_AUTOTUNE=0), at most ${limit} s"
    start=$SECONDS
    FAIM_TRITON_AUTOTUNE=0 timeout "$limit" "$PY" -m pytest "${PYTEST_OPTS[@]}" "${xdist[@]}" "${args[@]}" \
        2>&1 | tee "$LOG_DIR/tests.log" | tail -n 25
    tests_rc=${PIPESTATUS[0]}
    summary=$(tail -n 1 "$LOG_DIR/tests.log" | tr -d '=')
    [ "$tests_rc" = 124 ] && summary="TIMED OUT after ${limit} s: $summary"
    record "tests" "$( [ "$tests_rc" = 0 ] && echo "passed" || echo "FAILED" ) ($summary, $((SECONDS - start)) s)"
fi

bench_rc=0
step() {  # step <name> <command...>: one benchmark under the step time limit
    local name=$1; shift
    echo "[gpu_check] $name"
    timeout "$STEP_TIMEOUT" "$@" 2>&1 | tee "$LOG_DIR/$name.log" | tail -n 30
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "[gpu_check] $name failed ($rc)" >&2; bench_rc=1; }
}
if [ "$mode" = bench ] || [ "$mode" = all ]; then
    # About 8 minutes in all on an H100, first builds included (no k = 1000 top-k: its KP = 1024
    # kernel alone takes 200-400 s to build).
    STEP_TIMEOUT=200 step head_bench "$PY" -m bench.head_bench --device cuda --min-run-time 0.2 --write-results
    STEP_TIMEOUT=120 step ce_bench "$PY" -m bench.ce_bench --device cuda --sizes 4096,100000,256 --rounds 2 \
        --write-results --out "$LOG_DIR/ce_bench.md"
    STEP_TIMEOUT=120 step topk_bench "$PY" -m bench.topk_bench --device cuda --k 10 --write-results \
        --out "$LOG_DIR/topk_bench.md"
    record "benchmarks" "$( [ "$bench_rc" = 0 ] && echo "written above" || echo "a step FAILED (see $LOG_DIR)" )"
fi

if [ "$mode" = topk ]; then
    step topk_tests env FAIM_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/test_randers_topk.py "${PYTEST_OPTS[@]}"
    step topk_bench "$PY" -m bench.topk_bench --device cuda --k 10 1000 --write-results --out "$LOG_DIR/topk_bench.md"
    tests_rc=$bench_rc
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
