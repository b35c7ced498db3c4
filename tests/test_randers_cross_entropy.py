"""The fused cross-entropy family (docs/design.md §2.2, the fused cross-entropy) on every backend against F.cross_entropy over the
float64 einsum logits: value and the six gradients, every option, edge cases, cross-backend
agreement, the contract ops (opcheck, the statistics they return, fake kernels, torch.compile), and
the memory it saves.

The backend is a fixture (conftest.py): "cpp", and "triton" on a CUDA device or on CPU tensors
through Triton's interpreter (small shapes there: it is slow), its output buffers poisoned with NaN.
"""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import pytest
import torch

import faim_kernels as fk
from conftest import (assert_device_assert_in_subprocess, assert_norm_close, assert_rel_close, backends,
                      check_cross_entropy, contract_ops, interpreted_contract_ops, make_inputs, nearest_targets,
                      per_backend, random_targets, shape_key)
from faim_kernels.ops import row_stats as ce_ops

FULL = pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])


def _options(margins, smoothings, reductions, ignores):
    return [dict(margin=m, label_smoothing=ls, reduction=r, ignore=ig)
            for m, ls, r, ig in itertools.product(margins, smoothings, reductions, ignores)]


def _opts_id(o):
    return f"m{o['margin']}-ls{o['label_smoothing']}-{o['reduction']}" + ("-ign" if o["ignore"] else "")


# Every combination on C++; four that cover each option on the interpreter.
OPTIONS = per_backend(
    _opts_id,
    cpp=_options([0.0, 0.7], [0.0, 0.15], ["mean", "sum", "none"], [False, True]),
    triton=[dict(margin=0.0, label_smoothing=0.0, reduction="mean", ignore=True),
            dict(margin=0.7, label_smoothing=0.0, reduction="sum", ignore=True),
            dict(margin=0.0, label_smoothing=0.15, reduction="none", ignore=True),
            dict(margin=0.4, label_smoothing=0.2, reduction="mean", ignore=True)],
)


@FULL
@pytest.mark.parametrize("backend, opts", OPTIONS, indirect=["backend"])
def test_options_float64(backend, device, opts, full):
    B, C = {"cpp": (37, 600), "triton": (21, 45)}[shape_key(backend)]
    opts = dict(opts)
    inputs = make_inputs(B, C, 19, full=full, dtype=torch.float64, seed=4, device=device)
    target = random_targets(B, C, seed=1, ignore_every=5 if opts.pop("ignore") else 0, device=device)
    check_cross_entropy(inputs, target, backend, **opts)


# Shapes that do not divide the tiles (C++: 256 classes, a row block of 1024; Triton: 16 x 32 under
# the interpreter, 64 x 64 on the GPU, D over several backward chunks of 64), and the degenerate ones.
SHAPES = per_backend(cpp=[(1, 1, 1), (3, 17, 5), (64, 257, 17), (5, 2000, 8), (1030, 30, 4)],
                     triton=[(1, 1, 1), (3, 17, 5), (40, 70, 33), (17, 9, 70)])


@FULL
@pytest.mark.parametrize("backend, shape", SHAPES, indirect=["backend"])
def test_shapes_float32(backend, device, shape, full):
    B, C, D = shape
    check_cross_entropy(make_inputs(B, C, D, full=full, seed=sum(shape), device=device),
                        random_targets(B, C, seed=2, ignore_every=7, device=device), backend, margin=0.3,
                        label_smoothing=0.1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(backend, device, dtype):
    B, C, D = {"cpp": (37, 70, 24), "triton": (13, 30, 16)}[shape_key(backend)]
    check_cross_entropy(make_inputs(B, C, D, dtype=dtype, seed=3, device=device),
                        random_targets(B, C, device=device), backend, margin=0.2, label_smoothing=0.05)


@FULL
def test_near_prototype_float32(backend, device, full):
    """docs/design.md §2.1's hard case with each sample's own prototype as its target: the target pair
    (1e-3 away, sample 0 exactly on it) carries the loss and the gradient. gamma = 0.05 keeps the
    other classes in play. Goals: loss within 1e-4, all six gradients within 1e-3."""
    B, C, D = {"cpp": (24, 64, 256), "triton": (10, 20, 48)}[shape_key(backend)]
    inputs = make_inputs(B, C, D, full=full, near=True, gamma=0.05, seed=6, device=device)
    target = nearest_targets(inputs).to(device)
    for reduction in ("mean", "none"):
        check_cross_entropy(inputs, target, backend, fwd_tol=1e-4, grad_tol=1e-3, reduction=reduction, margin=0.01)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_targets_ignored(backend, device, reduction, label_smoothing):
    """As F.cross_entropy: 'mean' is NaN (0/0), 'sum' is 0, 'none' is zeros; gradients are zero."""
    inputs = make_inputs(6, 9, 4, dtype=torch.float64, device=device)
    target = torch.full((6,), -100, device=device)
    check_cross_entropy(inputs, target, backend, reduction=reduction, label_smoothing=label_smoothing)
    out = fk.randers_cross_entropy(*inputs, target, reduction=reduction, backend=backend)
    assert out.isnan().all() if reduction == "mean" else (out == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_and_classes(backend, device, reduction):
    """B = 0: 'mean' is NaN, 'sum' is 0, zero gradients; C = 0 (every target ignored): 'sum' is 0,
    'none' is zeros of shape [B], zero gradients."""
    empty_b = make_inputs(0, 5, 3, requires_grad=True, device=device)
    out = fk.randers_cross_entropy(*empty_b, torch.zeros(0, dtype=torch.long, device=device), reduction=reduction,
                                   backend=backend)
    if reduction != "none":
        assert out.shape == () and (out.isnan() if reduction == "mean" else out == 0)
    out.nan_to_num(0.0).sum().backward()
    assert empty_b[1].grad.shape == (5, 3) and (empty_b[1].grad == 0).all()
    no_classes = make_inputs(4, 0, 3, requires_grad=True, device=device)
    out = fk.randers_cross_entropy(*no_classes, torch.full((4,), -100, device=device), reduction=reduction,
                                   backend=backend)
    if reduction == "sum":
        assert out == 0
    if reduction == "none":
        assert out.shape == (4,) and (out == 0).all()
    out.nan_to_num(0.0).sum().backward()
    assert (no_classes[0].grad == 0).all()


def test_int32_target(backend, device):
    inputs = make_inputs(8, 5, 3, dtype=torch.float64, device=device)
    check_cross_entropy(inputs, random_targets(8, 5, device=device).to(torch.int32), backend)


def test_ignore_index_inside_class_range(backend, device):
    inputs = make_inputs(12, 9, 4, dtype=torch.float64, device=device)
    target = random_targets(12, 9, seed=3, device=device)
    target[:4] = 2
    check_cross_entropy(inputs, target, backend, ignore_index=2, label_smoothing=0.2, margin=0.5)


def test_noncontiguous_and_expanded_inputs(backend, device):
    x, mu, L, beta, lam, gamma = make_inputs(9, 13, 6, full=True, dtype=torch.float64, device=device)
    x_t = x.T.contiguous().T  # column-major
    mu_s = torch.stack([mu, -mu], dim=2)[..., 0]  # row stride 12, column stride 2
    target = random_targets(9, 13, device=device)
    check_cross_entropy([x_t, mu_s, L, beta, lam, gamma], target, backend, label_smoothing=0.1)
    L_exp = torch.tensor([0.7], dtype=torch.float64, device=device).expand(6)  # stride 0
    check_cross_entropy([x, mu, L_exp, beta.expand(6), lam, gamma], target, backend, margin=0.2)


def test_nan_stays_in_its_row(backend, device):
    x, mu, L, beta, lam, gamma = make_inputs(6, 10, 4, dtype=torch.float64, device=device)
    x[2, 1] = float("nan")
    target = random_targets(6, 10, device=device)
    out = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none", backend=backend)
    ref = fk.reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none")
    assert out[2].isnan() and ref[2].isnan()
    keep = torch.arange(6, device=device) != 2
    assert_rel_close(out[keep], ref[keep], 1e-10)


@FULL
def test_float32_exponent_limits(backend, device, full):
    """float32's exponentials (the C++ kernels' vectorised exp_nonpositive, bit masks for its
    limits): a large γ spreads each row's logits over hundreds of units, so most softmax terms lie
    below e^−80 (flushed to 0) while the loss and all six gradients stay within float32 tolerance of
    the float64 reference; then a NaN feature makes its own row's loss NaN and no other row's."""
    x, mu, L, beta, lam, _ = make_inputs(12, 37, 5, full=full, dtype=torch.float64, device=device, seed=3)
    gamma = torch.tensor(60.0, dtype=torch.float64, device=device)
    target = random_targets(12, 37, seed=3, device=device)
    logits = fk.reference.randers_logits(x, mu, L, beta, lam, gamma)
    assert (logits.max(dim=1).values - logits.min(dim=1).values > 200).all(), "softmax terms below e^-80"
    inputs32 = [t.float().requires_grad_() for t in (x, mu, L, beta, lam, gamma)]
    inputs64 = [t.clone().requires_grad_() for t in (x, mu, L, beta, lam, gamma)]
    out = fk.randers_cross_entropy(*inputs32, target, reduction="none", backend=backend)
    ref = fk.reference.randers_cross_entropy(*inputs64, target, reduction="none")
    assert_rel_close(out, ref, 1e-4, "loss")
    out.sum().backward()
    ref.sum().backward()
    for name, a, b in zip(("x", "mu", "L", "beta", "lam", "gamma"), inputs32, inputs64):
        assert_norm_close(a.grad, b.grad, 1e-3, f"d/d{name}")
    x[4, 2] = float("nan")
    out = fk.randers_cross_entropy(*[t.float() for t in (x, mu, L, beta, lam, gamma)], target, reduction="none",
                                   backend=backend)
    ref = fk.reference.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, reduction="none")
    assert out[4].isnan() and ref[4].isnan()
    keep = torch.arange(12, device=device) != 4
    assert_rel_close(out[keep], ref[keep], 1e-4, "loss beside the NaN row")


def test_python_float_lam_gamma_and_deterministic(backend, device):
    """Two runs give the same loss and gradients to the bit, with λ, γ as Python floats and as
    tensors (then their gradients too); the loss matches the float64 reference within 1e-5."""
    B, C = {"cpp": (40, 3000), "triton": (20, 40)}[shape_key(backend)]
    x, mu, L, beta, lam, gamma = make_inputs(B, C, 8, requires_grad=True, device=device)
    target = random_targets(B, C, device=device)
    for scalars in ((0.2, 3.0), (lam, gamma)):
        leaves = [x, mu, L, beta] + [s for s in scalars if isinstance(s, torch.Tensor)]
        runs = []
        for _ in range(2):
            loss = fk.randers_cross_entropy(x, mu, L, beta, *scalars, target, label_smoothing=0.1, backend=backend)
            runs.append([loss] + list(torch.autograd.grad(loss, leaves)))
        for a, b in zip(*runs):
            assert torch.equal(a, b), "two runs differ"
        ref = fk.reference.randers_cross_entropy(*[t.detach().double() for t in (x, mu, L, beta)],
                                                 *[s.detach().double() if isinstance(s, torch.Tensor) else s
                                                   for s in scalars], target, label_smoothing=0.1)
        assert_rel_close(runs[0][0], ref, 1e-5)


def test_gradcheck_float64(backend, device):
    B, C, reductions = {"cpp": (5, 7, ("sum", "none")), "triton": (4, 5, ("sum",))}[shape_key(backend)]
    x, mu, L, beta, lam, gamma = make_inputs(B, C, 3, full=True, dtype=torch.float64, requires_grad=True,
                                             device=device)
    target = torch.tensor([0, C - 1, -100, 3, 3][:B], device=device)
    for reduction in reductions:
        f = lambda *a: fk.randers_cross_entropy(*a, target, margin=0.4, label_smoothing=0.2,  # noqa: E731
                                                reduction=reduction, backend=backend)
        # The interpreter is slow: random projections of the Jacobian there.
        assert torch.autograd.gradcheck(f, (x, mu, L, beta, lam, gamma), fast_mode=backend == "triton")


def test_validation(backend, device):
    args = make_inputs(4, 5, 3, device=device)
    target = random_targets(4, 5, device=device)
    with pytest.raises(TypeError, match="margin"):
        fk.randers_cross_entropy(*args, target, margin="0.1", backend=backend)
    with pytest.raises(ValueError, match="label_smoothing"):
        fk.randers_cross_entropy(*args, target, label_smoothing=1.5, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        fk.randers_cross_entropy(*args, target, reduction="avg", backend=backend)
    if device == "cuda":  # a device assert there: checked in a fresh process (it ends the CUDA context)
        assert_device_assert_in_subprocess("""
            args = make_inputs(4, 5, 3, device="cuda")
            fk.randers_cross_entropy(*args, torch.tensor([0, 1, 5, 2], device="cuda"), backend="triton")""")
    else:
        with pytest.raises(ValueError, match="out of range"):
            fk.randers_cross_entropy(*args, torch.tensor([0, 1, 5, 2], device=device), backend=backend)
    with pytest.raises(TypeError, match="target"):
        fk.randers_cross_entropy(*args, target.float(), backend=backend)


@pytest.mark.parametrize("backend", backends("triton"), indirect=True)
def test_triton_agrees_with_cpp(backend, device):
    inputs = make_inputs(19, 37, 12, full=True, seed=8)
    target = random_targets(19, 37, ignore_every=6)
    opts = dict(margin=0.25, label_smoothing=0.1, reduction="none")
    a = fk.randers_cross_entropy(*inputs, target, backend="cpp", **opts)
    b = fk.randers_cross_entropy(*[t.to(device) for t in inputs], target.to(device), backend=backend, **opts)
    assert_rel_close(b.cpu(), a, 1e-5)


# ---- the contract ops ----

def _op_args(full, device, B=7, C=11, D=5, dtype=torch.float64):
    """The op's arguments (x, mu, lc, beta, lam, gamma, target, eps, tau, margin), as leaves."""
    x, mu, L, beta, lam, gamma = make_inputs(B, C, D, full=full, dtype=dtype, device=device)
    lc = fk.transform.metric_factor(L, 1e-6, dtype)
    target = torch.tensor([0, 3, -1, 10, 10, 2, 5], device=device)[:B]
    req = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    return (req(x), req(mu), req(lc), req(beta), req(lam.double()), req(gamma.double()), target, 1e-6, 0.1, 0.3)


@FULL
def test_opcheck(backend, device, full):
    fwd, bwd = contract_ops("cross_entropy", backend)
    B, C, D = {"cpp": (7, 11, 5), "triton": (3, 5, 4)}[shape_key(backend)]
    args = _op_args(full, device, B, C, D)
    if backend == "triton":
        args = args[:6] + (torch.tensor([0, -1, 4], device=device),) + args[7:]
    torch.library.opcheck(fwd, args)
    plain = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    lse = fwd(*plain)[0].detach()
    w = [torch.randn(B, dtype=torch.float64, device=device) for _ in range(3)]
    torch.library.opcheck(bwd, (*w, lse) + plain)
    # the options: k = 2 targets per row, class weights, a dense target through its strides
    C = args[1].shape[0]
    pairs = torch.stack([args[6].clamp_min(0), torch.arange(B, device=device) % C], dim=1)
    pairs[1, 0] = -1
    cw = torch.rand(C, dtype=torch.float64, device=device)
    soft = torch.rand(C, B, dtype=torch.float64, device=device).t()
    opt_args = plain[:6] + (pairs,) + plain[7:9] + (0.0, cw, soft)
    torch.library.opcheck(fwd, args[:6] + opt_args[6:])
    w_target_logit = torch.randn(B, 2, dtype=torch.float64, device=device)
    torch.library.opcheck(bwd, (w[0], w_target_logit, w[2], lse) + opt_args[:10] + (w[1], cw, soft))


def test_op_statistics_against_reference(backend, device):
    """The op's contract: lse, the target logit (0 where no target here), Σ logits and 0 for pl
    (no dense target) per row."""
    fwd, _ = contract_ops("cross_entropy", backend)
    args = _op_args(True, device)
    x, mu, lc, beta, lam, gamma, target, eps, tau, margin = args
    got = fwd(*args)
    inputs = make_inputs(7, 11, 5, full=True, dtype=torch.float64, device=device)
    want = ce_ops.reference_stats(*inputs, target, eps, margin)
    for name, g, w in zip(["lse", "target_logit", "sl"], got, want):
        assert g.dtype == torch.float64
        assert_rel_close(g, w, 1e-12, name)
    assert got[1][2] == 0
    assert (got[3] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_fake_kernels_match_real_outputs(backend, device, dtype):
    """The contract's fake kernels give the shapes and dtypes the kernels return: four float64
    statistics of shape [B], gradients shaped as (x, mu, lc, beta) and two scalars."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    fwd, bwd = contract_ops("cross_entropy", backend)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in _op_args(True, device, dtype=dtype))
    real = fwd(*args)
    w = [torch.randn(7, dtype=torch.float64, device=device) for _ in range(3)]
    real_grads = bwd(*w, real[0], *args)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        stats = fwd(*fake)
        grads = bwd(stats[0], stats[1], stats[2], stats[0], *fake)
    assert [tuple(s.shape) for s in stats] == [(7,)] * 4 and all(s.dtype == torch.float64 for s in stats)
    assert [(t.shape, t.dtype) for t in stats] == [(t.shape, t.dtype) for t in real]
    assert [g.shape for g in grads] == [a.shape for a in fake[:4]] + [torch.Size([])] * 2
    assert [(g.shape, g.dtype) for g in grads] == [(g.shape, g.dtype) for g in real_grads]


def _cross_entropy_fn(backend, device):
    """fk.randers_cross_entropy on `backend`, or under the interpreter the same loss over the
    statistics of the contract op around the Triton launchers (conftest.interpreted_contract_ops)."""
    if backend != "triton" or device == "cuda":
        return lambda *a, **kw: fk.randers_cross_entropy(*a, backend=backend, **kw)
    from faim_kernels.transform import metric_factor, near_threshold
    op, _ = interpreted_contract_ops("cross_entropy")

    def loss(x, mu, L, beta, lam, gamma, target, margin, label_smoothing):
        rows = ce_ops.loss_targets(target, mu.shape[0], -100, label_smoothing, None)
        stats = op(x, mu, metric_factor(L, 1e-6, torch.float32), beta, lam,
                   gamma, rows.kernel_target, 1e-6,
                   near_threshold(x.shape[1], torch.float32), margin)
        return ce_ops.loss_from_stats(*stats, rows, "mean", x.dtype)
    return loss


def test_torch_compile_fullgraph_matches_eager(backend, device):
    torch._dynamo.reset()
    loss = _cross_entropy_fn(backend, device)
    x, mu, L, beta, lam, gamma = make_inputs(6, 9, 5, full=True, requires_grad=True, device=device)
    target = random_targets(6, 9, ignore_every=4, device=device)

    def f(x, mu):
        return loss(torch.tanh(x), mu, L, beta, lam, gamma, target, margin=0.1, label_smoothing=0.1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, mu)
    got = compiled(x, mu)
    assert_rel_close(got, eager, 1e-6)
    for g, e in zip(torch.autograd.grad(got, [x, mu, L, gamma]), torch.autograd.grad(eager, [x, mu, L, gamma])):
        if backend == "torch":
            # Compiled, backend="torch" runs its static form (autograd through plain ops) where eager runs
            # the closed form: two float32 evaluations of one formula, whose small entries differ by a
            # few 1e-5 (each within the float32 bounds of the float64 reference: the family tests).
            assert_norm_close(g, e, 1e-5, "compiled gradient")
        else:
            assert_rel_close(g, e, 1e-5, "compiled gradient")


# The memory probes run in a fresh process: the problem (B = 256, C = 200,000, D = 128) and, after
# each probe's own fwd_bwd, the measurement against one [B, C] float32 matrix.
_PROBE_INPUTS = textwrap.dedent("""
    import json, torch, faim_kernels as fk
    from bench.measure import host_peak_bytes
    B, C, D = 256, 200_000, 128
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(B, D, generator=g), torch.randn(C, D, generator=g), 0.5 + torch.rand(D, generator=g),
              torch.randn(D, generator=g) / D ** 0.5, torch.tensor(0.1), torch.tensor(10.0)]
    for t in inputs:
        t.requires_grad_()
""")
_PROBE_MEASURE = textwrap.dedent("""
    fused = host_peak_bytes(fwd_bwd)
    grads = sum(t.grad.numel() * t.grad.element_size() for t in inputs)
    logits = host_peak_bytes(lambda: torch.ones(B, C))  # the probe must see a [B, C] float32 matrix
    print(json.dumps({"fused": fused, "grads": grads, "logits": logits}))
""")


def _assert_far_below_one_logits_matrix(probe: str) -> None:
    """Runs a memory probe in a fresh process: it must see one [B, C] float32 matrix (B = 256,
    C = 200,000), and the fused forward+backward's extra memory beyond the gradients must stay
    below an eighth of it."""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    one_logits = 256 * 200_000 * 4
    assert m["logits"] >= 0.95 * one_logits, f"the probe missed a [B, C] matrix: {m}"
    extra = m["fused"] - m["grads"]
    assert extra < one_logits / 8, f"extra memory {extra / 1e6:.1f} MB, one [B, C] matrix {one_logits / 1e6:.1f} MB"


_MEMORY_PROBE = _PROBE_INPUTS + textwrap.dedent("""
    target = torch.randint(0, C, (B,), generator=g)
    small = [t[:3].detach().clone().requires_grad_() if t.dim() == 2 else t for t in inputs]
    fk.randers_cross_entropy(*small, target[:3] % 3, backend="cpp").backward()  # first-call allocations
    for t in inputs:
        t.grad = None

    def fwd_bwd():
        fk.randers_cross_entropy(*inputs, target, label_smoothing=0.1, margin=0.1, backend="cpp").backward()

""") + _PROBE_MEASURE


def test_memory_far_below_one_logits_matrix():
    """C++ on CPU, B = 256, D = 128, C = 200,000: the forward+backward's peak resident memory beyond
    the inputs and their gradients, measured in a fresh process (VmHWM after resetting it, see
    bench/measure.py), stays far below one [B, C] float32 matrix (204.8 MB)."""
    _assert_far_below_one_logits_matrix(_MEMORY_PROBE)


# ---- the options of F.cross_entropy: class weights, probability targets, z-loss, the logsumexp ----

def _target_of(form, B, C, device, seed=0, ignore=False):
    """Class indices (every third row ignored with `ignore`), a dense [B, C] probability target, or
    SoftTargets: k = 3 pairs per row with a repeated class, a zero-probability pad, and timm's
    smoothing on top."""
    g = torch.Generator().manual_seed(seed)
    if form == "index":
        return random_targets(B, C, seed=seed, ignore_every=3 if ignore else 0, device=device)
    if form == "dense":
        return torch.softmax(2 * torch.randn(B, C, generator=g, dtype=torch.float64), dim=1).to(device)
    classes = torch.randint(0, C, (B, 3), generator=g)
    classes[0, 1] = classes[0, 0]  # a class twice in one row: their probabilities add up
    probs = torch.rand(B, 3, generator=g, dtype=torch.float64)
    probs[1, 2] = 0.0  # padding
    probs = probs / probs.sum(dim=1, keepdim=True)
    return fk.SoftTargets(classes.to(device), probs.to(device), smoothing=0.05)


def _option_cases(forms, weights, smoothings, reductions, ignores):
    cases = []
    for form, w, ls, red, ig in itertools.product(forms, weights, smoothings, reductions, ignores):
        if ig and form != "index":  # ignore_index applies to class indices only
            continue
        cases.append(dict(form=form, weighted=w, label_smoothing=ls, reduction=red, ignore=ig))
    return cases


def _case_id(c):
    return (f"{c['form']}-{'w' if c['weighted'] else 'now'}-ls{c['label_smoothing']}-{c['reduction']}"
            + ("-ign" if c["ignore"] else ""))


# Every combination of weight x smoothing x ignore_index x reduction x target form on C++; on the
# interpreter a covering subset (each form with and without weights, each reduction, smoothing).
WEIGHT_CASES = per_backend(
    _case_id,
    cpp=_option_cases(["index", "dense", "pairs"], [False, True], [0.0, 0.2], ["mean", "sum", "none"],
                      [False, True]),
    triton=[dict(form="index", weighted=True, label_smoothing=0.2, reduction="mean", ignore=True),
            dict(form="index", weighted=True, label_smoothing=0.0, reduction="none", ignore=True),
            dict(form="dense", weighted=True, label_smoothing=0.1, reduction="sum", ignore=False),
            dict(form="dense", weighted=False, label_smoothing=0.0, reduction="mean", ignore=False),
            dict(form="pairs", weighted=True, label_smoothing=0.2, reduction="none", ignore=False),
            dict(form="pairs", weighted=False, label_smoothing=0.0, reduction="mean", ignore=False)],
)


@pytest.mark.parametrize("backend, case", WEIGHT_CASES, indirect=["backend"])
def test_weights_smoothing_and_target_forms_float64(backend, device, case):
    """fk.randers_cross_entropy equals F.cross_entropy(logits, target, weight=..., label_smoothing=...,
    ignore_index=..., reduction=...) in float64, value and gradients, for class indices, dense
    probabilities and the compact SoftTargets (F.cross_entropy gets them made dense)."""
    B, C, D = {"cpp": (23, 300, 7), "triton": (11, 37, 6)}[shape_key(backend)]
    inputs = make_inputs(B, C, D, full=True, dtype=torch.float64, seed=11, device=device)
    target = _target_of(case["form"], B, C, device, seed=5, ignore=case["ignore"])
    weight = (0.1 + torch.rand(C, generator=torch.Generator().manual_seed(9), dtype=torch.float64)).to(device)
    check_cross_entropy(inputs, target, backend, weight=weight if case["weighted"] else None,
                        label_smoothing=case["label_smoothing"], reduction=case["reduction"])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("form", ["index", "dense", "pairs"])
def test_z_loss_and_returned_lse(backend, device, form, reduction):
    """lse_square_scale adds s·lse² per counted row ('mean': over those rows, unweighted, as
    Liger-Kernel) and return_lse returns logsumexp(logits') [B]; both differentiable. With margin
    on class indices, the lse is that of the margin logits."""
    B, C, D = {"cpp": (17, 40, 5), "triton": (9, 21, 4)}[shape_key(backend)]
    inputs = make_inputs(B, C, D, dtype=torch.float64, seed=12, device=device)
    target = _target_of(form, B, C, device, seed=6, ignore=True)
    weight = (0.5 + torch.rand(C, generator=torch.Generator().manual_seed(2), dtype=torch.float64)).to(device)
    margin = 0.3 if form == "index" else 0.0
    check_cross_entropy(inputs, target, backend, weight=weight, label_smoothing=0.1, reduction=reduction,
                        margin=margin, lse_square_scale=1e-2, return_lse=True)


def test_dense_target_read_through_its_strides(backend, device):
    """A transposed (column-major) and a column-sliced probability target give what their contiguous
    copies give: the kernels read the user's tensor in place through its strides."""
    B, C, D = {"cpp": (13, 50, 5), "triton": (7, 19, 4)}[shape_key(backend)]
    inputs = make_inputs(B, C, D, dtype=torch.float64, seed=13, device=device)
    dense = _target_of("dense", B, C, device, seed=7)
    column_major = dense.t().contiguous().t()
    wide = torch.zeros(B, C + 6, dtype=torch.float64, device=device)
    wide[:, 3:3 + C] = dense
    for view in (column_major, wide[:, 3:3 + C]):
        assert not view.is_contiguous()
        check_cross_entropy(inputs, view, backend, label_smoothing=0.1, reduction="none")


def test_gradcheck_options_float64(backend, device):
    """gradcheck through the weighted, smoothed loss with each target form, the z-loss and the lse."""
    B, C = {"cpp": (5, 7), "triton": (4, 5)}[shape_key(backend)]
    x, mu, L, beta, lam, gamma = make_inputs(B, C, 3, full=True, dtype=torch.float64, requires_grad=True,
                                             device=device)
    weight = (0.5 + torch.rand(C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)).to(device)
    forms = ("index", "dense", "pairs") if backend == "cpp" else ("pairs",)
    for form in forms:
        target = _target_of(form, B, C, device, seed=8, ignore=True)

        def f(*a):
            loss, lse = fk.randers_cross_entropy(*a, target, weight=weight, label_smoothing=0.2, reduction="sum",
                                                 lse_square_scale=0.05, return_lse=True, backend=backend)
            return loss, lse
        assert torch.autograd.gradcheck(f, (x, mu, L, beta, lam, gamma), fast_mode=backend == "triton")


def test_option_validation(backend, device):
    args = make_inputs(4, 5, 3, device=device)
    target = random_targets(4, 5, device=device)
    dense = torch.full((4, 5), 0.2, device=device)
    pairs = fk.SoftTargets(torch.zeros(4, 2, dtype=torch.long, device=device), torch.ones(4, 2, device=device))
    with pytest.raises(ValueError, match="weight must have shape"):
        fk.randers_cross_entropy(*args, target, weight=torch.ones(4, device=device), backend=backend)
    with pytest.raises(TypeError, match="weight"):
        fk.randers_cross_entropy(*args, target, weight=torch.ones(5, dtype=torch.long, device=device), backend=backend)
    with pytest.raises(ValueError, match="probability target must have shape"):
        fk.randers_cross_entropy(*args, dense[:, :4], backend=backend)
    with pytest.raises(ValueError, match="margin"):
        fk.randers_cross_entropy(*args, dense, margin=0.1, backend=backend)
    with pytest.raises(ValueError, match="margin"):
        fk.randers_cross_entropy(*args, pairs, margin=0.1, backend=backend)
    with pytest.raises(ValueError, match="requires grad"):
        fk.randers_cross_entropy(*args, dense.clone().requires_grad_(), backend=backend)
    if device == "cuda":  # a device assert there: checked in a fresh process (it ends the CUDA context)
        assert_device_assert_in_subprocess("""
            args = make_inputs(4, 5, 3, device="cuda")
            pairs = fk.SoftTargets(torch.zeros(4, 2, dtype=torch.long, device="cuda") + 5,
                                   torch.ones(4, 2, device="cuda"))
            fk.randers_cross_entropy(*args, pairs, backend="triton")""")
    else:
        with pytest.raises(ValueError, match="out of range"):
            fk.randers_cross_entropy(*args, pairs._replace(classes=pairs.classes + 5), backend=backend)
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        fk.randers_cross_entropy(*args, pairs._replace(probs=pairs.probs[:, :1]), backend=backend)
    with pytest.raises(ValueError, match="lse_square_scale"):
        fk.randers_cross_entropy(*args, target, lse_square_scale=-1.0, backend=backend)


_COMPACT_MEMORY_PROBE = _PROBE_INPUTS + textwrap.dedent("""
    weight = 0.5 + torch.rand(C, generator=g)
    a, b = torch.randint(0, C, (2, B), generator=g)
    target = fk.mixup_soft_targets(a, b, torch.rand(B, generator=g), smoothing=0.1)  # timm's mixup, compact
    small = [t[:3].detach().clone().requires_grad_() if t.dim() == 2 else t for t in inputs]
    fk.randers_cross_entropy(*small, fk.SoftTargets(target.classes[:3] % 3, target.probs[:3], 0.1),
                             weight=weight[:3], backend="cpp").backward()  # first-call allocations
    for t in inputs:
        t.grad = None

    def fwd_bwd():
        loss, lse = fk.randers_cross_entropy(*inputs, target, weight=weight, label_smoothing=0.1,
                                             lse_square_scale=1e-4, return_lse=True, backend="cpp")
        (loss + lse.sum()).backward()

""") + _PROBE_MEASURE


def test_memory_compact_soft_targets_no_logits_matrix():
    """The compact probability target (timm's mixup as two pairs per row, smoothing, class weights,
    z-loss and the returned lse) at B = 256, D = 128, C = 200,000 on the C++ kernels: the
    forward+backward's peak extra resident memory beyond the inputs and their gradients (fresh
    process, as test_memory_far_below_one_logits_matrix) stays far below one [B, C] float32 matrix:
    nothing of size [B, C] is formed, on the way in or inside."""
    _assert_far_below_one_logits_matrix(_COMPACT_MEMORY_PROBE)


@pytest.mark.parametrize("form", ["index", "dense", "pairs"])
def test_near_prototype_options_float32(backend, device, form):
    """docs/design.md §2.1's hard case in float32 with class weights, smoothing and each target form, the
    target mass on each sample's own prototype (1e-3 away): loss within 1e-4, gradients within 1e-3
    of the float64 reference."""
    B, C, D = {"cpp": (24, 64, 256), "triton": (10, 20, 48)}[shape_key(backend)]
    inputs = make_inputs(B, C, D, near=True, gamma=0.05, seed=6, device=device)
    own = nearest_targets(inputs).to(device)
    other = (own + 1 + torch.arange(B, device=device)) % C
    pairs = fk.SoftTargets(torch.stack([own, other], dim=1), torch.tensor([[0.8, 0.2]], device=device).expand(B, 2),
                           smoothing=0.1)
    target = {"index": own, "pairs": pairs, "dense": pairs.to_dense(C, torch.float32)}[form]
    weight = (0.5 + torch.rand(C, generator=torch.Generator().manual_seed(4))).to(device)
    check_cross_entropy(inputs, target, backend, fwd_tol=1e-4, grad_tol=1e-3, weight=weight, label_smoothing=0.1,
                        lse_square_scale=1e-3)


def test_torch_compile_fullgraph_with_options():
    """Class weights, the compact probability target, z-loss and the returned lse under
    torch.compile(fullgraph=True) on the C++ kernels: the same loss, lse and gradients as eager."""
    torch._dynamo.reset()
    x, mu, L, beta, lam, gamma = make_inputs(6, 9, 5, full=True, requires_grad=True)
    weight = 0.5 + torch.rand(9, generator=torch.Generator().manual_seed(1))
    target = fk.mixup_soft_targets(random_targets(6, 9, seed=2), lam=0.7, smoothing=0.1)

    def f(x, mu):
        loss, lse = fk.randers_cross_entropy(torch.tanh(x), mu, L, beta, lam, gamma, target, weight=weight,
                                             label_smoothing=0.1, lse_square_scale=1e-2, return_lse=True,
                                             backend="cpp")
        return loss + 0.1 * lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = f(x, mu)
    got = compiled(x, mu)
    assert_rel_close(got, eager, 1e-6)
    for g, e in zip(torch.autograd.grad(got, [x, mu, L, gamma]), torch.autograd.grad(eager, [x, mu, L, gamma])):
        assert_rel_close(g, e, 1e-5, "compiled gradient")
