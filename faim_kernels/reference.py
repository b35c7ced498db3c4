"""The einsum reference (docs/design.md §1, the function): the oracle for the tests and the baseline of the benchmarks.

It materialises diff = x_b - mu_c as a [B, C, D] tensor and evaluates the seed formula
einsum('bcd,df,bcf->bc', diff, Sigma, diff): memory B·C·D, work B·C·D². Never the production
path; plain autograd gives its gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["sigma", "randers_distance", "randers_logits", "randers_cross_entropy", "randers_topk"]


def sigma(L: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sigma = L Lᵀ + eps·I for a full factor [D, D], diag(L²) + eps·I for a diagonal one [D]."""
    D = L.shape[-1]
    eye = torch.eye(D, dtype=L.dtype, device=L.device)
    if L.dim() == 2:
        return L @ L.T + eps * eye
    return torch.diag(L * L) + eps * eye


def randers_distance(x, mu, L, beta, lam, eps: float = 1e-6) -> torch.Tensor:
    """d_bc = sqrt(diffᵀ Sigma diff + eps) + lam·sqrt((betaᵀ diff)² + eps)   (docs/design.md Eq. 2)."""
    S = sigma(L, eps)
    diff = x.unsqueeze(1) - mu.unsqueeze(0)  # [B, C, D]
    quad = torch.einsum("bcd,df,bcf->bc", diff, S, diff)
    beta_dot = torch.einsum("d,bcd->bc", beta, diff)
    d = torch.sqrt(quad + eps) + lam * torch.sqrt(beta_dot * beta_dot + eps)
    # An infinite coordinate of x_b − mu_c (and no NaN) is at distance +inf: the limit, which the
    # einsum would turn into NaN (Inf·0 off the diagonal of Sigma, Inf − Inf across coordinates).
    infinite = torch.isinf(diff).any(dim=-1) & ~torch.isnan(diff).any(dim=-1)
    return torch.where(infinite, torch.full_like(d, float("inf")), d)


def randers_logits(x, mu, L, beta, lam, gamma, eps: float = 1e-6) -> torch.Tensor:
    """logits_bc = -gamma · d_bc   (docs/design.md Eq. 3)."""
    return -gamma * randers_distance(x, mu, L, beta, lam, eps)


def randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps: float = 1e-6, margin: float = 0.0,
                          label_smoothing: float = 0.0, ignore_index: int = -100,
                          reduction: str = "mean", *, weight=None, lse_square_scale: float = 0.0,
                          return_lse: bool = False):
    """F.cross_entropy over the reference logits, the target logit moved by an additive distance
    margin: logit_bt' = -gamma·(d_bt + margin)   (docs/design.md §2.2, the fused cross-entropy). target: class indices [B], a float
    probability target [B, C], or faim_kernels.targets.SoftTargets (made dense here); weight as
    F.cross_entropy's. lse_square_scale adds s·logsumexp(logits')² per counted row ('mean': averaged
    over those rows, unweighted); return_lse returns (loss, logsumexp(logits') [B]) as well."""
    from .targets import SoftTargets  # a leaf module; imported here to keep this file's top plain
    d = randers_distance(x, mu, L, beta, lam, eps)
    if isinstance(target, SoftTargets):
        target = target.to_dense(d.shape[1], d.dtype)
    if target.is_floating_point():
        valid = torch.ones(target.shape[0], dtype=torch.bool, device=target.device)
        target = target.to(d.dtype)
    else:
        valid = target != ignore_index
        if margin != 0.0:
            onehot = F.one_hot(torch.where(valid, target, 0), d.shape[1]).to(d.dtype)
            d = d + margin * onehot * valid.unsqueeze(1).to(d.dtype)
    logits = -gamma * d
    if (weight is not None and weight.requires_grad and torch.is_grad_enabled() and not target.is_floating_point()
            and d.shape[1] > 0):
        loss = _index_cross_entropy(logits, target, weight.to(d.dtype), label_smoothing, ignore_index, reduction)
    else:
        loss = F.cross_entropy(logits, target, weight=None if weight is None else weight.to(d.dtype),
                               label_smoothing=label_smoothing, ignore_index=ignore_index, reduction=reduction)
    lse = torch.logsumexp(logits, dim=1)
    if lse_square_scale != 0.0:
        z = torch.where(valid, lse_square_scale * lse * lse, torch.zeros_like(lse))
        loss = loss + (z if reduction == "none" else z.sum() / valid.sum() if reduction == "mean" else z.sum())
    return (loss, lse) if return_lse else loss


def _index_cross_entropy(logits, target, weight, label_smoothing: float, ignore_index: int, reduction: str):
    """F.cross_entropy with class indices, written out as its documentation defines it, for a weight
    that requires grad: F.cross_entropy refuses one (nll_loss is not differentiable in it), the fused
    loss differentiates it, and this is the oracle of that gradient. loss_b = (1 − ε)·v_t·(−log p_bt)
    + (ε/C)·Σ_c v_c·(−log p_bc) on rows not ignored; 'mean' divides by Σ v_t over them."""
    C = logits.shape[1]
    valid = target != ignore_index
    t = torch.where(valid, target, 0).long()
    logp = torch.log_softmax(logits, dim=1)
    v_t = torch.where(valid, weight[t], 0.0)
    loss = torch.where(valid, -v_t * logp.gather(1, t.unsqueeze(1)).squeeze(1), 0.0)
    if label_smoothing > 0.0:
        smooth = torch.where(valid, -(logp * weight).sum(dim=1), 0.0)
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / C) * smooth
    if reduction == "none":
        return loss
    return loss.sum() / v_t.sum() if reduction == "mean" else loss.sum()


def randers_topk(x, mu, L, beta, lam, k: int, eps: float = 1e-6, largest: bool = False):
    """(distances [B, k], indices [B, k]): the k smallest (largest) d_bc per row, sorted, ties by the
    lower index (a stable sort of the einsum distances; torch.topk leaves ties unordered)."""
    values, index = torch.sort(randers_distance(x, mu, L, beta, lam, eps), dim=1, descending=largest, stable=True)
    return values[:, :k], index[:, :k]
