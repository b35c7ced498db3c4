"""Triton kernels for the fused logits op K(x', mu', sx, smu, λ, γ, eps) -> −γ·d (SPEC §2), for
CUDA tensors, and for CPU tensors through Triton's interpreter (TRITON_INTERPRET=1 set before
triton is imported). Kernels first, then the launchers, then the torch.library ops.

Forward, four launches:
  _side_prep_kernel      per side: |x'_b|² (|mu'_c|²) from the GEMM operands as the GEMM sees
                         them, and sx (smu) split into fp32 hi + lo parts.
  _logits_fwd_kernel     tiles of x'·mu'ᵀ (tl.dot over D, grouped launch order) with the epilogue
                         fused: q = |x'|² + |mu'|² − 2x'·mu', the at-risk test of SPEC §2.1, s, d,
                         −γ·d, written once. Pairs at risk go to a short list (atomic counter).
  _logits_fixup_kernel   recomputes the listed pairs from the raw difference (x_b − mu_c)·Lc and
                         overwrites them; if the list overflowed (more pairs at risk than its
                         capacity), it recomputes every pair that way instead: slow, exact.
Backward: one kernel run twice, once per side (x' and mu' swap roles; s and the raw difference
change sign with them). A program owns a block of rows of its side ("own") and a chunk of D,
walks the other side ("oth") tile by tile and recomputes q, s, P = H/a and R = H·λ·s/r, with
H = −γ·G, from x', mu', sx, smu: nothing of size [B, C] is stored besides the incoming G.
    ∂own'_i = rowsum(P)_i·own'_i − (P·oth')_i      (far pairs: one tl.dot per tile)
            + Σ_j P_ij·((own_i − oth_j)·Lc)         (pairs at risk: from the raw difference)
    ∂s_own  = rowsum(R);   ∂λ = Σ H·r,  ∂γ = −Σ G·d  (x side only)
Pairs at risk are handled inside the program, one at a time in a fixed order, so every sum runs
in the same order on every call: the results are deterministic (no float atomics). Where the
other side is long and the own side short, it is split across programs whose partial sums are
added in a fixed order afterwards.

GEMM operand precision (see `_gemm_mode`): float32 runs tl.dot in IEEE fp32 unless
torch.backends.cuda.matmul.allow_tf32 is True (the switch PyTorch's own matmuls obey, set by
torch.set_float32_matmul_precision("high")); then x', mu' are rounded to TF32 first, so that the
norms see the same values as the tensor cores, and tau is raised for that rounding (about 1e-3
relative instead of 1e-4, like any TF32 matmul). float16/bfloat16 operands (the dispatch layer
passes x', mu' in the input's half type) run tl.dot in that type with fp32 accumulation, tau
raised likewise. float64 runs as broadcast-multiply-sum: correct everywhere, not fast.
"""
import functools
import math
import os

import torch
import triton
import triton.language as tl

from .. import transform as _transform
from .randers_logits import register_logits_op_pair

# Read when this module is imported, like Triton itself reads it when the kernels are decorated.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# FAIM_TRITON_AUTOTUNE=0 pins the first config of each list (quick start, e.g. for test runs).
_AUTOTUNE = os.environ.get("FAIM_TRITON_AUTOTUNE", "1") != "0" and not _INTERPRET

# How the GEMM tiles are multiplied (constexpr IMPL).
_DOT = 0         # tl.dot on the operands as stored: fp32 (IEEE or TF32), fp16, bf16
_DOT_UPCAST = 1  # tl.dot on fp32 copies: bf16 under the interpreter, whose bf16 dot is wrong
_FMA = 2         # broadcast-multiply-sum: float64

# Capacity of the forward's list of pairs at risk; None: max(1024, 2·(B + C)).
_NEAR_CAPACITY = None


# ----------------------------------------------------------------------------------------------
# Shared @triton.jit pieces (the fused cross-entropy kernels use them too)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, acc, IMPL: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype (fp32, or fp64 for IMPL == _FMA)."""
    if IMPL == 2:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif IMPL == 1:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_dot(a_ptr, b_ptr, ra, rb, a_mask, b_mask, D, acc,
              BLOCK_K: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr):
    """acc + A[ra, :]·B[rb, :]ᵀ for row-major A, B with D columns: the GEMM of SPEC §2.
    (The product is spelled out rather than calling _mm: the interpreter pays per call.)"""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ra[:, None] * D + rk[None, :]
    b_ptrs = b_ptr + rb[None, :] * D + rk[:, None]
    for k0 in range(0, D, BLOCK_K):
        a = tl.load(a_ptrs, mask=a_mask[:, None] & (rk[None, :] < D - k0), other=0.0)
        b = tl.load(b_ptrs, mask=b_mask[None, :] & (rk[:, None] < D - k0), other=0.0)
        if IMPL == 2:
            acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
        elif IMPL == 1:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif a.dtype == tl.float32:
            acc = tl.dot(a, b, acc, input_precision=PREC)
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _gemm_q(dot, n_row, n_col, tau):
    """q = |x'|² + |mu'|² − 2x'·mu' and the at-risk mask q < tau·(|x'|² + |mu'|²) (SPEC §2.1).
    NaN compares false, so a NaN pair is never 'near' and stays NaN."""
    norms = n_row[:, None] + n_col[None, :]
    q = norms - 2.0 * dot
    return q, q < tau * norms


@triton.jit
def _pair_distance(q, s, lam, eps):
    """(a, r, d, 1/a, 1/r) with a = sqrt(q + eps), r = sqrt(s² + eps), d = a + λ·r (SPEC Eq. 2).
    q < 0 (rounding) counts as 0; NaN stays NaN; a = 0 (or r = 0) where eps = 0 at a hit.
    Two reciprocal square roots serve both the forward and the backward (P = H/a, R = H·λ·s/r):
    the special-function unit is the epilogue's bottleneck next to a tensor-core GEMM."""
    qe = tl.where(q < 0, 0.0, q) + eps
    se = s * s + eps
    ia = tl.rsqrt(qe)
    ir = tl.rsqrt(se)
    a = tl.where(qe == 0, 0.0, qe * ia)
    r = tl.where(se == 0, 0.0, se * ir)
    return a, r, a + lam * r, ia, ir


@triton.jit
def _pair_s(s_row_hi, s_row_lo, s_col_hi, s_col_lo):
    """s = sx_b − smu_c from float64 sx, smu split into fp32 hi + lo parts: the hi difference is
    exact when they are close (Sterbenz), so s keeps its relative accuracy without fp64 math per
    pair (SPEC §2.1). For float64 kernels lo is zero and hi is the float64 value."""
    return (s_row_hi[:, None] - s_col_hi[None, :]) + (s_row_lo[:, None] - s_col_lo[None, :])


@triton.jit
def _direct_pairs(x_ptr, mu_ptr, lc_ptr, b, c, pmask, j_keep, D,
                  FULL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr):
    """Exact q for a block of pairs (b_p, c_p), from the raw rows x, mu [*, D] (row-major) and
    Lc ([D], or row-major [D, D]): q_p = |diff'_p|², diff' = (x[b_p] − mu[c_p])·Lc.
    x_b − mu_c is nearly exact when the pair is close, which is when the GEMM expansion is not
    (SPEC §2.1). O(D) per pair for a diagonal Lc, O(D²) for a full one.

    Returns (q [BLOCK_P], diff'[:, j_keep : j_keep + BLOCK_J]); j_keep must be a multiple of
    BLOCK_J (or negative when the chunk is not wanted)."""
    q = tl.zeros((BLOCK_P,), dtype=x_ptr.dtype.element_ty)
    kept = tl.zeros((BLOCK_P, BLOCK_J), dtype=x_ptr.dtype.element_ty)
    rk = tl.arange(0, BLOCK_K)
    for j0 in range(0, D, BLOCK_J):
        rj = j0 + tl.arange(0, BLOCK_J)
        jm = rj < D
        if FULL:
            dp = tl.zeros((BLOCK_P, BLOCK_J), dtype=x_ptr.dtype.element_ty)
            for k0 in range(0, D, BLOCK_K):
                km = rk < D - k0
                m = pmask[:, None] & km[None, :]
                xv = tl.load(x_ptr + b[:, None] * D + (k0 + rk)[None, :], mask=m, other=0.0)
                mv = tl.load(mu_ptr + c[:, None] * D + (k0 + rk)[None, :], mask=m, other=0.0)
                lt = tl.load(lc_ptr + (k0 + rk)[:, None] * D + rj[None, :], mask=km[:, None] & jm[None, :],
                             other=0.0)
                if USE_DOT:
                    dp = tl.dot(xv - mv, lt, dp, input_precision="ieee")
                else:
                    dp += tl.sum((xv - mv)[:, :, None] * lt[None, :, :], axis=1)
        else:
            m = pmask[:, None] & jm[None, :]
            xv = tl.load(x_ptr + b[:, None] * D + rj[None, :], mask=m, other=0.0)
            mv = tl.load(mu_ptr + c[:, None] * D + rj[None, :], mask=m, other=0.0)
            dp = (xv - mv) * tl.load(lc_ptr + rj, mask=jm, other=0.0)[None, :]
        q += tl.sum(dp * dp, axis=1)
        kept = tl.where(j0 == j_keep, dp, kept)
    return q, kept


@triton.jit
def _cast(v, dtype: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """v.to(dtype) rounded to nearest. Triton's interpreter truncates float32 -> bfloat16, so with
    BF16_BY_HAND (set only there) the rounding is done on the bits first; NaN passes unchanged."""
    if BF16_BY_HAND:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        v = tl.where(v == v, bits.to(tl.float32, bitcast=True), v)
    return v.to(dtype)


@triton.jit
def _load_eps(eps_hi, eps_lo, dtype: tl.constexpr):
    """eps travels as two fp32 halves (Triton passes Python floats as fp32); fp64 kernels add them."""
    return tl.cast(eps_hi, dtype) + tl.cast(eps_lo, dtype)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _side_prep_kernel(v_ptr, s_ptr, norm_ptr, hi_ptr, lo_ptr, n, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one side (x' with sx, or mu' with smu), in one launch: norm[i] = Σ_k v[i, k]² from v's
    values as stored (the GEMM's operands), and the float64 s[i] split into hi + lo in norm's
    dtype (see _pair_s; for float64, hi = s and lo = 0)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n
    acc = tl.zeros((BLOCK_R,), dtype=norm_ptr.dtype.element_ty)
    rd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        v = tl.load(v_ptr + r[:, None] * D + (d0 + rd)[None, :],
                    mask=rm[:, None] & (rd[None, :] < D - d0), other=0.0).to(acc.dtype)
        acc += tl.sum(v * v, axis=1)
    tl.store(norm_ptr + r, acc, mask=rm)
    s = tl.load(s_ptr + r, mask=rm, other=0.0)
    hi = s.to(acc.dtype)
    tl.store(hi_ptr + r, hi, mask=rm)
    tl.store(lo_ptr + r, (s - hi.to(tl.float64)).to(acc.dtype), mask=rm)


@triton.jit
def _logits_fwd_kernel(
        xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam_ptr, gamma_ptr,
        out_ptr, count_ptr, near_b_ptr, near_c_ptr,
        B, C, D, eps_hi, eps_lo, tau, capacity,
        KEY_B, KEY_C,  # power-of-two buckets of B and C: the autotuning key only
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_B: tl.constexpr,
        IMPL: tl.constexpr, PREC: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """One [BLOCK_B, BLOCK_C] tile of logits = −γ·d from one GEMM tile and the fused epilogue."""
    # Grouped launch order (Triton's matmul tutorial): GROUP_B row tiles sweep the column tiles
    # together, so each mu' tile is read from L2 rather than DRAM by the whole group.
    pid = tl.program_id(0)
    n_b = tl.cdiv(B, BLOCK_B)
    n_c = tl.cdiv(C, BLOCK_C)
    in_group = GROUP_B * n_c
    first_b = (pid // in_group) * GROUP_B
    size_b = tl.minimum(n_b - first_b, GROUP_B)
    pid_b = first_b + (pid % in_group) % size_b
    pid_c = (pid % in_group) // size_b

    acc_t = xn_ptr.dtype.element_ty
    rb = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    rc = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    bm = rb < B
    cm = rc < C
    dot = _tile_dot(xp_ptr, mup_ptr, rb, rc, bm, cm, D, tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_t),
                    BLOCK_K, IMPL, PREC)

    q, near = _gemm_q(dot, tl.load(xn_ptr + rb, mask=bm, other=0.0), tl.load(mn_ptr + rc, mask=cm, other=0.0), tau)
    s = _pair_s(tl.load(sx_hi_ptr + rb, mask=bm, other=0.0), tl.load(sx_lo_ptr + rb, mask=bm, other=0.0),
                tl.load(smu_hi_ptr + rc, mask=cm, other=0.0), tl.load(smu_lo_ptr + rc, mask=cm, other=0.0))
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    a, r, d, _, _ = _pair_distance(q, s, lam, _load_eps(eps_hi, eps_lo, acc_t))
    mask = bm[:, None] & cm[None, :]
    tl.store(out_ptr + rb[:, None] * C + rc[None, :], _cast(-gamma * d, out_ptr.dtype.element_ty, BF16_BY_HAND),
             mask=mask)

    # Pairs at risk: append (b, c) to the list; typically about one per row (a sample's target).
    near = near & mask
    if tl.sum(near.to(tl.int32)) > 0:
        slot = tl.atomic_add(count_ptr + tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int32), 1, mask=near, sem="relaxed")
        keep = near & (slot < capacity)
        tl.store(near_b_ptr + slot, tl.broadcast_to(rb[:, None], (BLOCK_B, BLOCK_C)).to(tl.int32), mask=keep)
        tl.store(near_c_ptr + slot, tl.broadcast_to(rc[None, :], (BLOCK_B, BLOCK_C)).to(tl.int32), mask=keep)


@triton.jit
def _logits_fixup_kernel(
        x_ptr, mu_ptr, lc_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam_ptr, gamma_ptr, out_ptr,
        count_ptr, near_b_ptr, near_c_ptr,
        C, D, n_pairs, eps_hi, eps_lo, capacity,
        FULL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        USE_DOT: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """Overwrites the listed pairs with logits from the exact q; every pair if the list overflowed.
    A persistent grid: program p takes blocks p, p + P, p + 2P, ... of BLOCK_P pairs."""
    count = tl.load(count_ptr)
    listed = count <= capacity
    n_items = tl.where(listed, count, n_pairs)
    n_listed = tl.where(listed, count, 0)
    acc_t = x_ptr.dtype.element_ty
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    for start in range(tl.program_id(0) * BLOCK_P, n_items, tl.num_programs(0) * BLOCK_P):
        idx = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        pm = idx < n_items
        from_list = idx < n_listed
        lb = tl.load(near_b_ptr + idx, mask=from_list, other=0).to(tl.int64)
        lcol = tl.load(near_c_ptr + idx, mask=from_list, other=0).to(tl.int64)
        b = tl.where(from_list, lb, idx // C)
        c = tl.where(from_list, lcol, idx % C)
        q, _ = _direct_pairs(x_ptr, mu_ptr, lc_ptr, b, c, pm, -1, D, FULL, BLOCK_P, BLOCK_K, BLOCK_J, USE_DOT)
        s = ((tl.load(sx_hi_ptr + b, mask=pm, other=0.0) - tl.load(smu_hi_ptr + c, mask=pm, other=0.0))
             + (tl.load(sx_lo_ptr + b, mask=pm, other=0.0) - tl.load(smu_lo_ptr + c, mask=pm, other=0.0)))
        a, r, d, _, _ = _pair_distance(q, s, lam, eps)
        tl.store(out_ptr + b * C + c, _cast(-gamma * d, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=pm)


@triton.jit
def _logits_bwd_kernel(
        own_ptr, oth_ptr, own_n_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr,
        own_raw_ptr, oth_raw_ptr, lc_ptr, g_ptr, stride_g_own, stride_g_oth,
        lam_ptr, gamma_ptr, dp_ptr, ds_ptr, scal_ptr,
        n_own, n_oth, D, eps_hi, eps_lo, tau, oth_per_split,
        KEY_O, KEY_T,  # power-of-two buckets of n_own and n_oth: the autotuning key only
        BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        SINGLE_PASS: tl.constexpr, FULL: tl.constexpr, SCALARS: tl.constexpr,
        IMPL: tl.constexpr, PREC: tl.constexpr, NEAR_K: tl.constexpr,
        BF16_BY_HAND: tl.constexpr):
    """Partial ∂own'[rows, chunk of D] over one split of the other side (module docstring).

    grid = (row blocks of own, splits of oth, chunks of D). Writes dp[split, row, d] (acc dtype),
    ds[split, row] = Σ R (float64, chunk 0 only) and, with SCALARS, scal[split, row block] =
    (Σ H·r, −Σ G·d) (float64, chunk 0 only).
    SINGLE_PASS (all of D in one chunk): the own block is loaded once, and each oth tile once
    for both products (S = own·othᵀ and P·oth), as in flash attention's backward.
    """
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    acc_t = own_n_ptr.dtype.element_ty
    op_t = own_ptr.dtype.element_ty

    ro = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = ro < n_own
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    own_n = tl.load(own_n_ptr + ro, mask=om, other=0.0)
    s_own_hi = tl.load(s_own_hi_ptr + ro, mask=om, other=0.0)
    s_own_lo = tl.load(s_own_lo_ptr + ro, mask=om, other=0.0)
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    if SINGLE_PASS:
        own = tl.load(own_ptr + ro[:, None] * D + rd[None, :], mask=om[:, None] & dm[None, :], other=0.0)

    rowsum = tl.zeros((BLOCK_O,), dtype=acc_t)              # Σ_j P_ij over far pairs
    pm_acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=acc_t)      # Σ_j P_ij·oth'_j − near terms
    rsum = tl.zeros((BLOCK_O,), dtype=tl.float64)           # Σ_j R_ij
    hr = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j H_ij·r_ij
    gd = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j G_ij·d_ij
    flat = tl.arange(0, BLOCK_O)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    rloc = tl.arange(0, BLOCK_O)

    t_begin = pid_s * oth_per_split
    t_end = tl.minimum(t_begin + oth_per_split, n_oth)
    for t0 in range(t_begin, t_end, BLOCK_T):
        rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tm = rt < t_end
        if SINGLE_PASS:
            oth = tl.load(oth_ptr + rt[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
            S = _mm(own, tl.trans(oth), tl.zeros((BLOCK_O, BLOCK_T), dtype=acc_t), IMPL, PREC)
        else:
            S = _tile_dot(own_ptr, oth_ptr, ro, rt, om, tm, D, tl.zeros((BLOCK_O, BLOCK_T), dtype=acc_t),
                          BLOCK_K, IMPL, PREC)
            oth = tl.load(oth_ptr + rt[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        valid = om[:, None] & tm[None, :]
        q, near = _gemm_q(S, own_n, tl.load(oth_n_ptr + rt, mask=tm, other=0.0), tau)
        near = near & valid
        s = _pair_s(s_own_hi, s_own_lo, tl.load(s_oth_hi_ptr + rt, mask=tm, other=0.0),
                    tl.load(s_oth_lo_ptr + rt, mask=tm, other=0.0))
        a, r, d, ia, ir = _pair_distance(q, s, lam, eps)
        G = tl.load(g_ptr + ro[:, None] * stride_g_own + rt[None, :] * stride_g_oth, mask=valid, other=0.0).to(acc_t)
        H = -gamma * G
        # a = 0 only at an exact hit with eps = 0: subgradient 0 there (as the C++ kernel).
        P = tl.where(valid & (a != 0), H * ia, 0.0)
        R = tl.where(valid & (r != 0), H * lam * s * ir, 0.0)
        P_far = tl.where(near, 0.0, P)
        rowsum += tl.sum(P_far, axis=1)
        pm_acc = _mm(_cast(P_far, op_t, BF16_BY_HAND), oth, pm_acc, IMPL, PREC)
        rsum += tl.sum(R, axis=1).to(tl.float64)
        if SCALARS:
            hr += tl.sum(tl.where(valid, H * r, 0.0), axis=1).to(tl.float64)
            gd += tl.sum(tl.where(valid & (near == 0), G * d, 0.0), axis=1).to(tl.float64)

        # Pairs at risk, one at a time in increasing tile position: P from the exact q, and the
        # term P·diff' from the raw difference instead of rowsum(P)·own' − P·oth', which cancels.
        for _ in range(0, tl.sum(near.to(tl.int32))):
            f = tl.min(tl.where(near, flat, BLOCK_O * BLOCK_T))
            near = near & (flat != f)
            hit = flat == f
            i = f // BLOCK_T
            bi = tl.zeros((1,), dtype=tl.int64) + pid_o.to(tl.int64) * BLOCK_O + i
            cj = tl.zeros((1,), dtype=tl.int64) + t0 + f % BLOCK_T
            one = tl.full((1,), 1, dtype=tl.int1)
            g_f = tl.sum(tl.where(hit, G, 0.0))
            lamr_f = tl.sum(tl.where(hit, lam * r, 0.0))
            q_e, diff = _direct_pairs(own_raw_ptr, oth_raw_ptr, lc_ptr, bi, cj, one, pid_d * BLOCK_D, D,
                                      FULL, 1, NEAR_K, BLOCK_D, False)
            qe = q_e + eps
            p_e = tl.where(qe == 0, 0.0, -gamma * g_f * tl.rsqrt(qe))
            a_e = tl.where(qe == 0, 0.0, tl.sqrt(qe))
            pm_acc -= tl.where(rloc[:, None] == i, p_e[:, None] * diff.to(acc_t), 0.0)
            if SCALARS:
                gd += tl.where(rloc == i, tl.sum(g_f * (a_e + lamr_f)), 0.0).to(tl.float64)

    if not SINGLE_PASS:
        own = tl.load(own_ptr + ro[:, None] * D + rd[None, :], mask=om[:, None] & dm[None, :], other=0.0)
    d_own = rowsum[:, None] * own.to(acc_t) - pm_acc
    out_rows = pid_s.to(tl.int64) * n_own + ro
    tl.store(dp_ptr + out_rows[:, None] * D + rd[None, :], d_own, mask=om[:, None] & dm[None, :])
    if pid_d == 0:
        tl.store(ds_ptr + out_rows, rsum, mask=om)
        if SCALARS:
            slot = (pid_s.to(tl.int64) * tl.num_programs(0) + pid_o) * 2
            tl.store(scal_ptr + slot, tl.sum(hr))
            tl.store(scal_ptr + slot + 1, -tl.sum(gd))


# ----------------------------------------------------------------------------------------------
# Configurations
# ----------------------------------------------------------------------------------------------

def _fwd_cfg(bb, bc, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_B": bb, "BLOCK_C": bc, "BLOCK_K": bk, "GROUP_B": group},
                         num_warps=warps, num_stages=stages)


def _bwd_cfg(bo, bt, bk, warps, stages):
    return triton.Config({"BLOCK_O": bo, "BLOCK_T": bt, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


# First entry = the pinned default (FAIM_TRITON_AUTOTUNE=0). Hopper-sized GEMM tiles for the
# tensor-core dtypes (128x256x64 with 8 warps and 3 stages is the matmul tutorial's best fp16
# config on H100); IEEE fp32 runs on the FMA units, which favour smaller tiles.
_FWD_CONFIGS = {
    "half": [_fwd_cfg(128, 256, 64, 8, 3), _fwd_cfg(128, 128, 64, 8, 4), _fwd_cfg(128, 128, 64, 4, 4),
             _fwd_cfg(64, 256, 64, 4, 4), _fwd_cfg(256, 128, 64, 8, 3)],
    "tf32": [_fwd_cfg(128, 128, 32, 8, 3), _fwd_cfg(128, 256, 32, 8, 3), _fwd_cfg(128, 128, 32, 4, 4),
             _fwd_cfg(64, 128, 32, 4, 4)],
    "ieee": [_fwd_cfg(128, 128, 32, 8, 3), _fwd_cfg(128, 64, 32, 4, 3), _fwd_cfg(64, 128, 32, 4, 3),
             _fwd_cfg(64, 64, 32, 4, 4)],
    "fp64": [_fwd_cfg(32, 32, 8, 4, 1), _fwd_cfg(64, 32, 8, 4, 1)],
    "interpret": [_fwd_cfg(32, 32, 16, 4, 1, group=2)],
}
_BWD_CONFIGS = {
    "half": [_bwd_cfg(64, 64, 64, 8, 2), _bwd_cfg(64, 32, 64, 4, 2), _bwd_cfg(128, 64, 64, 8, 2),
             _bwd_cfg(64, 128, 64, 8, 2)],
    "tf32": [_bwd_cfg(64, 64, 32, 8, 2), _bwd_cfg(64, 32, 32, 4, 2), _bwd_cfg(128, 64, 32, 8, 2)],
    "ieee": [_bwd_cfg(64, 64, 32, 8, 2), _bwd_cfg(64, 32, 32, 4, 2), _bwd_cfg(32, 64, 32, 4, 2)],
    "fp64": [_bwd_cfg(16, 16, 16, 4, 1)],
    "interpret": [_bwd_cfg(16, 32, 32, 4, 1)],
}
# Widest chunk of D a backward program accumulates (its [BLOCK_O, BLOCK_D] accumulator lives in
# registers); wider D is split across programs, each recomputing the GEMM tile.
_BWD_BLOCK_D = {"half": 256, "tf32": 256, "ieee": 256, "fp64": 32, "interpret": 256}


def _tuned(kernel, configs, key, reset=None):
    configs = configs if _AUTOTUNE else configs[:1]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(kernel)


_FWD = {name: _tuned(_logits_fwd_kernel, cfgs, ["KEY_B", "KEY_C", "D"], reset=["count_ptr"])
        for name, cfgs in _FWD_CONFIGS.items()}
_BWD = {name: _tuned(_logits_bwd_kernel, cfgs, ["KEY_O", "KEY_T", "D"]) for name, cfgs in _BWD_CONFIGS.items()}


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device):
    """Allocation of outputs the kernels must fill completely (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _parallel_width(device: torch.device) -> int:
    """Programs that fill the device: twice the multiprocessors on CUDA; a few under the
    interpreter (which runs programs one after another)."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


def _gemm_mode(xp: torch.Tensor):
    """(config family, IMPL, PREC, operand unit round-off or None) for GEMM operands of xp's dtype."""
    if xp.dtype == torch.float64:
        return "fp64", _FMA, "ieee", None
    if xp.dtype in (torch.float16, torch.bfloat16):
        impl = _DOT_UPCAST if (_INTERPRET and xp.dtype == torch.bfloat16) else _DOT
        return "half", impl, "ieee", torch.finfo(xp.dtype).eps / 2
    if xp.dtype != torch.float32:
        raise TypeError(f"the Triton logits kernels take float16, bfloat16, float32 or float64 x', got {xp.dtype}")
    if torch.backends.cuda.matmul.allow_tf32:
        return "tf32", _DOT, "tf32", 2.0 ** -11
    return "ieee", _DOT, "ieee", None


def _round_to_tf32(v: torch.Tensor) -> torch.Tensor:
    """v rounded to the nearest TF32 value (10-bit mantissa), so that the tensor cores' own
    conversion is exact and the norms see the same values; non-finite entries unchanged."""
    bits = v.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(v), rounded, v)


class _Prepared:
    """What the forward and backward launchers share: operands, norms, tau, the launch family."""

    def __init__(self, xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau):
        device = xp.device
        if device.type != "cuda" and not _INTERPRET:
            raise RuntimeError("the Triton logits kernels run on CUDA tensors, or on CPU tensors through Triton's "
                               "interpreter when TRITON_INTERPRET=1 is set before triton is imported; got tensors "
                               f"on {device}")
        for name, t in (("mup", mup), ("sx", sx), ("smu", smu), ("x", x), ("mu", mu), ("lc", lc), ("lam", lam),
                        ("gamma", gamma)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but xp is on {device}")
        self.device = device
        self.B, self.D = xp.shape
        self.C = mup.shape[0]
        self.family, self.impl, self.prec, operand_eps = _gemm_mode(xp)
        if _INTERPRET:
            self.family = "interpret"
        acc = torch.float64 if xp.dtype == torch.float64 else torch.float32
        self.acc = acc
        if self.prec == "tf32":
            xp, mup = _round_to_tf32(xp), _round_to_tf32(mup)
        self.xp, self.mup = xp.detach().contiguous(), mup.detach().contiguous()
        # The raw rows and the factor in the compute dtype (the transform's accuracy hints).
        self.x = x.detach().to(acc).contiguous()
        self.mu = mu.detach().to(acc).contiguous()
        self.lc = lc.detach().to(acc).contiguous()
        self.full = lc.dim() == 2
        self.bf16_by_hand = _INTERPRET and xp.dtype == torch.bfloat16

        self.lam = lam.detach().to(torch.float64).reshape(())
        self.gamma = gamma.detach().to(torch.float64).reshape(())
        # A kernel that rounds its operands below the compute precision must recompute more pairs.
        self.tau = max(float(tau), _transform.risk_threshold(self.D, acc, operand_eps)) if operand_eps else float(tau)
        self.eps_hi = float(torch.tensor(eps, dtype=torch.float32))
        self.eps_lo = float(eps) - self.eps_hi
        self.xn, self.sx = self._prep_side(self.xp, sx)
        self.mn, self.smu = self._prep_side(self.mup, smu)

    def _prep_side(self, v, s):
        """(|v_i|², (s_hi, s_lo)) in the compute dtype; see _side_prep_kernel."""
        n = v.shape[0]
        norm, hi, lo = (_empty((n,), self.acc, self.device) for _ in range(3))
        if n:
            BLOCK_R = 32
            _side_prep_kernel[(triton.cdiv(n, BLOCK_R),)](
                v, s.detach().to(torch.float64).contiguous(), norm, hi, lo, n, self.D,
                BLOCK_R=BLOCK_R, BLOCK_D=min(128, max(16, triton.next_power_of_2(self.D))))
        return norm, (hi, lo)

    def near_tiles(self):
        """Block sizes for the exact recomputation: (BLOCK_P, BLOCK_K, BLOCK_J, tl.dot usable)."""
        if self.family == "interpret":  # few, wide steps: the interpreter pays per operation
            return 16, 128, 64, self.acc == torch.float32
        if self.acc == torch.float64:
            return 16, 16, 32, False
        return 16, 32, 64, True


def _device_ctx(device):
    return torch.cuda.device(device) if device.type == "cuda" else _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def logits_forward(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps: float, tau: float) -> torch.Tensor:
    """logits [B, C] = −γ·d in xp's dtype (SPEC Eq. 3); see the module docstring."""
    B, C = xp.shape[0], mup.shape[0]
    out = _empty((B, C), xp.dtype, xp.device)
    if out.numel() == 0:
        return out
    p = _Prepared(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau)
    with _device_ctx(p.device):
        capacity = _NEAR_CAPACITY if _NEAR_CAPACITY is not None else max(1024, 2 * (B + C))
        count = torch.zeros(1, dtype=torch.int32, device=p.device)
        near_b = torch.empty(capacity, dtype=torch.int32, device=p.device)
        near_c = torch.empty(capacity, dtype=torch.int32, device=p.device)
        grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(C, meta["BLOCK_C"]),)  # noqa: E731
        _FWD[p.family][grid](
            p.xp, p.mup, p.xn, p.mn, *p.sx, *p.smu, p.lam, p.gamma, out, count, near_b, near_c,
            B, C, p.D, p.eps_hi, p.eps_lo, p.tau, capacity,
            triton.next_power_of_2(B), triton.next_power_of_2(C), IMPL=p.impl, PREC=p.prec,
            BF16_BY_HAND=p.bf16_by_hand)
        BLOCK_P, BLOCK_K, BLOCK_J, use_dot = p.near_tiles()
        n_prog = max(1, min(triton.cdiv(B * C, BLOCK_P), 2 * _parallel_width(p.device)))
        _logits_fixup_kernel[(n_prog,)](
            p.x, p.mu, p.lc, *p.sx, *p.smu, p.lam, p.gamma, out, count, near_b, near_c,
            C, p.D, B * C, p.eps_hi, p.eps_lo, capacity,
            FULL=p.full, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K, BLOCK_J=BLOCK_J, USE_DOT=use_dot,
            BF16_BY_HAND=p.bf16_by_hand)
    return out


def _backward_side(p, own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw, g, g_strides, scalars):
    """(∂own' [n_own, D] in acc dtype, ∂s_own [n_own] float64, scalar partials or None)."""
    n_own, n_oth, D = own.shape[0], oth.shape[0], p.D
    block_d = _BWD_BLOCK_D[p.family]
    if D <= block_d:
        block_d, single = max(16, triton.next_power_of_2(D)), True
    else:
        single = False
    n_chunks = triton.cdiv(D, block_d)
    # Split the other side when the own side alone would leave the device idle; each split's
    # partial sums are added afterwards in a fixed order.
    min_rows = 16
    programs = triton.cdiv(n_own, 64) * n_chunks
    splits = max(1, min(triton.cdiv(_parallel_width(p.device), programs), triton.cdiv(n_oth, 256)))
    if p.family == "interpret":
        splits = max(1, min(2, triton.cdiv(n_oth, 32)))
    per_split = triton.cdiv(triton.cdiv(n_oth, splits), 32) * 32
    splits = triton.cdiv(n_oth, per_split)
    dp = _empty((splits, n_own, D), p.acc, p.device)
    ds = _empty((splits, n_own), torch.float64, p.device)
    scal = torch.zeros((splits, triton.cdiv(n_own, min_rows), 2), dtype=torch.float64, device=p.device)
    _, near_k, _, _ = p.near_tiles()
    grid = lambda meta: (triton.cdiv(n_own, meta["BLOCK_O"]), splits, n_chunks)  # noqa: E731
    _BWD[p.family][grid](
        own, oth, own_n, oth_n, *s_own, *s_oth, own_raw, oth_raw, p.lc, g, g_strides[0], g_strides[1],
        p.lam, p.gamma, dp, ds, scal,
        n_own, n_oth, D, p.eps_hi, p.eps_lo, p.tau, per_split,
        triton.next_power_of_2(n_own), triton.next_power_of_2(n_oth),
        BLOCK_D=block_d, SINGLE_PASS=single, FULL=p.full, SCALARS=scalars, IMPL=p.impl, PREC=p.prec,
        NEAR_K=near_k, BF16_BY_HAND=p.bf16_by_hand)
    d_own = dp.view(n_own, D) if splits == 1 else dp.sum(0)
    ds_own = ds.view(n_own) if splits == 1 else ds.sum(0)
    scalar_sums = (scal[..., 0].sum(), scal[..., 1].sum()) if scalars else None
    return d_own, ds_own, scalar_sums


def logits_backward(grad, xp, mup, sx, smu, x, mu, lc, lam, gamma, eps: float, tau: float):
    """(∂x', ∂mu', ∂sx, ∂smu, ∂λ, ∂γ) for the incoming gradient grad = ∂loss/∂logits [B, C]."""
    B, D = xp.shape
    C = mup.shape[0]
    if B == 0 or C == 0:
        return (torch.zeros_like(xp), torch.zeros_like(mup), torch.zeros_like(sx), torch.zeros_like(smu),
                torch.zeros_like(lam), torch.zeros_like(gamma))
    if grad.shape != (B, C):
        raise ValueError(f"grad must have shape [B, C] = [{B}, {C}], got {tuple(grad.shape)}")
    p = _Prepared(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau)
    g = grad.detach()
    if g.device != p.device:
        raise ValueError(f"grad is on {g.device} but xp is on {p.device}")
    if g.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        g = g.to(xp.dtype)
    with _device_ctx(p.device):
        # Expanded gradients (stride 0, e.g. from out.sum()) are read in place through their strides.
        dxp, dsx, scal = _backward_side(p, p.xp, p.mup, p.xn, p.mn, p.sx, p.smu, p.x, p.mu, g,
                                        (g.stride(0), g.stride(1)), True)
        dmup, dsmu, _ = _backward_side(p, p.mup, p.xp, p.mn, p.xn, p.smu, p.sx, p.mu, p.x, g,
                                       (g.stride(1), g.stride(0)), False)
    return (dxp.to(xp.dtype), dmup.to(mup.dtype), dsx.to(sx.dtype), dsmu.to(smu.dtype),
            scal[0].to(lam.dtype), scal[1].to(gamma.dtype))


# ----------------------------------------------------------------------------------------------
# The ops (same contract as the C++ pair; see randers_logits.py)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("faim_kernels::randers_logits_fwd_triton", mutates_args=())
def randers_logits_fwd_triton(xp: torch.Tensor, mup: torch.Tensor, sx: torch.Tensor, smu: torch.Tensor,
                              x: torch.Tensor, mu: torch.Tensor, lc: torch.Tensor, lam: torch.Tensor,
                              gamma: torch.Tensor, eps: float, tau: float) -> torch.Tensor:
    return logits_forward(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau)


@torch.library.custom_op("faim_kernels::randers_logits_bwd_triton", mutates_args=())
def randers_logits_bwd_triton(grad: torch.Tensor, xp: torch.Tensor, mup: torch.Tensor, sx: torch.Tensor,
                              smu: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, lc: torch.Tensor,
                              lam: torch.Tensor, gamma: torch.Tensor, eps: float, tau: float
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                         torch.Tensor]:
    return logits_backward(grad, xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau)


register_logits_op_pair(randers_logits_fwd_triton, randers_logits_bwd_triton)


def triton_logits_op():
    """The forward op (its backward is registered with autograd)."""
    return randers_logits_fwd_triton
