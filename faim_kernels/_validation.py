"""Input checks shared by every public function (docs/guarantees.md): one place, clear messages that name
the argument and what was expected."""
from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("auto", "cpp", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")

# check_inputs' gamma for randers_distance, which has none (None itself is a caller's mistake).
NO_GAMMA = object()


def _compiling() -> bool:
    """Whether value checks must be skipped: under torch.compile, and under torch.func transforms
    (a vmapped tensor has no single value to read; the checks would fail inside functorch)."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._functorch.peek_interpreter_stack() is not None


def readable(t: torch.Tensor) -> bool:
    """Whether the checks may read t's values: a CPU tensor with data, outside torch.compile.
    Reading a CUDA value would synchronise the stream; meta tensors (deferred initialisation) and
    FakeTensorMode's tensors have no values; the kernels' own checks hold where these cannot run."""
    if t.device.type != "cpu" or _compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake
    return not is_fake(t)


def _check_tensor(name: str, t, ndim: int | tuple[int, ...], shape_hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_hint}, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have shape {shape_hint}, got a {t.dim()}-d tensor of shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}")


def _check_scalar(name: str, v, device: torch.device, nonnegative: bool) -> None:
    """A Python real or a 0-dim floating tensor, finite (and >= 0 for lam). NaN or Inf in lam or
    gamma would reach every pair: an error, not a matrix of NaN."""
    what = ">= 0 and finite" if nonnegative else "finite"
    if isinstance(v, torch.Tensor):
        if v.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-dim tensor, got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        check_same_device(name, v, device)
        # Reading a CUDA value would synchronise the stream on every call; the check is done where it is free.
        if readable(v):
            value = float(v.detach())
            if not math.isfinite(value) or (nonnegative and value < 0):
                raise ValueError(f"{name} must be {what}, got {value}")
    elif isinstance(v, numbers.Real) and not isinstance(v, bool):
        if not math.isfinite(v) or (nonnegative and v < 0):
            raise ValueError(f"{name} must be {what}, got {v}")
    else:
        raise TypeError(f"{name} must be a Python float or a 0-dim tensor, got {type(v).__name__}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_inputs(x, mu, L, beta, lam, gamma=NO_GAMMA, eps: float = 1e-6) -> None:
    """Validates the head's inputs: shapes [B, D], [C, D], [D, D] or [D], [D]; one floating dtype;
    one device; lam finite and >= 0, gamma finite (NO_GAMMA: the distance, which has none), eps
    finite and >= 0."""
    _check_tensor("x", x, 2, "[B, D]")
    _check_tensor("mu", mu, 2, "[C, D]")
    _check_tensor("L", L, (1, 2), "[D, D] (full) or [D] (diagonal)")
    _check_tensor("beta", beta, 1, "[D]")
    D = x.shape[1]
    if mu.shape[1] != D:
        raise ValueError(f"mu must have shape [C, D] with D = {D} (from x), got {tuple(mu.shape)}")
    if tuple(L.shape) not in ((D, D), (D,)):
        raise ValueError(f"L must have shape [D, D] or [D] with D = {D} (from x), got {tuple(L.shape)}")
    if tuple(beta.shape) != (D,):
        raise ValueError(f"beta must have shape [D] with D = {D} (from x), got {tuple(beta.shape)}")
    for name, t in (("mu", mu), ("L", L), ("beta", beta)):
        check_same_device(name, t, x.device)
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}: all inputs must share one dtype")
    _check_scalar("lam", lam, x.device, nonnegative=True)
    if gamma is not NO_GAMMA:
        _check_scalar("gamma", gamma, x.device, nonnegative=False)
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"eps must be a Python float, got {type(eps).__name__}")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be >= 0 and finite, got {eps}")


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}: all inputs must be on one device")


def _check_index_tensor(name: str, t, shape: str, shape_ok: bool, shape_rule: str, what: str,
                        device: torch.device) -> None:
    """What every tensor of class indices must be: a tensor of the given shape (shape_ok), int64 or
    int32, on x's device. `shape` and `shape_rule` word the messages, `what` names the contents."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if not shape_ok:
        raise ValueError(f"{name} must have shape {shape_rule}, got {tuple(t.shape)}")
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64 (or int32) tensor{what}, got {t.dtype}")
    check_same_device(name, t, device)


def check_target(target, B: int, C: int, ignore_index: int, device: torch.device) -> None:
    is_tensor = isinstance(target, torch.Tensor)
    _check_index_tensor("target", target, "[B]", is_tensor and target.dim() == 1 and target.shape[0] == B,
                        f"[B] = [{B}]", " of class indices", device)
    if B > 0 and readable(target):
        valid = target[target != ignore_index]
        if valid.numel() and (bool((valid < 0).any()) or bool((valid >= C).any())):
            bad = valid[(valid < 0) | (valid >= C)][0].item()
            raise ValueError(f"target holds class index {bad}, out of range [0, {C}) "
                             f"(and not ignore_index={ignore_index})")


def check_loss_options(margin, label_smoothing, ignore_index, reduction) -> None:
    """The cross-entropy's options: margin (a distance, any real), label_smoothing in [0, 1],
    ignore_index an int, reduction 'mean' | 'sum' | 'none'."""
    if not isinstance(margin, numbers.Real) or isinstance(margin, bool):
        raise TypeError(f"margin must be a Python float, got {type(margin).__name__}")
    if not isinstance(label_smoothing, numbers.Real) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a Python float, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_class_weight(weight, C: int, x: torch.Tensor) -> None:
    """F.cross_entropy's `weight`: a floating [C] tensor on x's device (any floating dtype)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be None or a torch.Tensor of shape [C] = [{C}], got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != C:
        raise ValueError(f"weight must have shape [C] = [{C}], got {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    check_same_device("weight", weight, x.device)


def check_ce_target(target, B: int, C: int, ignore_index: int, margin, x: torch.Tensor) -> None:
    """The cross-entropy's target in any of its forms: class indices [B] (check_target), a floating
    probability target [B, C], or SoftTargets (k pairs per row). The margin sits on a row's one
    target class, so it needs class indices."""
    from .targets import SoftTargets
    if isinstance(target, SoftTargets):
        classes, probs = target.classes, target.probs
        if not isinstance(classes, torch.Tensor) or not isinstance(probs, torch.Tensor):
            raise TypeError("SoftTargets.classes and .probs must be tensors")
        if classes.dim() != 2 or classes.shape[0] != B or probs.shape != classes.shape:
            raise ValueError(f"SoftTargets must hold classes and probs of one shape [B, k] = [{B}, k], got "
                             f"{tuple(classes.shape)} and {tuple(probs.shape)}")
        if classes.dtype not in (torch.int64, torch.int32) or probs.dtype not in FLOAT_DTYPES:
            raise TypeError(f"SoftTargets.classes must be int64 (or int32) and .probs floating, got "
                            f"{classes.dtype} and {probs.dtype}")
        if classes.device != x.device or probs.device != x.device:
            raise ValueError(f"SoftTargets are on {classes.device}/{probs.device} but x is on {x.device}")
        if probs.requires_grad:
            raise ValueError("SoftTargets.probs requires grad: the fused loss does not differentiate its targets")
        if not 0.0 <= float(target.smoothing) <= 1.0:
            raise ValueError(f"SoftTargets.smoothing must be in [0, 1], got {target.smoothing}")
        if classes.numel() and readable(classes):
            if bool((classes < 0).any()) or bool((classes >= C).any()):
                bad = classes[(classes < 0) | (classes >= C)][0].item()
                raise ValueError(f"SoftTargets.classes holds class index {bad}, out of range [0, {C})")
    elif isinstance(target, torch.Tensor) and target.is_floating_point():
        if target.dim() != 2:
            raise TypeError(f"target must be an int64 (or int32) tensor of class indices [B], or a floating tensor "
                            f"of class probabilities [B, C]; got {target.dtype} of shape {tuple(target.shape)}")
        if tuple(target.shape) != (B, C):
            raise ValueError(f"a probability target must have shape [B, C] = [{B}, {C}], got {tuple(target.shape)}")
        check_same_device("target", target, x.device)
        if target.requires_grad:
            raise ValueError("target requires grad: the fused loss does not differentiate probability targets "
                             "(detach it, or use backend='reference')")
    else:
        check_target(target, B, C, ignore_index, x.device)
        return
    if ignore_index >= 0:  # F.cross_entropy's rule: a probability target has no class to ignore
        raise ValueError(f"ignore_index={ignore_index} is not supported for probability targets (as in "
                         f"F.cross_entropy): a negative ignore_index (the default, -100) is")
    if margin != 0.0:
        raise ValueError(f"margin={margin} needs class-index targets: it moves the one target logit of a row")


def check_lse_square_scale(scale) -> None:
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"lse_square_scale must be a Python float, got {type(scale).__name__}")
    if not scale >= 0.0:
        raise ValueError(f"lse_square_scale must be >= 0, got {scale}")


def check_topk(k, C: int, largest) -> None:
    """randers_topk's k: an int in [0, C] (as torch.topk); largest: a bool."""
    if not isinstance(k, numbers.Integral) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 0 <= k <= C:
        raise ValueError(f"k must be in [0, C] = [0, {C}] (C = mu.shape[0]), got {k}")
    if not isinstance(largest, bool):
        raise TypeError(f"largest must be a bool, got {type(largest).__name__}")


def check_indices(indices, B: int, C: int, device: torch.device) -> None:
    """Class indices [B, k] (int64 or int32) in [0, C), on x's device."""
    is_tensor = isinstance(indices, torch.Tensor)
    _check_index_tensor("indices", indices, "[B, k]", is_tensor and indices.dim() == 2 and indices.shape[0] == B,
                        f"[B, k] with B = {B}", "", device)
    if indices.numel() and readable(indices):
        if bool((indices < 0).any()) or bool((indices >= C).any()):
            raise ValueError(f"indices must lie in [0, {C}) (C = mu.shape[0])")
