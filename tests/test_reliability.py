"""Every input gets the right answer or a clear error, never a silently wrong one: second
derivatives, autocast, validation that holds under torch.compile, non-finite and huge inputs, the
exact-hit convention and float32 accuracy corners. Each test is named after the behaviour; the
backend is a fixture (the C++ kernels, the Triton kernels through the interpreter on CPU)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import faim_kernels as fk
from faim_kernels.ops import contract

from conftest import (assert_device_assert_in_subprocess, assert_norm_close, assert_rel_close, contract_ops,
                      make_inputs, reference64)

OP_FAMILIES = ("logits", "distance", "cross_entropy")


def _call(op_family, inputs, backend, target=None, **kw):
    x, mu, L, beta, lam, gamma = inputs
    if op_family == "logits":
        return fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend, **kw)
    if op_family == "distance":
        return fk.randers_distance(x, mu, L, beta, lam, backend=backend, **kw)
    return fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, backend=backend, **kw)


# ---- second derivatives: refused with the way out, never a wrong number ----

@pytest.mark.parametrize("op_family", OP_FAMILIES)
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_double_backward_raises_naming_the_reference_backend(backend, device, op_family, full):
    inputs = make_inputs(3, 4, 5, full=full, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 3, 1], device=device)
    out = _call(op_family, inputs, backend, target)
    first = torch.autograd.grad(out.square().sum(), inputs[0], create_graph=True)[0]
    # The first derivative with create_graph=True is still the right one.
    plain = torch.autograd.grad(_call(op_family, inputs, backend, target).square().sum(), inputs[0])[0]
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
    0 at a hit) and the convention of docs/guarantees.md: each norm's gradient is 0 where the norm is 0."""
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
        tau = fk.transform.near_threshold(D, torch.float32)
        ratio = tau * torch.exp(torch.empty(B, dtype=torch.float64).uniform_(-0.7, 2.1, generator=g))
        size = (((mu[t] - mu.mean(0)) * L) ** 2).sum(1)
        x = mu[t] + direction / L * torch.sqrt(2 * ratio * size)[:, None]
        inputs = [v.float().to(device) for v in (x, mu, L, torch.zeros(D, dtype=torch.float64))]
        d = fk.randers_distance(*inputs, 0.0, backend=backend)
        want = reference64(fk.reference.randers_distance, inputs + [0.0])
        worst = max(worst, ((d.double().cpu() - want.cpu()).abs() / want.cpu()).max().item())
    assert worst <= 1e-5, f"max relative error {worst:.2e} at D = {D}"


# ---- learned class weights: the exact gradient, checked against F.cross_entropy ----

def _weighted_problem(form, device, ignore=False, seed=0):
    from faim_kernels.targets import SoftTargets
    inputs = make_inputs(6, 5, 4, dtype=torch.float64, device=device, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    if form == "index":
        target = torch.randint(0, 5, (6,), generator=g)
        if ignore:
            target[1] = target[4] = -100
    elif form == "dense":
        target = torch.softmax(torch.randn(6, 5, generator=g, dtype=torch.float64), 1)
    else:
        classes = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(6)])
        target = SoftTargets(classes.to(device), torch.rand(6, 2, generator=g, dtype=torch.float64).to(device), 0.05)
    if isinstance(target, torch.Tensor):
        target = target.to(device)
    weight = (0.2 + torch.rand(5, generator=g, dtype=torch.float64)).to(device).requires_grad_()
    return inputs, target, weight


WEIGHT_CASES = [  # (target form, label_smoothing, reduction, margin, lse_square_scale, ignored rows)
    ("index", 0.0, "mean", 0.0, 0.0, False), ("index", 0.1, "mean", 0.0, 0.0, True),
    ("index", 0.1, "sum", 0.5, 0.0, False), ("index", 0.3, "none", 0.0, 1e-2, True),
    ("dense", 0.0, "mean", 0.0, 0.0, False), ("dense", 0.1, "sum", 0.0, 1e-2, False),
    ("dense", 0.2, "none", 0.0, 0.0, False), ("pairs", 0.0, "mean", 0.0, 0.0, False),
    ("pairs", 0.1, "none", 0.0, 1e-2, False),
]


@pytest.mark.parametrize("form,smoothing,reduction,margin,z,ignore", WEIGHT_CASES,
                         ids=["-".join(map(str, c)) for c in WEIGHT_CASES])
def test_learned_class_weights_get_the_exact_gradient(backend, device, form, smoothing, reduction, margin, z,
                                                      ignore):
    (x, mu, L, beta, lam, gamma), target, weight = _weighted_problem(form, device, ignore)
    opts = dict(label_smoothing=smoothing, reduction=reduction, margin=margin, lse_square_scale=z)

    def loss(w, b, x=x):
        out = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, weight=w, backend=b, **opts)
        return out.sum() if reduction == "none" else out
    # gradcheck: the fused backward's ∂w (and ∂x) against finite differences of the fused loss.
    # (∂x through the interpreter is checked below against the reference: its gradcheck is slow.)
    wrt = (weight, x) if backend == "cpp" else (weight,)
    assert torch.autograd.gradcheck(lambda w, *xs: loss(w, backend, *xs), wrt, eps=1e-6, atol=1e-7, rtol=1e-5)
    # ... and against F.cross_entropy on the einsum logits (the reference backend) for every input.
    inputs = (weight, x, mu, L, beta, lam, gamma)
    got = torch.autograd.grad(loss(weight, backend), inputs)
    want = torch.autograd.grad(loss(weight, "reference"), inputs)
    for name, a, b in zip(("weight", "x", "mu", "L", "beta", "lam", "gamma"), got, want):
        assert_norm_close(a, b, 1e-9, f"d{name}")


def test_the_class_weight_gradient_matches_f_cross_entropy_directly():
    # The reproduction: a probability target, F.cross_entropy's own autograd as the oracle.
    import torch.nn.functional as F
    x, mu = torch.randn(6, 4).double(), torch.randn(5, 4).double()
    L, b, P = torch.eye(4).double(), torch.full((4,), .2).double(), torch.softmax(torch.randn(6, 5).double(), 1)
    for smoothing in (0.0, 0.2):
        w = torch.rand(5).double().add(.2).requires_grad_()
        fk.randers_cross_entropy(x, mu, L, b, .3, 2., P, weight=w, label_smoothing=smoothing).backward()
        w_ref = w.detach().clone().requires_grad_()
        logits = fk.reference.randers_logits(x, mu, L, b, .3, 2.)
        F.cross_entropy(logits, P, weight=w_ref, label_smoothing=smoothing).backward()
        assert_norm_close(w.grad, w_ref.grad, 1e-10, "dweight")
    # Class indices: F.cross_entropy refuses a weight that requires grad; the fused loss
    # differentiates it, checked by central differences of F.cross_entropy's value.
    t = torch.randint(0, 5, (6,))
    for smoothing in (0.0, 0.2):
        w = torch.rand(5).double().add(.2).requires_grad_()
        fk.randers_cross_entropy(x, mu, L, b, .3, 2., t, weight=w, label_smoothing=smoothing).backward()
        logits = fk.reference.randers_logits(x, mu, L, b, .3, 2.)
        h, fd = 1e-6, torch.empty(5, dtype=torch.float64)
        for c in range(5):
            e = torch.zeros(5, dtype=torch.float64)
            e[c] = h
            up, down = (F.cross_entropy(logits, t, weight=w.detach() + s * e, label_smoothing=smoothing)
                        for s in (1, -1))
            fd[c] = (up - down) / (2 * h)
        assert_norm_close(w.grad, fd, 1e-7, "dweight")


# ---- F.cross_entropy's corner semantics ----

@pytest.mark.parametrize("case", ["zero_target_weights", "all_ignored"])
def test_mean_with_no_target_weight_is_nan_as_in_f_cross_entropy(backend, device, case):
    import torch.nn.functional as F
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 3, dtype=torch.float64, device=device)
    target = torch.tensor([0, 1, 1, 0], device=device)
    weight = torch.tensor([0.0, 0.0, 1.0, 2.0, 0.5], dtype=torch.float64, device=device)
    if case == "all_ignored":
        target, weight = torch.full_like(target, -100), None
    for smoothing in (0.0, 0.1):
        want = F.cross_entropy(fk.reference.randers_logits(x, mu, L, beta, lam, gamma), target, weight=weight,
                               label_smoothing=smoothing)
        assert torch.isnan(want)
        for b in (backend, "reference"):
            got = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, weight=weight,
                                           label_smoothing=smoothing, backend=b)
            assert torch.isnan(got), (b, smoothing, got)


def test_probability_targets_refuse_a_non_negative_ignore_index_as_f_cross_entropy_does():
    from faim_kernels.targets import SoftTargets
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 3, dtype=torch.float64)
    dense = torch.softmax(torch.randn(4, 5, dtype=torch.float64), 1)
    pairs = SoftTargets(torch.tensor([[0, 1]] * 4), torch.full((4, 2), 0.5, dtype=torch.float64))
    for target in (dense, pairs):
        for backend in ("cpp", "reference"):
            with pytest.raises(ValueError, match="ignore_index=2 is not supported for probability targets"):
                fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, ignore_index=2, backend=backend)
            # A negative ignore_index is accepted (F.cross_entropy accepts it too).
            got = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, ignore_index=-1, backend=backend)
            assert torch.isfinite(got)


# ---- scale extremes: a tiny gamma leaves no distance in the float32 logits ----

@pytest.mark.parametrize("gamma", [1e-40, 1e-30, 3e-39])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_float32_tiny_gamma_backward_recomputes_the_distances(backend, device, gamma, full):
    # logits = −γ·d are subnormal (or 0) at γ = 1e-40: the backward must not rebuild d = −logits/γ
    # from them. The incoming gradient is scaled so that the exact gradients are normal float32
    # numbers (a gradient of 1e-40 itself could not be represented to 1e-3).
    x, mu, L, beta, lam, _ = make_inputs(6, 5, 4, full=full, dtype=torch.float32, device=device, requires_grad=True)
    gamma = torch.tensor(gamma, device=device, requires_grad=True)
    inputs = [x, mu, L, beta, lam, gamma]
    grad = 1e35 * torch.randn(6, 5, generator=torch.Generator().manual_seed(3)).to(device)
    got = torch.autograd.grad((fk.randers_logits(*inputs, backend=backend) * grad).sum(), inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad((fk.reference.randers_logits(*ref_inputs) * grad.double()).sum(), ref_inputs)
    for name, a, b in zip(("x", "mu", "L", "beta", "lam", "gamma"), got, want):
        assert_norm_close(a, b, 1e-3, f"d{name} at gamma = {gamma.item():.0e}")


# ---- deferred initialisation: meta and fake tensors get shapes, never a device error ----

@pytest.mark.parametrize("backend_name", ["auto", "reference"])
@pytest.mark.parametrize("full_sigma", [False, True], ids=["diag", "full"])
def test_head_runs_on_meta_tensors_like_nn_linear(backend_name, full_sigma):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shapes only: no fallback warning either
        head = fk.FAIMHead(16, 10, full_sigma=full_sigma, device="meta", backend=backend_name)
        x = torch.empty(4, 3, 16, device="meta")
        logits = head(x)
        assert logits.shape == (4, 3, 10) and logits.device.type == "meta"
        loss = head.loss(x, torch.empty(4, 3, dtype=torch.long, device="meta"))
        assert loss.shape == () and loss.device.type == "meta"
        assert head.distance(x).shape == (4, 3, 10)
        d, idx = fk.randers_topk(torch.empty(4, 16, device="meta"), head.mu, *head.metric_args(), 3)
        assert d.shape == idx.shape == (4, 3)
    # ... and materialises as deferred-initialisation loaders do it (to_empty, then initialise).
    head.to_empty(device="cpu")
    head.reset_parameters()
    feats = torch.randn(4, 16)
    torch.testing.assert_close(head(feats), fk.reference.randers_logits(feats, head.mu, *head.metric_args(),
                                                                       head.gamma, head.eps), rtol=1e-4, atol=1e-5)


def test_functions_run_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    head = fk.FAIMHead(8, 6)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, mu, L, beta = torch.randn(4, 8), torch.randn(6, 8), torch.eye(8), torch.randn(8)
        lam, gamma, target = torch.tensor(0.3), torch.tensor(2.0), torch.randint(0, 6, (4,))
        assert fk.randers_logits(x, mu, L, beta, lam, gamma).shape == (4, 6)
        assert fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target).shape == ()
        assert fk.randers_topk(x, mu, L, beta, lam, 2)[1].shape == (4, 2)
        assert head(x).shape == (4, 6) and head.loss(x, target).shape == ()


# ---- messages that name the package and the way out ----

def test_unwritable_build_cache_names_faim_kernels_cache(tmp_path):
    from test_packaging import _load_in_subprocess, _tiny_package  # noqa: PLC0415 (the loader harness)
    pkg = _tiny_package(tmp_path, "// probe\n")
    out = _load_in_subprocess(pkg, Path("/proc"))  # exists, and no one can write there, not even root
    assert "FAIM_KERNELS_CACHE" in out["error"] and "/proc" in out["error"], out
    assert "please report" not in out["error"]


def test_fallback_warning_names_the_package_once(monkeypatch):
    from faim_kernels import _cpp_loader
    from faim_kernels.ops import dispatch

    def unavailable():
        raise _cpp_loader.CppKernelsUnavailable("faim_kernels: no C++ compiler (`c++` is not on PATH)")
    monkeypatch.setattr(_cpp_loader, "load", unavailable)
    monkeypatch.setattr(dispatch, "_warned", set())
    x, mu, L, beta = torch.randn(4, 8), torch.randn(5, 8), torch.rand(8) + 0.5, torch.randn(8)
    with pytest.warns(UserWarning) as record:
        fk.randers_logits(x, mu, L, beta, 0.1, 2.0)
    text = str(record[0].message)
    assert text.startswith("faim_kernels: no C++ compiler") and text.count("faim_kernels:") == 1, text


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the validation's reads, traced as constants
def test_jit_script_of_the_head_says_what_works_instead():
    head = fk.FAIMHead(8, 6)
    for module in (head, torch.nn.Sequential(torch.nn.Linear(4, 8), head)):
        with pytest.raises(RuntimeError, match="faim_kernels: FAIMHead is not scriptable.*torch.jit.trace"):
            torch.jit.script(module)
    traced = torch.jit.trace(head, torch.randn(3, 8))  # what the message offers works
    feats = torch.randn(5, 8)
    torch.testing.assert_close(traced(feats), head(feats))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_head_refuses_integer_features_as_nn_linear_does(dtype):
    head = fk.FAIMHead(4, 3)
    feats = torch.ones(2, 4, dtype=dtype)
    with pytest.raises(RuntimeError):
        torch.nn.Linear(4, 3)(feats)
    for call in (head, lambda f: head.loss(f, torch.tensor([0, 1])), head.distance):
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            call(feats)


# ---- torch.func over randers_topk: a refusal, never zeros ----

@pytest.mark.parametrize("transform", ["grad", "jacrev", "jacfwd"])
def test_torch_func_differentiating_topk_distances_refuses_instead_of_zeros(backend, device, transform):
    x, mu, L, beta, lam, _ = make_inputs(4, 6, 3, device=device)
    fn = getattr(torch.func, transform)
    with pytest.raises(RuntimeError, match="faim_kernels.randers_topk.*randers_distance_at"):
        fn(lambda x: fk.randers_topk(x, mu, L, beta, lam, 2, backend=backend)[0].sum())(x)
    # The documented way: the indices from randers_topk, the distances from randers_distance_at.
    def selected(x):
        idx = fk.randers_topk(x, mu, L, beta, lam, 2, backend=backend)[1]
        return fk.randers_distance_at(x, mu, L, beta, lam, idx).sum()
    idx = fk.randers_topk(x, mu, L, beta, lam, 2, backend=backend)[1]
    want = torch.autograd.grad(fk.randers_distance_at(x.requires_grad_(), mu, L, beta, lam, idx).sum(), x)[0]
    torch.testing.assert_close(torch.func.grad(selected)(x.detach()), want)
    # Plain autograd is unchanged: the distances come back without a graph.
    assert not fk.randers_topk(x, mu, L, beta, lam, 2, backend=backend)[0].requires_grad


# ---- pytorch-metric-learning: the paired path at eps = 0, the histogram miner with a learned metric ----

@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("beta_zero", [False, True], ids=["beta", "beta0"])
def test_paired_distance_at_eps_zero_has_finite_gradients_equal_to_the_kernels(full, beta_zero):
    # d_F(a_i, b_i) is the diagonal of the fused cdist, whose kernels take each norm's gradient as 0
    # where the norm is 0: the paired path must agree, coincident rows and beta = 0 included.
    pytest.importorskip("pytorch_metric_learning")
    from faim_kernels.integrations.pml import RandersDistance
    torch.manual_seed(0)
    metric = fk.RandersMetric(4, full_sigma=full, eps=0.0).double()
    with torch.no_grad():
        metric.beta.copy_(torch.zeros(4) if beta_zero else torch.randn(4))
    a = torch.randn(5, 4, dtype=torch.float64)
    b = a.clone()
    b[2:] = torch.randn(3, 4, dtype=torch.float64)  # rows 0, 1 coincide
    a.requires_grad_()
    params = [a] + list(metric.parameters())
    paired = torch.autograd.grad(RandersDistance(metric).pairwise_distance(a, b).sum(), params, allow_unused=True)
    fused = torch.autograd.grad(metric.cdist(a, b).diagonal().sum(), params, allow_unused=True)
    for p, got, want in zip(params, paired, fused):
        if want is None:
            assert got is None or not got.any()
            continue
        assert torch.isfinite(got).all(), (tuple(p.shape), got)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    # randers_distance_at (the top-k's differentiable companion) takes the same convention.
    x, mu = a.detach().requires_grad_(), b.detach()
    L, beta, lam = metric.metric_args()
    at = torch.autograd.grad(fk.randers_distance_at(x, mu, L, beta, lam, torch.arange(5)[:, None], eps=0.0).sum(),
                             x)[0]
    assert torch.isfinite(at).all()
    torch.testing.assert_close(at, fused[0], rtol=1e-10, atol=1e-12)


def test_uniform_histogram_miner_works_with_a_learned_randers_distance():
    pytest.importorskip("pytorch_metric_learning")
    from pytorch_metric_learning import losses, miners
    from faim_kernels.integrations.pml import RandersDistance
    torch.manual_seed(0)
    distance = RandersDistance(fk.RandersMetric(8))  # parameters that require grad
    emb, labels = torch.randn(32, 8, requires_grad=True), torch.randint(0, 4, (32,))
    miner = miners.UniformHistogramMiner(num_bins=10, pos_per_bin=5, neg_per_bin=5, distance=distance)
    pairs = miner(emb, labels)  # pml mines under no_grad: the matrix carries no graph there
    assert all(t.shape == (50,) for t in pairs)
    loss = losses.ContrastiveLoss(distance=distance)(emb, labels, pairs)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and all(p.grad is not None for p in distance.parameters())


# ---- float32 gradients at a large 1-form: the stated domain of the 1e-3 bound ----

@pytest.mark.parametrize("lam", [1.0, 1e2, 1e3])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_float32_gradients_within_1e_3_up_to_lambda_beta_1e3(backend, device, lam, full):
    # The Guarantees bound float32 gradients by 1e-3 for λ·|beta| up to 1e3 (with Sigma ≈ I; the
    # error grows about linearly beyond: ~1e-3 at 1e4–1e5 in measurements, as a = d − λ·r is read
    # back from the logits).
    for seed in range(3):
        x, mu, L, beta, _, gamma = make_inputs(16, 24, 8, full=full, dtype=torch.float64, device=device, seed=seed)
        beta = beta / beta.norm()
        inputs = [x, mu, L, beta, torch.tensor(lam, dtype=torch.float64, device=device), gamma]
        grad = torch.randn(16, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
        f32 = [t.float().requires_grad_() for t in inputs]
        got = torch.autograd.grad((fk.randers_logits(*f32, backend=backend) * grad.float()).sum(), f32)
        f64 = [t.clone().requires_grad_() for t in inputs]
        want = torch.autograd.grad((fk.reference.randers_logits(*f64) * grad).sum(), f64)
        for name, a, b in zip(("x", "mu", "L", "beta", "lam", "gamma"), got, want):
            assert_norm_close(a, b, 1e-3, f"d{name} at lam = {lam:g}")


def test_head_loss_with_a_learned_class_weight_matches_the_reference(backend):
    torch.manual_seed(0)
    head = fk.FAIMHead(6, 5, backend=backend).double()
    weight = torch.nn.Parameter(0.2 + torch.rand(5, dtype=torch.float64))
    feats = torch.randn(7, 6, dtype=torch.float64)
    for target in (torch.randint(0, 5, (7,)), torch.softmax(torch.randn(7, 5, dtype=torch.float64), 1)):
        params = [weight] + list(head.parameters())
        got = torch.autograd.grad(head.loss(feats, target, weight=weight, label_smoothing=0.1), params)
        head.backend = "reference"
        want = torch.autograd.grad(head.loss(feats, target, weight=weight, label_smoothing=0.1), params)
        head.backend = backend
        for p, a, b in zip(params, got, want):
            assert_norm_close(a, b, 1e-9, f"gradient of a {tuple(p.shape)} parameter")


@pytest.mark.parametrize("init", ["default", "reference"])
def test_reset_parameters_restores_the_full_heads_l_scale(init):
    """reset_parameters() sets the full head's L_scale buffer as the constructor does, so a head made
    on the meta device and materialised with to_empty() (whose memory is arbitrary) starts at Sigma = I."""
    head = fk.FAIMHead(6, 4, full_sigma=True, init=init)
    expected = head.L_scale.clone()
    head.L_scale.fill_(float("nan"))
    head.reset_parameters()
    assert torch.equal(head.L_scale, expected)
    torch.testing.assert_close(head.metric_L(), torch.eye(6))
