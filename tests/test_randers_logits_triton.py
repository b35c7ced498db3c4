"""The Triton logits kernels (backend="triton") against the float64 einsum oracle (SPEC §1-2.1, §4):
forward and closed-form backward on odd shapes, full and diagonal L, the near-prototype and
exact-hit cases, every dtype, the list overflow, many pairs at risk, the op registration.

Runs on a CUDA GPU, or on CPU tensors through Triton's interpreter (`make test` sets
TRITON_INTERPRET=1): shapes stay small so the interpreter stays quick. Every test runs with the
kernels' output buffers poisoned with NaN, so an entry a kernel fails to write shows up.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import faim_kernels as fk
from conftest import (FWD_TOL, GRAD_TOL, HAS_CUDA, INTERPRET, assert_norm_close, assert_rel_close,
                      interpreted_contract_ops, make_inputs, reference64)

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not HAS_TRITON or not (HAS_CUDA or INTERPRET),
                       reason="needs triton and a CUDA device, or TRITON_INTERPRET=1"),
]

DEVICE = "cuda" if HAS_CUDA else "cpu"
needs_interpreter = pytest.mark.skipif(HAS_CUDA or not INTERPRET, reason="checks the CPU/interpreter path")
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

if HAS_TRITON and (HAS_CUDA or INTERPRET):
    from faim_kernels.ops import contract
    from faim_kernels.ops import triton as tri
    from faim_kernels.ops.triton import common as tri_common
    from faim_kernels.ops.triton import configs as tri_configs


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    monkeypatch.setattr(tri_common, "_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                      device=device))


def _inputs(*shape, **kw):
    return make_inputs(*shape, device=DEVICE, **kw)


def _check(inputs, fn="logits", fwd_tol=None, grad_tol=None, seed=0, grad=None):
    """Forward within fwd_tol (every entry, relative) and the gradients of all inputs within
    grad_tol (relative norm) of autograd through the float64 einsum reference."""
    dtype = inputs[0].dtype
    fwd_tol = fwd_tol or FWD_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    if fn == "distance":
        inputs = inputs[:5]
    for t in inputs:
        t.requires_grad_()
    out = getattr(fk, "randers_" + fn)(*inputs, backend="triton")
    assert out.dtype == dtype and out.device.type == DEVICE
    ref = reference64(getattr(fk.reference, "randers_" + fn), inputs)
    assert_rel_close(out, ref, fwd_tol, "forward")
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(DEVICE)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(getattr(fk.reference, "randers_" + fn)(*ref_inputs), ref_inputs, grad)
    for name, g, w in zip(["x", "mu", "L", "beta", "lam", "gamma"], got, want):
        assert g.dtype == dtype, name
        assert_norm_close(g, w, grad_tol, f"d{name}")
    return out, got


# Odd sizes: none a multiple of the block sizes; (19, 40, 130) has D over one backward chunk on
# the interpreter's settings only when the chunk is narrowed (see test_backward_chunks_and_splits).
SHAPES = [(1, 1, 1), (5, 70, 17), (37, 45, 33), (19, 40, 130)]


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_random_float32(shape, full):
    _check(_inputs(*shape, full=full, seed=sum(shape)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_dtypes(dtype, full):
    _check(_inputs(29, 38, 21, full=full, dtype=dtype, seed=3))


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_distance(full):
    _check(_inputs(13, 21, 9, full=full, seed=5), fn="distance")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_near_prototype_float32(full):
    """SPEC §2.1's hard case: samples 1e-3 from prototypes offset by 5 with scale 10, D = 256,
    sample 0 exactly on prototype 0. Every pair within 1e-4, all six gradients within 1e-3."""
    _check(_inputs(32, 64, 256, full=full, near=True, lam=0.1, gamma=10.0, seed=11), fwd_tol=1e-4, grad_tol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_near_prototype_half(dtype):
    _check(_inputs(24, 40, 48, near=True, lam=0.1, gamma=10.0, dtype=dtype, seed=12))


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_exact_hit_and_expanded_gradient(full):
    x, mu, L, beta, lam, gamma = _inputs(4, 6, 8, full=full, requires_grad=True)
    with torch.no_grad():
        x[1] = mu[2]
        x[3] = mu[2]
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    ref = reference64(fk.reference.randers_logits, [x, mu, L, beta, lam, gamma])
    assert_rel_close(out, ref, 1e-5)
    # At a hit d = sqrt(eps) + lam·sqrt(eps), the smooth minimum.
    assert out[1, 2].item() == pytest.approx(-gamma.item() * (1 + lam.item()) * 1e-3, rel=1e-4)
    # out.sum() hands the backward an expanded (stride 0) gradient.
    _check([x, mu, L, beta, lam, gamma], grad=torch.ones(4, 6, dtype=torch.float64).expand(4, 6))


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_backward_chunks_and_splits(monkeypatch, full):
    """Narrow backward chunks: D is split over programs (each recomputing the GEMM tiles) and the
    other side over splits whose partial sums are added afterwards."""
    monkeypatch.setattr(tri_configs, "BWD_BLOCK_D", {k: 16 for k in tri_configs.BWD_BLOCK_D})
    _check(_inputs(23, 34, 33, full=full, seed=7))
    _check(_inputs(10, 36, 40, full=full, near=True, lam=0.1, gamma=10.0, seed=8), fwd_tol=1e-4, grad_tol=1e-3)


def test_near_list_overflow(monkeypatch):
    """More pairs at risk than the lists hold: the forward's fix-up recomputes every pair exactly,
    and the backward runs its second launch, which handles them inside the loop one at a time."""
    monkeypatch.setattr(tri_configs, "NEAR_CAPACITY", 3)
    monkeypatch.setattr(tri_configs, "BWD_NEAR_CAP", 2)
    for full in (False, True):
        _check(_inputs(20, 28, 24, full=full, near=True, lam=0.1, gamma=10.0, seed=9), fwd_tol=1e-4, grad_tol=1e-3)


def test_near_pairs_per_tile_overflow(monkeypatch):
    """A forward tile with more pairs at risk than it notes one by one marks the list overflowed."""
    monkeypatch.setattr(tri_configs, "NEAR_PER_TILE", 1)
    inputs = _inputs(12, 20, 16, near=True, lam=0.1, gamma=10.0, seed=17)
    with torch.no_grad():
        inputs[0][:4] = inputs[1][3] + 1e-3 * torch.randn(4, 16, device=DEVICE)  # four in one tile
    out = fk.randers_logits(*inputs, backend="triton")
    assert_rel_close(out, reference64(fk.reference.randers_logits, inputs), 1e-4)


@pytest.mark.parametrize("bwd_cap", [None, 4], ids=["noted", "inline"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_every_close_pair_recomputed(monkeypatch, full, bwd_cap):
    """tau = 1: about half of all pairs take the exact path, mixed with GEMM pairs in the same
    tiles: in the forward list, and in the backward's noted pairs or (small cap) inline path."""
    monkeypatch.setattr(fk.transform, "risk_threshold", lambda D, dtype, operand_eps=None: 1.0)
    if bwd_cap:
        monkeypatch.setattr(tri_configs, "BWD_NEAR_CAP", bwd_cap)
    _check(_inputs(9, 14, 12, full=full, seed=10))


# The interpreter runs each call in Python: there gradcheck checks random projections of the
# Jacobian (fast_mode) rather than every entry.
GRADCHECK = dict(fast_mode=INTERPRET and not HAS_CUDA)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_gradcheck_float64(full):
    inputs = _inputs(5, 7, 6, full=full, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend="triton"), inputs, **GRADCHECK)
    assert torch.autograd.gradcheck(lambda *a: fk.randers_distance(*a, backend="triton"), inputs[:5], **GRADCHECK)


def test_gradcheck_float64_exact_path(monkeypatch):
    """The exact path's gradient is the derivative of its own output (tau = 1: most pairs on it)."""
    monkeypatch.setattr(fk.transform, "risk_threshold", lambda D, dtype, operand_eps=None: 1.0)
    inputs = _inputs(4, 5, 6, full=True, dtype=torch.float64, near=True)
    with torch.no_grad():
        inputs[0][1] = inputs[1][2] + 1e-7
    for t in inputs:
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fk.randers_logits(*a, backend="triton"), inputs, **GRADCHECK)


def test_tf32_is_opt_in():
    """float32 GEMMs are IEEE by default; where PyTorch's matmuls may use TF32 the operands are
    rounded to TF32 (the result changes, within about 1e-3) and the pairs at risk stay exact."""
    inputs = _inputs(23, 31, 40, seed=13)
    ieee = fk.randers_logits(*inputs, backend="triton")
    ref = reference64(fk.reference.randers_logits, inputs)
    assert_rel_close(ieee, ref, 1e-5)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what lets PyTorch's own float32 matmuls use TF32
    try:
        tf32 = fk.randers_logits(*inputs, backend="triton")
        near = _inputs(16, 24, 64, near=True, lam=0.1, gamma=10.0, seed=14)
        near_out = fk.randers_logits(*near, backend="triton")
    finally:
        torch.set_float32_matmul_precision(before)
    assert not torch.equal(tf32, ieee)
    assert_rel_close(tf32, ref, 2e-3, "tf32 forward")
    out = near_out
    ref = reference64(fk.reference.randers_logits, near)
    rows = torch.arange(16, device=DEVICE)
    target = ref.argmax(1)  # each sample's own prototype, the pair at risk
    assert_rel_close(out[rows, target], ref[rows, target], 1e-4, "tf32 pairs at risk")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_nan_inf_stay_in_their_rows_and_columns():
    x, mu, L, beta, lam, gamma = _inputs(6, 7, 5, dtype=torch.float64)
    x[2, 1] = float("nan")
    mu[4, 0] = float("inf")
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    bad = torch.zeros(6, 7, dtype=torch.bool, device=DEVICE)
    bad[2, :] = True
    bad[:, 4] = True
    assert not torch.isfinite(out[2]).any() and not torch.isfinite(out[:, 4]).any()
    ref = fk.reference.randers_logits(x, mu, L, beta, lam, gamma)
    assert_rel_close(out[~bad], ref[~bad], 1e-10)


def test_empty_batch_and_classes():
    for B, C in ((0, 5), (4, 0), (0, 0)):
        x, mu, L, beta, lam, gamma = _inputs(B, C, 3, requires_grad=True)
        out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
        assert out.shape == (B, C)
        grads = torch.autograd.grad(out.sum(), [x, mu, L, beta, lam, gamma], allow_unused=True)
        assert grads[0].shape == x.shape and grads[1].shape == mu.shape
        assert all(g is None or (g == 0).all() for g in grads)


def test_deterministic():
    inputs = _inputs(23, 40, 20, full=True, near=True, seed=15, requires_grad=True)
    runs = []
    for _ in range(2):
        out = fk.randers_logits(*inputs, backend="triton")
        runs.append([out] + list(torch.autograd.grad(out, inputs, torch.ones_like(out))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def _op_args(full, dtype=torch.float64, requires_grad=False):
    """The logits op's arguments (x, mu, lc, beta, lam, gamma, eps, tau) as the dispatch layer forms them."""
    from faim_kernels.transform import as_scalar_tensor, compute_dtype, metric_factor, risk_threshold
    x, mu, L, beta, lam, gamma = _inputs(7, 11, 5, full=full, dtype=dtype)
    acc = compute_dtype(dtype)
    args = [x, mu, metric_factor(L, 1e-6, acc), beta.to(acc), as_scalar_tensor(lam, x.device),
            as_scalar_tensor(gamma, x.device)]
    if requires_grad:
        args = [a.detach().requires_grad_() for a in args]
    return (*args, 1e-6, risk_threshold(5, acc))


def _contract_ops():
    """(forward, backward): the registered ops on CUDA; under the interpreter the same schemas, fake
    kernels and autograd formula around the Triton launchers (conftest.interpreted_contract_ops)."""
    if HAS_CUDA:
        tri.register()
        return contract.logits_op, contract.logits_backward_op
    return interpreted_contract_ops("logits")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_opcheck(full):
    fwd, bwd = _contract_ops()
    args = _op_args(full, requires_grad=True)
    torch.library.opcheck(fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    logits, xp, mup, sx, smu = fwd(*plain)
    grad = torch.randn(7, 11, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(bwd, (grad, logits, *plain[:6], xp, mup, sx, smu, *plain[6:]))


@pytest.mark.parametrize("gamma", [2.0, 0.0], ids=["gamma2", "gamma0"])
def test_op_gradcheck_against_its_own_inputs(gamma):
    """The closed-form backward, its chain rule to the raw inputs included, is the derivative of the
    op in (x, mu, lc, beta, λ, γ). γ = 0 takes the backward's recomputed-tile branch (the logits
    carry no d there)."""
    x, mu, lc, beta, lam, _, eps, _ = _op_args(False, requires_grad=True)
    gamma = torch.tensor(gamma, dtype=torch.float64, device=DEVICE, requires_grad=True)
    op = contract.logits_op if HAS_CUDA else tri.interpreted_logits
    if HAS_CUDA:
        tri.register()
    # tau = 0: no pair is recomputed from the raw difference, so the op is its GEMM expansion only.
    f = lambda *a: op(*a, eps, 0.0)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, mu, lc, beta, lam, gamma), **GRADCHECK)


def test_fake_kernels_match_real_outputs():
    """The contract's fake kernels give the shapes and dtypes the Triton launchers return (half x
    included: x' and mu' come back in x's dtype, lc and beta stay float32)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    for dtype in (torch.float32, torch.bfloat16):
        args = list(_op_args(True, dtype=torch.float32))
        args[0], args[1] = args[0].to(dtype), args[1].to(dtype)
        real = tri.logits.forward(*args)
        bwd_args = (torch.ones_like(real[0]), real[0], *args[:6], *real[1:], *args[6:])
        real_grads = tri.logits.backward(*bwd_args)
        with FakeTensorMode() as mode:
            fake = lambda v: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
            out = contract._logits_fake(*map(fake, args))
            grads = contract._logits_backward_fake(*map(fake, bwd_args))
        assert [(t.shape, t.dtype) for t in out] == [(t.shape, t.dtype) for t in real]
        assert [(g.shape, g.dtype) for g in grads] == [(g.shape, g.dtype) for g in real_grads]


def test_agrees_with_reference_same_dtype():
    """Cross-backend agreement in float32: the Triton kernels and the float32 einsum reference, forward and
    gradients, on a random problem with a full L (both far inside SPEC §2.1's bounds)."""
    inputs = _inputs(19, 37, 12, full=True, seed=8, requires_grad=True)
    a = fk.randers_logits(*inputs, backend="triton")
    b = fk.randers_logits(*inputs, backend="reference")
    assert_rel_close(a, b, 1e-5)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for name, ga, gb in zip(["x", "mu", "L", "beta", "lam", "gamma"], torch.autograd.grad(a, inputs, w),
                            torch.autograd.grad(b, inputs, w)):
        assert_norm_close(ga, gb, 1e-5, f"d{name}")


def test_agrees_with_cpp():
    """The two fused backends agree (float32, full L), forward and gradients."""
    inputs = make_inputs(19, 37, 12, full=True, seed=8, requires_grad=True)
    a = fk.randers_logits(*inputs, backend="cpp")
    dev = [t.detach().to(DEVICE).requires_grad_() for t in inputs]
    b = fk.randers_logits(*dev, backend="triton")
    assert_rel_close(b.cpu(), a, 1e-5)
    w = torch.randn(a.shape, generator=torch.Generator().manual_seed(3))
    for name, ga, gb in zip(["x", "mu", "L", "beta", "lam", "gamma"], torch.autograd.grad(a, inputs, w),
                            torch.autograd.grad(b, dev, w.to(DEVICE))):
        assert_norm_close(gb.cpu(), ga, 1e-5, f"d{name}")


def test_torch_compile_fullgraph_matches_eager():
    """The op under torch.compile(fullgraph=True): its fake kernel and autograd formula trace, and the
    compiled forward and gradients match eager. On CUDA through fk.randers_logits (the registered op);
    under the interpreter through the same schema, fake kernel and formula around the Triton launchers
    (conftest.interpreted_contract_ops: the public call there runs an autograd.Function that Dynamo
    cannot trace into the interpreter)."""
    from faim_kernels.transform import as_scalar_tensor, metric_factor, risk_threshold
    torch._dynamo.reset()
    x, mu, L, beta, lam, gamma = _inputs(5, 9, 6, full=True, requires_grad=True)
    if HAS_CUDA:
        f = lambda x: fk.randers_logits(torch.tanh(x), mu, L, beta, lam, gamma, backend="triton")  # noqa: E731
    else:
        op, _ = interpreted_contract_ops("logits")
        tau = risk_threshold(6, torch.float32)
        f = lambda x: op(torch.tanh(x), mu, metric_factor(L, 1e-6, torch.float32), beta,  # noqa: E731
                         as_scalar_tensor(lam, x.device), as_scalar_tensor(gamma, x.device), 1e-6, tau)[0]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x)
    eager_grads = torch.autograd.grad(eager.square().sum(), [x, mu, L, beta, lam, gamma])
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, mu, L, beta, lam, gamma])
    assert_rel_close(out, eager, 1e-6)
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g, e, 1e-5, "compiled gradient")


@needs_interpreter
def test_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, faim_kernels as fk\n"
            "x, mu, L, beta = torch.randn(2, 3), torch.randn(4, 3), torch.rand(3), torch.randn(3)\n"
            "try:\n"
            "    fk.randers_logits(x, mu, L, beta, 0.1, 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "    print('clear error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "clear error" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
@needs_interpreter  # on a GPU the tests above build every kernel they run
def test_kernels_build_for_sm90():
    """The interpreter never runs Triton's compiler: build each code path for sm_90 (H100/H200)
    with the ptxas that ships with triton, no GPU needed (bench/compile_check.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "bench.compile_check", "--quick"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@gpu_only
def test_auto_backend_is_triton_on_cuda():
    assert fk.functional.resolve_backend("auto", torch.device("cuda")) == "triton"


@gpu_only
@pytest.mark.slow
def test_64bit_offsets():
    """B·C past 2³¹: offsets into the [B, C] output and the gradient need 64 bits."""
    B, C, D = 65_600, 32_800, 16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs about 20 GB of GPU memory")
    x, mu, L, beta, lam, gamma = _inputs(B, C, D, dtype=torch.bfloat16, seed=16)
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device=DEVICE)
    ref = reference64(fk.reference.randers_logits, [x[rows], mu, L, beta, lam, gamma])
    assert_rel_close(out[rows], ref, FWD_TOL[torch.bfloat16], "rows of a [B, C] past 2^31")
    del out
    x.requires_grad_()
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    assert torch.isfinite(gx).all()
