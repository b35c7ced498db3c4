"""The pieces of docs/design.md §2's preparation that every backend shares (the bottom of the package):

    Lc  = cholesky(Sigma) (full L) or sqrt(L² + eps) (diagonal L)      metric_factor, ATen
    x'  = (x − m)·Lc,  mu' = (mu − m)·Lc           q_bc = |x'_b − mu'_c|²     inside the kernels
    sx  = x·beta,      smu = mu·beta                s_bc = sx_b − smu_c       inside the kernels

the near threshold tau (near_threshold), the centre m (center_of: the kernels implement the
same rule), and the dtype the kernels compute in.

Exactness choices (docs/design.md §2.1, near pairs), each cheap next to the GEMM:
- m is the mean prototype, detached: q is invariant to a common shift, so the gradient is
  unchanged, and centering shrinks |x'|² + |mu'|², the scale of the expansion's error.
  Non-finite coordinates of m are zeroed so a NaN in one prototype cannot poison every pair.
- sx and smu are kept in float64: s = sx − smu then cancels harmlessly, for every pair.
- The kernels recompute each near pair (q small against |x'|² + |mu'|²) from the raw
  difference x_b − mu_c, which is nearly exact in the input precision, times Lc. Recomputing
  it from x' − mu' is not enough: x' carries the rounding of x·Lc, about u·|x'| per entry,
  and with a full L that alone put near pairs 5e-4 off (relative) in float32.
  So the kernels take the raw x, mu and Lc and form x', mu' themselves.
- Sigma and its Cholesky factor are formed in float64 (a float32 factorisation of a
  near-singular Sigma loses the small directions), then cast to the compute dtype.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch

from ._validation import readable


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def near_threshold(D: int, dtype: torch.dtype, operand_eps: float | None = None) -> float:
    """The near threshold tau: pairs with q >= tau·(|x'|² + |mu'|²) are accurate to about 128
    units of round-off of `dtype` (8e-6 relative in float32, 1e-14 in float64) from the GEMM
    expansion; the others are near pairs, recomputed from the raw difference.

    The expansion |x'|² + |mu'|² − 2x'·mu' errs by about u·sqrt(D)·N, N = |x'|² + |mu'|² (u the
    unit round-off of the accumulation, errors adding as a random walk over D), so sqrt(q) is off
    by u·sqrt(D)·N/(2q) relative. Asking for 128·u gives tau = sqrt(D)/256, the same for every
    dtype (0.0625 at D = 256), capped at 1 (every close pair recomputed). Below D = 16 the floor is
    4/256: over a few terms the random walk is no bound (the rounding of the norms and of each
    product add up to ~2u·N), and at D = 1 and 2 pairs just above sqrt(D)/256 measured 1.6e-5 and
    9.5e-6 off in float32; with the floor, under 5e-6 (the near-pair recompute is O(D) per pair: cheap there).

    operand_eps: the unit round-off of the GEMM's operands where a kernel rounds x', mu' below the
    compute precision (bfloat16/float16 copies, TF32), with the norms taken from the same rounded
    values. Rounding every coordinate moves sqrt(q) by about u_op·sqrt(N/(3D)) (a random walk over
    D, projected on x' − mu'); asking for 1e-3 (ten times under the 1e-2 goal of half inputs) adds
    tau >= u_op²/(3D·1e-6): 0.02 for bfloat16 at D = 256, under the first term there.
    """
    del dtype  # the ratio of the error to u is what is fixed
    D = max(D, 1)
    tau = max(math.sqrt(D), 4.0) / 256.0
    if operand_eps is not None:
        tau = max(tau, operand_eps ** 2 / (3e-6 * D))
    return min(1.0, tau)


def metric_factor(L: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Lc with Lc·Lcᵀ = Sigma: cholesky(L Lᵀ + eps·I) computed in float64, or sqrt(L² + eps)
    (in `dtype` directly: two roundings, and the fewest steps on the hot path)."""
    # Never under autocast: Sigma and its factor are float64 math (docs/design.md §2.1, near pairs), whatever the region
    # (meta tensors, for deferred initialisation, have no autocast).
    no_autocast = torch.autocast(L.device.type, enabled=False) if torch.amp.is_autocast_available(L.device.type) \
        else nullcontext()
    with no_autocast:
        if L.dim() == 1:
            return torch.sqrt(torch.square(L.to(dtype)) + eps)
        L64 = L.to(torch.float64)
        eye = torch.eye(L.shape[0], dtype=torch.float64, device=L.device)
        sigma = L64 @ L64.T + eps * eye
        factor, info = torch.linalg.cholesky_ex(sigma)
    # On the CPU the check is free; on CUDA it would synchronise every call, so it is skipped there
    # (and meta or fake tensors have no values to check).
    if readable(L):
        if not bool(torch.isfinite(L).all()):
            raise ValueError("L holds non-finite values (NaN or Inf): Sigma = L Lᵀ + eps·I cannot be factorised")
        if bool(info != 0):
            raise ValueError("Sigma = L Lᵀ + eps·I is not positive definite in float64 "
                             "(eps = 0 with a singular L?): use eps > 0")
    return factor.to(dtype)


def center_of(mu: torch.Tensor) -> torch.Tensor:
    """The mean prototype, with non-finite coordinates replaced by 0 so that a NaN or Inf in one
    prototype cannot spread to every pair (that coordinate is then just not centred)."""
    if mu.shape[0] == 0:
        return mu.new_zeros(mu.shape[1])
    m = mu.mean(dim=0)
    return torch.where(torch.isfinite(m), m, 0)


def norm_sqrt(u: torch.Tensor) -> torch.Tensor:
    """sqrt(u) for u >= 0 whose gradient is 0 where u = 0, the kernels' convention at an exact hit
    with eps = 0 (each norm's gradient is 0 where the norm is 0). torch.sqrt's is inf there, which
    autograd multiplies by the 0 of ∂u into NaN (in x, beta and Sigma alike)."""
    positive = u > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, u, torch.ones_like(u))), torch.zeros_like(u))
