"""The public functions of SPEC §3, with the `backend=` switch (faim_kernels/ops/dispatch.py says
how "auto" chooses). Inputs are validated once here; each fused call is then one custom op forward
and one backward.
"""
from __future__ import annotations

import torch

from . import reference
from ._validation import check_inputs, check_loss_options, check_target
from .ops import dispatch
from .ops.row_stats import local_targets, loss_from_stats, row_stats
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
                          *, backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(logits', target, ...) with logits' the Randers logits whose target entry is
    −γ·(d_bt + margin) (SPEC §2.2); label_smoothing, ignore_index and reduction as in F.cross_entropy.

    The fused kernels never form the [B, C] logits: an online logsumexp over class tiles keeps
    per-row statistics only, and the backward recomputes each tile (extra memory O(B + C)).
    backend="reference" is F.cross_entropy over the einsum logits.
    """
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    check_target(target, x.shape[0], mu.shape[0], ignore_index, x.device)
    check_loss_options(margin, label_smoothing, ignore_index, reduction)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin,
                                               label_smoothing, ignore_index, reduction)
    valid, local = local_targets(target, ignore_index, 0, mu.shape[0])
    lse, tl, sl = row_stats(x, mu, L, beta, lam, gamma, local, eps, margin, backend)
    return loss_from_stats(lse, tl, sl, valid, mu.shape[0], label_smoothing, reduction, x.dtype)
