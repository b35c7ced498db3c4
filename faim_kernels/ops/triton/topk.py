"""The top-k op for CUDA tensors (and CPU tensors through Triton's interpreter): its kernel and
launcher, with the contract of faim_kernels/ops/contract.py (randers_topk: forward only).

One launch after the preparation (common.Operands: centre, x', mu', norms, float64 s):
  _topk_kernel   program (row block, class split) sweeps its split's class tiles: a GEMM tile of
                 x'·mu'ᵀ with the epilogue of docs/design.md §1 (the function)-2, the near pairs of docs/design.md §2.1 (near pairs) recomputed
                 from the raw difference inside the tile BEFORE any comparison, then the tile's KP
                 best merged into the program's running KP best (registers, sorted).
Each (distance, class) pair travels as one int64 key: the distance's float32 bits mapped to an
order-preserving int32 in the high half, the class index in the low half, so integer order is the
contract's order (distance, ties by the lower index; NaN last for the k smallest, first for the k
largest) and the bitonic sorting networks below carry the index for free. Merging a tile (its KP
smallest, sorted descending) into the running best (ascending) is one elementwise minimum (a
bitonic sequence holding the KP smallest of both) and one bitonic merge.
The launcher then sorts the splits' [B, splits·KP] keys and keeps the first k.

Limits: k <= MAX_K (= 1024; KP = max(8, next power of two >= k) keys per row live in registers:
built for sm_90 without a GPU (bench/compile_check.py), KP <= 64 fits with at most ~100 bytes of
spill per thread, KP = 1024 spills ~3 KB and took 200-400 s to compile on a 2-core machine, so the
first call with a large k is slow; keeping the running best in shared memory is the next step
there. Not yet run on a GPU); C < 2³¹
(the index's half of the key); float16/bfloat16/float32 inputs (distances in float32: keys are
float32 bits). The dispatch layer runs larger k and float64 CUDA inputs through randers_distance +
a sort instead, with a warning (faim_kernels/ops/dispatch.py).

Extra memory: the Operands (x' [B, D] and mu' [C, D] in the GEMM's dtype, O(B + C) terms) and the
splits' keys, splits·B·KP·8 bytes with splits = ceil(2·(2·SMs) / row blocks): on a 132-SM GPU at
B = 1024 about 75 MB for k = 1024 (KP = 1024, 16-row blocks, 9 splits) and 2 MB for k = 1 (KP = 8,
64-row blocks, 33 splits), plus their sort. So O(B·k·splits + C·D): mu' is as large as mu (the
C++ kernel forms it tile by tile instead).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, interpreter
from .common import (_gemm_q, _load_eps, _near_pair_distance, _pair_distance, _pair_s, _recompute_near_pairs,
                     _s_is_near, _take_near, _tile_dot)

# The bitonic network below uses two private helpers of triton.language.standard whose current
# forms (_indicator(n_dims, j)) exist since Triton 3.4. On older Triton the top-k kernel is off
# (`supports` is False: the dispatch layer sorts randers_distance instead) and the other ops work.
TRITON_VERSION = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
AVAILABLE = TRITON_VERSION >= (3, 4)
if AVAILABLE:
    from triton.language.standard import _indicator, _log2
else:  # pragma: no cover - older Triton
    _indicator = _log2 = None

MAX_K = 1024
# Splits of the class range per row block (None: fill the device). The tests narrow it.
SPLITS = None
_INT64_MAX = tl.constexpr(2 ** 63 - 1)  # the key of padding columns (classes >= C)


def supports(k: int, dtype: torch.dtype, num_classes: int) -> bool:
    """Whether the kernel serves this call (else the dispatch layer sorts randers_distance)."""
    return AVAILABLE and k <= MAX_K and dtype != torch.float64 and num_classes < 2 ** 31


@triton.jit
def _order_keys(v, col, NAN_FIRST: tl.constexpr):
    """int64 keys ordering (v, col) like the contract: v's float32 bits made order-preserving as a
    signed int32 (negative floats: the 31 low bits flipped) in the high half, col in the low half;
    NaN above +inf, or below −inf with NAN_FIRST."""
    v = v + 0.0  # −0.0 -> +0.0: equal values, equal keys
    bits = v.to(tl.int32, bitcast=True)
    k32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    if NAN_FIRST:
        k32 = tl.where(v != v, -2147483648, k32)
    else:
        k32 = tl.where(v != v, 2147483647, k32)
    return (k32.to(tl.int64) << 32) | col.to(tl.int64)


# Bitonic sorting networks along the rows of a [R, N] tile (N a power of two), on the tile reshaped
# to a [2, 2, ..., 2] hypercube as in triton.language.standard's sort, whose compare-and-swap finds
# each element's partner with an xor-sum. Here the partner comes from a plain sum over the pair
# (one term masked to zero: exact for int64 keys): the same network, but a reduction that Triton's
# interpreter runs natively instead of element by element in Python (tl.sort of a [16, 256] tile:
# 20 s there, against well under a second this way).

@triton.jit
def _swap_pairs(x, flip, i: tl.constexpr):
    """One compare-and-swap stage along the i-th innermost axis of hypercube x."""
    n_dims: tl.constexpr = _log2(x.numel)
    axis: tl.constexpr = n_dims - 1 - i
    is_right = _indicator(n_dims, i)
    left = tl.sum(tl.where(is_right == 0, x, 0), axis=axis, keep_dims=True)
    right = tl.sum(tl.where(is_right == 1, x, 0), axis=axis, keep_dims=True)
    partner = tl.where(is_right == 1, left, right)
    return tl.where((x > partner) != (flip ^ is_right).to(tl.int1), partner, x)


@triton.jit
def _merge_stage(h, stage: tl.constexpr, order: tl.constexpr):
    """Bitonic merge of runs of 2^stage: ascending (order 0), descending (1) or alternating (2)."""
    if order == 2:
        flip = _indicator(_log2(h.numel), stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _swap_pairs(h, flip, stage - 1 - i)
    return h


@triton.jit
def _smallest_per_row(x, K: tl.constexpr, DESCENDING: tl.constexpr):
    """The K smallest entries of each row of x [R, N] (K <= N, powers of two), sorted (descending
    with DESCENDING): sort runs of K, then halve by elementwise minima of adjacent runs (one
    ascending, one descending: a bitonic sequence with the K smallest of both) and merge again."""
    log_n: tl.constexpr = _log2(x.shape[1])
    log_k: tl.constexpr = _log2(K)
    h = tl.reshape(x, [2] * _log2(x.numel))
    for i in tl.static_range(1, log_k + 1):
        h = _merge_stage(h, i, 2 if i < log_n else DESCENDING)
    for i in tl.static_range(log_k + 1, log_n + 1):
        h = tl.min(h, axis=_log2(h.numel) - 1 - log_k)
        h = _merge_stage(h, log_k, 2 if i < log_n else DESCENDING)
    return tl.reshape(h, [x.shape[0], K])


@triton.jit
def _sort_bitonic_rows(x):
    """Each row of x [R, N], a bitonic sequence, sorted ascending (one merge)."""
    h = tl.reshape(x, [2] * _log2(x.numel))
    h = _merge_stage(h, _log2(x.shape[1]), 0)
    return tl.reshape(h, x.shape)


@triton.jit
def _topk_kernel(
        xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam_ptr,
        x_ptr, mu_ptr, lc_ptr, beta_ptr, out_ptr,
        B, C, D, eps_hi, eps_lo, tau, tiles_per_split,
        LARGEST: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr,
        BLOCK_K: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr, FULL: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_KN: tl.constexpr, BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr):
    """out[split, b, :] = the KP best keys of row b over the split's classes, ascending.

    Parameters (`forward` passes them by keyword):
      xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_*_ptr, smu_*_ptr, lam_ptr   as in logits._logits_fwd_kernel
      x_ptr, mu_ptr, lc_ptr, beta_ptr      the raw rows, metric factor and 1-form (near-pair recompute)
      out_ptr [splits, B, KP] int64        out: the keys (_order_keys)
      B, C, D; eps_hi + eps_lo = eps; tau  sizes; the epsilon; the near threshold
      tiles_per_split                      class tiles per split (grid axis 1)
      LARGEST                              the k largest distances rather than the k smallest
      BLOCK_B, BLOCK_C, BLOCK_K            tile rows, columns (>= KP) and the GEMM's K step (_blocks)
      KP                                   keys kept per row: a power of two >= k
      IMPL, PREC, FULL                     the GEMM's mode; full Lc
      BLOCK_P, BLOCK_KN, BLOCK_J, USE_DOT  the near-pair recompute's blocks (configs.NEAR_TILES)
    grid = (row blocks, class splits)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_t = xn_ptr.dtype.element_ty
    b0 = pid_b * BLOCK_B
    lb = tl.arange(0, BLOCK_B)
    lcol = tl.arange(0, BLOCK_C)
    bm = lb < B - b0
    xn = tl.load(xn_ptr + b0 + lb, mask=bm, other=0.0)
    sxh = tl.load(sx_hi_ptr + b0 + lb, mask=bm, other=0.0)
    sxl = tl.load(sx_lo_ptr + b0 + lb, mask=bm, other=0.0)
    lam = tl.load(lam_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    flat = lb[:, None] * BLOCK_C + lcol[None, :]
    lp = tl.arange(0, BLOCK_P)
    best = tl.full((BLOCK_B, KP), _INT64_MAX, dtype=tl.int64)

    n_tiles = tl.cdiv(C, BLOCK_C)
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, n_tiles)
    for t in range(t_begin, t_end):
        c0 = t * BLOCK_C
        cm = lcol < C - c0
        dot = _tile_dot(xp_ptr + b0.to(tl.int64) * D, mup_ptr + c0.to(tl.int64) * D, lb, lcol, bm, cm, D,
                        tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_t), BLOCK_K, IMPL, PREC)
        q, near = _gemm_q(dot, xn, tl.load(mn_ptr + c0 + lcol, mask=cm, other=0.0), tau)
        smh = tl.load(smu_hi_ptr + c0 + lcol, mask=cm, other=0.0)
        s = _pair_s(sxh, sxl, smh, tl.load(smu_lo_ptr + c0 + lcol, mask=cm, other=0.0))
        near = near | _s_is_near(s, sxh, smh)
        _a, _r, d, _ia, _ir = _pair_distance(q, s, lam, eps)

        # Near pairs: their exact distance (from the raw difference) replaces the expansion's
        # before the tile is ranked, BLOCK_P pairs per call of the near-pair recompute (typically zero or
        # one per row: a sample's own prototype).
        near = near & bm[:, None] & cm[None, :]
        n_near = tl.sum(near.to(tl.int32))
        for start in range(0, n_near, BLOCK_P):
            n_here = tl.minimum(n_near - start, BLOCK_P)
            picked, near = _take_near(near, flat, n_here, BLOCK_P, BLOCK_B * BLOCK_C)
            pm = picked < BLOCK_B * BLOCK_C
            pb = (b0 + picked // BLOCK_C).to(tl.int64)
            pc = (c0 + picked % BLOCK_C).to(tl.int64)
            qd, _kept, s_near = _recompute_near_pairs(x_ptr, mu_ptr, lc_ptr, beta_ptr, pb, pc, pm, -1, D, FULL, BLOCK_P,
                                                BLOCK_KN, BLOCK_J, USE_DOT)
            sd = ((tl.load(sx_hi_ptr + pb, mask=pm, other=0.0) - tl.load(smu_hi_ptr + pc, mask=pm, other=0.0))
                  + (tl.load(sx_lo_ptr + pb, mask=pm, other=0.0) - tl.load(smu_lo_ptr + pc, mask=pm, other=0.0)))
            _a2, _r2, dd, _ia2, _ir2, _s2 = _near_pair_distance(qd, s_near, sd, lam, eps)
            for it in range(0, n_here):
                f = tl.sum(tl.where(lp == it, picked, 0))
                d = tl.where(flat == f, tl.sum(tl.where(lp == it, dd, 0.0)), d)

        if LARGEST:
            keys = _order_keys(-d, c0 + lcol[None, :], True)
        else:
            keys = _order_keys(d, c0 + lcol[None, :], False)
        keys = tl.where(cm[None, :], keys, _INT64_MAX)
        # The tile's KP best, descending, against the running best, ascending: their elementwise
        # minimum is a bitonic sequence holding the KP best of both; one merge sorts it again.
        best = _sort_bitonic_rows(tl.minimum(best, _smallest_per_row(keys, KP, 1)))

    rows = (b0 + lb).to(tl.int64)
    out = out_ptr + (pid_s.to(tl.int64) * B + rows)[:, None] * KP + tl.arange(0, KP)[None, :]
    tl.store(out, best, mask=bm[:, None])


def _blocks(precision_mode: str, KP: int):
    """(BLOCK_B, BLOCK_C, BLOCK_K, num_warps) for KP kept keys per row. The tile is at least KP
    wide; the running best and the tile's keys ([BLOCK_B, KP] int64 each) live in registers, so the
    rows per program shrink as KP grows."""
    if precision_mode == interpreter.MODE:
        return interpreter.topk_blocks(KP)
    BLOCK_C = max(64, KP)
    BLOCK_B = max(16, min(64, 4096 // BLOCK_C))
    # 8 warps: with 4, the 64x64 tiles spilled 120 B (fp32) and 200 B (bf16, KP = 64) per thread
    # in sm_90 builds; with 8, 0 and 16 B. K steps of 16 from KP = 256 (16x256 tiles): with 32,
    # float32 spilled 72-80 B there, with 16 at most 48 B.
    return BLOCK_B, BLOCK_C, (16 if precision_mode == "fp64" or KP >= 256 else 32), 8


def decode(keys: torch.Tensor, largest: bool):
    """(values float32, indices int64) of int64 keys made by _order_keys."""
    k32 = (keys >> 32).to(torch.int32)
    bits = torch.where(k32 >= 0, k32, k32 ^ 0x7FFFFFFF)
    v = bits.view(torch.float32)
    return (-v if largest else v), keys & 0xFFFFFFFF


def forward(x, mu, lc, beta, lam, eps: float, tau: float, k: int, largest: bool):
    """(distances [B, k] float32, indices int64 [B, k]): the randers_topk op of the contract."""
    if not supports(k, x.dtype, mu.shape[0]):
        raise ValueError(f"the Triton top-k serves k <= {MAX_K}, float16/bfloat16/float32 inputs and C < 2^31; got "
                         f"k = {k}, {x.dtype}, C = {mu.shape[0]}")
    o = common.Operands(x, mu, lc, beta, lam, lam, eps, tau)
    B, C = o.B, o.C
    if not 0 <= k <= C:
        raise ValueError(f"k must be in [0, C] = [0, {C}], got {k}")
    if B == 0 or k == 0:
        return (common._empty((B, k), o.acc, o.device), torch.empty((B, k), dtype=torch.int64, device=o.device))
    KP = max(8, triton.next_power_of_2(k))
    BLOCK_B, BLOCK_C, BLOCK_K, warps = _blocks(o.precision_mode, KP)
    n_b, n_tiles = triton.cdiv(B, BLOCK_B), triton.cdiv(C, BLOCK_C)
    splits = SPLITS if SPLITS is not None else max(1, triton.cdiv(2 * common.parallel_width(o.device), n_b))
    splits = max(1, min(splits, n_tiles))
    per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per_split)
    keys = common._empty((splits, B, KP), torch.int64, o.device)
    BLOCK_P, BLOCK_KN, BLOCK_J, use_dot = o.near_tiles()
    with common.device_ctx(o.device):
        _topk_kernel[(n_b, splits)](
            xp_ptr=o.xp, mup_ptr=o.mup, xn_ptr=o.xn, mn_ptr=o.mn, sx_hi_ptr=o.sx[0], sx_lo_ptr=o.sx[1],
            smu_hi_ptr=o.smu[0], smu_lo_ptr=o.smu[1], lam_ptr=o.lam, x_ptr=o.x, mu_ptr=o.mu, lc_ptr=o.lc,
            beta_ptr=o.beta, out_ptr=keys, B=B, C=C, D=o.D, eps_hi=o.eps_hi, eps_lo=o.eps_lo, tau=o.tau,
            tiles_per_split=per_split, LARGEST=bool(largest), BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, KP=KP,
            BLOCK_K=BLOCK_K, IMPL=o.impl, PREC=o.prec, FULL=o.full, BLOCK_P=BLOCK_P, BLOCK_KN=BLOCK_KN, BLOCK_J=BLOCK_J,
            USE_DOT=use_dot, num_warps=warps)
    # Keys are unique (the index is part of each), so this order is the contract's; only the first
    # k are real classes (C >= k, and padding keys are the largest).
    merged = keys.permute(1, 0, 2).reshape(B, splits * KP).sort(dim=1).values[:, :k]
    dist, index = decode(merged, largest)
    return dist.to(o.acc), index
