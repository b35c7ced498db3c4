"""The fused logits op on the C++ backend against the float64 einsum oracle (SPEC §1-2.1, §4)."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import FWD_TOL, GRAD_TOL, assert_norm_close, assert_rel_close, make_inputs, reference64

# 520 rows: three row tiles of the C++ kernels (256 rows each), so the cross-tile sums run.
SHAPES = [(1, 1, 1), (3, 17, 5), (17, 3, 64), (64, 129, 17), (129, 64, 3), (65, 300, 33), (520, 37, 9)]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _check_against_reference(inputs, backend, fn="logits", fwd_tol=None, grad_tol=None, seed=0):
    dtype = inputs[0].dtype
    fwd_tol = fwd_tol or FWD_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    for t in inputs:
        t.requires_grad_()
    if fn == "logits":
        out = fk.randers_logits(*inputs, backend=backend)
        ref = reference64(fk.reference.randers_logits, inputs)
    else:
        out = fk.randers_distance(*inputs[:5], backend=backend)
        ref = reference64(fk.reference.randers_distance, inputs[:5])
        inputs = inputs[:5]
    assert out.dtype == dtype
    assert_rel_close(out, ref, fwd_tol, "forward")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref_out = getattr(fk.reference, "randers_" + fn)(*ref_inputs)
    want = torch.autograd.grad(ref_out, ref_inputs, grad)
    for name, g, w in zip(["x", "mu", "L", "beta", "lam", "gamma"], got, want):
        assert g.dtype == dtype, name
        assert_norm_close(g, w, grad_tol, f"d{name}")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_inputs_float32(shape, full):
    _check_against_reference(make_inputs(*shape, full=full, seed=hash(shape) % 1000), "cpp")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_dtypes(dtype, full):
    _check_against_reference(make_inputs(37, 70, 24, full=full, dtype=dtype, seed=3), "cpp")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_distance(full):
    _check_against_reference(make_inputs(20, 30, 16, full=full, seed=5), "cpp", fn="distance")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_near_prototype_float32(full):
    """SPEC §2.1: samples 1e-3 from prototypes offset by 5, scale 10, D = 256 (sample 0 exactly on
    prototype 0). The plain GEMM expansion misses by ~800 % here; every pair within 1e-4 and the
    six gradients within 1e-3 is the goal."""
    inputs = make_inputs(32, 64, 256, full=full, near=True, lam=0.1, gamma=10.0, seed=11)
    _check_against_reference(inputs, "cpp", fwd_tol=1e-4, grad_tol=1e-3)


def test_plain_expansion_fails_on_near_case():
    """The hard case really is hard: the textbook expansion in float32 is far off, so the test
    above checks something."""
    x, mu, L, beta, lam, _ = make_inputs(32, 64, 256, near=True, lam=0.1, seed=11)
    xp, mup = x * L, mu * L
    q = (xp * xp).sum(1, keepdim=True) + (mup * mup).sum(1) - 2 * xp @ mup.T
    s = x @ beta
    d_plain = q.clamp_min(0).add(1e-6).sqrt() + lam * ((s[:, None] - mu @ beta) ** 2 + 1e-6).sqrt()
    ref = reference64(fk.reference.randers_distance, [x, mu, L, beta, lam])
    assert ((d_plain.double() - ref).abs() / ref).max() > 0.5


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_exact_hit_is_finite(full):
    x, mu, L, beta, lam, gamma = make_inputs(4, 6, 8, full=full, requires_grad=True)
    with torch.no_grad():
        x[1] = mu[2]
        x[3] = mu[2]
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="cpp")
    assert torch.isfinite(out).all()
    ref = reference64(fk.reference.randers_logits, [x, mu, L, beta, lam, gamma])
    assert_rel_close(out, ref, 1e-5)
    # At a hit d = sqrt(eps) + lam·sqrt(eps), the smooth minimum.
    assert out[1, 2].item() == pytest.approx(-gamma.item() * (1 + lam.item()) * 1e-3, rel=1e-4)
    grads = torch.autograd.grad(out.sum(), [x, mu, L, beta, lam, gamma])
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_gradcheck_float64(full):
    inputs = make_inputs(5, 7, 6, full=full, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend="cpp"), inputs)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_distance(*a, backend="cpp"), inputs[:5])


def test_gradcheck_near_pairs_float64():
    inputs = make_inputs(4, 5, 6, full=True, dtype=torch.float64, near=True)
    x = inputs[0].clone()
    x[1] = inputs[1][2] + 1e-7  # a pair well inside the near-pair threshold
    inputs[0] = x
    for t in inputs:
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend="cpp"), inputs)


def test_python_float_scalars_and_eps():
    x, mu, L, beta, _, _ = make_inputs(6, 9, 5, dtype=torch.float64)
    for eps in (0.0, 1e-6, 0.5):
        out = fk.randers_logits(x, mu, L, beta, 0.25, 3.0, eps=eps, backend="cpp")
        assert_rel_close(out, fk.reference.randers_logits(x, mu, L, beta, 0.25, 3.0, eps), 1e-10)


def test_non_contiguous_and_expanded_inputs():
    x, mu, L, beta, lam, gamma = make_inputs(8, 12, 10, full=True, dtype=torch.float64)
    x_nc = torch.cat([x, x], dim=1)[:, ::2]            # strided view
    mu_t = mu.T.contiguous().T                          # transposed layout
    L_t = L.T.contiguous().T
    beta_nc = torch.stack([beta, beta], 1)[:, 0]
    x_exp = x[:1].expand(8, -1)                         # stride-0 rows
    for args in ([x_nc, mu_t, L_t, beta_nc], [x_exp, mu, L, beta]):
        out = fk.randers_logits(*args, lam, gamma, backend="cpp")
        assert_rel_close(out, fk.reference.randers_logits(*[a.contiguous() for a in args], lam, gamma), 1e-10)


def test_empty_batch_and_classes():
    for B, C in ((0, 5), (4, 0), (0, 0)):
        x, mu, L, beta, lam, gamma = make_inputs(B, C, 3, requires_grad=True)
        out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="cpp")
        assert out.shape == (B, C)
        grads = torch.autograd.grad(out.sum(), [x, mu, L, beta, lam, gamma], allow_unused=True)
        assert grads[0].shape == x.shape and grads[1].shape == mu.shape
        assert all(g is None or (g == 0).all() for g in grads)


def test_nan_inf_stay_in_their_rows_and_columns():
    x, mu, L, beta, lam, gamma = make_inputs(6, 7, 5, dtype=torch.float64)
    x[2, 1] = float("nan")
    mu[4, 0] = float("inf")
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="cpp")
    bad = torch.zeros(6, 7, dtype=torch.bool)
    bad[2, :] = True
    bad[:, 4] = True
    assert not torch.isfinite(out[bad]).all()
    assert not torch.isfinite(out[2]).any() and not torch.isfinite(out[:, 4]).any()
    ref = fk.reference.randers_logits(x, mu, L, beta, lam, gamma)
    assert_rel_close(out[~bad], ref[~bad], 1e-10)


def test_deterministic():
    inputs = make_inputs(530, 300, 20, full=True, requires_grad=True)
    runs = []
    for _ in range(2):
        out = fk.randers_logits(*inputs, backend="cpp")
        runs.append([out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_auto_backend_is_cpp_on_cpu():
    assert fk.functional.resolve_backend("auto", torch.device("cpu")) == "cpp"
