"""The shared preparation of SPEC §2, in plain PyTorch (autograd handles it):

    Lc  = cholesky(Sigma) (full L) or sqrt(L² + eps) (diagonal L)
    x'  = (x − m)·Lc,  mu' = (mu − m)·Lc           q_bc = |x'_b − mu'_c|²
    sx  = x·beta,      smu = mu·beta                s_bc = sx_b − smu_c

Every fused kernel (C++, Triton, distance, logits, cross-entropy) consumes a `Transformed`.

Exactness choices (SPEC §2.1), each cheap next to the GEMM:
- m is the mean prototype, detached: q is invariant to a common shift, so the gradient is
  unchanged, and centering shrinks |x'|² + |mu'|², the scale of the expansion's error.
  Non-finite coordinates of m are zeroed so a NaN in one prototype cannot poison every pair.
- sx and smu are kept in float64: s = sx − smu then cancels harmlessly, for every pair.
- The kernels recompute each pair at risk (q small against |x'|² + |mu'|²) from the raw
  difference x_b − mu_c, which is nearly exact in the input precision, times Lc. Recomputing
  it from x' − mu' is not enough: x' carries the rounding of x·Lc, about u·|x'| per entry,
  and with a full L that alone put near pairs 5e-4 off (relative) in float32.
  So x, mu (raw) and Lc travel with x', mu' to the kernels, as accuracy hints with no gradient.
- Sigma and its Cholesky factor are formed in float64 (a float32 factorisation of a
  near-singular Sigma loses the small directions), then cast to the compute dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Transformed:
    xp: torch.Tensor      # [B, D] x' (compute dtype), carries autograd to x, L
    mup: torch.Tensor     # [C, D] mu'
    sx: torch.Tensor      # [B] float64, x·beta
    smu: torch.Tensor     # [C] float64, mu·beta
    x: torch.Tensor       # [B, D] raw x in the compute dtype, detached (near-pair hint)
    mu: torch.Tensor      # [C, D] raw mu, detached
    lc: torch.Tensor      # [D] or [D, D] metric factor, detached (near-pair hint)
    lam: torch.Tensor     # 0-dim float64
    gamma: torch.Tensor   # 0-dim float64
    tau: float            # pairs with q < tau·(|x'_b|² + |mu'_c|²) are recomputed directly
    out_dtype: torch.dtype


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32, float16 and bfloat16 are computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def risk_threshold(D: int, dtype: torch.dtype, operand_eps: float | None = None) -> float:
    """tau such that pairs with q >= tau·(|x'|² + |mu'|²) are accurate to about 128 units of
    round-off of `dtype` (8e-6 relative in float32, 1e-14 in float64) from the GEMM expansion.

    The expansion |x'|² + |mu'|² − 2x'·mu' errs by about u·sqrt(D)·N, N = |x'|² + |mu'|² (u the
    unit round-off of the accumulation, errors adding as a random walk over D), so sqrt(q) is off
    by u·sqrt(D)·N/(2q) relative. Asking for 128·u gives tau = sqrt(D)/256, the same for every
    dtype (0.0625 at D = 256), capped at 1 (every close pair recomputed).

    operand_eps: the unit round-off of the GEMM's operands where a kernel rounds x', mu' below the
    compute precision (bfloat16/float16 copies, TF32), with the norms taken from the same rounded
    values. Rounding every coordinate moves sqrt(q) by about u_op·sqrt(N/(3D)) (a random walk over
    D, projected on x' − mu'); asking for 1e-3 (ten times under the 1e-2 goal of half inputs) adds
    tau >= u_op²/(3D·1e-6): 0.02 for bfloat16 at D = 256, under the first term there.
    """
    del dtype  # the ratio of the error to u is what is fixed
    D = max(D, 1)
    tau = math.sqrt(D) / 256.0
    if operand_eps is not None:
        tau = max(tau, operand_eps ** 2 / (3e-6 * D))
    return min(1.0, tau)


_ROW_CHUNK = 1024  # rows handled at a time where a float64 or centred copy is needed


class Project(torch.autograd.Function):
    """(v − m)·Lc and v·beta (in float64) for the rows of v [N, D] (x or mu), with a hand-written
    backward that keeps no [N, D] copy alive: it saves v itself (an input, already in memory),
    not v − m, and never holds v in float64 whole (200 MB for C = 100,000, D = 256). Peak memory
    of the CPU forward+backward at (512, 4096, 256) fell from 42 MB to 30 MB with it.
    m is the detached centre; lc is [D] (diagonal factor) or [D, D]."""

    @staticmethod
    def forward(ctx, v, m, lc, beta):
        ctx.save_for_backward(v, m, lc, beta)
        vp = (v - m) * lc if lc.dim() == 1 else (v - m) @ lc
        beta64 = beta.to(torch.float64)
        sv = torch.empty(v.shape[0], dtype=torch.float64, device=v.device)
        for i in range(0, v.shape[0], _ROW_CHUNK):
            sv[i:i + _ROW_CHUNK] = v[i:i + _ROW_CHUNK].to(torch.float64) @ beta64
        return vp, sv

    @staticmethod
    def backward(ctx, dvp, dsv):
        v, m, lc, beta = ctx.saved_tensors
        dv = dlc = dbeta = None
        if ctx.needs_input_grad[0]:
            dv = dvp * lc if lc.dim() == 1 else dvp @ lc.T
            dv.addcmul_(dsv.to(v.dtype).unsqueeze(1), beta.to(v.dtype))
        if ctx.needs_input_grad[2]:
            dlc = torch.zeros_like(lc)
            for i in range(0, v.shape[0], _ROW_CHUNK):
                centred = v[i:i + _ROW_CHUNK] - m
                g = dvp[i:i + _ROW_CHUNK]
                dlc += (centred * g).sum(0) if lc.dim() == 1 else centred.T @ g
        if ctx.needs_input_grad[3]:
            # Σ_n dsv_n·v_n in float64: for the hard case the x and mu halves nearly cancel.
            dbeta = torch.zeros(v.shape[1], dtype=torch.float64, device=v.device)
            for i in range(0, v.shape[0], _ROW_CHUNK):
                dbeta += v[i:i + _ROW_CHUNK].to(torch.float64).T @ dsv[i:i + _ROW_CHUNK]
            dbeta = dbeta.to(beta.dtype)
        return dv, None, dlc, dbeta


def as_scalar_tensor(v, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(torch.float64)
    return torch.tensor(float(v), dtype=torch.float64, device=device)


def metric_factor(L: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Lc with Lc·Lcᵀ = Sigma: cholesky(L Lᵀ + eps·I) computed in float64, or sqrt(L² + eps)."""
    if L.dim() == 1:
        L64 = L.to(torch.float64)
        return torch.sqrt(L64 * L64 + eps).to(dtype)
    L64 = L.to(torch.float64)
    eye = torch.eye(L.shape[0], dtype=torch.float64, device=L.device)
    sigma = L64 @ L64.T + eps * eye
    factor, info = torch.linalg.cholesky_ex(sigma)
    # On the CPU the check is free; on CUDA it would synchronise every call, so it is skipped there.
    if L.device.type == "cpu" and not torch.compiler.is_compiling() and bool(info != 0):
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


def transform(x, mu, L, beta, lam, gamma, eps: float) -> Transformed:
    """Runs the O((B + C)·D² + D³) preparation; see the module docstring."""
    dtype = compute_dtype(x.dtype)
    xc, muc = x.to(dtype), mu.to(dtype)
    lc = metric_factor(L, eps, dtype)
    center = center_of(muc.detach())
    xp, sx = Project.apply(xc, center, lc, beta)
    mup, smu = Project.apply(muc, center, lc, beta)
    return Transformed(
        xp=xp, mup=mup, sx=sx, smu=smu,
        x=xc.detach().contiguous(), mu=muc.detach().contiguous(), lc=lc.detach().contiguous(),
        lam=as_scalar_tensor(lam, x.device), gamma=as_scalar_tensor(gamma, x.device),
        tau=risk_threshold(x.shape[1], dtype), out_dtype=x.dtype,
    )
