"""The implementations the benchmarks compare, behind one signature f(x, mu, L, beta, lam, gamma)
-> logits [B, C] (or a loss for the *_ce entries), and the inputs they run on."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import faim_kernels as fk

EPS = 1e-6


def make_inputs(B, C, D, *, full=False, dtype=torch.float32, device="cpu", requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g)
    mu = torch.randn(C, D, generator=g)
    L = (torch.eye(D) + 0.1 * torch.randn(D, D, generator=g) / D ** 0.5) if full else 0.5 + torch.rand(D, generator=g)
    beta = torch.randn(D, generator=g) / D ** 0.5
    lam, gamma = torch.tensor(0.1), torch.tensor(10.0)
    out = [t.to(device=device, dtype=dtype) for t in (x, mu, L, beta, lam, gamma)]
    if requires_grad:
        for t in out:
            t.requires_grad_()
    return out


def composite_logits(x, mu, L, beta, lam, gamma, eps=EPS):
    """What a careful user writes in plain PyTorch (docs/benchmarks.md): transform, one addmm, sqrt. Fast,
    and wrong near a prototype (docs/design.md §2.1, near pairs)."""
    if L.dim() == 2:
        lc = torch.linalg.cholesky(L @ L.T + eps * torch.eye(L.shape[0], dtype=L.dtype, device=L.device))
        xp, mup = x @ lc, mu @ lc
    else:
        lc = torch.sqrt(L * L + eps)
        xp, mup = x * lc, mu * lc
    norms = (xp * xp).sum(1, keepdim=True) + (mup * mup).sum(1)
    q = torch.addmm(norms, xp, mup.T, alpha=-2).clamp_min(0)
    s = (x @ beta).unsqueeze(1) - mu @ beta
    return -gamma * (torch.sqrt(q + eps) + lam * torch.sqrt(s * s + eps))


_compiled = {}


def composite_compiled(x, mu, L, beta, lam, gamma):
    key = (x.device.type, L.dim())
    if key not in _compiled:
        _compiled[key] = torch.compile(composite_logits, dynamic=False)
    return _compiled[key](x, mu, L, beta, lam, gamma)


def fused(backend):
    def f(x, mu, L, beta, lam, gamma):
        return fk.randers_logits(x, mu, L, beta, lam, gamma, EPS, backend=backend)
    return f


def einsum_reference(x, mu, L, beta, lam, gamma):
    return fk.reference.randers_logits(x, mu, L, beta, lam, gamma, EPS)


class LinearCE:
    """nn.Linear + F.cross_entropy of the same B, C, D: the cost floor of any classification head."""

    def __init__(self, C, D, dtype, device):
        self.linear = torch.nn.Linear(D, C, dtype=dtype, device=device)

    def __call__(self, x, target):
        return F.cross_entropy(self.linear(x), target)


# name -> (function, einsum-sized memory?)
LOGITS_IMPLS = {
    "einsum": einsum_reference,
    "composite": composite_logits,
    "composite_compiled": composite_compiled,
    "cpp": fused("cpp"),
    "triton": fused("triton"),
    "torch": fused("torch"),
}


def einsum_bytes(B, C, D, dtype=torch.float32):
    """Rough peak of the einsum forward+backward: about four [B, C, D] tensors."""
    return 4 * B * C * D * torch.finfo(dtype).bits // 8
