"""FAIMBlock: log map -> any module on the tangent space -> exp map, around a base point p (the
reference design's integration C).

What the log and exp maps are here, honestly: the metric of this package has a constant Sigma and
a constant 1-form beta, so d_F(x, y) = F(y − x) with one Minkowski norm
F(v) = sqrt(vᵀ·Sigma·v) + λ·|βᵀv| on all of R^D (translation invariant: a normed space, not a
curved manifold). In a normed space straight segments are geodesics, so

    log_p(x) = x − p          exp_p(v) = p + v          d_F(p, exp_p(v)) = F(v)

and the block computes x_out = p + f(x − p): the inner module f applied in coordinates centred at p
(with f linear, an affine map whose fixed point is p). Nothing in it depends on Sigma, beta or λ;
the metric, when one is given, measures tangent vectors (`norm`) and steps (`distance`), e.g. for a
regulariser. (With the eps smoothing of docs/design.md Eq. 2, F(v) = sqrt(vᵀSigma v + eps) + λ·sqrt((βᵀv)² + eps)
and the identity d_F(p, exp_p(v)) = F(v) holds for that F.) A metric whose Sigma or beta varied
with the position would make these maps genuinely curved; that is not what this package computes.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["FAIMBlock"]


class FAIMBlock(nn.Module):
    """x_out = exp_p(f(log_p(x))) = p + f(x − p) for x [..., dim].

    Args:
        dim:        feature dimension.
        module:     f, any module mapping [..., dim] to [..., dim] (default nn.Linear(dim, dim)).
        base_point: "shared" (a learnable p [dim], zero at start), or a module computing p = g(x)
                    per sample ([..., dim] -> [..., dim]; a dynamic centre).
        metric:     optional RandersMetric or FAIMHead (shared, not copied) for `norm` and `distance`.
                    A submodule (`block.metric`): `.to()`, `.cuda()`, `.double()` move it with the
                    block and its parameters are in the block's state_dict, as users of nn.Module
                    expect. Shared with a head elsewhere in the model, it is one set of parameters
                    (model.parameters() lists them once; the state_dict has both names, loading
                    either restores both). Under DistributedDataParallel a metric that no loss term
                    uses leaves parameters without gradients: use it (e.g. a regulariser on
                    `block.norm`), share it with a head the loss uses, or pass
                    find_unused_parameters=True.
        device:     for the shared p and the default module.
        dtype:      for the shared p and the default module.
    """

    def __init__(self, dim: int, module: nn.Module | None = None, base_point: str | nn.Module = "shared",
                 metric: nn.Module | None = None, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.module = module if module is not None else nn.Linear(dim, dim, **factory)
        if isinstance(base_point, nn.Module):
            self.base = base_point
            self.p = None
        elif base_point == "shared":
            self.base = None
            self.p = nn.Parameter(torch.zeros(dim, **factory))
        else:
            raise ValueError(f"base_point must be 'shared' or an nn.Module computing p = g(x), got {base_point!r}")
        if metric is not None and getattr(metric, "in_features", dim) != dim:
            raise ValueError(f"metric is for dimension {metric.in_features}, the block for {dim}")
        self.metric = metric  # a submodule (None registers nothing)

    @staticmethod
    def log_map(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log_p(x) = x − p: the tangent vector at p of the geodesic (a straight segment) to x."""
        return x - p

    @staticmethod
    def exp_map(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """exp_p(v) = p + v: where the geodesic from p with initial velocity v is at time 1."""
        return p + v

    def base_point(self, x: torch.Tensor) -> torch.Tensor:
        """p for the inputs x: the shared parameter (broadcast) or g(x)."""
        return self.p.to(x.dtype) if self.base is None else self.base(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape [..., {self.dim}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        p = self.base_point(x)
        return self.exp_map(p, self.module(self.log_map(p, x)))

    def _need_metric(self) -> nn.Module:
        if self.metric is None:
            raise RuntimeError("this FAIMBlock has no metric: pass metric=RandersMetric(dim) (or a FAIMHead)")
        return self.metric

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) for tangent vectors v [..., dim] (needs a metric)."""
        return self._need_metric().norm(v)

    def distance(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d_F(x_i, y_i) for matching rows (needs a metric); d_F(p, exp_p(v)) = F(v)."""
        return self._need_metric().paired_distance(x, y)

    def extra_repr(self) -> str:
        base = "shared" if self.base is None else "dynamic"
        return f"dim={self.dim}, base_point={base}, metric={'yes' if self.metric is not None else 'none'}"
