"""The op contract: one `torch.library` schema per op and direction, their fake kernels and their
autograd formulas, registered once when this module is imported. Kernels are registered per device
by the backends: the C++ extension for CPU tensors (`TORCH_LIBRARY_IMPL(faim_kernels, CPU, m)` in
csrc/), the Triton launchers for CUDA tensors (faim_kernels/ops/triton/). Nothing here imports a
backend.

Logits (docs/design.md §2, the algorithm): one call forward, one backward, each doing its own preparation (centring, x·Lc,
mu·Lc, the float64 s terms, the near-pair recomputation) inside the kernels. Only the metric factor
Lc (cholesky(L Lᵀ + eps·I), or sqrt(L² + eps) for a diagonal L) is formed outside, by ATen, so that
autograd chains ∂Lc to L.

    randers_logits(x, mu, lc, beta, lam, gamma, eps, tau) -> (logits, xp, mup, sx, smu)
        logits [B, C] = −γ·d in x's dtype; xp = (x − m)·Lc [B, D] and mup = (mu − m)·Lc [C, D] as the
        GEMM used them (x's dtype; m the centre of the prototypes, docs/design.md §2.1 (near pairs)); sx = x·beta [B] and
        smu = mu·beta [C] in float64. The last four are what the backward needs besides the logits.
    randers_logits_backward(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps, tau)
        -> (dx, dmu, dlc, dbeta, dlam, dgamma)
        No GEMM is recomputed: a = sqrt(q + eps) comes back from the logits (a = −logits/γ − λ·r,
        r = sqrt(s² + eps) from the rank-one s), so the backward costs the two gradient GEMMs of
        docs/design.md §2 (the algorithm) like nn.Linear's. Near pairs (docs/design.md §2.1, near pairs) are recomputed from the raw difference.

FAIMHead's metric operands and its training forward (CPU; csrc/head_metric.cpp):

    head_metric(sigma, lmbda, scale, full, eps, wide=False, through_gram=False) -> (lc, lam, gamma, factor64)
        the metric factor of the head's raw parameter (L, or log_sigma_diag), |lmbda| and |scale|.
    head_logits(x, mu, sigma, beta, lmbda, scale, full, eps, tau, wide=False) -> logits
        head_metric (through_gram) then randers_logits as one op with one autograd node (its
        backward: randers_logits_backward, then head_metric's backward math): the values and
        gradients of the two ops, bit for bit, for a training call of a head.

Prepared prototypes (forward only, CPU): for scoring many batches against unchanged prototypes
without recomputing their half of the preparation (mu' = (mu − m)·Lc is C×D² work for a full L).

    randers_prototypes(mu, lc, beta) -> (m, mup, smu)
        the centre m [D], mup = (mu − m)·Lc [C, D] and smu = mu·beta [C] float64, as randers_logits forms them.
    randers_logits_prepared(x, mu, lc, beta, lam, gamma, m, mup, smu, eps, tau) -> logits
        randers_logits' logits, bit for bit, with the prototypes' half taken from randers_prototypes.
        No autograd formula: callers use it where no graph is recorded (FAIMHead under no_grad).

Cross-entropy (docs/design.md §2.2, the fused cross-entropy): the kernels never form [B, C]; the forward returns per-row statistics of
the margin logits logit'_bc = −γ·(d_bc + margin·[c = t_b]) and the loss is an O(B) function of them
(faim_kernels/ops/row_stats.py).

    randers_cross_entropy(x, mu, lc, beta, lam, gamma, target, eps, tau, margin,
                          class_weight=None, dense_soft_target=None) -> (lse, target_logit, sl, pl)
        float64 each: lse [B] = logsumexp_c logit'_bc; target_logit (target's shape, [B] or [B, k]) the logits
        at the target classes (0 where an index is −1: no target among these classes); with v_c the
        class weights (1 without them) and P the dense probability target [B, C] (read in place,
        through its strides), sl [B] = Σ_c v_c·logit'_bc and pl [B] = Σ_c v_c·P_bc·logit'_bc (0
        without P). The margin sits on every class listed in target (the loss allows it with one
        class per row only).
    randers_cross_entropy_backward(w_lse, w_target_logit, w_sl, lse, x, mu, lc, beta, lam, gamma, target, eps,
                                   tau, margin, w_pl=None, class_weight=None, dense_soft_target=None)
        -> (dx, dmu, dlc, dbeta, dlam, dgamma)
        for the per-row weights w = ∂loss/∂(lse, target_logit, sl, pl), so that ∂loss/∂logit'_bc =
        w_lse,b·softmax_bc + Σ_k w_target_logit,bk·[c = t_bk] + v_c·(w_sl,b + w_pl,b·P_bc); recomputes each
        tile (no [B, C] exists).
        Every option of the loss (class weights, label smoothing, probability targets in both
        forms, z-loss) is a combination of these O(B·k) statistics (faim_kernels/ops/row_stats.py).

Common conventions: x and mu share one floating dtype: float32 or float64 for the C++ kernels and
the Triton cross-entropy (the dispatch layer computes half inputs in float32 there), any of the
four for the Triton logits kernels; lc and beta come in the compute dtype (float64 for float64
x, else float32: the near-pair recomputation needs Lc at full precision); lam, gamma are 0-dim
floating tensors of any dtype (read as float64; their gradients come back in their dtype); target int64 [B]
or [B, k]; class_weight [C] in the compute dtype; dense_soft_target [B, C] any strides (the compute dtype for the
C++ kernels, any floating dtype for Triton's); eps, tau, margin
Python floats; tau is the near threshold of transform.near_threshold. Gradients come back in
their input's dtype.
"""
from __future__ import annotations

import torch

NAMESPACE = "faim_kernels"

_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")
_LIB.define("randers_logits(Tensor x, Tensor mu, Tensor lc, Tensor beta, Tensor lam, Tensor gamma, float eps, "
            "float tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define("randers_logits_backward(Tensor grad, Tensor logits, Tensor x, Tensor mu, Tensor lc, Tensor beta, "
            "Tensor lam, Tensor gamma, Tensor xp, Tensor mup, Tensor sx, Tensor smu, float eps, float tau, "
            "int grad_mask=63) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define("randers_cross_entropy(Tensor x, Tensor mu, Tensor lc, Tensor beta, Tensor lam, Tensor gamma, "
            "Tensor target, float eps, float tau, float margin, Tensor? class_weight=None, "
            "Tensor? dense_soft_target=None) -> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("randers_cross_entropy_backward(Tensor w_lse, Tensor w_target_logit, Tensor w_sl, Tensor lse, Tensor x, "
            "Tensor mu, Tensor lc, Tensor beta, Tensor lam, Tensor gamma, Tensor target, float eps, float tau, "
            "float margin, Tensor? w_pl=None, Tensor? class_weight=None, Tensor? dense_soft_target=None, "
            "int grad_mask=63) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")
_LIB.define("head_metric(Tensor sigma, Tensor lmbda, Tensor scale, bool full, float eps, bool wide=False, "
            "bool through_gram=False) "
            "-> (Tensor, Tensor, Tensor, Tensor)")
_LIB.define("head_logits(Tensor x, Tensor mu, Tensor sigma, Tensor beta, Tensor lmbda, Tensor scale, bool full, "
            "float eps, float tau, bool wide=False) -> Tensor")
_LIB.define("randers_prototypes(Tensor mu, Tensor lc, Tensor beta) -> (Tensor, Tensor, Tensor)")
_LIB.define("randers_logits_prepared(Tensor x, Tensor mu, Tensor lc, Tensor beta, Tensor lam, Tensor gamma, "
            "Tensor m, Tensor mup, Tensor smu, float eps, float tau) -> Tensor")

ops = torch.ops.faim_kernels
logits_op = ops.randers_logits.default
logits_backward_op = ops.randers_logits_backward.default
cross_entropy_op = ops.randers_cross_entropy.default
cross_entropy_backward_op = ops.randers_cross_entropy_backward.default
head_metric_op = ops.head_metric.default
head_logits_op = ops.head_logits.default
prototypes_op = ops.randers_prototypes.default
logits_prepared_op = ops.randers_logits_prepared.default

# Bit k of grad_mask: gradient k of (x, mu, lc, beta, lam, gamma) is needed. A backward kernel skips
# the work of the others (no ∂x GEMM for features without grad, no ∂mu GEMM for frozen prototypes,
# no ∂Lc products for a frozen metric) and returns an empty tensor in their place, which the
# autograd formula turns into None.
ALL_GRADS = 63


def grad_mask(needs_input_grad) -> int:
    """The backward ops' grad_mask from ctx.needs_input_grad (its first six entries)."""
    return sum(1 << k for k, needed in enumerate(needs_input_grad[:6]) if needed)


def unneeded(grads, mask: int) -> tuple:
    """The backward kernels' gradients with those outside `mask` turned into None."""
    return tuple(g if mask >> k & 1 else None for k, g in enumerate(grads))


# ----------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only: torch.compile, FakeTensor, opcheck)
# ----------------------------------------------------------------------------------------------

def _like(*tensors, grad_mask: int = ALL_GRADS):
    """Contiguous empties shaped like `tensors`, as the kernels return their gradients (empty [0]
    tensors for those outside grad_mask)."""
    return tuple(t.new_empty(t.shape if grad_mask >> k & 1 else (0,)) for k, t in enumerate(tensors))


@torch.library.register_fake(logits_op)
def _logits_fake(x, mu, lc, beta, lam, gamma, eps, tau):
    B, C = x.shape[0], mu.shape[0]
    K = lc.shape[1] if lc.dim() == 2 else x.shape[1]  # x' and mu' are as wide as the factor
    f64 = dict(dtype=torch.float64)
    return (x.new_empty((B, C)), x.new_empty((B, K)), mu.new_empty((C, K)), x.new_empty((B,), **f64),
            x.new_empty((C,), **f64))


@torch.library.register_fake(logits_backward_op)
def _logits_backward_fake(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps, tau,
                          grad_mask=ALL_GRADS):
    return _like(x, mu, lc, beta, lam, gamma, grad_mask=grad_mask)


@torch.library.register_fake(cross_entropy_op)
def _cross_entropy_fake(x, mu, lc, beta, lam, gamma, target, eps, tau, margin, class_weight=None, dense_soft_target=None):
    row = x.new_empty((x.shape[0],), dtype=torch.float64)
    return row, x.new_empty(target.shape, dtype=torch.float64), row.new_empty(row.shape), row.new_empty(row.shape)


@torch.library.register_fake(cross_entropy_backward_op)
def _cross_entropy_backward_fake(w_lse, w_target_logit, w_sl, lse, x, mu, lc, beta, lam, gamma, target, eps, tau, margin,
                                 w_pl=None, class_weight=None, dense_soft_target=None, grad_mask=ALL_GRADS):
    return _like(x, mu, lc, beta, lam, gamma, grad_mask=grad_mask)


@torch.library.register_fake(head_metric_op)
def _head_metric_fake(sigma, lmbda, scale, full, eps, wide=False, through_gram=False):
    compute = torch.float64 if sigma.dtype == torch.float64 else torch.float32
    D = sigma.shape[0]
    lc_shape = ((D, 2 * D) if wide else (D, D)) if full else (D,)
    return (sigma.new_empty(lc_shape, dtype=compute), lmbda.new_empty(()), scale.new_empty(()),
            sigma.new_empty((D, D) if full and not wide else (0,), dtype=torch.float64))


@torch.library.register_fake(head_logits_op)
def _head_logits_fake(x, mu, sigma, beta, lmbda, scale, full, eps, tau, wide=False):
    return x.new_empty((x.shape[0], mu.shape[0]))


@torch.library.register_fake(prototypes_op)
def _prototypes_fake(mu, lc, beta):
    K = lc.shape[1] if lc.dim() == 2 else mu.shape[1]
    return mu.new_empty((mu.shape[1],)), mu.new_empty((mu.shape[0], K)), mu.new_empty((mu.shape[0],), dtype=torch.float64)


@torch.library.register_fake(logits_prepared_op)
def _logits_prepared_fake(x, mu, lc, beta, lam, gamma, m, mup, smu, eps, tau):
    return x.new_empty((x.shape[0], mu.shape[0]))


# ----------------------------------------------------------------------------------------------
# Autograd formulas. Each is written once, against a backward callable, so that the Triton
# interpreter path (CPU tensors, whose dispatch key belongs to the C++ kernels) runs the very same
# formula around the Triton launchers (see `autograd_function`).
# ----------------------------------------------------------------------------------------------

def _logits_setup_context(ctx, inputs, output):
    x, mu, lc, beta, lam, gamma, eps, tau = inputs
    logits, xp, mup, sx, smu = output
    ctx.save_for_backward(logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu)
    ctx.eps, ctx.tau = eps, tau
    ctx.set_materialize_grads(False)  # no zero-filled gradients for xp, mup, sx, smu, which no one uses


def _below_autograd(backward, *args, **kwargs):
    """backward(*args, **kwargs) below the autograd dispatch key where no graph is recorded (the usual
    backward, without create_graph): the backward ops' own autograd kernel (the refusal of second
    derivatives below, a Python function) then does nothing but costs tens of µs per call, a large
    part of a small head's backward. With create_graph it runs, so a second derivative raises; under
    torch.compile the formula is traced as written."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return backward(*args, **kwargs)
    with torch._C._AutoDispatchBelowAutograd():
        return backward(*args, **kwargs)


def _logits_backward_with(backward):
    def _backward(ctx, grad, *_unused_output_grads):  # xp, mup, sx, smu are not differentiable outputs
        if grad is None:
            return (None,) * 8
        mask = grad_mask(ctx.needs_input_grad)
        grads = _below_autograd(backward, grad, *ctx.saved_tensors, ctx.eps, ctx.tau, grad_mask=mask)
        return unneeded(grads, mask) + (None, None)
    return _backward


def _ce_setup_context(ctx, inputs, output):
    x, mu, lc, beta, lam, gamma, target, eps, tau, margin, *options = inputs
    class_weight, dense_soft_target = (options + [None, None])[:2]
    ctx.save_for_backward(output[0], x, mu, lc, beta, lam, gamma, target, class_weight, dense_soft_target)
    ctx.eps, ctx.tau, ctx.margin = eps, tau, margin
    ctx.num_inputs = len(inputs)


def _ce_backward_with(backward):
    def _backward(ctx, w_lse, w_target_logit, w_sl, w_pl):
        lse, x, mu, lc, beta, lam, gamma, target, class_weight, dense_soft_target = ctx.saved_tensors
        w_lse, w_sl = [torch.zeros_like(lse) if g is None else g for g in (w_lse, w_sl)]
        w_target_logit = torch.zeros(target.shape, dtype=lse.dtype, device=lse.device) if w_target_logit is None else w_target_logit
        # The targets, weights and the margin are not differentiated (F.cross_entropy's class weights
        # are not either; probability targets that require grad are refused by the loss).
        options = {} if w_pl is None and class_weight is None and dense_soft_target is None else dict(
            w_pl=w_pl, class_weight=class_weight, dense_soft_target=dense_soft_target)
        mask = grad_mask(ctx.needs_input_grad)
        grads = _below_autograd(backward, w_lse, w_target_logit, w_sl, lse, x, mu, lc, beta, lam, gamma, target, ctx.eps,
                                ctx.tau, ctx.margin, **options, grad_mask=mask)
        return unneeded(grads, mask) + (None,) * (ctx.num_inputs - 6)
    return _backward


torch.library.register_autograd(logits_op, _logits_backward_with(logits_backward_op),
                                setup_context=_logits_setup_context)
torch.library.register_autograd(cross_entropy_op, _ce_backward_with(cross_entropy_backward_op),
                                setup_context=_ce_setup_context)


# ----------------------------------------------------------------------------------------------
# Second derivatives: refused, never wrong. The backward kernels are closed forms, not differentiable
# compositions, so differentiating them again (torch.autograd.grad(..., create_graph=True) then a
# second backward: gradient penalties, some meta-learning) has no formula here. The backward ops'
# own autograd raises, the way PyTorch's @once_differentiable does: the first derivative with
# create_graph=True works, the second raises with the way out. (The C++ autograd of the logits op
# calls the backward op through the dispatcher, so this reaches it too.)
# ----------------------------------------------------------------------------------------------

def double_backward_error(op_family: str) -> RuntimeError:
    fn = "randers_logits / randers_distance" if op_family == "logits" else "randers_cross_entropy"
    return RuntimeError(
        f"faim_kernels: second derivatives (double backward) of {fn} are not implemented by the fused kernels "
        f"(their backward is a closed form). Pass backend='reference' (the einsum formula under plain autograd, "
        f"memory B*C*D) to differentiate twice, e.g. for a gradient penalty.")


def _refuse_double_backward(op_family: str):
    def _backward(ctx, *grads):
        raise double_backward_error(op_family)
    return _backward


torch.library.register_autograd(logits_backward_op, _refuse_double_backward("logits"))
torch.library.register_autograd(cross_entropy_backward_op, _refuse_double_backward("cross_entropy"))


def _once_differentiable(op_family: str, kernel):
    """`kernel` (a backward launcher called directly, as under the interpreter) with the same
    refusal: its outputs carry a node that raises if anything differentiates through them."""
    class _Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, keywords, *args):  # the last len(keywords) args are keyword arguments
            n = len(args) - len(keywords)
            return tuple(kernel(*args[:n], **dict(zip(keywords, args[n:]))))

        @staticmethod
        def backward(ctx, *grads):
            raise double_backward_error(op_family)

    def call(*args, **kwargs):
        return _Backward.apply(tuple(kwargs), *args, *kwargs.values())
    return call


# ----------------------------------------------------------------------------------------------
# Autocast: the forward ops are on autocast's float32 list, like PyTorch's cdist and cross_entropy
# (distances cancel, docs/design.md §2.1 (near pairs)): in an autocast region half inputs are cast to float32 (float64
# stays float64) and the op runs with autocast off, returning float32.
# ----------------------------------------------------------------------------------------------

for _op in (logits_op, cross_entropy_op):
    for _device_type in ("cpu", "cuda"):
        torch.library.register_autocast(_op, _device_type, torch.float32)

_FORMULAS = {
    "logits": (_logits_setup_context, _logits_backward_with),
    "cross_entropy": (_ce_setup_context, _ce_backward_with),
}


def autograd_function(op_family: str, forward, backward):
    """The op family `op_family` ("logits" or "cross_entropy") as a callable with the contract's
    autograd formula, running the given forward and backward kernels directly instead of through the
    dispatcher. Used for the Triton kernels on CPU tensors under Triton's interpreter (tests)."""
    setup_context, backward_with = _FORMULAS[op_family]
    # (grad_mask: the Python launchers take it; the ops' schemas gain it with the C++ kernels. The
    # class body below rebinds the name `backward`.)
    backward_formula = backward_with(_once_differentiable(op_family, backward))

    class _Op(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return tuple(forward(*inputs))

        @staticmethod
        def setup_context(ctx, inputs, output):
            setup_context(ctx, inputs, output)
            if op_family == "logits":
                ctx.mark_non_differentiable(*output[1:])

        backward = staticmethod(backward_formula)

    _Op.__name__ = f"{op_family}_{getattr(forward, '__name__', 'kernel')}"
    return _Op.apply


# ----------------------------------------------------------------------------------------------
# Top-k (nearest prototypes without the [B, C] distances). Forward only, by design.
#
#     randers_topk(x, mu, lc, beta, lam, eps, tau, k, largest) -> (distances, indices)
#         distances [B, k] in the compute dtype (float32/float64), indices int64 [B, k]: per row the
#         k smallest d_bc (largest=True: the k largest), sorted, ties broken by the lower index, NaN
#         ranked as torch.topk ranks it (after +inf for the smallest, first for the largest).
#         Conventions as above (x, mu, lc, beta in one compute dtype; lam a 0-dim tensor).
#
# No autograd formula is registered: the indices are not differentiable, and the dispatch layer
# calls the op on detached inputs, so the distances come back without a graph. Where gradients of
# the selected distances are needed, recompute them on the gathered prototypes, which is B·k pairs
# (O(B·k·D) memory) and differentiable in every input:
#
#     d, idx = fk.randers_topk(x, mu, L, beta, lam, k)                  # no graph
#     d = fk.randers_distance_at(x, mu, L, beta, lam, idx)              # [B, k], differentiable
#     # the same, row by row, with randers_distance itself:
#     d_b = fk.randers_distance(x[b:b + 1], mu[idx[b]], L, beta, lam)[0]
# ----------------------------------------------------------------------------------------------

_LIB.define("randers_topk(Tensor x, Tensor mu, Tensor lc, Tensor beta, Tensor lam, float eps, float tau, "
            "int k, bool largest) -> (Tensor, Tensor)")
topk_op = ops.randers_topk.default


@torch.library.register_fake(topk_op)
def _topk_fake(x, mu, lc, beta, lam, eps, tau, k, largest):
    B = x.shape[0]
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((B, k), dtype=compute), x.new_empty((B, k), dtype=torch.int64)
