"""backend="auto" is never silently slow or wrong: without the C++ kernels it runs backend="torch" (the
same exact algorithm in plain PyTorch ops, [B, C] memory) with a warning that carries the cause, at
any size (faim_kernels/ops/dispatch.py). The einsum reference is never chosen for the user."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from faim_kernels import _cpp_loader
from faim_kernels.ops import dispatch



def test_small_problem_falls_back_with_the_cause(no_cpp_kernels):
    x, mu, L, beta = torch.randn(4, 8), torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.warns(UserWarning, match="c\\+\\+` is not on PATH") as record:
        out = fk.randers_logits(x, mu, L, beta, 0.1, 2.0)
    assert "backend='torch'" in str(record[0].message)
    assert dispatch.resolve_backend("auto", x.device) == "torch"
    torch.testing.assert_close(out, fk.reference.randers_logits(x, mu, L, beta, 0.1, 2.0))


def test_large_problem_runs_the_torch_path(no_cpp_kernels):
    """(256, 4096, 128): the einsum would hold ~2 GB of [B, C, D] temporaries and was refused; the
    torch path runs it (the warning still says why the fused kernels are missing) and is exact."""
    x, mu, L, beta = torch.randn(256, 128), torch.randn(4096, 128), torch.rand(128) + 0.5, torch.randn(128)
    with pytest.warns(UserWarning, match="not on PATH"):
        out = fk.randers_logits(x, mu, L, beta, 0.1, 2.0)
    want = fk.reference.randers_logits(x[:32].double(), mu[:600].double(), L.double(), beta.double(), 0.1, 2.0)
    torch.testing.assert_close(out[:32, :600].double(), want, rtol=1e-4, atol=0)
    target = torch.zeros(256, dtype=torch.long)
    loss = fk.randers_cross_entropy(x, mu, L, beta, 0.1, 2.0, target)
    torch.testing.assert_close(loss, fk.randers_cross_entropy(x, mu, L, beta, 0.1, 2.0, target, backend="torch"))


def test_forced_cpp_backend_raises_the_loader_error(no_cpp_kernels):
    x, mu, L, beta = torch.randn(4, 8), torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.raises(_cpp_loader.CppKernelsUnavailable, match="not on PATH"):
        fk.randers_logits(x, mu, L, beta, 0.1, 2.0, backend="cpp")


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", torch.device("cpu"))
