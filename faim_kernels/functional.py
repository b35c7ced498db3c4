"""The public functions of SPEC §3, with the `backend=` switch.

backend="auto": the Triton kernels for CUDA tensors, the C++ kernels for CPU tensors (the einsum
reference, with a warning, where neither is available, e.g. a build without the extension).
"cpp", "triton" and "reference" force one. Inputs are validated once here.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import reference
from ._validation import check_backend, check_inputs, check_loss_options, check_target
from .ops import randers_cross_entropy as _ce_ops
from .ops import randers_logits as _logits_ops
from .transform import transform

__all__ = ["randers_distance", "randers_logits", "randers_cross_entropy", "resolve_backend"]

_warned_fallback = False


def _triton_usable(device: torch.device) -> bool:
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turns "auto" into a concrete backend for tensors on `device`; checks a forced one."""
    global _warned_fallback
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        if device.type == "cpu" and _logits_ops.cpp_available():
            return "cpp"
        if not _warned_fallback:
            warnings.warn(f"faim_kernels: no fused kernel for {device} tensors here (C++ extension built: "
                          f"{_logits_ops.cpp_available()}); using the einsum reference, which is slow",
                          stacklevel=3)
            _warned_fallback = True
        return "reference"
    if backend == "cpp" and device.type != "cpu":
        raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors through Triton's "
                         f"interpreter when TRITON_INTERPRET=1 is set before faim_kernels is imported; "
                         f"got tensors on {device} (or triton is not installed)")
    return backend


def _fused(x, mu, L, beta, lam, gamma, eps, backend) -> torch.Tensor:
    t = transform(x, mu, L, beta, lam, gamma, eps)
    return _logits_ops.fused_logits(t, eps, backend).to(t.out_dtype)


def randers_distance(x, mu, L, beta, lam, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """d_bc = sqrt((x_b−mu_c)ᵀ Sigma (x_b−mu_c) + eps) + lam·sqrt((betaᵀ(x_b−mu_c))² + eps)  -> [B, C].

    x [B, D], mu [C, D], L [D, D] (Sigma = L Lᵀ + eps·I) or [D] (Sigma = diag(L²) + eps·I),
    beta [D], lam >= 0 (float or 0-dim tensor). Differentiable in every tensor input.
    """
    check_inputs(x, mu, L, beta, lam, None, eps)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.randers_distance(x, mu, L, beta, lam, eps)
    # d = logits with gamma = −1 (an exact sign flip), so one op serves both functions.
    return _fused(x, mu, L, beta, lam, -1.0, eps, backend)


def randers_logits(x, mu, L, beta, lam, gamma, eps: float = 1e-6, *, backend: str = "auto") -> torch.Tensor:
    """logits_bc = −gamma·d_bc (SPEC Eq. 3) -> [B, C]; see randers_distance for the arguments."""
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.randers_logits(x, mu, L, beta, lam, gamma, eps)
    return _fused(x, mu, L, beta, lam, gamma, eps, backend)


def randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps: float = 1e-6, margin: float = 0.0,
                          label_smoothing: float = 0.0, ignore_index: int = -100, reduction: str = "mean",
                          *, backend: str = "auto") -> torch.Tensor:
    """F.cross_entropy(logits', target, ...) with logits' the Randers logits whose target entry is
    −γ·(d_bt + margin) (SPEC §2.2); label_smoothing, ignore_index and reduction as in F.cross_entropy.

    The fused kernels never form the [B, C] logits: an online logsumexp over class tiles keeps
    per-row statistics only, and the backward recomputes each tile (extra memory O(B + C)).
    backend="reference" is F.cross_entropy over the einsum logits.
    """
    check_inputs(x, mu, L, beta, lam, gamma, eps)
    check_target(target, x.shape[0], mu.shape[0], ignore_index, x.device)
    check_loss_options(margin, label_smoothing, ignore_index, reduction)
    backend = resolve_backend(backend, x.device)
    if backend == "reference":
        return reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin,
                                               label_smoothing, ignore_index, reduction)
    return _ce_ops.fused_cross_entropy(x, mu, L, beta, lam, gamma, target, eps, margin, label_smoothing,
                                       ignore_index, reduction, backend)
