"""The backward of both op families: ONE kernel, specialised by constexpr flags (the way
cut-cross-entropy specialises its kernels), and its launcher.

    CE = 0  logits family: G = ∂loss/∂logits is read from `grad` through its strides (stride 0 from
            an expanded gradient works in place). FROM_LOGITS: a = sqrt(q + eps) comes back from the
            forward's logits, a = −logit/γ − λ·r (r = sqrt(s² + eps) from the rank-one s), instead of
            a recomputed GEMM tile, so each side costs one GEMM (P·oth') like nn.Linear's backward;
            where γ = 0 (the logits carry no d) the second launch recomputes the tiles. Half logits
            take the recomputed tile (their rounding would put a off by ~4e-3).
    CE = 1  cross-entropy family: nothing of size [B, C] exists; each tile recomputes q and
            G = w_lse·exp(logit' − lse) + v_c·(w_sl + w_pl·P_bc) + Σ_k w_tl,k·[c = t_k],
            logit' = −γ·(d + margin·[c ∈ t]), with every target pair taken through the exact path
            (the margin sits on it); class weights v (HAS_WEIGHT) and the dense probability
            target P (HAS_SOFT, read through its strides) are optional, N_TGT targets per row.

The kernel runs twice per op, once per side (x' rows, then mu' rows: own and other swap roles; s
and the raw difference change sign with them, which the formulas absorb). A program owns a block
of rows of its side and a chunk of D, walks the other side tile by tile, and with H = −γ·G,
P = H/a, R = H·λ·s/r accumulates
    ∂own'_i = rowsum(P)_i·own'_i − (P·oth')_i      (far pairs: one tl.dot per tile)
            + Σ_j P_ij·((own_i − oth_j)·Lc)         (pairs at risk: from the raw difference)
    ∂s_own  = rowsum(R);   ∂λ = Σ H·r,  ∂γ = −Σ G·dist  (x side only; dist = d + margin·[c = t])
Pairs at risk (q < tau·(|own'|² + |oth'|²), SPEC §2.1, and every CE target) contribute nothing to
the tile sums: the loop notes them and all their terms are added after it from the exact q, in the
order met, so every sum runs in the same order on every call: the results are deterministic (no
float atomics). A program meeting more than `configs.BWD_NEAR_CAP` of them sets a flag, and the
launcher's second launch (INLINE) recomputes everything with them handled inside the loop one at a
time; without the flag that launch does nothing. Where the other side is long and the own side
short, it is split across programs whose partial sums are added in a fixed order afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, configs
from .common import (_at_risk, _cast, _direct_distance, _direct_pairs, _gemm_q, _load_eps, _mm, _pair_distance, _pair_s,
                     _s_at_risk, _tile_dot)


@triton.jit
def _ce_grad(d, is_t, w_t, w_lse, lin, lse, gamma, margin):
    """(G, dist) of the cross-entropy: dist = d + margin·[target], logit' = −γ·dist,
    G = ∂loss/∂logit' = w_lse·exp(logit' − lse) + lin + w_t, with lin = v·(w_sl + w_pl·P) and w_t
    the summed w_tl of the row's targets on this class."""
    dist = d + tl.where(is_t, margin, 0.0)
    G = w_lse * tl.exp(-gamma * dist - lse) + lin + w_t
    return G, dist


@triton.jit
def _ce_pair_data(row, cls, row_m, cls_m, m, tgt_ptr, w_tl_ptr, w_sl_ptr, w_pl_ptr, cw_ptr, soft_ptr,
                  stride_sb, stride_sc, acc_t: tl.constexpr, N_TGT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SOFT: tl.constexpr):
    """(is_t, w_t, lin) of _ce_grad for the pairs (row, cls), masked by m: is_t, cls is one of the
    row's targets; w_t = Σ_k w_tl[row, k]·[cls = t_k]; lin = v_cls·(w_sl[row] + w_pl[row]·P[row, cls]).
    row and cls broadcast to m's shape ([O, 1] and [1, T] in a tile: the per-row data is loaded once
    per row, masked by row_m, the per-class data once per class, by cls_m)."""
    is_t = (row < 0) & m
    w_t = tl.where(m, 0.0, 0.0).to(acc_t)
    for k in tl.static_range(N_TGT):
        hit = (tl.load(tgt_ptr + row * N_TGT + k, mask=row_m, other=-1) == cls) & m
        is_t = is_t | hit
        w_t += tl.where(hit, tl.load(w_tl_ptr + row * N_TGT + k, mask=row_m, other=0.0).to(acc_t), 0.0)
    lin = tl.load(w_sl_ptr + row, mask=row_m, other=0.0).to(acc_t)
    if HAS_SOFT:
        p = tl.load(soft_ptr + row * stride_sb + cls * stride_sc, mask=m, other=0.0).to(acc_t)
        lin = lin + tl.load(w_pl_ptr + row, mask=row_m, other=0.0).to(acc_t) * p
    if HAS_WEIGHT:
        lin = lin * tl.load(cw_ptr + cls, mask=cls_m, other=0.0).to(acc_t)
    return is_t, w_t, lin


@triton.jit
def _exact_terms(own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, b_v, j_v, em, d0, D,
                 s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                 tgt_ptr, w_lse_ptr, w_tl_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                 w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                 CE: tl.constexpr, OWN_IS_X: tl.constexpr, FULL: tl.constexpr, NP: tl.constexpr,
                 NEAR_K: tl.constexpr, BLOCK_D: tl.constexpr, NEAR_DOT: tl.constexpr,
                 N_TGT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFT: tl.constexpr):
    """The terms of NP pairs at risk (own row b_v, other row j_v; em masks the block) from the raw
    difference: (P·diff'[:, d0 : d0 + BLOCK_D], R, H·r, G·dist), zero where ~em."""
    q, diff, s_direct = _direct_pairs(own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, b_v, j_v, em, d0, D, FULL, NP,
                                      NEAR_K, BLOCK_D,
                            NEAR_DOT)
    acc_t = diff.dtype  # the compute dtype (q itself is float64)
    s = ((tl.load(s_own_hi_ptr + b_v, mask=em, other=0.0) - tl.load(s_oth_hi_ptr + j_v, mask=em, other=0.0))
         + (tl.load(s_own_lo_ptr + b_v, mask=em, other=0.0) - tl.load(s_oth_lo_ptr + j_v, mask=em, other=0.0)))
    a, r, d, ia, ir, s = _direct_distance(q, s_direct, s, lam, eps)
    if CE:
        if OWN_IS_X:
            row, cls = b_v, j_v
        else:
            row, cls = j_v, b_v
        is_t, w_t, lin = _ce_pair_data(row, cls, em, em, em, tgt_ptr, w_tl_ptr, w_sl_ptr, w_pl_ptr, cw_ptr,
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
def _backward_kernel(
        own_ptr, oth_ptr, own_n_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr,
        own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr,
        g_ptr, stride_g_own, stride_g_oth,                          # logits family: ∂loss/∂logits
        lg_ptr, stride_lg_own, stride_lg_oth,                       # FROM_LOGITS: the forward's logits
        tgt_ptr, w_lse_ptr, w_tl_ptr, w_sl_ptr, lse_ptr, margin_ptr,  # CE family: [B] each, batch side
        w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,             # CE: w_pl [B], weights [C], P [B, C]
        lam_ptr, gamma_ptr, dp_ptr, ds_ptr, scal_ptr, near_ptr, overflow_ptr,
        n_own, n_oth, D, eps_hi, eps_lo, tau, oth_per_split, near_cap,
        KEY_O, KEY_T, KEY_V,  # power-of-two buckets of n_own and n_oth, the variant: the autotuning key only
        BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        CE: tl.constexpr, OWN_IS_X: tl.constexpr, FROM_LOGITS: tl.constexpr, GAMMA0: tl.constexpr,
        FULL: tl.constexpr, INLINE: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr, NEAR_P: tl.constexpr,
        NEAR_K: tl.constexpr, NEAR_DOT: tl.constexpr, BF16_BY_HAND: tl.constexpr, LOCAL64: tl.constexpr,
        N_TGT: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_SOFT: tl.constexpr):
    """Partial ∂own'[rows, chunk of D] over one split of the other side (module docstring).

    grid = (row blocks of own, splits of oth, chunks of D). Writes dp[split, row, d] (acc dtype),
    ds[split, row] = Σ R (float64, chunk 0 only) and, with OWN_IS_X, scal[split, row block] =
    (Σ H·r, −Σ G·dist) (float64, chunk 0 only). The CE family's row data (target, weights, lse)
    belongs to the batch side: indexed by own rows when OWN_IS_X, else by the other side's.

    FROM_LOGITS takes q from the logits tile instead of a GEMM tile and does its work only where
    γ ≠ 0; the INLINE launch that follows it (GAMMA0) recomputes the tiles and also runs where γ = 0
    (the logits carry no d there). A runtime branch between the two sources inside the loop spilled
    7.5-8.8 KB per thread in sm_90 builds (the GEMM under an scf.if), so the choice is made per
    launch, on the device: no host sync.

    Pairs at risk are left out of the tile terms and added from the raw difference. INLINE = 0:
    the loop only notes them (in near_ptr, near_cap per program, in tile order) and they are
    handled after it, NEAR_P at a time; the loop keeps its registers for the GEMM epilogue. If a
    program meets more than near_cap of them it sets *overflow_ptr, and the launcher's second
    launch, INLINE = 1, recomputes everything with them handled inside the loop one at a time;
    with *overflow_ptr unset that launch does nothing.
    Operands of both GEMMs come through the pipelined loads; holding the own block in registers
    across the loop, as flash attention holds Q, spilled 0.2-1.8 KB per thread in sm_90 builds.
    """
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    acc_t = own_n_ptr.dtype.element_ty
    op_t = own_ptr.dtype.element_ty

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
    if LOCAL64:
        g_rows = lo.to(tl.int64)[:, None] * stride_g_own
        lg_rows = lo.to(tl.int64)[:, None] * stride_lg_own
    else:
        g_rows = lo[:, None] * stride_g_own
        lg_rows = lo[:, None] * stride_lg_own
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    margin = 0.0
    if CE:
        margin = tl.load(margin_ptr).to(acc_t)
        if OWN_IS_X:
            w_lse_o = tl.load(w_lse_ptr + ro, mask=om, other=0.0).to(acc_t)
            lse_o = tl.load(lse_ptr + ro, mask=om, other=0.0).to(acc_t)
    rowsum = tl.zeros((BLOCK_O,), dtype=acc_t)              # Σ_j P_ij over far pairs
    pm_acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=acc_t)      # Σ_j P_ij·oth'_j − near terms
    rsum = tl.zeros((BLOCK_O,), dtype=tl.float64)           # Σ_j R_ij
    hr = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j H_ij·r_ij
    gd = tl.zeros((BLOCK_O,), dtype=tl.float64)             # Σ_j G_ij·dist_ij
    zero = tl.zeros((BLOCK_O, BLOCK_T), dtype=acc_t)
    flat = tl.arange(0, BLOCK_O)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    rloc = tl.arange(0, BLOCK_O)
    n_noted = tl.full([], 0, dtype=tl.int32)
    note_base = ((pid_o.to(tl.int64) * tl.num_programs(1) + pid_s) * tl.num_programs(2) + pid_d) * near_cap

    t_begin = pid_s * oth_per_split
    t_end = tl.minimum(t_begin + oth_per_split, n_oth)
    # Which launch does the work: a FROM_LOGITS launch only where γ ≠ 0; the INLINE launch after an
    # overflow and, with GAMMA0 (it follows a FROM_LOGITS launch), also where γ = 0.
    active = pid_o >= 0
    if FROM_LOGITS:
        active = gamma != 0
    if INLINE:
        active = tl.load(overflow_ptr) != 0
        if GAMMA0:
            active = active | (gamma == 0)
    t_end = tl.where(active, t_end, t_begin)
    for t0 in range(t_begin, t_end, BLOCK_T):
        lt = tl.arange(0, BLOCK_T)
        tm = lt < t_end - t0
        rt = tl.cast(t0, tl.int64) + lt
        oth_block = oth_ptr + tl.cast(t0, tl.int64) * D
        valid = om[:, None] & tm[None, :]
        oth_n = tl.load(oth_n_ptr + t0 + lt, mask=tm, other=0.0)
        s_oth_hi = tl.load(s_oth_hi_ptr + t0 + lt, mask=tm, other=0.0)
        s = _pair_s(s_own_hi, s_own_lo, s_oth_hi, tl.load(s_oth_lo_ptr + t0 + lt, mask=tm, other=0.0))
        if FROM_LOGITS:
            # a from the forward's logits (d = a + λ·r); a < 0 from rounding clamps to 0, which
            # puts q = −eps under the at-risk bound: such a pair takes the exact path.
            lg_block = lg_ptr + (o0.to(tl.int64) * stride_lg_own + tl.cast(t0, tl.int64) * stride_lg_oth)
            lg = tl.load(lg_block + lg_rows + lt[None, :] * stride_lg_oth, mask=valid, other=0.0).to(acc_t)
            a_l = tl.maximum(-lg / gamma - lam * tl.sqrt(s * s + eps), 0.0)
            q = a_l * a_l - eps
        else:
            q, _ = _gemm_q(_tile_dot(own_block, oth_block, lo, lt, om, tm, D, zero, BLOCK_K, IMPL, PREC),
                           own_n, oth_n, tau)
        near = (_at_risk(q, own_n[:, None] + oth_n[None, :], tau) | _s_at_risk(s, s_own_hi, s_oth_hi)) & valid
        # The chunk of oth' this program's output needs (read again: it is in L2 after the GEMM).
        oth = tl.load(oth_block + lt[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        a, r, d, ia, ir = _pair_distance(q, s, lam, eps)
        if CE:
            if OWN_IS_X:  # batch rows down the tile, classes across
                ce_row, ce_cls, row_m, cls_m = ro[:, None], rt[None, :], om[:, None], tm[None, :]
                w_lse, lse = w_lse_o[:, None], lse_o[:, None]
            else:
                ce_row, ce_cls, row_m, cls_m = rt[None, :], ro[:, None], tm[None, :], om[:, None]
                w_lse = tl.load(w_lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :]
                lse = tl.load(lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :]
            is_t, w_t, lin = _ce_pair_data(ce_row, ce_cls, row_m, cls_m, valid, tgt_ptr, w_tl_ptr, w_sl_ptr, w_pl_ptr,
                                           cw_ptr, soft_ptr, stride_sb, stride_sc, acc_t, N_TGT, HAS_WEIGHT,
                                           HAS_SOFT)
            near = near | is_t  # the target pairs carry the margin: always exact
            G, dist = _ce_grad(d, is_t, w_t, w_lse + zero, lin, lse + zero, gamma, margin)
        else:
            g_block = g_ptr + (o0.to(tl.int64) * stride_g_own + tl.cast(t0, tl.int64) * stride_g_oth)
            G = tl.load(g_block + g_rows + lt[None, :] * stride_g_oth, mask=valid, other=0.0).to(acc_t)
            dist = d
        far = valid & (near == 0)
        G = tl.where(far, G, 0.0)
        H = -gamma * G
        P = tl.where(far & (a != 0), H * ia, 0.0)
        R = tl.where(far & (r != 0), H * lam * s * ir, 0.0)
        rowsum += tl.sum(P, axis=1)
        pm_acc = _mm(_cast(P, op_t, BF16_BY_HAND), oth, pm_acc, IMPL, PREC)
        rsum += tl.sum(R, axis=1).to(tl.float64)
        if OWN_IS_X:
            hr += tl.sum(tl.where(far, H * r, 0.0), axis=1).to(tl.float64)
            gd += tl.sum(tl.where(far, G * dist, 0.0), axis=1).to(tl.float64)

        n_near = tl.sum(near.to(tl.int32))
        if INLINE:
            # One at a time in increasing tile position, all their terms from the raw difference.
            for _k in range(0, n_near):
                f = tl.min(tl.where(near, flat, BLOCK_O * BLOCK_T))
                near = near & (flat != f)
                i = f // BLOCK_T
                b_v = tl.zeros((1,), dtype=tl.int64) + o0.to(tl.int64) + i
                j_v = tl.zeros((1,), dtype=tl.int64) + t0 + f % BLOCK_T
                pd, R_e, hr_e, gd_e = _exact_terms(
                    own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, b_v, j_v, b_v >= 0, pid_d * BLOCK_D, D,
                    s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                    tgt_ptr, w_lse_ptr, w_tl_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                    w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                    CE, OWN_IS_X, FULL, 1, NEAR_K, BLOCK_D, False, N_TGT, HAS_WEIGHT, HAS_SOFT)
                row = rloc == i
                pm_acc -= tl.where(row[:, None], pd, 0.0)
                rsum += tl.where(row, tl.sum(R_e), 0.0).to(tl.float64)
                if OWN_IS_X:
                    hr += tl.where(row, tl.sum(hr_e), 0.0).to(tl.float64)
                    gd += tl.where(row, tl.sum(gd_e), 0.0).to(tl.float64)
        else:
            # Note them (code j·BLOCK_O + i) for after the loop; typically zero to two per tile.
            if n_noted + n_near > near_cap:
                tl.atomic_max(overflow_ptr, 1, sem="relaxed")
            else:
                for _k in range(0, n_near):
                    f = tl.min(tl.where(near, flat, BLOCK_O * BLOCK_T))
                    near = near & (flat != f)
                    tl.store(near_ptr + note_base + n_noted + _k,
                             (t0 + f % BLOCK_T).to(tl.int64) * BLOCK_O + f // BLOCK_T)
                n_noted += n_near

    if not INLINE:
        # The noted pairs, NEAR_P at a time, added to their rows through a one-hot product.
        # (After an overflow the second launch overwrites this program's results.)
        for e0 in range(0, n_noted, NEAR_P):
            e = e0 + tl.arange(0, NEAR_P)
            em = e < n_noted
            code = tl.load(near_ptr + note_base + e, mask=em, other=0)
            i_v = (code % BLOCK_O).to(tl.int32)
            pd, R_e, hr_e, gd_e = _exact_terms(
                own_raw_ptr, oth_raw_ptr, lc_ptr, beta_ptr, o0.to(tl.int64) + i_v, code // BLOCK_O, em,
                pid_d * BLOCK_D, D,
                s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr, g_ptr, stride_g_own, stride_g_oth,
                tgt_ptr, w_lse_ptr, w_tl_ptr, w_sl_ptr, lse_ptr, lam, gamma, eps, margin,
                w_pl_ptr, cw_ptr, soft_ptr, stride_sb, stride_sc,
                CE, OWN_IS_X, FULL, NEAR_P, NEAR_K, BLOCK_D, NEAR_DOT, N_TGT, HAS_WEIGHT, HAS_SOFT)
            onehot = (rloc[:, None] == i_v[None, :]) & em[None, :]
            pm_acc = _mm(onehot.to(acc_t), -pd, pm_acc, 2 if IMPL == 2 else 0, "ieee")
            rsum += tl.sum(tl.where(onehot, R_e[None, :], 0.0), axis=1).to(tl.float64)
            if OWN_IS_X:
                hr += tl.sum(tl.where(onehot, hr_e[None, :], 0.0), axis=1).to(tl.float64)
                gd += tl.sum(tl.where(onehot, gd_e[None, :], 0.0), axis=1).to(tl.float64)

    if active:
        own = tl.load(own_block + lo[:, None] * D + rd[None, :], mask=om[:, None] & dm[None, :], other=0.0)
        d_own = rowsum[:, None] * own.to(acc_t) - pm_acc
        out_row0 = pid_s.to(tl.int64) * n_own + o0
        tl.store(dp_ptr + out_row0 * D + lo[:, None] * D + rd[None, :], d_own, mask=om[:, None] & dm[None, :])
        if pid_d == 0:
            tl.store(ds_ptr + out_row0 + lo, rsum, mask=om)
            if OWN_IS_X:
                slot = (pid_s.to(tl.int64) * tl.num_programs(0) + pid_o) * 2
                tl.store(scal_ptr + slot, tl.sum(hr))
                tl.store(scal_ptr + slot + 1, -tl.sum(gd))


_TUNED = {name: configs.tuned(_backward_kernel, cfgs, ["KEY_O", "KEY_T", "KEY_V", "D"], reset=["scal_ptr"])
          for name, cfgs in configs.BWD_CONFIGS.items()}


def backward_side(o, own_is_x: bool, grad=None, logits=None, ce=None):
    """One pass of the kernel for `o` (a common.Operands), own side x' (own_is_x) or mu'.
    Logits family: grad [B, C] (any strides) and, for FROM_LOGITS, the forward's logits (None:
    recompute the tiles). CE family: ce = (target [B, N_TGT], w_lse, w_tl, w_sl, w_pl, lse, margin,
    class weights, dense target, its two strides, constexpr flags) from cross_entropy._options. Returns (∂own' [n_own, D] in the compute dtype, ∂s_own [n_own] float64,
    (Σ H·r, −Σ G·dist) as 0-dim float64 tensors on the x side, else None)."""
    if own_is_x:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.xp, o.mup, o.xn, o.mn, o.sx, o.smu, o.x, o.mu
    else:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.mup, o.xp, o.mn, o.xn, o.smu, o.sx, o.mu, o.x
    n_own, n_oth, D = own.shape[0], oth.shape[0], o.D
    family = o.family
    block_d = min(configs.BWD_BLOCK_D[family], max(16, triton.next_power_of_2(D)))
    n_chunks = max(1, triton.cdiv(D, block_d))  # D = 0 still needs ds and the scalars
    # Split the other side when the own side alone would leave the device idle; each split's
    # partial sums are added afterwards in a fixed order.
    min_rows = min(c.kwargs["BLOCK_O"] for c in configs.BWD_CONFIGS[family])
    programs = triton.cdiv(n_own, 64) * n_chunks
    splits = max(1, min(triton.cdiv(common.parallel_width(o.device), programs), triton.cdiv(n_oth, 256)))
    if family == "interpret":
        splits = max(1, min(2, triton.cdiv(n_oth, 32)))
    per_split = triton.cdiv(triton.cdiv(n_oth, splits), 32) * 32
    splits = triton.cdiv(n_oth, per_split)
    dp = common._empty((splits, n_own, D), o.acc, o.device)
    ds = common._empty((splits, n_own), torch.float64, o.device)
    scal = torch.zeros((splits, triton.cdiv(n_own, min_rows), 2), dtype=torch.float64, device=o.device)
    near_cap = configs.BWD_NEAR_CAP
    notes = torch.empty(triton.cdiv(n_own, min_rows) * splits * n_chunks * near_cap, dtype=torch.int64,
                        device=o.device)
    overflow = torch.zeros(1, dtype=torch.int32, device=o.device)

    is_ce = ce is not None
    from_logits = logits is not None
    if is_ce:
        g, g_strides, lg, lg_strides = o.lam, (0, 0), o.lam, (0, 0)
        target, w_lse, w_tl, w_sl, w_pl, lse, margin, cw, soft, s_b, s_c, ce_flags = ce
    else:
        g = grad
        g_strides = (g.stride(0), g.stride(1)) if own_is_x else (g.stride(1), g.stride(0))
        lg = logits if from_logits else g
        lg_strides = (lg.stride(0), lg.stride(1)) if own_is_x else (lg.stride(1), lg.stride(0))
        target = w_lse = w_tl = w_sl = w_pl = lse = margin = cw = soft = o.lam
        s_b = s_c = 0
        ce_flags = dict(N_TGT=1, HAS_WEIGHT=False, HAS_SOFT=False)
    near_p, near_k, _, near_dot = o.near_tiles()
    grid = lambda meta: (triton.cdiv(n_own, meta["BLOCK_O"]), splits, n_chunks)  # noqa: E731
    args = (own, oth, own_n, oth_n, *s_own, *s_oth, own_raw, oth_raw, o.lc, o.beta,
            g, *g_strides, lg, *lg_strides, target, w_lse, w_tl, w_sl, lse, margin,
            w_pl, cw, soft, s_b, s_c, o.lam, o.gamma, dp, ds, scal, notes, overflow,
            n_own, n_oth, D, o.eps_hi, o.eps_lo, o.tau, per_split, near_cap,
            triton.next_power_of_2(n_own), triton.next_power_of_2(n_oth))
    strides = [abs(v) for v in (*g_strides, *lg_strides)]
    meta = dict(BLOCK_D=block_d, CE=is_ce, OWN_IS_X=own_is_x, FULL=o.full, IMPL=o.impl,
                PREC=o.prec, NEAR_P=near_p, NEAR_K=near_k, NEAR_DOT=near_dot, BF16_BY_HAND=o.bf16_by_hand,
                LOCAL64=256 * max(strides[0] + strides[1], strides[2] + strides[3]) >= 2 ** 31,
                N_TGT=ce_flags["N_TGT"], HAS_WEIGHT=ce_flags["HAS_WEIGHT"], HAS_SOFT=ce_flags["HAS_SOFT"])
    with common.device_ctx(o.device):
        # The first launch notes its pairs at risk (from the logits where given, doing nothing where
        # γ = 0); the INLINE launch does nothing unless a program overflowed its notes, or (after a
        # launch from the logits) γ = 0. It recomputes the tiles.
        _TUNED[family][grid](*args, 2 * is_ce + from_logits, INLINE=False, FROM_LOGITS=from_logits, GAMMA0=False,
                             **meta)
        _TUNED[family][grid](*args, 2 * is_ce, INLINE=True, FROM_LOGITS=False, GAMMA0=from_logits, **meta)
    d_own = dp.view(n_own, D) if splits == 1 else dp.sum(0)
    ds_own = ds.view(n_own) if splits == 1 else ds.sum(0)
    scalar_sums = (scal[..., 0].sum(), scal[..., 1].sum()) if own_is_x else None
    return d_own, ds_own, scalar_sums
