"""Class-sharded ("model-parallel") Randers cross-entropy and top-k over torch.distributed, for heads
with millions of classes.

Each rank of a process group holds a contiguous slice of the prototypes mu (rank r: classes
[offset_r, offset_r + C_r), slices in rank order; `shard_range` gives an even split) and the same
x, target, L, beta, lam, gamma as every other rank (x is typically the all-gathered batch). Each
rank runs the fused kernel on its slice only, which yields per-row statistics of its logits
(faim_kernels/ops/row_stats.py): lse^r, the target logits target_logit^r (0 unless a target is one of its
classes), Σ v·logits sl^r and Σ v·P·logits pl^r (class weights v, dense probability target P: the
rank's columns of both, views). Two all-reduces combine them into the statistics of the full
softmax,

    M_b = max_r lse^r_b                                            (all_reduce MAX, no gradient)
    lse_b = M_b + log Σ_r exp(lse^r_b − M_b),  target_logit = Σ_r target_logit^r,  sl = Σ_r sl^r,  pl = Σ_r pl^r
                                                                   (all_reduce SUM)

so every rank computes the same loss, equal to the single-process loss. Backward: the sum's
gradient is passed through unchanged (the loss above it is the same function on every rank), so
rank r's kernel receives ∂loss/∂lse^r_b = ∂loss/∂lse_b · exp(lse^r_b − lse_b), i.e. its part of
the global softmax, and produces the exact gradient of its own slice of mu. The replicated inputs
(x, L, beta, lam, gamma) collect only the part of their gradient that flows through the rank's
classes, so their gradients are summed over ranks (one all-reduce per dtype): every rank ends
with the single-process gradient, as data-parallel replicas would, and no extra synchronisation
of those parameters is needed.

Every option of the single-process loss works here (class weights, label smoothing, probability
targets in both forms, z-loss, return_lse); weight, target (global class indices, [B, C]
probabilities or SoftTargets) are the same full tensors on every rank.

Communication per step: B·8 bytes (MAX) + (3 + k)·B·8 bytes (SUM) forward (k targets per row), and the size of the
replicated gradients backward (about B·D + D² + D numbers); nothing of size C.

Example (every rank runs it, e.g. under torchrun; "gloo" for CPU tensors, "nccl" for CUDA):

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    start, stop = shard_range(num_classes)                       # this rank's classes
    mu = torch.nn.Parameter(0.1 * torch.randn(stop - start, D, device=dev))
    # x must be the same on every rank: gather the local batches; putting the local tensor back
    # in its own slot routes the (full) gradient of those rows to it, and nothing else.
    parts = [torch.empty_like(feats) for _ in range(world)]
    dist.all_gather(parts, feats.detach())
    parts[rank] = feats
    labels = [torch.empty_like(y) for _ in range(world)]
    dist.all_gather(labels, y)
    loss = sharded_randers_cross_entropy(torch.cat(parts), mu, L, beta, lam, gamma, torch.cat(labels),
                                         margin=0.1, label_smoothing=0.1)
    loss.backward()   # mu.grad: this slice's; L, beta, lam, gamma: the full gradients, on every rank
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from ._validation import (NO_GAMMA, check_ce_target, check_class_weight, check_inputs, check_loss_options,
                          check_lse_square_scale, check_topk)
from .functional import randers_topk, resolve_backend
from .ops.row_stats import loss_from_stats, loss_targets, row_stats

__all__ = ["sharded_randers_cross_entropy", "sharded_randers_topk", "shard_range"]


def shard_range(num_classes: int, rank: int | None = None, world_size: int | None = None,
                group=None) -> tuple[int, int]:
    """The classes [start, stop) of `rank` when num_classes are split evenly into contiguous slices
    in rank order (the first num_classes % world_size ranks get one more). rank and world_size
    default to the caller's in `group`."""
    if rank is None:
        rank = dist.get_rank(group)
    if world_size is None:
        world_size = dist.get_world_size(group)
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class _AllReduceSum(torch.autograd.Function):
    """Forward: the sum over ranks of per-rank partials. Backward: identity, because what is
    computed from the sum is the same on every rank, so ∂loss/∂(rank r's partial) = ∂loss/∂sum."""

    @staticmethod
    def forward(ctx, t, group):
        out = t.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Replicated(torch.autograd.Function):
    """Forward: identity on inputs that every rank holds. Backward: their gradients summed over
    ranks, each rank's graph having only the part that goes through its own classes."""

    @staticmethod
    def forward(ctx, group, *tensors):
        ctx.group = group
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        out = list(grads)
        for dtype in sorted(by_dtype, key=str):  # the same order on every rank
            idx = by_dtype[dtype]
            flat = torch.cat([grads[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ctx.group)
            for i, part in zip(idx, flat.split([grads[i].numel() for i in idx])):
                out[i] = part.view_as(grads[i])
        return (None, *out)


def _shard_layout(num_local: int, device: torch.device, group) -> tuple[int, int]:
    """(offset of this rank's first class, total number of classes) from every rank's slice size."""
    world = dist.get_world_size(group)
    mine = torch.tensor([num_local], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(sizes, mine, group=group)
    sizes = [int(s.item()) for s in sizes]
    rank = dist.get_rank(group)
    return sum(sizes[:rank]), sum(sizes)


def sharded_randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps: float = 1e-6, margin: float = 0.0,
                                  label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                                  *, weight=None, lse_square_scale: float = 0.0, return_lse: bool = False,
                                  group=None, backend: str = "auto"):
    """fk.randers_cross_entropy over all ranks' classes, with mu [C_r, D] this rank's contiguous
    slice of the prototypes (slices in rank order, see `shard_range`) and every other argument
    the same on every rank (target holds global class indices, or is a [B, C] probability target
    or SoftTargets over all classes; weight, if given, is the [C] weight of all classes). The
    options are those of fk.randers_cross_entropy. Returns the same loss on every
    rank; backward gives this rank's slice of mu its exact gradient and x, L, beta, lam, gamma
    their full (all-reduced) gradients. group: a torch.distributed process group (default: the
    world); gloo for CPU tensors, NCCL for CUDA tensors. Collective: every rank must call it.
    """
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    check_loss_options(margin, label_smoothing, ignore_index, reduction)
    check_lse_square_scale(lse_square_scale)
    offset, num_classes = _shard_layout(mu.shape[0], x.device, group)
    check_ce_target(target, x.shape[0], num_classes, ignore_index, margin, x)
    check_class_weight(weight, num_classes, x)
    backend = resolve_backend(backend, x.device, (x.shape[0], mu.shape[0], x.shape[1]), x.dtype)

    replicated = [(i, t) for i, t in enumerate((x, L, beta, lam, gamma))
                  if isinstance(t, torch.Tensor) and t.requires_grad]
    args = [x, L, beta, lam, gamma]
    if replicated and torch.is_grad_enabled():
        for (i, _), t in zip(replicated, _Replicated.apply(group, *[t for _, t in replicated])):
            args[i] = t
    x, L, beta, lam, gamma = args

    rows = loss_targets(target, num_classes, ignore_index, label_smoothing, weight, offset, mu.shape[0])
    if weight is not None and weight.requires_grad and torch.is_grad_enabled():
        # A learned class weight: its gradient through this rank's classes (sl, pl) is summed over
        # ranks, as x's is; the rest of the loss reads it identically on every rank (counted once).
        rows = dataclasses.replace(rows, class_weight=_Replicated.apply(group, weight)[0][offset:offset + mu.shape[0]])
    lse_r, target_logit_r, sl_r, pl_r = row_stats(x, mu, L, beta, lam, gamma, rows.kernel_target, eps, margin, backend,
                                        rows.class_weight, rows.dense_soft_target)
    M = lse_r.detach().clone()
    dist.all_reduce(M, op=dist.ReduceOp.MAX, group=group)
    M = torch.where(torch.isfinite(M), M, torch.zeros_like(M))  # a row with no class anywhere: −inf
    B = x.shape[0]
    packed = torch.cat([torch.stack([torch.exp(lse_r - M), sl_r, pl_r], dim=1), target_logit_r.reshape(B, -1)], dim=1)
    sums = _AllReduceSum.apply(packed, group)
    # sums[:, 0] >= 1 on any row with a class (the maximising rank adds exp(0)); the clamp only keeps
    # log finite on rows with none (all ignored, C = 0), whose loss is masked anyway.
    lse = M + torch.log(sums[:, 0].clamp_min(torch.finfo(torch.float64).tiny))
    loss = loss_from_stats(lse, sums[:, 3:].reshape(target_logit_r.shape), sums[:, 1], sums[:, 2], rows, reduction, x.dtype,
                           lse_square_scale)
    return (loss, lse.to(x.dtype)) if return_lse else loss


def sharded_randers_topk(x, mu, L, beta, lam, k: int, eps: float = 1e-6, *, largest: bool = False, group=None,
                         backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """fk.randers_topk over all ranks' classes: (distances [B, k], global indices [B, k]), the same
    on every rank, equal to the single-process result (same order: by distance, ties by the lower
    global index, NaN as torch.topk ranks it). mu [C_r, D] is this rank's contiguous slice of the
    prototypes (slices in rank order, see `shard_range`), every other argument the same on every
    rank; k <= the total number of classes. Collective: every rank must call it.

    Each rank takes the top min(k, C_r) of its slice (fk.randers_topk), pads it to k with entries
    that rank after every real one, and one all-gather per output (B·k distances and B·k int64
    indices per rank) brings every candidate to every rank, which merges them with two stable
    sorts (by index, then by distance). Not differentiable, like fk.randers_topk.
    """
    check_inputs(x, mu, L, beta, lam, NO_GAMMA, eps)
    offset, num_classes = _shard_layout(mu.shape[0], x.device, group)
    check_topk(k, num_classes, largest)
    B, world = x.shape[0], dist.get_world_size(group)
    k_local = min(k, mu.shape[0])
    d, idx = randers_topk(x, mu, L, beta, lam, k_local, eps, largest=largest, backend=backend)
    # Padding: (−inf for the k largest, NaN for the k smallest; index num_classes) ranks after every
    # real entry, and a rank holds at least k real ones in all (num_classes >= k).
    pad_value = float("-inf") if largest else float("nan")
    d_all = torch.full((B, k), pad_value, dtype=d.dtype, device=d.device)
    i_all = torch.full((B, k), num_classes, dtype=torch.int64, device=d.device)
    d_all[:, :k_local] = d
    i_all[:, :k_local] = idx + offset
    d_parts = [torch.empty_like(d_all) for _ in range(world)]
    i_parts = [torch.empty_like(i_all) for _ in range(world)]
    dist.all_gather(d_parts, d_all.contiguous(), group=group)
    dist.all_gather(i_parts, i_all.contiguous(), group=group)
    d_cat, i_cat = torch.cat(d_parts, dim=1), torch.cat(i_parts, dim=1)
    by_index = torch.argsort(i_cat, dim=1, stable=True)
    d_cat, i_cat = d_cat.gather(1, by_index), i_cat.gather(1, by_index)
    order = torch.argsort(d_cat, dim=1, descending=largest, stable=True)[:, :k]
    return d_cat.gather(1, order), i_cat.gather(1, order)
