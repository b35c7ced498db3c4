"""Triton kernels for the fused cross-entropy op (SPEC §2.2), for CUDA tensors, and for CPU
tensors through Triton's interpreter (TRITON_INTERPRET=1 set before triton is imported). The op
contract, the loss and the autograd formula are in randers_cross_entropy.py. Kernels first, then
the launchers, then the torch.library ops.

The launchers prepare x' = (x − m)·Lc, mu' = (mu − m)·Lc, sx, smu as the logits kernels do
(transform.Project, then randers_logits_triton._Prepared: norms, s as hi + lo, the GEMM
precision mode); on the GPU the [C, D] mu' is small next to the [B, C] logits it replaces. They
chain the kernels' ∂x', ∂mu', ∂sx, ∂smu back to the op's raw inputs.

  _ce_fwd_kernel   grid (row blocks, class splits). Each program walks its split's class tiles:
                   one GEMM tile x'·mu'ᵀ (tl.dot over D), the epilogue (q, s, d, logit' with the
                   margin on the target), and an online logsumexp (running max and sum, as in
                   flash attention) plus Σ logits and the target logit. Only these per-row
                   statistics leave the kernel: [splits, B] partials, merged in a fixed order.
  _ce_bwd_kernel   run twice, once per side (x' rows, then mu' rows: own and other swap roles;
                   s and the raw difference change sign with them, which the formulas absorb).
                   A program owns a block of rows and a chunk of D, walks the other side tile by
                   tile, recomputes the logits, G = w_lse·softmax + w_sl + w_tl·[c = t], H = −γ·G,
                   P = H/a, R = H·λ·s/r, and accumulates
                       ∂own'_i = rowsum(P)_i·own'_i − (P·oth')_i        (far pairs, tl.dot)
                               + Σ_j P_ij·((own_i − oth_j)·Lc)           (pairs at risk, exact)
                       ∂s_own = rowsum(R);  ∂λ = Σ H·r,  ∂γ = −Σ G·(d + margin·[c = t])  (x side)
                   Partials over splits of the other side are summed in a fixed order: no float
                   atomics, deterministic results. Each pass recomputes its GEMM tiles, so the
                   backward costs four GEMM-sized products (the forward one).

Exactness (SPEC §2.1): a pair is recomputed from the raw difference (x_b − mu_c)·Lc when
q < tau·(|x'_b|² + |mu'_c|²), and every target pair is, so the target logit and the margin are
exact. Those pairs are taken one at a time in a fixed order inside the program. float32 GEMM
tiles follow the logits kernels' mode: IEEE fp32, or TF32 where torch.backends.cuda.matmul.
allow_tf32 is set (operands rounded first, tau raised for it); float64 runs as broadcast-
multiply-sum. float16/bfloat16 inputs arrive here converted to float32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import transform as _transform
from .randers_cross_entropy import register_ce_op_pair
# The logits kernels' shared pieces: GEMM tiles, the at-risk test, the pair epilogue, the exact
# recomputation from the raw difference, and the launch-side preparation (norms, s as hi + lo,
# eps, the GEMM precision mode with its tau).
from .randers_logits_triton import (_Prepared, _device_ctx, _direct_pairs, _gemm_q, _mm, _pair_distance, _pair_s,
                                    _parallel_width, _tile_dot)


# ----------------------------------------------------------------------------------------------
# @triton.jit pieces
# ----------------------------------------------------------------------------------------------

@triton.jit
def _pair_grad(q, s, is_t, w_lse, w_tl, w_sl, lse, lam, gamma, eps, margin):
    """The backward's per-pair terms, for tiles or single pairs alike:
    dist = d + margin·[target], G = w_lse·exp(logit' − lse) + w_sl + w_tl·[target], H = −γ·G,
    P = H/a, R = H·λ·s/r (a = 0 only at an exact hit with eps = 0: subgradient 0; NaN stays NaN)."""
    a, r, d, ia, ir = _pair_distance(q, s, lam, eps)
    dist = d + tl.where(is_t, margin, 0.0)
    G = w_lse * tl.exp(-gamma * dist - lse) + w_sl + tl.where(is_t, w_tl, 0.0)
    H = -gamma * G
    P = tl.where(a == 0, 0.0, H * ia)
    R = tl.where(r == 0, 0.0, H * lam * s * ir)
    return r, dist, G, H, P, R


@triton.jit
def _exact_q(raw_a, raw_b, lc_ptr, i, j, D, d_keep,
             FULL: tl.constexpr, NEAR_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """(q, diff'[d_keep : d_keep + BLOCK_D]) of the single pair (i, j) from the raw rows:
    _direct_pairs with a block of one pair."""
    one = tl.full((1,), 1, dtype=tl.int1)
    q, kept = _direct_pairs(raw_a, raw_b, lc_ptr, tl.zeros((1,), dtype=tl.int64) + i,
                            tl.zeros((1,), dtype=tl.int64) + j, one, d_keep, D, FULL, 1, NEAR_K, BLOCK_D, False)
    return tl.sum(q, axis=0), tl.sum(kept, axis=0)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _ce_fwd_kernel(
        xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr,
        x_ptr, mu_ptr, lc_ptr, tgt_ptr, lam_ptr, gamma_ptr, margin_ptr, part_ptr,
        B, C, D, eps_hi, eps_lo, tau, cols_per_split,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
        NEAR_K: tl.constexpr, FULL: tl.constexpr, IMPL: tl.constexpr, PREC: tl.constexpr):
    """Per-row statistics over one split of the classes: part[0..3, split, row] = running max,
    Σ exp(logit' − max), Σ logit', target logit' (float64)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_t = xn_ptr.dtype.element_ty
    rb = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rb < B
    xn = tl.load(xn_ptr + rb, mask=bm, other=0.0)
    sx_hi = tl.load(sx_hi_ptr + rb, mask=bm, other=0.0)
    sx_lo = tl.load(sx_lo_ptr + rb, mask=bm, other=0.0)
    tgt = tl.load(tgt_ptr + rb, mask=bm, other=-1)
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    margin = tl.load(margin_ptr).to(acc_t)
    eps = tl.cast(eps_hi, acc_t) + tl.cast(eps_lo, acc_t)
    flat = tl.arange(0, BLOCK_B)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]

    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=acc_t)
    run_sum = tl.zeros((BLOCK_B,), dtype=acc_t)
    sum_logit = tl.zeros((BLOCK_B,), dtype=tl.float64)
    t_logit = tl.zeros((BLOCK_B,), dtype=acc_t)
    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        rc = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cm = rc < c_end
        valid = bm[:, None] & cm[None, :]
        dot = _tile_dot(xp_ptr, mup_ptr, rb, rc, bm, cm, D, tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_t),
                        BLOCK_K, IMPL, PREC)
        q, near = _gemm_q(dot, xn, tl.load(mn_ptr + rc, mask=cm, other=0.0), tau)
        is_t = (tgt[:, None] == rc[None, :]) & valid
        near = (near | is_t) & valid
        for _ in range(0, tl.sum(near.to(tl.int32))):  # pairs at risk and targets, in tile order
            f = tl.min(tl.where(near, flat, BLOCK_B * BLOCK_C))
            near = near & (flat != f)
            q_e, _ = _exact_q(x_ptr, mu_ptr, lc_ptr, pid_b.to(tl.int64) * BLOCK_B + f // BLOCK_C,
                              c0 + f % BLOCK_C, D, -1, FULL, NEAR_K, BLOCK_D)
            q = tl.where(flat == f, q_e, q)
        s = _pair_s(sx_hi, sx_lo, tl.load(smu_hi_ptr + rc, mask=cm, other=0.0),
                    tl.load(smu_lo_ptr + rc, mask=cm, other=0.0))
        _, _, d, _, _ = _pair_distance(q, s, lam, eps)
        logit = -gamma * (d + tl.where(is_t, margin, 0.0))
        masked = tl.where(valid, logit, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, axis=1))
        ref = tl.where(new_max > float("-inf"), new_max, 0.0)  # −inf − (−inf) would be NaN
        run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.where(valid, tl.exp(masked - ref[:, None]), 0.0), axis=1)
        run_max = new_max
        sum_logit += tl.sum(tl.where(valid, logit, 0.0), axis=1).to(tl.float64)
        t_logit += tl.sum(tl.where(is_t, logit, 0.0), axis=1)

    out = pid_s.to(tl.int64) * B + rb
    n = tl.num_programs(1).to(tl.int64) * B
    tl.store(part_ptr + out, run_max.to(tl.float64), mask=bm)
    tl.store(part_ptr + n + out, run_sum.to(tl.float64), mask=bm)
    tl.store(part_ptr + 2 * n + out, sum_logit, mask=bm)
    tl.store(part_ptr + 3 * n + out, t_logit.to(tl.float64), mask=bm)


@triton.jit
def _ce_bwd_kernel(
        own_ptr, oth_ptr, own_n_ptr, oth_n_ptr, s_own_hi_ptr, s_own_lo_ptr, s_oth_hi_ptr, s_oth_lo_ptr,
        own_raw_ptr, oth_raw_ptr, lc_ptr, tgt_ptr, w_lse_ptr, w_tl_ptr, w_sl_ptr, lse_ptr,
        lam_ptr, gamma_ptr, margin_ptr, dp_ptr, ds_ptr, red_ptr,
        n_own, n_oth, D, eps_hi, eps_lo, tau, oth_per_split,
        OWN_IS_X: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_D: tl.constexpr, NEAR_K: tl.constexpr, FULL: tl.constexpr, IMPL: tl.constexpr,
        PREC: tl.constexpr):
    """Partial ∂own'[rows, chunk of D] over one split of the other side (module docstring).
    grid = (row blocks of own, splits of oth, chunks of D). Writes dp[split, row, d] (compute
    dtype), ds[split, row] = Σ R and, on the x side, red[split, row block] = (Σ H·r, −Σ G·dist)
    (float64; chunk 0 only). The batch side's row data (target, weights, lse) is indexed by own
    rows when OWN_IS_X, else by the other side's."""
    pid_o = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_d = tl.program_id(2)
    acc_t = own_n_ptr.dtype.element_ty
    ro = pid_o.to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    om = ro < n_own
    rd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = rd < D
    own_n = tl.load(own_n_ptr + ro, mask=om, other=0.0)
    s_own_hi = tl.load(s_own_hi_ptr + ro, mask=om, other=0.0)
    s_own_lo = tl.load(s_own_lo_ptr + ro, mask=om, other=0.0)
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    margin = tl.load(margin_ptr).to(acc_t)
    eps = tl.cast(eps_hi, acc_t) + tl.cast(eps_lo, acc_t)
    zero = tl.zeros((BLOCK_O, BLOCK_T), dtype=acc_t)
    if OWN_IS_X:
        tgt_o = tl.load(tgt_ptr + ro, mask=om, other=-1)
        w_lse_o = tl.load(w_lse_ptr + ro, mask=om, other=0.0).to(acc_t)
        w_tl_o = tl.load(w_tl_ptr + ro, mask=om, other=0.0).to(acc_t)
        w_sl_o = tl.load(w_sl_ptr + ro, mask=om, other=0.0).to(acc_t)
        lse_o = tl.load(lse_ptr + ro, mask=om, other=0.0).to(acc_t)
    flat = tl.arange(0, BLOCK_O)[:, None] * BLOCK_T + tl.arange(0, BLOCK_T)[None, :]
    rloc = tl.arange(0, BLOCK_O)

    rowsum = tl.zeros((BLOCK_O,), dtype=acc_t)          # Σ_j P_ij over far pairs
    pm_acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=acc_t)  # Σ_j P_ij·oth'_j (far) − Σ P_ij·diff'_ij (near)
    rsum = tl.zeros((BLOCK_O,), dtype=tl.float64)       # Σ_j R_ij
    hr = tl.zeros((BLOCK_O,), dtype=tl.float64)         # Σ_j H_ij·r_ij
    gd = tl.zeros((BLOCK_O,), dtype=tl.float64)         # Σ_j G_ij·dist_ij
    t_begin = pid_s * oth_per_split
    t_end = tl.minimum(t_begin + oth_per_split, n_oth)
    for t0 in range(t_begin, t_end, BLOCK_T):
        rt = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
        tm = rt < t_end
        valid = om[:, None] & tm[None, :]
        S = _tile_dot(own_ptr, oth_ptr, ro, rt, om, tm, D, zero, BLOCK_K, IMPL, PREC)
        q, near = _gemm_q(S, own_n, tl.load(oth_n_ptr + rt, mask=tm, other=0.0), tau)
        s = _pair_s(s_own_hi, s_own_lo, tl.load(s_oth_hi_ptr + rt, mask=tm, other=0.0),
                    tl.load(s_oth_lo_ptr + rt, mask=tm, other=0.0))
        if OWN_IS_X:
            is_t = tgt_o[:, None] == rt[None, :]
            w_lse = w_lse_o[:, None] + zero
            w_tl = w_tl_o[:, None] + zero
            w_sl = w_sl_o[:, None] + zero
            lse = lse_o[:, None] + zero
        else:
            is_t = ro[:, None] == tl.load(tgt_ptr + rt, mask=tm, other=-1)[None, :]
            w_lse = tl.load(w_lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :] + zero
            w_tl = tl.load(w_tl_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :] + zero
            w_sl = tl.load(w_sl_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :] + zero
            lse = tl.load(lse_ptr + rt, mask=tm, other=0.0).to(acc_t)[None, :] + zero
        is_t = is_t & valid
        near = (near | is_t) & valid

        # Pairs at risk and targets, one at a time in tile order: the exact q (for the tile terms
        # below) and the exact ±P·diff' term instead of rowsum(P)·own' − P·oth', which cancels.
        todo = near
        for _ in range(0, tl.sum(near.to(tl.int32))):
            f = tl.min(tl.where(todo, flat, BLOCK_O * BLOCK_T))
            todo = todo & (flat != f)
            hit = flat == f
            i = f // BLOCK_T
            q_e, diff = _exact_q(own_raw_ptr, oth_raw_ptr, lc_ptr, pid_o.to(tl.int64) * BLOCK_O + i,
                                 t0 + f % BLOCK_T, D, pid_d * BLOCK_D, FULL, NEAR_K, BLOCK_D)
            q = tl.where(hit, q_e, q)
            _, _, _, _, P_e, _ = _pair_grad(
                q_e, tl.sum(tl.where(hit, s, 0.0)), tl.sum(tl.where(hit, is_t.to(tl.int32), 0)) > 0,
                tl.sum(tl.where(hit, w_lse, 0.0)), tl.sum(tl.where(hit, w_tl, 0.0)),
                tl.sum(tl.where(hit, w_sl, 0.0)), tl.sum(tl.where(hit, lse, 0.0)), lam, gamma, eps, margin)
            pm_acc -= tl.where(rloc[:, None] == i, P_e * diff[None, :], 0.0)

        r, dist, G, H, P, R = _pair_grad(q, s, is_t, w_lse, w_tl, w_sl, lse, lam, gamma, eps, margin)
        G = tl.where(valid, G, 0.0)
        H = tl.where(valid, H, 0.0)
        P_far = tl.where(valid & (near == 0), P, 0.0)
        rowsum += tl.sum(P_far, axis=1)
        oth = tl.load(oth_ptr + rt[:, None] * D + rd[None, :], mask=tm[:, None] & dm[None, :], other=0.0)
        pm_acc = _mm(P_far.to(oth.dtype), oth, pm_acc, IMPL, PREC)
        rsum += tl.sum(tl.where(valid, R, 0.0), axis=1).to(tl.float64)
        if OWN_IS_X:
            hr += tl.sum(H * r, axis=1).to(tl.float64)
            gd += tl.sum(G * dist, axis=1).to(tl.float64)

    own = tl.load(own_ptr + ro[:, None] * D + rd[None, :], mask=om[:, None] & dm[None, :], other=0.0)
    out_rows = pid_s.to(tl.int64) * n_own + ro
    tl.store(dp_ptr + out_rows[:, None] * D + rd[None, :], rowsum[:, None] * own - pm_acc,
             mask=om[:, None] & dm[None, :])
    if pid_d == 0:
        tl.store(ds_ptr + out_rows, rsum, mask=om)
        if OWN_IS_X:
            slot = (pid_s.to(tl.int64) * tl.num_programs(0) + pid_o) * 2
            tl.store(red_ptr + slot, tl.sum(hr))
            tl.store(red_ptr + slot + 1, -tl.sum(gd))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

# Tile sizes per launch family of the logits kernels (not autotuned): small, wide steps under the
# interpreter, which pays per operation; register-sized tiles for fp32 (IEEE or TF32) on the GPU;
# small ones for float64's broadcast products. BLOCK_D: the widest chunk of D a backward program
# accumulates (wider D is split across programs, each recomputing its GEMM tiles).
_BLOCKS = {
    "interpret": dict(BLOCK_B=16, BLOCK_C=32, BLOCK_K=32, BLOCK_D=64, warps=1),
    "ieee": dict(BLOCK_B=64, BLOCK_C=64, BLOCK_K=32, BLOCK_D=128, warps=4),
    "tf32": dict(BLOCK_B=64, BLOCK_C=64, BLOCK_K=32, BLOCK_D=128, warps=4),
    "fp64": dict(BLOCK_B=16, BLOCK_C=16, BLOCK_K=16, BLOCK_D=32, warps=4),
}


def _empty(shape, dtype, device):
    """Allocation of outputs the kernels must fill completely (the tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _apply_t(v, lc):
    return v * lc if lc.dim() == 1 else v @ lc.T


class _Operands(_Prepared):
    """The logits kernels' preparation (x', mu' in the GEMM's precision, their norms, s as hi + lo,
    eps, tau for the precision mode) from the op's raw inputs, plus the margin and tile sizes."""

    def __init__(self, x, mu, lc, beta, center, lam, gamma, eps, tau, margin):
        if x.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"the Triton cross-entropy kernels compute in float32 or float64, got {x.dtype}")
        with torch.no_grad():  # the shared preparation: (v − m)·Lc and v·beta in float64
            xp, sx = _transform.Project.apply(x.detach(), center.detach(), lc.detach(), beta.detach())
            mup, smu = _transform.Project.apply(mu.detach(), center.detach(), lc.detach(), beta.detach())
        super().__init__(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau)
        self.center = center.detach().to(self.acc)
        self.beta = beta.detach().to(self.acc)
        self.margin = torch.as_tensor(float(margin), dtype=torch.float64, device=self.device)
        self.blocks = dict(_BLOCKS[self.family])
        self.blocks["BLOCK_D"] = min(self.blocks["BLOCK_D"], max(16, triton.next_power_of_2(self.D)))
        self.near_k = self.near_tiles()[1]


def ce_forward(x, mu, lc, beta, center, lam, gamma, target, eps: float, tau: float, margin: float):
    """(lse, tl, sl), float64 [B] each: the op contract of randers_cross_entropy.py."""
    B, C = x.shape[0], mu.shape[0]
    f64 = dict(dtype=torch.float64, device=x.device)
    if B == 0 or C == 0:
        return torch.full((B,), float("-inf"), **f64), torch.zeros(B, **f64), torch.zeros(B, **f64)
    o = _Operands(x, mu, lc, beta, center, lam, gamma, eps, tau, margin)
    bl = o.blocks
    n_rb, n_tiles = triton.cdiv(B, bl["BLOCK_B"]), triton.cdiv(C, bl["BLOCK_C"])
    splits = max(1, min(triton.cdiv(_parallel_width(o.device), n_rb), n_tiles))
    per_split = triton.cdiv(n_tiles, splits) * bl["BLOCK_C"]
    splits = triton.cdiv(C, per_split)
    part = _empty((4, splits, B), torch.float64, o.device)
    with _device_ctx(o.device):
        _ce_fwd_kernel[(n_rb, splits)](
            o.xp, o.mup, o.xn, o.mn, *o.sx, *o.smu, o.x, o.mu, o.lc, target, o.lam, o.gamma, o.margin, part,
            B, C, o.D, o.eps_hi, o.eps_lo, o.tau, per_split,
            BLOCK_B=bl["BLOCK_B"], BLOCK_C=bl["BLOCK_C"], BLOCK_K=bl["BLOCK_K"], BLOCK_D=bl["BLOCK_D"],
            NEAR_K=o.near_k, FULL=o.full, IMPL=o.impl, PREC=o.prec, num_warps=bl["warps"])
    # Merge the splits' online logsumexps in split order.
    run_max, run_sum, sl, tl_ = part.unbind(0)
    M = run_max.max(dim=0).values
    scaled = torch.where(run_max == float("-inf"), 0.0, run_sum * torch.exp(run_max - M))
    lse = torch.where(M == float("-inf"), M, M + torch.log(scaled.sum(0)))
    sl = sl.sum(0)
    lse = torch.where(torch.isnan(sl), sl, lse)  # a NaN logit anywhere in the row
    return lse, tl_.sum(0), sl


def _backward_side(o, own_is_x, w, lse, target):
    """One pass (module docstring): (∂own' [n, D], ∂s_own float64 [n], (Σ H·r, −Σ G·dist) or None)."""
    if own_is_x:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.xp, o.mup, o.xn, o.mn, o.sx, o.smu, o.x, o.mu
    else:
        own, oth, own_n, oth_n, s_own, s_oth, own_raw, oth_raw = o.mup, o.xp, o.mn, o.xn, o.smu, o.sx, o.mu, o.x
    n_own, n_oth, D = own.shape[0], oth.shape[0], o.D
    bl = o.blocks
    BLOCK_O, BLOCK_T, BLOCK_D = bl["BLOCK_B"], bl["BLOCK_C"], bl["BLOCK_D"]
    n_ob, n_chunks, n_tiles = triton.cdiv(n_own, BLOCK_O), triton.cdiv(D, BLOCK_D), triton.cdiv(n_oth, BLOCK_T)
    # Split the other side when the own side alone would leave the device idle.
    splits = max(1, min(triton.cdiv(_parallel_width(o.device), n_ob * n_chunks), n_tiles))
    per_split = triton.cdiv(n_tiles, splits) * BLOCK_T
    splits = triton.cdiv(n_oth, per_split)
    dp = _empty((splits, n_own, D), o.acc, o.device)
    ds = _empty((splits, n_own), torch.float64, o.device)
    red = _empty((splits, n_ob, 2), torch.float64, o.device)
    _ce_bwd_kernel[(n_ob, splits, n_chunks)](
        own, oth, own_n, oth_n, *s_own, *s_oth, own_raw, oth_raw, o.lc, target, *w, lse,
        o.lam, o.gamma, o.margin, dp, ds, red,
        n_own, n_oth, D, o.eps_hi, o.eps_lo, o.tau, per_split,
        OWN_IS_X=own_is_x, BLOCK_O=BLOCK_O, BLOCK_T=BLOCK_T, BLOCK_K=bl["BLOCK_K"], BLOCK_D=BLOCK_D,
        NEAR_K=o.near_k, FULL=o.full, IMPL=o.impl, PREC=o.prec, num_warps=bl["warps"])
    return dp.sum(0), ds.sum(0), (red[..., 0].sum(), red[..., 1].sum()) if own_is_x else None


def ce_backward(w_lse, w_tl, w_sl, lse, x, mu, lc, beta, center, lam, gamma, target,
                eps: float, tau: float, margin: float):
    """(∂x, ∂mu, ∂lc, ∂beta, ∂λ, ∂γ) for the per-row weights w = ∂loss/∂(lse, tl, sl)."""
    B, C = x.shape[0], mu.shape[0]
    if B == 0 or C == 0:
        return (torch.zeros_like(x), torch.zeros_like(mu), torch.zeros_like(lc, dtype=x.dtype),
                torch.zeros_like(beta, dtype=x.dtype), torch.zeros_like(lam), torch.zeros_like(gamma))
    o = _Operands(x, mu, lc, beta, center, lam, gamma, eps, tau, margin)
    w = [t.detach().to(torch.float64).contiguous() for t in (w_lse, w_tl, w_sl)]
    lse = lse.detach().to(torch.float64).contiguous()
    with _device_ctx(o.device):
        dxp, dsx, (hr, gd) = _backward_side(o, True, w, lse, target)
        dmup, dsmu, _ = _backward_side(o, False, w, lse, target)
    # Chain to the raw inputs: x' = (x − m)·Lc, mu' = (mu − m)·Lc, sx = x·beta, smu = mu·beta.
    dx = _apply_t(dxp, o.lc) + dsx.to(o.acc)[:, None] * o.beta
    dmu = _apply_t(dmup, o.lc) + dsmu.to(o.acc)[:, None] * o.beta
    xc, muc = o.x - o.center, o.mu - o.center
    if o.full:
        dlc = xc.T @ dxp + muc.T @ dmup
    else:
        dlc = (xc * dxp).sum(0) + (muc * dmup).sum(0)
    # ∂beta = xᵀ·∂sx + muᵀ·∂smu in float64: in the hard case the two halves nearly cancel.
    dbeta = o.x.to(torch.float64).T @ dsx
    for i in range(0, C, 4096):
        dbeta += o.mu[i:i + 4096].to(torch.float64).T @ dsmu[i:i + 4096]
    return dx, dmu, dlc.to(o.acc), dbeta.to(o.acc), hr.to(lam.dtype).reshape(()), gd.to(gamma.dtype).reshape(())


# ----------------------------------------------------------------------------------------------
# The ops (the contract of randers_cross_entropy.py)
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("faim_kernels::randers_cross_entropy_fwd_triton", mutates_args=())
def randers_cross_entropy_fwd_triton(x: torch.Tensor, mu: torch.Tensor, lc: torch.Tensor, beta: torch.Tensor,
                                     center: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
                                     target: torch.Tensor, eps: float, tau: float, margin: float
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return ce_forward(x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin)


@torch.library.custom_op("faim_kernels::randers_cross_entropy_bwd_triton", mutates_args=())
def randers_cross_entropy_bwd_triton(w_lse: torch.Tensor, w_tl: torch.Tensor, w_sl: torch.Tensor,
                                     lse: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, lc: torch.Tensor,
                                     beta: torch.Tensor, center: torch.Tensor, lam: torch.Tensor,
                                     gamma: torch.Tensor, target: torch.Tensor, eps: float, tau: float,
                                     margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                             torch.Tensor, torch.Tensor]:
    return ce_backward(w_lse, w_tl, w_sl, lse, x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin)


register_ce_op_pair(randers_cross_entropy_fwd_triton, randers_cross_entropy_bwd_triton)


def triton_cross_entropy_op():
    """The forward op (its backward is registered with autograd)."""
    return randers_cross_entropy_fwd_triton
