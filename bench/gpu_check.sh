#!/usr/bin/env bash
# The GPU check in one command, on a machine with a CUDA GPU: install the package (C++ extension
# included), run the test suite on the GPU, then the GPU benchmark, which writes bench/RESULTS.md's
# GPU section and prints a short table last. Logs go to $LOG_DIR (default build/gpu_check).
#
#   bash bench/gpu_check.sh                 # tests, then benchmark
#   bash bench/gpu_check.sh --tests-only    # or --bench-only, where one command may run 10 minutes
#                                           # at most (first calls compile and autotune; see TUNING.md)
#   bash bench/gpu_check.sh --topk-only     # the fused top-k's tests and benchmark alone
#   bash bench/gpu_check.sh --smoke         # anywhere: a few tests and tiny benchmark sizes, the
#                                           # kernels through Triton's interpreter on CPU tensors
# Environment: PYTHON (interpreter to use), BENCH_ARGS (extra arguments for bench/gpu_bench.py).
set -uo pipefail
cd "$(dirname "$0")/.."

mode=all
for arg in "$@"; do
    case "$arg" in
        --smoke) mode=smoke ;;
        --tests-only) mode=tests ;;
        --bench-only) mode=bench ;;
        --topk-only) mode=topk ;;
        *) echo "unknown argument $arg" >&2; exit 2 ;;
    esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ "$mode" = smoke ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
LOG_DIR=${LOG_DIR:-build/gpu_check}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1

if [ "$mode" = smoke ]; then
    export TRITON_INTERPRET=1
    echo "[gpu_check] smoke: interpreter tests"
    "$PY" -m pytest tests/test_randers_logits.py -q -p no:cacheprovider \
        -k "triton and (random_float32 and 37x45x33 or near_prototype_float32 or deterministic)" 2>&1 | tee "$LOG_DIR/tests.log"
    tests_rc=${PIPESTATUS[0]}
    echo "[gpu_check] smoke: benchmark"
    "$PY" -m bench.gpu_bench --smoke --results "$LOG_DIR/RESULTS.smoke.md" --log "$LOG_DIR/bench.jsonl" \
        --tests-status "$( [ "$tests_rc" = 0 ] && echo passed || echo FAILED )" ${BENCH_ARGS:-}
    bench_rc=$?
    echo "[gpu_check] smoke: fused cross-entropy benchmark"
    "$PY" -m bench.ce_bench --backend triton --sizes 8,50,16 --min-time 0.1 || bench_rc=1
    echo "[gpu_check] smoke: top-k interpreter tests"
    "$PY" -m pytest tests/test_randers_topk.py -q -p no:cacheprovider -k "triton and (near_prototype or splits)" \
        2>&1 | tee -a "$LOG_DIR/tests.log" || tests_rc=1
    [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
    exit $?
fi

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "[gpu_check] no CUDA device visible to $PY (use --smoke on a CPU-only machine)" >&2; exit 2; }
"$PY" -c "import torch, triton; print('[gpu_check]', torch.cuda.get_device_name(0), 'torch', torch.__version__, 'triton', triton.__version__)"

if ! "$PY" -c "import faim_kernels" >/dev/null 2>&1; then
    echo "[gpu_check] installing (pip install --no-build-isolation --no-deps -e .)"
    "$PY" -m pip install -q --no-build-isolation --no-deps -e . >"$LOG_DIR/install.log" 2>&1 || {
        tail -n 30 "$LOG_DIR/install.log" >&2; echo "[gpu_check] install failed" >&2; exit 1; }
fi
# The C++ CPU kernels (the tests compare against them) compile on first use; do it once up front.
"$PY" -c "from faim_kernels import _cpp_loader as l; l.load(); print('[gpu_check] C++ kernels:', l._loaded_from()[0])" \
    || echo "[gpu_check] the C++ CPU kernels are unavailable: the tests that need them will say why" >&2

if [ "$mode" = topk ]; then
    echo "[gpu_check] top-k tests on the GPU"
    FAIM_TRITON_AUTOTUNE=0 "$PY" -m pytest tests/test_randers_topk.py -q -p no:cacheprovider \
        -o addopts="-ra --benchmark-disable" 2>&1 | tee "$LOG_DIR/topk_tests.log" | tail -n 15
    tests_rc=${PIPESTATUS[0]}
    echo "[gpu_check] top-k benchmark"
    "$PY" -m bench.topk_bench --device cuda --k 10 1000 --write-results --out "$LOG_DIR/topk_bench.md"
    bench_rc=$?
    [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
    exit $?
fi

tests_status="not run"
tests_rc=0
if [ "$mode" != bench ]; then
    echo "[gpu_check] test suite on the GPU (pinned kernel configs: FAIM_TRITON_AUTOTUNE=0)"
    FAIM_TRITON_AUTOTUNE=0 "$PY" -m pytest tests -q -p no:cacheprovider -o addopts="-ra --benchmark-disable" \
        2>&1 | tee "$LOG_DIR/tests.log" | tail -n 25
    tests_rc=${PIPESTATUS[0]}
    tests_status=$( [ "$tests_rc" = 0 ] && echo "passed ($(tail -n 1 "$LOG_DIR/tests.log"))" || echo "FAILED (see $LOG_DIR/tests.log)" )
    tests_status=${tests_status//=/}
fi

bench_rc=0
if [ "$mode" != tests ]; then
    echo "[gpu_check] benchmark"
    echo "[gpu_check] fused cross-entropy benchmark"
    "$PY" -m bench.ce_bench --device cuda --write-results --out "$LOG_DIR/ce_bench.md"
    ce_rc=$?
    "$PY" -m bench.gpu_bench --log "$LOG_DIR/bench.jsonl" --tests-status "$tests_status" ${BENCH_ARGS:-}
    bench_rc=$?
    [ "$ce_rc" = 0 ] || bench_rc=$ce_rc
    echo "[gpu_check] the head against nn.Linear + F.cross_entropy"
    "$PY" -m bench.head_bench --device cuda --write-results || bench_rc=1
    echo "[gpu_check] fused top-k benchmark"
    "$PY" -m bench.topk_bench --device cuda --k 10 1000 --write-results --out "$LOG_DIR/topk_bench.md" || bench_rc=1
fi
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
