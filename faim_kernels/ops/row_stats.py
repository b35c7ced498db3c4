"""The fused cross-entropy's row statistics (SPEC §2.2) and the loss assembled from them, shared by
the single-process loss (faim_kernels.functional) and the class-sharded one
(faim_kernels.distributed). The op itself is in contract.py.

The kernels never form the [B, C] logits. Their forward returns, per row b, three statistics of
the margin logits logit'_bc = −γ·(d_bc + margin·[c = t_b]):

    lse_b = logsumexp_c logit'_bc      tl_b = logit'_b,t_b      sl_b = Σ_c logit'_bc

and F.cross_entropy's loss is an O(B) function of them (`loss_from_stats`):

    loss_b = (1 − ε)·(lse_b − tl_b) + ε·(lse_b − sl_b / C)      (ε = label_smoothing)

Their backward takes the per-row weights w = ∂loss/∂(lse, tl, sl), so that
∂loss/∂logit'_bc = w_lse,b·softmax_bc + w_tl,b·[c = t_b] + w_sl,b, and recomputes each tile.
Reduction, ignore_index and smoothing thus live in plain PyTorch (autograd handles them), and
the same statistics combine across processes for class-sharded heads. target holds class indices
local to the op's classes, −1 where the row's target is not among them (ignored rows, or another
shard's classes); tl_b = 0 there.
"""
from __future__ import annotations

import torch

from .. import reference
from . import dispatch


def reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin):
    """(lse, tl, sl) from the einsum logits: the oracle of the statistics (and the sharded
    reference path). Forms [B, C]."""
    logits = reference.randers_logits(x, mu, L, beta, lam, gamma, eps).to(torch.float64)
    here = (target >= 0) & (target < mu.shape[0])
    idx = torch.where(here, target, 0).unsqueeze(1)
    if margin != 0.0:
        gamma64 = gamma.to(torch.float64) if isinstance(gamma, torch.Tensor) else float(gamma)
        shift = torch.zeros_like(logits).scatter(1, idx, (gamma64 * margin) * here.to(logits.dtype).unsqueeze(1))
        logits = logits - shift
    lse = torch.logsumexp(logits, dim=1) if mu.shape[0] else logits.new_full((x.shape[0],), float("-inf"))
    tl = torch.where(here, logits.gather(1, idx).squeeze(1), 0.0) if mu.shape[0] else logits.new_zeros(x.shape[0])
    return lse, tl, logits.sum(dim=1)


def row_stats(x, mu, L, beta, lam, gamma, target, eps: float, margin: float, backend: str):
    """(lse, tl, sl), float64 [B] each, differentiable in x, mu, L, beta, lam, gamma.

    target: int64 [B] class indices local to mu's rows, −1 where the row has no target among them.
    backend: "cpp" or "triton" (the fused ops) or "reference" (the einsum logits)."""
    if backend == "reference":
        return reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin)
    return dispatch.fused_row_stats(x, mu, L, beta, lam, gamma, target, eps, margin, backend)


def loss_from_stats(lse, tl, sl, valid, num_classes: int, label_smoothing: float, reduction: str,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """F.cross_entropy's loss from the row statistics (the one place that defines it).

    valid: bool [B], False where target == ignore_index (those rows give 0 and are not counted by
    'mean', which is then NaN when every row is ignored, as in F.cross_entropy)."""
    loss = lse - tl
    if label_smoothing > 0.0 and num_classes > 0:
        # −Σ_c log_softmax_bc / C = lse_b − sl_b / C
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sl / num_classes)
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss.to(out_dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / valid.sum()
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
