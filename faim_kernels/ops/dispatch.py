"""The dispatch layer: which backend runs a call, and the one step of preparation that stays
outside the kernels (the metric factor Lc, formed by ATen so that autograd chains it to L).

Backends: "cpp" (the C++ kernels, CPU tensors, built or compiled on first use by
faim_kernels/_cpp_loader.py), "triton" (CUDA tensors; CPU tensors through Triton's interpreter
when TRITON_INTERPRET=1 was set before import: the tests), "torch" (the same algorithm in plain
PyTorch ops, any device: faim_kernels/ops/torch_ops.py), "reference" (the einsum oracle).
Triton is imported only when a call needs it.

backend="auto": the C++ kernels for CPU tensors, Triton for CUDA tensors, "torch" for every other
device. Where the chosen kernels cannot run (no compiler or a failed build; triton missing or its
kernels failing to import, or failing to compile at their first launch: an unsupported GPU, a
ptxas error), "auto" runs "torch" instead, with one warning per cause. Under torch.func
transforms "auto" is always "torch" (the custom ops have no functorch rules), and a forced "cpp" or
"triton" is refused with the way out. Under torch.export and ONNX export "auto" is "torch" too: the
exported graph is then plain ATen ops, which any runtime (onnxruntime, ExecuTorch) can run without
this package; a forced "cpp" or "triton" still exports its custom op. FAIM_KERNELS_CPP=0 in the environment turns the C++ kernels off
("auto" then runs "torch" on CPU tensors, without a warning: it was asked for).
"""
from __future__ import annotations

import os
import warnings

import torch

from .. import _cpp_loader, transform
from .._validation import check_backend
from ..transform import compute_dtype, metric_factor
from . import contract, torch_ops

_warned: set[str] = set()
# Why the Triton kernels failed at launch in this process (None until one did): "auto" then runs
# "torch" for CUDA tensors from the next call on (the failing call itself already fell back).
_triton_launch_error: str | None = None


class AutoChoice(str):
    """A backend name that backend="auto" chose (compares equal to the plain name). Only such a choice
    falls back to "torch" when the kernels fail at launch; a backend the caller forced raises."""


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_kernels_error() -> str | None:
    """Why the package's Triton kernels cannot be imported (None when they can): triton missing, or a
    triton version without a private helper the kernels use."""
    try:
        from . import triton as triton_backend  # noqa: F401
        from .triton import topk  # noqa: F401  (imports triton.language.standard._indicator)
    except ImportError as e:
        if not _triton_importable():
            return "the CUDA kernels need triton, which does not import (pip install triton)"
        return f"the Triton kernels do not import with this triton ({e})"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpp_disabled() -> bool:
    """FAIM_KERNELS_CPP=0: the C++ kernels are off (the "torch" path runs CPU tensors instead)."""
    return os.environ.get("FAIM_KERNELS_CPP", "").strip() == "0"


def _fallback(why: str) -> str:
    """'torch', warning once per cause (the message starts with the package's name once)."""
    why = why.removeprefix("faim_kernels: ")
    if why not in _warned:
        _warned.add(why)
        warnings.warn(f"faim_kernels: {why}\nbackend='auto' runs backend='torch' instead (the same algorithm "
                      f"in plain PyTorch ops: exact, O(B*C) memory, slower than the fused kernels).", stacklevel=4)
    return "torch"


def _refuse_under_transform(backend: str) -> None:
    transforms = ", ".join(str(k).rsplit(".", 1)[-1] for k in torch_ops.functorch_transforms())
    raise RuntimeError(
        f"faim_kernels: backend={backend!r} cannot run under torch.func transforms ({transforms}): its fused "
        f"kernels are custom ops without functorch rules. Pass backend='torch' (or 'auto', which picks it under "
        f"transforms): the same algorithm in plain PyTorch ops, which every transform composes with.")


@torch.compiler.assume_constant_result
def _cpp_kernels_load_error() -> str | None:
    """Loads the C++ kernels; None when they are loaded, else why not (CppKernelsUnavailable's text).

    Under torch.compile, Dynamo runs this function as it is while it traces (assume_constant_result)
    and puts its result in the graph as a constant, instead of tracing into the loader, whose lock
    (threading.Lock) and file system work it cannot trace: without this, a compile that is the
    first call of a process (kernels not loaded yet) stopped at the lock, an error with
    fullgraph=True and a graph break at the head otherwise. The result is a constant indeed: the
    loader loads once per process and remembers a failure. Loading at import instead would cost a
    first-use compile (about a minute) to users of CUDA tensors only."""
    try:
        _cpp_loader.load()
    except _cpp_loader.CppKernelsUnavailable as e:
        return str(e)
    return None


def _load_cpp_kernels() -> None:
    """_cpp_loader.load(), which Dynamo can trace through (see _cpp_kernels_load_error)."""
    if not torch.compiler.is_compiling():
        _cpp_loader.load()  # eager: the loader's own exception (the same object every time)
        return
    why = _cpp_kernels_load_error()
    if why is not None:
        raise _cpp_loader.CppKernelsUnavailable(why)


def resolve_backend(backend: str, device: torch.device, shape: tuple[int, int, int] = (0, 0, 0),
                    dtype: torch.dtype = torch.float32) -> str:
    """Turns "auto" into a concrete backend for tensors on `device`; checks a forced one.
    (shape and dtype are kept for callers; no backend choice depends on them any more.)"""
    check_backend(backend)
    if backend == "auto" and device.type == "meta":
        return "reference"  # shapes only (deferred initialisation): nothing is computed or allocated
    transforming = torch_ops.in_functorch_transform()
    if backend == "auto":
        if transforming or torch_ops.exporting():
            return "torch"
        if device.type == "cuda":
            why = _triton_kernels_error() or _triton_launch_error
            if why is not None:
                return _fallback(why)
            # (compiled code keeps the plain name: Dynamo traces no str subclass; a launch failure there raises)
            return "triton" if torch.compiler.is_compiling() else AutoChoice("triton")
        if device.type == "cpu":
            if cpp_disabled():
                return "torch"
            try:
                _load_cpp_kernels()
                return "cpp"
            except _cpp_loader.CppKernelsUnavailable as e:
                return _fallback(str(e))
        return "torch"
    if transforming and backend in ("cpp", "triton"):
        _refuse_under_transform(backend)
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors, got tensors on {device}")
        if cpp_disabled():
            raise RuntimeError("faim_kernels: backend='cpp' was asked for, but FAIM_KERNELS_CPP=0 turns the C++ "
                               "kernels off; unset it, or pass backend='torch' or 'auto'")
        _load_cpp_kernels()  # raises CppKernelsUnavailable with the cause and the remedy
    if backend == "triton" and not ((device.type == "cuda" or (device.type == "cpu" and _interpreting()))
                                    and _triton_importable()):
        raise ValueError(f"backend='triton' runs on CUDA tensors, or on CPU tensors through Triton's "
                         f"interpreter when TRITON_INTERPRET=1 is set before faim_kernels is imported; "
                         f"got tensors on {device} (or triton is not installed)")
    return backend


def cpp_serves_cpu(backend: str) -> bool:
    """Whether a call on CPU tensors with `backend` runs the C++ kernels now: resolve_backend's
    answer, with its cheap checks first (FAIMHead's fast path asks on every call, and the full
    rule, export checks and all, costs several µs, a tenth of a small head's call). Tracing
    (torch.jit.trace, the TorchScript ONNX export) and transforms take resolve_backend's own way."""
    if backend not in ("auto", "cpp") or torch.jit.is_tracing() or torch.compiler.is_exporting():
        return False
    if _cpp_loader._loaded is not None and not torch_ops.in_functorch_transform() and not cpp_disabled():
        return True
    return resolve_backend(backend, torch.device("cpu")) == "cpp"


def _torch_if_launch_fails(backend: str, run_fused, run_torch):
    """run_fused(), or where "auto" chose Triton and its kernels fail to compile or launch (a
    triton.errors.TritonError: CompilationError, PTXASError, OutOfResources), run_torch() with one
    warning naming the cause; later calls then resolve to "torch" (resolve_backend). Only the
    forward launch is covered: a backward kernel failing after a successful forward raises."""
    if not isinstance(backend, AutoChoice) or backend != "triton":
        return run_fused()
    from triton.errors import TritonError
    try:
        return run_fused()
    except TritonError as e:
        global _triton_launch_error
        first = (str(e).strip().splitlines() or [""])[0][:300]
        _triton_launch_error = f"the Triton kernels failed to compile or launch ({type(e).__name__}: {first})"
        _fallback(_triton_launch_error)
        return run_torch()


def _ops(backend: str, device: torch.device):
    """(logits op, cross-entropy op) for a fused backend: the registered custom ops, or for Triton
    on CPU tensors the interpreter's stand-ins with the same autograd formula."""
    if backend == "triton":
        from . import triton as triton_backend  # Triton stays optional: imported on first use
        if device.type != "cuda":
            return triton_backend.interpreted_logits, triton_backend.interpreted_cross_entropy
        triton_backend.register()
    return contract.logits_op, contract.cross_entropy_op


def _scalar(v, device) -> torch.Tensor:
    """lam, gamma for the ops: a 0-dim tensor as it is (the kernels read it as float64 and return its
    gradient in its dtype: no cast nodes in the graph), a Python float as a float64 tensor."""
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=device)


def _kernel_dtype(backend: str, dtype: torch.dtype, op_family: str) -> torch.dtype:
    """The dtype x and mu reach the op in. The C++ kernels compute half inputs in float32; the
    Triton kernels of both op families take them as they are (half GEMM operands on the tensor cores,
    fp32 accumulation, the near threshold raised for the operands' rounding). The metric factor,
    beta and the options always arrive in the compute dtype (float32 for half inputs)."""
    if backend == "triton":
        return dtype
    return compute_dtype(dtype)


def fused_logits(x, mu, L, beta, lam, gamma, eps: float, backend: str) -> torch.Tensor:
    """logits [B, C] in x's dtype through `backend`'s fused op (inputs already validated)."""
    if backend == "torch":
        return torch_ops.logits(x, mu, L, beta, lam, gamma, eps)
    dtype, acc = _kernel_dtype(backend, x.dtype, "logits"), compute_dtype(x.dtype)

    def run_fused():
        logits_op, _ = _ops(backend, x.device)
        out = logits_op(x.to(dtype), mu.to(dtype), metric_factor(L, eps, acc), beta.to(acc),
                        _scalar(lam, x.device), _scalar(gamma, x.device), float(eps),
                        transform.near_threshold(x.shape[1], acc))
        return out[0].to(x.dtype)
    return _torch_if_launch_fails(backend, run_fused, lambda: torch_ops.logits(x, mu, L, beta, lam, gamma, eps))


def fused_row_stats(x, mu, L, beta, lam, gamma, target, eps: float, margin: float, backend: str,
                    class_weight=None, dense_soft_target=None):
    """(lse, target_logit, sl, pl) float64 through `backend`'s fused cross-entropy op; target holds class
    indices local to mu's rows ([B] or [B, k]), −1 where the row has none of them; class_weight [C]
    and the dense probability target dense_soft_target [B, C] are optional (ops/row_stats.py)."""
    if backend == "torch":
        return torch_ops.row_stats(x, mu, L, beta, lam, gamma, target, eps, margin, class_weight, dense_soft_target)
    dtype = _kernel_dtype(backend, x.dtype, "cross_entropy")
    acc = compute_dtype(x.dtype)
    _, ce_op = _ops(backend, x.device)
    lc = metric_factor(L, eps, acc)
    options = ()
    if class_weight is not None or dense_soft_target is not None:
        # The Triton kernels read the target in any floating dtype through its strides; the C++
        # kernels read it in the compute dtype (a copy only where the dtypes differ).
        if dense_soft_target is not None and (backend == "cpp" or dense_soft_target.dtype not in (torch.float32, torch.float64)):
            dense_soft_target = dense_soft_target.to(acc)
        options = (None if class_weight is None else class_weight.detach().to(acc),
                   None if dense_soft_target is None else dense_soft_target.detach())
    return _torch_if_launch_fails(
        backend,
        lambda: ce_op(x.to(dtype), mu.to(dtype), lc, beta.to(acc), _scalar(lam, x.device),
                      _scalar(gamma, x.device), target.to(torch.int64), float(eps),
                      transform.near_threshold(x.shape[1], acc), float(margin), *options),
        lambda: torch_ops.row_stats(x, mu, L, beta, lam, gamma, target, eps, margin, class_weight, dense_soft_target))


# ----------------------------------------------------------------------------------------------
# Top-k (forward only: see contract.py)
# ----------------------------------------------------------------------------------------------

def _warn_once(why: str) -> None:
    if why not in _warned:
        _warned.add(why)
        warnings.warn(why, stacklevel=4)


topk_by_sort = torch_ops.topk_by_sort  # (the Triton top-k's fallback sorts as backend="torch" merges)


def fused_topk(x, mu, L, beta, lam, eps: float, k: int, largest: bool, backend: str):
    """(distances [B, k] in x's dtype, indices int64 [B, k]) through `backend`'s fused top-k (inputs
    already validated; nothing differentiable comes back: the op has no autograd formula)."""
    # (torch.func transforms that differentiate are handled by functional.randers_topk: the indices
    # are computed outside them, and differentiating the distances is refused there.)
    if backend == "torch":
        return torch_ops.topk(x, mu, L, beta, lam, eps, k, largest)
    if isinstance(backend, AutoChoice):
        return _torch_if_launch_fails(backend, lambda: fused_topk(x, mu, L, beta, lam, eps, k, largest, str(backend)),
                                      lambda: torch_ops.topk(x, mu, L, beta, lam, eps, k, largest))
    with torch.no_grad():
        x, mu, L, beta = x.detach(), mu.detach(), L.detach(), beta.detach()
        lam = lam.detach() if isinstance(lam, torch.Tensor) else lam
        if backend == "triton":
            from .triton import topk as triton_topk  # Triton stays optional: imported on first use
            if not triton_topk.supports(k, x.dtype, mu.shape[0]):
                _warn_once(f"faim_kernels.randers_topk: the Triton kernel serves k <= {triton_topk.MAX_K}, "
                           f"float16/bfloat16/float32 inputs and C < 2^31 (got k = {k}, {x.dtype}, C = "
                           f"{mu.shape[0]}); this call sorts randers_distance's [B, C] instead (memory B·C).")
                d = fused_logits(x, mu, L, beta, lam, -1.0, eps, backend)
                return topk_by_sort(d, k, largest)
            dtype = x.dtype  # the GEMM takes half inputs as they are, like the logits kernels
        else:
            dtype = compute_dtype(x.dtype)
        acc = compute_dtype(x.dtype)
        args = (x.to(dtype), mu.to(dtype), metric_factor(L, eps, acc), beta.to(acc), _scalar(lam, x.device),
                float(eps), transform.near_threshold(x.shape[1], acc), int(k), bool(largest))
        if backend == "triton" and x.device.type != "cuda":
            dist, index = triton_topk.forward(*args)  # the interpreter: CPU tensors belong to the C++ kernel
        else:
            if backend == "triton":
                from . import triton as triton_backend
                triton_backend.register()
            dist, index = contract.topk_op(*args)
    return dist.to(x.dtype), index
