"""What both Triton kernel families share: the @triton.jit pieces (GEMM tiles, the near-pair test,
the pair epilogue, the near-pair recompute from the raw difference, casts, eps), the side kernels
of the preparation and the chain rule, the GEMM precision mode, device helpers, and `Operands`:
the prepared operands of one op call.

GEMM operand precision (see `gemm_mode`), following PyTorch's own switch: float32 runs tl.dot in
IEEE fp32 where torch.get_float32_matmul_precision() is "highest" (PyTorch's default) and in TF32
where it is "high" or "medium" (or torch.backends.cuda.matmul.fp32_precision = "tf32"); then x', mu'
are rounded to TF32 first, so that the norms see the same values as the tensor cores, and tau is
raised for that rounding (about 1e-3 relative instead of 1e-4, like any TF32 matmul).
float16/bfloat16 x (both ops take them as they are) gives x', mu' in that type, and tl.dot
runs in it with fp32 accumulation, tau raised likewise. float64 runs as broadcast-multiply-sum:
correct everywhere, not fast.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from ... import transform
from . import configs, interpreter
from .interpreter import INTERPRET  # noqa: F401  (re-exported: the tests ask common.INTERPRET)

# How the GEMM tiles are multiplied (constexpr IMPL). tl.constexpr values, so that the kernels
# compare against the names (`IMPL == FMA`) and the launchers pass the same objects.
DOT = tl.constexpr(0)         # tl.dot on the operands as stored: fp32 (IEEE or TF32), fp16, bf16
DOT_UPCAST = tl.constexpr(1)  # tl.dot on fp32 copies: bf16 under the interpreter (interpreter.py, item 2)
FMA = tl.constexpr(2)         # broadcast-multiply-sum: float64


# ----------------------------------------------------------------------------------------------
# @triton.jit pieces
# ----------------------------------------------------------------------------------------------

@triton.jit
def _mm(a, b, acc, IMPL: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b, accumulated in acc's dtype (fp32, or fp64 for IMPL == FMA)."""
    if IMPL == FMA:
        return acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    elif IMPL == DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=PREC)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tile_dot(a_ptr, b_ptr, ra, rb, a_mask, b_mask, D, acc,
              BLOCK_K: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr):
    """acc + A[ra, :]·B[rb, :]ᵀ for row-major A, B with D columns: the GEMM of docs/design.md §2 (the algorithm)."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + ra[:, None] * D + rk[None, :]
    b_ptrs = b_ptr + rb[None, :] * D + rk[:, None]
    for k0 in range(0, D, BLOCK_K):
        a = tl.load(a_ptrs, mask=a_mask[:, None] & (rk[None, :] < D - k0), other=0.0)
        b = tl.load(b_ptrs, mask=b_mask[None, :] & (rk[:, None] < D - k0), other=0.0)
        acc = _mm(a, b, acc, IMPL, PREC)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit
def _q_is_near(q, norms, tau):
    """Whether a pair is a near pair by its q: the expansion q = norms − 2·dot cancels
    (q < tau·norms, docs/design.md §2.1 (near pairs)), is NaN (Inf − Inf from an infinite coordinate, or overflow), or its
    norms overflowed (float32 inputs near 1e19 and beyond). Near pairs are recomputed, which
    gives the limit (+Inf for an infinite coordinate) or the finite value; a NaN input stays NaN."""
    return (q < tau * norms) | (q != q) | (norms == float("inf"))


@triton.jit
def _s_is_near(s, s_row_hi, s_col_hi):
    """Whether s = sx − smu cancels: |s| far below |sx| + |smu| (a sample near its prototype along
    beta, both far from the origin), where the float64 difference keeps only ~u·(|sx| + |smu|)
    absolute. Such pairs are near pairs too: the recompute forms s from the difference (as the C++ kernels).
    2^-20: rare elsewhere."""
    return tl.abs(s) < 9.5367431640625e-07 * (tl.abs(s_row_hi)[:, None] + tl.abs(s_col_hi)[None, :])


@triton.jit
def _gemm_q(dot, n_row, n_col, tau):
    """q = |x'|² + |mu'|² − 2x'·mu' and the near-pair mask (_q_is_near)."""
    norms = n_row[:, None] + n_col[None, :]
    q = norms - 2.0 * dot
    return q, _q_is_near(q, norms, tau)


@triton.jit
def _rsqrt_no_flush(v):
    """1/sqrt(v) for v >= 0. On the GPU tl.rsqrt is rsqrt.approx.ftz (about 2^-22 relative, well
    inside float32's far-pair bound), which flushes a subnormal v to 0 and returns +inf: with eps = 0
    a finite pair with a subnormal q would get d = +inf. Values below 2^-100 are scaled by 2^100
    first and the result by 2^50 (exact powers of two), so no subnormal reaches it."""
    tiny = v < 7.888609052210118e-31  # 2^-100
    return tl.rsqrt(tl.where(tiny, v * 1.2676506002282294e30, v)) * tl.where(tiny, 1125899906842624.0, 1.0)


@triton.jit
def _pair_distance(q, s, lam, eps):
    """(a, r, d, 1/a, 1/r) with a = sqrt(q + eps), r = sqrt(s² + eps), d = a + λ·r (docs/design.md Eq. 2).
    q < 0 (rounding) counts as 0; NaN stays NaN; a = 0 (or r = 0) where eps = 0 at a hit.
    Two reciprocal square roots serve both the forward and the backward (P = H/a, R = H·λ·s/r):
    half the special-function operations of two square roots and two divisions, and those run
    at a small fraction of the tensor cores' rate."""
    qe = tl.where(q < 0, 0.0, q) + eps
    se = s * s + eps
    ia = _rsqrt_no_flush(qe)
    ir = _rsqrt_no_flush(se)
    a = tl.where(qe == 0, 0.0, qe * ia)
    r = tl.where(se == 0, 0.0, se * ir)
    return a, r, a + lam * r, ia, ir


@triton.jit
def _near_pair_distance(q64, s_near, s_gemm, lam, eps):
    """_pair_distance for q and s from _recompute_near_pairs (float64: q may exceed float32's range where the
    distance does not), returned in s_gemm's dtype (the compute dtype), with s. s is the direct one
    where q is finite (s_gemm = sx − smu where the difference is not: Inf or NaN), and exactly 0 at
    an exact hit (q = 0: x_b = mu_c in the metric), where sx − smu would leave ±1e-16 and, with
    eps = 0, the 1-form's gradient λ·beta·s/|s| would be ±λ·beta instead of the convention 0."""
    acc_t = s_gemm.dtype
    s64 = tl.where(tl.abs(q64) < float("inf"), s_near, s_gemm.to(tl.float64))
    s64 = tl.where(q64 == 0, 0.0, s64)
    s = s64.to(acc_t)
    eps64 = eps.to(tl.float64)
    qe = q64 + eps64
    a = tl.sqrt(qe)
    ia = tl.where(qe == 0, 0.0, 1.0 / a)
    se = s64 * s64 + eps64
    r = tl.sqrt(se)
    ir = tl.where(se == 0, 0.0, 1.0 / r)
    a_t = a.to(acc_t)
    r_t = r.to(acc_t)
    d = tl.where(lam == 0, a_t, a_t + lam * r_t)  # λ = 0 with an infinite s: 0·Inf is not NaN here
    return a_t, r_t, d, ia.to(acc_t), ir.to(acc_t), s


@triton.jit
def _pair_s(s_row_hi, s_row_lo, s_col_hi, s_col_lo):
    """s = sx_b − smu_c from float64 sx, smu split into fp32 hi + lo parts: the hi difference is
    exact when they are close (Sterbenz), so s keeps its relative accuracy without fp64 math per
    pair (docs/design.md §2.1, near pairs). For float64 kernels lo is zero and hi is the float64 value."""
    return (s_row_hi[:, None] - s_col_hi[None, :]) + (s_row_lo[:, None] - s_col_lo[None, :])


@triton.jit
def _take_near(near, flat, n_take, TAKE: tl.constexpr, NONE: tl.constexpr):
    """(picked, near): the n_take (<= TAKE) smallest flat tile positions flagged in `near`, in
    increasing order (NONE in the slots left over), and `near` without them. How every kernel walks a
    tile's near pairs a block at a time, in tile order (so sums over them keep a fixed order)."""
    slot = tl.arange(0, TAKE)
    picked = tl.full((TAKE,), NONE, dtype=tl.int32)
    for k in range(0, n_take):
        f = tl.min(tl.where(near, flat, NONE))
        near = near & (flat != f)
        picked = tl.where(slot == k, f, picked)
    return picked, near


@triton.jit
def _recompute_near_pairs(x_ptr, mu_ptr, lc_ptr, beta_ptr, b, c, pmask, j_keep, D,
                  FULL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_J: tl.constexpr, USE_DOT: tl.constexpr):
    """Exact q for a block of pairs (b_p, c_p), from the raw rows x, mu [*, D] (row-major) and
    Lc ([D], or row-major [D, D]): q_p = |diff'_p|², diff' = (x[b_p] − mu[c_p])·Lc.
    x_b − mu_c is nearly exact when the pair is close, which is when the GEMM expansion is not
    (docs/design.md §2.1, near pairs). O(D) per pair for a diagonal Lc, O(D²) for a full one.

    q is summed in float64 (float32 inputs near 1e30 have a finite distance whose square is not a
    float32). Non-finite differences take their limit: q is NaN if a coordinate of x_b − mu_c is NaN
    (a NaN input, or Inf − Inf), else +Inf if one is infinite (Sigma is positive definite; diff'
    itself would give Inf·0 = NaN).

    s = beta·(x[b_p] − mu[c_p]) is formed from the same difference, in float64: sx − smu loses
    |x|·|beta|·u against a small s when the prototypes lie far from the origin.

    Returns (q [BLOCK_P] float64, diff'[:, j_keep : j_keep + BLOCK_J], s [BLOCK_P] float64); j_keep
    must be a multiple of BLOCK_J (or negative when the chunk is not wanted)."""
    q = tl.zeros((BLOCK_P,), dtype=tl.float64)
    s = tl.zeros((BLOCK_P,), dtype=tl.float64)
    n_nan = tl.zeros((BLOCK_P,), dtype=tl.int32)
    n_inf = tl.zeros((BLOCK_P,), dtype=tl.int32)
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
                diff = xv - mv
                n_nan += tl.sum((diff != diff).to(tl.int32), axis=1)
                n_inf += tl.sum((tl.abs(diff) == float("inf")).to(tl.int32), axis=1)
                if j0 == 0:
                    bk = tl.load(beta_ptr + k0 + rk, mask=km, other=0.0).to(tl.float64)
                    s += tl.sum((xv.to(tl.float64) - mv.to(tl.float64)) * bk[None, :], axis=1)
                if USE_DOT:
                    dp = tl.dot(xv - mv, lt, dp, input_precision="ieee")
                else:
                    dp += tl.sum((xv - mv)[:, :, None] * lt[None, :, :], axis=1)
        else:
            m = pmask[:, None] & jm[None, :]
            xv = tl.load(x_ptr + b[:, None] * D + rj[None, :], mask=m, other=0.0)
            mv = tl.load(mu_ptr + c[:, None] * D + rj[None, :], mask=m, other=0.0)
            diff = xv - mv
            n_nan += tl.sum((diff != diff).to(tl.int32), axis=1)
            n_inf += tl.sum((tl.abs(diff) == float("inf")).to(tl.int32), axis=1)
            bj = tl.load(beta_ptr + rj, mask=jm, other=0.0).to(tl.float64)
            s += tl.sum((xv.to(tl.float64) - mv.to(tl.float64)) * bj[None, :], axis=1)
            dp = diff * tl.load(lc_ptr + rj, mask=jm, other=0.0)[None, :]
        dp64 = dp.to(tl.float64)
        q += tl.sum(dp64 * dp64, axis=1)
        kept = tl.where(j0 == j_keep, dp, kept)
    q = tl.where(n_inf > 0, float("inf"), q)
    q = tl.where(n_nan > 0, float("nan"), q)
    return q, kept, s


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
# Side kernels: O((B + C)·D) work per side, one launch each
# ----------------------------------------------------------------------------------------------

# The side kernels are O(n·D) and not specialised on sizes: one build per dtype and variant.
@triton.jit(do_not_specialize=["n", "D"])
def _side_prep_kernel(v_ptr, raw_ptr, beta_ptr, s_ptr, norm_ptr, hi_ptr, lo_ptr, n, D,
                      S_FROM_RAW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """For one side (x' with sx, or mu' with smu): norm[i] = Σ_k v[i, k]² from v's values as
    stored (the GEMM's operands), and the float64 s[i] split into hi + lo in norm's dtype (see
    _pair_s; for float64, hi = s and lo = 0). With S_FROM_RAW, s[i] = Σ_k raw[i, k]·beta[k] is
    formed here in float64 and written to s_ptr (no float64 copy of the side exists); else s is
    read from s_ptr (the forward's, saved for the backward).

    Parameters: v_ptr [n, D] the side's GEMM operand; raw_ptr [n, D] its raw rows and beta_ptr [D]
    (compute dtype); s_ptr [n] float64 (out with S_FROM_RAW, else in); norm_ptr, hi_ptr, lo_ptr [n]
    out (compute dtype); n, D sizes; BLOCK_R rows per program, BLOCK_D the step of D. grid = (row blocks,)."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < n
    acc = tl.zeros((BLOCK_R,), dtype=norm_ptr.dtype.element_ty)
    s = tl.zeros((BLOCK_R,), dtype=tl.float64)
    rd = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        m = rm[:, None] & (rd[None, :] < D - d0)
        v = tl.load(v_ptr + r[:, None] * D + (d0 + rd)[None, :], mask=m, other=0.0).to(acc.dtype)
        acc += tl.sum(v * v, axis=1)
        if S_FROM_RAW:
            raw = tl.load(raw_ptr + r[:, None] * D + (d0 + rd)[None, :], mask=m, other=0.0).to(tl.float64)
            beta = tl.load(beta_ptr + d0 + rd, mask=rd < D - d0, other=0.0).to(tl.float64)
            s += tl.sum(raw * beta[None, :], axis=1)
    tl.store(norm_ptr + r, acc, mask=rm)
    if S_FROM_RAW:
        tl.store(s_ptr + r, s, mask=rm)
    else:
        s = tl.load(s_ptr + r, mask=rm, other=0.0)
    hi = s.to(acc.dtype)
    tl.store(hi_ptr + r, hi, mask=rm)
    lo = tl.where(tl.abs(hi) < float("inf"), s - hi.to(tl.float64), 0.0)  # Inf − Inf would be NaN: lo = 0
    tl.store(lo_ptr + r, lo.to(acc.dtype), mask=rm)


@triton.heuristics({"DIAG": lambda a: a["dlc_ptr"] is not None})
@triton.jit(do_not_specialize=["n", "D", "rows_per_split"])
def _side_grad_kernel(raw_ptr, m_ptr, dvp_ptr, ds_ptr, dbeta_ptr, dlc_ptr, n, D, rows_per_split,
                      DIAG: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """The column sums of one side's chain rule, over one split of its rows, in float64:
    dbeta[split, k] = Σ_i ds_i·(raw_ik − m_k) and, with DIAG (diagonal Lc),
    dlc[split, k] = Σ_i (raw_ik − m_k)·dv'_ik. Centred: in exact arithmetic Σ dsx + Σ dsmu = 0,
    and centring keeps the x and mu halves of dbeta from cancelling where prototypes lie far from
    the origin. grid = (chunks of D, splits of the rows); the launcher adds the splits in order.

    Parameters: raw_ptr [n, D] the side's raw rows, m_ptr [D] the centre (compute dtype); dvp_ptr
    [n, D] ∂v' (DIAG only, else None); ds_ptr [n] ∂s; dbeta_ptr, dlc_ptr [splits, D] float64 out
    (dlc_ptr None: DIAG off, derived); n, D sizes; rows_per_split the rows of one split (grid axis
    1); BLOCK_R rows per step, BLOCK_D the chunk of D (grid axis 0)."""
    rd = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    m = tl.load(m_ptr + rd, mask=dm, other=0.0).to(tl.float64)
    r_begin = tl.program_id(1).to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, n)
    db = tl.zeros((BLOCK_D,), dtype=tl.float64)
    dl = tl.zeros((BLOCK_D,), dtype=tl.float64)
    for r0 in range(r_begin, r_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rm = r < r_end
        mk = rm[:, None] & dm[None, :]
        vc = tl.load(raw_ptr + r[:, None] * D + rd[None, :], mask=mk, other=0.0).to(tl.float64) - m[None, :]
        vc = tl.where(mk, vc, 0.0)
        ds = tl.load(ds_ptr + r, mask=rm, other=0.0).to(tl.float64)
        db += tl.sum(ds[:, None] * vc, axis=0)
        if DIAG:
            dv = tl.load(dvp_ptr + r[:, None] * D + rd[None, :], mask=mk, other=0.0).to(tl.float64)
            dl += tl.sum(vc * dv, axis=0)
    out = tl.program_id(1).to(tl.int64) * D + rd
    tl.store(dbeta_ptr + out, db, mask=dm)
    if DIAG:
        tl.store(dlc_ptr + out, dl, mask=dm)


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def _empty(shape, dtype, device):
    """Allocation of outputs the kernels must fill completely: every launcher allocates through
    this one hook (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def parallel_width(device: torch.device) -> int:
    """Programs that fill the device: twice the multiprocessors on CUDA; a few under the
    interpreter (interpreter.PARALLEL_WIDTH)."""
    if device.type == "cuda":
        return 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return interpreter.PARALLEL_WIDTH


def device_ctx(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def gemm_mode(op_dtype: torch.dtype):
    """(precision mode, IMPL, PREC, operand unit round-off or None) for GEMM operands of op_dtype.
    The precision mode names the config family of configs.py ("half", "tf32", "ieee", "fp64";
    the interpreter runs its own: interpreter.precision_mode)."""
    if op_dtype == torch.float64:
        return "fp64", FMA, "ieee", None
    if op_dtype in (torch.float16, torch.bfloat16):
        impl = DOT_UPCAST if interpreter.upcast_dot(op_dtype) else DOT
        return "half", impl, "ieee", torch.finfo(op_dtype).eps / 2
    if op_dtype != torch.float32:
        raise TypeError(f"the Triton kernels take float16, bfloat16, float32 or float64 inputs, got {op_dtype}")
    if _tf32_allowed():
        return "tf32", DOT, "tf32", 2.0 ** -11
    return "ieee", DOT, "ieee", None


def _tf32_allowed() -> bool:
    """PyTorch's own switch for TF32 in float32 matmuls: torch.get_float32_matmul_precision()
    "high" or "medium" (set_float32_matmul_precision), or the CUDA matmul backend's own setting
    (torch.backends.cuda.matmul.fp32_precision = "tf32", or the legacy allow_tf32 flag). "highest",
    PyTorch's default, keeps IEEE float32."""
    if torch.get_float32_matmul_precision() in ("high", "medium"):
        return True
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def _round_to_tf32(v: torch.Tensor) -> torch.Tensor:
    """v rounded to the nearest TF32 value (10-bit mantissa), so that the tensor cores' own
    conversion is exact and the norms see the same values; non-finite entries unchanged."""
    bits = v.contiguous().view(torch.int32)
    rounded = ((bits + 0x1000) & ~0x1FFF).view(torch.float32)
    return torch.where(torch.isfinite(v), rounded, v)


def _apply(v, lc):
    """v·Lc for Lc [D] (diagonal) or [D, D]."""
    return v * lc if lc.dim() == 1 else v @ lc


def _apply_t(v, lc):
    """v·Lcᵀ for Lc [D] (diagonal) or [D, D]."""
    return v * lc if lc.dim() == 1 else v @ lc.T


class Operands:
    """The prepared operands of one op call, formed once and shared by its kernels (docs/design.md §2, the algorithm):

        m          the centre (transform.center_of of mu in the compute dtype)
        x, mu      the raw rows in the compute dtype (the near-pair recompute's inputs), lc, beta likewise
        xp, mup    x' = (x − m)·Lc, mu' = (mu − m)·Lc as the GEMM takes them (TF32-rounded in
                   TF32 mode, in the half type for half inputs)
        xn, mn     |x'|², |mu'|² from those operands
        sx, smu    (hi, lo) parts of x·beta, mu·beta; sx64, smu64 the float64 values
        tau        the near-pair threshold, raised where the operands are rounded
        precision_mode, impl, prec   the config family of configs.py and the GEMM's mode (gemm_mode)

    `Operands(...)` prepares from the op's raw inputs (forwards, the cross-entropy backward);
    `Operands.saved(...)` takes x', mu', sx, smu as the logits forward returned them."""

    def __init__(self, x, mu, lc, beta, lam, gamma, eps: float, tau: float, _saved=None):
        device = x.device
        if not interpreter.runs_on(device):
            raise RuntimeError("the Triton kernels run on CUDA tensors, or on CPU tensors through Triton's "
                               "interpreter when TRITON_INTERPRET=1 is set before triton is imported; got tensors "
                               f"on {device}")
        for name, t in (("mu", mu), ("lc", lc), ("beta", beta), ("lam", lam), ("gamma", gamma)):
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but x is on {device}")
        self.device = device
        self.B, self.D = x.shape
        self.C = mu.shape[0]
        mode, self.impl, self.prec, operand_eps = gemm_mode(x.dtype)
        self.precision_mode = interpreter.precision_mode(mode)  # the config family (configs.py)
        self.acc = acc = transform.compute_dtype(x.dtype)
        self.x = x.detach().to(acc).contiguous()
        self.mu = mu.detach().to(acc).contiguous()
        self.lc = lc.detach().to(acc).contiguous()
        self.beta = beta.detach().to(acc).contiguous()
        self.full = lc.dim() == 2
        self.bf16_by_hand = interpreter.bf16_by_hand(x.dtype)
        self.lam = lam.detach().to(torch.float64).reshape(())
        self.gamma = gamma.detach().to(torch.float64).reshape(())
        # A kernel that rounds its operands below the compute precision must recompute more pairs.
        self.tau = (max(float(tau), transform.near_threshold(self.D, acc, operand_eps)) if operand_eps
                    else float(tau))
        self.eps_hi = float(torch.tensor(eps, dtype=torch.float32))
        self.eps_lo = float(eps) - self.eps_hi
        self.m = transform.center_of(self.mu).contiguous()
        if _saved is None:
            xp, mup = (self._operand(_apply(v - self.m, self.lc), x.dtype) for v in (self.x, self.mu))
            sx = smu = None
        else:
            xp, mup, sx, smu = _saved
        self.xp, self.mup = xp.detach().contiguous(), mup.detach().contiguous()
        self.xn, self.sx, self.sx64 = self._prep_side(self.xp, self.x, sx)
        self.mn, self.smu, self.smu64 = self._prep_side(self.mup, self.mu, smu)

    @classmethod
    def saved(cls, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps: float, tau: float):
        return cls(x, mu, lc, beta, lam, gamma, eps, tau, _saved=(xp, mup, sx, smu))

    def _operand(self, v, dtype):
        if self.prec == "tf32":
            return _round_to_tf32(v)
        return v.to(dtype)

    def _prep_side(self, v, raw, s):
        """(|v_i|², (s_hi, s_lo), s float64) with s = raw·beta formed here when not given."""
        n = v.shape[0]
        norm, hi, lo = (_empty((n,), self.acc, self.device) for _ in range(3))
        s_from_raw = s is None
        s = _empty((n,), torch.float64, self.device) if s_from_raw else s.detach().to(torch.float64).contiguous()
        if n:
            BLOCK_R = 32
            with device_ctx(self.device):
                _side_prep_kernel[(triton.cdiv(n, BLOCK_R),)](
                    v_ptr=v, raw_ptr=raw, beta_ptr=self.beta, s_ptr=s, norm_ptr=norm, hi_ptr=hi, lo_ptr=lo, n=n,
                    D=self.D, S_FROM_RAW=s_from_raw, BLOCK_R=BLOCK_R,
                    BLOCK_D=64)  # one build for every D (O(n·D) work: not a hot spot)
        return norm, (hi, lo), s

    def near_tiles(self):
        """Block sizes of the near-pair recompute: (BLOCK_P, BLOCK_K, BLOCK_J, tl.dot usable)."""
        return (*configs.NEAR_TILES[self.precision_mode], self.acc == torch.float32)

    def chain(self, dxp, dmup, dsx, dsmu, want=(True,) * 4):
        """(∂x, ∂mu, ∂lc, ∂beta) in the compute dtype from the kernels' ∂x', ∂mu' (compute dtype)
        and ∂sx, ∂smu (float64), through x' = (x − m)·Lc, mu' = (mu − m)·Lc, sx = x·beta,
        smu = mu·beta (m detached: q is invariant to a common shift). want: which of the four are
        needed (None in place of the others; their inputs may be None then)."""
        want_x, want_mu, want_lc, want_beta = want
        dx = _apply_t(dxp, self.lc) + dsx.to(self.acc)[:, None] * self.beta if want_x else None
        dmu = _apply_t(dmup, self.lc) + dsmu.to(self.acc)[:, None] * self.beta if want_mu else None
        dlc = dbeta = None
        if want_beta or (want_lc and not self.full):
            dbeta, dlc_x = self._side_grad(self.x, dxp, dsx, want_lc)
            dbeta_mu, dlc_mu = self._side_grad(self.mu, dmup, dsmu, want_lc)
            dbeta = (dbeta + dbeta_mu).to(self.acc)
            if want_lc and not self.full:
                dlc = (dlc_x + dlc_mu).to(self.acc)
        if want_lc and self.full:
            dlc = ((self.x - self.m).T @ dxp + (self.mu - self.m).T @ dmup).to(self.acc)
        return dx, dmu, dlc, dbeta if want_beta else None

    def _side_grad(self, raw, dvp, ds, want_dlc=True):
        """(Σ_i ds_i·(raw_i − m), Σ_i (raw_i − m)·dv'_i for a diagonal Lc where wanted, else None),
        float64 [D] each."""
        n, D = raw.shape
        f64 = dict(dtype=torch.float64, device=self.device)
        diag = want_dlc and not self.full
        if n == 0 or D == 0:
            return torch.zeros(D, **f64), torch.zeros(D, **f64)
        BLOCK_R, BLOCK_D = 32, 64  # one build for every D (O(n·D) work: not a hot spot)
        n_chunks = triton.cdiv(D, BLOCK_D)
        splits = max(1, min(triton.cdiv(n, 4 * BLOCK_R), triton.cdiv(parallel_width(self.device), n_chunks)))
        per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_R) * BLOCK_R
        splits = triton.cdiv(n, per_split)
        dbeta = _empty((splits, D), torch.float64, self.device)
        dlc = _empty((splits, D), torch.float64, self.device) if diag else None
        with device_ctx(self.device):
            _side_grad_kernel[(n_chunks, splits)](
                raw_ptr=raw, m_ptr=self.m, dvp_ptr=dvp.contiguous() if diag else None, ds_ptr=ds.contiguous(),
                dbeta_ptr=dbeta, dlc_ptr=dlc if diag else None, n=n, D=D, rows_per_split=per_split,
                BLOCK_R=BLOCK_R, BLOCK_D=BLOCK_D)
        return dbeta.sum(0), (dlc.sum(0) if diag else None)


def split_float(name: str, value: float) -> dict:
    """{name_hi, name_lo}: a float64 value as two fp32 halves (Triton passes Python floats as fp32);
    the kernels add them back (_load_eps)."""
    hi = float(torch.tensor(float(value), dtype=torch.float32))
    return {f"{name}_hi": hi, f"{name}_lo": float(value) - hi}


@dataclasses.dataclass(frozen=True)
class CrossEntropyRows:
    """The cross-entropy's inputs besides the operands, as its kernels take them (one object instead
    of a tuple of a dozen positions):

        target        [B, N_TGT] int64, contiguous: the row's target classes (−1: none here)
        margin        the distance added at a target pair (a Python float: the kernels take it
                      as two fp32 halves, like eps, so no host-to-device copy is made per call)
        class_weight  [C] or None; dense_soft_target [B, C] (any strides) or None
        w_lse, w_target_logit, w_sl, w_pl, lse   the backward's per-row weights and the forward's lse
                      (float64; None in the forward; w_pl None without a dense target)
    """
    target: torch.Tensor
    margin: float
    class_weight: Optional[torch.Tensor] = None
    dense_soft_target: Optional[torch.Tensor] = None
    w_lse: Optional[torch.Tensor] = None
    w_target_logit: Optional[torch.Tensor] = None
    w_sl: Optional[torch.Tensor] = None
    w_pl: Optional[torch.Tensor] = None
    lse: Optional[torch.Tensor] = None

    @property
    def n_tgt(self) -> int:
        return self.target.shape[1]

    def soft_args(self) -> dict:
        """The class weights and the dense target with its strides (None and 0 when absent)."""
        soft = self.dense_soft_target
        return dict(cw_ptr=self.class_weight, soft_ptr=soft, stride_sb=0 if soft is None else soft.stride(0),
                    stride_sc=0 if soft is None else soft.stride(1))

    def kernel_args(self) -> dict:
        """The backward kernel's CE arguments."""
        return dict(tgt_ptr=self.target, w_lse_ptr=self.w_lse, w_target_logit_ptr=self.w_target_logit, w_sl_ptr=self.w_sl,
                    lse_ptr=self.lse, **split_float("margin", self.margin),
                    w_pl_ptr=self.w_pl if self.dense_soft_target is not None else None, **self.soft_args())

    @staticmethod
    def none_args() -> dict:
        """The backward kernel's CE arguments for the logits family: all absent."""
        return dict(tgt_ptr=None, w_lse_ptr=None, w_target_logit_ptr=None, w_sl_ptr=None, lse_ptr=None, margin_hi=0.0,
                    margin_lo=0.0, w_pl_ptr=None, cw_ptr=None, soft_ptr=None, stride_sb=0, stride_sc=0)
