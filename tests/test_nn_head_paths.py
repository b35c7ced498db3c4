"""The head's fast paths give what the general path gives: the fast path straight to the C++ kernels (one
head_metric op, then the logits or cross-entropy op; for a training forward the two as one op,
head_logits), head.loss through the logits where they are
small, and the backward ops' grad_mask (gradients only where needed)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import faim_kernels as fk
from faim_kernels.nn import head as head_module
from faim_kernels.ops import contract
from tests.conftest import GRAD_TOL, NAMES, assert_norm_close, backends, make_inputs, max_rel_err


def randomised_head(D, C, full, dtype, seed=0):
    """A head with every parameter away from its start (λ raw negative: |lmbda| is exercised)."""
    torch.manual_seed(seed)
    head = fk.FAIMHead(D, C, full_sigma=full, dtype=dtype)
    with torch.no_grad():
        head.lmbda.fill_(-0.3)
        head.beta.normal_()
        head.mu.normal_()
        if full:
            head.L.add_(0.2 * torch.randn(D, D, dtype=dtype))
        else:
            head.log_sigma_diag.normal_()
    return head


def grads_of(head, x, loss_fn):
    wrt = [x] + [p for p in head.parameters() if p.requires_grad]
    return torch.autograd.grad(loss_fn(), wrt)


@pytest.mark.parametrize("full,factor", [(False, "diag"), (True, "cholesky"), (True, "wide")],
                         ids=["diagonal", "full-cholesky", "full-wide"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_direct_path_matches_general_path(monkeypatch, full, factor, dtype):
    monkeypatch.setattr(head_module, "WIDE_FACTOR_MAX_COST", float("inf") if factor == "wide" else 0.0)
    head = randomised_head(16, 7, full, dtype)
    x = torch.randn(5, 3, 16, dtype=dtype, requires_grad=True)
    with torch.no_grad():
        x[0, 0] = head.mu[2]  # a sample on its prototype: a near pair
    y = torch.randint(0, 7, (5, 3))
    y[0, 0], y[1, 1] = 2, -100
    assert head._fast_metric(x) is not None  # the fast path is taken here
    lc = head._fast_metric(x, wide_ok=True)[0]  # with the factor this test is about
    assert lc.shape == {"diag": (16,), "cholesky": (16, 16), "wide": (16, 32)}[factor]

    def total():
        return head(x).square().sum() * 1e-3 + head.loss(x, y) + head.loss(x, y, reduction="sum")
    fast_value, fast_grads = total(), grads_of(head, x, total)
    head.backend = "reference"  # the general path, through the einsum oracle
    assert head._fast_metric(x) is None
    ref_value, ref_grads = total(), grads_of(head, x, total)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert abs(fast_value.item() - ref_value.item()) <= tol * abs(ref_value.item())
    for name, g, r in zip(["x", "mu", "beta", "lmbda", "scale", "sigma"], fast_grads, ref_grads):
        assert_norm_close(g, r, 1e-9 if dtype == torch.float64 else 1e-4, name)


def head_logits_inputs(factor, dtype, D=6, B=4, C=5, seed=0):
    """(x, mu, sigma, beta, lmbda, scale) for head_logits, sample 0 on prototype 1 (a near pair),
    lmbda negative (|lmbda| is exercised); the metric parameter as FAIMHead passes it."""
    torch.manual_seed(seed)
    x = torch.randn(B, D, dtype=dtype)
    mu = torch.randn(C, D, dtype=dtype)
    x[0] = mu[1]
    sigma = (torch.eye(D, dtype=dtype) + 0.3 * torch.randn(D, D, dtype=dtype)) if factor != "diag" \
        else torch.randn(D, dtype=dtype)
    return x, mu, sigma, torch.randn(D, dtype=dtype), torch.tensor(-0.3, dtype=dtype), torch.tensor(2.0, dtype=dtype)


@pytest.mark.parametrize("factor", ["diag", "cholesky", "wide"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_logits_is_head_metric_then_logits(factor, dtype):
    """head_logits (one op, one autograd node: FAIMHead's training forward) gives the values and the
    gradients of all six inputs of head_metric(through_gram) followed by randers_logits, bit for bit,
    with every subset of inputs requiring grad that a head meets (all; features without grad; a
    frozen metric)."""
    fk._cpp_loader.load()
    full, wide = factor != "diag", factor == "wide"
    eps, tau = 1e-3, 0.05
    for wanted in ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [0, 1, 3]):
        inputs = head_logits_inputs(factor, dtype)
        for k in wanted:
            inputs[k].requires_grad_()
        x, mu, sigma, beta, lmbda, scale = inputs
        one = contract.head_logits_op(x, mu, sigma, beta, lmbda, scale, full, eps, tau, wide)
        lc, lam, gamma, _ = contract.head_metric_op(sigma, lmbda, scale, full, eps, wide, True)
        two = contract.logits_op(x, mu, lc, beta, lam, gamma, eps, tau)[0]
        assert torch.equal(one, two)
        upstream = torch.randn_like(one)
        wrt = [inputs[k] for k in wanted]
        for g1, g2, k in zip(torch.autograd.grad(one, wrt, upstream), torch.autograd.grad(two, wrt, upstream), wanted):
            assert g1.dtype == inputs[k].dtype and torch.equal(g1, g2), NAMES[k] if k < len(NAMES) else k


@pytest.mark.parametrize("factor", ["diag", "cholesky", "wide"])
def test_head_logits_gradcheck_and_opcheck(factor):
    fk._cpp_loader.load()
    full, wide = factor != "diag", factor == "wide"
    inputs = [t.requires_grad_() for t in head_logits_inputs(factor, torch.float64)]
    assert torch.autograd.gradcheck(
        lambda *t: contract.head_logits_op(*t, full, 1e-3, 0.05, wide), inputs)
    torch.library.opcheck(contract.head_logits_op, (*[t.detach() for t in inputs], full, 1e-3, 0.05, wide))


def test_training_forward_is_one_op():
    """A training call of a head on the fast path calls one op of ours, head_logits (which calls
    head_metric and randers_logits inside), for either Σ."""
    for full in (False, True):
        head = randomised_head(8, 5, full, torch.float32)
        x = torch.randn(4, 8, requires_grad=True)
        with torch.profiler.profile() as prof:
            head(x)
        top = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("faim_kernels::")]
        assert top == ["faim_kernels::head_logits"], top


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_head_metric_op_gradcheck(full):
    """The op's closed-form backward (the Cholesky backward for a full L) against autograd."""
    fk._cpp_loader.load()
    torch.manual_seed(0)
    D = 5
    sigma = (torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, dtype=torch.float64)) if full \
        else torch.randn(D, dtype=torch.float64)
    lmbda, scale = torch.tensor(-0.4, dtype=torch.float64), torch.tensor(2.5, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (sigma, lmbda, scale)]
    assert torch.autograd.gradcheck(lambda s, l, g: contract.head_metric_op(s, l, g, full, 1e-3)[:3], inputs)
    lc, lam, gamma, _ = contract.head_metric_op(*inputs, full, 1e-3)
    if full:
        A = torch.tril(sigma.detach())
        assert torch.allclose(lc @ lc.T, A @ A.T + 1e-3 * torch.eye(D, dtype=torch.float64), atol=1e-12)
    else:
        assert torch.allclose(lc, torch.sqrt(torch.exp(sigma.detach()) + 1e-3), rtol=1e-14)
    assert lam.item() == 0.4 and gamma.item() == 2.5
    torch.library.opcheck(contract.head_metric_op, (sigma.detach(), lmbda.detach(), scale.detach(), full, 1e-3))


@pytest.mark.parametrize("D", [64, 129], ids=["loops", "lapack"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_metric_full_factor_matches_torch_cholesky(D, dtype):
    """Both implementations of the full factor (plain float64 loops up to D = 128, LAPACK above:
    csrc/head_metric.cpp LOOP_CHOLESKY_MAX_D), forward and backward, against torch.linalg.cholesky
    and its autograd in float64, with an upper triangle in L that must be ignored."""
    fk._cpp_loader.load()
    torch.manual_seed(D)
    L = (torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, dtype=torch.float64) / D ** 0.5).to(dtype)
    L.requires_grad_()
    lmbda, scale = torch.tensor(0.2, dtype=dtype), torch.tensor(3.0, dtype=dtype)
    upstream = torch.randn(D, D, dtype=torch.float64)
    lc, _, _, factor64 = contract.head_metric_op(L, lmbda, scale, True, 1e-3)
    (grad,) = torch.autograd.grad((lc.double() * upstream).sum(), L)
    L64 = L.detach().double().requires_grad_()
    A = torch.tril(L64)
    ref = torch.linalg.cholesky(A @ A.T + 1e-3 * torch.eye(D, dtype=torch.float64))
    (ref_grad,) = torch.autograd.grad((ref * upstream).sum(), L64)
    assert lc.dtype == dtype and factor64.dtype == torch.float64
    assert (factor64 - ref).abs().max().item() <= 1e-13
    assert (lc.double() - ref).abs().max().item() <= (1e-13 if dtype == torch.float64 else 1e-6)
    assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() <= (1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.equal(torch.triu(grad, 1), torch.zeros_like(grad))


@pytest.mark.parametrize("D", [6, 64, 130], ids=["loops", "lapack", "lapack-factor"])
def test_head_metric_through_gram_backward(D):
    """head_metric(..., through_gram=True): for a consumer of lc that depends on it only through
    lc·lcᵀ (as FAIMHead's ops do), the cheaper backward (one triangular solve) gives the Cholesky
    backward's gradient; gradcheck through such a consumer (D = 6); the forward is unchanged. D = 6
    runs the backward's loops, 64 its ATen form with the loop-made factor, 130 both through ATen
    (csrc/head_metric.cpp LOOP_GRAM_BACKWARD_MAX_D, LOOP_CHOLESKY_MAX_D)."""
    fk._cpp_loader.load()
    torch.manual_seed(0)
    L = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, dtype=torch.float64) / D ** 0.5
    W = torch.randn(D, D, dtype=torch.float64)
    one = torch.tensor(1.0, dtype=torch.float64)

    def gram_consumer(L, through_gram):
        lc = contract.head_metric_op(L, one, one, True, 1e-3, False, through_gram)[0]
        return ((lc @ lc.T) * W).sum() + (lc @ lc.T).diagonal().square().sum()
    grads = []
    for through_gram in (False, True):
        Lg = L.clone().requires_grad_()
        grads.append(torch.autograd.grad(gram_consumer(Lg, through_gram), Lg)[0])
    assert_norm_close(grads[1], grads[0], 1e-12, "∂L")
    assert torch.equal(contract.head_metric_op(L, one, one, True, 1e-3, False, True)[0],
                       contract.head_metric_op(L, one, one, True, 1e-3)[0])
    if D <= 8:
        assert torch.autograd.gradcheck(lambda L: gram_consumer(L, True), [L.clone().requires_grad_()])


@pytest.mark.parametrize("D", [8, 129], ids=["loops", "lapack"])
def test_head_metric_full_factor_refusals(D):
    fk._cpp_loader.load()
    one = torch.tensor(1.0)
    upper_nan = torch.eye(D)
    upper_nan[0, D - 1] = float("nan")  # outside tril(L), but still a broken parameter
    with pytest.raises(ValueError, match="non-finite"):
        contract.head_metric_op(upper_nan, one, one, True, 1e-6)
    singular = torch.eye(D)
    singular[D // 2, D // 2] = 0.0
    with pytest.raises(ValueError, match="not positive definite"):
        contract.head_metric_op(singular, one, one, True, 0.0)


def test_head_metric_derivative_of_abs_is_one_at_zero():
    fk._cpp_loader.load()
    lmbda = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    _, lam, gamma, _ = contract.head_metric_op(torch.zeros(3, dtype=torch.float64), lmbda, scale, False, 1e-6)
    dl, ds = torch.autograd.grad(lam + gamma, [lmbda, scale])
    assert dl.item() == 1.0 and ds.item() == -1.0


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_direct_path_refuses_non_finite_lambda_and_scale(bad):
    head = fk.FAIMHead(8, 3)
    x = torch.randn(4, 8)
    with torch.no_grad():
        head.lmbda.fill_(float(bad))
    with pytest.raises(ValueError, match="lam must be >= 0 and finite"):
        head(x)
    with torch.no_grad():
        head.lmbda.fill_(0.1)
        head.scale.fill_(float(bad))
    with pytest.raises(ValueError, match="gamma must be finite"):
        head(x)


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.1), dict(reduction="none"), dict(ignore_index=1),
                                     dict(weight="w")], ids=["plain", "smoothing", "none", "ignore", "weight"])
def test_loss_through_logits_matches_fused(monkeypatch, full, options):
    """head.loss takes F.cross_entropy over the logits where they are small and the fused
    cross-entropy where they are large: both give the same loss and gradients."""
    head = randomised_head(12, 6, full, torch.float64)
    x = torch.randn(4, 2, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (4, 2))
    y[0, 0] = 1
    if options.get("weight") == "w":
        options = dict(weight=torch.rand(6, dtype=torch.float64) + 0.5)

    def loss():
        out = head.loss(x, y, **options)
        return out.sum() if out.dim() else out
    assert head._loss_through_logits(x, y, options)
    via_logits, g_logits = loss(), grads_of(head, x, loss)
    monkeypatch.setattr(head_module, "LOSS_VIA_LOGITS_BYTES", 0)
    assert not head._loss_through_logits(x, y, options)
    fused, g_fused = loss(), grads_of(head, x, loss)
    assert abs(via_logits.item() - fused.item()) <= 1e-12 * abs(fused.item())
    for g, r in zip(g_logits, g_fused):
        assert_norm_close(g, r, 1e-10)


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_loss_plain_call_is_cross_entropy_of_forward(monkeypatch, full):
    """The common call, [B, D] features and [B] int64 indices without options, takes head.loss's
    first branch: bit for bit F.cross_entropy(head(x), y), value and gradients, and the same as the
    fused cross-entropy to float64 rounding; a target of the wrong length still gets the shape error."""
    head = randomised_head(12, 6, full, torch.float64)
    x = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 6, (8,))
    loss, g_loss = head.loss(x, y), grads_of(head, x, lambda: head.loss(x, y))
    direct, g_direct = F.cross_entropy(head(x), y), grads_of(head, x, lambda: F.cross_entropy(head(x), y))
    assert torch.equal(loss, direct)
    for g, r in zip(g_loss, g_direct):
        assert torch.equal(g, r)
    monkeypatch.setattr(head_module, "LOSS_VIA_LOGITS_BYTES", 0)
    fused, g_fused = head.loss(x, y), grads_of(head, x, lambda: head.loss(x, y))
    assert abs(loss.item() - fused.item()) <= 1e-12 * abs(fused.item())
    for g, r in zip(g_loss, g_fused):
        assert_norm_close(g, r, 1e-10)
    with pytest.raises(ValueError, match="target must have shape"):
        head.loss(x, y[:5])


def test_loss_through_logits_keeps_shape_checks_and_probability_targets():
    head = randomised_head(8, 5, False, torch.float32)
    x = torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match="target must have shape"):
        head.loss(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="probability target must have shape"):
        head.loss(x, torch.rand(6, 5))
    probs = torch.softmax(torch.randn(3, 2, 5, dtype=torch.float64), -1)  # float64 target, float32 head
    expected = F.cross_entropy(head(x).reshape(6, 5), probs.reshape(6, 5).float())
    assert torch.allclose(head.loss(x, probs), expected)
    assert torch.allclose(head.loss(x, torch.zeros(3, 2, dtype=torch.int32)),
                          F.cross_entropy(head(x).reshape(6, 5), torch.zeros(6, dtype=torch.long)))


@pytest.mark.parametrize("backend", backends("cpp", "triton"), indirect=True)
@pytest.mark.parametrize("op_family", ["logits", "cross_entropy"])
@pytest.mark.parametrize("frozen", [("x",), ("mu",), ("L", "beta", "lam", "gamma"), ("x", "L", "beta")],
                         ids=["features", "prototypes", "metric", "probe"])
def test_gradients_only_where_needed(backend, device, op_family, frozen):
    """Inputs without grad get None and the work of their gradient is skipped (grad_mask); the
    others are unchanged: the same values as with every input requiring grad."""
    full = "L" in frozen
    inputs = make_inputs(6, 5, 8, full=full, dtype=torch.float64, device=device)
    target = torch.randint(0, 5, (6,), device=device)

    def run(requires):
        ins = [t.detach().clone().requires_grad_(n in requires) for n, t in zip(NAMES, inputs)]
        if op_family == "logits":
            out = fk.randers_logits(*ins, backend=backend)
            out = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=device).reshape(out.shape)).sum()
        else:
            out = fk.randers_cross_entropy(*ins, target, backend=backend)
        wanted = [t for t in ins if t.requires_grad]
        return dict(zip([n for n in NAMES if n in requires], torch.autograd.grad(out, wanted)))
    everything = run(set(NAMES))
    some = run(set(NAMES) - set(frozen))
    for name, g in some.items():
        assert_norm_close(g, everything[name], GRAD_TOL[torch.float64], name)


@pytest.mark.parametrize("op_family", ["logits", "cross_entropy"])
def test_backward_ops_return_empty_for_unneeded(op_family):
    """The op contract itself: bits outside grad_mask come back as empty tensors (C++ kernels)."""
    fk._cpp_loader.load()
    x, mu, L, beta, lam, gamma = make_inputs(4, 3, 5, dtype=torch.float64)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float64)
    tau = fk.transform.near_threshold(5, torch.float64)
    if op_family == "logits":
        logits, xp, mup, sx, smu = contract.logits_op(x, mu, lc, beta, lam, gamma, 1e-6, tau)
        grads = contract.logits_backward_op(torch.ones_like(logits), logits, x, mu, lc, beta, lam, gamma, xp, mup,
                                            sx, smu, 1e-6, tau, grad_mask=0b100010)
    else:
        target = torch.tensor([0, 1, 2, -1])
        lse, target_logit, sl, pl = contract.cross_entropy_op(x, mu, lc, beta, lam, gamma, target, 1e-6, tau, 0.0)
        grads = contract.cross_entropy_backward_op(torch.ones_like(lse), -torch.ones_like(target_logit), torch.zeros_like(sl),
                                                   lse, x, mu, lc, beta, lam, gamma, target, 1e-6, tau, 0.0,
                                                   grad_mask=0b100010)
    assert [tuple(g.shape) for g in grads] == [(0,), tuple(mu.shape), (0,), (0,), (0,), ()]


@pytest.mark.parametrize("full", [False, True], ids=["diagonal", "full"])
def test_metric_cache_follows_every_change_of_the_parameters(full):
    """No_grad calls reuse head_metric's result (a full head's Cholesky factor) while the metric
    parameter, lmbda, scale and eps keep their values (FAIMHead._cached_metric); every way of
    changing them is seen, `.data` included."""
    torch.manual_seed(0)
    head = fk.FAIMHead(6, 4, full_sigma=full)
    sigma = head.L if full else head.log_sigma_diag
    x = torch.randn(5, 6, dtype=torch.float32)

    def fresh():  # the same call with no cache
        head.__dict__.pop("_metric_cache", None)
        with torch.no_grad():
            return head(x)

    def cached():
        with torch.no_grad():
            return head(x)

    assert torch.equal(cached(), fresh()) and torch.equal(cached(), fresh())
    first = head.__dict__["_metric_cache"][-1][0]
    cached()
    assert head.__dict__["_metric_cache"][-1][0] is first  # reused, not recomputed
    changes = [
        lambda: sigma.data.add_(0.25),  # bumps no version counter
        lambda: torch.optim.SGD(head.parameters(), lr=0.1).step() if sigma.grad is not None else None,
        lambda: head.lmbda.data.fill_(0.7),
        lambda: head.scale.data.fill_(-3.0),
        lambda: setattr(head, "eps", 1e-3),
        lambda: head.load_state_dict({k: v + 0.01 for k, v in head.state_dict().items()}),
    ]
    F.cross_entropy(head(x), torch.tensor([0, 1, 2, 3, 0])).backward()  # grads for the SGD step
    for change in changes:
        before = cached()
        with torch.no_grad():
            change()
        after = cached()
        assert torch.equal(after, fresh())
        assert not torch.equal(before, after)
    # a frozen metric with features that need grad also reuses it, and the gradient is right
    head.freeze_metric()
    xg = x.clone().requires_grad_()
    head(xg).sum().backward()
    head.__dict__.pop("_metric_cache")
    xr = x.clone().requires_grad_()
    head(xr).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, rtol=0, atol=0)


def test_prepared_prototypes_ops_match_randers_logits():
    """randers_prototypes gives randers_logits' own m-centred mu', mu·beta, and randers_logits_prepared
    its logits bit for bit (near pairs included); both pass opcheck's schema and fake-kernel checks."""
    torch.manual_seed(1)
    for full in (False, True):
        for dtype in (torch.float32, torch.float64):
            x, mu, L, beta, lam, gamma = make_inputs(9, 13, 6, full=full, dtype=dtype)
            x[:3] = mu[:3] + 1e-5 * torch.randn(3, 6, dtype=dtype)  # near pairs: the raw-difference recompute
            lc = fk.transform.metric_factor(L, 1e-6, dtype)
            tau = fk.transform.near_threshold(6, dtype)
            logits, _, mup, _, smu = contract.logits_op(x, mu, lc, beta, lam, gamma, 1e-6, tau)
            m, mup2, smu2 = contract.prototypes_op(mu, lc, beta)
            assert torch.equal(mup2, mup) and torch.equal(smu2, smu)
            torch.testing.assert_close(m, fk.transform.center_of(mu), rtol=1e-6, atol=1e-6)
            poisoned = logits.clone().fill_(float("nan"))
            out = contract.logits_prepared_op(x, mu, lc, beta, lam, gamma, m, mup2, smu2, 1e-6, tau)
            assert torch.equal(out, logits) and not torch.equal(out, poisoned)
            for op, args in ((contract.prototypes_op, (mu, lc, beta)),
                             (contract.logits_prepared_op, (x, mu, lc, beta, lam, gamma, m, mup2, smu2, 1e-6, tau))):
                torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="mup must be"):
        contract.logits_prepared_op(x, mu, lc, beta, lam, gamma, m, mup2[1:], smu2, 1e-6, tau)


def test_prototype_cache_follows_every_change_and_stays_exact(monkeypatch):
    """No_grad calls of a full head keep the prototypes' half of the preparation while the metric
    factor, mu and beta keep their values (FAIMHead._cached_prototypes): the logits are those of the
    uncached op bit for bit, near pairs included, and every way of changing mu or beta is seen."""
    # The uncached reference records a graph; it takes the same (Cholesky) factor as the cache only
    # with the wide factor switched off (a training call of this small head would take it).
    monkeypatch.setattr(head_module, "WIDE_FACTOR_MAX_COST", 0.0)
    torch.manual_seed(2)
    head = fk.FAIMHead(8, 12, full_sigma=True)
    with torch.no_grad():
        head.L.add_(0.2 * torch.randn(8, 8))
        head.beta.normal_(0, 0.1)
    x = torch.randn(6, 8)
    x[:2] = head.mu[:2].detach() + 1e-5 * torch.randn(2, 8)

    def uncached():  # the same values through randers_logits itself (graph recorded: no cache)
        return head(x).detach()

    def cached():
        with torch.no_grad():
            return head(x)

    assert torch.equal(cached(), uncached())
    first = head.__dict__["_prototype_cache"][-1]
    assert torch.equal(cached(), uncached())
    assert head.__dict__["_prototype_cache"][-1] is first  # reused, not recomputed
    F.cross_entropy(head(x), torch.arange(6)).backward()  # grads for the SGD step
    changes = [
        lambda: head.mu.data[3].add_(0.5),  # bumps no version counter
        lambda: head.beta.data.mul_(2.0),
        lambda: head.L.data.mul_(1.1),      # a new metric factor
        lambda: torch.optim.SGD(head.parameters(), lr=0.1).step(),
        lambda: head.load_state_dict({k: v + 0.01 for k, v in head.state_dict().items()}),
    ]
    for change in changes:
        before = cached()
        with torch.no_grad():
            change()
        after = cached()
        assert torch.equal(after, uncached())
        assert not torch.equal(before, after)
    with torch.inference_mode():
        assert torch.equal(head(x), uncached())
    # a diagonal head keeps no cache; a head above the size bound neither, and stays exact
    diag = fk.FAIMHead(8, 12)
    with torch.no_grad():
        diag(x)
    assert "_prototype_cache" not in diag.__dict__
    monkeypatch.setattr(head_module, "PROTOTYPE_CACHE_BYTES", 0)
    head.__dict__.pop("_prototype_cache")
    assert torch.equal(cached(), uncached()) and "_prototype_cache" not in head.__dict__


# ----------------------------------------------------------------------------------------------
# The wide metric factor [tril(L) | sqrt(eps)·I] of a small full head (docs/design.md §2.4)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("K", [3, 9, 12], ids=["narrow", "wide", "tril-and-ridge"])
def test_logits_op_takes_a_factor_of_any_width(K):
    """The C++ logits op with lc [D, K]: values and gradients (x, mu, beta, λ, γ) are those of a
    square factor with the same Sigma = lc·lcᵀ (near pairs and an exact hit included), ∂lc passes
    gradcheck, and the op passes opcheck's schema and fake-kernel checks. K = 2D with lc =
    [tril(A) | rho·I] is FAIMHead's wide factor, which the kernels recognise and use by blocks."""
    fk._cpp_loader.load()
    D, eps = 6, 1e-3
    x, mu, _, beta, lam, gamma = make_inputs(5, 4, D, dtype=torch.float64)
    x[0] = mu[1]
    x[1] = mu[2] + 1e-6 * torch.randn(D, dtype=torch.float64)
    lc = torch.randn(D, K, dtype=torch.float64)
    if K == 2 * D:
        lc = torch.cat([lc[:, :D].tril() + 2 * torch.eye(D, dtype=torch.float64),
                        eps ** 0.5 * torch.eye(D, dtype=torch.float64)], 1)
    if K < D:  # Sigma = lc·lcᵀ + a ridge on the last D − K coordinates: positive definite
        lc = torch.cat([lc, torch.eye(D, dtype=torch.float64)[:, K:]], 1)
    square = torch.linalg.cholesky(lc @ lc.T)
    tau = fk.transform.near_threshold(lc.shape[1], torch.float64)
    inputs = [t.clone().requires_grad_() for t in (x, mu, lc, beta, lam, gamma)]
    out = contract.logits_op(*inputs, eps, tau)[0]
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs[k] for k in (0, 1, 3, 4, 5)], g)
    sq_inputs = [t.clone().requires_grad_() for t in (x, mu, square, beta, lam, gamma)]
    sq_out = contract.logits_op(*sq_inputs, eps, fk.transform.near_threshold(D, torch.float64))[0]
    sq_grads = torch.autograd.grad(sq_out, [sq_inputs[k] for k in (0, 1, 3, 4, 5)], g)
    assert_norm_close(out, sq_out, 1e-12, "logits")
    for name, a, b in zip(["x", "mu", "beta", "lam", "gamma"], grads, sq_grads):
        assert_norm_close(a, b, 1e-11, name)
    assert torch.autograd.gradcheck(lambda *a: contract.logits_op(*a, eps, tau)[0], inputs)
    torch.library.opcheck(contract.logits_op, (x, mu, lc, beta, lam, gamma, eps, tau))
    m, mup, smu = contract.prototypes_op(mu, lc, beta)
    assert mup.shape == (4, lc.shape[1])
    prepared = contract.logits_prepared_op(x, mu, lc, beta, lam, gamma, m, mup, smu, eps, tau)
    assert torch.equal(prepared, out.detach())


def test_head_metric_wide_factor():
    """head_metric(..., wide=True): lc = [tril(L) | sqrt(eps)·I] with lc·lcᵀ the Cholesky factor's
    Sigma, the gradient tril(∂lc[:, :D]) (gradcheck), opcheck, and the refusals of the square path."""
    fk._cpp_loader.load()
    D, eps = 5, 1e-3
    L = torch.randn(D, D, dtype=torch.float64)
    lmbda, scale = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(4.0, dtype=torch.float64)
    wide = contract.head_metric_op(L, lmbda, scale, True, eps, True)
    square = contract.head_metric_op(L, lmbda, scale, True, eps)
    assert wide[0].shape == (D, 2 * D) and wide[3].numel() == 0
    assert torch.equal(wide[0][:, :D], L.tril())
    assert_norm_close(wide[0] @ wide[0].T, square[0] @ square[0].T, 1e-14, "Sigma")
    assert wide[1].item() == 0.3 and wide[2].item() == 4.0
    inputs = [t.clone().requires_grad_() for t in (L, lmbda, scale)]
    assert torch.autograd.gradcheck(lambda s, l, g: contract.head_metric_op(s, l, g, True, eps, True)[:3], inputs)
    torch.library.opcheck(contract.head_metric_op, (L, lmbda, scale, True, eps, True))
    f32 = contract.head_metric_op(L.float(), lmbda.float(), scale.float(), True, eps, True)[0]
    assert f32.dtype == torch.float32 and f32[0, D].item() == torch.tensor(eps ** 0.5, dtype=torch.float32).item()
    for bad in (float("nan"), float("inf")):
        for where in ((3, 1), (1, 3)):  # below and above the diagonal, as the square path
            L_bad = L.clone()
            L_bad[where] = bad
            with pytest.raises(ValueError, match="non-finite"):
                contract.head_metric_op(L_bad, lmbda, scale, True, eps, True)
    with pytest.raises(RuntimeError, match="eps > 0"):
        contract.head_metric_op(L, lmbda, scale, True, 0.0, True)
    with pytest.raises(RuntimeError, match="full L"):
        contract.head_metric_op(L[0], lmbda, scale, False, eps, True)
    # the cross-entropy op takes a square factor only
    x, mu, _, beta, lam, gamma = make_inputs(3, 4, D, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"lc must be \[D\] or \[D, D\]"):
        contract.cross_entropy_op(x, mu, wide[0], beta, lam, gamma, torch.zeros(3, dtype=torch.long), eps,
                                  0.1, 0.0)


def test_wide_factor_is_taken_where_it_pays(monkeypatch):
    """A full head's training calls take the wide factor where B and C are small against D, the
    Cholesky factor elsewhere, under no_grad, for head.loss's fused kernels and with eps = 0; the two
    factors give the same logits and gradients to float32 accuracy, near pairs included."""
    def factor_width(head, B, grad=True):
        x = torch.randn(B, head.in_features)
        with torch.set_grad_enabled(grad):
            fast = head._fast_metric(x, wide_ok=True)
        return fast[0].shape[1]
    small, large = fk.FAIMHead(64, 10, full_sigma=True), fk.FAIMHead(128, 1000, full_sigma=True)
    assert factor_width(small, 64) == 128 and factor_width(large, 256) == 128
    assert factor_width(large, 64) == 128  # (64 + 1000)/128 + 64·1000/128² = 12.2 > 6: Cholesky
    assert factor_width(large, 8) == 128  # (8 + 1000)/128 + 8·1000/128² = 8.4 > 6: Cholesky
    assert factor_width(fk.FAIMHead(256, 1000, full_sigma=True), 8) == 512  # 1008/256 + 8000/256² = 4.1: wide
    assert factor_width(small, 64, grad=False) == 64
    assert small._fast_metric(torch.randn(64, 64))[0].shape == (64, 64)  # not offered: the fused loss
    assert factor_width(fk.FAIMHead(64, 10, full_sigma=True, eps=0.0), 64) == 64

    inputs = make_inputs(48, 10, 64, full=True, near=True, seed=3)
    x, mu = inputs[0].clone().requires_grad_(), inputs[1]
    head = fk.FAIMHead(64, 10, full_sigma=True)
    with torch.no_grad():
        head.mu.copy_(mu)
        head.L.copy_(inputs[2] * head.L_scale)
        head.beta.copy_(inputs[3])
    y = torch.randint(0, 10, (48,))
    results = {}
    for name, bound in (("wide", float("inf")), ("cholesky", 0.0)):
        monkeypatch.setattr(head_module, "WIDE_FACTOR_MAX_COST", bound)
        assert head._fast_metric(x, wide_ok=True)[0].shape[1] == (128 if name == "wide" else 64)
        logits = head(x)
        results[name] = (logits.detach(), torch.autograd.grad(F.cross_entropy(logits, y), [x, head.mu, head.L]))
    ref = fk.reference.randers_logits(*[t.detach().double() for t in (x, mu, inputs[2].tril(), inputs[3])],
                                      head.lmbda.detach().double().abs(), head.scale.detach().double().abs(),
                                      eps=head.eps)
    for name, (logits, grads) in results.items():
        err = max_rel_err(logits, ref)
        assert err <= 1e-6, f"{name}: logits {err:.2e} from the float64 reference"
    for what, a, b in zip(["x", "mu", "L"], results["wide"][1], results["cholesky"][1]):
        assert_norm_close(a, b, 1e-4, what)
    # non-finite features: the same limits with either factor (−inf logits for an infinite coordinate, NaN rows)
    xb = torch.randn(4, 64)
    xb[1, 2], xb[2, 3], xb[3, 0] = float("inf"), float("nan"), -float("inf")
    outs = []
    for bound in (float("inf"), 0.0):
        monkeypatch.setattr(head_module, "WIDE_FACTOR_MAX_COST", bound)
        outs.append(head(xb.clone().requires_grad_()).detach())
    assert torch.isfinite(outs[0][0]).all() and (outs[0][[1, 3]] == -float("inf")).all() and outs[0][2].isnan().all()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=0, equal_nan=True)
