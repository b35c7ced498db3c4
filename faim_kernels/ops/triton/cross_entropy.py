"""The fused cross-entropy op (docs/design.md §2.2, the fused cross-entropy) for CUDA tensors (and CPU tensors through Triton's
interpreter): its forward kernel and the launchers of both directions, with the contract of
faim_kernels/ops/contract.py. x and mu arrive in float16, bfloat16 (half GEMM operands, fp32
accumulation), float32 or float64; the preparation (common.Operands: centre, x', mu', norms, s = v·beta in
float64) runs once per op call.

  _ce_fwd_kernel   grid (row blocks, class splits). Each program walks its split's class tiles:
                   one GEMM tile x'·mu'ᵀ (tl.dot over D), the epilogue (q, s, d, logit' with the
                   margin on the target), and an online logsumexp (running max and sum, as in
                   flash attention) plus Σ v_c·logit', Σ v_c·P_bc·logit' (class weights v,
                   a dense probability target P read through its strides: HAS_WEIGHT,
                   HAS_SOFT) and the logits at the row's N_TGT target classes. Only these
                   per-row statistics leave the kernel: [splits, B] partials, merged in a
                   fixed order.
  backward         backward.py's kernel with CE = 1, once per side, which recomputes each tile's
                   logits and G; then the chain rule to the raw inputs (common.Operands.chain).

Exactness (docs/design.md §2.1, near pairs): a pair is recomputed from the raw difference (x_b − mu_c)·Lc when
q < tau·(|x'_b|² + |mu'_c|²), and every target pair is, so the target logit and the margin are
exact. The forward recomputes those pairs inside the program, a block of them at a time in tile
order (_recompute_tile_near_pairs), before the tile's logits enter the row statistics.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, configs
from .backward import backward_both_sides, zero_grads
from .common import (_gemm_q, _load_eps, _near_pair_distance, _pair_distance, _pair_s, _recompute_near_pairs,
                     _s_is_near, _take_near, _tile_dot)


@triton.jit
def _recompute_tile_near_pairs(d, near, flat, b0, c0, x_ptr, mu_ptr, lc_ptr, beta_ptr, sx_hi_ptr, sx_lo_ptr,
                               smu_hi_ptr, smu_lo_ptr, lam, eps, D, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                               NEAR_P: tl.constexpr, NEAR_K: tl.constexpr, NEAR_J: tl.constexpr,
                               NEAR_DOT: tl.constexpr, FULL: tl.constexpr):
    """d of the tile with its near pairs (and targets) replaced by their recomputed distance, NEAR_P
    pairs per recompute in tile order: with a full Lc each block reads Lc once for NEAR_P pairs (one
    tl.dot of their differences with a [NEAR_K, NEAR_J] block of Lc at a time), not once per pair
    (64 MB per pair at D = 4096, more than L2). The C++ kernel recomputes from the same raw
    difference (x_b − mu_c)·Lc: x' − mu' would cost O(D) per pair but carries the rounding of the
    GEMM's operands (TF32, half), which the near pairs exist to avoid."""
    lp = tl.arange(0, NEAR_P)
    n_near = tl.sum(near.to(tl.int32))
    for start in range(0, n_near, NEAR_P):
        n_here = tl.minimum(n_near - start, NEAR_P)
        picked, near = _take_near(near, flat, n_here, NEAR_P, BLOCK_B * BLOCK_C)
        pm = picked < BLOCK_B * BLOCK_C
        pb = b0 + (picked // BLOCK_C).to(tl.int64)
        pc = c0 + (picked % BLOCK_C).to(tl.int64)
        q_e, _, s_near = _recompute_near_pairs(x_ptr, mu_ptr, lc_ptr, beta_ptr, pb, pc, pm, -1, D, FULL, NEAR_P,
                                               NEAR_K, NEAR_J, NEAR_DOT)
        s_e = ((tl.load(sx_hi_ptr + pb, mask=pm, other=0.0) - tl.load(smu_hi_ptr + pc, mask=pm, other=0.0))
               + (tl.load(sx_lo_ptr + pb, mask=pm, other=0.0) - tl.load(smu_lo_ptr + pc, mask=pm, other=0.0)))
        _, _, d_e, _, _, _ = _near_pair_distance(q_e, s_near, s_e, lam, eps)  # float64: q_e may overflow
        for k in range(0, n_here):
            f = tl.sum(tl.where(lp == k, picked, 0))
            d = tl.where(flat == f, tl.sum(tl.where(lp == k, d_e, 0.0)), d)
    return d


@triton.heuristics({"HAS_WEIGHT": lambda a: a["cw_ptr"] is not None, "HAS_SOFT": lambda a: a["soft_ptr"] is not None})
@triton.jit(do_not_specialize=["B", "C", "cols_per_split"])
def _ce_fwd_kernel(
        xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr,
        x_ptr, mu_ptr, lc_ptr, beta_ptr, tgt_ptr, lam_ptr, gamma_ptr, margin_hi, margin_lo, part_ptr,
        cw_ptr, soft_ptr, stride_sb, stride_sc,
        B, C, D, eps_hi, eps_lo, tau, cols_per_split,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, NEAR_P: tl.constexpr,
        NEAR_K: tl.constexpr, NEAR_J: tl.constexpr, NEAR_DOT: tl.constexpr, FULL: tl.constexpr, IMPL: tl.constexpr,
        PREC: tl.constexpr, N_TGT: tl.constexpr, TGT_P: tl.constexpr, HAS_WEIGHT: tl.constexpr,
        HAS_SOFT: tl.constexpr):
    """Per-row statistics over one split of the classes: part[0..3 + N_TGT, split, row] = running
    max, Σ exp(logit' − max), Σ v·logit', Σ v·P·logit', the target logit of each target (float64).

    Parameters (`forward` passes them by keyword):
      xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_*_ptr, smu_*_ptr, lam_ptr, gamma_ptr
                                           as in logits._logits_fwd_kernel
      x_ptr, mu_ptr, lc_ptr, beta_ptr      the raw rows, metric factor and 1-form (near-pair recompute)
      tgt_ptr [B, N_TGT] int64             the row's target classes (−1: none among these classes)
      margin_hi + margin_lo                the margin added to the distance at a target pair
      part_ptr [4 + N_TGT, splits, B]      out: the per-row statistics above, float64
      cw_ptr [C]                           class weights v, or None (HAS_WEIGHT, derived)
      soft_ptr, stride_sb, stride_sc       the dense soft target P [B, C] read through its strides,
                                           or None (HAS_SOFT, derived)
      B, C, D; eps_hi + eps_lo = eps; tau  sizes; the epsilon; the near threshold
      cols_per_split                       classes per split (grid axis 1)
      BLOCK_B, BLOCK_C, BLOCK_K            tile rows, columns and the GEMM's K step (configs.CE_FWD_BLOCKS)
      NEAR_P, NEAR_K, NEAR_J, NEAR_DOT     the near-pair recompute's blocks (configs.NEAR_TILES)
      FULL, IMPL, PREC                     full Lc; the GEMM's mode
      N_TGT, TGT_P                         targets per row; N_TGT rounded up to a power of two
    grid = (row blocks, class splits)."""
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    acc_t = xn_ptr.dtype.element_ty
    rb = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bm = rb < B
    xn = tl.load(xn_ptr + rb, mask=bm, other=0.0)
    sx_hi = tl.load(sx_hi_ptr + rb, mask=bm, other=0.0)
    sx_lo = tl.load(sx_lo_ptr + rb, mask=bm, other=0.0)
    rk = tl.arange(0, TGT_P)
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    margin = _load_eps(margin_hi, margin_lo, acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    flat = tl.arange(0, BLOCK_B)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]

    run_max = tl.full((BLOCK_B,), float("-inf"), dtype=acc_t)
    run_sum = tl.zeros((BLOCK_B,), dtype=acc_t)
    sum_logit = tl.zeros((BLOCK_B,), dtype=tl.float64)
    soft_logit = tl.zeros((BLOCK_B,), dtype=tl.float64)
    t_logit = tl.zeros((BLOCK_B, TGT_P), dtype=acc_t)
    c_begin = pid_s * cols_per_split
    c_end = tl.minimum(c_begin + cols_per_split, C)
    for c0 in range(c_begin, c_end, BLOCK_C):
        rc = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        cm = rc < c_end
        valid = bm[:, None] & cm[None, :]
        dot = _tile_dot(xp_ptr, mup_ptr, rb, rc, bm, cm, D, tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_t),
                        BLOCK_K, IMPL, PREC)
        q, near = _gemm_q(dot, xn, tl.load(mn_ptr + rc, mask=cm, other=0.0), tau)
        is_t = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.int1)
        for k in tl.static_range(N_TGT):
            is_t = is_t | ((tl.load(tgt_ptr + rb * N_TGT + k, mask=bm, other=-1)[:, None] == rc[None, :]) & valid)
        smu_hi = tl.load(smu_hi_ptr + rc, mask=cm, other=0.0)
        s = _pair_s(sx_hi, sx_lo, smu_hi, tl.load(smu_lo_ptr + rc, mask=cm, other=0.0))
        near = (near | is_t | _s_is_near(s, sx_hi, smu_hi)) & valid
        _, _, d, _, _ = _pair_distance(q, s, lam, eps)
        d = _recompute_tile_near_pairs(d, near, flat, pid_b.to(tl.int64) * BLOCK_B, c0, x_ptr, mu_ptr, lc_ptr,
                                       beta_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam, eps, D, BLOCK_B,
                                       BLOCK_C, NEAR_P, NEAR_K, NEAR_J, NEAR_DOT, FULL)
        logit = -gamma * (d + tl.where(is_t, margin, 0.0))
        masked = tl.where(valid, logit, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(masked, axis=1))
        ref = tl.where(new_max > float("-inf"), new_max, 0.0)  # −inf − (−inf) would be NaN
        run_sum = run_sum * tl.exp(run_max - ref) + tl.sum(tl.where(valid, tl.exp(masked - ref[:, None]), 0.0), axis=1)
        run_max = new_max
        if HAS_WEIGHT:
            v = tl.load(cw_ptr + rc, mask=cm, other=0.0).to(acc_t)[None, :]
        else:
            v = tl.full((1, BLOCK_C), 1.0, dtype=acc_t)
        sum_logit += tl.sum(tl.where(valid, v * logit, 0.0), axis=1).to(tl.float64)
        if HAS_SOFT:
            p = tl.load(soft_ptr + rb[:, None] * stride_sb + rc[None, :] * stride_sc, mask=valid, other=0.0)
            soft_logit += tl.sum(tl.where(valid, v * p.to(acc_t) * logit, 0.0), axis=1).to(tl.float64)
        for k in tl.static_range(N_TGT):
            hit = (tl.load(tgt_ptr + rb * N_TGT + k, mask=bm, other=-1)[:, None] == rc[None, :]) & valid
            t_logit += tl.where(rk[None, :] == k, tl.sum(tl.where(hit, logit, 0.0), axis=1)[:, None], 0.0)

    out = pid_s.to(tl.int64) * B + rb
    n = tl.num_programs(1).to(tl.int64) * B
    tl.store(part_ptr + out, run_max.to(tl.float64), mask=bm)
    tl.store(part_ptr + n + out, run_sum.to(tl.float64), mask=bm)
    tl.store(part_ptr + 2 * n + out, sum_logit, mask=bm)
    tl.store(part_ptr + 3 * n + out, soft_logit, mask=bm)
    tl.store(part_ptr + (4 + rk[None, :]) * n + out[:, None], t_logit.to(tl.float64),
             mask=bm[:, None] & (rk[None, :] < N_TGT))


def _operands(x, mu, lc, beta, lam, gamma, eps, tau):
    """common.Operands: float16/bfloat16 x, mu give half GEMM operands (fp32 accumulation) as in the
    logits op; lc, beta arrive in the compute dtype."""
    return common.Operands(x, mu, lc, beta, lam, gamma, eps, tau)


def _check_targets(target, C: int) -> None:
    """The range check inside the op (it holds under torch.compile too): −1 is "no target among these
    classes", −2 a target out of range (row_stats.local_targets). On CUDA an asynchronous device
    assert, like F.cross_entropy's (no host sync): it cannot raise at the call and leaves the CUDA
    context unusable, as F.cross_entropy's does; on CPU tensors a ValueError."""
    ok = ((target >= -1) & (target < C)).all()
    if target.device.type == "cuda":
        torch._assert_async(ok, "target holds a class index out of range that is not ignore_index")
    elif not bool(ok):
        raise ValueError(f"target holds a class index out of range [0, {C}) that is not ignore_index")


def _rows(target, margin, class_weight, dense_soft_target, **backward_weights):
    """common.CrossEntropyRows for the kernels: the target as [B, N_TGT] contiguous."""
    return common.CrossEntropyRows(target=target.reshape(target.shape[0], -1).contiguous(), margin=float(margin),
                                   class_weight=None if class_weight is None else class_weight.contiguous(),
                                   dense_soft_target=dense_soft_target, **backward_weights)


def forward(x, mu, lc, beta, lam, gamma, target, eps: float, tau: float, margin: float, class_weight=None,
            dense_soft_target=None):
    """(lse, target_logit, sl, pl), float64: the randers_cross_entropy op of the contract."""
    B, C = x.shape[0], mu.shape[0]
    f64 = dict(dtype=torch.float64, device=x.device)
    if B == 0 or C == 0:
        return (torch.full((B,), float("-inf"), **f64), torch.zeros(target.shape, **f64), torch.zeros(B, **f64),
                torch.zeros(B, **f64))
    _check_targets(target, C)
    o = _operands(x, mu, lc, beta, lam, gamma, eps, tau)
    rows = _rows(target, margin, class_weight, dense_soft_target)
    bl = configs.CE_FWD_BLOCKS[o.precision_mode]
    near_p, near_k, near_j, near_dot = o.near_tiles()
    n_rb, n_tiles = triton.cdiv(B, bl["BLOCK_B"]), triton.cdiv(C, bl["BLOCK_C"])
    splits = max(1, min(triton.cdiv(common.parallel_width(o.device), n_rb), n_tiles))
    per_split = triton.cdiv(n_tiles, splits) * bl["BLOCK_C"]
    splits = triton.cdiv(C, per_split)
    part = common._empty((4 + rows.n_tgt, splits, B), torch.float64, o.device)
    with common.device_ctx(o.device):
        _ce_fwd_kernel[(n_rb, splits)](
            xp_ptr=o.xp, mup_ptr=o.mup, xn_ptr=o.xn, mn_ptr=o.mn, sx_hi_ptr=o.sx[0], sx_lo_ptr=o.sx[1],
            smu_hi_ptr=o.smu[0], smu_lo_ptr=o.smu[1], x_ptr=o.x, mu_ptr=o.mu, lc_ptr=o.lc, beta_ptr=o.beta,
            tgt_ptr=rows.target, lam_ptr=o.lam, gamma_ptr=o.gamma, **common.split_float("margin", rows.margin),
            part_ptr=part, **rows.soft_args(), B=B, C=C, D=o.D, eps_hi=o.eps_hi, eps_lo=o.eps_lo, tau=o.tau,
            cols_per_split=per_split, BLOCK_B=bl["BLOCK_B"], BLOCK_C=bl["BLOCK_C"], BLOCK_K=bl["BLOCK_K"],
            NEAR_P=near_p, NEAR_K=near_k, NEAR_J=near_j, NEAR_DOT=near_dot, FULL=o.full, IMPL=o.impl, PREC=o.prec,
            N_TGT=rows.n_tgt, TGT_P=triton.next_power_of_2(max(1, rows.n_tgt)),
            num_warps=configs.ce_fwd_warps(bl, rows.n_tgt, dense_soft_target is not None), num_stages=bl["stages"])
    # Merge the splits' online logsumexps in split order.
    run_max, run_sum, sl, pl = part[:4].unbind(0)
    target_logit = part[4:].sum(1).t().reshape(target.shape).contiguous()
    M = run_max.max(dim=0).values
    scaled = torch.where(run_max == float("-inf"), 0.0, run_sum * torch.exp(run_max - M))
    lse = torch.where(torch.isinf(M), M, M + torch.log(scaled.sum(0)))  # M = +inf: an infinite logit
    sl = sl.sum(0)
    lse = torch.where(torch.isnan(sl), sl, lse)  # a NaN logit anywhere in the row
    return lse, target_logit, sl, pl.sum(0)


def backward(w_lse, w_target_logit, w_sl, lse, x, mu, lc, beta, lam, gamma, target, eps: float, tau: float, margin: float,
             w_pl=None, class_weight=None, dense_soft_target=None, grad_mask: int = 63):
    """(dx, dmu, dlc, dbeta, dlam, dgamma) in the inputs' dtypes for the per-row weights
    w = ∂loss/∂(lse, target_logit, sl, pl): the randers_cross_entropy_backward op. Bit k of grad_mask
    asks for gradient k (x, mu, lc, beta, lam, gamma); an unasked one is an empty tensor
    (backward.backward_both_sides)."""
    B, C = x.shape[0], mu.shape[0]
    if B == 0 or C == 0:
        return zero_grads((x, mu, lc, beta, lam, gamma), grad_mask)
    o = _operands(x, mu, lc, beta, lam, gamma, eps, tau)
    if w_pl is None:
        w_pl = torch.zeros_like(w_sl)
    w = dict(zip(("w_lse", "w_target_logit", "w_sl", "w_pl", "lse"),
                 (t.detach().to(torch.float64).contiguous() for t in (w_lse, w_target_logit, w_sl, w_pl, lse))))
    rows = _rows(target, margin, class_weight, dense_soft_target, **w)
    return backward_both_sides(o, (x, mu, lc, beta, lam, gamma), grad_mask, ce=rows)
