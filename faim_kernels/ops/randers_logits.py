"""The fused logits op K(x', mu', sx, smu, λ, γ, eps) -> logits [B, C] (SPEC §2), for every
backend: the autograd formula and fake kernels shared by all backends, and the C++ ops.

Each backend provides two custom ops with the same signature:

    fwd(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau) -> logits
    bwd(grad, xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau) -> (dxp, dmup, dsx, dsmu, dlam, dgamma)

x, mu and lc are accuracy hints for the pairs at risk of cancellation (see transform.py): the
output is a function of (x', mu', sx, smu, λ, γ) alone in exact arithmetic, so they get no
gradient; autograd reaches x, mu, L and beta through the preparation instead.
"""
from __future__ import annotations

import torch

from ..transform import Transformed

_registered: set[str] = set()


def first_registration(op) -> bool:
    """True the first time `op` is seen: each backend's op pair gets its fake kernels and autograd
    registered once, whichever module asks first."""
    name = getattr(op, "_qualname", str(op))
    if name in _registered:
        return False
    _registered.add(name)
    return True


def register_logits_op_pair(fwd, bwd) -> None:
    """Registers fake kernels and the closed-form backward for one backend's (fwd, bwd) ops."""
    if not first_registration(fwd):
        return

    @torch.library.register_fake(fwd)
    def _fwd_fake(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau):
        return xp.new_empty((xp.shape[0], mup.shape[0]))

    @torch.library.register_fake(bwd)
    def _bwd_fake(grad, xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau):
        return (torch.empty_like(xp), torch.empty_like(mup), torch.empty_like(sx), torch.empty_like(smu),
                lam.new_empty(()), gamma.new_empty(()))

    def setup_context(ctx, inputs, output):
        xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau = inputs
        ctx.save_for_backward(xp, mup, sx, smu, x, mu, lc, lam, gamma)
        ctx.eps, ctx.tau = eps, tau

    def backward(ctx, grad):
        xp, mup, sx, smu, x, mu, lc, lam, gamma = ctx.saved_tensors
        dxp, dmup, dsx, dsmu, dlam, dgamma = bwd(grad, xp, mup, sx, smu, x, mu, lc, lam, gamma, ctx.eps, ctx.tau)
        return dxp, dmup, dsx, dsmu, None, None, None, dlam, dgamma, None, None

    torch.library.register_autograd(fwd, backward, setup_context=setup_context)


def cpp_available() -> bool:
    from .._cpp_loader import available
    return available()


def _cpp_ops():
    from .._cpp_loader import load
    load()  # raises CppKernelsUnavailable with the cause and the remedy
    return torch.ops.faim_kernels.randers_logits_fwd.default


# Registered at import, not at the first call: torch.compile must find the fake kernels and the
# autograd formula even when a compiled function is the first to call the op.
if cpp_available():
    register_logits_op_pair(torch.ops.faim_kernels.randers_logits_fwd.default,
                            torch.ops.faim_kernels.randers_logits_bwd.default)


def fused_logits(t: Transformed, eps: float, backend: str) -> torch.Tensor:
    """Runs backend's fused op on prepared inputs; returns logits in the compute dtype (in the
    input's half type for half inputs on the Triton backend)."""
    xp, mup = t.xp, t.mup
    if backend == "cpp":
        op = _cpp_ops()
    elif backend == "triton":
        from .randers_logits_triton import triton_logits_op
        op = triton_logits_op()
        if t.out_dtype in (torch.float16, torch.bfloat16):
            # The Triton GEMM takes x', mu' in the input's half type (fp32 accumulation); the op
            # raises tau for that rounding and returns logits in that type.
            xp, mup = xp.to(t.out_dtype), mup.to(t.out_dtype)
    else:
        raise ValueError(f"no fused logits op for backend {backend!r}")
    return op(xp, mup, t.sx, t.smu, t.x, t.mu, t.lc, t.lam, t.gamma, float(eps), float(t.tau))
