"""The custom-op registration: opcheck, torch.compile, and the fake kernels (SPEC §4)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import assert_rel_close, make_inputs


def _op_args(full, dtype=torch.float64, near=False):
    """The contract op's own inputs, as leaves: (x, mu, lc, beta, lam, gamma, eps, tau)."""
    fk._cpp_loader.load()  # the C++ kernels register on first use; these tests call the ops directly
    x, mu, L, beta, lam, gamma = make_inputs(7, 11, 5, full=full, dtype=dtype, near=near)
    lc = fk.transform.metric_factor(L, 1e-6, dtype)
    leaf = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return (leaf(x), leaf(mu), leaf(lc), leaf(beta), leaf(lam.double()), leaf(gamma.double()), 1e-6,
            fk.transform.risk_threshold(5, dtype))


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_opcheck_cpp(full):
    ops = torch.ops.faim_kernels
    args = _op_args(full)
    torch.library.opcheck(ops.randers_logits.default, args)
    logits, xp, mup, sx, smu = ops.randers_logits.default(*args)
    grad = torch.randn(7, 11, dtype=torch.float64)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(ops.randers_logits_backward.default,
                          (grad, logits.detach()) + plain[:6] + (xp, mup, sx, smu) + plain[6:])


def test_op_gradcheck_against_its_own_inputs():
    """The closed-form backward is the derivative of the op in (x, mu, Lc, beta, lam, gamma), with
    every pair through the expansion (tau = 0) and with every close pair recomputed (tau = 1)."""
    op = torch.ops.faim_kernels.randers_logits.default
    x, mu, lc, beta, lam, gamma, eps, _ = _op_args(True)
    for tau in (0.0, 1.0):
        f = lambda *a: op(*a, eps, tau)[0]  # noqa: E731
        assert torch.autograd.gradcheck(f, (x, mu, lc, beta, lam, gamma))


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            x, mu, L, beta, lam, gamma = make_inputs(1, 9, 6, full=True)
            self.mu, self.L, self.beta = torch.nn.Parameter(mu), torch.nn.Parameter(L), torch.nn.Parameter(beta)
            self.lam, self.gamma = torch.nn.Parameter(lam), torch.nn.Parameter(gamma)

        def forward(self, x):
            return fk.randers_logits(torch.tanh(x), self.mu, self.L, self.beta, self.lam, self.gamma, backend="cpp")

    model = Head()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 6)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    assert_rel_close(out, eager_out, 1e-6)
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g, e, 1e-5, "compiled gradient")


@pytest.mark.slow
def test_torch_compile_inductor():
    torch._dynamo.reset()
    x, mu, L, beta, lam, gamma = make_inputs(6, 10, 8, requires_grad=True)
    f = torch.compile(lambda x: fk.randers_logits(x * 2, mu, L, beta, lam, gamma, backend="cpp").logsumexp(1),
                      fullgraph=True)
    assert_rel_close(f(x), fk.randers_logits(x * 2, mu, L, beta, lam, gamma, backend="cpp").logsumexp(1), 1e-5)


def test_fake_kernels_give_shapes_and_dtypes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    ops = torch.ops.faim_kernels
    args = [a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(True, dtype=torch.float32)]
    real = ops.randers_logits.default(*args)
    real_grads = ops.randers_logits_backward.default(torch.ones_like(real[0]), real[0], *args[:6], *real[1:], *args[6:])
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = ops.randers_logits.default(*fake)
        grads = ops.randers_logits_backward.default(torch.empty(7, 11), out[0], *fake[:6], *out[1:], *fake[6:])
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in real]
    assert out[0].shape == (7, 11) and out[0].dtype == torch.float32
    assert [(g.shape, g.dtype) for g in grads] == [(g.shape, g.dtype) for g in real_grads]
    assert [g.shape for g in grads] == [a.shape for a in fake[:4]] + [torch.Size([])] * 2
