#!/usr/bin/env bash
# Runs the timm integration tests (tests/test_nn_timm.py) in an environment of their own.
#
# timm imports torchvision, and torchvision only imports beside the torch it was built for: the
# CPU torch wheel of the main .venv has no matching torchvision. So this builds .venv-timm with
# torch 2.14.1 + torchvision 0.29.1 (a CUDA build of torch that also runs on the CPU; ~6 GB) and
# timm, copies the package to build/timm/ and compiles the C++ extension there against that
# torch (the main .venv's build in faim_kernels/ is left as it is), then runs the tests.
# (scikit-learn is for bench/timm_recipes.py, which runs in this environment too.)
# Safe to re-run: the environment is reused once timm imports in it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${FAIM_TIMM_VENV:-.venv-timm}
PY=$ROOT/$VENV/bin/python

if [ ! -x "$PY" ]; then
    echo "[test-timm] creating $VENV"
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$PY" -c "import timm, torchvision" >/dev/null 2>&1; then
    echo "[test-timm] installing torch ${FAIM_TIMM_TORCH:-2.14.1}, torchvision ${FAIM_TIMM_TORCHVISION:-0.29.1} and timm (large)"
    "$PY" -m pip install -q --disable-pip-version-check \
        "torch==${FAIM_TIMM_TORCH:-2.14.1}" "torchvision==${FAIM_TIMM_TORCHVISION:-0.29.1}"
    "$PY" -m pip install -q --disable-pip-version-check timm pytest pytest-benchmark numpy ninja setuptools wheel scikit-learn
fi
"$PY" -c "import timm; timm.create_model('resnet18', pretrained=False)" \
    || { echo "[test-timm] timm does not work in $VENV" >&2; exit 1; }

echo "[test-timm] building the C++ extension against $("$PY" -c 'import torch; print(torch.__version__)') in build/timm"
rm -rf build/timm
mkdir -p build/timm
cp -r faim_kernels csrc tests setup.py pyproject.toml build/timm/
rm -f build/timm/faim_kernels/*.so
find build/timm -name __pycache__ -prune -exec rm -rf {} +
cd build/timm
if ! PATH="$ROOT/$VENV/bin:$PATH" MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace >build.log 2>&1; then
    tail -n 40 build.log >&2
    echo "[test-timm] the C++ extension did not build (log: build/timm/build.log)" >&2
    exit 1
fi
TRITON_INTERPRET=1 "$PY" -m pytest tests/test_nn_timm.py -q -p no:cacheprovider "$@"
