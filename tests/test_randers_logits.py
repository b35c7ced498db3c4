"""The logits/distance family (docs/design.md §1, the function-2.1, §4) on every backend against the float64 einsum oracle:
forward and closed-form backward on odd shapes, full and diagonal L, the near-prototype and
exact-hit cases, every dtype, edge cases, cross-backend agreement, and the contract ops
(opcheck, fake kernels, gradcheck on their own inputs, torch.compile).

The backend is a fixture (conftest.py): "cpp", "triton" (on a CUDA device when present, else on
CPU tensors through Triton's interpreter with `TRITON_INTERPRET=1`; its output buffers poisoned
with NaN) and "reference" where the check means something for it. The interpreter is slow, so
some tests give it smaller shapes (`per_backend`); Triton internals live in test_triton_internals.py.
"""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import (GRAD_TOL, shape_key, FWD_TOL, HAS_CUDA, INTERPRET, NAMES, assert_norm_close, assert_rel_close, backends,
                      check_logits, contract_ops, device_of, interpreted_contract_ops, make_inputs, per_backend,
                      reference64)

FULL = pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Odd sizes: none a multiple of the block sizes. C++: 520 rows are three row tiles (256 rows each),
# so the cross-tile sums run. Triton: (19, 40, 130) has D over one backward chunk when the chunk
# is narrowed (test_triton_internals.py).
SHAPES = per_backend(
    cpp=[(1, 1, 1), (3, 17, 5), (17, 3, 64), (64, 129, 17), (129, 64, 3), (65, 300, 33), (520, 37, 9)],
    triton=[(1, 1, 1), (5, 70, 17), (37, 45, 33), (19, 40, 130)],
)


def _gradcheck_opts(backend):
    """The interpreter runs each call in Python: there gradcheck checks random projections of the
    Jacobian (fast_mode) rather than every entry."""
    return dict(fast_mode=backend == "triton" and INTERPRET and not HAS_CUDA)


@FULL
@pytest.mark.parametrize("backend, shape", SHAPES, indirect=["backend"])
def test_random_float32(backend, shape, full):
    check_logits(make_inputs(*shape, full=full, seed=sum(shape), device=device_of(backend)), backend)


@FULL
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(backend, device, dtype, full):
    shape = {"cpp": (37, 70, 24), "triton": (29, 38, 21)}[shape_key(backend)]
    check_logits(make_inputs(*shape, full=full, dtype=dtype, seed=3, device=device), backend)


@FULL
def test_distance(backend, device, full):
    shape = {"cpp": (20, 30, 16), "triton": (13, 21, 9)}[shape_key(backend)]
    check_logits(make_inputs(*shape, full=full, seed=5, device=device), backend, fn="distance")


@FULL
def test_near_prototype_float32(backend, device, full):
    """docs/design.md §2.1 (near pairs): samples 1e-3 from prototypes offset by 5, scale 10, D = 256 (sample 0 exactly on
    prototype 0). The plain GEMM expansion misses by ~800 % here; every pair within 1e-4 and the
    six gradients within 1e-3 is the goal."""
    inputs = make_inputs(32, 64, 256, full=full, near=True, lam=0.1, gamma=10.0, seed=11, device=device)
    check_logits(inputs, backend, fwd_tol=1e-4, grad_tol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_near_prototype_half(backend, device, dtype):
    check_logits(make_inputs(24, 40, 48, near=True, lam=0.1, gamma=10.0, dtype=dtype, seed=12, device=device),
                 backend)


def test_plain_expansion_fails_on_near_case():
    """The hard case really is hard: the textbook expansion in float32 is far off, so the tests
    above check something."""
    x, mu, L, beta, lam, _ = make_inputs(32, 64, 256, near=True, lam=0.1, seed=11)
    xp, mup = x * L, mu * L
    q = (xp * xp).sum(1, keepdim=True) + (mup * mup).sum(1) - 2 * xp @ mup.T
    s = x @ beta
    d_plain = q.clamp_min(0).add(1e-6).sqrt() + lam * ((s[:, None] - mu @ beta) ** 2 + 1e-6).sqrt()
    ref = reference64(fk.reference.randers_distance, [x, mu, L, beta, lam])
    assert ((d_plain.double() - ref).abs() / ref).max() > 0.5


@FULL
@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"), indirect=True)
def test_exact_hit_and_expanded_gradient(backend, device, full):
    x, mu, L, beta, lam, gamma = make_inputs(4, 6, 8, full=full, requires_grad=True, device=device)
    with torch.no_grad():
        x[1] = mu[2]
        x[3] = mu[2]
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend)
    assert torch.isfinite(out).all()
    ref = reference64(fk.reference.randers_logits, [x, mu, L, beta, lam, gamma])
    assert_rel_close(out, ref, 1e-5)
    # At a hit d = sqrt(eps) + lam·sqrt(eps), the smooth minimum.
    assert out[1, 2].item() == pytest.approx(-gamma.item() * (1 + lam.item()) * 1e-3, rel=1e-4)
    grads = torch.autograd.grad(out.sum(), [x, mu, L, beta, lam, gamma])
    assert all(torch.isfinite(g).all() for g in grads)
    # out.sum() hands the backward an expanded (stride 0) gradient.
    check_logits([x, mu, L, beta, lam, gamma], backend, grad=torch.ones(4, 6, dtype=torch.float64).expand(4, 6))


@FULL
def test_gradcheck_float64(backend, device, full):
    inputs = make_inputs(5, 7, 6, full=full, dtype=torch.float64, requires_grad=True, device=device)
    opts = _gradcheck_opts(backend)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend=backend), inputs, **opts)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_distance(*a, backend=backend), inputs[:5], **opts)


@pytest.mark.parametrize("tau", ["default", "all"])
def test_gradcheck_near_pairs_float64(monkeypatch, backend, device, tau):
    """A pair well inside the near threshold: the near-pair recompute's gradient is the derivative of
    its own output, with the default threshold and with tau = 1 (most pairs near pairs)."""
    if tau == "all":
        monkeypatch.setattr(fk.transform, "near_threshold", lambda D, dtype, operand_eps=None: 1.0)
    inputs = make_inputs(4, 5, 6, full=True, dtype=torch.float64, near=True, device=device)
    with torch.no_grad():
        inputs[0][1] = inputs[1][2] + 1e-7
    for t in inputs:
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend=backend), inputs,
                                    **_gradcheck_opts(backend))


@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")  # eps = 0, masked lanes
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"), indirect=True)
def test_python_float_scalars_and_eps(backend, device):
    x, mu, L, beta, _, _ = make_inputs(6, 9, 5, dtype=torch.float64, device=device)
    for eps in (0.0, 1e-6, 0.5):
        out = fk.randers_logits(x, mu, L, beta, 0.25, 3.0, eps=eps, backend=backend)
        assert_rel_close(out, fk.reference.randers_logits(x, mu, L, beta, 0.25, 3.0, eps), 1e-10)


@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"), indirect=True)
def test_non_contiguous_and_expanded_inputs(backend, device):
    x, mu, L, beta, lam, gamma = make_inputs(8, 12, 10, full=True, dtype=torch.float64, device=device)
    x_nc = torch.cat([x, x], dim=1)[:, ::2]            # strided view
    mu_t = mu.T.contiguous().T                          # transposed layout
    L_t = L.T.contiguous().T
    beta_nc = torch.stack([beta, beta], 1)[:, 0]
    x_exp = x[:1].expand(8, -1)                         # stride-0 rows
    for args in ([x_nc, mu_t, L_t, beta_nc], [x_exp, mu, L, beta]):
        out = fk.randers_logits(*args, lam, gamma, backend=backend)
        assert_rel_close(out, fk.reference.randers_logits(*[a.contiguous() for a in args], lam, gamma), 1e-10)


@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"), indirect=True)
def test_empty_batch_and_classes(backend, device):
    for B, C in ((0, 5), (4, 0), (0, 0)):
        x, mu, L, beta, lam, gamma = make_inputs(B, C, 3, requires_grad=True, device=device)
        out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend)
        assert out.shape == (B, C)
        grads = torch.autograd.grad(out.sum(), [x, mu, L, beta, lam, gamma], allow_unused=True)
        assert grads[0].shape == x.shape and grads[1].shape == mu.shape
        assert all(g is None or (g == 0).all() for g in grads)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", backends("cpp", "triton", "reference"), indirect=True)
def test_nan_inf_stay_in_their_rows_and_columns(backend, device):
    x, mu, L, beta, lam, gamma = make_inputs(6, 7, 5, dtype=torch.float64, device=device)
    x[2, 1] = float("nan")
    mu[4, 0] = float("inf")
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend=backend)
    bad = torch.zeros(6, 7, dtype=torch.bool, device=device)
    bad[2, :] = True
    bad[:, 4] = True
    assert not torch.isfinite(out[bad]).all()
    assert not torch.isfinite(out[2]).any() and not torch.isfinite(out[:, 4]).any()
    ref = fk.reference.randers_logits(x, mu, L, beta, lam, gamma)
    assert_rel_close(out[~bad], ref[~bad], 1e-10)


def test_deterministic(backend, device):
    kw = {"cpp": dict(B=530, C=300, D=20, seed=0), "triton": dict(B=23, C=40, D=20, near=True, seed=15)}[shape_key(backend)]
    inputs = make_inputs(kw.pop("B"), kw.pop("C"), kw.pop("D"), full=True, requires_grad=True, device=device, **kw)
    runs = []
    for _ in range(2):
        out = fk.randers_logits(*inputs, backend=backend)
        runs.append([out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_agrees_with_reference_same_dtype(backend, device):
    """Cross-backend agreement in float32: the fused kernels and the float32 einsum reference,
    forward and gradients, on a random problem with a full L (both far inside docs/design.md §2.1's bounds)."""
    inputs = make_inputs(19, 37, 12, full=True, seed=8, requires_grad=True, device=device)
    a = fk.randers_logits(*inputs, backend=backend)
    b = fk.randers_logits(*inputs, backend="reference")
    assert_rel_close(a, b, 1e-5)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(3)).to(device)
    for name, ga, gb in zip(NAMES, torch.autograd.grad(a, inputs, w), torch.autograd.grad(b, inputs, w)):
        assert_norm_close(ga, gb, 1e-5, f"d{name}")


@pytest.mark.parametrize("backend", backends("triton"), indirect=True)
def test_triton_agrees_with_cpp(backend, device):
    """The two fused backends agree on the same inputs (float32, full L), forward and gradients."""
    inputs = make_inputs(19, 37, 12, full=True, seed=8, requires_grad=True)
    a = fk.randers_logits(*inputs, backend="cpp")
    dev = [t.detach().to(device).requires_grad_() for t in inputs]
    b = fk.randers_logits(*dev, backend=backend)
    assert_rel_close(b.cpu(), a, 1e-5)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    for name, ga, gb in zip(NAMES, torch.autograd.grad(a, inputs, w), torch.autograd.grad(b, dev, w.to(device))):
        assert_norm_close(gb.cpu(), ga, 1e-5, f"d{name}")


@pytest.mark.parametrize("backend, where", [pytest.param("cpp", "cpu", id="cpu"),
                                            pytest.param("triton", "cuda", id="cuda", marks=pytest.mark.skipif(
                                                not HAS_CUDA, reason="needs a CUDA device"))])
def test_auto_backend(backend, where):
    assert fk.functional.resolve_backend("auto", torch.device(where)) == backend


# ---- the contract ops: opcheck, fake kernels, gradcheck on their own inputs, torch.compile ----

def _op_args(full, device, dtype=torch.float64, requires_grad=False):
    """The logits op's arguments (x, mu, lc, beta, lam, gamma, eps, tau) as the dispatch layer forms them."""
    from faim_kernels.transform import compute_dtype, metric_factor, near_threshold
    x, mu, L, beta, lam, gamma = make_inputs(7, 11, 5, full=full, dtype=dtype, device=device)
    acc = compute_dtype(dtype)
    args = [x, mu, metric_factor(L, 1e-6, acc), beta.to(acc), lam,
            gamma]
    if requires_grad:
        args = [a.detach().requires_grad_() for a in args]
    return (*args, 1e-6, near_threshold(5, acc))


@FULL
def test_opcheck(backend, device, full):
    fwd, bwd = contract_ops("logits", backend)
    args = _op_args(full, device, requires_grad=True)
    torch.library.opcheck(fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    logits, xp, mup, sx, smu = fwd(*plain)
    grad = torch.randn(7, 11, dtype=torch.float64, device=device)
    torch.library.opcheck(bwd, (grad, logits, *plain[:6], xp, mup, sx, smu, *plain[6:]))


@pytest.mark.parametrize("gamma, tau", [(2.0, 0.0), (0.0, 0.0), (2.0, 1.0)],
                         ids=["gamma2-tau0", "gamma0-tau0", "gamma2-tau1"])
@FULL
def test_op_gradcheck_against_its_own_inputs(backend, device, full, gamma, tau):
    """The closed-form backward, its chain rule to the raw inputs included, is the derivative of the
    op in (x, mu, lc, beta, λ, γ): with every pair through the GEMM expansion (tau = 0) and with
    every close pair recomputed from the raw difference (tau = 1). γ = 0 takes the backward's
    recomputed-tile branch (the logits carry no d there)."""
    x, mu, lc, beta, lam, _, eps, _ = _op_args(full, device, requires_grad=True)
    gamma = torch.tensor(gamma, dtype=torch.float64, device=device, requires_grad=True)
    op, _ = contract_ops("logits", backend)
    f = lambda *a: op(*a, eps, tau)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, mu, lc, beta, lam, gamma), **_gradcheck_opts(backend))


@pytest.mark.parametrize("backend, dtype", per_backend(cpp=[torch.float32], triton=[torch.float32, torch.bfloat16]),
                         indirect=["backend"])
def test_fake_kernels_match_real_outputs(backend, device, dtype):
    """The contract's fake kernels give the shapes and dtypes the kernels return (Triton takes half x
    as it is: x' and mu' come back in x's dtype, lc and beta stay float32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fwd, bwd = contract_ops("logits", backend)
    args = list(_op_args(True, device, dtype=torch.float32))
    args[0], args[1] = args[0].to(dtype), args[1].to(dtype)
    real = fwd(*args)
    real_grads = bwd(torch.ones_like(real[0]), real[0], *args[:6], *real[1:], *args[6:])
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        out = fwd(*fake)
        grads = bwd(torch.empty(7, 11, dtype=dtype, device=device), out[0], *fake[:6], *out[1:], *fake[6:])
    assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in real]
    assert out[0].shape == (7, 11) and out[0].dtype == dtype
    assert [(g.shape, g.dtype) for g in grads] == [(g.shape, g.dtype) for g in real_grads]
    assert [g.shape for g in grads] == [a.shape for a in fake[:4]] + [torch.Size([])] * 2


def _logits_fn(backend, device):
    """fk.randers_logits on `backend`, or under the interpreter the same schema, fake kernel and
    autograd formula around the Triton launchers (conftest.interpreted_contract_ops: the public call
    there runs an autograd.Function that Dynamo cannot trace into the interpreter)."""
    if backend != "triton" or device == "cuda":
        return lambda *a: fk.randers_logits(*a, backend=backend)
    from faim_kernels.transform import metric_factor, near_threshold
    op, _ = interpreted_contract_ops("logits")
    return lambda x, mu, L, beta, lam, gamma: op(x, mu, metric_factor(L, 1e-6, torch.float32), beta,
                                                 lam, gamma,
                                                 1e-6, near_threshold(x.shape[1], torch.float32))[0]


def test_torch_compile_fullgraph_matches_eager(backend, device):
    """The op under torch.compile(fullgraph=True) in a module with parameters: its fake kernel and
    autograd formula trace, and the compiled forward and gradients match eager."""
    torch._dynamo.reset()
    logits = _logits_fn(backend, device)

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            _, mu, L, beta, lam, gamma = make_inputs(1, 9, 6, full=True, device=device)
            self.mu, self.L, self.beta = torch.nn.Parameter(mu), torch.nn.Parameter(L), torch.nn.Parameter(beta)
            self.lam, self.gamma = torch.nn.Parameter(lam), torch.nn.Parameter(gamma)

        def forward(self, x):
            return logits(torch.tanh(x), self.mu, self.L, self.beta, self.lam, self.gamma)

    model = Head()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 6, device=device, requires_grad=True)
    params = [x, *model.parameters()]
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), params)
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), params)
    assert_rel_close(out, eager_out, 1e-6)
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g, e, 1e-5, "compiled gradient")


@pytest.mark.slow
def test_torch_compile_inductor(backend, device):
    torch._dynamo.reset()
    logits = _logits_fn(backend, device)
    x, mu, L, beta, lam, gamma = make_inputs(6, 10, 8, requires_grad=True, device=device)
    f = torch.compile(lambda x: logits(x * 2, mu, L, beta, lam, gamma).logsumexp(1), fullgraph=True)
    assert_rel_close(f(x), logits(x * 2, mu, L, beta, lam, gamma).logsumexp(1), 1e-5)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("threads", [1, 2])
def test_features_without_grad_fold_their_metric_half(full, dtype, threads):
    """Features without grad and a trainable metric (a linear probe): the C++ backward forms ∂Lc's
    x half from Pᵀ·(x − m), the ∂mu' side's GEMM, instead of the ∂x' GEMM (B > D, so a full L takes
    that route too). The gradients match the float64 reference on design §2.1's near-prototype case,
    and the same call with features that need grad, to the dtype's rounding; the same bits for 1 and
    2 threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = make_inputs(40, 23, 12, full=full, dtype=dtype, near=True, seed=4)
        w = torch.randn(40, 23, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

        def grads(requires, backend, cast=None):
            ins = [t.detach().clone().to(cast or t.dtype).requires_grad_(n in requires) for n, t in zip(NAMES, inputs)]
            out = fk.randers_logits(*ins, backend=backend)
            wanted = [t for t in ins if t.requires_grad]
            return dict(zip([n for n in NAMES if n in requires], torch.autograd.grad(out, wanted, w.to(out.dtype))))
        frozen = grads(set(NAMES) - {"x"}, "cpp")
        everything = grads(set(NAMES), "cpp")
        reference = grads(set(NAMES), "reference", torch.float64)
        tol = GRAD_TOL[dtype] if dtype == torch.float64 else 1e-5
        for name, g in frozen.items():
            assert_norm_close(g, everything[name], tol, name)
            assert_norm_close(g, reference[name], tol, name)
        again = grads(set(NAMES) - {"x"}, "cpp")
        assert all(torch.equal(again[n], frozen[n]) for n in frozen)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wanted", [("x", "mu", "L", "beta", "lam", "gamma"), ("x",), ("mu", "L", "beta"), ("beta",)],
                         ids=["all", "x", "probe", "beta"])
def test_row_passes_over_several_chunks(full, dtype, wanted):
    """The C++ row passes split x and mu into fixed chunks of rows (~16k elements: 128 rows at
    D = 128, csrc/randers_common.h rows_per_task) and add their partial sums in chunk order: the
    diagonal factor's preparation and backward tail run x's chunks and mu's chunks in one region.
    Here both sides span several chunks, one of them partial (B = 300: 3, C = 390: 4), on the near-
    prototype case: the forward and each subset of gradients match the float64 reference, and 1
    and 2 threads give the same bits."""
    inputs = make_inputs(300, 390, 128, full=full, dtype=dtype, near=True, seed=11)
    w = torch.randn(300, 390, generator=torch.Generator().manual_seed(12), dtype=torch.float64)

    def run(backend, cast=None):
        ins = [t.detach().clone().to(cast or t.dtype).requires_grad_(n in wanted) for n, t in zip(NAMES, inputs)]
        out = fk.randers_logits(*ins, backend=backend)
        grads = torch.autograd.grad(out, [t for t in ins if t.requires_grad], w.to(out.dtype))
        return out.detach(), dict(zip([n for n in NAMES if n in wanted], grads))

    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out1, grads1 = run("cpp")
        torch.set_num_threads(2)
        out2, grads2 = run("cpp")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(out1, out2)
    assert all(torch.equal(grads1[n], grads2[n]) for n in grads1)
    ref_out, ref_grads = run("reference", torch.float64)
    assert_rel_close(out2, ref_out, FWD_TOL[dtype] if dtype == torch.float64 else 1e-5, "logits")
    tol = GRAD_TOL[dtype] if dtype == torch.float64 else 1e-5
    for name, g in grads2.items():
        assert_norm_close(g, ref_grads[name], tol, name)
