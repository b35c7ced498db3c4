"""backend="auto" is never silently slow: without the C++ kernels it falls back to the einsum
reference only where its [B, C, D] temporaries stay small, with a warning that carries the cause;
larger problems get that cause as an error (faim_kernels/ops/dispatch.py)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from faim_kernels import _cpp_loader
from faim_kernels.ops import dispatch

CAUSE = "no C++ compiler to build the C++ CPU kernels (`c++` is not on PATH)"


@pytest.fixture
def no_cpp_kernels(monkeypatch):
    def unavailable():
        raise _cpp_loader.CppKernelsUnavailable(CAUSE)
    monkeypatch.setattr(_cpp_loader, "load", unavailable)
    monkeypatch.setattr(dispatch, "_warned", set())


def test_small_problem_falls_back_with_the_cause(no_cpp_kernels):
    x, mu, L, beta = torch.randn(4, 8), torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.warns(UserWarning, match="c\\+\\+` is not on PATH"):
        out = fk.randers_logits(x, mu, L, beta, 0.1, 2.0)
    torch.testing.assert_close(out, fk.reference.randers_logits(x, mu, L, beta, 0.1, 2.0))


def test_large_problem_refuses_the_reference(no_cpp_kernels):
    """(256, 4096, 128): the einsum would hold ~2 GB of [B, C, D] temporaries; the error says why the
    fused kernels are missing and how to force the reference."""
    x, mu, L, beta = torch.randn(256, 128), torch.randn(4096, 128), torch.rand(128) + 0.5, torch.randn(128)
    with pytest.raises(RuntimeError, match="not on PATH") as info:
        fk.randers_logits(x, mu, L, beta, 0.1, 2.0)
    assert "backend='reference'" in str(info.value) and "GiB" in str(info.value)
    with pytest.raises(RuntimeError, match="not on PATH"):
        fk.randers_cross_entropy(x, mu, L, beta, 0.1, 2.0, torch.zeros(256, dtype=torch.long))


def test_forced_cpp_backend_raises_the_loader_error(no_cpp_kernels):
    x, mu, L, beta = torch.randn(4, 8), torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.raises(_cpp_loader.CppKernelsUnavailable, match="not on PATH"):
        fk.randers_logits(x, mu, L, beta, 0.1, 2.0, backend="cpp")


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.resolve_backend("cuda", torch.device("cpu"))
