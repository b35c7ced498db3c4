"""FAIMBlock: the log/exp maps of the constant Randers metric (straight lines) and the block around them."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import faim_kernels as fk
from faim_kernels import reference
from tests.conftest import assert_rel_close


def random_metric(D, full, eps=1e-6, seed=0):
    torch.manual_seed(seed)
    m = fk.RandersMetric(D, full_sigma=full, lambda_init=0.4, eps=eps, dtype=torch.float64)
    with torch.no_grad():
        m.beta.normal_().div_(D ** 0.5)
        if full:
            m.L.add_(0.4 * torch.randn(D, D, dtype=torch.float64) / D ** 0.5)
        else:
            m.log_sigma_diag.uniform_(-1, 1)
    return m


def F_explicit(m, v):
    """F(v) = sqrt(vᵀ Sigma v + eps) + λ·sqrt((βᵀv)² + eps), written out from Sigma."""
    S = m.sigma().detach()
    q = torch.einsum("nd,df,nf->n", v, S, v)
    s = v @ m.beta.detach()
    return torch.sqrt(q + m.eps) + m.lam.detach() * torch.sqrt(s * s + m.eps)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_distance_to_exp_map_is_the_length_of_the_tangent_vector(full):
    D, N = 7, 20
    m = random_metric(D, full)
    block = fk.FAIMBlock(D, metric=m)
    p = torch.randn(N, D, dtype=torch.float64)
    v = torch.randn(N, D, dtype=torch.float64) * torch.logspace(-3, 1, N, dtype=torch.float64).unsqueeze(1)
    x = block.exp_map(p, v)
    with torch.no_grad():
        want = F_explicit(m, v)
        assert_rel_close(block.distance(p, x), want, 1e-12, "d_F(p, exp_p(v)) vs F(v)")
        assert_rel_close(block.norm(v), want, 1e-12, "norm")
        # and the fused all-pairs kernel agrees on the diagonal
        assert_rel_close(torch.diagonal(m.cdist(p, x)), want, 1e-9, "fused d_F(p, exp_p(v))")
        assert_rel_close(torch.diagonal(reference.randers_distance(p, x, *m.metric_args(), m.eps)), want, 1e-12,
                         "reference d_F(p, exp_p(v))")
    assert torch.allclose(block.log_map(p, x), v, rtol=0, atol=1e-12)
    assert torch.equal(block.exp_map(p, block.log_map(p, x)), p + (x - p))


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_straight_segments_are_geodesics(full):
    """With eps = 0, F is a norm: d_F(p, exp_p(t·v)) = t·F(v), and every point of the segment
    splits the distance exactly (d(p, z) + d(z, x) = d(p, x)): the segment is a shortest path."""
    D = 6
    m = random_metric(D, full, eps=0.0, seed=1)
    p, v = torch.randn(5, D, dtype=torch.float64), torch.randn(5, D, dtype=torch.float64)
    with torch.no_grad():
        x = fk.FAIMBlock.exp_map(p, v)
        for t in (0.1, 0.5, 0.9):
            z = fk.FAIMBlock.exp_map(p, t * v)
            assert_rel_close(m.paired_distance(p, z), t * m.norm(v), 1e-12, f"homogeneity t={t}")
            assert_rel_close(m.paired_distance(p, z) + m.paired_distance(z, x), m.paired_distance(p, x), 1e-12,
                             f"triangle equality t={t}")
        # a detour is longer
        w = torch.randn(5, D, dtype=torch.float64)
        z = p + 0.5 * v + w
        assert (m.paired_distance(p, z) + m.paired_distance(z, x) > m.paired_distance(p, x)).all()


def test_forward_shared_base_point():
    D = 5
    torch.manual_seed(0)
    inner = nn.Linear(D, D, dtype=torch.float64)
    block = fk.FAIMBlock(D, inner, dtype=torch.float64)
    with torch.no_grad():
        block.p.normal_()
    x = torch.randn(4, 3, D, dtype=torch.float64, requires_grad=True)  # tokens: [B, N, D]
    out = block(x)
    assert out.shape == x.shape
    assert_rel_close(out, block.p + inner(x - block.p), 1e-12, "p + f(x − p)")
    # f linear without bias: the block is affine with fixed point p
    p = block.p.detach().expand(2, D)
    no_bias = fk.FAIMBlock(D, nn.Linear(D, D, bias=False, dtype=torch.float64), dtype=torch.float64)
    with torch.no_grad():
        no_bias.p.copy_(block.p)
    assert_rel_close(no_bias(p), p, 1e-12, "fixed point")
    out.sum().backward()
    assert block.p.grad is not None and inner.weight.grad is not None and x.grad is not None
    assert {n for n, _ in block.named_parameters()} == {"p", "module.weight", "module.bias"}


def test_forward_dynamic_base_point_and_any_module():
    D = 4
    torch.manual_seed(1)
    g = nn.Linear(D, D)
    f = nn.Sequential(nn.Linear(D, 8), nn.GELU(), nn.Linear(8, D))
    block = fk.FAIMBlock(D, f, base_point=g)
    x = torch.randn(6, D)
    p = g(x)
    assert_rel_close(block(x), p + f(x - p), 1e-6, "p = g(x)")
    assert "dynamic" in repr(block)


def test_metric_is_a_shared_submodule():
    D = 5
    head = fk.FAIMHead(D, 3)
    block = fk.FAIMBlock(D, metric=head)
    assert block.metric is head and dict(block.named_children())["metric"] is head  # shared, not copied
    assert {"metric.mu", "metric.beta", "metric.lmbda", "metric.scale", "metric.log_sigma_diag"} <= set(block.state_dict())
    model = nn.ModuleDict({"block": block, "head": head})
    assert len(list(model.parameters())) == 3 + 5  # p, weight, bias + the head's five, listed once
    v = torch.randn(3, D)
    assert_rel_close(block.norm(v), head.paired_distance(v, torch.zeros_like(v)), 1e-12, "norm via a head")
    assert "metric" not in dict(fk.FAIMBlock(D).named_children())


def test_to_and_state_dict_move_the_metric():
    D = 4
    block = fk.FAIMBlock(D, metric=fk.RandersMetric(D, full_sigma=True))
    block.double()
    assert all(p.dtype == torch.float64 for p in block.parameters())
    assert block.metric.L.dtype == torch.float64 and block.metric.beta.dtype == torch.float64
    v = torch.randn(3, D, dtype=torch.float64)
    assert block.norm(v).dtype == torch.float64
    meta = fk.FAIMBlock(D, metric=fk.RandersMetric(D)).to("meta")  # a device move, as .cuda() does
    assert meta.metric.beta.device.type == "meta" and meta.p.device.type == "meta"

    other = fk.FAIMBlock(D, metric=fk.RandersMetric(D, full_sigma=True), dtype=torch.float64).double()
    with torch.no_grad():
        block.metric.L.add_(0.1 * torch.randn(D, D, dtype=torch.float64))
        block.metric.lmbda.fill_(0.7)
    other.load_state_dict(block.state_dict())  # strict: the metric's entries are expected and restored
    assert torch.equal(other.metric.L, block.metric.L) and other.metric.lmbda.item() == 0.7
    assert_rel_close(other.norm(v), block.norm(v), 1e-15, "norm after load_state_dict")


def test_block_errors():
    with pytest.raises(RuntimeError, match="no metric"):
        fk.FAIMBlock(3).norm(torch.randn(2, 3))
    with pytest.raises(ValueError, match="base_point"):
        fk.FAIMBlock(3, base_point="mean")
    with pytest.raises(ValueError, match="dimension"):
        fk.FAIMBlock(3, metric=fk.RandersMetric(4))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3\]"):
        fk.FAIMBlock(3)(torch.randn(2, 4))
