"""The fused cross-entropy's row statistics (docs/design.md §2.2, the fused cross-entropy) and the loss assembled from them, shared by
the single-process loss (faim_kernels.functional) and the class-sharded one
(faim_kernels.distributed). The op itself is in contract.py.

The kernels never form the [B, C] logits. Their forward returns, per row b, statistics of the
margin logits logit'_bc = −γ·(d_bc + margin·[c = t_b]), with v_c the class weights (1 without):

    lse_b = logsumexp_c logit'_bc        tl_bk = logit'_b,t_bk  (the k target classes of the row)
    sl_b  = Σ_c v_c·logit'_bc            pl_b  = Σ_c v_c·P_bc·logit'_bc  (P a dense probability target)

Every option of F.cross_entropy is an O(B·k) function of them (`loss_from_stats`). All forms are
loss_b = A_b·lse_b − Σ_c T_bc·logit'_bc for a target weight T (Σ_c T_bc = A_b), with ε the label
smoothing and W = Σ_c v_c:

    class indices t_b:      T_bc = (1 − ε)·v_t·[c = t_b] + (ε/C)·v_c
                            -> loss_b = (1 − ε)·v_t·(lse_b − tl_b) + (ε/C)·(W·lse_b − sl_b)
    dense probabilities P:  T_bc = v_c·((1 − ε)·P_bc + ε/C)
                            -> loss_b = ((1 − ε)·Σ_c v_c P_bc + εW/C)·lse_b − (1 − ε)·pl_b − (ε/C)·sl_b
    k pairs (t_bk, p_bk):   as the dense form with P_bc = Σ_k p_bk·[c = t_bk], so that
                            Σ_c v_c P_bc = Σ_k p_bk·v_t_bk and pl_b = Σ_k p_bk·v_t_bk·tl_bk: O(B·k)

and the z-loss adds s·lse_b². Their backward takes the per-row weights w = ∂loss/∂(lse, target_logit, sl, pl),
so that ∂loss/∂logit'_bc = w_lse,b·softmax_bc + Σ_k w_target_logit,bk·[c = t_bk] + v_c·(w_sl,b + w_pl,b·P_bc),
and recomputes each tile. Reduction, ignore_index, weights and smoothing thus live in plain PyTorch
(autograd handles them), and the same statistics combine across processes for class-sharded heads.
target holds class indices local to the op's classes, −1 where the row's target is not among them
(ignored rows, or another shard's classes); target_logit = 0 there.

Reductions follow F.cross_entropy: with class indices 'mean' divides by Σ v_t over the rows not
ignored (their count without weights; NaN when there are none); with probability targets it
divides by B. The z-loss term (Liger-Kernel's lse_square_scale, ST-MoE's log(Z)² penalty) counts
each non-ignored row once, unweighted: 'mean' divides its sum by the number of those rows, as
Liger-Kernel does.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import reference
from ..targets import SoftTargets
from . import dispatch


@dataclass
class LossTargets:
    """A target of any form, ready for the op (local class indices, the dense target's columns and
    the class weights of the op's classes) and for `loss_from_stats` (the per-row O(B·k) terms)."""

    kind: str                              # "index" | "dense" | "pairs"
    kernel_target: torch.Tensor            # int64 [B] or [B, k]: local class, −1 = not among the op's classes
    dense_soft_target: torch.Tensor | None       # dense [B, C_local] view of the user's tensor (no copy)
    class_weight: torch.Tensor | None      # [C_local]
    valid: torch.Tensor                    # bool [B]: rows that count
    target_weight: torch.Tensor | None     # index form with weights: v_t [B] float64 (0 on ignored rows)
    pair_weight: torch.Tensor | None       # pairs: p_bk·v_t_bk [B, k] float64
    soft_mass: torch.Tensor | None         # dense: Σ_c v_c·P_bc [B] float64
    weight_sum: float | torch.Tensor       # W = Σ_c v_c over all classes
    smoothing: float                       # the label smoothing in effect
    num_classes: int                       # C, all classes


def loss_targets(target, num_classes: int, ignore_index: int, label_smoothing: float, weight,
                 offset: int = 0, num_local: int | None = None) -> LossTargets:
    """LossTargets for the op over classes [offset, offset + num_local) of num_classes (inputs
    already validated). target: int [B] class indices, a float [B, C] probability target, or
    SoftTargets. weight: None or [C] (all classes)."""
    num_local = num_classes if num_local is None else num_local
    local_weight = None if weight is None else weight[offset:offset + num_local]
    weight_sum = float(num_classes) if weight is None else weight.to(torch.float64).sum()
    if isinstance(target, SoftTargets):
        classes = target.classes.to(torch.int64)
        here = (classes >= offset) & (classes < offset + num_local)
        local = torch.where(here, classes - offset, torch.full_like(classes, -1))
        # Out of range anywhere: −2, which the kernels refuse (see local_targets).
        local = torch.where((classes < 0) | (classes >= num_classes), torch.full_like(local, -2), local)
        pw = target.probs.to(torch.float64)
        if weight is not None:
            pw = pw * weight.to(torch.float64)[classes]
        smoothing = 1.0 - (1.0 - label_smoothing) * (1.0 - float(target.smoothing))
        valid = torch.ones(classes.shape[0], dtype=torch.bool, device=classes.device)
        return LossTargets("pairs", local, None, local_weight, valid, None, pw, None, weight_sum, smoothing,
                           num_classes)
    if target.is_floating_point():
        B = target.shape[0]
        if weight is None:
            mass = target.sum(dim=1).to(torch.float64)
        else:  # a matrix-vector product: reads the target once, forms nothing of size [B, C]
            mass = torch.mv(target, weight.to(target.dtype)).to(torch.float64)
        valid = torch.ones(B, dtype=torch.bool, device=target.device)
        return LossTargets("dense", torch.full((B,), -1, dtype=torch.int64, device=target.device),
                           target[:, offset:offset + num_local], local_weight, valid, None, None, mass,
                           weight_sum, label_smoothing, num_classes)
    valid, local = local_targets(target, ignore_index, offset, num_local, num_classes=num_classes)
    tw = None
    if weight is not None:
        tw = torch.where(valid, weight.to(torch.float64)[torch.where(valid, target.long(), 0)], 0.0)
    return LossTargets("index", local, None, local_weight, valid, tw, None, None, weight_sum, label_smoothing,
                       num_classes)


def reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin, class_weight=None, dense_soft_target=None):
    """(lse, target_logit, sl, pl) from the einsum logits: the oracle of the statistics (and the sharded
    reference path). Forms [B, C]. target [B] or [B, k] local class indices (−1: none here)."""
    logits = reference.randers_logits(x, mu, L, beta, lam, gamma, eps).to(torch.float64)
    B, C = logits.shape
    tgt = target.to(torch.int64).reshape(B, -1)
    here = (tgt >= 0) & (tgt < C)
    idx = torch.where(here, tgt, 0)
    if margin != 0.0 and C:
        gamma64 = gamma.to(torch.float64) if isinstance(gamma, torch.Tensor) else float(gamma)
        hit = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, idx, here)
        logits = logits - (gamma64 * margin) * hit.to(logits.dtype)
    lse = torch.logsumexp(logits, dim=1) if C else logits.new_full((B,), float("-inf"))
    target_logit = torch.where(here, logits.gather(1, idx), 0.0) if C else logits.new_zeros(tgt.shape)
    v = logits.new_ones(C) if class_weight is None else class_weight.to(torch.float64)
    sl = logits @ v
    pl = logits.new_zeros(B) if dense_soft_target is None else (dense_soft_target.to(torch.float64) * logits) @ v
    return lse, target_logit.reshape(target.shape), sl, pl


def row_stats(x, mu, L, beta, lam, gamma, target, eps: float, margin: float, backend: str, class_weight=None,
              dense_soft_target=None):
    """(lse, target_logit, sl, pl), float64, differentiable in x, mu, L, beta, lam, gamma.

    target: int64 [B] or [B, k] class indices local to mu's rows, −1 where the row has no target
    among them; class_weight [C] or None; dense_soft_target [B, C] or None (module docstring).
    backend: "cpp" or "triton" (the fused ops) or "reference" (the einsum logits)."""
    if backend == "reference":
        return reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin, class_weight, dense_soft_target)
    lse, target_logit, sl, pl = dispatch.fused_row_stats(x, mu, L, beta, lam, gamma, target, eps, margin, backend,
                                               class_weight, dense_soft_target)
    if class_weight is not None and class_weight.requires_grad and torch.is_grad_enabled():
        sl, pl = _ClassWeightGradient.apply(sl, pl, class_weight, (x, mu, L, beta, lam, gamma, target, eps, margin,
                                                                   backend, dense_soft_target))
    return lse, target_logit, sl, pl


class _ClassWeightGradient(torch.autograd.Function):
    """sl and pl as they are, with their gradient in the class weights v, which the fused op reads
    detached (it returns no ∂v). Learned class weights would otherwise get a silently wrong gradient
    wherever sl or pl enter the loss (label smoothing, probability targets).

    ∂loss/∂v_c = Σ_b logit'_bc·(g_sl,b + g_pl,b·P_bc) for the incoming row gradients g: a [C]
    reduction over the [B, C] logits, which only exist tile by tile inside the kernels. d is
    symmetric in its two points (Sigma is symmetric, the 1-form enters squared), so these sums are
    the row statistics of the transposed problem, the prototypes as samples and the samples as
    classes: sl^T_c = Σ_b u_b·logit_cb with class weights u = g_sl, or pl^T_c = Σ_b Q_cb·logit_cb
    with the probability target Q = (g_sl + g_pl·P)ᵀ. One more fused forward (O(B + C) memory
    beyond Q, which is P's size), run only when the weight requires grad. The margin adds
    −γ·margin on each row's target class."""

    @staticmethod
    def forward(ctx, sl, pl, class_weight, problem):
        ctx.problem = problem
        ctx.weight_dtype = class_weight.dtype
        return sl.view_as(sl), pl.view_as(pl)

    @staticmethod
    def backward(ctx, g_sl, g_pl):
        x, mu, L, beta, lam, gamma, target, eps, margin, backend, dense_soft_target = ctx.problem
        B, C = x.shape[0], mu.shape[0]
        with torch.no_grad():
            detach = (lambda v: v.detach() if isinstance(v, torch.Tensor) else v)
            x, mu, L, beta, lam, gamma = map(detach, (x, mu, L, beta, lam, gamma))
            u = torch.zeros(B, dtype=torch.float64, device=x.device) if g_sl is None else g_sl.to(torch.float64)
            none = torch.full((C,), -1, dtype=torch.int64, device=x.device)
            if dense_soft_target is None or g_pl is None:
                _, _, dv, _ = dispatch.fused_row_stats(mu, x, L, beta, lam, gamma, none, eps, 0.0, backend,
                                                       class_weight=u)
            else:
                q = (u.unsqueeze(1) + g_pl.to(torch.float64).unsqueeze(1) * dense_soft_target.to(torch.float64)).T
                _, _, _, dv = dispatch.fused_row_stats(mu, x, L, beta, lam, gamma, none, eps, 0.0, backend,
                                                       dense_soft_target=q)
            dv = dv.to(torch.float64)
            if margin != 0.0 and C and target.dim() == 1:
                here = target >= 0
                g64 = gamma.to(torch.float64) if isinstance(gamma, torch.Tensor) else float(gamma)
                hit = torch.zeros(C, dtype=torch.float64, device=x.device).index_add_(
                    0, torch.where(here, target, 0), torch.where(here, u, 0.0))
                dv = dv - (g64 * margin) * hit
        return g_sl, g_pl, dv.to(ctx.weight_dtype), None


def loss_from_stats(lse, target_logit, sl, pl, rows: LossTargets, reduction: str, out_dtype: torch.dtype,
                    lse_square_scale: float = 0.0) -> torch.Tensor:
    """F.cross_entropy's loss (plus the z-loss) from the row statistics: the one place that
    defines it (module docstring). Rows that do not count give 0."""
    eps, C, W = rows.smoothing, rows.num_classes, rows.weight_sum
    if rows.kind == "index":
        loss = lse - target_logit if rows.target_weight is None else rows.target_weight * (lse - target_logit)
        if eps > 0.0 and C > 0:
            loss = (1.0 - eps) * loss + (eps / C) * (W * lse - sl)
        count = rows.valid.sum() if rows.target_weight is None else rows.target_weight.sum()
    else:
        if rows.kind == "pairs":
            mass, dot = rows.pair_weight.sum(dim=1), (rows.pair_weight * target_logit).sum(dim=1)
        else:
            mass, dot = rows.soft_mass, pl
        if eps > 0.0 and C > 0:
            mass, dot = (1.0 - eps) * mass + (eps / C) * W, (1.0 - eps) * dot + (eps / C) * sl
        loss = mass * lse - dot
        count = lse.shape[0]
    loss = torch.where(rows.valid, loss, torch.zeros_like(loss))
    z = None
    if lse_square_scale != 0.0:
        z = torch.where(rows.valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
    if reduction == "none":
        return (loss if z is None else loss + z).to(out_dtype)
    total = loss.sum()
    if reduction == "mean":
        # No target weight at all (every row ignored, or every target's weight 0): NaN, as
        # F.cross_entropy's 0/0; with label smoothing the smoothing term alone would give ±inf.
        if isinstance(count, torch.Tensor):
            total = torch.where(count == 0, torch.full_like(total, float("nan")), total / count)
        else:  # probability targets: B rows (0/0 = NaN at B = 0)
            total = total / count
    if z is not None:
        total = total + (z.sum() / rows.valid.sum() if reduction == "mean" else z.sum())
    return total.to(out_dtype)


def local_targets(target, ignore_index: int, offset: int, num_local: int, num_classes: int | None = None):
    """(valid, local): valid = target != ignore_index; local = target − offset where that falls in
    [0, num_local) on a valid row, else −1 (the contract's 'no target here'). With num_classes, a
    valid row whose target lies outside [0, num_classes) gets −2, which the kernels refuse: the
    range check then holds where the Python one cannot run (torch.compile, CUDA without a sync)."""
    valid = target != ignore_index
    local = target.to(torch.int64) - offset
    here = valid & (local >= 0) & (local < num_local)
    local = torch.where(here, local, torch.full_like(local, -1))
    if num_classes is not None:
        bad = valid & ((target < 0) | (target >= num_classes))
        local = torch.where(bad, torch.full_like(local, -2), local)
    return valid, local
