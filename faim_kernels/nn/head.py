"""FAIMHead, the Randers (FAIM) metric classifier, and the metric on its own (RandersMetric).

    head = fk.FAIMHead(512, 1000)                  # instead of nn.Linear(512, 1000)
    logits = head(features)                        # −γ·d_F(x, mu_c), through the fused kernels
    loss = head.loss(features, target)             # the fused cross-entropy, no [B, C] logits

Parameters (the names of the reference design, so its checkpoints load unchanged):

    mu              [C, D]  class prototypes
    beta            [D]     the 1-form
    lmbda           []      λ, the weight of the 1-form: the kernels use λ = |lmbda|
    scale           []      γ, the logit scale (inverse temperature): the kernels use γ = |scale|
    L               [D, D]  full_sigma=True:  Sigma = tril(L)·tril(L)ᵀ + eps·I
    log_sigma_diag  [D]     full_sigma=False: Sigma = diag(exp(log_sigma_diag)) + eps·I

λ ≥ 0 and γ > 0 are kept by reading the raw parameters through an absolute value: whatever value
an optimiser reaches is a valid metric, and where the raw values are already non-negative (every
checkpoint of the reference design trained sensibly) the logits are exactly the reference's. The
derivative of |v| is taken as +1 at v = 0, so a head started at λ = 0 can still learn λ.

The diagonal mode maps onto the functional API's diagonal factor as L = exp(log_sigma_diag / 2)
(Sigma = diag(L²) + eps·I), the full mode passes tril(L) (docs/design.md §1, the function).
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import transform
from .. import functional as faim_functional
from .._validation import check_backend
from ..ops import contract, dispatch
from ..targets import SoftTargets
from .losses import randers_paired_distance

__all__ = ["RandersMetric", "FAIMHead", "swap_classifier", "attach_head", "ledoit_wolf_shrinkage"]

METRIC_GROUPS = ("sigma", "one_form", "scale")
HEAD_INITS = ("default", "reference")
DEFAULT_SCALE = 10.0    # γ at the start (the reference design's; measured: docs/training.md)
# A full FAIMHead (init="default") stores its L parameter 3x the metric's: the metric parameter is
# tril(L) / FULL_L_SCALE, so it starts at Sigma = I with L = 3·I, and the optimizer's steps on L move
# the metric 3x (Adam) to 9x (SGD) less than on an unscaled L (FAIMHead's docstring says why).
FULL_L_SCALE = 3.0
# head.loss forms the [B, C] logits and calls F.cross_entropy up to this size (one [B, C] array in
# the compute dtype), and runs the fused cross-entropy beyond it (FAIMHead._loss_through_logits).
# 24 MiB, where the two paths measured even (CPU, 2 threads, float32, D = 128, diagonal Σ: 1.29x
# against 1.32x nn.Linear + CE at (768, 8192); full Σ 1.22x against 1.41x). At 16 MiB the logits
# path was faster (1.05x against 1.37x at (1024, 4096, 256)); at 32 MiB the fused one (0.88x
# against 1.23x at (1024, 8192, 128)): beyond the caches, each pass over a [B, C] array, of
# F.cross_entropy's and of the logits' backward, costs more than the fused kernels' extra product.
# (256, 100000) keeps the fused kernels' memory (about 5x less than nn.Linear + F.cross_entropy).
LOSS_VIA_LOGITS_BYTES = 24 * 2 ** 20
# The largest mu (bytes) whose prepared prototypes a full-L head keeps for its no_grad calls: the cache
# holds a snapshot of mu and mu' (FAIMHead._cached_prototypes).
PROTOTYPE_CACHE_BYTES = 64 * 2 ** 20
# A full head's training forward takes the wide metric factor [tril(L) | sqrt(eps)·I] (D × 2D, no
# Cholesky) instead of cholesky(tril(L)·tril(L)ᵀ + eps·I) where (B + C)/D + B·C/D² is at most this
# (FAIMHead._wide_factor_pays). The wide factor doubles the width of the logits' GEMMs and of ∂Lc
# (about 3·B·C·D + (B + C)·D² extra multiply-adds, float32 BLAS; the kernels form x' and ∂x by
# blocks) and drops the float64 factorisation and its backward (about D³/3 + 0.8·D³ multiply-adds in
# plain loops, most of a small full head's step). Measured on 2 threads (bench/RESULTS.md, the wide
# metric factor): the wide factor is 1.2x-2.1x faster up to 4.5 ((512, 100, 256), (32, 1000, 256)),
# and the Cholesky factor 1.05x-1.3x faster from 12 ((64, 1000, 128), (256, 1000, 128)); on one
# thread the same table put the bound at the same place.
WIDE_FACTOR_MAX_COST = 6.0


def _nonneg(v: torch.Tensor) -> torch.Tensor:
    """|v| whose derivative is +1 at v = 0 (torch.abs has 0 there, which would pin λ = 0 for good)."""
    return torch.where(v >= 0, v, -v)


class _GraphMetricArgs(NamedTuple):
    """head_metric's raw arguments for a call that records a graph through the metric (FAIMHead's
    training calls), which the forward hands to the one op faim_kernels::head_logits."""
    sigma: torch.Tensor  # log_sigma_diag, or L / L_scale
    lmbda: torch.Tensor
    scale: torch.Tensor
    full: bool
    wide: bool


class _MetricParams(nn.Module):
    """The metric's parameters (Sigma's factor, beta, lmbda) and what can be computed from them alone.

    F(v) = sqrt(vᵀ·Sigma·v + eps) + λ·sqrt((βᵀv)² + eps) and d_F(x, y) = F(x − y) (docs/design.md Eq. 2).
    """

    def _init_metric(self, dim: int, full_sigma: bool, lambda_init: float, eps: float, backend: str,
                     factory: dict) -> None:
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"in_features must be a positive int, got {dim!r}")
        if not (isinstance(lambda_init, (int, float)) and lambda_init >= 0):
            raise ValueError(f"lambda_init must be a float >= 0, got {lambda_init!r}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps must be a float >= 0, got {eps!r}")
        check_backend(backend)
        self.in_features = dim
        self.full_sigma = bool(full_sigma)
        self.eps = float(eps)
        self.backend = backend
        self._lambda_init = float(lambda_init)
        self.beta = nn.Parameter(torch.empty(dim, **factory))
        self.lmbda = nn.Parameter(torch.empty((), **factory))

    def _init_sigma(self, factory: dict) -> None:
        if self.full_sigma:
            self.L = nn.Parameter(torch.empty(self.in_features, self.in_features, **factory))
        else:
            self.log_sigma_diag = nn.Parameter(torch.empty(self.in_features, **factory))

    def _reset_metric(self) -> None:
        with torch.no_grad():
            self.beta.normal_()
            self.lmbda.fill_(self._lambda_init)
            if self.full_sigma:
                self.L.copy_(torch.eye(self.in_features))
            else:
                self.log_sigma_diag.zero_()

    # -- the metric as the functional API takes it -------------------------------------------------
    @property
    def lam(self) -> torch.Tensor:
        """λ = |lmbda| (0-dim tensor, differentiable)."""
        return _nonneg(self.lmbda)

    def no_weight_decay(self) -> set[str]:
        """The names of the parameters that weight decay must leave alone: Sigma's (L or
        log_sigma_diag), beta, lmbda and, in a FAIMHead, scale; the prototypes mu are decayed.

        Why one policy for both Sigma modes: their Sigma parameters mean different things, so a decay
        on them regularises differently (on a full L it pulls Sigma towards 0, a singular metric; on
        log_sigma_diag towards Sigma = I), and PyTorch-style rules by ndim (timm's optimizer factory
        decays every parameter with ndim >= 2) would decay the full head's L and not the diagonal
        head's. The metric and γ are few numbers that set the logits' scale, not weights to shrink.
        mu has nn.Linear's weight's shape and initialisation, and is decayed as that weight is.
        timm's create_optimizer_v2 reads a model's no_weight_decay(): swap_classifier and
        faim_kernels.integrations.timm.create_model add these names to the model's (e.g. "fc.beta")."""
        names = {"beta", "lmbda", "L" if self.full_sigma else "log_sigma_diag"}
        if isinstance(getattr(self, "scale", None), nn.Parameter):
            names.add("scale")
        return names

    def sigma_parameter(self) -> nn.Parameter:
        return self.L if self.full_sigma else self.log_sigma_diag

    def metric_L(self) -> torch.Tensor:
        """The metric parameter L of the functional API: tril(L) [D, D] (divided by the L_scale buffer of
        a FAIMHead that has one: FULL_L_SCALE), or exp(log_sigma_diag / 2) [D] (Sigma = L·Lᵀ + eps·I, or
        diag(L²) + eps·I). Not the metric factor Lc the kernels use (transform.metric_factor)."""
        if self.full_sigma:
            l_scale = self._buffers.get("L_scale")
            return torch.tril(self.L) if l_scale is None else torch.tril(self.L) / l_scale
        return torch.exp(0.5 * self.log_sigma_diag)

    def metric_args(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L, beta, lam) for fk.randers_distance & co., cast to `dtype` when given."""
        L, beta, lam = self.metric_L(), self.beta, self.lam
        if dtype is not None:
            L, beta, lam = L.to(dtype), beta.to(dtype), lam.to(dtype)
        return L, beta, lam

    def sigma(self) -> torch.Tensor:
        """Sigma [D, D] (as the reference design's _sigma())."""
        from ..reference import sigma
        return sigma(self.metric_L(), self.eps)

    # -- distances ---------------------------------------------------------------------------------
    def _check_features(self, name: str, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [..., {self.in_features}], got {type(t).__name__}")
        if t.dim() == 0 or t.shape[-1] != self.in_features:
            raise ValueError(f"{name} must have shape [..., {self.in_features}] (in_features = {self.in_features}), "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():  # as nn.Linear: integer features are a caller's mistake, not cast
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it scripts: say why it cannot, and what works,
        # instead of failing deep inside the Python it cannot compile.
        raise RuntimeError(f"faim_kernels: {type(self).__name__} is not scriptable with torch.jit.script (its "
                           f"forward validates and dispatches in Python). torch.export.export and torch.jit.trace "
                           f"work, and so does torch.compile.")

    def _common_dtype(self, *tensors: torch.Tensor) -> torch.dtype:
        dtype = self.beta.dtype
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        return dtype

    def cdist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """d_F(x_i, y_j) for every pair -> [N, M] (x [N, D], y [M, D]), through the fused kernels."""
        self._check_features("x", x)
        self._check_features("y", y)
        dtype = self._common_dtype(x, y)
        return faim_functional.randers_distance(x.to(dtype), y.to(dtype), *self.metric_args(dtype), eps=self.eps,
                                                backend=self.backend)

    def paired_distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """d_F(a_i, b_i) for matching rows -> [...] (plain PyTorch, O(N·D²) full, O(N·D) diagonal)."""
        self._check_features("a", a)
        self._check_features("b", b)
        dtype = self._common_dtype(a, b)
        return randers_paired_distance(a.to(dtype), b.to(dtype), *self.metric_args(dtype), eps=self.eps)

    def norm(self, v: torch.Tensor) -> torch.Tensor:
        """F(v) = d_F(v, 0) -> [...]: the Randers length of tangent vectors v [..., D]."""
        return self.paired_distance(v, torch.zeros_like(v))

    def _metric_repr(self) -> str:
        return (f"sigma={'full' if self.full_sigma else 'diagonal'}, lambda={self.lam.item():.4g}, "
                f"eps={self.eps:g}, backend={self.backend!r}")


class RandersMetric(_MetricParams):
    """The learnable Randers metric alone (Sigma, beta, λ; no prototypes, no scale), for the metric
    losses and FAIMBlock. `metric(x, y)` is `metric.cdist(x, y)`: all pairwise distances [N, M].

    A FAIMHead has the same methods and attributes, so a loss can share a head's metric instead.
    """

    def __init__(self, dim: int, full_sigma: bool = False, lambda_init: float = 0.1, eps: float = 1e-6,
                 *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self._init_metric(dim, full_sigma, lambda_init, eps, backend, factory)
        self._init_sigma(factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_metric()
        with torch.no_grad():  # a small 1-form: the metric starts close to the Mahalanobis one
            self.beta.mul_(0.1 / math.sqrt(self.in_features))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.cdist(x, y)

    def extra_repr(self) -> str:
        return f"dim={self.in_features}, " + self._metric_repr()


class FAIMHead(_MetricParams):
    """Randers (FAIM) metric classification head: logits_c = −γ·d_F(x, mu_c) (docs/design.md Eq. 2, 3).

    A drop-in for `nn.Linear(in_features, num_classes)` as a classifier: input [..., in_features],
    output [..., num_classes].

    Args:
        in_features:  feature dimension D.
        num_classes:  number of classes C.
        lambda_init:  initial λ (weight of the 1-form), >= 0.
        scale_init:   initial γ (logit scale), > 0; None (the default): γ = 10. Sigma starts at I.
        full_sigma:   learn a full Sigma = L_m·L_mᵀ + eps·I (D² parameters) instead of a diagonal one,
                      where the metric parameter L_m = tril(L) / L_scale (metric_L()): with init="default"
                      the parameter L is stored 3x the metric's (the buffer L_scale = 3, L = 3·I at the
                      start; see below), with init="reference" as the metric's (L_scale = 1).
        eps:          Sigma's ridge and the smoothing of both square roots.
        backend:      "auto" (the Triton kernels on CUDA, the C++ kernels on CPU), "cpp", "triton",
                      "torch" (plain PyTorch ops) or "reference" (the einsum oracle); an attribute, so `head.backend = ...` works too.
        init:         "default": mu ~ U(−1/√D, 1/√D) (nn.Linear's weight init), beta ~ N(0, 1/D),
                      Sigma = I (full: see scale_init); "reference": the reference design's mu,
                      beta ~ N(0, 1), Sigma = I, γ = 10, to reproduce its experiments. λ = lambda_init.

    Why the default: with the reference init the prototypes sit at norm ~√D, the first loss is far
    above log C (14 for 10 classes at D = 512) and the first gradients of mu, λ and the backbone are
    ~100x nn.Linear's, so SGD at lr 0.1, momentum 0.9 diverges to NaN (timm's recipe too). Prototypes
    as small as nn.Linear's weights start the logits near uniform, and the head then trained at least
    as fast as nn.Linear under SGD lr 0.1 momentum 0.9, AdamW lr 1e-3 and timm's train-script
    defaults on a small CNN (bench/head_recipes.py; on a ResNet-18 under AdamW it is slower,
    docs/training.md). γ = 10 was kept: γ = 3 trained slower than nn.Linear under AdamW, γ = 30
    diverged under SGD. A full L starting at I learnt too fast under SGD lr 0.1 in minibatch training (the
    gradient of d in L is ~|x − mu| whatever L's scale, against ‖L‖ = √D; digits: loss 1.01 after 4
    epochs, nn.Linear 0.185). Storing L 3x the metric's (L_m = L / 3) slows the metric's steps by 3
    (Adam) to 9 (SGD) and leaves every other parameter as the diagonal head's: the same γ = 10 and
    beta, the same gradients in mu, beta, λ, γ and the features at the start (tests/test_nn_training.py).
    The earlier way to slow L, L = 3·I as the metric itself with beta·3 and γ = 10/3, gave the same
    logits but moved γ 9x and beta 1/9x as fast relative to their values under SGD, and trailed
    nn.Linear on ResNet-18 (docs/training.md, the timm recipes).

    A better start is `head.init_from_features(features, labels)`. Warm-up schedules:
    `freeze_metric()` / `unfreeze_metric()` and `param_groups()`.
    """

    def __init__(self, in_features: int, num_classes: int, lambda_init: float = 0.1, scale_init: float | None = None,
                 full_sigma: bool = False, eps: float = 1e-6, *, init: str = "default", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {HEAD_INITS}, got {init!r}")
        self.init = init
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not (scale_init is None or (isinstance(scale_init, (int, float)) and scale_init > 0)):
            raise ValueError(f"scale_init must be None or a float > 0, got {scale_init!r}")
        factory = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self._scale_init = DEFAULT_SCALE if scale_init is None else float(scale_init)
        self.mu = nn.Parameter(torch.empty(num_classes, in_features, **factory))
        self._init_metric(in_features, full_sigma, lambda_init, eps, backend, factory)
        self.scale = nn.Parameter(torch.empty((), **factory))
        self._init_sigma(factory)  # parameter order as in the reference design: mu, beta, lmbda, scale, Sigma's
        if self.full_sigma:
            # The metric is tril(L) / L_scale. A buffer, not a constant: it travels with the state dict
            # (its absence marks a checkpoint from before the scaled L, which _load_from_state_dict converts).
            l_scale = FULL_L_SCALE if init == "default" else 1.0
            self.register_buffer("L_scale", torch.tensor(l_scale, **factory))
        self.reset_parameters()

    @property
    def out_features(self) -> int:  # nn.Linear's name, for code that reads it off a classifier
        return self.num_classes

    def __getattr__(self, name: str):
        # nn.Module.__getattr__ finds the parameters; this only adds an answer for code written for
        # an nn.Linear classifier (timm's train.py --head-init-scale / --head-init-bias) instead of a
        # bare "no attribute 'weight'".
        # Parameters first, straight from the dict: every `self.mu` in a forward lands here (a
        # parameter is not an instance attribute), and a small head's call reads seven of them.
        parameters = self.__dict__.get("_parameters")
        if parameters is not None and name in parameters:
            return parameters[name]
        if name == "weight" or name == "bias":
            raise AttributeError(
                f"FAIMHead has no {name!r}: it is not a linear layer (logits = -gamma * d_F(x, mu_c); "
                f"parameters {', '.join(n for n, _ in self.named_parameters())}). Prototypes: head.mu "
                f"[C, D]. To scale the initial logits as timm's --head-init-scale s does for a Linear, "
                f"multiply head.scale (gamma) by s, e.g. faim_kernels.integrations.timm.create_model(..., "
                f"head_init_scale=s). A bias the same for every class (timm's --head-init-bias) does not "
                f"change a softmax and has no counterpart.")
        return super().__getattr__(name)

    def _init_kwargs(self) -> dict:
        """The constructor's options (not the sizes) that give a head initialised as this one was:
        a new classifier of another size keeps the configuration (timm's reset_classifier)."""
        return {"lambda_init": self._lambda_init, "full_sigma": self.full_sigma, "eps": self.eps,
                "init": self.init, "backend": self.backend, "scale_init": self._scale_init}

    @property
    def gamma(self) -> torch.Tensor:
        """γ = |scale| (0-dim tensor, differentiable)."""
        return _nonneg(self.scale)

    def reset_parameters(self) -> None:
        self._reset_metric()
        with torch.no_grad():
            if self.init == "reference":  # the reference design's: mu, beta ~ N(0, 1)
                self.mu.normal_()
            else:  # see the class docstring and docs/training.md for the measurements
                nn.init.kaiming_uniform_(self.mu, a=math.sqrt(5))  # nn.Linear's weight: U(−1/√D, 1/√D)
                self.beta.div_(math.sqrt(self.in_features))
            if self.full_sigma:  # Sigma = I: the metric tril(L) / L_scale = I
                # L_scale too: after to_empty() (deferred initialisation) the buffer holds whatever
                # the new memory held, as BatchNorm's running statistics do until reset.
                self.L_scale.fill_(FULL_L_SCALE if self.init == "default" else 1.0)
                self.L.mul_(self.L_scale)
            self.scale.fill_(self._scale_init)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A full head's checkpoint without L_scale predates the scaled L: its L is the metric's, so it is
        # stored times this head's L_scale (the logits are unchanged; test_nn_head.py loads such dicts).
        if self.full_sigma and prefix + "L" in state_dict and prefix + "L_scale" not in state_dict:
            old_L = state_dict[prefix + "L"]  # (on the checkpoint's device, e.g. a CPU map_location)
            state_dict[prefix + "L"] = old_L * self.L_scale.to(old_L)
            state_dict[prefix + "L_scale"] = self.L_scale.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # -- forward and loss --------------------------------------------------------------------------
    def _fast_metric(self, x, wide_ok: bool = False, graph_args: bool = False) -> tuple | None:
        """(lc, lam, gamma) through one C++ op (faim_kernels::head_metric) where the call can take the
        fast path straight to the C++ kernels, else None (the general path through the functional API).

        Why: a small head's forward was mostly the ~12 small ATen ops (and autograd nodes) that form
        exp(log σ / 2), sqrt(L² + eps), |lmbda|, |scale|, the casts, and the functional API's checks
        around the one kernel call; here they are one op, and the checks that the module's own
        construction already guarantees (shapes, dtypes, device, eps) are not repeated. The direct
        path takes CPU tensors of the parameters' dtype (float32/float64) on the C++ kernels, outside
        autocast, torch.compile and torch.func transforms; everything else takes the general path,
        which computes the same values (tests/test_nn_head_paths.py compares the two).

        wide_ok: the caller (the logits op; the cross-entropy op takes a square factor) accepts the
        wide factor of a full L, which a training call takes where it pays (_wide_factor_pays).
        graph_args: where a graph is recorded through the metric, return head_metric's arguments
        (_GraphMetricArgs) instead of calling it, for the forward's one op head_logits."""
        parameters = self._parameters
        mu = parameters.get("mu")
        if not (mu is not None and type(x) is torch.Tensor and x.is_cpu and mu.is_cpu and x.dtype is mu.dtype
                and (x.dtype is torch.float32 or x.dtype is torch.float64) and x.dim() >= 1
                and x.shape[-1] == self.in_features and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()):
            return None
        if not dispatch.cpp_serves_cpu(self.backend):
            return None
        sigma = parameters.get("L" if self.full_sigma else "log_sigma_diag")
        lmbda, scale = parameters.get("lmbda"), parameters.get("scale")
        if sigma is None or lmbda is None or scale is None or "beta" not in parameters:
            return None  # a parameter replaced by a buffer or a plain tensor: the general path
        # a graph is recorded through the metric: a fresh head_metric call; else the cached result
        records_graph = torch.is_grad_enabled() and (sigma.requires_grad or lmbda.requires_grad
                                                     or scale.requires_grad)
        if not self.full_sigma:
            if records_graph:
                if graph_args:
                    return _GraphMetricArgs(sigma, lmbda, scale, False, False)
                return contract.head_metric_op(sigma, lmbda, scale, False, self.eps)[:3]
            return self._cached_metric(sigma, None, lmbda, scale)
        l_scale = self._buffers.get("L_scale")
        if l_scale is None or l_scale.dtype is not sigma.dtype or not l_scale.is_cpu:
            return None
        if records_graph:
            wide = wide_ok and self._wide_factor_pays(x)
            if graph_args:
                return _GraphMetricArgs(sigma / l_scale, lmbda, scale, True, wide)
            # through_gram: the head's own ops consume lc only through lc·lcᵀ (head_metric's cheaper
            # Cholesky backward, csrc/head_metric.cpp)
            return contract.head_metric_op(sigma / l_scale, lmbda, scale, True, self.eps, wide, True)[:3]
        return self._cached_metric(sigma, l_scale, lmbda, scale)

    def _wide_factor_pays(self, x) -> bool:
        """Whether a full head's training call takes the wide factor [tril(L) | sqrt(eps)·I]: where
        B and C are small against D (WIDE_FACTOR_MAX_COST), so that the width-2D GEMMs
        cost less than the float64 Cholesky factorisation and its backward that they replace; never
        with eps = 0 (Sigma = L·Lᵀ: the factor is tril(L) itself up to signs, and head_metric refuses
        a singular one as before)."""
        D, C = self.in_features, self.num_classes
        if not (self.eps > 0 and D > 0):
            return False
        B = x.numel() // D
        return (B + C) / D + B * C / (D * D) <= WIDE_FACTOR_MAX_COST

    def _cached_metric(self, sigma, l_scale, lmbda, scale) -> tuple:
        """head_metric's (lc, lam, gamma), reused while the metric parameter (L or log_sigma_diag),
        L_scale (full; None for the diagonal head), lmbda, scale and eps keep their values, where no graph
        is recorded through them (no_grad / inference, or a frozen metric): an evaluation loop or a
        frozen-metric phase then pays the D×D Cholesky once, not on every call (at (64, 10, 64) it was
        most of a no_grad call). The check compares values (one equality of the metric parameter and
        three scalars: O(D²), O(D) diagonal), not version counters: an in-place change through `.data`
        (as some EMA code does) bumps no counter. The diagonal head caches too: its check (~3 µs)
        costs less than the op call it saves (~9 µs); a no_grad call at (64, 10, 64) measured 53-56 µs
        against 57-64 µs without it (alternating runs, one thread)."""
        inference = torch.is_inference_mode_enabled()
        full = l_scale is not None
        lam_value, gamma_value = lmbda.item(), scale.item()
        l_scale_value = l_scale.item() if full else None
        cache = self.__dict__.get("_metric_cache")
        if cache is not None:
            snapshot, eps, was_inference, scalars_were, metric = cache
            if (eps == self.eps and was_inference == inference and scalars_were == (lam_value, gamma_value, l_scale_value)
                    and snapshot.dtype == sigma.dtype and snapshot.device == sigma.device
                    and torch.equal(snapshot, sigma)):
                return metric
        metric = contract.head_metric_op(sigma / l_scale if full else sigma, lmbda, scale, full, self.eps)[:3]
        self.__dict__["_metric_cache"] = (sigma.detach().clone(), self.eps, inference,
                                          (lam_value, gamma_value, l_scale_value), metric)
        return metric

    def _cached_prototypes(self, lc) -> tuple | None:
        """The prototypes' half of the preparation, (m, mu', mu·beta) of faim_kernels::randers_prototypes,
        reused across no_grad calls of a full-L head while lc (the cached metric factor of
        _cached_metric, compared by identity), mu and beta keep their values; None where mu is
        too large to keep a snapshot of (PROTOTYPE_CACHE_BYTES).

        Why: mu' = (mu − m)·Lc is a C×D² GEMM, as much work as the logits GEMM itself when C·D >= B·C
        (a small batch) and half of it at (512, 4096, 256); an evaluation loop pays it once. The check
        compares values (O(C·D), against the GEMM's O(C·D²)), as the metric cache does, so an in-place
        change through `.data` is seen too; the snapshot and mu' hold two copies of mu's size."""
        mu, beta = self._parameters["mu"], self._parameters["beta"]
        if mu.numel() * mu.element_size() > PROTOTYPE_CACHE_BYTES:
            return None
        inference = torch.is_inference_mode_enabled()
        cache = self.__dict__.get("_prototype_cache")
        if cache is not None:
            lc_was, was_inference, mu_was, beta_was, prepared = cache
            if (lc_was is lc and was_inference == inference and mu_was.dtype == mu.dtype
                    and mu_was.shape == mu.shape and beta_was.dtype == beta.dtype
                    and torch.equal(mu_was, mu) and torch.equal(beta_was, beta)):
                return prepared
        prepared = contract.prototypes_op(mu, lc, beta)
        self.__dict__["_prototype_cache"] = (lc, inference, mu.detach().clone(), beta.detach().clone(), prepared)
        return prepared

    def _tau(self, lc: torch.Tensor | None = None, wide: bool = False) -> float:
        # The near threshold depends on the length of the GEMM's sums only (transform.near_threshold,
        # Eq. 14; the same for the float32 and float64 the C++ kernels take): D, or 2D with the wide
        # factor (lc [D, 2D], or wide); computed once per head and width.
        width = lc.shape[1] if lc is not None and lc.dim() == 2 else self.in_features * (2 if wide else 1)
        taus = self.__dict__.get("_near_taus")
        tau = taus.get(width) if taus is not None else None
        if tau is None:
            tau = transform.near_threshold(width, self.mu.dtype)
            self.__dict__.setdefault("_near_taus", {})[width] = tau
        return tau

    def _prepare(self, x: torch.Tensor):
        self._check_features("x", x)
        dtype = self._common_dtype(x)
        L, beta, lam = self.metric_args(dtype)
        return x.reshape(-1, self.in_features).to(dtype), self.mu.to(dtype), L, beta, lam, self.gamma.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """logits [..., C] = −γ·d_F(x, mu_c) for x [..., D] (computed in x's dtype promoted with the
        parameters' dtype)."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        fast = self._fast_metric(x, wide_ok=True, graph_args=True)
        if fast is not None:
            xf = x if x.dim() == 2 else x.reshape(-1, self.in_features)
            parameters = self._parameters
            if type(fast) is _GraphMetricArgs:
                # A training call: head_metric and the logits op as one op and one autograd node
                # (csrc/head_metric.cpp, head_logits).
                logits = contract.head_logits_op(xf, parameters["mu"], fast.sigma, parameters["beta"], fast.lmbda,
                                                 fast.scale, fast.full, self.eps, self._tau(wide=fast.wide), fast.wide)
                return logits if x.dim() == 2 else logits.reshape(*lead, self.num_classes)
            lc, lam, gamma = fast
            prepared = self._cached_prototypes(lc) if self.full_sigma and not torch.is_grad_enabled() else None
            if prepared is not None:
                logits = contract.logits_prepared_op(xf, parameters["mu"], lc, parameters["beta"], lam, gamma,
                                                     *prepared, self.eps, self._tau(lc))
            else:
                logits = contract.logits_op(xf, parameters["mu"], lc, parameters["beta"], lam, gamma, self.eps,
                                            self._tau(lc))[0]
            return logits if x.dim() == 2 else logits.reshape(*lead, self.num_classes)
        xf, mu, L, beta, lam, gamma = self._prepare(x)
        logits = faim_functional.randers_logits(xf, mu, L, beta, lam, gamma, eps=self.eps, backend=self.backend)
        return logits.reshape(*lead, self.num_classes)

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """d_F(x, mu_c) [..., C]: the distances behind the logits."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        xf, mu, L, beta, lam, _ = self._prepare(x)
        return faim_functional.randers_distance(xf, mu, L, beta, lam, eps=self.eps, backend=self.backend).reshape(
            *lead, self.num_classes)

    def loss(self, x: torch.Tensor, target, **ce_options):
        """F.cross_entropy(self(x), target) without forming the logits (fk.randers_cross_entropy).

        target: class indices [...] (x's leading dims), class probabilities [..., C], or
        fk.SoftTargets with classes and probs [..., k] (e.g. fk.mixup_soft_targets of timm's Mixup
        labels: no [B, C] tensor at all). ce_options: margin (an additive distance margin on the
        target class, CosFace-style: logit_t = −γ·(d_t + margin); class indices only), weight,
        label_smoothing, ignore_index, reduction, lse_square_scale (z-loss), return_lse, as in
        fk.randers_cross_entropy. reduction="none" and the returned lse have x's leading shape.
        """
        # The most common call first, with nothing but the checks it needs: [B, D] features, [B]
        # int64 class indices, no option, logits within LOSS_VIA_LOGITS_BYTES. It is what the
        # general path below does for it, without ~8 µs of option handling (3 % of a small head's step).
        if (not ce_options and type(x) is torch.Tensor and type(target) is torch.Tensor and x.dim() == 2
                and target.dim() == 1 and target.dtype is torch.int64 and target.shape[0] == x.shape[0]
                and x.shape[0] * self.num_classes * x.element_size() <= LOSS_VIA_LOGITS_BYTES):
            return F.cross_entropy(self(x), target)
        lead = tuple(x.shape[:-1]) if isinstance(x, torch.Tensor) else None
        if self._loss_through_logits(x, target, ce_options):
            return self._logits_loss(x, self._flat_target(target, lead), lead, ce_options)
        fast = self._fast_loss(x, target, ce_options)
        if fast is not None:
            return fast
        flat = self._flat_target(target, lead)
        reduction = ce_options.get("reduction", "mean")
        xf, mu, L, beta, lam, gamma = self._prepare(x)
        out = faim_functional.randers_cross_entropy(xf, mu, L, beta, lam, gamma, flat, eps=self.eps,
                                                    backend=self.backend, **ce_options)
        loss, lse = out if ce_options.get("return_lse", False) else (out, None)
        if reduction == "none" and lead is not None:
            loss = loss.reshape(lead)
        if lse is None:
            return loss
        return loss, lse.reshape(lead) if lead is not None else lse

    def _flat_target(self, target, lead):
        """The target with x's leading dims flattened ([B], [B, C] or SoftTargets [B, k]), its shape
        checked against them (lead None: x is not a tensor, which the functional API refuses)."""
        if isinstance(target, SoftTargets):
            if lead is not None and tuple(target.classes.shape[:-1]) != lead:
                raise ValueError(f"SoftTargets must have classes and probs of shape {lead + ('k',)}, got "
                                 f"{tuple(target.classes.shape)}")
            k = target.classes.shape[-1]
            return SoftTargets(target.classes.reshape(-1, k), target.probs.reshape(-1, k), target.smoothing)
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            if lead is not None and tuple(target.shape) != lead + (self.num_classes,):
                raise ValueError(f"a probability target must have shape {lead + (self.num_classes,)}, got "
                                 f"{tuple(target.shape)}")
            return target.reshape(-1, self.num_classes)  # a view where it can be: never a copy of a contiguous target
        if isinstance(target, torch.Tensor) and lead is not None and tuple(target.shape) != lead:
            raise ValueError(f"target must have shape {lead} (x's leading dims), got {tuple(target.shape)}")
        # no view where it is flat already: a view op costs ~5 µs, a tenth of a small head's loss
        return target if isinstance(target, torch.Tensor) and target.dim() == 1 else target.reshape(-1)

    def _loss_through_logits(self, x, target, ce_options: dict) -> bool:
        """Whether head.loss forms the logits and calls F.cross_entropy on them: where the [B, C]
        logits are small (at most LOSS_VIA_LOGITS_BYTES) and the call uses only F.cross_entropy's
        own options. That path does three B×C×D products (the forward GEMM, then ∂x and ∂mu), the
        fused kernels four (they recompute the logits in the backward instead of keeping them), so
        where memory is no concern it is the faster one; where the logits are large the fused
        kernels keep memory at O(B + C) extra, which is what they are for (docs/design.md §2.4)."""
        if not (isinstance(x, torch.Tensor) and type(target) is torch.Tensor
                and set(ce_options) <= {"weight", "label_smoothing", "ignore_index", "reduction"}):
            return False
        weight = ce_options.get("weight")
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            return False  # F.cross_entropy refuses to differentiate class weights; the fused kernels do
        rows = x.numel() // max(self.in_features, 1)
        return rows * self.num_classes * x.element_size() <= LOSS_VIA_LOGITS_BYTES

    def _logits_loss(self, x, flat, lead, ce_options: dict):
        """F.cross_entropy(self(x), target, **ce_options), the target flattened by _flat_target."""
        logits = self(x)
        if logits.dim() != 2:  # (no view, and no view's backward node, for the common [B, D] features)
            logits = logits.reshape(-1, self.num_classes)
        if flat.dtype == torch.int32:  # F.cross_entropy takes int64 class indices only
            flat = flat.long()
        elif flat.is_floating_point() and flat.dtype != logits.dtype:
            flat = flat.to(logits.dtype)
        weight = ce_options.get("weight")
        options = dict(ce_options, weight=weight.to(logits.dtype)) if isinstance(weight, torch.Tensor) else ce_options
        loss = F.cross_entropy(logits, flat, **options)
        return loss.reshape(lead) if ce_options.get("reduction", "mean") == "none" else loss

    def _fast_loss(self, x, target, ce_options: dict):
        """head.loss on the fast path (see _fast_metric) for the common call: class indices of x's
        leading shape, reduction 'mean' or 'sum', ignore_index, and no other option; None otherwise.
        The loss is F.cross_entropy's: Σ over counted rows of lse_b − logit_b,t_b, divided by their
        number for 'mean' (NaN when there is none). The range of the targets is checked inside the
        kernel (an index outside [0, C) that is not ignore_index raises there)."""
        reduction = ce_options.get("reduction", "mean")
        ignore_index = ce_options.get("ignore_index", -100)
        if (set(ce_options) - {"reduction", "ignore_index"} or reduction not in ("mean", "sum")
                or type(target) is not torch.Tensor or target.dtype not in (torch.int64, torch.int32)
                or not isinstance(ignore_index, int) or isinstance(ignore_index, bool)
                or target.device.type != "cpu" or target.shape != x.shape[:-1]):
            return None
        fast = self._fast_metric(x)
        if fast is None:
            return None
        lc, lam, gamma = fast
        t = target.reshape(-1).long()
        ignored = t == ignore_index
        # −1 is the kernels' "no target here": an ignored row; a −1 that is not ignore_index is out of
        # range and must be refused, so it becomes −2, which the kernel refuses.
        kernel_target = t if ignore_index == -1 else t.masked_fill(t == -1, -2)
        lse, target_logit, _, _ = contract.cross_entropy_op(x.reshape(-1, self.in_features), self.mu, lc, self.beta, lam,
                                                  gamma, kernel_target.masked_fill(ignored, -1), self.eps,
                                                  self._tau(), 0.0)
        total = (lse - target_logit).masked_fill(ignored, 0.0).sum()
        if reduction == "mean":
            total = total / (ignored.numel() - ignored.sum())
        return total.to(x.dtype)

    def predict(self, x: torch.Tensor, k: int = 1) -> torch.Tensor:
        """The nearest prototype in d_F: argmin_c d_F(x, mu_c) [...] (= argmax of the logits); with
        k > 1 the k nearest [..., k], nearest first. Through fk.randers_topk: no [B, C] distances or
        logits are formed, so it serves millions of classes. Ties go to the lower class index."""
        return self.topk(x, k)[1] if k != 1 else self.topk(x, 1)[1][..., 0]

    @torch.no_grad()
    def topk(self, x: torch.Tensor, k: int, *, largest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(distances [..., k], indices [..., k]): the k prototypes nearest to x in d_F (largest=True:
        the k farthest), sorted, ties by the lower index, without forming the [B, C] logits
        (fk.randers_topk). Their logits are −γ·distances, so for γ > 0 the indices are those of
        head(x).topk(k). Not differentiable: for a loss on the selected classes, recompute their
        distances with fk.randers_distance_at(x, head.mu, *head.metric_args(), indices)."""
        lead = x.shape[:-1] if isinstance(x, torch.Tensor) else ()
        xf, mu, L, beta, lam, _ = self._prepare(x)
        d, idx = faim_functional.randers_topk(xf, mu, L, beta, lam, k, eps=self.eps, largest=largest,
                                              backend=self.backend)
        return d.reshape(*lead, k), idx.reshape(*lead, k)

    # -- training schedules ------------------------------------------------------------------------
    def _groups(self) -> dict[str, list[nn.Parameter]]:
        return {"prototypes": [self.mu], "sigma": [self.sigma_parameter()], "one_form": [self.beta, self.lmbda],
                "scale": [self.scale]}

    def param_groups(self, **options: dict) -> list[dict]:
        """Optimizer parameter groups named "prototypes" (mu), "sigma" (L or log_sigma_diag),
        "one_form" (beta, lmbda) and "scale"; per-group options by name, e.g.

            torch.optim.AdamW(head.param_groups(sigma={"lr": 1e-4}, scale={"weight_decay": 0.0}), lr=1e-3)
        """
        groups = self._groups()
        unknown = set(options) - set(groups)
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}; the groups are {list(groups)}")
        return [{"name": name, "params": params, **options.get(name, {})} for name, params in groups.items()]

    def _set_trainable(self, groups: Iterable[str], flag: bool) -> "FAIMHead":
        groups = (groups,) if isinstance(groups, str) else tuple(groups)
        all_groups = self._groups()
        for g in groups:
            if g not in all_groups:
                raise ValueError(f"unknown parameter group {g!r}; the groups are {list(all_groups)}")
            for p in all_groups[g]:
                p.requires_grad_(flag)
        return self

    def freeze_metric(self, groups: Iterable[str] = METRIC_GROUPS) -> "FAIMHead":
        """Stops training the metric (Sigma, the 1-form and γ by default; any of "sigma", "one_form",
        "scale", "prototypes"): the warm-up phase of the reference design, where only the prototypes
        and the backbone learn. Optimizers skip parameters without gradients."""
        return self._set_trainable(groups, False)

    def unfreeze_metric(self, groups: Iterable[str] = METRIC_GROUPS) -> "FAIMHead":
        """Trains the named groups again (all of the metric by default)."""
        return self._set_trainable(groups, True)

    # -- closed-form initialisation ----------------------------------------------------------------
    @torch.no_grad()
    def init_from_features(self, features: torch.Tensor, labels: torch.Tensor, shrinkage: float | str = "auto",
                           beta_scale: float = 1e-2, generator: torch.Generator | None = None, *,
                           whiten: bool = False, fit_scale: bool = True, label_smoothing: float = 0.0) -> "FAIMHead":
        """Sets the head to the Mahalanobis nearest-class-mean classifier of (features, labels).

        - mu_c = the mean of class c's features (classes absent from `labels` keep their prototype);
        - Sigma = c·S⁻¹, S the within-class covariance shrunk towards (tr S / D)·I:
          S = (1 − a)·S_w + a·(tr S_w / D)·I, with a from Ledoit–Wolf (shrinkage="auto") or given in
          [0, 1]. This is the Fisher/LDA metric; a diagonal head takes Sigma = c·diag(S)⁻¹ (LDA with a
          diagonal covariance). c = tr S / D keeps distances in the features' own units, as the
          default Sigma = I does (isotropic features give Sigma = I); whiten=True takes c = 1, distances in
          within-class standard deviations. Why not whiten by default: ∂d/∂x = Sigma·diff/d grows as
          1/std, and the untrained backbones' features have small std (0.1 or less): with Sigma = S⁻¹
          and γ = 10 the first SGD steps (lr 0.1, momentum 0.9) sent the loss to NaN
          (bench/head_recipes.py);
        - beta is a random direction with βᵀ·Sigma⁻¹·β = beta_scale², so |βᵀv| <= beta_scale·sqrt(vᵀSigma v):
          the 1-form starts as a small perturbation (not 0: at β = 0 its gradient vanishes);
        - fit_scale=True: γ becomes the temperature that minimises the mean cross-entropy of these
          features (temperature scaling: convex in γ, solved by bisection on its derivative, on at
          most 8192 of the samples), but never more than the current γ: a calibrated start, and the
          gradients it sends to the backbone no larger than the head's before. Pass the
          `label_smoothing` the training loss uses: on separable features (few samples, or a strong
          backbone) the unsmoothed fit runs into the cap, and a smoothed loss then starts high
          (8.9 for a ResNet-18 on 16 images, smoothing 0.1) and diverged under timm's recipe.
          fit_scale=False leaves γ as it is; λ is always left as it is.
        Returns the head. Computed in float64.
        """
        D, C = self.in_features, self.num_classes
        if not isinstance(features, torch.Tensor) or features.dim() < 1 or features.shape[-1] != D:
            raise ValueError(f"features must have shape [N, {D}], got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}")
        X = features.detach().reshape(-1, D).to(device=self.mu.device, dtype=torch.float64)
        if not isinstance(labels, torch.Tensor) or labels.numel() != X.shape[0] or labels.is_floating_point():
            raise ValueError(f"labels must be an integer tensor of {X.shape[0]} class indices")
        y = labels.detach().reshape(-1).to(device=X.device, dtype=torch.long)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
            raise ValueError(f"labels must lie in [0, {C}), got values in [{int(y.min())}, {int(y.max())}]")
        if not torch.isfinite(X).all():
            raise ValueError("features hold NaN or Inf")
        counts = torch.bincount(y, minlength=C)
        present = counts > 0
        if int(present.sum()) == 0:
            raise ValueError("init_from_features needs at least one sample")
        if not bool(present.all()):
            missing = (~present).nonzero().flatten().tolist()
            warnings.warn(f"init_from_features: classes {missing[:10]}{'...' if len(missing) > 10 else ''} have no "
                          f"samples; their prototypes are left as they are", stacklevel=3)  # past torch.no_grad's wrapper
        means = torch.zeros(C, D, dtype=torch.float64, device=X.device).index_add_(0, y, X)
        means = means / counts.clamp_min(1).unsqueeze(1)
        R = X - means[y]  # within-class residuals
        n = R.shape[0]
        S_w = R.T @ R / n
        mean_var = torch.trace(S_w) / D
        if not float(mean_var) > 0:
            raise ValueError("the within-class scatter is zero (one sample per class?): cannot estimate a metric")
        a = ledoit_wolf_shrinkage(R) if shrinkage == "auto" else float(shrinkage)
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {shrinkage!r}")
        eye = torch.eye(D, dtype=torch.float64, device=X.device)
        S = (1 - a) * S_w + a * mean_var * eye
        c = 1.0 if whiten else float(torch.trace(S)) / D  # Sigma = c·S⁻¹ (the shrinkage keeps tr S = tr S_w)
        eps = self.eps
        if self.full_sigma:
            # Sigma = c·S⁻¹ = tril(L)·tril(L)ᵀ + eps·I: L = chol(c·S⁻¹ − eps·I), eigenvalues kept > 0.
            evals, evecs = torch.linalg.eigh(S)
            inv = c / evals
            target = (inv - eps).clamp_min(1e-6 * float(inv.max()))
            sigma = (evecs * inv) @ evecs.T
            L = torch.linalg.cholesky((evecs * target) @ evecs.T)
            self.L.copy_(L * self.L_scale.to(L))
            lc = torch.linalg.cholesky(sigma)
        else:
            inv = c / torch.diagonal(S)
            target = (inv - eps).clamp_min(1e-6 * float(inv.max()))
            self.log_sigma_diag.copy_(torch.log(target))
            lc = torch.diag(torch.sqrt(inv))
        self.mu.copy_(torch.where(present.unsqueeze(1), means, self.mu.to(torch.float64)))
        u = torch.randn(D, dtype=torch.float64, generator=generator).to(X.device)
        self.beta.copy_(beta_scale * (lc @ u) / u.norm().clamp_min(1e-30))
        if fit_scale:
            self.scale.fill_(fit_temperature(self.distance(X[::max(1, n // 8192)]), y[::max(1, n // 8192)],
                                             float(self.gamma), label_smoothing))
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, num_classes={self.num_classes}, " + self._metric_repr()
                + f", scale={self.gamma.item():.4g}" + (f", init={self.init!r}" if self.init != "default" else ""))


def fit_temperature(distance: torch.Tensor, labels: torch.Tensor, upper: float, label_smoothing: float = 0.0,
                    iters: int = 60) -> float:
    """argmin over 0 < γ <= upper of the mean cross-entropy (F.cross_entropy's, with its
    label_smoothing ε) of the logits −γ·distance [N, C] with `labels` [N] (temperature scaling).
    f(γ) is convex, f'(γ) = mean((1 − ε)·d_y + ε·mean_c d_c − Σ_c p_c·d_c) with p = softmax(−γ·d)
    rises with γ, so f' is bisected on a log scale; `upper` when f' < 0 there (separable data
    without smoothing: the loss falls with γ all the way), a tiny γ when f' > 0 everywhere."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
    d = distance.detach().to(torch.float64)
    y = labels.reshape(-1).to(device=d.device, dtype=torch.long)
    d_target = (1 - label_smoothing) * d.gather(1, y.unsqueeze(1)).squeeze(1) + label_smoothing * d.mean(1)

    def slope(g: float) -> float:
        p = torch.softmax(-g * d, dim=1)
        return float((d_target - (p * d).sum(1)).mean())

    if d.numel() == 0 or slope(upper) <= 0:
        return float(upper)
    lo, hi = math.log(upper) - math.log(1e6), math.log(upper)
    if slope(math.exp(lo)) >= 0:
        return math.exp(lo)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if slope(math.exp(mid)) < 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def ledoit_wolf_shrinkage(R: torch.Tensor) -> float:
    """The Ledoit–Wolf (2004) shrinkage a in [0, 1] of the covariance S = RᵀR/n of the centred rows
    of R [n, D] towards (tr S / D)·I: a = min(b², d²)/d², with d² = ‖S − m·I‖²_F and
    b² = (1/n²)·Σ_k ‖r_k r_kᵀ − S‖²_F = (Σ_k |r_k|⁴ − n‖S‖²_F)/n² (expanded so nothing is [n, D, D])."""
    R = R.to(torch.float64)
    n, D = R.shape
    if n == 0:
        return 1.0
    S = R.T @ R / n
    m = torch.trace(S) / D
    d2 = float(((S - m * torch.eye(D, dtype=S.dtype, device=S.device)) ** 2).sum())
    if d2 <= 0:
        return 1.0
    b2 = float(((R * R).sum(1) ** 2).sum() - n * (S * S).sum()) / n ** 2
    return min(max(b2, 0.0), d2) / d2


def _classifier_name(model: nn.Module) -> str:
    for attr in ("pretrained_cfg", "default_cfg"):  # timm records its classifier's module name here
        cfg = getattr(model, attr, None)
        name = cfg.get("classifier") if isinstance(cfg, dict) else None
        if isinstance(name, str) and name:
            return name
        if isinstance(name, (tuple, list)) and name:
            raise ValueError(f"the model has several classifiers {tuple(name)}: pass name= to pick one")
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("no classifier found (no nn.Linear in the model): pass name= with its module name")
    return linear[-1]  # torchvision style: the last Linear (resnet 'fc', vgg 'classifier.6', vit 'heads.head')


def swap_classifier(model: nn.Module, num_classes: int | None = None, *, name: str | None = None,
                    head: nn.Module | None = None, **head_kwargs) -> nn.Module:
    """Replaces the classifier of a timm or torchvision-style model by a FAIMHead; returns the head.

    The classifier is `name` (a dotted module name, e.g. "fc", "head.fc", "classifier.6"), or timm's
    `pretrained_cfg["classifier"]`, or the model's last nn.Linear. The new head takes in_features
    from the old classifier (or the model's `num_features`, e.g. after timm's reset_classifier(0)),
    num_classes from the argument or the old classifier, and the old one's device and dtype;
    head_kwargs go to FAIMHead. Pass `head=` to put in a module you built instead.

    With a FAIMHead, the model also gets: a
    no_weight_decay() that names the head's undecayed parameters (timm's optimizer factory reads
    it), a reset_classifier(n) that puts in a FAIMHead of n classes configured as this one (timm's
    would put back an nn.Linear), and loading of checkpoints whose classifier is an nn.Linear
    (the head keeps its initialisation, with a warning): attach_head.
    """
    name = name or _classifier_name(model)
    old = model.get_submodule(name)
    if head is None:
        in_features = getattr(old, "in_features", None) or getattr(model, "num_features", None)
        if num_classes is None:
            num_classes = getattr(old, "out_features", None)
        if not in_features or num_classes is None:
            raise ValueError(f"cannot tell the feature size or the number of classes from {name!r} "
                             f"({type(old).__name__}): pass num_classes= (and a model with num_features) or head=")
        ref = next(iter(old.parameters()), None)
        if ref is None:
            ref = next(iter(model.parameters()), None)
        factory = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
        head = FAIMHead(int(in_features), int(num_classes), **head_kwargs, **factory)
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, head)
    if isinstance(getattr(model, "num_classes", None), int) and hasattr(head, "num_classes"):
        model.num_classes = head.num_classes  # timm keeps the count beside the classifier
    if isinstance(head, FAIMHead):
        attach_head(model, name, head)
    return head


# --- what swap_classifier gives the model (timm's conventions; timm is not needed) ----------------

def attach_head(model: nn.Module, name: str, head: FAIMHead) -> None:
    """Gives `model`, whose classifier `name` is `head`, the no_weight_decay(), reset_classifier()
    and nn.Linear-checkpoint loading described in swap_classifier's docstring
    (and faim_kernels.integrations.timm's). Idempotent."""
    model.__dict__["_faim_classifier"] = name
    model.__dict__["_faim_head_kwargs"] = head._init_kwargs()
    model.__dict__["no_weight_decay"] = _ModelMethod(_model_no_weight_decay, model)
    if callable(getattr(type(model), "reset_classifier", None)):
        model.__dict__["reset_classifier"] = _ModelMethod(_model_reset_classifier, model)
    if not getattr(head, "_faim_linear_hook", False):
        head._register_load_state_dict_pre_hook(_drop_linear_classifier_keys, with_module=True)
        head._faim_linear_hook = True


class _ModelMethod:
    """A method of one model instance, kept in its __dict__ (it overrides the class's). Not a
    types.MethodType: copy.deepcopy (timm's ModelEma) binds both to the copy, but only this one
    survives pickling a whole model (torch.save(model)), where a bound method is looked up by name
    on the half-restored model."""

    def __init__(self, fn, model: nn.Module):
        self.fn, self.model = fn, model

    def __call__(self, *args, **kwargs):
        return self.fn(self.model, *args, **kwargs)


def _model_no_weight_decay(self) -> set[str]:
    own = type(self).no_weight_decay(self) if callable(getattr(type(self), "no_weight_decay", None)) else ()
    name = self.__dict__["_faim_classifier"]
    head = self.get_submodule(name)
    names = head.no_weight_decay() if isinstance(head, FAIMHead) else ()
    return set(own) | {f"{name}.{n}" for n in names}


def _model_reset_classifier(self, num_classes: int, *args, **kwargs) -> None:
    type(self).reset_classifier(self, num_classes, *args, **kwargs)  # timm's: pooling, num_classes
    if num_classes:  # 0: timm's "no classifier" (an Identity) stays
        swap_classifier(self, num_classes, name=self.__dict__["_faim_classifier"],
                        **self.__dict__["_faim_head_kwargs"])


def _drop_linear_classifier_keys(module, state_dict, prefix, local_metadata, strict, missing_keys,
                                 unexpected_keys, error_msgs) -> None:
    """A state dict with an nn.Linear where the FAIMHead is (a pretrained or nn.Linear-trained
    backbone): its weight and bias are dropped and the head keeps its current parameters."""
    if prefix + "weight" not in state_dict or prefix + "mu" in state_dict:
        return
    shape = tuple(state_dict[prefix + "weight"].shape)
    for key in ("weight", "bias"):
        state_dict.pop(prefix + key, None)
    for key, value in module.state_dict().items():
        state_dict.setdefault(prefix + key, value)
    warnings.warn(f"faim_kernels: the checkpoint's classifier {prefix.rstrip('.') or 'head'} is an nn.Linear "
                  f"(weight {list(shape)}): loaded the rest, and the FAIMHead keeps its initialisation",
                  stacklevel=2)
