"""FAIMHead against the reference design's einsum head (its parameter names, its checkpoints), the
λ/γ parametrisation, schedules, swapping into models, and the closed-form initialisation."""
from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import faim_kernels as fk
from faim_kernels.nn.head import ledoit_wolf_shrinkage
from tests.conftest import HAS_CUDA, INTERPRET, assert_norm_close, assert_rel_close


class SeedFAIMHead(nn.Module):
    """The reference design's FAIMHead (faim-head-design.md §2), the oracle: einsum over [B, C, D]."""

    def __init__(self, in_features, num_classes, lambda_init=0.1, scale_init=10.0, full_sigma=False):
        super().__init__()
        self.num_classes, self.in_features = num_classes, in_features
        self.mu = nn.Parameter(torch.randn(num_classes, in_features))
        self.beta = nn.Parameter(torch.randn(in_features))
        self.lmbda = nn.Parameter(torch.tensor(lambda_init))
        self.scale = nn.Parameter(torch.tensor(scale_init))
        if full_sigma:
            self.L = nn.Parameter(torch.eye(in_features))
            self.full_sigma = True
        else:
            self.log_sigma_diag = nn.Parameter(torch.zeros(in_features))
            self.full_sigma = False
        self.eps = 1e-6

    def _sigma(self):
        if self.full_sigma:
            L = torch.tril(self.L)
            sigma = L @ L.T
        else:
            sigma = torch.diag(self.log_sigma_diag.exp())
        return sigma + self.eps * torch.eye(self.in_features, device=sigma.device, dtype=sigma.dtype)

    def forward(self, x):
        sigma = self._sigma()
        diff = x.unsqueeze(1) - self.mu
        quad = torch.einsum("bcd,df,bcf->bc", diff, sigma, diff)
        beta_dot = torch.einsum("d,bcd->bc", self.beta, diff)
        d_f = torch.sqrt(quad + self.eps) + self.lmbda * torch.sqrt(beta_dot * beta_dot + self.eps)
        return -self.scale * d_f


def _backends():
    out = ["cpp", "reference"]
    if HAS_CUDA or INTERPRET:
        out.append("triton")
    return out


def _skip_unimplemented(fn):
    try:
        return fn()
    except NotImplementedError as e:
        pytest.skip(f"backend not implemented here: {e}")


def make_seed(D, C, full, dtype=torch.float64, seed=0):
    """A seed head with every parameter away from its initial value (tril's upper part non-zero too)."""
    torch.manual_seed(seed)
    head = SeedFAIMHead(D, C, lambda_init=0.3, scale_init=2.5, full_sigma=full).to(dtype)
    with torch.no_grad():
        head.beta.mul_(0.5 / D ** 0.5)
        if full:
            head.L.add_(0.3 * torch.randn(D, D, dtype=dtype) / D ** 0.5)
        else:
            head.log_sigma_diag.uniform_(-1.0, 1.0)
    return head


def _seed_params(head):
    names = ["mu", "beta", "lmbda", "scale", "L" if head.full_sigma else "log_sigma_diag"]
    return names, [getattr(head, n) for n in names]


def _metric_grad(head, name):
    """The gradient of `name` in the seed's parametrisation: a full FAIMHead stores L times L_scale
    (its metric is tril(L) / L_scale), so the seed's ∂/∂L is the head's times L_scale."""
    grad = getattr(head, name).grad
    return grad * head.L_scale if name == "L" else grad


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_head_matches_seed_logits_and_gradients(backend, full, dtype):
    B, C, D = 13, 7, 9
    seed = make_seed(D, C, full)
    head = fk.FAIMHead(D, C, full_sigma=full, backend=backend, dtype=dtype)
    head.load_state_dict({k: v.to(dtype) for k, v in seed.state_dict().items()})  # strict: the same names
    x = torch.randn(B, D, dtype=torch.float64)
    x[0] = seed.mu[3].detach()  # a sample on a prototype: the near-pair path
    xs, xh = x.clone().requires_grad_(), x.to(dtype).requires_grad_()

    ref = seed(xs)
    out = _skip_unimplemented(lambda: head(xh))
    assert out.dtype == dtype and out.shape == (B, C)
    tol_f, tol_g = (1e-10, 1e-9) if dtype == torch.float64 else (1e-4, 1e-3)
    assert_rel_close(out, ref, tol_f, "logits")

    w = torch.randn(B, C, dtype=torch.float64)
    (ref * w).sum().backward()
    (out * w.to(dtype)).sum().backward()
    assert_norm_close(xh.grad, xs.grad, tol_g, "d/dx")
    names, seed_params = _seed_params(seed)
    for name, p in zip(names, seed_params):
        assert_norm_close(_metric_grad(head, name), p.grad, tol_g, f"d/d{name}")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("options", [{}, {"margin": 0.4}, {"label_smoothing": 0.1, "reduction": "sum"},
                                     {"ignore_index": 2, "reduction": "none"}])
def test_head_loss_matches_seed_cross_entropy(full, options):
    B, C, D = 11, 6, 8
    seed = make_seed(D, C, full, seed=1)
    head = fk.FAIMHead(D, C, full_sigma=full, dtype=torch.float64)
    head.load_state_dict(seed.state_dict())
    x = torch.randn(B, D, dtype=torch.float64)
    target = torch.randint(0, C, (B,))
    target[:2] = 2
    xs, xh = x.clone().requires_grad_(), x.clone().requires_grad_()

    logits = seed(xs)
    margin = options.get("margin", 0.0)
    if margin:  # CosFace-style in distance space: the target logit is −γ·(d_t + margin)
        logits = logits - seed.scale * margin * F.one_hot(target, C).to(logits.dtype)
    ce = {k: v for k, v in options.items() if k != "margin"}
    ref = F.cross_entropy(logits, target, **ce)
    out = head.loss(xh, target, **options)
    assert out.shape == ref.shape
    assert_rel_close(out, ref, 1e-10, "loss")

    w = torch.rand_like(ref) + 0.5
    (ref * w).sum().backward()
    (out * w).sum().backward()
    assert_norm_close(xh.grad, xs.grad, 1e-9, "d/dx")
    names, seed_params = _seed_params(seed)
    for name, p in zip(names, seed_params):
        assert_norm_close(_metric_grad(head, name), p.grad, 1e-9, f"d/d{name}")


def test_head_loss_equals_cross_entropy_of_forward_and_leading_dims():
    head = fk.FAIMHead(5, 4, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 3))
    logits = head(x)
    assert logits.shape == (2, 3, 4)
    assert_rel_close(logits.reshape(6, 4), head(x.reshape(6, 5)), 1e-12, "leading dims")
    assert_rel_close(head.loss(x, target), F.cross_entropy(logits.reshape(6, 4), target.reshape(6)), 1e-10, "loss")
    assert head.loss(x, target, reduction="none").shape == (2, 3)
    assert torch.equal(head.predict(x), logits.argmax(-1))
    with pytest.raises(ValueError, match="target must have shape"):
        head.loss(x, target.reshape(6))


def test_half_precision_input_is_computed_in_the_head_dtype():
    seed = make_seed(8, 5, False, dtype=torch.float32)
    head = fk.FAIMHead(8, 5)
    head.load_state_dict(seed.state_dict())
    x = torch.randn(6, 8).to(torch.bfloat16)
    out = head(x)
    assert out.dtype == torch.float32
    assert_rel_close(out, seed(x.float()), 1e-4, "bf16 input")


def test_state_dict_round_trip_and_seed_checkpoint():
    for full in (False, True):
        head = fk.FAIMHead(6, 4, full_sigma=full, lambda_init=0.2, scale_init=3.0)
        with torch.no_grad():
            for p in head.parameters():
                p.add_(0.1 * torch.randn_like(p))
        buf = io.BytesIO()
        torch.save(head.state_dict(), buf)
        buf.seek(0)
        other = fk.FAIMHead(6, 4, full_sigma=full)
        other.load_state_dict(torch.load(buf))
        x = torch.randn(5, 6)
        assert torch.equal(head(x), other(x))
        seed = SeedFAIMHead(6, 4, full_sigma=full)
        # the reference design's names, in its order; a full head adds the L_scale buffer (its L is
        # stored L_scale times the metric's; a dict without it loads as the metric's own L)
        assert list(seed.state_dict()) == [k for k in head.state_dict() if k != "L_scale"]
        assert ("L_scale" in head.state_dict()) == full
        with pytest.raises(RuntimeError):  # the other sigma mode's checkpoint does not load silently
            fk.FAIMHead(6, 4, full_sigma=not full).load_state_dict(head.state_dict())


def test_lambda_and_scale_are_read_through_abs_and_learn_from_zero():
    seed = make_seed(5, 3, False, seed=2)
    head = fk.FAIMHead(5, 3, dtype=torch.float64)
    head.load_state_dict(seed.state_dict())
    x = torch.randn(4, 5, dtype=torch.float64)
    ref = head(x)
    with torch.no_grad():
        head.lmbda.neg_()
        head.scale.neg_()
    assert head.lam.item() > 0 and head.gamma.item() > 0
    assert_rel_close(head(x), ref, 1e-12, "logits with negated raw lmbda, scale")

    zero = fk.FAIMHead(5, 3, lambda_init=0.0)
    zero.loss(torch.randn(8, 5), torch.randint(0, 3, (8,))).backward()
    assert zero.lmbda.grad is not None and float(zero.lmbda.grad) != 0.0  # λ = 0 is not a trap

    with pytest.raises(ValueError, match="scale_init"):
        fk.FAIMHead(5, 3, scale_init=0.0)
    with pytest.raises(ValueError, match="lambda_init"):
        fk.FAIMHead(5, 3, lambda_init=-0.1)
    with pytest.raises(ValueError, match="backend"):
        fk.FAIMHead(5, 3, backend="cuda")
    with pytest.raises(ValueError, match=r"\[\.\.\., 5\]"):
        fk.FAIMHead(5, 3)(torch.randn(4, 6))


def test_extra_repr_names_the_configuration():
    r = repr(fk.FAIMHead(16, 10, full_sigma=True, lambda_init=0.2, scale_init=5.0, backend="reference"))
    for part in ("in_features=16", "num_classes=10", "sigma=full", "lambda=0.2", "scale=5", "backend='reference'"):
        assert part in r, r


def test_freeze_unfreeze_and_param_groups():
    head = fk.FAIMHead(6, 4)
    groups = head.param_groups(sigma={"lr": 1e-4})
    assert [g["name"] for g in groups] == ["prototypes", "sigma", "one_form", "scale"]
    assert groups[1]["lr"] == 1e-4 and groups[1]["params"] == [head.log_sigma_diag]
    assert sum(len(g["params"]) for g in groups) == len(list(head.parameters()))
    opt = torch.optim.AdamW(groups, lr=1e-2)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        head.param_groups(metric={"lr": 1.0})

    x, t = torch.randn(8, 6), torch.randint(0, 4, (8,))
    head.freeze_metric()  # warm-up: only the prototypes (and a backbone) learn
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    head.loss(x, t).backward()
    assert head.mu.grad is not None
    assert all(p.grad is None for n, p in head.named_parameters() if n != "mu")
    opt.step()
    opt.zero_grad()
    for n, p in head.named_parameters():
        assert torch.equal(p, before[n]) == (n != "mu"), n

    head.unfreeze_metric(["one_form"])
    head.loss(x, t).backward()
    assert head.beta.grad is not None and head.lmbda.grad is not None
    assert head.log_sigma_diag.grad is None and head.scale.grad is None
    head.unfreeze_metric()
    assert all(p.requires_grad for p in head.parameters())


class TorchvisionStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.classifier = nn.Sequential(nn.Dropout(0.0), nn.Linear(16, 5))

    def forward(self, x):
        return self.classifier(self.features(x))


class TimmStyle(nn.Module):
    """What swap_classifier reads off a timm model: pretrained_cfg['classifier'], num_features,
    num_classes, reset_classifier."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.num_features, self.num_classes = 12, num_classes
        self.pretrained_cfg = {"classifier": "head.fc"}
        self.stem = nn.Linear(10, 12)
        self.head = nn.Module()
        self.head.fc = nn.Linear(12, num_classes)

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head.fc = nn.Linear(12, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        return self.head.fc(torch.relu(self.stem(x)))


def test_swap_classifier_torchvision_style():
    model = TorchvisionStyle().double()
    head = fk.swap_classifier(model, full_sigma=True)
    assert model.classifier[1] is head and isinstance(head, fk.FAIMHead)
    assert (head.in_features, head.num_classes, head.full_sigma) == (16, 5, True)
    assert head.mu.dtype == torch.float64
    x = torch.randn(7, 10, dtype=torch.float64)
    out = model(x)
    assert out.shape == (7, 5)
    assert_rel_close(out, head(model.features(x)), 1e-12, "model output")
    out.sum().backward()
    assert model.features[0].weight.grad is not None and head.mu.grad is not None

    other = TorchvisionStyle()
    mine = fk.FAIMHead(16, 3)
    assert fk.swap_classifier(other, name="classifier.1", head=mine) is mine
    assert other(torch.randn(2, 10)).shape == (2, 3)


def test_swap_classifier_timm_style():
    model = TimmStyle()
    head = fk.swap_classifier(model, num_classes=7)
    assert model.head.fc is head and model.num_classes == 7 and head.in_features == 12
    assert model(torch.randn(3, 10)).shape == (3, 7)

    # timm's own way: reset_classifier(0) (an Identity; the feature size comes from num_features), then assign.
    model = TimmStyle()
    model.reset_classifier(0)
    model.head.fc = fk.FAIMHead(model.num_features, 4)
    assert model(torch.randn(3, 10)).shape == (3, 4)
    model.reset_classifier(0)
    head = fk.swap_classifier(model, num_classes=4)
    assert model(torch.randn(3, 10)).shape == (3, 4) and model.head.fc is head
    model.reset_classifier(0)
    with pytest.raises(ValueError, match="num_classes"):
        fk.swap_classifier(model)
    with pytest.raises(ValueError, match="no classifier"):
        fk.swap_classifier(nn.Sequential(nn.ReLU()))


# -- closed-form initialisation ---------------------------------------------------------------

def lda_data(n_per_class=200, C=4, D=6, seed=0):
    """Gaussian classes with one shared, strongly correlated covariance: the Mahalanobis nearest mean
    separates them, the Euclidean nearest mean does not (the noise's long axis crosses the means)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.zeros(C, D, dtype=torch.float64)
    means[:, 0] = torch.arange(C, dtype=torch.float64) * 1.5  # means 1.5 apart along e_0
    A = torch.eye(D, dtype=torch.float64) * 0.1
    A[:, 0] = 6.0 / D ** 0.5  # noise of std ~6 along (1, 1, ..., 1)/sqrt(D), 0.1 elsewhere
    y = torch.arange(C).repeat_interleave(n_per_class)
    X = means[y] + torch.randn(len(y), D, generator=g, dtype=torch.float64) @ A.T
    perm = torch.randperm(len(y), generator=g)
    return X[perm], y[perm], means


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_init_from_features_sets_means_and_the_fisher_metric(full):
    X, y, _ = lda_data()
    C, D = 4, X.shape[1]
    head = fk.FAIMHead(D, C, full_sigma=full, dtype=torch.float64)
    head.init_from_features(X, y, shrinkage=0.0, beta_scale=1e-2, generator=torch.Generator().manual_seed(0),
                            whiten=True)
    means = torch.stack([X[y == c].mean(0) for c in range(C)])
    assert_rel_close(head.mu, means, 1e-12, "prototypes")
    R = X - means[y]
    S = R.T @ R / len(y)
    want = torch.linalg.inv(S) if full else torch.diag(1.0 / torch.diagonal(S))
    assert_norm_close(head.sigma(), want, 1e-9, "Sigma = S_w^-1")
    # beta: |βᵀv| <= beta_scale·sqrt(vᵀ Sigma v), with equality in the worst direction.
    sigma = head.sigma().detach()
    beta = head.beta.detach()
    assert abs(float(beta @ torch.linalg.solve(sigma, beta)) ** 0.5 - 1e-2) < 1e-9

    # The default keeps distances in the features' units: Sigma = (tr S / D)·S⁻¹ (I for isotropic S).
    head.init_from_features(X, y, shrinkage=0.0)
    assert_norm_close(head.sigma(), torch.trace(S) / D * want, 1e-9, "Sigma = (tr S_w / D)·S_w^-1")
    sigma = head.sigma().detach()
    assert abs(float(head.beta.detach() @ torch.linalg.solve(sigma, head.beta.detach())) ** 0.5 - 1e-2) < 1e-9

    a = 0.3
    head.init_from_features(X, y, shrinkage=a, whiten=True)
    shrunk = (1 - a) * S + a * torch.trace(S) / D * torch.eye(D, dtype=torch.float64)
    want = torch.linalg.inv(shrunk) if full else torch.diag(1.0 / torch.diagonal(shrunk))
    assert_norm_close(head.sigma(), want, 1e-9, "Sigma of the shrunk covariance")


def test_init_from_features_fits_the_temperature_below_the_current_scale():
    """γ after init_from_features minimises the mean cross-entropy over (0, γ_before] (checked on a
    fine grid), and fit_scale=False leaves it alone."""
    X, y, _ = lda_data(n_per_class=50, seed=3)
    y[::3] = (y[::3] + 1) % 4  # a third of the labels wrong: not separable, the optimum is finite (0.71)
    for scale_init in (10.0, 1e-3, 30.0):
        head = fk.FAIMHead(X.shape[1], 4, full_sigma=True, scale_init=scale_init, dtype=torch.float64)
        head.init_from_features(X, y, generator=torch.Generator().manual_seed(0))
        gamma = head.gamma.item()
        d = head.distance(X).detach()
        grid = torch.logspace(-4, math.log10(scale_init), 2001, dtype=torch.float64)
        ce = F.cross_entropy((-grid[:, None, None] * d).reshape(-1, 4), y.repeat(len(grid)),
                             reduction="none").reshape(len(grid), -1).mean(1)
        best = grid[ce.argmin()].item()
        assert 0 < gamma <= scale_init * (1 + 1e-12)
        assert F.cross_entropy(-gamma * d, y) <= ce.min() + 1e-9, (gamma, best)
        if scale_init == 1e-3:
            assert gamma == pytest.approx(1e-3)  # the optimum lies above: capped at the current γ
        else:
            assert abs(math.log(gamma / best)) < 0.01 and gamma < 0.5 * scale_init, (gamma, best)
    head = fk.FAIMHead(X.shape[1], 4, scale_init=7.0)
    head.init_from_features(X, y, fit_scale=False)
    assert head.gamma.item() == 7.0

    # Separable classes: the plain fit runs into the cap; with the training loss's label smoothing
    # the optimum is finite, and it is the smoothed cross-entropy's.
    X, y, _ = lda_data(n_per_class=50, seed=4)
    head = fk.FAIMHead(X.shape[1], 4, full_sigma=True, scale_init=1e3, dtype=torch.float64)
    assert head.init_from_features(X, y).gamma.item() == pytest.approx(1e3)
    gamma = head.init_from_features(X, y, label_smoothing=0.1).gamma.item()
    d = head.distance(X).detach()
    grid = torch.logspace(-3, 3, 3001, dtype=torch.float64)
    ce = F.cross_entropy((-grid[:, None, None] * d).reshape(-1, 4), y.repeat(len(grid)), label_smoothing=0.1,
                         reduction="none").reshape(len(grid), -1).mean(1)
    assert gamma < 100 and abs(math.log(gamma / grid[ce.argmin()].item())) < 0.01, (gamma, grid[ce.argmin()])
    with pytest.raises(ValueError, match="label_smoothing"):
        head.init_from_features(X, y, label_smoothing=1.5)


def test_init_from_features_is_a_mahalanobis_nearest_mean_classifier():
    X, y, _ = lda_data(seed=1)
    X_test, y_test, _ = lda_data(seed=2)
    head = fk.FAIMHead(X.shape[1], 4, full_sigma=True).init_from_features(X.float(), y)
    acc = (head(X_test.float()).argmax(1) == y_test).double().mean().item()
    # the same classifier written out: argmin_c (x − m_c)ᵀ S⁻¹ (x − m_c) with the shrunk S
    means = torch.stack([X[y == c].mean(0) for c in range(4)])
    R = X - means[y]
    S = R.T @ R / len(y)
    a = ledoit_wolf_shrinkage(R)
    S = (1 - a) * S + a * torch.trace(S) / S.shape[0] * torch.eye(S.shape[0], dtype=torch.float64)
    diff = X_test.unsqueeze(1) - means
    maha = torch.einsum("bcd,df,bcf->bc", diff, torch.linalg.inv(S), diff).argmin(1)
    euclid = (diff * diff).sum(-1).argmin(1)
    assert (head.predict(X_test.float()) == maha).double().mean() >= 0.995
    euclid_acc = (euclid == y_test).double().mean().item()
    assert acc >= 0.99, acc
    assert euclid_acc < 0.8, euclid_acc  # so the metric, not just the means, does the work

    # A diagonal metric cannot undo correlated noise: 0.42 here, measured; only the full head is LDA.
    diag = fk.FAIMHead(X.shape[1], 4).init_from_features(X, y)
    assert (diag(X_test.float()).argmax(1) == y_test).double().mean() < 0.9


def test_ledoit_wolf_matches_scikit_learn():
    sk = pytest.importorskip("sklearn.covariance")
    g = torch.Generator().manual_seed(3)
    for n, D in ((50, 10), (20, 30), (500, 4)):
        R = torch.randn(n, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, D, dtype=torch.float64)
        want = sk.ledoit_wolf_shrinkage(R.numpy(), assume_centered=True)
        assert abs(ledoit_wolf_shrinkage(R) - want) < 1e-10


def test_init_from_features_edge_cases():
    X, y, _ = lda_data(n_per_class=20)
    head = fk.FAIMHead(X.shape[1], 5)
    before = head.mu[4].detach().clone()
    with pytest.warns(UserWarning, match=r"classes \[4\]"):
        head.init_from_features(X, y)
    assert torch.equal(head.mu[4], before)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fk.FAIMHead(X.shape[1], 4).init_from_features(X, y)
    head = fk.FAIMHead(X.shape[1], 4)
    with pytest.raises(ValueError, match="labels must lie"):
        head.init_from_features(X, y + 3)
    with pytest.raises(ValueError, match="features must have shape"):
        head.init_from_features(X[:, :3], y)
    with pytest.raises(ValueError, match="shrinkage"):
        head.init_from_features(X, y, shrinkage=1.5)
    with pytest.raises(ValueError, match="scatter is zero"):
        head.init_from_features(X[:4], torch.arange(4))


def test_head_loss_options_with_leading_dims():
    """FAIMHead.loss takes class weights, the z-loss, return_lse and both probability-target forms
    with x's leading dims, as F.cross_entropy over head(x) (z-loss and lse from its logits)."""
    head = fk.FAIMHead(5, 6, dtype=torch.float64)
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    weight = 0.5 + torch.rand(6, dtype=torch.float64, generator=g)
    classes = torch.randint(0, 6, (2, 3, 2), generator=g)
    probs = torch.rand(2, 3, 2, dtype=torch.float64, generator=g)
    compact = fk.SoftTargets(classes, probs / probs.sum(-1, keepdim=True), smoothing=0.1)
    dense = fk.SoftTargets(classes.reshape(6, 2), compact.probs.reshape(6, 2), 0.1).to_dense(6).reshape(2, 3, 6)
    logits = head(x).reshape(6, 6)
    for target in (compact, dense):
        ref = F.cross_entropy(logits, dense.reshape(6, 6), weight=weight, label_smoothing=0.05, reduction="none")
        lse_ref = torch.logsumexp(logits, dim=1)
        loss, lse = head.loss(x, target, weight=weight, label_smoothing=0.05, reduction="none",
                              lse_square_scale=0.01, return_lse=True)
        assert loss.shape == (2, 3) and lse.shape == (2, 3)
        assert_rel_close(loss.reshape(6), ref + 0.01 * lse_ref ** 2, 1e-10, "loss")
        assert_rel_close(lse.reshape(6), lse_ref, 1e-10, "lse")
    index = torch.randint(0, 6, (2, 3), generator=g)
    assert_rel_close(head.loss(x, index, weight=weight),
                     F.cross_entropy(logits, index.reshape(6), weight=weight), 1e-10, "weighted loss")
    with pytest.raises(ValueError, match="probability target must have shape"):
        head.loss(x, dense.reshape(6, 6))
    with pytest.raises(ValueError, match="SoftTargets must have"):
        head.loss(x, fk.SoftTargets(classes.reshape(6, 2), probs.reshape(6, 2)))
