"""Launch configurations of the kernels, per precision mode ("half", "tf32", "ieee", "fp64", and
the interpreter's own, interpreter.MODE: see interpreter.py), with the reasons for them. The
launchers read the module-level names at call time (the tests narrow some of them)."""
from __future__ import annotations

import os

import triton

from .interpreter import INTERPRET, MODE as INTERPRETER_MODE

# The first config of each list is pinned unless FAIM_TRITON_AUTOTUNE=1: pinned configs give
# bitwise the same results in every process (autotuning picks by timing, which varies between
# processes, and the configs differ in block and warp counts, hence in summation order) and no
# stall on the first call of each shape bucket (3-5 configs built and timed per kernel). Opt in
# where the last percent of speed matters more than either.
# (The interpreter has no benchmarker: never there.)
AUTOTUNE = os.environ.get("FAIM_TRITON_AUTOTUNE", "0") == "1" and not INTERPRET

# Capacity of the logits forward's list of near pairs; None: max(1024, 2·(B + C)). A tile with
# more than NEAR_PER_TILE of them, or whose pairs pass the capacity, is listed as a tile instead
# (the near-pair kernel then recomputes every pair of that tile, and only of that tile).
NEAR_CAPACITY = None
NEAR_PER_TILE = 64
# Near pairs a backward program notes for after its loop; a program meeting more walks the other
# side again with them handled inside the loop (that program only; any number).
BWD_NEAR_CAP = 128


def _fwd_cfg(bb, bc, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_B": bb, "BLOCK_C": bc, "BLOCK_K": bk, "GROUP_B": group},
                         num_warps=warps, num_stages=stages)


def _bwd_cfg(bo, bt, bk, warps, stages):
    return triton.Config({"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# Logits forward and the shared backward (both op families), per precision mode. First entry = the pinned default
# (FAIM_TRITON_AUTOTUNE=0). Chosen from sm_90 builds made with Triton's own ptxas (registers and
# spills read with cuobjdump --dump-resource-usage): the fused epilogue holds the GEMM tile plus
# several per-pair tiles, so 128x256 tiles (the matmul tutorial's best fp16 config on H100)
# spilled 0.4-3 KB per thread. The pinned forwards hold 32 accumulators per thread (128x64 with
# 8 warps, 0 B spilled): 128x128 with 8 warps spilled 72 B (half) and 200 B (TF32), 64x256 with
# 8 warps 120 B (half) and 200 B (TF32). The wider tiles stay in the autotuning lists. Not yet
# timed on a GPU.
FWD_CONFIGS = {
    "half": [_fwd_cfg(128, 64, 64, 8, 4), _fwd_cfg(128, 128, 64, 8, 4), _fwd_cfg(128, 128, 64, 8, 3),
             _fwd_cfg(64, 256, 64, 8, 3), _fwd_cfg(256, 64, 64, 8, 3), _fwd_cfg(128, 64, 64, 4, 4)],
    "tf32": [_fwd_cfg(128, 64, 32, 8, 3), _fwd_cfg(128, 128, 32, 8, 3), _fwd_cfg(64, 256, 32, 8, 3),
             _fwd_cfg(128, 64, 32, 4, 4)],
    "ieee": [_fwd_cfg(128, 128, 32, 8, 3), _fwd_cfg(64, 128, 32, 8, 3), _fwd_cfg(128, 64, 32, 4, 3),
             _fwd_cfg(64, 64, 32, 4, 4)],
    "fp64": [_fwd_cfg(32, 32, 8, 4, 1)],
    INTERPRETER_MODE: [_fwd_cfg(32, 32, 16, 4, 1, group=2)],
}
# The backward's pinned configs (first entries) and BWD_BLOCK_D below: chosen so that no variant of
# the kernel (op family, Σ mode, side, target form) spills more than 64 B per thread in sm_90
# builds (bench/compile_check.py --defaults --strict; before/after in bench/TUNING.md).
# 8 warps halve the per-thread share of each [BLOCK_O, BLOCK_T] epilogue tile and of the
# [BLOCK_O, BLOCK_D] accumulator: IEEE 32x32 with 4 warps spilled 208-1032 B, with 8 warps at most 64.
# TF32 and half: 64x32 tiles with K steps of 32 (wgmma on 64-row blocks, 0-32 B): TF32 64x64
# spilled 72-424 B, 32x64 (mma.sync) 16-24 B; half 64x32 with K steps of 64 spilled 88 B in the
# cross-entropy with full L, k = 2, class weights and a dense target.
BWD_CONFIGS = {
    "half": [_bwd_cfg(64, 32, 32, 8, 2), _bwd_cfg(64, 32, 64, 8, 2), _bwd_cfg(64, 64, 64, 8, 2),
             _bwd_cfg(32, 64, 64, 4, 2)],
    "tf32": [_bwd_cfg(64, 32, 32, 8, 2), _bwd_cfg(64, 64, 32, 8, 2), _bwd_cfg(64, 32, 32, 4, 2)],
    "ieee": [_bwd_cfg(32, 32, 32, 8, 2), _bwd_cfg(32, 32, 32, 4, 3)],
    "fp64": [_bwd_cfg(16, 16, 16, 4, 1)],
    INTERPRETER_MODE: [_bwd_cfg(16, 32, 32, 4, 1)],
}


def chunk_of_d(widest: int, D: int) -> int:
    """The chunk of D for a kernel whose widest chunk is `widest`: 64 where D <= 64, else the widest.
    Two values, not one per power of two: each value is another build of the kernel (compile time
    on a GPU's first run), and below 64 the narrower chunk saves little."""
    return min(widest, 64) if D <= 64 else widest


# Widest chunk of D a backward program accumulates ([BLOCK_O, BLOCK_D] in registers), per precision
# mode as (diagonal L, full L); wider D is split across programs, each recomputing the full-D GEMM
# tile where q does not come from the logits (the cross-entropy, half logits, logits without d):
# D/BLOCK_D + 1 GEMM-equivalents per side there (bench/TUNING.md). sm_90 builds with the pinned
# tiles: with a diagonal L, chunks of 128 spill at most 48 B (256: 0.8-1 KB); with a full L, whose
# near-pair recompute multiplies by Lc, 128 spilled 88-664 B (TF32) and 144-568 B (half), so a
# full L keeps 64. float64 keeps 32. The interpreter takes one wide chunk.
BWD_BLOCK_D = {"half": (128, 64), "tf32": (128, 64), "ieee": (128, 64), "fp64": (32, 32),
               INTERPRETER_MODE: (256, 256)}


def bwd_block_d(precision_mode: str, full: bool, D: int) -> int:
    """The backward's chunk of D for a precision mode, a full or diagonal L and D (BWD_BLOCK_D)."""
    return chunk_of_d(BWD_BLOCK_D[precision_mode][1 if full else 0], D)


# The cross-entropy forward's tiles per precision mode (not autotuned; its inputs arrive in float32 or
# float64): small, wide steps under the interpreter, which pays per operation; register-sized
# tiles for fp32 (IEEE or TF32) on the GPU; small ones for float64's broadcast products.
# Its near pairs take configs.NEAR_TILES like the other kernels'. warps_soft: the warps of the variants
# that read a dense probability target tile or carry k > 1 targets per row. sm_90 builds
# (bench/compile_check.py): with 4 warps class labels spilled 184 B (half) and 288 B (IEEE, full L),
# and 64x64 fp32 tiles with both options 112 B even with 8 warps; 8 warps everywhere and 64x32
# fp32 tiles spill nothing. Unmeasured on a GPU so far.
CE_FWD_BLOCKS = {
    INTERPRETER_MODE: dict(BLOCK_B=16, BLOCK_C=32, BLOCK_K=32, warps=1, warps_soft=1, stages=1),
    "half": dict(BLOCK_B=64, BLOCK_C=64, BLOCK_K=64, warps=8, warps_soft=8, stages=2),
    "ieee": dict(BLOCK_B=64, BLOCK_C=32, BLOCK_K=32, warps=8, warps_soft=8, stages=2),
    "tf32": dict(BLOCK_B=64, BLOCK_C=32, BLOCK_K=32, warps=8, warps_soft=8, stages=2),
    "fp64": dict(BLOCK_B=16, BLOCK_C=16, BLOCK_K=16, warps=4, warps_soft=4, stages=2),
}


# The near-pair recompute's blocks per precision mode (common._recompute_near_pairs): BLOCK_P
# pairs at a time, steps of BLOCK_K (the K of its dot with a full Lc) and BLOCK_J (the columns of
# diff' formed at a time). float64 has no tensor-core dot: narrower steps keep its broadcast
# products in registers. The interpreter takes few, wide steps.
NEAR_TILES = {"half": (16, 32, 64), "tf32": (16, 32, 64), "ieee": (16, 32, 64), "fp64": (16, 16, 32),
              INTERPRETER_MODE: (16, 128, 64)}


def ce_fwd_warps(blocks: dict, n_tgt: int, has_soft: bool) -> int:
    """The cross-entropy forward's warps for a target form (see CE_FWD_BLOCKS)."""
    return blocks["warps_soft"] if has_soft or n_tgt > 1 else blocks["warps"]


# The timing function of the autotuner (None: Triton's own benchmarker). Tests that drive the real
# Autotuner through the interpreter, which has no benchmarker, set a stand-in.
DO_BENCH = None


class Tuned:
    """`kernel` autotuned over one of this module's config tables (named `table`), per precision
    mode: `Tuned(...)[precision_mode]` is Triton's Autotuner over that mode's configs (only the first where
    AUTOTUNE is off), built on first use with the table, AUTOTUNE and DO_BENCH in force then (the
    tests change them). `kernel` itself is the untuned kernel, for launches with a given config."""

    def __init__(self, kernel, table: str, key, reset=None):
        self.kernel, self.table, self.key, self.reset = kernel, table, list(key), reset
        self._built = {}

    def __getitem__(self, precision_mode: str):
        configs = globals()[self.table][precision_mode]
        configs = tuple(configs if AUTOTUNE else configs[:1])
        sig = (precision_mode, configs, DO_BENCH)
        if sig not in self._built:
            extra = {} if DO_BENCH is None else dict(do_bench=DO_BENCH)
            self._built[sig] = triton.autotune(configs=list(configs), key=self.key, reset_to_zero=self.reset,
                                               **extra)(self.kernel)
        return self._built[sig]
