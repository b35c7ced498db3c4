"""The public functions of SPEC §3, with the `backend=` switch (faim_kernels/ops/dispatch.py says
how "auto" chooses). Inputs are validated once here; each fused call is then one custom op forward
and one backward.
"""
from __future__ import annotations

import torch

from . import reference
from ._validation import (check_ce_target, check_class_weight, check_inputs, check_loss_options,
                          check_lse_square_scale)
from .ops import dispatch
from .ops.row_stats import loss_from_stats, loss_targets, row_stats
from .ops.dispatch import resolve_backend

__all__ = ["randers_distance", "randers_logits", "randers_cross_entropy", "resolve_backend"]


def _backend(backend, x, mu):
    return resolve_backend(backend, x.device, (x.shape[0], mu.shape[0], x.shape[1]), x.dtype)


def randers_distance(x, mu, L, beta, lam, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """d_bc = sqrt((x_b−mu_c)ᵀ Sigma (x_b−mu_c) + eps) + lam·sqrt((betaᵀ(x_b−mu_c))² + eps)  -> [B, C].

    x [B, D], mu [C, D], L [D, D] (Sigma = L Lᵀ + eps·I) or [D] (Sigma = diag(L²) + eps·I),
    beta [D], lam >= 0 (float or 0-dim tensor). Differentiable in every tensor input.
    """
    check_inputs(x, mu, L, beta, lam, None, eps)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_distance(x, mu, L, beta, lam, eps)
    # d = logits with gamma = −1 (an exact sign flip), so one op serves both functions.
    return dispatch.fused_logits(x, mu, L, beta, lam, -1.0, eps, backend)


def randers_logits(x, mu, L, beta, lam, gamma, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """logits_bc = −gamma·d_bc (SPEC Eq. 3) -> [B, C]; see randers_distance for the arguments."""
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_logits(x, mu, L, beta, lam, gamma, eps)
    return dispatch.fused_logits(x, mu, L, beta, lam, gamma, eps, backend)


def randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps: float = 1e-6, margin: float = 0.0,
                          label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                          *, weight=None, lse_square_scale: float = 0.0, return_lse: bool = False,
                          backend: str = "auto"):
    """F.cross_entropy(logits', target, weight, ...) with logits' the Randers logits whose target entry
    is −γ·(d_bt + margin) (SPEC §2.2); weight, label_smoothing, ignore_index and reduction as in
    F.cross_entropy.

    target: class indices [B] (int64 or int32); a probability target [B, C] (F.cross_entropy's
    semantics; read in place, tile by tile, never copied when its dtype is the compute dtype); or
    faim_kernels.SoftTargets, k (class, probability) pairs per row that stand for a [B, C] target
    without forming it (mixup/cutmix: see faim_kernels/targets.py). margin needs class indices.
    lse_square_scale: the z-loss s·logsumexp(logits')² added per counted row (Liger-Kernel's name;
    'mean' averages it over those rows, unweighted, as Liger-Kernel does). return_lse: return
    (loss, lse) with lse [B] = logsumexp_c logits'_bc in x's dtype (differentiable).

    The fused kernels never form the [B, C] logits: an online logsumexp over class tiles keeps
    per-row statistics only, and the backward recomputes each tile (extra memory O(B + C)).
    backend="reference" is F.cross_entropy over the einsum logits.
    """
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    check_loss_options(margin, label_smoothing, ignore_index, reduction)
    check_ce_target(target, x.shape[0], mu.shape[0], ignore_index, margin, x)
    check_class_weight(weight, mu.shape[0], x)
    check_lse_square_scale(lse_square_scale)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin, label_smoothing,
                                               ignore_index, reduction, weight=weight,
                                               lse_square_scale=lse_square_scale, return_lse=return_lse)
    rows = loss_targets(target, mu.shape[0], ignore_index, label_smoothing, weight)
    lse, tl, sl, pl = row_stats(x, mu, L, beta, lam, gamma, rows.kernel_target, eps, margin, backend,
                                rows.class_weight, rows.soft_target)
    loss = loss_from_stats(lse, tl, sl, pl, rows, reduction, x.dtype, lse_square_scale)
    return (loss, lse.to(x.dtype)) if return_lse else loss
