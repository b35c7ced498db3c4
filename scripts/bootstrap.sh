#!/usr/bin/env bash
# Set up everything the two README commands need, on a machine where nothing was installed by
# hand: a virtual environment in .venv, torch (the CPU wheel 2.13.0 where pip can find it),
# triton (its interpreter runs the GPU kernels on CPU tensors in the tests), the test and demo
# dependencies, and the C++ kernels built in place (faim_kernels/_C*.so, which the loader prefers;
# an installed package compiles them on first use instead). Safe to re-run: each step is skipped
# when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "[bootstrap] creating $VENV"
    "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pipq() { "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v '^WARNING: Location' || true; }

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] installing torch"
    # The exact pin lives here only (the CPU wheel of this machine kind); the package metadata
    # accepts any recent torch so it also builds against a CUDA build elsewhere.
    pipq "torch==${FAIM_TORCH_VERSION:-2.13.0}"
fi
if ! "$VPY" -c "import triton, numpy, pytest, pytest_benchmark, tqdm, ninja, sklearn, matplotlib, pytorch_metric_learning, onnx, onnxruntime, onnxscript" >/dev/null 2>&1; then
    echo "[bootstrap] installing triton and the test/demo dependencies"
    # onnx, onnxruntime, onnxscript: the ONNX export test (torch.onnx.export(dynamo=True) needs onnxscript).
    pipq triton numpy pytest pytest-benchmark tqdm ninja scikit-learn matplotlib pytorch-metric-learning "setuptools>=77" \
        wheel onnx onnxruntime onnxscript
fi
"$VPY" -c "import torch" || { echo "[bootstrap] torch did not install" >&2; exit 1; }
# The documentation tools (`make docs`, and `make test` builds the docs too), at the pins of
# pyproject.toml's `docs` extra; the check reads installed metadata only (no imports: ~0.1 s).
DOCS_PINS="mkdocs==1.6.1 mkdocs-material==9.8.1 mkdocstrings==1.0.8 mkdocstrings-python==2.0.11"
if ! "$VPY" - $DOCS_PINS >/dev/null 2>&1 <<'PYEOF'
import sys
from importlib.metadata import version
sys.exit(any(version(name) != want for name, want in (pin.split("==") for pin in sys.argv[1:])))
PYEOF
then
    echo "[bootstrap] installing the documentation tools"
    # shellcheck disable=SC2086
    pipq $DOCS_PINS
fi

echo "[bootstrap] building the C++ kernels in place"
export PATH="$PWD/$VENV/bin:$PATH"
mkdir -p build
# Built for this CPU (-march=native): the checkout runs where it was built (faim_kernels/_cpp_loader.py).
if ! FAIM_KERNELS_MARCH=native MAX_JOBS=${MAX_JOBS:-2} "$VPY" setup.py build_ext --inplace >build/build.log 2>&1; then
    tail -n 40 build/build.log >&2
    echo "[bootstrap] the C++ extension did not build (full log: build/build.log)" >&2
    exit 1
fi
"$VPY" -c "from faim_kernels import _cpp_loader as l; l.load(); assert l._loaded_from()[0] == 'prebuilt', l._loaded_from()" \
    || { echo "[bootstrap] the in-place build of the C++ kernels does not load" >&2; exit 1; }
