"""Bad input gets a clear error naming the argument (docs/guarantees.md)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import make_inputs

FUNCS = {
    "logits": lambda x, mu, L, beta, lam, gamma, **kw: fk.randers_logits(x, mu, L, beta, lam, gamma, **kw),
    "distance": lambda x, mu, L, beta, lam, gamma, **kw: fk.randers_distance(x, mu, L, beta, lam, **kw),
    "cross_entropy": lambda x, mu, L, beta, lam, gamma, **kw: fk.randers_cross_entropy(
        x, mu, L, beta, lam, gamma, torch.zeros(4, dtype=torch.long), **kw),
}


def _args(**changes):
    args = dict(zip(["x", "mu", "L", "beta", "lam", "gamma"], make_inputs(4, 5, 3)))
    args.update(changes)
    return args


BAD = [
    ("x", dict(x=torch.randn(4, 3, 1)), ValueError, "x must have shape"),
    ("x", dict(x=torch.ones(4, 3, dtype=torch.long)), TypeError, "x must be a floating-point"),
    ("x", dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    ("mu", dict(mu=torch.randn(5, 4)), ValueError, r"mu must have shape \[C, D\] with D = 3"),
    ("mu", dict(mu=torch.randn(5, 3, dtype=torch.float64)), TypeError, "mu has dtype"),
    ("L", dict(L=torch.randn(3, 4)), ValueError, "L must have shape"),
    ("L", dict(L=torch.randn(2)), ValueError, "L must have shape"),
    ("beta", dict(beta=torch.randn(4)), ValueError, "beta must have shape"),
    ("beta", dict(beta=torch.randn(3, 1)), ValueError, "beta must have shape"),
    ("lam", dict(lam=-0.1), ValueError, "lam must be >= 0"),
    ("lam", dict(lam=torch.tensor(-0.1)), ValueError, "lam must be >= 0"),
    ("lam", dict(lam=torch.ones(2)), ValueError, "lam must be a Python float or a 0-dim"),
    ("lam", dict(lam="0.1"), TypeError, "lam must be a Python float"),
    ("gamma", dict(gamma=torch.tensor(1)), TypeError, "gamma must be a floating-point"),
]


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("name,changes,exc,msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_inputs_name_the_argument(fn, name, changes, exc, msg):
    if fn == "distance" and name == "gamma":
        pytest.skip("randers_distance takes no gamma")
    with pytest.raises(exc, match=msg):
        FUNCS[fn](**_args(**changes))


@pytest.mark.parametrize("fn", FUNCS)
def test_negative_eps_and_unknown_backend(fn):
    with pytest.raises(ValueError, match="eps must be >= 0"):
        FUNCS[fn](**_args(), eps=-1e-3)
    with pytest.raises(ValueError, match="backend must be one of"):
        FUNCS[fn](**_args(), backend="cuda")


def test_mixed_devices():
    meta = torch.randn(5, 3, device="meta")
    with pytest.raises(ValueError, match="mu is on meta but x is on cpu"):
        fk.randers_logits(**_args(mu=meta))


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' runs on CUDA tensors"):
        fk.randers_logits(**_args(), backend="triton")


def test_target_checks():
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 3)
    ce = lambda t, **kw: fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, t, **kw)
    with pytest.raises(ValueError, match=r"target holds class index 5, out of range \[0, 5\)"):
        ce(torch.tensor([0, 1, 5, 2]))
    with pytest.raises(ValueError, match="target holds class index -1"):
        ce(torch.tensor([0, 1, -1, 2]))
    with pytest.raises(TypeError, match="target must be an int64"):
        ce(torch.zeros(4))
    with pytest.raises(ValueError, match=r"target must have shape \[B\] = \[4\]"):
        ce(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be one of"):
        ce(torch.zeros(4, dtype=torch.long), reduction="avg")
    ce(torch.tensor([0, -100, 4, 2]))  # ignore_index is not out of range


def test_singular_sigma_with_zero_eps():
    x, mu, _, beta, lam, gamma = make_inputs(4, 5, 3)
    with pytest.raises(ValueError, match="not positive definite"):
        fk.randers_logits(x, mu, torch.zeros(3, 3), beta, lam, gamma, eps=0.0, backend="cpp")
