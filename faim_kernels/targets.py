"""Probability targets in compact form: k (class, probability) pairs per row, so that a soft-target
loss over C classes never needs a [B, C] tensor (mixup and cutmix are two classes per row plus
label smoothing), and the adapters from timm's Mixup/CutMix output (timm itself is not needed).

    SoftTargets(classes [B, k] int64, probs [B, k] float, smoothing=0.0)

stands for the dense target  p_bc = (1 − smoothing)·Σ_k probs_bk·[classes_bk = c] + smoothing / C,
which `to_dense(C)` forms (for tests and for F.cross_entropy). Repeated classes in a row add up;
a pair with probability 0 is padding (its class must still be a valid index). Every function that
takes a class-index target also takes a SoftTargets, with F.cross_entropy's probability-target
semantics: loss_b = −Σ_c w_c·p'_bc·log_softmax_bc, where p' is p smoothed once more by the loss's
own label_smoothing, and reduction="mean" divides by B (no row is ignored; an ignore_index >= 0 is
refused, as F.cross_entropy refuses it for probability targets).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["SoftTargets", "mixup_soft_targets", "soft_targets_from_dense"]


class SoftTargets(NamedTuple):
    """k (class, probability) pairs per row; see the module docstring."""

    classes: torch.Tensor        # int64 [B, k]
    probs: torch.Tensor          # float [B, k]
    smoothing: float = 0.0       # mass spread evenly over all C classes

    def to_dense(self, num_classes: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [B, C] probability target this stands for (forms [B, C]: for tests and references)."""
        dtype = dtype or self.probs.dtype
        dense = torch.zeros(self.classes.shape[0], num_classes, dtype=dtype, device=self.probs.device)
        dense.scatter_add_(1, self.classes.long(), self.probs.to(dtype))
        return (1.0 - self.smoothing) * dense + self.smoothing / num_classes


def mixup_soft_targets(target_a: torch.Tensor, target_b: torch.Tensor | None = None, lam=1.0,
                       smoothing: float = 0.0) -> SoftTargets:
    """The compact form of timm's `mixup_target(target, num_classes, lam, smoothing)` (timm.data.mixup):
    each row mixes class target_a (weight lam) with class target_b (weight 1 − lam), then smooths.
    target_b defaults to target_a.flip(0), the partner timm's Mixup uses in its batch mode; lam is a
    float or a per-row tensor [B] (timm's elementwise and pair modes draw one per sample)."""
    target_a = target_a.long()
    target_b = target_a.flip(0) if target_b is None else target_b.long()
    if target_a.dim() != 1 or target_b.shape != target_a.shape:
        raise ValueError(f"target_a and target_b must be [B] class indices of one shape, got "
                         f"{tuple(target_a.shape)} and {tuple(target_b.shape)}")
    lam = torch.as_tensor(lam, dtype=torch.float32, device=target_a.device)
    if lam.dim() == 0:
        lam = lam.expand(target_a.shape[0])
    probs = torch.stack([lam, 1.0 - lam], dim=1)
    return SoftTargets(torch.stack([target_a, target_b], dim=1), probs, float(smoothing))


def soft_targets_from_dense(target: torch.Tensor, k: int = 2) -> SoftTargets:
    """The compact form of a dense [B, C] target whose rows are a uniform floor plus at most k
    classes above it, which is what timm's Mixup/CutMix return (floor = smoothing / C). The floor is
    read from the target (its smallest entry, the same on every row); the k largest entries of each
    row, less the floor, become the pairs. Raises ValueError if the result does not reproduce the
    target (a row with more than k classes above the floor, or floors that differ between rows);
    the check forms one [B, C] temporary (the result never needs one)."""
    if target.dim() != 2 or not target.is_floating_point():
        raise ValueError(f"target must be a floating [B, C] tensor, got {target.dtype} of shape {tuple(target.shape)}")
    B, C = target.shape
    t = target.detach()
    floor = float(t.min()) if t.numel() else 0.0
    smoothing = floor * C
    top, classes = t.topk(min(k, C), dim=1)
    probs = (top - floor) / (1.0 - smoothing) if smoothing < 1.0 else torch.zeros_like(top)
    out = SoftTargets(classes, probs, smoothing)
    if t.numel():
        err = (out.to_dense(C, t.dtype) - t).abs().max()
        if err > 1e-5 * max(1.0, float(t.abs().max())):
            raise ValueError(f"target is not a uniform floor plus at most {k} classes per row (as timm's Mixup "
                             f"returns): the compact form differs from it by {float(err):.3g}")
    return out
