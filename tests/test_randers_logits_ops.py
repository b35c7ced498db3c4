"""The custom-op registration: opcheck, torch.compile, and the fake kernels (SPEC §4)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import assert_rel_close, make_inputs
from faim_kernels.transform import transform


def _op_args(full, dtype=torch.float64, near=False):
    x, mu, L, beta, lam, gamma = make_inputs(7, 11, 5, full=full, dtype=dtype, near=near, requires_grad=True)
    t = transform(x, mu, L, beta, lam, gamma, 1e-6)
    # Leaf copies so opcheck can differentiate with respect to the op's own inputs.
    xp, mup = t.xp.detach().requires_grad_(), t.mup.detach().requires_grad_()
    sx, smu = t.sx.detach().requires_grad_(), t.smu.detach().requires_grad_()
    lam64, gamma64 = t.lam.detach().requires_grad_(), t.gamma.detach().requires_grad_()
    return (xp, mup, sx, smu, t.x, t.mu, t.lc, lam64, gamma64, 1e-6, t.tau)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_opcheck_cpp(full):
    ops = torch.ops.faim_kernels
    args = _op_args(full)
    torch.library.opcheck(ops.randers_logits_fwd.default, args)
    grad = torch.randn(7, 11, dtype=torch.float64)
    torch.library.opcheck(ops.randers_logits_bwd.default, (grad,) + tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))


def test_op_gradcheck_against_its_own_inputs():
    """The closed-form backward is the derivative of the op in (x', mu', sx, smu, lam, gamma)."""
    op = torch.ops.faim_kernels.randers_logits_fwd.default
    xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, tau = _op_args(False)
    # tau = 0: no pair is recomputed from the hints, so the op is a function of its first inputs only.
    f = lambda xp, mup, sx, smu, lam, gamma: op(xp, mup, sx, smu, x, mu, lc, lam, gamma, eps, 0.0)
    assert torch.autograd.gradcheck(f, (xp, mup, sx, smu, lam, gamma))


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
    args = _op_args(True, dtype=torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = ops.randers_logits_fwd.default(*fake)
        assert out.shape == (7, 11) and out.dtype == torch.float32
        grads = ops.randers_logits_bwd.default(torch.empty(7, 11), *fake)
        assert [g.shape for g in grads] == [a.shape for a in fake[:4]] + [torch.Size([])] * 2
