"""Shared test helpers: input generators (random and the hard cases of docs/design.md §2.1 (near pairs)), the float64
oracle, and comparisons whose failures explain themselves."""
from __future__ import annotations

import os
import socket

import pytest
import torch


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()

# Relative tolerances per input dtype (docs/design.md §2.1, near pairs goals; fp32 accumulation for the half types).
FWD_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
GRAD_TOL = {torch.float64: 1e-9, torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


def make_inputs(B, C, D, *, full=False, dtype=torch.float32, device="cpu", seed=0, near=False,
                lam=0.3, gamma=2.0, requires_grad=False):
    """Returns [x, mu, L, beta, lam, gamma] (lam and gamma as 0-dim tensors).

    near=True builds docs/design.md §2.1's hard case: prototypes with a common offset 5 and scale 10, each
    sample 1e-3 from a prototype (its target), sample 0 exactly on prototype 0.
    """
    g = torch.Generator().manual_seed(seed)
    if near:
        mu = 5 + 10 * torch.randn(C, D, generator=g, dtype=torch.float64)
        target = torch.randint(0, C, (B,), generator=g)
        x = mu[target] + 1e-3 * torch.randn(B, D, generator=g, dtype=torch.float64)
        if B > 0 and C > 0:
            x[0] = mu[0]
    else:
        x = torch.randn(B, D, generator=g, dtype=torch.float64)
        mu = torch.randn(C, D, generator=g, dtype=torch.float64)
    if full:
        L = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    else:
        L = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
    out = [t.to(dtype=dtype, device=device) for t in (x, mu, L, beta)]
    out += [torch.tensor(lam, dtype=dtype, device=device), torch.tensor(gamma, dtype=dtype, device=device)]
    if requires_grad:
        for t in out:
            t.requires_grad_()
    return out


def reference64(fn, inputs, **kw):
    """fn of the float64 copies of `inputs` (fn is a fk.reference function)."""
    return fn(*[t.detach().to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                for t in inputs], **kw)


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    return ((out - ref).abs() / ref.abs().clamp_min(1e-30)).max().item() if ref.numel() else 0.0


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Every element within tol relative; on failure names the worst entry and NaN mismatches."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    o, r = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    nan_mismatch = torch.isnan(o) != torch.isnan(r)
    assert not nan_mismatch.any(), f"{what}: NaN mismatch at {nan_mismatch.nonzero()[:5].tolist()}"
    if o.numel() == 0:
        return
    rel = ((o - r).abs() / r.abs().clamp_min(1e-30)).nan_to_num(0.0)
    worst = int(rel.argmax())
    idx = list(torch.unravel_index(torch.tensor(worst), o.shape)) if o.dim() else []
    assert rel.max() <= tol, (f"{what}: max relative error {rel.max().item():.3e} > {tol:.1e} at "
                              f"{[int(i) for i in idx]}: got {o.flatten()[worst].item():.10g}, "
                              f"want {r.flatten()[worst].item():.10g}")


def assert_norm_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "gradient") -> None:
    """‖out − ref‖ / ‖ref‖ <= tol (for gradients, whose small entries are not meaningful one by one)."""
    assert out is not None, f"{what}: no gradient"
    o, r = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    assert o.shape == r.shape, f"{what}: shape {tuple(o.shape)} != {tuple(r.shape)}"
    assert torch.isfinite(o).all(), f"{what}: non-finite entries at {(~torch.isfinite(o)).nonzero()[:5].tolist()}"
    err = ((o - r).norm() / r.norm().clamp_min(1e-30)).item()
    assert err <= tol, f"{what}: relative norm error {err:.3e} > {tol:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


_INTERPRETED_OPS: dict = {}


def interpreted_contract_ops(op_family: str):
    """(forward op, backward op) of `family` ("logits" or "cross_entropy") for torch.library.opcheck
    under Triton's interpreter: the contract's schemas, fake kernels and autograd formula, with the
    Triton launchers as their CPU kernels, in a test-only namespace (the contract's own ops send CPU
    tensors to the C++ kernels)."""
    if op_family not in _INTERPRETED_OPS:
        from faim_kernels.ops import contract
        from faim_kernels.ops import triton as tri
        launchers, (fwd, bwd), fakes = {
            "logits": (tri.logits, (contract.logits_op, contract.logits_backward_op),
                       (contract._logits_fake, contract._logits_backward_fake)),
            "cross_entropy": (tri.cross_entropy, (contract.cross_entropy_op, contract.cross_entropy_backward_op),
                              (contract._cross_entropy_fake, contract._cross_entropy_backward_fake)),
        }[op_family]
        ns = "faim_kernels_interpreted"
        lib = torch.library.Library(ns, "FRAGMENT")
        ops = []
        for op, kernel, fake in ((fwd, launchers.forward, fakes[0]), (bwd, launchers.backward, fakes[1])):
            schema = str(op._schema).split("::", 1)[1]
            name = schema.split("(", 1)[0]
            lib.define(schema)
            lib.impl(name, kernel, "CPU")
            torch.library.register_fake(f"{ns}::{name}", fake, lib=lib)
            ops.append(getattr(getattr(torch.ops, ns), name).default)
        setup_context, backward_with = contract._FORMULAS[op_family]
        torch.library.register_autograd(ops[0], backward_with(ops[1]), setup_context=setup_context, lib=lib)
        _INTERPRETED_OPS[op_family] = (lib, ops[0], ops[1])
    return _INTERPRETED_OPS[op_family][1:]


# ---- backends: one test function per behaviour, the backend a fixture ----

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

# Triton runs on a CUDA device, or on CPU tensors through its interpreter (`make test` sets
# TRITON_INTERPRET=1); the interpreter is slow, so the Triton cases take smaller shapes.
TRITON_RUNS = HAS_TRITON and (HAS_CUDA or INTERPRET)
TRITON_DEVICE = "cuda" if HAS_CUDA else "cpu"
FUSED = ("cpp", "triton", "torch")

_BACKEND_MARKS = {
    "cpp": [],
    "torch": [],
    "reference": [],
    "triton": [pytest.mark.interpret,
               pytest.mark.skipif(not TRITON_RUNS, reason="needs triton and a CUDA device, or TRITON_INTERPRET=1")],
}


def backends(*names):
    """pytest params for the `backend` fixture (indirect parametrisation), with the Triton marks."""
    return [pytest.param(n, marks=_BACKEND_MARKS[n], id=n) for n in names]


def per_backend(id_of=None, **cases):
    """Params for ("backend", value): per_backend(cpp=[...], triton=[...]), for shapes or options that
    differ by backend (the interpreter gets small ones); use with indirect=["backend"]."""
    id_of = id_of or (lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
    if "cpp" in cases and "torch" not in cases:  # the plain-ops path takes the C++ kernels' cases
        cases = {**cases, "torch": cases["cpp"]}
    return [pytest.param(name, v, marks=_BACKEND_MARKS[name], id=f"{name}-{id_of(v)}")
            for name, values in cases.items() for v in values]


def shape_key(backend: str) -> str:
    """The key of a per-backend dict of shapes: "torch" runs on CPU tensors at the C++ kernels' sizes."""
    return "cpp" if backend == "torch" else backend


def device_of(backend: str) -> str:
    return TRITON_DEVICE if backend == "triton" else "cpu"


def poison_triton_outputs(monkeypatch):
    """Every buffer a Triton kernel must fill starts as NaN (integer buffers: their most negative
    value), so an entry it fails to write shows up."""
    from faim_kernels.ops.triton import common

    def poisoned(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(common, "_empty", poisoned)


@pytest.fixture(params=backends(*FUSED))
def backend(request, monkeypatch):
    """The backend under test: "cpp", "triton" (on CUDA when present, else through the interpreter,
    outputs poisoned), "torch" (plain PyTorch ops, class chunks made small), or "reference" where a
    test asks for it with `backends(...)`."""
    if request.param == "triton":
        poison_triton_outputs(monkeypatch)
    if request.param == "torch":  # small class chunks, so that the tests' shapes run several of them
        from faim_kernels.ops import torch_ops
        monkeypatch.setattr(torch_ops, "CHUNK_ELEMENTS", 2 ** 12)
    return request.param


@pytest.fixture
def device(backend):
    return device_of(backend)


def triton_contract_ops(op_family: str):
    """(forward, backward) of `family` on the Triton kernels: the registered contract ops on CUDA;
    under the interpreter the same schemas, fake kernels and autograd formula around the launchers."""
    from faim_kernels.ops import contract
    if HAS_CUDA:
        from faim_kernels.ops import triton as tri
        tri.register()
        return {"logits": (contract.logits_op, contract.logits_backward_op),
                "cross_entropy": (contract.cross_entropy_op, contract.cross_entropy_backward_op)}[op_family]
    return interpreted_contract_ops(op_family)


def contract_ops(op_family: str, backend: str):
    """(forward, backward) contract ops of `family` whose kernels are `backend`'s."""
    if backend == "torch":
        pytest.skip("backend='torch' is plain PyTorch ops: it has no contract ops to check")
    if backend == "triton":
        return triton_contract_ops(op_family)
    import faim_kernels as fk
    fk._cpp_loader.load()  # the C++ kernels register on first use; op-level tests call the ops directly
    ops = torch.ops.faim_kernels
    return {"logits": (ops.randers_logits.default, ops.randers_logits_backward.default),
            "cross_entropy": (ops.randers_cross_entropy.default, ops.randers_cross_entropy_backward.default)}[op_family]


# ---- the family checks against the float64 oracle (shared by the family files and the internals) ----

NAMES = ["x", "mu", "L", "beta", "lam", "gamma"]


def check_logits(inputs, backend, fn="logits", fwd_tol=None, grad_tol=None, seed=0, grad=None):
    """Forward within fwd_tol (every entry, relative) and the gradients of all inputs within
    grad_tol (relative norm) of autograd through the float64 einsum reference; dtype and device kept."""
    import faim_kernels as fk
    dtype, dev = inputs[0].dtype, inputs[0].device
    fwd_tol = fwd_tol or FWD_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    if fn == "distance":
        inputs = inputs[:5]
    for t in inputs:
        t.requires_grad_()
    out = getattr(fk, "randers_" + fn)(*inputs, backend=backend)
    assert out.dtype == dtype and out.device == dev
    ref = reference64(getattr(fk.reference, "randers_" + fn), inputs)
    assert_rel_close(out, ref, fwd_tol, "forward")
    if grad is None:
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(dev)
    got = torch.autograd.grad(out, inputs, grad.to(dtype))
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    want = torch.autograd.grad(getattr(fk.reference, "randers_" + fn)(*ref_inputs), ref_inputs, grad)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype, name
        assert_norm_close(g, w, grad_tol, f"d{name}")
    return out, got


def random_targets(B, C, seed=0, ignore_every=0, ignore_index=-100, device="cpu"):
    target = torch.randint(0, max(C, 1), (B,), generator=torch.Generator().manual_seed(seed))
    if ignore_every:
        target[::ignore_every] = ignore_index
    return target.to(device)


def nearest_targets(inputs):
    import faim_kernels as fk
    d = fk.reference.randers_distance(*[t.detach().double() for t in inputs[:5]])
    return d.argmin(dim=1)


def check_cross_entropy(inputs, target, backend, fwd_tol=None, grad_tol=None, seed=0, **opts):
    """Loss and ∂(x, mu, L, beta, lam, gamma) of fk.randers_cross_entropy against F.cross_entropy
    over the einsum logits in float64 (fk.reference.randers_cross_entropy is exactly that).
    target: class indices, a [B, C] probability target or fk.SoftTargets; with return_lse=True
    the returned logsumexp is checked too and enters the gradient with its own random weights."""
    import faim_kernels as fk
    dtype = inputs[0].dtype
    fwd_tol = fwd_tol or FWD_TOL[dtype]
    grad_tol = grad_tol or GRAD_TOL[dtype]
    inputs = [t.detach().requires_grad_() for t in inputs]
    out = fk.randers_cross_entropy(*inputs, target, backend=backend, **opts)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    is_index = isinstance(target, torch.Tensor) and not target.is_floating_point()
    ref = fk.reference.randers_cross_entropy(*ref_inputs, target.long() if is_index else target, **opts)
    lse_part = None
    if opts.get("return_lse"):
        (out, lse), (ref, ref_lse) = out, ref
        assert lse.dtype == dtype and lse.shape == ref_lse.shape
        assert_rel_close(lse, ref_lse, fwd_tol, "lse")
        lse_w = torch.randn(lse.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        lse_part = (lse, ref_lse, lse_w.to(lse.device))
    assert out.dtype == dtype and out.shape == ref.shape
    assert_rel_close(out, ref, fwd_tol, "loss")
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    weight = weight.to(ref.device)
    if not torch.isfinite(ref).all():  # e.g. 'mean' over no valid row: NaN, and zero gradients
        weight = torch.ones_like(weight)
        out, ref = out.nan_to_num(0.0), ref.nan_to_num(0.0)
    objective, ref_objective = (out.double() * weight).sum(), (ref * weight).sum()
    if lse_part is not None:
        objective = objective + (lse_part[0].double() * lse_part[2]).sum()
        ref_objective = ref_objective + (lse_part[1] * lse_part[2]).sum()
    got = torch.autograd.grad(objective, inputs)
    want = torch.autograd.grad(ref_objective, ref_inputs)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == dtype, name
        assert_norm_close(g, w, grad_tol, f"d{name}")


def free_port() -> int:
    """A free TCP port on loopback, for a torch.distributed rendezvous in the tests."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- a CUDA device assert is checked in a fresh process ----

def assert_device_assert_in_subprocess(snippet: str, match: str = "out of range") -> None:
    """Runs `snippet` (with torch, faim_kernels as fk and this file's helpers imported) in a fresh
    Python process on CUDA and asserts that it fails with `match` or a device-side assert.
    On CUDA a range check inside a kernel is an asynchronous device assert (as in F.cross_entropy):
    it cannot raise a Python error at the call, and it leaves the CUDA context unusable, so a test
    that provokes one in the pytest process would fail every later CUDA test."""
    import subprocess
    import sys
    import textwrap
    code = ("import sys; sys.path.insert(0, %r)\n" % os.path.dirname(__file__)
            + "import torch\nimport faim_kernels as fk\nfrom conftest import *\n"
            + textwrap.dedent(snippet) + "\ntorch.cuda.synchronize()\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, "the out-of-range call ran without an error:\n" + out[-2000:]
    assert match in out or "device-side assert" in out, out[-2000:]


# ---- the C++ kernels made unavailable (the auto rule's fallback) ----

NO_CPP_CAUSE = "no C++ compiler to build the C++ CPU kernels (`c++` is not on PATH)"


@pytest.fixture
def no_cpp_kernels(monkeypatch):
    """The C++ kernels fail to load with NO_CPP_CAUSE, and the fallback warns afresh."""
    from faim_kernels import _cpp_loader
    from faim_kernels.ops import dispatch

    def unavailable():
        raise _cpp_loader.CppKernelsUnavailable(NO_CPP_CAUSE)
    monkeypatch.setattr(_cpp_loader, "load", unavailable)
    monkeypatch.setattr(dispatch, "_warned", set())


def end_process_group() -> None:
    """dist.destroy_process_group() at the end of a test worker, once gloo is idle. Python objects
    that hold the group (a DistributedDataParallel's reducer, finished collectives) are collected
    first, and the main thread then sleeps briefly without the GIL, so gloo's worker thread can
    finish destroying its completed work, which needs the GIL. Without this a worker hung now and
    then at its very end: the group's destructor, run with the GIL held, joined that thread while
    it waited for the GIL (seen once, in a full run of the suite, torch 2.13)."""
    import gc
    import time

    import torch.distributed as dist
    gc.collect()
    time.sleep(0.2)
    dist.destroy_process_group()
