"""Property-based test: a seeded generator draws problems (shapes including D = 1, 2 and tile edges,
dtypes, full or diagonal L, eps including 0, near / far / exact pairs, prototypes far from the
origin, non-finite entries, cross-entropy options) and checks every output and gradient of the
fused backends against an independent float64 formula (not the einsum reference) with dtype-aware
bounds.

A second draw covers the cross-entropy with a class weight that requires grad, every target form and
option of F.cross_entropy, and scale extremes of γ (down to float32 logits that are subnormal) and λ
(up to 1e3), against F.cross_entropy's formula written out; a third runs drawn calls on meta and
fake tensors and checks the real calls' shapes and dtypes.

Each case is reproducible from its number: a failure prints the case and its parameters.
FAIM_PROPERTY_CASES=N runs N cases (default 360: about 10 s for the C++ kernels on 2 cores; the
Triton interpreter gets a sixth of them, on smaller shapes: about 20 s).
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

import faim_kernels as fk

CASES = int(os.environ.get("FAIM_PROPERTY_CASES", "360"))
# Relative bounds per dtype: forward per entry, gradients in relative norm (docs/design.md §2.1, near pairs goals).
FWD = {torch.float32: 1e-4, torch.float64: 1e-10}
GRAD = {torch.float32: 1e-3, torch.float64: 1e-8}


def oracle_distance(x, mu, L, beta, lam, eps):
    """d [B, C] in float64, written independently of fk.reference: q = |Lᵀ·diff|² + eps·|diff|² (full)
    or Σ_k (L_k² + eps)·diff_k² (diagonal), s = betaᵀ·diff; +inf for an infinite difference."""
    x, mu, L, beta = (t.detach().double().cpu() for t in (x, mu, L, beta))
    lam = float(lam)
    diff = x[:, None, :] - mu[None, :, :]
    if L.dim() == 2:
        q = ((diff @ L) ** 2).sum(-1) + eps * (diff ** 2).sum(-1)
    else:
        q = ((L * L + eps) * diff ** 2).sum(-1)
    s = (diff * beta).sum(-1)
    d = torch.sqrt(q + eps) + lam * torch.sqrt(s * s + eps)
    infinite = torch.isinf(diff).any(-1) & ~torch.isnan(diff).any(-1)
    return torch.where(infinite, torch.full_like(d, math.inf), d)


def oracle_cross_entropy(d, gamma, target, margin, label_smoothing, ignore_index, reduction):
    """F.cross_entropy's definition written out over logits' = −γ·(d + margin·onehot), float64 (γ a
    float, or a tensor to differentiate through)."""
    B, C = d.shape
    valid = target != ignore_index
    t = torch.where(valid, target, 0)
    onehot = torch.nn.functional.one_hot(t, C).double() * valid[:, None].double()
    logits = -gamma * (d + margin * onehot)
    lse = torch.logsumexp(logits, dim=1)
    nll = lse - logits.gather(1, t[:, None]).squeeze(1)
    loss = nll
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * nll + label_smoothing * (lse - logits.mean(dim=1))
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    return loss.sum() / valid.sum() if reduction == "mean" else loss.sum()


def draw(case: int, small: bool):
    """One problem, from the case number alone."""
    rng = random.Random(case)
    g = torch.Generator().manual_seed(case)
    D = rng.choice([1, 2, 3, 5, 16, 17, 33] if small else [1, 2, 3, 7, 16, 31, 32, 33, 64, 65, 128])
    B = rng.choice([1, 2, 3, 5, 9] if small else [1, 2, 5, 17, 33, 64])
    C = rng.choice([1, 2, 3, 7, 13] if small else [1, 2, 3, 17, 64, 255, 257])
    dtype = rng.choice([torch.float32, torch.float64])
    full = rng.random() < 0.4
    eps = rng.choice([0.0, 1e-6, 1e-6, 1e-3])
    offset = rng.choice([0.0, 0.0, 5.0, 1e2, 1e3])  # prototypes far from the origin
    scale = rng.choice([1.0, 10.0])
    mu = offset + scale * torch.randn(C, D, generator=g, dtype=torch.float64)
    pairing = rng.choice(["random", "near", "near", "exact"])
    if pairing == "random":
        x = offset + scale * torch.randn(B, D, generator=g, dtype=torch.float64)
    else:
        t = torch.randint(0, C, (B,), generator=g)
        delta = 0.0 if pairing == "exact" else rng.choice([1e-6, 1e-4, 1e-3, 1e-1])
        x = mu[t] + delta * torch.randn(B, D, generator=g, dtype=torch.float64)
        if pairing == "exact" or rng.random() < 0.5:
            x[0] = mu[min(1, C - 1)]
    if full:
        L = torch.eye(D, dtype=torch.float64) + 0.4 * torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    else:
        L = 0.3 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
    lam = rng.choice([0.0, 0.1, 0.7])
    gamma = rng.choice([1.0, 3.0, -0.5])
    op_family = rng.choice(["distance", "logits", "cross_entropy", "cross_entropy"])
    nonfinite = rng.random() < 0.12
    if nonfinite:  # one infinite prototype coordinate (that class at distance +inf)
        mu[rng.randrange(C), rng.randrange(D)] = rng.choice([math.inf, -math.inf])
    ce = dict(margin=rng.choice([0.0, 0.3]), label_smoothing=rng.choice([0.0, 0.1]),
              ignore_index=-100, reduction=rng.choice(["mean", "sum", "none"]))
    target = torch.randint(0, C, (B,), generator=g)
    if rng.random() < 0.3 and B > 1:
        target[rng.randrange(B)] = -100
    if nonfinite and op_family == "cross_entropy":
        ce["label_smoothing"] = 0.0  # smoothing over a −inf logit is +inf by definition: nothing to compare
    params = dict(case=case, B=B, C=C, D=D, dtype=str(dtype).split(".")[1], full=full, eps=eps, offset=offset,
                  pairing=pairing, lam=lam, gamma=gamma, op_family=op_family, nonfinite=nonfinite, **ce)
    tensors = [t.to(dtype) for t in (x, mu, L, beta)]
    return params, tensors, lam, gamma, target, ce


def rel_err(got, want, floor=0.0):
    """Largest |got − want| / max(|want|, floor) over finite entries; inf where the non-finite
    entries differ (NaN against NaN, +inf against +inf exactly)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return math.inf
    if not torch.equal(torch.isnan(got), torch.isnan(want)) or not torch.equal(torch.isinf(got), torch.isinf(want)):
        return math.inf
    fin = torch.isfinite(want)
    if not torch.equal(got[~fin & ~torch.isnan(want)], want[~fin & ~torch.isnan(want)]):
        return math.inf
    if not fin.any():
        return 0.0
    g, w = got[fin], want[fin]
    return ((g - w).abs() / w.abs().clamp_min(max(floor, 1e-300))).max().item()


def norm_err(got, want, floor):
    """‖got − want‖ / max(‖want‖, floor): gradients that (nearly) vanish in exact arithmetic (a
    saturated softmax; at D = 1 every prototype on one side of x) are compared against the problem's
    gradient scale instead, where rounding is all there is."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return math.inf
    return ((got - want).norm() / want.norm().clamp_min(floor)).item()


def run_case(case: int, backend: str, small: bool):
    """Returns None, or a description of what failed."""
    params, (x, mu, L, beta), lam, gamma, target, ce = draw(case, small)
    dtype, eps, op_family = x.dtype, params["eps"], params["op_family"]
    if eps == 0.0 and full_singular(L):
        return None
    inputs = [t.clone().requires_grad_() for t in (x, mu, L, beta)]
    lam_t = torch.tensor(lam, dtype=dtype, requires_grad=True)
    gamma_t = torch.tensor(gamma, dtype=dtype, requires_grad=True)
    all_in = inputs + [lam_t, gamma_t]
    d_want = oracle_distance(x, mu, L, beta, lam, eps)
    if op_family == "distance":
        out = fk.randers_distance(*inputs, lam_t, eps, backend=backend)
        want = d_want
    elif op_family == "logits":
        out = fk.randers_logits(*inputs, lam_t, gamma_t, eps, backend=backend)
        want = -gamma * d_want
    else:
        out = fk.randers_cross_entropy(*inputs, lam_t, gamma_t, target, eps, backend=backend, **ce)
        want = oracle_cross_entropy(d_want, gamma, target, **ce)
    problems = []
    if out.dtype != dtype:
        problems.append(f"dtype {out.dtype}")
    # A loss is a logsumexp: its rounding is relative to max(|loss|, 1) (F.cross_entropy's own, in float32).
    err = rel_err(out, want, floor=1.0 if op_family == "cross_entropy" else 0.0)
    # Forward bound: per dtype, on every finite entry; an infinite distance must be exactly +inf.
    bound = FWD[dtype]
    if err > bound:
        problems.append(f"forward rel err {err:.2e} > {bound:.0e}")
    # Gradients: against autograd of the independent float64 formula (finite problems only; with eps = 0
    # the norms are not differentiable at a hit, so exact pairs are compared where eps > 0).
    if not params["nonfinite"] and not (eps == 0.0 and params["pairing"] != "random") and torch.isfinite(want).all():
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(case), dtype=torch.float64)
        got = torch.autograd.grad((out.double() * w).sum(), all_in, allow_unused=True)
        ref = [t.detach().double().requires_grad_() for t in all_in]
        d_ref = oracle_distance_autograd(*ref[:5], eps)
        if op_family == "distance":
            r_out = d_ref
        elif op_family == "logits":
            r_out = -ref[5] * d_ref
        else:
            r_out = oracle_cross_entropy(d_ref, ref[5], target, **ce)
        want_g = torch.autograd.grad((r_out * w).sum(), ref, allow_unused=True)
        names = ["x", "mu", "L", "beta", "lam", "gamma"]
        # The gradient scale: |γ|·(‖Sigma‖^½ + λ‖beta‖) per unit weight, times the coordinates' size for L, beta.
        size = 1.0 + max(x.detach().abs().max().item(), mu[torch.isfinite(mu)].abs().max().item())
        scale = (abs(gamma) + 1) * (L.double().norm().item() + lam * beta.double().norm().item() + 1) * size
        floor = scale * (1e-6 if dtype == torch.float64 else 1e-3) * w.norm().item()
        problems += gradient_problems(names, got, want_g, [floor] * len(names), dtype)
    return f"{params}: {'; '.join(problems)}" if problems else None


def gradient_problems(names, got, want, floors, dtype) -> list[str]:
    """The gradients whose relative norm error (against `floor`, the scale where rounding is all
    there is) exceeds GRAD[dtype]; pairs with a None side or both zero are skipped."""
    problems = []
    for name, a, b, floor in zip(names, got, want, floors):
        if b is None or a is None or (b.norm() == 0 and a.norm() == 0):
            continue
        e = norm_err(a, b, floor)
        if e > GRAD[dtype]:
            problems.append(f"d{name} rel norm err {e:.2e} > {GRAD[dtype]:.0e}")
    return problems


def full_singular(L):
    return L.dim() == 2 and torch.linalg.matrix_rank(L.double()) < L.shape[0]


def oracle_distance_autograd(x, mu, L, beta, lam, eps):
    """oracle_distance with autograd (finite inputs)."""
    diff = x[:, None, :] - mu[None, :, :]
    q = ((diff @ L) ** 2).sum(-1) + eps * (diff ** 2).sum(-1) if L.dim() == 2 else ((L * L + eps) * diff ** 2).sum(-1)
    s = (diff * beta).sum(-1)
    return torch.sqrt(q + eps) + lam * torch.sqrt(s * s + eps)


# The fused backends the property tests draw against (Triton: on CUDA, or through its interpreter).
FUSED_BACKENDS = pytest.mark.parametrize("backend", [
    pytest.param("cpp", id="cpp"),
    pytest.param("triton", id="triton", marks=[pytest.mark.interpret, pytest.mark.skipif(
        not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()),
        reason="needs TRITON_INTERPRET=1 or a CUDA device")]),
])


@FUSED_BACKENDS
def test_fused_backends_match_an_independent_float64_formula_on_drawn_problems(backend):
    small = backend == "triton" and not torch.cuda.is_available()
    n = CASES if not small else max(1, CASES // 6)
    failures = []
    for case in range(n):
        problem = run_case(case, backend, small)
        if problem:
            failures.append(problem)
    assert not failures, f"{len(failures)} of {n} cases failed; first ones:\n" + "\n".join(failures[:8])


# ---- learned class weights with every F.cross_entropy option, and scale extremes of γ and λ ----

def oracle_weighted_cross_entropy(d, gamma, target, weight, margin, label_smoothing, ignore_index, reduction,
                                  lse_square_scale):
    """F.cross_entropy's documented formula with class weights v (its `weight`), over logits' =
    −γ·(d + margin·onehot), float64, differentiable in v as well: class indices (loss_b = (1 − ε)·v_t·nll_b
    + (ε/C)·Σ_c v_c·(−log p_bc), 'mean' over Σ v_t) or a dense probability target P (loss_b =
    −Σ_c v_c·((1 − ε)·P_bc + ε/C)·log p_bc, 'mean' over B); plus the z-loss s·lse² per counted row."""
    B, C = d.shape
    dense = target.is_floating_point()
    if dense:
        valid = torch.ones(B, dtype=torch.bool)
        logits = -gamma * d
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, 0)
        onehot = torch.nn.functional.one_hot(t, C).double() * valid[:, None].double()
        logits = -gamma * (d + margin * onehot)
    lse = torch.logsumexp(logits, dim=1)
    logp = logits - lse[:, None]
    if dense:
        loss = -(weight * ((1 - label_smoothing) * target + label_smoothing / C) * logp).sum(1)
        count = torch.tensor(float(B), dtype=torch.float64)
    else:
        v_t = torch.where(valid, weight[t], 0.0)
        loss = -v_t * logp.gather(1, t[:, None]).squeeze(1)
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss - (label_smoothing / C) * (weight * logp).sum(1)
        count = v_t.sum()
    loss = torch.where(valid, loss, 0.0)
    z = torch.where(valid, lse_square_scale * lse * lse, 0.0)
    if reduction == "none":
        return loss + z
    if reduction == "sum":
        return loss.sum() + z.sum()
    return loss.sum() / count + (z.sum() / valid.sum() if lse_square_scale else 0.0)


def draw_weighted(case: int, small: bool):
    """A cross-entropy problem with a class weight that requires grad, any target form and option,
    and γ, λ drawn from their extremes as well (tiny γ whose float32 logits are subnormal, large λ)."""
    from faim_kernels.targets import SoftTargets
    rng = random.Random(10_000 + case)
    g = torch.Generator().manual_seed(10_000 + case)
    B = rng.choice([1, 3, 7] if small else [1, 5, 17, 33])
    C = rng.choice([1, 3, 7] if small else [1, 3, 17, 64])
    D = rng.choice([1, 3, 8] if small else [1, 3, 16, 33])
    dtype = rng.choice([torch.float32, torch.float64])
    full = rng.random() < 0.4
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    mu = torch.randn(C, D, generator=g, dtype=torch.float64)
    if rng.random() < 0.3:
        x[0] = mu[0] + 1e-4 * torch.randn(D, generator=g, dtype=torch.float64)
    if full:
        L = torch.eye(D, dtype=torch.float64) + 0.4 * torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    else:
        L = 0.3 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
    lam = rng.choice([0.0, 0.3, 1e2, 1e3])
    gamma = rng.choice([2.0, -0.5, 1e-30, 1e-40 if dtype == torch.float32 else 1e-300, 50.0])
    form = rng.choice(["index", "index", "dense", "pairs"])
    if form == "index":
        target = torch.randint(0, C, (B,), generator=g)
        if rng.random() < 0.4 and B > 1:
            target[rng.randrange(B)] = -100
    elif form == "dense":
        target = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64), 1)
    else:
        k = rng.choice([1, 2, 3])
        target = SoftTargets(torch.randint(0, C, (B, k), generator=g), torch.rand(B, k, generator=g, dtype=torch.float64),
                             rng.choice([0.0, 0.1]))
    ce = dict(margin=rng.choice([0.0, 0.3]) if form == "index" else 0.0, label_smoothing=rng.choice([0.0, 0.1, 0.4]),
              ignore_index=-100, reduction=rng.choice(["mean", "sum", "none"]),
              lse_square_scale=rng.choice([0.0, 0.0, 1e-2]))
    weight = rng.choice([0.1, 0.5]) + torch.rand(C, generator=g, dtype=torch.float64)
    params = dict(case=case, B=B, C=C, D=D, dtype=str(dtype).split(".")[1], full=full, lam=lam, gamma=gamma,
                  form=form, **ce)
    return params, [t.to(dtype) for t in (x, mu, L, beta, weight)], lam, gamma, target, ce


def run_weighted_case(case: int, backend: str, small: bool):
    params, (x, mu, L, beta, weight), lam, gamma, target, ce = draw_weighted(case, small)
    dtype = x.dtype
    all_in = [t.clone().requires_grad_() for t in (x, mu, L, beta)]
    all_in += [torch.tensor(lam, dtype=dtype, requires_grad=True), torch.tensor(gamma, dtype=dtype, requires_grad=True),
               weight.clone().requires_grad_()]
    out = fk.randers_cross_entropy(*all_in[:6], target, 1e-6, backend=backend, weight=all_in[6], **ce)
    ref = [t.detach().double().requires_grad_() for t in all_in]
    dense = target.to_dense(mu.shape[0], torch.float64) if isinstance(target, fk.SoftTargets) else target
    want = oracle_weighted_cross_entropy(oracle_distance_autograd(*ref[:5], 1e-6), ref[5], dense, ref[6], **ce)
    problems = []
    err = rel_err(out, want, floor=1.0)
    if err > FWD[dtype]:
        problems.append(f"forward rel err {err:.2e} > {FWD[dtype]:.0e}")
    # The incoming gradient is scaled by 1/|γ| (within float32's range) so that the exact gradients
    # stay normal numbers at a tiny γ: the check is then of the backward's arithmetic, not of
    # float32's subnormal range.
    scale = min(1.0 / abs(gamma), 1e30) if abs(gamma) < 1 else 1.0
    w = scale * torch.randn(want.shape, generator=torch.Generator().manual_seed(case), dtype=torch.float64)
    got = torch.autograd.grad((out.double() * w).sum(), all_in)
    want_g = torch.autograd.grad((want * w).sum(), ref)
    # Gradient scales (as in run_case): S = (‖L‖ + λ‖beta‖ + 1)·(1 + the coordinates' size) bounds
    # ∂d/∂(x, mu, L, beta, lam) and d itself; the metric's inputs get |γ|·S, γ gets S, the weights
    # (through nll ≈ log C + γ·d) 1 + |γ|·S. Gradients that nearly vanish in exact arithmetic (one
    # class, a saturated softmax) are compared against that scale, where rounding is all there is.
    size = 1.0 + max(x.abs().max().item(), mu.abs().max().item())
    S = (L.double().norm().item() + lam * beta.double().norm().item() + 1) * size
    tol = (1e-6 if dtype == torch.float64 else 1e-3) * w.norm().item()
    floors = [abs(gamma) * S * tol] * 5 + [S * tol, (1 + abs(gamma) * S) * tol]
    problems += gradient_problems(["x", "mu", "L", "beta", "lam", "gamma", "weight"], got, want_g, floors, dtype)
    return f"{params}: {'; '.join(problems)}" if problems else None


@FUSED_BACKENDS
def test_learned_class_weights_and_scale_extremes_match_the_written_out_loss(backend):
    small = backend == "triton" and not torch.cuda.is_available()
    n = max(1, CASES // 3) if not small else max(1, CASES // 12)
    failures = [p for p in (run_weighted_case(case, backend, small) for case in range(n)) if p]
    assert not failures, f"{len(failures)} of {n} cases failed; first ones:\n" + "\n".join(failures[:8])


# ---- meta and fake tensors: the shapes and dtypes of the real call, nothing computed ----

@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_meta_and_fake_tensors_give_the_real_calls_shapes_and_dtypes(mode):
    from torch._subclasses.fake_tensor import FakeTensorMode
    for case in range(max(1, CASES // 12)):
        params, (x, mu, L, beta), lam, gamma, target, ce = draw(case, small=True)
        g = torch.Generator().manual_seed(case)
        weight = (0.5 + torch.rand(mu.shape[0], generator=g)).to(x.dtype)
        dense = torch.softmax(torch.randn(x.shape[0], mu.shape[0], generator=g), 1).to(x.dtype)
        calls = {
            "distance": lambda *t: fk.randers_distance(*t[:5]),
            "logits": lambda *t: fk.randers_logits(*t[:6]),
            "cross_entropy": lambda *t: fk.randers_cross_entropy(*t[:6], t[6], weight=t[7], **ce),
            "dense_cross_entropy": lambda *t: fk.randers_cross_entropy(*t[:6], t[8], weight=t[7], return_lse=True),
            "topk": lambda *t: fk.randers_topk(*t[:5], min(2, mu.shape[0])),
        }
        real = [x, mu, L, beta, torch.tensor(lam, dtype=x.dtype), torch.tensor(gamma, dtype=x.dtype), target, weight,
                dense]
        for name, call in calls.items():
            want = call(*real)
            want = want if isinstance(want, tuple) else (want,)
            if mode == "meta":
                got = call(*[t.to("meta") for t in real])
            else:
                with FakeTensorMode() as fake_mode:
                    got = call(*[fake_mode.from_tensor(t) for t in real])
            got = got if isinstance(got, tuple) else (got,)
            assert len(got) == len(want)
            for a, b in zip(got, want):
                assert (a.shape, a.dtype) == (b.shape, b.dtype), (params, name, mode)
