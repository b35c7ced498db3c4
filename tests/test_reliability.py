"""Every input gets the right answer or a clear error, never a silently wrong one: second
derivatives, autocast, validation that holds under torch.compile, non-finite and huge inputs, the
exact-hit convention and float32 accuracy corners. Each test is named after the behaviour; the
backend is a fixture (the C++ kernels, the Triton kernels through the interpreter on CPU)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from faim_kernels.ops import contract

from conftest import (assert_device_assert_in_subprocess, assert_norm_close, assert_rel_close, contract_ops,
                      make_inputs, reference64)

FAMILIES = ("logits", "distance", "cross_entropy")


def _call(family, inputs, backend, target=None, **kw):
    x, mu, L, beta, lam, gamma = inputs
    if family == "logits":
        return fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend, **kw)
    if family == "distance":
        return fk.randers_distance(x, mu, L, beta, lam, backend=backend, **kw)
    return fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, backend=backend, **kw)


# ---- second derivatives: refused with the way out, never a wrong number ----

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_double_backward_raises_naming_the_reference_backend(backend, device, family, full):
    inputs = make_inputs(3, 4, 5, full=full, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 3, 1], device=device)
    out = _call(family, inputs, backend, target)
    first = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)[0]
    # The first derivative with create_graph=True is still the right one.
    plain = torch.autograd.grad(_call(family, inputs, backend, target).square().sum(), inputs[0])[0]
    torch.testing.assert_close(first.detach(), plain, rtol=1e-12, atol=0)
    for wrt in (inputs[0], inputs[1], inputs[2], inputs[4]):
        with pytest.raises(RuntimeError, match="backend='reference'"):
            torch.autograd.grad(first.square().sum(), wrt, retain_graph=True)


def test_double_backward_works_through_the_reference_backend():
    inputs = make_inputs(2, 3, 3, full=True, dtype=torch.float64, requires_grad=True)
    fn = lambda *t: fk.randers_logits(*t, backend="reference")  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_double_backward_raises_for_the_ops_called_directly():
    fk._cpp_loader.load()
    x, mu, L, beta, lam, gamma = make_inputs(3, 4, 5, dtype=torch.float64, requires_grad=True)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float64)
    out = contract.logits_op(x, mu, lc, beta, lam, gamma, 1e-6, 0.01)[0]
    g = torch.autograd.grad(out.sum(), x, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="backend='reference'"):
        g.sum().backward()


# ---- autocast: the float32 list, like cdist and cross_entropy ----

@pytest.mark.parametrize("full_sigma", [False, True], ids=["diag", "full"])
def test_head_forward_and_loss_work_under_cpu_autocast(backend, full_sigma):
    torch.manual_seed(0)
    head = fk.FAIMHead(8, 6, full_sigma=full_sigma, backend=backend)
    with torch.no_grad():
        head.mu.copy_(torch.randn(6, 8))
    feats = torch.randn(5, 8)
    target = torch.tensor([0, 5, 2, 2, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = feats.to(torch.bfloat16)  # what an autocast backbone hands over
        logits = head(h)
        loss = head.loss(h, target)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    # The documented precision: the bfloat16 activations computed exactly in float32 (float32 bounds).
    want = head.to(torch.float64)(h.to(torch.float64))
    head.to(torch.float32)
    assert_rel_close(logits, want, 1e-4, "logits under autocast")
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_ops_are_registered_for_autocast_like_pytorchs_own():
    fk._cpp_loader.load()
    x, mu, L, beta, lam, gamma = make_inputs(3, 4, 5)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = contract.logits_op(x.bfloat16(), mu.bfloat16(), lc, beta, lam, gamma, 1e-6, 0.01)[0]
        lse = contract.cross_entropy_op(x.bfloat16(), mu, lc, beta.bfloat16(), lam, gamma,
                                        torch.tensor([0, 1, 2]), 1e-6, 0.01, 0.0)[0]
    assert out.dtype == torch.float32 and lse.dtype == torch.float64
    want = fk.randers_logits(x.bfloat16().float(), mu.bfloat16().float(), L, beta, lam, gamma, backend="cpp")
    assert_rel_close(out, want, 1e-6, "op under autocast")


# ---- validation that holds everywhere ----

@pytest.mark.parametrize("bad, match", [
    (dict(lam=float("nan")), "lam must be >= 0 and finite"),
    (dict(lam=float("inf")), "lam must be >= 0 and finite"),
    (dict(lam=torch.tensor(float("nan"))), "lam must be >= 0 and finite"),
    (dict(gamma=float("nan")), "gamma must be finite"),
    (dict(eps=float("nan")), "eps must be >= 0 and finite"),
    (dict(eps=float("inf")), "eps must be >= 0 and finite"),
])
def test_non_finite_scalars_are_refused_by_name(bad, match):
    x, mu, L, beta, lam, gamma = make_inputs(3, 4, 5)
    kw = dict(lam=0.3, gamma=2.0, eps=1e-6)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fk.randers_logits(x, mu, L, beta, kw["lam"], kw["gamma"], kw["eps"])


def test_gamma_none_is_a_type_error_naming_gamma():
    x, mu, L, beta, lam, _ = make_inputs(3, 4, 5)
    with pytest.raises(TypeError, match="gamma"):
        fk.randers_logits(x, mu, L, beta, lam, None)
    with pytest.raises(TypeError, match="gamma"):
        fk.randers_cross_entropy(x, mu, L, beta, lam, None, torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_full_L_is_reported_as_non_finite(value):
    x, mu, L, beta, lam, gamma = make_inputs(3, 4, 5, full=True)
    L[1, 2] = value
    with pytest.raises(ValueError, match="L holds non-finite values"):
        fk.randers_logits(x, mu, L, beta, lam, gamma)


def test_out_of_range_target_raises_under_torch_compile():
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 6)
    target = torch.tensor([0, 5, 1, -100])  # 5 is out of range; -100 is ignore_index
    fn = torch.compile(lambda *a: fk.randers_cross_entropy(*a, backend="cpp"), fullgraph=True, dynamic=False)
    with pytest.raises(Exception, match="out of range"):
        fn(x, mu, L, beta, lam, gamma, target)
    torch.testing.assert_close(fn(x, mu, L, beta, lam, gamma, torch.tensor([0, 4, 1, -100])),
                               fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, torch.tensor([0, 4, 1, -100])))


@pytest.mark.parametrize("pairs", [False, True], ids=["index", "pairs"])
@pytest.mark.parametrize("bad", [-2, -7, 5])
def test_cross_entropy_kernels_refuse_out_of_range_targets(backend, device, bad, pairs):
    x, mu, L, beta, lam, gamma = make_inputs(3, 5, 4, device=device)
    fwd, _ = contract_ops("cross_entropy", backend)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
    target = torch.tensor([[0, 1], [bad, 2], [-1, 4]] if pairs else [0, bad, -1], device=device)
    if device == "cuda":  # a device assert there: checked in a fresh process (it ends the CUDA context)
        assert_device_assert_in_subprocess(f"""
            x, mu, L, beta, lam, gamma = make_inputs(3, 5, 4, device="cuda")
            fwd, _ = contract_ops("cross_entropy", "triton")
            lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
            target = torch.tensor({target.tolist()}, device="cuda")
            fwd(x, mu, lc, beta, lam, gamma, target, 1e-6, 0.01, 0.0)""")
        return
    with pytest.raises((ValueError, RuntimeError), match="out of range"):
        fwd(x, mu, lc, beta, lam, gamma, target, 1e-6, 0.01, 0.0)


# ---- non-finite and huge inputs ----

@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_infinite_prototype_is_at_infinite_distance_and_spares_other_rows(backend, device, full, dtype):
    x, mu, L, beta, lam, gamma = make_inputs(5, 6, 4, full=full, dtype=dtype, device=device)
    mu[2, 1] = float("inf")
    mu[4, 0] = float("-inf")
    d = fk.randers_distance(x, mu, L, beta, lam, backend=backend)
    logits = fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend)
    assert (d[:, [2, 4]] == float("inf")).all() and (logits[:, [2, 4]] == float("-inf")).all()
    keep = [0, 1, 3, 5]
    assert_rel_close(d[:, keep], reference64(fk.reference.randers_distance, [x, mu[keep], L, beta, lam]),
                     1e-4 if dtype == torch.float32 else 1e-10, "finite columns")
    target = torch.tensor([0, 1, 3, 5, 0], device=device)
    loss = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none", backend=backend)
    local = torch.tensor([0, 1, 2, 3, 0], device=device)
    want = fk.reference.randers_cross_entropy(*[t.double() for t in (x, mu[keep], L, beta, lam, gamma)], local,
                                              reduction="none")
    assert_rel_close(loss, want, 1e-5 if dtype == torch.float32 else 1e-12, "loss with an infinite class")


def test_nan_prototype_poisons_only_its_column(backend, device):
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 3, device=device)
    mu[3, 2] = float("nan")
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend)
    assert out[:, 3].isnan().all() and torch.isfinite(out[:, [0, 1, 2, 4]]).all()


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("scale", [1e20, 1e30])
def test_float32_inputs_whose_squared_norms_overflow_stay_finite_and_exact(backend, device, full, scale):
    g = torch.Generator().manual_seed(3)
    x = scale * torch.randn(4, 5, generator=g)
    mu = scale * torch.randn(6, 5, generator=g)
    L = torch.eye(5) + 0.1 * torch.randn(5, 5, generator=g) if full else 0.5 + torch.rand(5, generator=g)
    beta = torch.randn(5, generator=g) / 5
    inputs = [t.to(device) for t in (x, mu, L, beta)]
    d = fk.randers_distance(*inputs, 0.3, backend=backend)
    want = fk.reference.randers_distance(*[t.double() for t in inputs], 0.3)
    assert torch.isfinite(d).all()
    assert_rel_close(d, want, 1e-4, f"distances at {scale:g}")
    loss = fk.randers_cross_entropy(*inputs, 0.3, 1e-30, torch.tensor([0, 1, 2, 3], device=device), backend=backend)
    assert torch.isfinite(loss)


# ---- the exact-hit convention and float32 accuracy corners ----

def _closed_form_grad_x(x, mu, L, beta, lam, w, eps):
    """∂(Σ w·d)/∂x in float64 from Eq. 4, with s = betaᵀ(x_b − mu_c) formed from the difference (exactly
    0 at a hit) and the convention of the README: each norm's gradient is 0 where the norm is 0."""
    S = fk.reference.sigma(L, eps)
    diff = x[:, None, :] - mu[None, :, :]
    Sd = diff @ S
    a = torch.sqrt((Sd * diff).sum(-1) + eps)
    s = diff @ beta
    r = torch.sqrt(s * s + eps)
    ga = torch.where(a[..., None] > 0, Sd / a.clamp_min(1e-300)[..., None], 0.0)
    gr = torch.where(r[..., None] > 0, (s / r.clamp_min(1e-300))[..., None] * beta, 0.0)
    return (w[..., None] * (ga + lam * gr)).sum(1)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_exact_hit_with_eps_zero_has_the_documented_gradient(backend, device, full):
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 6, full=full, dtype=torch.float64, device=device)
    mu = 3.0 + 7.0 * mu  # far from the origin: sx and smu are large, so sx − smu would not be 0
    x[0] = mu[2]
    x[3] = mu[0]
    x.requires_grad_()
    d = fk.randers_distance(x, mu, L, beta, lam, eps=0.0, backend=backend)
    w = torch.randn(d.shape, dtype=torch.float64, device=device)
    got = torch.autograd.grad((d * w).sum(), x)[0]
    want = _closed_form_grad_x(x.detach().cpu(), mu.cpu(), L.cpu(), beta.cpu(), float(lam), w.cpu(), 0.0)
    assert_rel_close(d[0, 2], torch.tensor(0.0, dtype=torch.float64), 0.0, "distance at the hit")
    for row in (0, 3):
        assert_norm_close(got[row], want[row], 1e-9, f"dx at the exact hit (row {row})")


def test_float32_gradients_near_far_out_prototypes_match_float64(backend, device):
    """|mu| ≫ |x − mu|: every gradient within 1e-4 (relative norm) of float64 on near pairs."""
    g = torch.Generator().manual_seed(5)
    B, C, D = (6, 5, 16)
    mu = 1e3 + 10 * torch.randn(C, D, generator=g, dtype=torch.float64)
    target = torch.arange(B) % C
    x = mu[target] + 1e-2 * torch.randn(B, D, generator=g, dtype=torch.float64)
    L = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
    lam = torch.tensor(0.3, dtype=torch.float64)
    gamma = torch.tensor(2.0, dtype=torch.float64)
    x32, mu32 = x.float(), mu.float()  # the float32 inputs: the float64 truth is taken of these same values
    inputs = [t.float().to(device).requires_grad_() for t in (x32, mu32, L, beta, lam, gamma)]
    loss = fk.randers_cross_entropy(*inputs, target.to(device), backend=backend)
    got = torch.autograd.grad(loss, inputs)
    ref_inputs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    want = torch.autograd.grad(fk.reference.randers_cross_entropy(*ref_inputs, target), ref_inputs)
    for name, a, b in zip(["x", "mu", "L", "beta", "lam", "gamma"], got, want):
        assert_norm_close(a, b, 1e-4, f"d{name}")


@pytest.mark.parametrize("D", [1, 2, 3, 8])
def test_float32_pairs_just_above_the_near_threshold_are_within_1e_5(backend, device, D):
    """The GEMM expansion's worst pairs (q just above tau·(|x'|² + |mu'|²)), at every small D."""
    g = torch.Generator().manual_seed(D)
    B = C = 32 if backend == "cpp" else 12
    worst = 0.0
    for _ in range(4 if backend == "cpp" else 1):
        mu = 3 + 10 * torch.randn(C, D, generator=g, dtype=torch.float64)
        t = torch.randint(0, C, (B,), generator=g)
        direction = torch.randn(B, D, generator=g, dtype=torch.float64)
        direction /= direction.norm(dim=1, keepdim=True)
        L = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
        # q / (|x'|² + |mu'|²) from tau/2 to 8·tau, with |x'| ≈ |mu'| (centred by the mean prototype)
        tau = fk.transform.risk_threshold(D, torch.float32)
        ratio = tau * torch.exp(torch.empty(B, dtype=torch.float64).uniform_(-0.7, 2.1, generator=g))
        size = (((mu[t] - mu.mean(0)) * L) ** 2).sum(1)
        x = mu[t] + direction / L * torch.sqrt(2 * ratio * size)[:, None]
        inputs = [v.float().to(device) for v in (x, mu, L, torch.zeros(D, dtype=torch.float64))]
        d = fk.randers_distance(*inputs, 0.0, backend=backend)
        want = reference64(fk.reference.randers_distance, inputs + [0.0])
        worst = max(worst, ((d.double().cpu() - want.cpu()).abs() / want.cpu()).max().item())
    assert worst <= 1e-5, f"max relative error {worst:.2e} at D = {D}"
