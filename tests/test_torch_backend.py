"""backend="torch" beyond the per-family contract tests (which run it through the `backend` fixture):
the auto rule and the FAIM_KERNELS_CPP switch, torch.func transforms (grad, vjp, jacrev, jacfwd,
vmap: per-sample gradients and ensembles of heads), the refusals of what cannot run under them, the
static form's near pairs, and ONNX export checked with onnxruntime against the float64 reference."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, stack_module_state, vjp, vmap

import faim_kernels as fk
from faim_kernels.ops import dispatch, torch_ops

from conftest import assert_norm_close, assert_rel_close, make_inputs, nearest_targets

FULL = pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
NAMES = ["x", "mu", "L", "beta", "lam", "gamma"]


# ---- the auto rule ----



def test_switch_turns_the_cpp_kernels_off(monkeypatch):
    monkeypatch.setenv("FAIM_KERNELS_CPP", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chosen on purpose: no warning
        assert dispatch.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(RuntimeError, match="FAIM_KERNELS_CPP=0"):
        dispatch.resolve_backend("cpp", torch.device("cpu"))
    monkeypatch.setenv("FAIM_KERNELS_CPP", "1")
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "cpp"


def test_other_devices_run_torch():
    for device in ("mps", "xpu", "privateuseone"):
        assert dispatch.resolve_backend("auto", torch.device(device)) == "torch"
    # meta tensors (deferred initialisation) carry shapes only: the einsum reference's shape logic serves
    assert dispatch.resolve_backend("auto", torch.device("meta")) == "reference"


def test_missing_triton_kernels_fall_back_with_the_cause(monkeypatch):
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_triton_kernels_error", lambda: "the Triton kernels do not import (test)")
    with pytest.warns(UserWarning, match="do not import \\(test\\)") as record:
        assert dispatch.resolve_backend("auto", torch.device("cuda")) == "torch"
    assert "faim_kernels: faim_kernels:" not in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per cause
        assert dispatch.resolve_backend("auto", torch.device("cuda")) == "torch"


def test_triton_launch_failure_falls_back_with_the_cause(monkeypatch):
    """A CUDA user whose Triton kernels fail to compile at their first launch (ptxas rejecting the GPU's
    architecture) gets backend='torch' with one warning naming the cause; later calls resolve to
    'torch' at once. Simulated on CPU tensors: the launchers raise what Triton raises there. A forced
    backend='triton' raises the error itself."""
    pytest.importorskip("triton")
    from triton.runtime.errors import PTXASError

    from faim_kernels.ops import triton as triton_backend
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(dispatch, "_triton_launch_error", None)
    monkeypatch.setattr(dispatch, "_triton_kernels_error", lambda: None)
    launches = []

    def failing_launch(*args):
        launches.append(args)
        raise PTXASError("ptxas fatal   : Value 'sm_999' is not defined for option 'gpu-name'")
    monkeypatch.setattr(triton_backend, "interpreted_logits", failing_launch)
    monkeypatch.setattr(triton_backend, "interpreted_cross_entropy", failing_launch)
    x, mu, L, beta, lam, gamma = make_inputs(8, 40, 16, near=True, seed=6)
    auto = dispatch.resolve_backend("auto", torch.device("cuda"))
    assert auto == "triton" and isinstance(auto, dispatch.AutoChoice)
    with pytest.warns(UserWarning, match="PTXASError: PTXAS error: ptxas fatal.*sm_999") as record:
        out = dispatch.fused_logits(x, mu, L, beta, lam, gamma, 1e-6, auto)
    assert len(record) == 1 and "backend='torch'" in str(record[0].message)
    assert len(launches) == 1
    ref = fk.reference.randers_logits(*[t.double() for t in (x, mu, L, beta, lam, gamma)])
    assert_rel_close(out, ref, 1e-5, "logits after the failed launch")
    target = nearest_targets([x, mu, L, beta, lam])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per cause: the cross-entropy falls back silently
        stats = dispatch.fused_row_stats(x, mu, L, beta, lam, gamma, target, 1e-6, 0.0, auto)
        assert dispatch.resolve_backend("auto", torch.device("cuda")) == "torch"  # later calls: torch at once
    want = torch_ops.row_stats(x, mu, L, beta, lam, gamma, target, 1e-6, 0.0)
    for got, w in zip(stats, want):
        torch.testing.assert_close(got, w)
    assert len(launches) == 2
    with pytest.raises(PTXASError):  # a forced backend is not replaced
        dispatch.fused_logits(x, mu, L, beta, lam, gamma, 1e-6, "triton")


def test_large_problem_without_cpp_runs_the_torch_path(no_cpp_kernels):
    """(256, 4096, 128): where the einsum fallback was refused (its [B, C, D] temporaries ~2 GB), auto
    now runs the torch path: exact, [B, C] memory."""
    x, mu, L, beta, lam, gamma = make_inputs(256, 4096, 128, near=True, seed=3)
    with pytest.warns(UserWarning, match="not on PATH"):
        out = fk.randers_logits(x, mu, L, beta, lam, gamma)
    ref = fk.reference.randers_logits(*[t.double() for t in (x, mu[:512], L, beta, lam, gamma)])
    assert_rel_close(out[:, :512], ref, 1e-4, "logits")
    t = nearest_targets([x, mu, L, beta, lam])
    loss = fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, t)
    assert torch.isfinite(loss)


# ---- torch.func ----

def _inputs64(full, C=40, near=True, seed=0):
    """float64, near-prototype samples (sample 0 on its prototype), C > STATIC_NEAR_PAIRS so that the
    static form's per-row selection of pairs matters."""
    assert C > torch_ops.STATIC_NEAR_PAIRS
    return [t.detach() for t in make_inputs(9, C, 7, full=full, near=near, dtype=torch.float64, seed=seed)]


def _ref_grads(fn, inputs, w, **kw):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = (fn(*leaves, **kw) * w).sum()
    return torch.autograd.grad(out, leaves)


@FULL
@pytest.mark.parametrize("fn", ["logits", "distance"])
def test_func_grad_equals_the_reference(full, fn):
    inputs = _inputs64(full)
    if fn == "distance":
        inputs = inputs[:5]
    w = torch.randn(9, 40, dtype=torch.float64)
    f = getattr(fk, "randers_" + fn)
    got = grad(lambda *a: (f(*a) * w).sum(), argnums=tuple(range(len(inputs))))(*inputs)
    want = _ref_grads(getattr(fk.reference, "randers_" + fn), inputs, w)
    for name, g, r in zip(NAMES, got, want):
        assert_norm_close(g, r, 1e-10, f"d{name}")


@FULL
def test_func_vjp_and_jacrev_jacfwd(full):
    x, mu, L, beta, lam, gamma = _inputs64(full)
    ref_jac = torch.autograd.functional.jacobian(lambda x_: fk.reference.randers_logits(x_, mu, L, beta, lam, gamma), x)
    f = lambda x_: fk.randers_logits(x_, mu, L, beta, lam, gamma)  # noqa: E731
    assert_norm_close(jacrev(f)(x), ref_jac, 1e-10, "jacrev")
    assert_norm_close(jacfwd(f)(x), ref_jac, 1e-10, "jacfwd")
    out, pullback = vjp(f, x)
    assert_rel_close(out, fk.reference.randers_logits(x, mu, L, beta, lam, gamma), 1e-10, "vjp forward")
    w = torch.randn_like(out)
    assert_norm_close(pullback(w)[0], torch.einsum("bc,bcij->ij", w, ref_jac), 1e-10, "vjp")


def test_func_second_derivatives_compose():
    """torch.func runs the plain-ops form, so derivatives of any order exist (the eager form refuses a
    double backward with the way out)."""
    x, mu, L, beta, lam, gamma = _inputs64(False)
    x = x[:2]
    h = torch.func.hessian(lambda x_: fk.randers_distance(x_, mu, L, beta, lam).sum())(x)
    want = torch.autograd.functional.hessian(lambda x_: fk.reference.randers_distance(x_, mu, L, beta, lam).sum(), x)
    assert_norm_close(h, want, 1e-10, "hessian")
    xg = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(fk.randers_distance(xg, mu, L, beta, lam, backend="torch").sum(), xg, create_graph=True)
    with pytest.raises(RuntimeError, match="torch.func"):
        g.sum().backward()


@FULL
def test_vmap_per_sample_gradients_of_the_loss(full):
    """Per-sample gradients of FAIMHead.loss with vmap(grad(...)): each equals the gradient of that
    sample's loss through the float64 reference, near-prototype samples included."""
    torch.manual_seed(0)
    head = fk.FAIMHead(7, 40, full_sigma=full, dtype=torch.float64)
    x = head.mu.detach()[torch.arange(9) % 40] + 1e-4 * torch.randn(9, 7, dtype=torch.float64)
    t = torch.arange(9) % 40
    params = {k: v.detach() for k, v in head.named_parameters()}

    def loss(p, xb, tb):
        return _head_loss(head, p, xb[None], tb[None])
    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, t)
    ref_head = fk.FAIMHead(7, 40, full_sigma=full, dtype=torch.float64, backend="reference")
    ref_head.load_state_dict(head.state_dict())
    for b in range(9):
        ref_head.zero_grad()
        ref_head.loss(x[b:b + 1], t[b:b + 1]).backward()
        for name, p in ref_head.named_parameters():
            assert_norm_close(per_sample[name][b], p.grad, 1e-10, f"sample {b}: d{name}")


def _head_loss(head, params, x, t):
    """head.loss(x, t) with the given parameters (functional_call reaches forward only)."""
    class _Loss(torch.nn.Module):
        def __init__(self, h):
            super().__init__()
            self.h = h

        def forward(self, x_, t_):
            return self.h.loss(x_, t_)
    return functional_call(_Loss(head), {f"h.{k}": v for k, v in params.items()}, (x, t))


def test_vmap_ensemble_of_heads():
    """An ensemble of heads: stack_module_state + vmap(functional_call) gives each head's logits."""
    torch.manual_seed(1)
    heads = [fk.FAIMHead(7, 40, full_sigma=True, dtype=torch.float64) for _ in range(3)]
    params, buffers = stack_module_state(heads)
    base = fk.FAIMHead(7, 40, full_sigma=True, dtype=torch.float64).to("meta")
    x = heads[0].mu.detach()[:9] + 1e-4 * torch.randn(9, 7, dtype=torch.float64)
    out = vmap(lambda p, b: functional_call(base, (p, b), (x,)))(params, buffers)
    for i, h in enumerate(heads):
        h.backend = "reference"
        assert_rel_close(out[i], h(x), 1e-10, f"head {i}")


def test_fused_backends_refuse_transforms_with_the_way_out():
    x, mu, L, beta, lam, gamma = _inputs64(False)
    for backend in ("cpp",):
        with pytest.raises(RuntimeError, match="faim_kernels: backend='cpp' cannot run under torch.func") as info:
            grad(lambda x_: fk.randers_logits(x_, mu, L, beta, lam, gamma, backend=backend).sum())(x)
        assert "backend='torch'" in str(info.value)


def test_topk_refuses_grad_but_runs_under_vmap():
    x, mu, L, beta, lam, _ = _inputs64(False)
    with pytest.raises(RuntimeError, match="randers_distance_at"):
        grad(lambda x_: fk.randers_topk(x_, mu, L, beta, lam, 3)[0].sum())(x)
    d, idx = vmap(lambda xb: fk.randers_topk(xb[None], mu, L, beta, lam, 3))(x)
    want_d, want_idx = fk.reference.randers_topk(x, mu, L, beta, lam, 3)
    assert torch.equal(idx[:, 0], want_idx)
    assert_rel_close(d[:, 0], want_d, 1e-10, "distances")


# ---- the static form's near pairs ----

@FULL
def test_static_form_recomputes_near_pairs_in_float32(monkeypatch, full):
    """The static form (transforms, compile, export) in float32 on docs/design.md §2.1's hard case: within the
    kernels' bound, where the plain expansion is far off."""
    monkeypatch.setattr(torch_ops, "static_shapes", lambda: True)
    inputs = make_inputs(16, 64, 256, full=full, near=True, seed=2)
    out = fk.randers_logits(*inputs, backend="torch")
    ref = fk.reference.randers_logits(*[t.double() for t in inputs])
    assert_rel_close(out, ref, 1e-5, "static logits")
    monkeypatch.setattr(torch_ops, "STATIC_NEAR_PAIRS", 0)  # nothing recomputed: the plain expansion
    plain = fk.randers_logits(*inputs, backend="torch")
    assert ((plain.double() - ref).abs() / ref.abs()).max() > 1e-2


def test_static_form_bound_on_near_pairs_per_row(monkeypatch):
    """The static form recomputes at most STATIC_NEAR_PAIRS pairs per row (a top-k with a static k):
    a row with more near pairs keeps the plain expansion's accuracy for the rest (here far off), while
    the eager form recomputes every one. The bound is documented (module docstring, docs/status.md), shown
    here: one sample with 3·STATIC_NEAR_PAIRS prototypes around it, far from the prototypes' mean."""
    k = torch_ops.STATIC_NEAR_PAIRS
    g = torch.Generator().manual_seed(4)
    D = 256
    others = 5 + 10 * torch.randn(64, D, generator=g, dtype=torch.float64)
    spot = 40 + 10 * torch.randn(D, generator=g, dtype=torch.float64)
    cluster = spot + 1e-3 * torch.randn(3 * k, D, generator=g, dtype=torch.float64)
    x = (spot + 1e-3 * torch.randn(D, generator=g, dtype=torch.float64))[None]
    mu = torch.cat([cluster, others])
    L = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / 16
    args64 = (x, mu, L, beta, torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64))
    args = [t.float() for t in args64]
    ref = fk.reference.randers_logits(*[t.double() for t in args])[0, :3 * k]  # of the float32 inputs

    def errors():
        out = fk.randers_logits(*args, backend="torch")[0, :3 * k].double()
        return (out - ref).abs() / ref.abs()
    assert errors().max() <= 1e-5  # eager: every near pair recomputed
    monkeypatch.setattr(torch_ops, "static_shapes", lambda: True)
    err = errors()
    assert (err <= 1e-5).sum() >= k  # the k pairs nearest to cancellation: exact
    assert err.max() > 1e-3  # beyond them: the plain expansion's accuracy


# ---- ONNX export ----

def _onnx_case(full, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    torch.manual_seed(3)
    head = fk.FAIMHead(16, 50, full_sigma=full)
    with torch.no_grad():  # a trained-looking metric: L away from its initial value
        if full:
            head.L.add_(0.2 * torch.randn(16, 16) / 4)
        head.beta.add_(0.1 * torch.randn(16))
    model = torch.nn.Sequential(torch.nn.Identity(), head).eval()
    x = torch.randn(8, 16)
    path = tmp_path / "faim.onnx"
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return head, session


@FULL
def test_onnx_export_matches_the_float64_reference(full, tmp_path):
    head, session = _onnx_case(full, tmp_path)
    mu = head.mu.detach()
    g = torch.Generator().manual_seed(5)
    for B in (1, 5, 33):  # dynamic batch; near-prototype samples, one exactly on its prototype
        x = torch.randn(B, 16, generator=g)
        x[: B // 2 + 1] = mu[: B // 2 + 1] + 1e-3 * torch.randn(B // 2 + 1, 16, generator=g)
        x[0] = mu[0]
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        L, beta, lam = head.metric_args(torch.float64)
        want = fk.reference.randers_logits(x.double(), mu.double(), L, beta, lam, head.gamma.double(), head.eps)
        assert_rel_close(torch.from_numpy(got), want, 1e-5, f"onnxruntime B={B}")


def test_torch_export_runs_plain_ops():
    head = fk.FAIMHead(16, 50, full_sigma=True)
    x = torch.randn(4, 16)
    ep = torch.export.export(head, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert "faim_kernels" not in str(ep.graph)  # portable: no custom op in the graph
    y = torch.randn(7, 16)
    assert_rel_close(ep.module()(y), head(y), 1e-5, "exported")
