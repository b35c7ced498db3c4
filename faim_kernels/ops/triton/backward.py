"""The backward of both op families: ONE kernel, specialised by constexpr flags (the way
cut-cross-entropy specialises its kernels), and its launcher.

    logits family (g_ptr given): G = ∂loss/∂logits is read from `grad` through its strides (stride 0
            from an expanded gradient works in place). FROM_LOGITS (lg_ptr given): a = sqrt(q + eps)
            comes back from the forward's logits, a = −logit/γ − λ·r (r = sqrt(s² + eps) from the
            rank-one s), instead of a recomputed GEMM tile, so each side costs one GEMM (P·oth') like
            nn.Linear's backward; where the logits cannot carry d (γ = 0, or |γ| so small that
            −γ·d is subnormal: `_logits_carry_d`) the program recomputes the tiles. Half logits
            take the recomputed tile (their rounding would put a off by ~4e-3).
    cross-entropy family (tgt_ptr given): nothing of size [B, C] exists; each tile recomputes q and
            G = w_lse·exp(logit' − lse) + v_c·(w_sl + w_pl·P_bc) + Σ_k w_target_logit,k·[c = t_k],
            logit' = −γ·(d + margin·[c ∈ t]), with every target pair taken through the near-pair recompute
            (the margin sits on it); class weights v and the dense probability target P (read
            through its strides) are optional (None when absent), N_TGT targets per row.

Optional inputs are passed as None; `triton.heuristics` derives the constexpr flags from them
(CE, FROM_LOGITS, HAS_WEIGHT, HAS_SOFT, NEED_DP, HAS_SCAL), and every launch passes its arguments by
keyword. The kernel's parameters are documented once, in `_backward_kernel`'s docstring.

The kernel runs twice per op, once per side (x' rows, then mu' rows: own and other swap roles; s
and the raw difference change sign with them, which the formulas absorb). A program owns a block
of rows of its side and a chunk of D, walks the other side tile by tile, and with H = −γ·G,
P = H/a, R = H·λ·s/r accumulates
    ∂own'_i = rowsum(P)_i·own'_i − (P·oth')_i      (far pairs: one tl.dot per tile)
            + Σ_j P_ij·((own_i − oth_j)·Lc)         (near pairs: from the raw difference)
    ∂s_own  = rowsum(R);   ∂λ = Σ H·r,  ∂γ = −Σ G·dist  (x side only; dist = d + margin·[c = t])
Near pairs (q < tau·(|own'|² + |oth'|²), docs/design.md §2.1 (near pairs), and every CE target) contribute nothing to
the tile sums: the loop notes them and all their terms are added after it from the exact q, in the
order met, so every sum runs in the same order on every call with the same launch configuration
(no float atomics). A program meeting more than `configs.BWD_NEAR_CAP` of them walks the other side
again with them handled inside the loop, tile by tile, NEAR_P at a time: that program only. Where
the other side is long and the own side short, it is split across programs whose partial sums are
added in a fixed order afterwards.

Gradients only where needed (`grad_mask`): a side whose ∂own' feeds no needed gradient (its raw
rows and L are frozen) runs without the P·oth' product and its D chunks (NEED_DP off); a side whose
∂own', ∂s feed nothing is not launched; ∂λ, ∂γ are summed only when one of them is needed.

One launch per side: the recomputing fallbacks (an overflow of the notes, logits that carry no d)
run inside the program that needs them, so a launch is autotuned on its own with nothing to reset.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, configs, interpreter
from .common import DOT, FMA
from .common import (_cast, _gemm_q, _load_eps, _mm, _near_pair_distance, _pair_distance, _pair_s, _q_is_near,
                     _recompute_near_pairs, _s_is_near, _take_near, _tile_dot)


@triton.jit
def _ce_grad(d, is_t, w_t, w_lse, lin, lse, gamma, margin):
    """(G, dist) of the cross-entropy: dist = d + margin·[target], logit' = −γ·dist,
    G = ∂loss/∂logit' = w_lse·exp(logit' − lse) + lin + w_t, with lin = v·(w_sl + w_pl·P) and w_t
    the summed w_target_logit of the row's targets on this class."""
    dist = d + tl.where(is_t, margin, 0.0)
    G = w_lse * tl.exp(-gamma * dist - lse) + lin + w_t
    return G, dist


@triton.jit
def _ce_pair_data(row, cls, row_m, cls_m, m, tgt_ptr, w_target_logit_ptr, w_sl_ptr, w_pl_ptr, cw_ptr, soft_ptr,
                  stride_sb, stride_sc, acc_t: tl.constexpr, N_TGT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SOFT: tl.constexpr):
    """(is_t, w_t, lin) of _ce_grad for the pairs (row, cls), masked by m: is_t, cls is one of the
    row's targets; w_t = Σ_k w_target_logit[row, k]·[cls = t_k]; lin = v_cls·(w_sl[row] + w_pl[row]·P[row, cls]).
    row and cls broadcast to m's shape ([O, 1] and [1, T] in a tile: the per-row data is loaded once
    per row, masked by row_m, the per-class data once per class, by cls_m)."""
    is_t = (row < 0) & m
    w_t = tl.where(m, 0.0, 0.0).to(acc_t)
    for k in tl.static_range(N_TGT):
        hit = (tl.load(tgt_ptr + row * N_TGT + k, mask=row_m, other=-1) == cls) & m
        is_t = is_t | hit
        w_t += tl.where(hit, tl.load(w_target_logit_ptr + row * N_TGT + k, mask=row_m, other=0.0).to(acc_t), 0.0)
    lin = tl.load(w_sl_ptr + row, mask=row_m, other=0.0).to(acc_t)
    if HAS_SOFT:
        p = tl.load(soft_ptr + row * stride_sb + cls * stride_sc, mask=m, other=0.0).to(acc_t)
        lin = lin + tl.load(w_pl_ptr + row, mask=row_m, other=0.0).to(acc_t) * p
    if HAS_WEIGHT:
        lin = lin * tl.load(cw_ptr + cls, mask=cls_m, other=0.0).to(acc_t)
    return is_t, w_t, lin


@triton.jit
def _logits_carry_d(gamma):
    """Whether the forward's logits −γ·d carry d to working precision: γ ≠ 0 and |γ| large enough
    that −γ·d stays a normal number for any distance a far pair can have (d ≥ 2^-60). Below it
    (float32 γ = 1e-40: −γ·d is subnormal or 0) d = −logit/γ would be off by up to 100 %, so the
    tiles are recomputed, as for γ = 0."""
    if gamma.dtype == tl.float64:
        floor = 2.0 ** -900
    else:
        floor = 2.0 ** -60
    return tl.abs(gamma) >= floor


@triton.jit
def _near_terms(own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, b_v, j_v, em, d0, D,
                 s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                 tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                 w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                 CE: tl.constexpr, OWN_IS_X: tl.constexpr, FULL: tl.constexpr, NP: tl.constexpr,
                 NEAR_K: tl.constexpr, BLOCK_D: tl.constexpr, NEAR_DOT: tl.constexpr,
                 N_TGT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFT: tl.constexpr, NEED_DP: tl.constexpr):
    """The terms of NP near pairs (own row b_v, other row j_v; em masks the block) from the raw
    difference: (P·diff'[:, d0 : d0 + BLOCK_D], R, H·r, G·dist), zero where ~em. Without NEED_DP
    the difference's chunk is not kept (only q and s are formed)."""
    j_keep = d0
    if not NEED_DP:
        j_keep = -1
    q, diff, s_near = _recompute_near_pairs(own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, b_v, j_v, em, j_keep, D,
                                            FULL, NP, NEAR_K, BLOCK_D, NEAR_DOT)
    acc_t = diff.dtype  # the compute dtype (q itself is float64)
    s = ((tl.load(s_own_hi_ptr + b_v, mask=em, other=0.0) - tl.load(s_oth_hi_ptr + j_v, mask=em, other=0.0))
         + (tl.load(s_own_lo_ptr + b_v, mask=em, other=0.0) - tl.load(s_oth_lo_ptr + j_v, mask=em, other=0.0)))
    a, r, d, ia, ir, s = _near_pair_distance(q, s_near, s, lam, eps)
    if CE:
        if OWN_IS_X:
            row, cls = b_v, j_v
        else:
            row, cls = j_v, b_v
        is_t, w_t, lin = _ce_pair_data(row, cls, em, em, em, tgt_ptr, w_target_logit_ptr, w_sl_ptr, w_pl_ptr, cw_ptr,
                                       soft_ptr, stride_sb, stride_sc, acc_t, N_TGT, HAS_WEIGHT, HAS_SOFT)
        G, dist = _ce_grad(d, is_t, w_t, tl.load(w_lse_ptr + row, mask=em, other=0.0).to(acc_t), lin,
                           tl.load(lse_ptr + row, mask=em, other=0.0).to(acc_t), gamma, margin)
    else:
        G = tl.load(g_ptr + b_v * stride_g_own + j_v * stride_g_oth, mask=em, other=0.0).to(acc_t)
        dist = d
    G = tl.where(em, G, 0.0)
    H = -gamma * G
    # a = 0 only at an exact hit with eps = 0: subgradient 0 there (as the C++ kernel).
    P = tl.where(em & (a != 0), H * ia, 0.0)
    R = tl.where(em & (r != 0), H * lam * s * ir, 0.0)
    # P = 0 exactly (an infinite distance, or no gradient) adds nothing: diff' may hold Inf there.
    pd = tl.where(P[:, None] != 0, P[:, None] * diff.to(acc_t), 0.0)
    return pd, R, tl.where(em, H * r, 0.0), tl.where(em, G * dist, 0.0)


@triton.jit
def _add_to_rows(pm_acc, rsum, hr, gd, rloc, i_v, em, pd, R_e, hr_e, gd_e,
                 IMPL: tl.constexpr, NEED_DP: tl.constexpr, SCAL: tl.constexpr):
    """The accumulators with a block of near pairs' terms (_near_terms) added to their rows i_v
    (em masks the block): the rows of pd through a one-hot product, the rest by row."""
    onehot = (rloc[:, None] == i_v[None, :]) & em[None, :]
    if NEED_DP:
        pm_acc = _mm(onehot.to(pm_acc.dtype), -pd, pm_acc, FMA if IMPL == FMA else DOT, "ieee")
    rsum += tl.sum(tl.where(onehot, R_e[None, :], 0.0), axis=1).to(tl.float64)
    if SCAL:
        hr += tl.sum(tl.where(onehot, hr_e[None, :], 0.0), axis=1).to(tl.float64)
        gd += tl.sum(tl.where(onehot, gd_e[None, :], 0.0), axis=1).to(tl.float64)
    return pm_acc, rsum, hr, gd


@triton.jit
def _tile_q(own_block, oth_block, lo, lt, om, tm, valid, own_n, oth_n, s, lg_ptr, lg_rows, stride_lg_own,
            stride_lg_oth, o0, t0, lam, gamma, eps, tau, zero, D,
            BLOCK_K: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr, FROM_LOGITS: tl.constexpr):
    """q of the tile: from the forward's logits (FROM_LOGITS) or a recomputed GEMM tile."""
    if FROM_LOGITS:
        # a from the logits (d = a + λ·r) in correctly rounded division and square root (the
        # GPU's defaults are approximate); a < 0 from rounding clamps to 0, which puts
        # q = −eps under the near bound: such a pair is recomputed as a near pair.
        lg_block = lg_ptr + (o0.to(tl.int64) * stride_lg_own + tl.cast(t0, tl.int64) * stride_lg_oth)
        lg = tl.load(lg_block + lg_rows + lt[None, :] * stride_lg_oth, mask=valid, other=0.0).to(zero.dtype)
        if lg.dtype == tl.float64:  # float64 division and square root are correctly rounded already
            a_l = -lg / gamma - lam * tl.sqrt(s * s + eps)
        else:
            a_l = tl.div_rn(-lg, gamma + zero) - lam * tl.sqrt_rn(s * s + eps)
        a_l = tl.maximum(a_l, 0.0)
        q = a_l * a_l - eps
    else:
        q, _ = _gemm_q(_tile_dot(own_block, oth_block, lo, lt, om, tm, D, zero, BLOCK_K, IMPL, PREC),
                       own_n, oth_n, tau)
    return q


@triton.jit
def _tile_grad(q, s, valid, om, tm, ro, rt, lt, o0, t0, own_n, oth_n, s_own_hi, s_oth_hi, g_ptr, g_rows,
               stride_g_own, stride_g_oth, tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, w_pl_ptr, cw_ptr, soft_ptr,
               stride_sb, stride_sc, w_lse_o, lse_o, lam, gamma, eps, margin, tau, zero,
               OWN_IS_X: tl.constexpr, N_TGT: tl.constexpr, CE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               HAS_SOFT: tl.constexpr):
    """The tile's epilogue before the sums: (a, r, ia, ir, G, dist, near) with G = ∂loss/∂logit
    (read from the gradient, or the cross-entropy's from the recomputed logits), dist the distance
    that multiplies −γ, and near the near pairs (and every CE target pair: the margin sits on it)."""
    acc_t = zero.dtype
    near = (_q_is_near(q, own_n[:, None] + oth_n[None, :], tau) | _s_is_near(s, s_own_hi, s_oth_hi)) & valid
    a, r, d, ia, ir = _pair_distance(q, s, lam, eps)
    if CE:
        if OWN_IS_X:  # batch rows down the tile, classes across
            ce_row, ce_cls, row_m, cls_m = ro[:, None], rt[None, :], om[:, None], tm[None, :]
            w_lse, lse = w_lse_o[:, None], lse_o[:, None]
        else:
            ce_row, ce_cls, row_m, cls_m = rt[None, :], ro[:, None], tm[None, :], om[:, None]
            w_lse = tl.load(w_lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :]
            lse = tl.load(lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :]
        is_t, w_t, lin = _ce_pair_data(ce_row, ce_cls, row_m, cls_m, valid, tgt_ptr, w_target_logit_ptr, w_sl_ptr, w_pl_ptr,
                                       cw_ptr, soft_ptr, stride_sb, stride_sc, acc_t, N_TGT, HAS_WEIGHT, HAS_SOFT)
        near = near | is_t  # the target pairs carry the margin: always recomputed
        G, dist = _ce_grad(d, is_t, w_t, w_lse + zero, lin, lse + zero, gamma, margin)
    else:
        g_block = g_ptr + (o0.to(tl.int64) * stride_g_own + tl.cast(t0, tl.int64) * stride_g_oth)
        G = tl.load(g_block + g_rows + lt[None, :] * stride_g_oth, mask=valid, other=0.0).to(acc_t)
        dist = d
    return a, r, ia, ir, G, dist, near


@triton.jit
def _add_far_terms(pm_acc, rowsum, rsum, hr, gd, a, r, ia, ir, s, G, dist, far, oth_block, lt, tm, rd, dm, lam,
                   gamma, D, op_t: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr,
                   BF16_BY_HAND: tl.constexpr, NEED_DP: tl.constexpr, SCAL: tl.constexpr):
    """The accumulators with the tile's far pairs added: H = −γ·G, P = H/a into rowsum and
    pm_acc (+= P·oth'[:, chunk], one tl.dot), R = H·λ·s/r into rsum, H·r and G·dist into hr, gd."""
    G = tl.where(far, G, 0.0)
    H = -gamma * G
    R = tl.where(far & (r != 0), H * lam * s * ir, 0.0)
    rsum += tl.sum(R, axis=1).to(tl.float64)
    if NEED_DP:
        # The chunk of oth' this program's output needs (read again: it is in L2 after the GEMM).
        oth = tl.load(oth_block + lt[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        P = tl.where(far & (a != 0), H * ia, 0.0)
        rowsum += tl.sum(P, axis=1)
        pm_acc = _mm(_cast(P, op_t, BF16_BY_HAND), oth, pm_acc, IMPL, PREC)
    if SCAL:
        hr += tl.sum(tl.where(far, H * r, 0.0), axis=1).to(tl.float64)
        gd += tl.sum(tl.where(far, G * dist, 0.0), axis=1).to(tl.float64)
    return pm_acc, rowsum, rsum, hr, gd


@triton.jit
def _note_near(near, flat, near_ptr, note_base, n_noted, n_near, near_cap, t0, overflowed,
               BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr):
    """Notes the tile's near pairs (code j·BLOCK_O + i, in tile order) for after the loop, typically
    zero to two per tile: (n_noted, overflowed). Past near_cap nothing more is noted and the
    program is marked overflowed (it walks again with INLINE)."""
    if n_noted + n_near > near_cap:
        overflowed = n_near >= 0
    else:
        for _k in range(0, n_near):
            f = tl.min(tl.where(near, flat, BLOCK_O * BLOCK_T))
            near = near & (flat != f)
            tl.store(near_ptr + note_base + n_noted + _k, (t0 + f % BLOCK_T).to(tl.int64) * BLOCK_O + f // BLOCK_T)
        n_noted += n_near
    return n_noted, overflowed


@triton.jit
def _walk(own_ptr, oth_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, own_raw_ptr, oth_raw_ptr,
          lc_ptr, beta_ptr, g_ptr, stride_g_own, stride_g_oth, lg_ptr, stride_lg_own, stride_lg_oth,
          tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
          near_ptr, note_base, near_cap, t_begin, t_end, D, tau, pid_d, o0, lo, om, ro, rd, dm, own_n, s_own_hi,
          s_own_lo, own_block, g_rows, lg_rows, lam, gamma, eps, margin, w_lse_o, lse_o,
          BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
          OWN_IS_X: tl.constexpr, INLINE: tl.constexpr, FULL: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr,
          NEAR_P: tl.constexpr, NEAR_K: tl.constexpr, NEAR_DOT: tl.constexpr, BF16_BY_HAND: tl.constexpr,
          N_TGT: tl.constexpr, CE: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr,
          HAS_SOFT: tl.constexpr, NEED_DP: tl.constexpr, SCAL: tl.constexpr):
    """One walk over the other side's rows [t_begin, t_end) for the program's own block (the
    kernel's parameters, plus its per-program values): (pm_acc, rowsum, rsum, hr, gd, overflowed).
    INLINE = 0 notes the near pairs (near_cap at most; more: overflowed, the sums incomplete) and
    adds them after the loop; INLINE = 1 adds them tile by tile, any number."""
    acc_t = own_n.dtype
    rowsum = tl.zeros((BLOCK_O,), dtype=acc_t)              # Σ_j P_ij over far pairs
    pm_acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=acc_t)      # Σ_j P_ij·oth'_j − near terms
    rsum = tl.zeros((BLOCK_O,), dtype=tl.float64)           # Σ_j R_ij
    hr = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j H_ij·r_ij
    gd = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j G_ij·dist_ij
    zero = tl.zeros((BLOCK_O, BLOCK_T), dtype=acc_t)
    flat = tl.arange(0, BLOCK_O)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    rloc = tl.arange(0, BLOCK_O)
    n_noted = tl.full([], 0, dtype=tl.int32)
    overflowed = n_noted != 0
    for t0 in range(t_begin, t_end, BLOCK_T):
        lt = tl.arange(0, BLOCK_T)
        tm = lt < t_end - t0
        oth_block = oth_ptr + tl.cast(t0, tl.int64) * D
        valid = om[:, None] & tm[None, :]
        oth_n = tl.load(oth_n_ptr + t0 + lt, mask=tm, other=0.0)
        s_oth_hi = tl.load(s_oth_hi_ptr + t0 + lt, mask=tm, other=0.0)
        s = _pair_s(s_own_hi, s_own_lo, s_oth_hi, tl.load(s_oth_lo_ptr + t0 + lt, mask=tm, other=0.0))
        q = _tile_q(own_block, oth_block, lo, lt, om, tm, valid, own_n, oth_n, s, lg_ptr, lg_rows, stride_lg_own,
                    stride_lg_oth, o0, t0, lam, gamma, eps, tau, zero, D, BLOCK_K, IMPL, PREC, FROM_LOGITS)
        a, r, ia, ir, G, dist, near = _tile_grad(
            q, s, valid, om, tm, ro, tl.cast(t0, tl.int64) + lt, lt, o0, t0, own_n, oth_n, s_own_hi, s_oth_hi, g_ptr,
            g_rows, stride_g_own, stride_g_oth, tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, w_pl_ptr, cw_ptr,
            soft_ptr, stride_sb, stride_sc, w_lse_o, lse_o, lam, gamma, eps, margin, tau, zero, OWN_IS_X, N_TGT, CE,
            HAS_WEIGHT, HAS_SOFT)
        pm_acc, rowsum, rsum, hr, gd = _add_far_terms(
            pm_acc, rowsum, rsum, hr, gd, a, r, ia, ir, s, G, dist, valid & (near == 0), oth_block, lt, tm, rd, dm,
            lam, gamma, D, own_ptr.dtype.element_ty, IMPL, PREC, BF16_BY_HAND, NEED_DP, SCAL)

        n_near = tl.sum(near.to(tl.int32))
        if INLINE:
            # This program overflowed its notes: its near pairs are handled tile by tile, NEAR_P
            # at a time in increasing tile position, as the noted ones are after the loop.
            for e0 in range(0, n_near, NEAR_P):
                code, near = _take_near(near, flat, tl.minimum(n_near - e0, NEAR_P), NEAR_P, BLOCK_O * BLOCK_T)
                em = e0 + tl.arange(0, NEAR_P) < n_near
                i_v = code // BLOCK_T
                pd, R_e, hr_e, gd_e = _near_terms(
                    own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, o0.to(tl.int64) + i_v,
                    t0 + (code % BLOCK_T).to(tl.int64), em, pid_d * BLOCK_D, D,
                    s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                    tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                    w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                    CE, OWN_IS_X, FULL, NEAR_P, NEAR_K, BLOCK_D, NEAR_DOT, N_TGT, HAS_WEIGHT, HAS_SOFT, NEED_DP)
                pm_acc, rsum, hr, gd = _add_to_rows(pm_acc, rsum, hr, gd, rloc, i_v, em, pd, R_e, hr_e, gd_e,
                                                    IMPL, NEED_DP, SCAL)
        else:
            n_noted, overflowed = _note_near(near, flat, near_ptr, note_base, n_noted, n_near, near_cap, t0,
                                             overflowed, BLOCK_O, BLOCK_T)

    if not INLINE:
        # The noted pairs, NEAR_P at a time, added to their rows through a one-hot product.
        # (After an overflow the kernel walks again and these sums are dropped.) The call below passes
        # the same kernel parameters as the inline one above: Triton functions take no structs, so
        # the two sources of near pairs (this program's notes, a tile's mask) share the callee, not
        # its argument list.
        for e0 in range(0, n_noted, NEAR_P):
            e = e0 + tl.arange(0, NEAR_P)
            em = e < n_noted
            code = tl.load(near_ptr + note_base + e, mask=em, other=0)
            i_v = (code % BLOCK_O).to(tl.int32)
            pd, R_e, hr_e, gd_e = _near_terms(
                own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, o0.to(tl.int64) + i_v, code // BLOCK_O, em,
                pid_d * BLOCK_D, D,
                s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                CE, OWN_IS_X, FULL, NEAR_P, NEAR_K, BLOCK_D, NEAR_DOT, N_TGT, HAS_WEIGHT, HAS_SOFT, NEED_DP)
            pm_acc, rsum, hr, gd = _add_to_rows(pm_acc, rsum, hr, gd, rloc, i_v, em, pd, R_e, hr_e, gd_e,
                                                IMPL, NEED_DP, SCAL)

    return pm_acc, rowsum, rsum, hr, gd, overflowed


@triton.jit
def _own_ce_rows(w_lse_ptr, lse_ptr, ro, om, acc_t: tl.constexpr, BLOCK_O: tl.constexpr, LOAD: tl.constexpr):
    """(w_lse, lse) of the own rows where they are batch rows of the cross-entropy (LOAD), else zeros."""
    w_lse_o = tl.zeros((BLOCK_O,), dtype=acc_t)
    lse_o = w_lse_o
    if LOAD:
        w_lse_o = tl.load(w_lse_ptr + ro, mask=om, other=0.0).to(acc_t)
        lse_o = tl.load(lse_ptr + ro, mask=om, other=0.0).to(acc_t)
    return w_lse_o, lse_o


@triton.jit
def _store_partials(dp_ptr, ds_ptr, scal_ptr, own_block, pm_acc, rowsum, rsum, hr, gd, pid_o, pid_s, pid_d, n_own,
                    o0, lo, om, rd, dm, D, NEED_DP: tl.constexpr, SCAL: tl.constexpr):
    """The program's outputs: ∂own'[rows, chunk] = rowsum·own' − pm_acc (NEED_DP), and from the
    first chunk ∂s_own and the (Σ H·r, −Σ G·dist) of its row block (SCAL)."""
    out_row0 = pid_s.to(tl.int64) * n_own + o0
    if NEED_DP:
        own = tl.load(own_block + lo[:, None] * D + rd[None, :], mask=om[:, None] & dm[None, :], other=0.0)
        d_own = rowsum[:, None] * own.to(pm_acc.dtype) - pm_acc
        tl.store(dp_ptr + out_row0 * D + lo[:, None] * D + rd[None, :], d_own, mask=om[:, None] & dm[None, :])
    if pid_d == 0:
        tl.store(ds_ptr + out_row0 + lo, rsum, mask=om)
        if SCAL:
            slot = (pid_s.to(tl.int64) * tl.num_programs(0) + pid_o) * 2
            tl.store(scal_ptr + slot, tl.sum(hr))
            tl.store(scal_ptr + slot + 1, -tl.sum(gd))


@triton.heuristics({
    "CE": lambda a: a["tgt_ptr"] is not None,
    "FROM_LOGITS": lambda a: a["lg_ptr"] is not None,
    "HAS_WEIGHT": lambda a: a["cw_ptr"] is not None,
    "HAS_SOFT": lambda a: a["soft_ptr"] is not None,
    "NEED_DP": lambda a: a["dp_ptr"] is not None,
    "HAS_SCAL": lambda a: a["scal_ptr"] is not None,
})
# Sizes, the autotuning keys and the strides are not specialised on (== 1, divisible by 16): each
# combination would be another build (compile time on a GPU's first run); D is, for the alignment of
# the GEMM's row loads.
@triton.jit(do_not_specialize=["n_own", "n_oth", "oth_per_split", "near_cap", "KEY_O", "KEY_T", "stride_g_own",
                               "stride_g_oth", "stride_lg_own", "stride_lg_oth", "stride_sb", "stride_sc"])
def _backward_kernel(
        own_ptr, oth_ptr, own_n_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr,
        own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, lam_ptr, gamma_ptr,
        g_ptr, stride_g_own, stride_g_oth, lg_ptr, stride_lg_own, stride_lg_oth,
        tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, margin_hi, margin_lo, w_pl_ptr, cw_ptr, soft_ptr, stride_sb,
        stride_sc,
        dp_ptr, ds_ptr, scal_ptr, near_ptr,
        n_own, n_oth, D, eps_hi, eps_lo, tau, oth_per_split, near_cap, KEY_O, KEY_T,
        BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        OWN_IS_X: tl.constexpr, FULL: tl.constexpr,
        IMPL: tl.constexpr, PREC: tl.constexpr, NEAR_P: tl.constexpr, NEAR_K: tl.constexpr, NEAR_DOT: tl.constexpr,
        BF16_BY_HAND: tl.constexpr, LOCAL64: tl.constexpr, N_TGT: tl.constexpr,
        CE: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFT: tl.constexpr,
        NEED_DP: tl.constexpr, HAS_SCAL: tl.constexpr):
    """Partial ∂own'[rows, chunk of D] over one split of the other side (module docstring).

    Parameters (each documented here once; `backward_side` passes them by keyword):
      own_ptr, oth_ptr [n, D]            x', mu' (or mu', x') as the GEMM takes them (operand dtype)
      own_n_ptr, oth_n_ptr [n]           their squared norms (compute dtype)
      s_*_hi_ptr, s_*_lo_ptr [n]         s = raw·beta in hi + lo parts (common._pair_s)
      own_raw_ptr, oth_raw_ptr [n, D]    the raw rows (compute dtype), for the near-pair recompute
      lc_ptr [D] or [D, D], beta_ptr [D] the metric factor and the 1-form; lam_ptr, gamma_ptr 0-dim f64
      g_ptr, stride_g_*                  logits family: ∂loss/∂logits [B, C], strides in own/other order
      lg_ptr, stride_lg_*                the forward's logits (FROM_LOGITS), or None: recompute tiles
      tgt_ptr [B, N_TGT]                 CE family: targets; w_lse, w_target_logit, w_sl, lse [B] f64
      margin_hi, margin_lo               CE: the margin as two fp32 halves
      w_pl_ptr, soft_ptr, stride_s*      CE: the dense probability target's weight [B] and P [B, C], or None
      cw_ptr [C]                         CE: class weights, or None
      dp_ptr [splits, n_own, D]          out: ∂own' partials (None: not needed, NEED_DP off)
      ds_ptr [splits, n_own] f64         out: ∂s_own partials (chunk 0 only)
      scal_ptr [splits, row blocks, 2]   out: (Σ H·r, −Σ G·dist), x side only (None: not needed)
      near_ptr, near_cap                 the notes of near pairs, near_cap per program
      n_own, n_oth, D                    sizes; eps_hi + eps_lo = eps; tau: the near threshold
      oth_per_split                      rows of the other side per split (grid axis 1)
      KEY_O, KEY_T                       power-of-two buckets of n_own, n_oth: the autotuning key only
      BLOCK_O, BLOCK_T, BLOCK_K          tile rows (own, other) and the GEMM's K step (the config)
      BLOCK_D                            the chunk of D a program accumulates (grid axis 2)
      OWN_IS_X                           own side is x' (the CE row data belongs to it; scal written)
      FULL, IMPL, PREC                   full Lc; how the GEMM tiles multiply (common.DOT/DOT_UPCAST/FMA)
      NEAR_P, NEAR_K, NEAR_DOT           the near-pair recompute's block of pairs, K step, tl.dot use
      BF16_BY_HAND, LOCAL64              interpreter bf16 rounding; int64 offsets inside a block
      N_TGT                              targets per row (CE)
      CE .. HAS_SCAL                     derived from which pointers are None (triton.heuristics)

    grid = (row blocks of own, splits of oth, chunks of D). The CE family's row data (target,
    weights, lse) belongs to the batch side: indexed by own rows when OWN_IS_X, else by the other's.

    The program walks the other side once (`_walk`): FROM_LOGITS takes q from the logits tile
    where the logits carry d, else from a recomputed GEMM tile, and near pairs are noted (near_cap
    per program, in tile order) and handled after the loop, NEAR_P at a time, so the loop keeps its
    registers for the GEMM epilogue. If the program meets more than near_cap of them, or the logits
    carry no d, it walks again with GEMM tiles and the near pairs handled inside the loop (that
    program only; no host sync, no second launch). Operands of both GEMMs come through the
    pipelined loads; holding the own block in registers across the loop, as flash attention holds
    Q, spilled 0.2-1.8 KB per thread in sm_90 builds.
    """
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    acc_t = own_n_ptr.dtype.element_ty

    # 64-bit offsets at block corners, int32 inside a block (int64 with LOCAL64, where the
    # gradient's or the logits' strides could carry them past 2³¹), as in the forward.
    o0 = pid_o * BLOCK_O
    lo = tl.arange(0, BLOCK_O)
    om = lo < n_own - o0
    ro = o0.to(tl.int64) + lo
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    own_n = tl.load(own_n_ptr + o0 + lo, mask=om, other=0.0)
    s_own_hi = tl.load(s_own_hi_ptr + o0 + lo, mask=om, other=0.0)
    s_own_lo = tl.load(s_own_lo_ptr + o0 + lo, mask=om, other=0.0)
    own_block = own_ptr + o0.to(tl.int64) * D
    rows = lo
    if LOCAL64:
        rows = lo.to(tl.int64)
    g_rows = rows[:, None] * stride_g_own
    lg_rows = rows[:, None] * stride_lg_own
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    margin = _load_eps(margin_hi, margin_lo, acc_t)  # 0 for the logits family
    w_lse_o, lse_o = _own_ce_rows(w_lse_ptr, lse_ptr, ro, om, acc_t, BLOCK_O, CE and OWN_IS_X)
    program = (pid_o.to(tl.int64) * tl.num_programs(1) + pid_s) * tl.num_programs(2) + pid_d
    SCAL: tl.constexpr = OWN_IS_X and HAS_SCAL

    t_begin = pid_s * oth_per_split
    t_end = tl.minimum(t_begin + oth_per_split, n_oth)
    # The first walk takes q from the logits (FROM_LOGITS) where they carry d, else from GEMM tiles,
    # and notes the near pairs. Where the logits carry no d, or the notes overflowed, a second walk
    # recomputes everything from GEMM tiles with the near pairs handled inside the loop: a runtime
    # branch around a whole loop, each loop with its own register allocation (a branch between the
    # two sources inside one loop spilled 7.5-8.8 KB per thread in sm_90 builds).
    t_first = t_end
    if FROM_LOGITS:
        t_first = tl.where(_logits_carry_d(gamma), t_end, t_begin)
    pm_acc, rowsum, rsum, hr, gd, redo = _walk(
        own_ptr, oth_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, own_raw_ptr,
        oth_raw_ptr, lc_ptr, beta_ptr, g_ptr, stride_g_own, stride_g_oth, lg_ptr, stride_lg_own,
        stride_lg_oth, tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, w_pl_ptr, cw_ptr, soft_ptr,
        stride_sb, stride_sc, near_ptr, program * near_cap, near_cap, t_begin, t_first, D, tau, pid_d, o0,
        lo, om, ro, rd, dm, own_n, s_own_hi, s_own_lo, own_block, g_rows, lg_rows, lam, gamma, eps, margin,
        w_lse_o, lse_o, BLOCK_O, BLOCK_T, BLOCK_K, BLOCK_D, OWN_IS_X, False, FULL, IMPL, PREC, NEAR_P,
        NEAR_K, NEAR_DOT, BF16_BY_HAND, N_TGT, CE, FROM_LOGITS, HAS_WEIGHT, HAS_SOFT, NEED_DP, SCAL)
    if FROM_LOGITS:
        redo = redo | (t_first == t_begin)
    if redo:
        pm_acc, rowsum, rsum, hr, gd, _ = _walk(
            own_ptr, oth_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, own_raw_ptr,
            oth_raw_ptr, lc_ptr, beta_ptr, g_ptr, stride_g_own, stride_g_oth, lg_ptr, stride_lg_own,
            stride_lg_oth, tgt_ptr, w_lse_ptr, w_target_logit_ptr, w_sl_ptr, lse_ptr, w_pl_ptr, cw_ptr, soft_ptr,
            stride_sb, stride_sc, near_ptr, program * near_cap, near_cap, t_begin, t_end, D, tau, pid_d, o0, lo,
            om, ro, rd, dm, own_n, s_own_hi, s_own_lo, own_block, g_rows, lg_rows, lam, gamma, eps, margin,
            w_lse_o, lse_o, BLOCK_O, BLOCK_T, BLOCK_K, BLOCK_D, OWN_IS_X, True, FULL, IMPL, PREC, NEAR_P,
            NEAR_K, NEAR_DOT, BF16_BY_HAND, N_TGT, CE, False, HAS_WEIGHT, HAS_SOFT, NEED_DP, SCAL)

    _store_partials(dp_ptr, ds_ptr, scal_ptr, own_block, pm_acc, rowsum, rsum, hr, gd, pid_o, pid_s, pid_d, n_own,
                    o0, lo, om, rd, dm, D, NEED_DP, SCAL)


# The kernel, autotuned per precision mode. The key names the variants that change the work (the dtypes of
# the tensor arguments, and which are None, join it automatically). Nothing needs a reset between
# trials: each trial writes every output it owns, and accumulates into none.
_TUNED = configs.Tuned(_backward_kernel, "BWD_CONFIGS", key=["KEY_O", "KEY_T", "D", "OWN_IS_X", "FULL", "N_TGT"])


def backward_side(o, own_is_x: bool, grad=None, logits=None, ce=None, need_dp: bool = True,
                  need_scal: bool = True):
    """One pass of the kernel for `o` (a common.Operands), own side x' (own_is_x) or mu'.
    Logits family: grad [B, C] (any strides) and, for FROM_LOGITS, the forward's logits (None:
    recompute the tiles). CE family: ce, a common.CrossEntropyRows. need_dp: ∂own' is wanted;
    need_scal: (Σ H·r, −Σ G·dist) are wanted (x side). Returns (∂own' [n_own, D] in the compute
    dtype or None, ∂s_own [n_own] float64, (Σ H·r, −Σ G·dist) as 0-dim float64 tensors on the x
    side where wanted, else None)."""
    if own_is_x:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.xp, o.mup, o.xn, o.mn, o.sx, o.smu, o.x, o.mu
    else:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.mup, o.xp, o.mn, o.xn, o.smu, o.sx, o.mu, o.x
    n_own, n_oth, D = own.shape[0], oth.shape[0], o.D
    mode = o.precision_mode
    block_d = configs.bwd_block_d(mode, o.full, D)
    # D = 0 still needs ds and the scalars; without ∂own' one chunk computes everything else.
    n_chunks = max(1, triton.cdiv(D, block_d)) if need_dp else 1
    # Split the other side when the own side alone would leave the device idle; each split's
    # partial sums are added afterwards in a fixed order.
    min_rows = min(c.kwargs["BLOCK_O"] for c in configs.BWD_CONFIGS[mode])
    programs = triton.cdiv(n_own, 64) * n_chunks
    splits = max(1, min(triton.cdiv(common.parallel_width(o.device), programs), triton.cdiv(n_oth, 256)))
    splits = interpreter.backward_splits(splits, n_oth)
    per_split = triton.cdiv(triton.cdiv(n_oth, splits), 32) * 32
    splits = triton.cdiv(n_oth, per_split)
    dp = common._empty((splits, n_own, D), o.acc, o.device) if need_dp else None
    ds = common._empty((splits, n_own), torch.float64, o.device)
    scal = (torch.zeros((splits, triton.cdiv(n_own, min_rows), 2), dtype=torch.float64, device=o.device)
            if own_is_x and need_scal else None)
    near_cap = configs.BWD_NEAR_CAP
    notes = torch.empty(triton.cdiv(n_own, min_rows) * splits * n_chunks * near_cap, dtype=torch.int64,
                        device=o.device)

    def oriented(t):  # strides of a [B, C] tensor in (own, other) order
        return (t.stride(0), t.stride(1)) if own_is_x else (t.stride(1), t.stride(0))

    args = dict(own_ptr=own, oth_ptr=oth, own_n_ptr=own_n, oth_n_ptr=oth_n, s_own_hi_ptr=s_own[0],
                s_own_lo_ptr=s_own[1], s_oth_hi_ptr=s_oth[0], s_oth_lo_ptr=s_oth[1], own_raw_ptr=own_raw,
                oth_raw_ptr=oth_raw, lc_ptr=o.lc, beta_ptr=o.beta, lam_ptr=o.lam, gamma_ptr=o.gamma,
                g_ptr=None, stride_g_own=0, stride_g_oth=0, lg_ptr=None, stride_lg_own=0, stride_lg_oth=0,
                dp_ptr=dp, ds_ptr=ds, scal_ptr=scal, near_ptr=notes,
                n_own=n_own, n_oth=n_oth, D=D, eps_hi=o.eps_hi, eps_lo=o.eps_lo, tau=o.tau, oth_per_split=per_split,
                near_cap=near_cap, KEY_O=triton.next_power_of_2(n_own), KEY_T=triton.next_power_of_2(n_oth))
    if ce is not None:
        args.update(ce.kernel_args(), N_TGT=ce.n_tgt)
    else:
        args.update(common.CrossEntropyRows.none_args(), N_TGT=1)
        stride_g = oriented(grad)
        args.update(g_ptr=grad, stride_g_own=stride_g[0], stride_g_oth=stride_g[1])
    strides = [abs(v) for v in (args["stride_g_own"], args["stride_g_oth"])]
    if logits is not None:
        stride_lg = oriented(logits)
        strides += [abs(v) for v in stride_lg]
    near_p, near_k, _, near_dot = o.near_tiles()
    grid = lambda meta: (triton.cdiv(n_own, meta["BLOCK_O"]), splits, n_chunks)  # noqa: E731
    meta = dict(BLOCK_D=block_d, OWN_IS_X=own_is_x, FULL=o.full, IMPL=o.impl, PREC=o.prec, NEAR_P=near_p,
                NEAR_K=near_k, NEAR_DOT=near_dot, BF16_BY_HAND=o.bf16_by_hand,
                LOCAL64=256 * max(sum(strides[0:2]), sum(strides[2:4])) >= 2 ** 31)
    if logits is not None:
        args.update(lg_ptr=logits, stride_lg_own=stride_lg[0], stride_lg_oth=stride_lg[1])
    with common.device_ctx(o.device):
        _TUNED[mode][grid](**args, **meta)
    d_own = None if dp is None else (dp.view(n_own, D) if splits == 1 else dp.sum(0))
    ds_own = ds.view(n_own) if splits == 1 else ds.sum(0)
    scalar_sums = (scal[..., 0].sum(), scal[..., 1].sum()) if scal is not None else None
    return d_own, ds_own, scalar_sums


def _no_grad(t):
    """What a backward returns for a gradient grad_mask does not ask for."""
    return torch.empty(0, dtype=t.dtype, device=t.device)


def zero_grads(inputs, grad_mask: int):
    """Gradients of an empty problem (B = 0 or C = 0): zeros where asked for."""
    return tuple(torch.zeros_like(t) if grad_mask >> k & 1 else _no_grad(t) for k, t in enumerate(inputs))


def backward_both_sides(o, inputs, grad_mask: int, grad=None, logits=None, ce=None):
    """(dx, dmu, dlc, dbeta, dlam, dgamma) in the inputs' dtypes: the kernel once per side, then the
    chain rule to the raw inputs (common.Operands.chain). Bit k of grad_mask asks for gradient k of
    inputs = (x, mu, lc, beta, lam, gamma); only the work those need runs, and an unasked gradient
    is an empty tensor of its input's dtype (the op contract's convention)."""
    want_x, want_mu, want_lc, want_beta, want_lam, want_gamma = (bool(grad_mask >> k & 1) for k in range(6))
    side = dict(grad=grad, logits=logits, ce=ce)
    dxp = dsx = dmup = dsmu = scal = None
    if want_x or want_lc or want_beta or want_lam or want_gamma:
        dxp, dsx, scal = backward_side(o, True, need_dp=want_x or want_lc, need_scal=want_lam or want_gamma, **side)
    if want_mu or want_lc or want_beta:
        dmup, dsmu, _ = backward_side(o, False, need_dp=want_mu or want_lc, need_scal=False, **side)
    grads = (*o.chain(dxp, dmup, dsx, dsmu, (want_x, want_mu, want_lc, want_beta)),
             *(scal if scal is not None else (None, None)))
    wanted = (want_x, want_mu, want_lc, want_beta, want_lam, want_gamma)
    return tuple(g.to(t.dtype).reshape(t.shape) if w else _no_grad(t) for g, t, w in zip(grads, inputs, wanted))
