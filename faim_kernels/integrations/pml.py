"""The Randers distance inside pytorch-metric-learning (pml): its losses, miners, `AccuracyCalculator`
and `InferenceModel` on a learned Finsler metric.

    from pytorch_metric_learning import losses, miners
    from faim_kernels.integrations.pml import RandersDistance

    metric = fk.RandersMetric(128)                      # or a FAIMHead: RandersDistance(head) shares its metric
    distance = RandersDistance(metric)
    loss_fn = losses.TripletMarginLoss(margin=0.2, distance=distance)
    miner = miners.TripletMarginMiner(margin=0.2, distance=distance)
    loss = loss_fn(emb, labels, miner(emb, labels))     # gradients reach emb and the metric

pml's conventions, as they apply here:
- `mat[i, j] = d_F(query_i, ref_j) = F(query_i − ref_j)` (docs/design.md Eq. 2), through the fused kernels
  (`randers_distance`), exact on near pairs. F is even here (the 1-form enters as
  λ·sqrt((βᵀv)² + eps)), so d_F(q, r) = d_F(r, q): the direction is stated for completeness and the
  matrix of a set against itself is symmetric.
- `is_inverted=False`: a distance, smaller is closer (losses and miners read it that way).
- `normalize_embeddings=False` by default, unlike pml's LpDistance: the metric learns its own
  scale and directions (Sigma, beta), and projecting the embeddings onto the unit sphere first would
  take away the radial direction it can weigh. Pass True to get pml's L2 normalisation anyway.
- `power`: pml's, applied to the matrix (`mat ** power`), e.g. 2 for squared distances.
- `pairwise_distance(a, b)` (matched rows, used by a few losses and miners) is the metric's paired
  distance, O(N·D²) for a full Sigma, O(N·D) for a diagonal one, in plain PyTorch.
- The metric is a submodule: `distance.parameters()`, and so a pml loss's `parameters()`, include it,
  and `.to()` / `state_dict()` carry it.

`RandersKNN(metric)` is a `knn_func` for `AccuracyCalculator` and `InferenceModel`: the k nearest
references of each query under the metric, from the fused `randers_topk` (no [N, M] matrix; exact
on near pairs; ties to the lower index).
"""
from __future__ import annotations

import torch
from pytorch_metric_learning.distances import BaseDistance
from pytorch_metric_learning.utils.inference import return_results

from .. import functional as faim_functional

__all__ = ["RandersDistance", "RandersKNN"]


def _check_metric(metric) -> None:
    if not all(hasattr(metric, a) for a in ("cdist", "paired_distance", "metric_args")):
        raise TypeError(f"metric must be a faim_kernels RandersMetric or FAIMHead (a module with cdist, "
                        f"paired_distance and metric_args), got {type(metric).__name__}")


class RandersDistance(BaseDistance):
    """pml distance d_F(query_i, ref_j) of a `RandersMetric` (or a `FAIMHead`, sharing its metric).

    Args: metric; normalize_embeddings (default False: see the module's docstring); power (pml's);
    other keyword arguments go to pml's BaseDistance (e.g. collect_stats).
    """

    def __init__(self, metric: torch.nn.Module, normalize_embeddings: bool = False, power: float = 1, **kwargs):
        _check_metric(metric)
        if kwargs.pop("is_inverted", False):
            raise ValueError("RandersDistance is a distance (smaller is closer): is_inverted must be False")
        super().__init__(normalize_embeddings=normalize_embeddings, power=power, is_inverted=False, **kwargs)
        self.metric = metric

    def compute_mat(self, query_emb: torch.Tensor, ref_emb: torch.Tensor | None) -> torch.Tensor:
        return self.metric.cdist(query_emb, query_emb if ref_emb is None else ref_emb)

    def pairwise_distance(self, query_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
        return self.metric.paired_distance(query_emb, ref_emb)


class RandersKNN:
    """pml `knn_func`: `(query [N, D], k, reference [M, D], ref_includes_query) -> (distances [N, k],
    indices [N, k])`, nearest first under the metric's d_F(query, ref), without gradients.

    With ref_includes_query=True (the query set is the reference set, in the same order), each
    query's own entry is left out as pml's own knn functions do.

    For `InferenceModel` it also keeps an index as pml's FaissKNN does: `train(emb)` replaces it,
    `add(emb)` appends to it, and a call without `reference` searches it; `save`/`load` write and
    read it with torch.save.
    """

    def __init__(self, metric: torch.nn.Module):
        _check_metric(metric)
        self.metric = metric
        self.index: torch.Tensor | None = None

    def train(self, embeddings: torch.Tensor) -> None:
        self.index = embeddings.detach()

    def add(self, embeddings: torch.Tensor) -> None:
        self.index = embeddings.detach() if self.index is None else torch.cat([self.index, embeddings.detach()])

    def reset(self) -> None:
        self.index = None

    def save(self, filename: str) -> None:
        torch.save(self.index, filename)

    def load(self, filename: str) -> None:
        self.index = torch.load(filename)

    def _knn(self, query: torch.Tensor, k: int, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.metric
        dtype = m._common_dtype(query, reference)
        query, reference = query.to(dtype), reference.to(dtype)
        L, beta, lam = m.metric_args(dtype)
        return faim_functional.randers_topk(query, reference, L, beta, lam, k, eps=m.eps, backend=m.backend)

    @torch.no_grad()
    def __call__(self, query: torch.Tensor, k: int, reference: torch.Tensor | None = None,
                 ref_includes_query: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        if reference is None:
            if self.index is None:
                raise ValueError("RandersKNN: no reference given and no index (call train() or add() first)")
            reference = self.index
        k_search = min(k + 1 if ref_includes_query else k, reference.shape[0])
        distances, indices = self._knn(query, k_search, reference)
        return return_results(distances, indices, ref_includes_query)
