"""Metric-learning losses on the Randers distance (the reference design's integration B: swap the
Euclidean/cosine distance of a contrastive loss for d_F).

    d_F(a, b) = F(a − b),  F(v) = sqrt(vᵀ·Sigma·v + eps) + λ·sqrt((βᵀv)² + eps)     (docs/design.md Eq. 2)

Functions take the metric as the functional API does (L, beta, lam; see fk.randers_distance); the
modules take a `metric` module (a RandersMetric, or a FAIMHead to share its metric) and read
(L, beta, lam), eps and backend from it.

- InfoNCE: anchors against the in-batch positives, logits_ij = −γ·d_F(a_i, p_j), target i; that is
  exactly the fused cross-entropy with the positives as prototypes and target = arange(N), so no
  [N, N] logits are formed. `margin` is the additive distance margin on the positive pair.
- NT-Xent (SimCLR): both views as anchors against all 2N − 1 others; the self-pairs must be masked,
  so this one forms the [2N, 2N] logits (fine at contrastive batch sizes).
- Triplet: max(d_F(a, p) − d_F(a, n) + margin, 0) on given triplets (paired distances, [N] not
  [N, N]), or with batch-hard mining (the farthest positive and the nearest negative of each anchor
  in the batch, from the fused [N, N] distances).
- The classification margin (ArcFace/CosFace-style, in distance space) is `margin=` of
  fk.randers_cross_entropy and FAIMHead.loss.

Because |·| makes F symmetric (F(−v) = F(v)), d_F(a, b) = d_F(b, a): the "columns" direction of
InfoNCE is the same fused cross-entropy with anchors and positives swapped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as faim_functional
from .._validation import REDUCTIONS, _check_scalar
from ..transform import compute_dtype, norm_sqrt

__all__ = [
    "randers_paired_distance", "randers_info_nce", "randers_nt_xent", "randers_triplet_loss",
    "randers_batch_hard_triplet_loss", "FAIMInfoNCELoss", "FAIMNTXentLoss", "FAIMTripletLoss",
]


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_pair(name_a: str, a, name_b: str, b) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a floating-point tensor of shape [N, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' ' + str(t.dtype)}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape [N, D], got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def randers_paired_distance(a: torch.Tensor, b: torch.Tensor, L: torch.Tensor, beta: torch.Tensor, lam,
                            eps: float = 1e-6) -> torch.Tensor:
    """d_F(a_i, b_i) for matching rows of a, b [..., D] (broadcast) -> [...].

    Plain PyTorch from the difference (no cancellation): O(N·D²) for a full L, O(N·D) for a
    diagonal one. Half-precision inputs are computed in float32 and returned in their dtype.
    """
    for name, t in (("a", a), ("b", b), ("L", L), ("beta", beta)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
    D = beta.shape[-1]
    if beta.dim() != 1 or a.shape[-1] != D or b.shape[-1] != D or tuple(L.shape) not in ((D, D), (D,)):
        raise ValueError(f"shapes must be a [..., D], b [..., D], L [D, D] or [D], beta [D]; got a {tuple(a.shape)}, "
                         f"b {tuple(b.shape)}, L {tuple(L.shape)}, beta {tuple(beta.shape)}")
    _check_scalar("lam", lam, a.device, nonnegative=True)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = compute_dtype(out_dtype)
    diff = a.to(dtype) - b.to(dtype)
    L, beta = L.to(dtype), beta.to(dtype)
    if L.dim() == 2:  # diffᵀ(L Lᵀ + eps·I)diff = |diff·L|² + eps·|diff|²
        q = (diff @ L).square().sum(-1) + eps * diff.square().sum(-1)
    else:
        q = (diff.square() * (L * L + eps)).sum(-1)
    s = diff @ beta
    lam = lam.to(dtype) if isinstance(lam, torch.Tensor) else lam
    return (norm_sqrt(q + eps) + lam * norm_sqrt(s * s + eps)).to(out_dtype)  # no NaN gradient at eps = 0


def randers_info_nce(anchors: torch.Tensor, positives: torch.Tensor, L, beta, lam, gamma, *, symmetric: bool = False,
                     margin: float = 0.0, eps: float = 1e-6, reduction: str = "mean",
                     backend: str = "auto") -> torch.Tensor:
    """InfoNCE with in-batch negatives on the Randers distance.

    loss_i = −log softmax_j(−γ·d_F(a_i, p_j))_i, with the positive pair's distance moved by `margin`
    (−γ·(d_F(a_i, p_i) + margin)). γ is the inverse temperature. symmetric=True averages it with
    the positives-as-anchors direction (CLIP's form). anchors, positives [N, D] -> scalar, or [N]
    for reduction="none". Runs as the fused cross-entropy: no [N, N] logits.
    """
    _check_pair("anchors", anchors, "positives", positives)
    _check_reduction(reduction)
    target = torch.arange(anchors.shape[0], device=anchors.device)

    def ce(x, mu):
        return faim_functional.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin=margin,
                                                     reduction=reduction, backend=backend)

    loss = ce(anchors, positives)
    if symmetric:
        loss = 0.5 * (loss + ce(positives, anchors))
    return loss


def randers_nt_xent(z1: torch.Tensor, z2: torch.Tensor, L, beta, lam, gamma, *, eps: float = 1e-6,
                    reduction: str = "mean", backend: str = "auto") -> torch.Tensor:
    """NT-Xent (SimCLR) on the Randers distance: z = [z1; z2] [2N, D], each row against the other
    2N − 1 (self excluded) with logits −γ·d_F, its other view the positive. -> scalar, or [2N]."""
    _check_pair("z1", z1, "z2", z2)
    _check_reduction(reduction)
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    logits = faim_functional.randers_logits(z, z, L, beta, lam, gamma, eps, backend=backend)
    self_pair = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    idx = torch.arange(n, device=z.device)
    target = torch.cat([idx + n, idx])
    return F.cross_entropy(logits, target, reduction=reduction)


def randers_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, L, beta, lam,
                         margin: float = 1.0, *, eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """max(d_F(a_i, p_i) − d_F(a_i, n_i) + margin, 0) (as nn.TripletMarginLoss, with d_F) -> scalar or [N]."""
    _check_pair("anchor", anchor, "positive", positive)
    _check_pair("anchor", anchor, "negative", negative)
    _check_reduction(reduction)
    d_ap = randers_paired_distance(anchor, positive, L, beta, lam, eps)
    d_an = randers_paired_distance(anchor, negative, L, beta, lam, eps)
    return _reduce(F.relu(d_ap - d_an + margin), reduction)


def randers_batch_hard_triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, L, beta, lam,
                                    margin: float = 1.0, *, eps: float = 1e-6, reduction: str = "mean",
                                    backend: str = "auto") -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al., 2017) on d_F: each anchor against its farthest
    positive (same label, not itself) and its nearest negative in the batch.

    Anchors without a positive or without a negative in the batch do not count: reduction="mean"
    averages over the anchors that have both (0 when none has), "none" returns [N] with 0 for them.
    The [N, N] distances come from the fused kernel.
    """
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2 or not embeddings.is_floating_point():
        raise ValueError("embeddings must be a floating-point tensor of shape [N, D]")
    if (not isinstance(labels, torch.Tensor) or labels.shape != embeddings.shape[:1]
            or labels.is_floating_point() or labels.device != embeddings.device):
        raise ValueError(f"labels must be an integer tensor of shape [{embeddings.shape[0]}] on {embeddings.device}")
    _check_reduction(reduction)
    dist = faim_functional.randers_distance(embeddings, embeddings, L, beta, lam, eps, backend=backend)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    pos = same & ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    neg = ~same
    if labels.shape[0] == 0:
        return dist.new_zeros(0) if reduction == "none" else dist.sum()
    # Rows without a positive (negative) get −inf (+inf) here and are masked out below.
    hardest_pos = dist.masked_fill(~pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~neg, float("inf")).amin(dim=1)
    valid = pos.any(dim=1) & neg.any(dim=1)
    loss = torch.where(valid, F.relu(hardest_pos - hardest_neg + margin), dist.new_zeros(()))
    if reduction == "mean":
        return loss.sum() / valid.sum().clamp_min(1)
    return _reduce(loss, reduction)


class _MetricLoss(nn.Module):
    """A loss holding the metric it measures with (registered, so loss.parameters() includes it)."""

    def __init__(self, metric: nn.Module, reduction: str):
        super().__init__()
        if not hasattr(metric, "metric_args"):
            raise TypeError(f"metric must be a RandersMetric or a FAIMHead, got {type(metric).__name__}")
        _check_reduction(reduction)
        self.metric = metric
        self.reduction = reduction

    def _args(self, *tensors: torch.Tensor):
        for t in tensors:
            self.metric._check_features("input", t)
        dtype = self.metric._common_dtype(*tensors)
        return dtype, self.metric.metric_args(dtype)


# The default γ of the contrastive losses, measured with bench/loss_recipes.py (an MLP embedding of
# scikit-learn's digits, two noisy views, 3 epochs, 1-nearest-neighbour test accuracy in d_F):
# InfoNCE with γ = 0.3 / 1 / 3 / 10: 89.1 / 94.9 / 95.8 / 92.4 % under SGD lr 0.1 momentum 0.9,
# 91.3 / 96.7 / 98.7 / 98.2 % under AdamW lr 1e-3; NT-Xent 90.4 / 96.0 / 96.9 / 92.9 % and
# 91.3 / 96.4 / 98.4 / 98.2 %. γ = 3 was best or level under both; 10 fell behind under SGD.
# The triplet margin 1.0 was kept: 0.2 / 1 / 3 gave 97.1 / 97.6 / 98.0 % (SGD), 98.2 / 98.4 / 98.4 % (AdamW).
CONTRASTIVE_SCALE = 3.0


class FAIMInfoNCELoss(_MetricLoss):
    """`loss(anchors, positives)`: randers_info_nce with the metric's (L, beta, λ), γ = `scale`
    (a float, or a tensor to learn it; default 3, see CONTRASTIVE_SCALE)."""

    def __init__(self, metric: nn.Module, scale: float | torch.Tensor = CONTRASTIVE_SCALE, symmetric: bool = False,
                 margin: float = 0.0, reduction: str = "mean"):
        super().__init__(metric, reduction)
        self.scale, self.symmetric, self.margin = scale, symmetric, margin

    def forward(self, anchors: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        dtype, args = self._args(anchors, positives)
        return randers_info_nce(anchors.to(dtype), positives.to(dtype), *args, self.scale, symmetric=self.symmetric,
                                margin=self.margin, eps=self.metric.eps, reduction=self.reduction,
                                backend=self.metric.backend)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):g}, symmetric={self.symmetric}, margin={self.margin}, reduction={self.reduction!r}"


class FAIMNTXentLoss(_MetricLoss):
    """`loss(z1, z2)`: randers_nt_xent (SimCLR's NT-Xent) with the metric, γ = `scale` (default 3)."""

    def __init__(self, metric: nn.Module, scale: float | torch.Tensor = CONTRASTIVE_SCALE, reduction: str = "mean"):
        super().__init__(metric, reduction)
        self.scale = scale

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        dtype, args = self._args(z1, z2)
        return randers_nt_xent(z1.to(dtype), z2.to(dtype), *args, self.scale, eps=self.metric.eps,
                               reduction=self.reduction, backend=self.metric.backend)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):g}, reduction={self.reduction!r}"


class FAIMTripletLoss(_MetricLoss):
    """Triplet margin loss on d_F.

    mining=None:          `loss(anchor, positive, negative)`, each [N, D] (randers_triplet_loss).
    mining="batch_hard":  `loss(embeddings, labels)`, the hardest positive and negative of each anchor
                          in the batch (randers_batch_hard_triplet_loss).
    """

    def __init__(self, metric: nn.Module, margin: float = 1.0, mining: str | None = None, reduction: str = "mean"):
        super().__init__(metric, reduction)
        if mining not in (None, "batch_hard"):
            raise ValueError(f"mining must be None or 'batch_hard', got {mining!r}")
        self.margin, self.mining = margin, mining

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        m = self.metric
        if self.mining == "batch_hard":
            if len(inputs) != 2:
                raise TypeError("with mining='batch_hard' call loss(embeddings, labels)")
            emb, labels = inputs
            dtype, args = self._args(emb)
            return randers_batch_hard_triplet_loss(emb.to(dtype), labels, *args, self.margin, eps=m.eps,
                                                   reduction=self.reduction, backend=m.backend)
        if len(inputs) != 3:
            raise TypeError("call loss(anchor, positive, negative) (or use mining='batch_hard')")
        dtype, args = self._args(*inputs)
        a, p, n = (t.to(dtype) for t in inputs)
        return randers_triplet_loss(a, p, n, *args, self.margin, eps=m.eps, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, reduction={self.reduction!r}"
