"""The public functions of docs/design.md §3 (the public API), with the `backend=` switch (faim_kernels/ops/dispatch.py says
how "auto" chooses). Inputs are validated once here; each fused call is then one custom op forward
and one backward.
"""
from __future__ import annotations

import contextlib
import functools

import torch

from . import reference
from ._validation import (NO_GAMMA, check_ce_target, check_class_weight, check_indices, check_inputs,
                          check_loss_options, check_lse_square_scale, check_topk)
from .ops import dispatch
from .ops.row_stats import loss_from_stats, loss_targets, row_stats
from .ops.dispatch import resolve_backend
from .transform import norm_sqrt

__all__ = ["randers_distance", "randers_logits", "randers_cross_entropy", "randers_topk", "randers_distance_at",
           "resolve_backend"]


def _float32_in_autocast(fn):
    """Autocast as PyTorch's float32-list ops (cdist, cross_entropy) have it: inside an autocast region
    for x's device, the floating inputs (half or float32, e.g. bfloat16 activations beside float32
    parameters) are computed in float32 (float64 stays float64) with autocast off, and the results
    are float32. Distances near a prototype cancel (docs/design.md §2.1, near pairs): in a half type the target pair's
    distance would carry ~1e-2 of error, so no half GEMM is chosen for the user."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        if (not isinstance(x, torch.Tensor) or not torch.amp.is_autocast_available(x.device.type)  # e.g. meta
                or not torch.is_autocast_enabled(x.device.type)):
            return fn(*args, **kwargs)

        def up(v):
            if isinstance(v, torch.Tensor) and v.dtype in (torch.float16, torch.bfloat16):
                return v.to(torch.float32)
            return v
        with torch.autocast(x.device.type, enabled=False):
            return fn(*map(up, args), **{k: up(v) for k, v in kwargs.items()})
    return wrapper


def _backend(backend, x, mu):
    return resolve_backend(backend, x.device, (x.shape[0], mu.shape[0], x.shape[1]), x.dtype)


@_float32_in_autocast
def randers_distance(x, mu, L, beta, lam, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """d_bc = sqrt((x_b−mu_c)ᵀ Sigma (x_b−mu_c) + eps) + lam·sqrt((betaᵀ(x_b−mu_c))² + eps)  -> [B, C].

    x [B, D], mu [C, D], L [D, D] (Sigma = L Lᵀ + eps·I) or [D] (Sigma = diag(L²) + eps·I),
    beta [D], lam >= 0 (float or 0-dim tensor). Differentiable in every tensor input.
    eps >= 0: Sigma's ridge and the smoothing of both square roots. backend: "auto" (the C++ kernels
    for CPU tensors, Triton for CUDA tensors, "torch" elsewhere), "cpp", "triton", "torch" (plain
    PyTorch ops, any device) or "reference" (the einsum oracle); docs/design.md §2 gives the rule.
    """
    check_inputs(x, mu, L, beta, lam, NO_GAMMA, eps)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_distance(x, mu, L, beta, lam, eps)
    # d = logits with gamma = −1 (an exact sign flip), so one op serves both functions.
    return dispatch.fused_logits(x, mu, L, beta, lam, -1.0, eps, backend)


@_float32_in_autocast
def randers_logits(x, mu, L, beta, lam, gamma, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """logits_bc = −gamma·d_bc (docs/design.md Eq. 3) -> [B, C]; see randers_distance for the arguments."""
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    backend = _backend(backend, x, mu)
    if backend == "reference":
        return reference.randers_logits(x, mu, L, beta, lam, gamma, eps)
    return dispatch.fused_logits(x, mu, L, beta, lam, gamma, eps, backend)


@_float32_in_autocast
def randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps: float = 1e-6, margin: float = 0.0,
                          label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                          *, weight=None, lse_square_scale: float = 0.0, return_lse: bool = False,
                          backend: str = "auto"):
    """F.cross_entropy(logits', target, weight, ...) with logits' the Randers logits whose target entry
    is −γ·(d_bt + margin) (docs/design.md §2.2, the fused cross-entropy); weight, label_smoothing, ignore_index and reduction as in
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
    lse, target_logit, sl, pl = row_stats(x, mu, L, beta, lam, gamma, rows.kernel_target, eps, margin, backend,
                                rows.class_weight, rows.dense_soft_target)
    loss = loss_from_stats(lse, target_logit, sl, pl, rows, reduction, x.dtype, lse_square_scale)
    return (loss, lse.to(x.dtype)) if return_lse else loss


def randers_topk(x, mu, L, beta, lam, k: int, eps: float = 1e-6, *, largest: bool = False,
                 backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(distances [B, k] in x's dtype, indices int64 [B, k]): per row the k prototypes nearest to
    x_b in d_F (largest=True: the k farthest), sorted by distance, ties broken by the lower index,
    NaN ranked as torch.topk ranks it (last for the nearest, first for the farthest). Arguments as
    in randers_distance; 0 <= k <= C.

    The fused kernels never form the [B, C] distances: per class tile, one GEMM and the epilogue,
    near pairs recomputed from the raw difference (docs/design.md §2.1, near pairs), then a per-row partial top-k,
    merged (extra memory O(B·k + C) on the CPU). The distances are within the exactness bounds of
    randers_distance, and the indices those of the float64 reference except among true ties.

    Not differentiable (nothing comes back with a graph): for gradients of the selected distances,
    recompute them with randers_distance_at(x, mu, L, beta, lam, indices).

    Limits: the C++ kernel (CPU tensors) takes any k <= C. The Triton kernel (CUDA tensors) takes
    k <= 1024 and float16/bfloat16/float32 inputs; other calls on CUDA tensors sort
    randers_distance's [B, C] instead (B·C memory), with a warning that says so.
    backend="reference": the einsum distances and a stable sort (the oracle).
    """
    check_inputs(x, mu, L, beta, lam, NO_GAMMA, eps)
    check_topk(k, mu.shape[0], largest)
    inputs = (x, mu, L, beta, lam)
    differentiating = _differentiating_transform()
    with _outside_grad_transforms() if differentiating else contextlib.nullcontext() as unwrap:
        if unwrap is not None:  # the values under the wrappers (kernels launched directly cannot read those)
            x, mu, L, beta, lam = map(unwrap, inputs)
        elif differentiating and backend in ("cpp", "triton"):
            # vmap as well (jacfwd): the fused kernels cannot run under it, and the distances would
            # only be refused below anyway.
            raise RuntimeError(_TOPK_GRADIENT)
        # Resolved here, outside the grad transforms: the fused kernels serve the indices.
        backend = _backend(backend, x, mu)
        if backend == "reference":
            with torch.no_grad():
                d, index = reference.randers_topk(x, mu, L, beta, lam, k, eps, largest)
        else:
            d, index = dispatch.fused_topk(x, mu, L, beta, lam, eps, k, largest, backend)
    if differentiating:
        d = _RefuseTopkGradient.apply(d, *[t for t in inputs if isinstance(t, torch.Tensor)])
    return d, index


_TOPK_GRADIENT = ("faim_kernels.randers_topk: its distances are not differentiable (the indices select them). "
                  "Recompute the selected distances with fk.randers_distance_at(x, mu, L, beta, lam, indices), "
                  "which is differentiable, and differentiate those.")


def _differentiating_transform() -> bool:
    """Whether a torch.func transform that differentiates (grad, vjp, jacrev, jvp, jacfwd) is active:
    under it the outputs of randers_topk, computed without a graph, would read as constants and the
    transform would return zeros without an error (plain autograd raises instead)."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return False
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    return any(i.key() in (TransformType.Grad, TransformType.Jvp) for i in retrieve_all_functorch_interpreters())


@contextlib.contextmanager
def _outside_grad_transforms():
    """Where only grad/jvp transforms are active (nothing to differentiate in a top-k), runs the body
    outside them and yields a function that strips their wrappers from a tensor; else yields None."""
    from torch._C import _functorch
    from torch._C._functorch import TransformType
    from torch._functorch import pyfunctorch
    if any(i.key() not in (TransformType.Grad, TransformType.Jvp)
           for i in pyfunctorch.retrieve_all_functorch_interpreters()):
        yield None
        return

    def unwrap(t):
        while isinstance(t, torch.Tensor) and _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        return t
    with pyfunctorch.temporarily_clear_interpreter_stack():
        yield unwrap


class _RefuseTopkGradient(torch.autograd.Function):
    """The distances as they are, under a torch.func transform that differentiates: differentiating
    them raises, where the transform would otherwise return zeros. The indices stay usable (e.g.
    for fk.randers_distance_at inside the transformed function)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(d, *inputs):
        return d.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(_TOPK_GRADIENT)

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(_TOPK_GRADIENT)


def randers_distance_at(x, mu, L, beta, lam, indices, eps: float = 1e-6) -> torch.Tensor:
    """d(x_b, mu_{indices[b, j]}) [B, k]: the distances of the given (row, class) pairs only, e.g. those
    randers_topk returned, differentiable in every tensor input (O(B·k·D) memory, or B·k·D² work
    for a full L). Formed from the raw differences x_b − mu_c, so near pairs are exact (docs/design.md §2.1, near pairs).
    """
    check_inputs(x, mu, L, beta, lam, NO_GAMMA, eps)
    check_indices(indices, x.shape[0], mu.shape[0], x.device)
    diff = x.unsqueeze(1) - mu[indices.long()]                    # [B, k, D]
    if L.dim() == 2:  # Sigma = L Lᵀ + eps·I
        q = torch.square(diff @ L).sum(-1) + eps * torch.square(diff).sum(-1)
    else:             # Sigma = diag(L² + eps)
        q = (torch.square(diff) * (torch.square(L) + eps)).sum(-1)
    s = diff @ beta
    return norm_sqrt(q + eps) + lam * norm_sqrt(s * s + eps)  # no NaN gradient at eps = 0 (an exact hit, beta = 0)
