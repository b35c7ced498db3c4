"""The fused Randers cross-entropy (SPEC §2.2) for every backend: the op contract, the autograd
formula and fake kernels shared by all backends, the C++ ops, and the loss assembled from per-row
statistics.

The kernels never form the [B, C] logits. Their forward returns, per row b, three statistics of
the margin logits logit'_bc = −γ·(d_bc + margin·[c = t_b]):

    lse_b = logsumexp_c logit'_bc      tl_b = logit'_b,t_b      sl_b = Σ_c logit'_bc

and F.cross_entropy's loss is an O(B) function of them (`loss_from_stats`):

    loss_b = (1 − ε)·(lse_b − tl_b) + ε·(lse_b − sl_b / C)      (ε = label_smoothing)

Their backward takes the per-row weights w = ∂loss/∂(lse, tl, sl), so that
∂loss/∂logit'_bc = w_lse,b·softmax_bc + w_tl,b·[c = t_b] + w_sl,b, and recomputes each tile.
Reduction, ignore_index and smoothing thus live in plain PyTorch (autograd handles them), and
the same statistics combine across processes for class-sharded heads (faim_kernels.distributed).

Each backend provides two custom ops with this signature:

    fwd(x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin) -> (lse, tl, sl)
    bwd(w_lse, w_tl, w_sl, lse, x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin)
        -> (dx, dmu, dlc, dbeta, dlam, dgamma)

Unlike the logits op they take the raw inputs (x, mu, beta in the compute dtype, the metric
factor lc, the detached centre of the prototypes), so a kernel can form mu' = (mu − m)·Lc one
tile at a time and write ∂mu directly: no [C, D] temporary beyond ∂mu itself. target holds class
indices local to this op's classes, −1 where the row's target is not among them (ignored rows,
or another shard's classes); lse, tl, sl and the weights are float64 [B]; lam, gamma are 0-dim
float64. tl_b = 0 where the row has no target here. The centre gets no gradient: q is invariant
to a common shift, the centre only improves accuracy (see transform.py).
"""
from __future__ import annotations

import torch

from .. import reference
from ..transform import as_scalar_tensor, center_of, compute_dtype, metric_factor, risk_threshold
from .randers_logits import cpp_available, first_registration


def register_ce_op_pair(fwd, bwd) -> None:
    """Registers fake kernels and the autograd formula for one backend's (fwd, bwd) ops."""
    if not first_registration(fwd):
        return

    @torch.library.register_fake(fwd)
    def _fwd_fake(x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin):
        B = x.shape[0]
        return tuple(x.new_empty((B,), dtype=torch.float64) for _ in range(3))

    @torch.library.register_fake(bwd)
    def _bwd_fake(w_lse, w_tl, w_sl, lse, x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin):
        # contiguous, whatever the inputs' strides (as the kernels return them)
        return tuple(t.new_empty(t.shape) for t in (x, mu, lc, beta, lam, gamma))

    def setup_context(ctx, inputs, output):
        x, mu, lc, beta, center, lam, gamma, target, eps, tau, margin = inputs
        ctx.save_for_backward(output[0], x, mu, lc, beta, center, lam, gamma, target)
        ctx.eps, ctx.tau, ctx.margin = eps, tau, margin

    def backward(ctx, w_lse, w_tl, w_sl):
        lse, x, mu, lc, beta, center, lam, gamma, target = ctx.saved_tensors
        w = [torch.zeros_like(lse) if g is None else g for g in (w_lse, w_tl, w_sl)]
        dx, dmu, dlc, dbeta, dlam, dgamma = bwd(*w, lse, x, mu, lc, beta, center, lam, gamma, target,
                                                ctx.eps, ctx.tau, ctx.margin)
        return dx, dmu, dlc, dbeta, None, dlam, dgamma, None, None, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def _cpp_op():
    from .._cpp_loader import load
    load()  # raises CppKernelsUnavailable with the cause and the remedy
    return torch.ops.faim_kernels.randers_cross_entropy_fwd.default


# Registered at import, not at the first call: torch.compile must find the fake kernels and the
# autograd formula even when a compiled function is the first to call the op.
if cpp_available():
    register_ce_op_pair(torch.ops.faim_kernels.randers_cross_entropy_fwd.default,
                        torch.ops.faim_kernels.randers_cross_entropy_bwd.default)


def _fused_op(backend: str):
    if backend == "cpp":
        return _cpp_op()
    if backend == "triton":
        from .randers_cross_entropy_triton import triton_cross_entropy_op
        return triton_cross_entropy_op()
    raise ValueError(f"no fused cross-entropy op for backend {backend!r}")


def _reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin):
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
        return _reference_stats(x, mu, L, beta, lam, gamma, target, eps, margin)
    op = _fused_op(backend)
    dtype = compute_dtype(x.dtype)
    muc = mu.to(dtype).contiguous()
    center = center_of(muc.detach()).contiguous()
    return op(x.to(dtype).contiguous(), muc, metric_factor(L, eps, dtype).contiguous(),
              beta.to(dtype).contiguous(), center, as_scalar_tensor(lam, x.device),
              as_scalar_tensor(gamma, x.device), target.to(torch.int64).contiguous(), float(eps),
              float(risk_threshold(x.shape[1], dtype)), float(margin))


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


def local_targets(target, ignore_index: int, offset: int, num_local: int):
    """(valid, local): valid = target != ignore_index; local = target − offset where that falls in
    [0, num_local) on a valid row, else −1 (the contract's 'no target here')."""
    valid = target != ignore_index
    local = target.to(torch.int64) - offset
    here = valid & (local >= 0) & (local < num_local)
    return valid, torch.where(here, local, torch.full_like(local, -1))


def fused_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin, label_smoothing, ignore_index,
                        reduction, backend):
    """The single-process loss through backend's fused op (inputs already validated)."""
    valid, local = local_targets(target, ignore_index, 0, mu.shape[0])
    lse, tl, sl = row_stats(x, mu, L, beta, lam, gamma, local, eps, margin, backend)
    return loss_from_stats(lse, tl, sl, valid, mu.shape[0], label_smoothing, reduction, x.dtype)
