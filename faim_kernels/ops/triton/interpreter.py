"""Everything the Triton backend does differently under Triton's interpreter, in one place.

With TRITON_INTERPRET=1 set before triton is imported (the test suite on a machine without a GPU),
the same kernels run on CPU tensors: each program one after another, each tl operation a numpy call
made from Python. The kernels' arithmetic is the same; these are the only differences, and why:

1. Precision mode "interpret" (`MODE`) stands in for "half", "ieee", "tf32" and "fp64" in the
   config tables of configs.py: one small config per kernel with wide steps of D, since the
   interpreter pays per operation and per program, not per FLOP; no autotuning (the interpreter has
   no benchmarker: configs.AUTOTUNE is off). The number of builds is the same, so
   bench/count_builds.py counts a GPU run's builds here.
2. bfloat16 GEMM tiles are multiplied as float32 copies (common.DOT_UPCAST): the interpreter's
   bf16 tl.dot gives wrong products. bf16 products are exact in float32, so the values agree.
3. float32 -> bfloat16 casts truncate in the interpreter; the kernels round to nearest by hand
   there (BF16_BY_HAND, common._cast), as the GPU's conversion does.
4. Near-pair recompute blocks (configs.NEAR_TILES[MODE]): few, wide steps of D.
5. `PARALLEL_WIDTH` programs "fill the device" (2: enough to exercise the split sums), and the
   backward splits the other side at most `BACKWARD_SPLITS` ways.
6. The top-k tiles (`topk_blocks`): 16 rows, 32 columns at least.

The launchers ask this module (through these names) and nothing else about the interpreter; the
kernels themselves know nothing of it beyond the BF16_BY_HAND flag and the DOT_UPCAST mode.
"""
from __future__ import annotations

import os

import torch

# Read when this module is imported, like Triton itself reads it when the kernels are decorated.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

MODE = "interpret"

PARALLEL_WIDTH = 2
BACKWARD_SPLITS = 2


def backward_splits(splits: int, n_oth: int) -> int:
    """The backward's splits of the other side: `splits` (sized for the device) on a GPU; under the
    interpreter up to BACKWARD_SPLITS wherever the other side has more than 32 rows, so that the
    tests' small problems run the split sums too (item 5)."""
    return max(1, min(BACKWARD_SPLITS, -(-n_oth // 32))) if INTERPRET else splits


def topk_blocks(KP: int):
    """(BLOCK_B, BLOCK_C, BLOCK_K, num_warps) of the top-k kernel under the interpreter (item 6)."""
    return 16, max(32, KP), 32, 4


def precision_mode(mode: str) -> str:
    """The precision mode whose configs the kernels run with: `mode`, or MODE under the interpreter."""
    return MODE if INTERPRET else mode


def upcast_dot(op_dtype: torch.dtype) -> bool:
    """Whether the GEMM tiles of op_dtype operands must be multiplied as float32 copies (item 2)."""
    return INTERPRET and op_dtype == torch.bfloat16


def bf16_by_hand(op_dtype: torch.dtype) -> bool:
    """Whether casts to op_dtype must be rounded by hand (item 3)."""
    return INTERPRET and op_dtype == torch.bfloat16


def runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, or CPU under the interpreter."""
    return device.type == "cuda" or INTERPRET
