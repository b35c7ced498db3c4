"""The fused cross-entropy's Triton kernels against F.cross_entropy over the float64 einsum
logits (the same checks as the C++ backend, test_cross_entropy.py), on CUDA tensors or, with
TRITON_INTERPRET=1, on CPU tensors through Triton's interpreter (small shapes: it is slow).
Every buffer the kernels must fill is poisoned with NaN first."""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import HAS_CUDA, INTERPRET, assert_rel_close, interpreted_contract_ops, make_inputs
from test_cross_entropy import check_cross_entropy, nearest_targets, random_targets

pytestmark = [pytest.mark.interpret,
              pytest.mark.skipif(not (INTERPRET or HAS_CUDA), reason="needs CUDA or TRITON_INTERPRET=1")]
DEVICE = "cuda" if HAS_CUDA and not INTERPRET else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    from faim_kernels.ops.triton import common

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(common, "_empty", nan_empty)


def _inputs(B, C, D, **kw):
    return make_inputs(B, C, D, device=DEVICE, **kw)


def _targets(B, C, **kw):
    return random_targets(B, C, **kw).to(DEVICE)


OPTIONS = [dict(margin=0.0, label_smoothing=0.0, reduction="mean"),
           dict(margin=0.7, label_smoothing=0.0, reduction="sum"),
           dict(margin=0.0, label_smoothing=0.15, reduction="none"),
           dict(margin=0.4, label_smoothing=0.2, reduction="mean")]


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: f"m{o['margin']}-ls{o['label_smoothing']}-{o['reduction']}")
def test_options_float64(opts, full):
    check_cross_entropy(_inputs(21, 45, 19, full=full, dtype=torch.float64, seed=4),
                        _targets(21, 45, seed=1, ignore_every=5), "triton", **opts)


# Shapes that do not divide the tiles (16 x 32 under the interpreter, 64 x 64 on the GPU), D
# across several chunks of the backward (64 under the interpreter), and the degenerate ones.
SHAPES = [(1, 1, 1), (3, 17, 5), (40, 70, 33), (17, 9, 70)]


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes_float32(shape, full):
    B, C, D = shape
    check_cross_entropy(_inputs(B, C, D, full=full, seed=sum(shape)), _targets(B, C, seed=2, ignore_every=7),
                        "triton", margin=0.3, label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_dtypes(dtype):
    check_cross_entropy(_inputs(13, 30, 16, dtype=dtype, seed=3), _targets(13, 30), "triton", margin=0.2)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_near_prototype_float32(full):
    """SPEC §2.1's hard case, each sample's own prototype as its target (see the C++ test)."""
    inputs = _inputs(10, 20, 48, full=full, near=True, gamma=0.05, seed=6)
    target = nearest_targets(inputs).to(DEVICE)
    check_cross_entropy(inputs, target, "triton", fwd_tol=1e-4, grad_tol=1e-3, reduction="none", margin=0.01)


@pytest.mark.parametrize("bwd_cap", [None, 1], ids=["noted", "inline"])
def test_near_pairs_noted_inline_and_chunked(monkeypatch, bwd_cap):
    """The shared backward kernel's paths for the cross-entropy: pairs at risk and targets noted and
    handled after the loop, or (cap 1: every program overflows) the INLINE second launch; narrow D
    chunks, so each row block spans several programs."""
    from faim_kernels.ops.triton import configs
    monkeypatch.setattr(configs, "BWD_BLOCK_D", {k: 16 for k in configs.BWD_BLOCK_D})
    if bwd_cap:
        monkeypatch.setattr(configs, "BWD_NEAR_CAP", bwd_cap)
    inputs = _inputs(10, 20, 40, full=True, near=True, gamma=0.05, seed=9)
    target = nearest_targets(inputs).to(DEVICE)
    check_cross_entropy(inputs, target, "triton", fwd_tol=1e-4, grad_tol=1e-3, reduction="none", margin=0.01)


def test_agrees_with_cpp():
    inputs = make_inputs(19, 37, 12, full=True, seed=8)
    target = random_targets(19, 37, ignore_every=6)
    opts = dict(margin=0.25, label_smoothing=0.1, reduction="none")
    a = fk.randers_cross_entropy(*inputs, target.to(DEVICE) if DEVICE == "cpu" else target, backend="cpp", **opts)
    b = fk.randers_cross_entropy(*[t.to(DEVICE) for t in inputs], target.to(DEVICE), backend="triton", **opts)
    assert_rel_close(b.cpu(), a, 1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_targets_ignored_and_empty(reduction):
    inputs = _inputs(6, 9, 4, dtype=torch.float64)
    check_cross_entropy(inputs, torch.full((6,), -100, device=DEVICE), "triton", reduction=reduction,
                        label_smoothing=0.3)
    empty_b = _inputs(0, 5, 3, requires_grad=True)
    out = fk.randers_cross_entropy(*empty_b, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction=reduction,
                                   backend="triton")
    out.nan_to_num(0.0).sum().backward()
    assert (empty_b[1].grad == 0).all()
    no_classes = _inputs(4, 0, 3, requires_grad=True)
    out = fk.randers_cross_entropy(*no_classes, torch.full((4,), -100, device=DEVICE), reduction=reduction,
                                   backend="triton")
    out.nan_to_num(0.0).sum().backward()
    assert (no_classes[0].grad == 0).all()


def test_nan_stays_in_its_row_and_deterministic():
    x, mu, L, beta, lam, gamma = _inputs(6, 10, 4, dtype=torch.float64)
    x[2, 1] = float("nan")
    target = _targets(6, 10)
    out = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none", backend="triton")
    ref = fk.reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none")
    assert out[2].isnan()
    keep = torch.arange(6, device=DEVICE) != 2
    assert_rel_close(out[keep], ref[keep], 1e-10)

    inputs = _inputs(20, 40, 8, requires_grad=True)
    target = _targets(20, 40)
    runs = []
    for _ in range(2):
        loss = fk.randers_cross_entropy(*inputs, target, label_smoothing=0.1, backend="triton")
        runs.append([loss] + list(torch.autograd.grad(loss, inputs)))
    for a, b in zip(*runs):
        assert torch.equal(a, b), "two runs differ"


def test_gradcheck_float64():
    x, mu, L, beta, lam, gamma = _inputs(4, 5, 3, full=True, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 4, -100, 3], device=DEVICE)
    f = lambda *a: fk.randers_cross_entropy(*a, target, margin=0.4, label_smoothing=0.2, reduction="sum",
                                            backend="triton")
    assert torch.autograd.gradcheck(f, (x, mu, L, beta, lam, gamma), fast_mode=True)  # the interpreter is slow


def test_opcheck_triton():
    """opcheck of the cross-entropy op pair: the registered ops on CUDA; under the interpreter the same
    schemas, fake kernels and autograd formula around the Triton launchers."""
    from faim_kernels.ops import contract
    if HAS_CUDA:
        from faim_kernels.ops import triton as tri
        tri.register()
        fwd, bwd = contract.cross_entropy_op, contract.cross_entropy_backward_op
    else:
        fwd, bwd = interpreted_contract_ops("cross_entropy")
    x, mu, L, beta, lam, gamma = _inputs(3, 5, 4, dtype=torch.float64)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float64)
    req = lambda t: t.detach().clone().requires_grad_()
    args = (req(x), req(mu), req(lc), req(beta), req(lam), req(gamma), torch.tensor([0, -1, 4], device=DEVICE),
            1e-6, 0.1, 0.3)
    torch.library.opcheck(fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    lse = fwd(*plain)[0]
    w = [torch.randn(3, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    torch.library.opcheck(bwd, (*w, lse) + plain)


def test_fake_kernels_match_real_outputs():
    """The contract's fake kernels give the shapes and dtypes the Triton launchers return."""
    from faim_kernels.ops import contract
    from faim_kernels.ops import triton as tri
    x, mu, L, beta, lam, gamma = _inputs(6, 9, 5, full=True)
    args = (x, mu, fk.transform.metric_factor(L, 1e-6, torch.float32), beta, lam.double(), gamma.double(),
            _targets(6, 9), 1e-6, 0.1, 0.2)
    real = tri.cross_entropy.forward(*args)
    w = [torch.randn(6, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    real_grads = tri.cross_entropy.backward(*w, real[0], *args)
    fake = contract._cross_entropy_fake(*args)
    fake_grads = contract._cross_entropy_backward_fake(*w, real[0], *args)
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    assert [(g.shape, g.dtype) for g in fake_grads] == [(g.shape, g.dtype) for g in real_grads]
