"""backend="torch": the logits, the cross-entropy's row statistics and the top-k in plain PyTorch ops,
so the same code runs on every device PyTorch runs on (CPU without a compiler, CUDA without Triton,
MPS, XPU, ...), under torch.func transforms and in exported graphs (torch.export, ONNX).

The algorithm is the kernels' (SPEC §2): x' = (x − m)·Lc and mu' = (mu − m)·Lc (m the detached mean
prototype), one GEMM for x'·mu'ᵀ, q = |x'|² + |mu'|² − 2·x'·mu', s = x·beta − mu·beta in float64,
then the epilogue as elementwise ops. The pairs whose expansion cannot be trusted (the kernels' rule:
transform.risk_threshold's tau and the s-cancellation test: `_expansion`, `eager_chunk`) are recomputed from the
raw difference x_b − mu_c in float64, so near-prototype pairs are exact, gradients included: the
expansion's backward (which cancels on near pairs just as its forward does, SPEC §2.1) never sees
those pairs (masked before the square roots, or P = R = 0 in the closed form); the recomputed pairs
get theirs from the raw difference.

Two ways to run the same math (gradients: autograd through the ops below, or the closed form):

- Eager (the default): an autograd.Function per call that works class chunk by class chunk
  (`chunk_classes`), the epilogue as in-place passes over the chunk. The forward keeps no graph;
  the backward is SPEC §2's closed form (ClosedFormBackward: two gradient GEMMs), d read back from
  the saved logits as the kernels do (the cross-entropy recomputes each chunk: it keeps no [B, C]).
  Memory: the [B, C] output (none for the cross-entropy) plus one chunk's temporaries. Near pairs
  are found with nonzero() and recomputed pair by pair (O(D) each, O(D²) with a full L); their
  gradients come from autograd over the gathered raw differences.
- Static (under torch.func transforms, torch.compile, torch.export and ONNX export, where a
  data-dependent shape cannot exist): plain differentiable ops over all classes at once, so every
  transform composes (vmap, jacfwd, second derivatives). Per row, the STATIC_NEAR_PAIRS pairs most
  at risk are recomputed (a top-k with a static k, gathered, recomputed, scattered back); a row with
  more pairs at risk than that keeps the expansion's value for the rest (the plain GEMM's accuracy,
  e.g. for many prototypes all within a few percent of one sample). Under export and torch.func a
  full L enters as [x·L, sqrt(eps)·x] (q = |diff·L|² + eps·|diff|²: a GEMM twice as wide, but no Cholesky, which
  ONNX lacks, and no positive-definiteness check that would read a value under vmap).

Dtypes: float32 and float64 compute as themselves, float16/bfloat16 in float32 (transform.compute_dtype);
the s terms and the recomputed pairs in float64 except on MPS, which has no float64 (there in float32,
with a stricter s test).
"""
from __future__ import annotations

import copy

import torch

from .. import transform

# Per-row pairs recomputed from the raw difference where shapes must be static (module docstring).
STATIC_NEAR_PAIRS = 16
# Elements of one class chunk's [B, chunk] temporaries (eager): 2^18 keeps a chunk's working set
# under one [512, 512] float32 block and the GEMMs at least 128 classes wide.
CHUNK_ELEMENTS = 2 ** 18
# Near pairs recomputed at once in eager mode: bounds their [P, D] temporaries.
NEAR_GROUP = 2 ** 14
# |s| < S_RISK·(|x·beta| + |mu·beta|): s = sx − smu lost too many digits (the kernels' 2^-20 for a
# float64 difference; for a float32 one, as on MPS, 2^-7 keeps it within 128 units of round-off).
S_RISK = {torch.float64: 2.0 ** -20, torch.float32: 2.0 ** -7}


# ----------------------------------------------------------------------------------------------
# When to run the static form
# ----------------------------------------------------------------------------------------------

def functorch_transforms() -> list:
    """The torch.func transforms (TransformType) the current call runs under, innermost last."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the interpreter stack; compiled code is static anyway
        return []
    stack = torch._C._functorch.get_interpreter_stack()
    return [i.key() for i in stack] if stack else []


def in_functorch_transform() -> bool:
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


def in_grad_transform() -> bool:
    """Under torch.func.grad / vjp / jacrev / jacfwd (not vmap alone)."""
    from torch._C._functorch import TransformType
    return any(k in (TransformType.Grad, TransformType.Jvp) for k in functorch_transforms())


def exporting() -> bool:
    """torch.export (which ONNX's dynamo export runs), or the TorchScript-based ONNX export."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


def static_shapes() -> bool:
    """Whether data-dependent shapes are off the table: torch.func transforms, torch.compile,
    torch.export (ONNX's dynamo export runs it), tracing."""
    return (in_functorch_transform() or torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def _wide_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


# ----------------------------------------------------------------------------------------------
# The math (one implementation for both forms)
# ----------------------------------------------------------------------------------------------

def _sqrt0(v: torch.Tensor) -> torch.Tensor:
    """sqrt(v) whose gradient at v = 0 is 0 rather than inf (0·inf = NaN downstream): the package's
    convention at an exact hit with eps = 0 (README, Guarantees). NaN stays NaN."""
    zero = v == 0
    return torch.where(zero, torch.zeros_like(v), torch.sqrt(torch.where(zero, torch.ones_like(v), v)))


def _root(v: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.sqrt(v) if eps > 0 else _sqrt0(v)


class Metric:
    """The metric factor as the ops use it: `project(v)` = v·Lc (v [n, D] -> [n, D']) with
    |project(diff)|² = diffᵀ Sigma diff. Lc is a [D] vector (diagonal), a [D, D] matrix (Cholesky
    factor), or in the wide form of a full L (export, torch.func) the pair (L, sqrt(eps)):
    v -> [v·L, sqrt(eps)·v]."""

    def __init__(self, L: torch.Tensor, eps: float, dtype: torch.dtype, wide_form: bool):
        self.eps = eps
        self.diagonal = L.dim() == 1
        self.wide_form = wide_form and not self.diagonal
        if self.diagonal:
            self.factor = torch.sqrt(torch.square(L.to(dtype)) + eps)
        elif self.wide_form:
            self.factor = L.to(dtype)
        else:
            self.factor = transform.metric_factor(L, eps, dtype)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        f = self.factor.to(v.dtype)
        if self.diagonal:
            return v * f
        if self.wide_form:
            return torch.cat([v @ f, v * (self.eps ** 0.5)], dim=-1)
        return v @ f


class Rows:
    """The row side of a call, formed once: x' [B, D'], |x'|² [B], sx = x·beta [B] (wide dtype), the
    raw x and beta in the wide dtype (recomputed pairs), lam in the compute dtype, and the class
    side's centre m."""

    def __init__(self, x, mu, metric: Metric, beta, lam, compute: torch.dtype, wide: torch.dtype):
        self.metric, self.compute, self.wide = metric, compute, wide
        self.m = transform.center_of(mu.detach().to(compute))
        self.factor = metric.factor
        self.xp = metric.project(x.to(compute) - self.m)
        self.xn = torch.square(self.xp).sum(dim=1)
        self.beta_wide = beta.to(wide)
        self.x_wide = x.to(wide)
        self.sx = self.x_wide @ self.beta_wide
        self.lam = lam.to(compute) if isinstance(lam, torch.Tensor) else lam
        self.tau = transform.risk_threshold(x.shape[1], compute)
        self.s_risk = S_RISK[wide]


def _direct_pairs(rows: Rows, xb: torch.Tensor, mc: torch.Tensor, eps: float):
    """(a, r) of pairs from their raw difference xb − mc (each [..., D] in the wide dtype): q and s
    from the difference itself, as the kernels' direct path (csrc/randers_common.h, pair_direct):
    an infinite coordinate (and no NaN) gives q = +inf."""
    diff = xb - mc
    dp = rows.metric.project(diff)
    q = torch.square(dp).sum(dim=-1)
    s = diff @ rows.beta_wide
    infinite = torch.isinf(diff).any(dim=-1) & ~torch.isnan(diff).any(dim=-1)
    q = torch.where(infinite, torch.full_like(q, float("inf")), q)
    # (s comes from the difference too, so an exact hit has s = 0 exactly, as the kernels force it.)
    return _root(q + eps, eps), _root(s * s + eps, eps)


def _expansion(rows: Rows, mu_c: torch.Tensor, wide_mu_c: torch.Tensor):
    """(q, s, risk) of the chunk's pairs from the GEMM expansion; risk marks the pairs that the
    kernels recompute (csrc/randers_common.h at_risk and s_at_risk, with the same tau)."""
    mup = rows.metric.project(mu_c.to(rows.compute) - rows.m)
    mn = torch.square(mup).sum(dim=1)
    norms = rows.xn[:, None] + mn[None, :]
    q = norms - 2 * (rows.xp @ mup.T)
    smu = wide_mu_c @ rows.beta_wide
    s = rows.sx[:, None] - smu[None, :]
    risk = ~(q >= rows.tau * norms) | (norms > torch.finfo(q.dtype).max)
    s_risk = s.abs() < rows.s_risk * (rows.sx.abs()[:, None] + smu.abs()[None, :])
    return q, s, risk | s_risk


def _combine(rows: Rows, q, s, mask, eps):
    """d from the expansion where mask is False; the masked entries are sanitised before the square
    roots, so that neither their values nor their gradients reach anything (the caller replaces them)."""
    q = torch.where(mask, torch.ones_like(q), q).clamp_min(0)
    s = torch.where(mask, torch.zeros_like(s), s).to(rows.compute)
    a, r = _root(q + eps, eps), _root(s * s + eps, eps)
    return a + rows.lam * r


def _distance_from_near(rows: Rows, a, r):
    return (a + rows.lam * r) if not isinstance(rows.lam, torch.Tensor) else a + rows.lam.to(a.dtype) * r


def eager_chunk(rows: Rows, mup_c: torch.Tensor, mn_c: torch.Tensor, smu_c: torch.Tensor, mu_c: torch.Tensor,
                eps: float, lam: float, parts: bool = False):
    """No graph: d [B, c] (compute dtype) of one class chunk, and the chunk's pairs at risk (b, c local)
    that were recomputed from the raw difference (nonzero(), in groups of NEAR_GROUP). The same
    rule as _expansion, written as in-place passes over the chunk (the CPU time is in these passes,
    not the GEMM). parts=True returns (d, a, r, s, near) for the closed-form backward."""
    tau = rows.tau
    q = torch.addmm(mn_c[None, :], rows.xp, mup_c.T, alpha=-2)          # |mu'|² − 2·x'·mu'
    risk = ~torch.ge(q - tau * mn_c, tau * rows.xn[:, None])             # q < tau·norms, or NaN
    q.add_(rows.xn[:, None])
    big = rows.xn.max() + mn_c.max() if q.numel() else q.new_zeros(())
    if not bool(torch.isfinite(big)):  # norms that overflow (or NaN): those pairs take the direct path
        risk |= ~((rows.xn[:, None] + mn_c[None, :]) <= torch.finfo(q.dtype).max)
    s = (rows.sx[:, None] - smu_c[None, :]).to(rows.compute)
    risk |= s.abs() < torch.add((rows.s_risk * rows.sx.abs()).to(rows.compute)[:, None],
                                (rows.s_risk * smu_c.abs()).to(rows.compute)[None, :])
    r = torch.square(s).add_(eps).sqrt_()
    a = q.clamp_min_(0).add_(eps).sqrt_()
    d = a.clone() if parts else a
    if lam != 0.0:
        d.add_(r, alpha=lam)
    bi, ci = risk.nonzero(as_tuple=True)
    for start in range(0, bi.numel(), NEAR_GROUP):
        b, c = bi[start:start + NEAR_GROUP], ci[start:start + NEAR_GROUP]
        na, nr = _direct_pairs(rows, rows.x_wide.index_select(0, b), mu_c.index_select(0, c).to(rows.wide), eps)
        nd = na if lam == 0.0 else na + lam * nr
        d.index_put_((b, c), nd.to(d.dtype))
        if parts:
            a.index_put_((b, c), na.to(a.dtype))
            r.index_put_((b, c), nr.to(r.dtype))
    return (d, a, r, s, (bi, ci)) if parts else (d, (bi, ci))


ROWS_PER_DOT = 4096


def dot_wide(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """v·w [n] in w's (wide) dtype, v [n, D] cast block by block: no float64 copy of a large mu."""
    if v.shape[0] <= ROWS_PER_DOT:
        return v.to(w.dtype) @ w
    return torch.cat([v[i:i + ROWS_PER_DOT].to(w.dtype) @ w for i in range(0, v.shape[0], ROWS_PER_DOT)])


def tdot_wide(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Σ_i g_i·v_i [D] in g's (wide) dtype, v [n, D] cast block by block (dot_wide's transpose)."""
    out = g.new_zeros(v.shape[1])
    for i in range(0, v.shape[0], ROWS_PER_DOT):
        out += v[i:i + ROWS_PER_DOT].to(g.dtype).T @ g[i:i + ROWS_PER_DOT]
    return out


class Cols:
    """The class side of the eager form, no graph: mu' [C, D'], |mu'|² [C], smu = mu·beta [C] (wide)."""

    def __init__(self, rows: Rows, mu: torch.Tensor, beta_wide: torch.Tensor):
        self.mu = mu
        self.mup = rows.metric.project(mu.to(rows.compute) - rows.m)
        self.mn = torch.square(self.mup).sum(dim=1)
        self.smu = dot_wide(mu, beta_wide)

    @classmethod
    def from_parts(cls, mu, mup, smu):
        cols = cls.__new__(cls)
        cols.mu, cols.mup, cols.smu = mu, mup, smu
        cols.mn = torch.square(mup).sum(dim=1)
        return cols

    def chunk(self, rows, c0, c1, eps, lam, parts=False):
        return eager_chunk(rows, self.mup[c0:c1], self.mn[c0:c1], self.smu[c0:c1], self.mu[c0:c1], eps, lam, parts)


def distance_static(rows: Rows, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """d [B, C] (compute dtype) with static shapes: per row the STATIC_NEAR_PAIRS pairs most at risk
    (ranked by q / (tau·norms) and the s test's ratio; NaN first) recomputed from the raw difference."""
    wide_mu = mu.to(rows.wide)
    q, s, _ = _expansion(rows, mu, wide_mu)
    C = mu.shape[0]
    k = min(C, STATIC_NEAR_PAIRS)
    if k == 0:
        return _combine(rows, q, s, torch.zeros_like(q, dtype=torch.bool), eps)
    with torch.no_grad():
        mn = torch.square(rows.metric.project(mu.to(rows.compute) - rows.m)).sum(dim=1)
        norms = rows.xn[:, None] + mn[None, :]
        smu = wide_mu @ rows.beta_wide
        q_ratio = (q / (rows.tau * norms)).to(rows.wide)
        s_ratio = s.abs() / (rows.s_risk * (rows.sx.abs()[:, None] + smu.abs()[None, :]))
        score = torch.minimum(q_ratio, s_ratio).nan_to_num(nan=-1.0, posinf=float("inf"))
        idx = torch.topk(score, k, dim=1, largest=False).indices              # [B, k]
    mask = torch.zeros_like(q, dtype=torch.bool).scatter(1, idx, True)
    d = _combine(rows, q, s, mask, eps)
    gathered = wide_mu.index_select(0, idx.flatten()).reshape(*idx.shape, mu.shape[1])  # (see finish)
    a, r = _direct_pairs(rows, rows.x_wide[:, None, :], gathered, eps)   # [B, k]
    return d.scatter(1, idx, _distance_from_near(rows, a, r).to(d.dtype))


def _prepare(x, mu, L, beta, lam, eps, static):
    compute = transform.compute_dtype(x.dtype)
    # The wide form of a full L where a Cholesky cannot run (ONNX) or its check cannot read L (vmap);
    # torch.compile keeps the Cholesky factor, so that compiled and eager calls agree closely.
    wide_form = static and (exporting() or in_functorch_transform())
    return Rows(x, mu, Metric(L, eps, compute, wide_form), beta, lam, compute, _wide_dtype(x.device))


def chunk_classes(B: int, C: int):
    """Class ranges [c0, c1) of the eager form's chunks (CHUNK_ELEMENTS per [B, chunk] temporary)."""
    step = max(128, CHUNK_ELEMENTS // max(B, 1))
    return [(c0, min(C, c0 + step)) for c0 in range(0, C, step)]


# ----------------------------------------------------------------------------------------------
# Eager form: class-chunked autograd.Functions (no graph in the forward; closed-form backward)
# ----------------------------------------------------------------------------------------------

class ClosedFormBackward:
    """The backward of SPEC §2 for the eager form, chunk by chunk: given G = ∂loss/∂logit over a
    chunk and its exact d, a, r, s, with H = −γ·G, P = H/a and R = H·λ·s/r (both 0 on the pairs
    recomputed from the raw difference):

        ∂x' = rowsum(P)·x' − P·mu'    ∂mu' = colsum(P)·mu' − Pᵀ·x'    (two GEMMs, as nn.Linear's)
        ∂sx = rowsum(R)    ∂smu = −colsum(R)    ∂λ = Σ H·r    ∂γ: given by the caller

    The recomputed pairs are differentiated from their raw difference (autograd over the gathered
    pairs: exact where the expansion's backward cancels, SPEC §2.1). `finish` takes x', sx, mu',
    smu and those pairs back to x, mu, L, beta, lam through autograd of the row and class sides
    (the metric factor's Cholesky and x·Lc differentiated once per call)."""

    def __init__(self, inputs, needs, eps: float):
        self.inputs, self.needs, self.eps = inputs, needs, eps
        x, mu = inputs[0], inputs[1]
        with torch.enable_grad():
            self.leaves = [t.detach().requires_grad_(n) for t, n in zip(inputs, needs)]
            lx, lmu, lL, lbeta, llam, _ = self.leaves
            self.rows = _prepare(lx, lmu, lL, lbeta, llam, eps, static=False)
            self.mup = self.rows.metric.project(lmu.to(self.rows.compute) - self.rows.m)
        # smu = mu·beta without a graph (autograd would keep a float64 copy of mu): finish() applies
        # its two derivatives (∂mu = dsmu ⊗ beta, ∂beta = Σ_c dsmu_c·mu_c) itself.
        self.smu = dot_wide(inputs[1].detach(), self.rows.beta_wide.detach())
        rows = self.rows
        self.plain = copy.copy(rows)  # the same values without a graph, for the chunks
        for name in ("xp", "xn", "sx", "x_wide", "beta_wide"):
            setattr(self.plain, name, getattr(rows, name).detach())
        self.plain.metric = copy.copy(rows.metric)
        self.plain.metric.factor = rows.metric.factor.detach()
        self.cols = Cols.from_parts(mu, self.mup.detach(), self.smu)
        self.lam = float(inputs[4])
        compute, wide = rows.compute, rows.wide
        self.dxp = torch.zeros_like(self.plain.xp)
        self.rowsum = torch.zeros(x.shape[0], dtype=compute, device=x.device)
        self.dmup = torch.zeros_like(self.cols.mup)
        self.dsx = torch.zeros(x.shape[0], dtype=wide, device=x.device)
        self.dsmu = torch.zeros(mu.shape[0], dtype=wide, device=x.device)
        self.dlam = torch.zeros((), dtype=wide, device=x.device)
        self.dgamma = torch.zeros((), dtype=wide, device=x.device)
        self.near_b, self.near_c, self.near_h = [], [], []

    def chunk(self, c0, c1, G, a, r, s, near, gamma: torch.Tensor):
        """Accumulates one chunk: G [B, c] (compute dtype, may be overwritten), a, r, s as eager_chunk's
        parts (overwritten), near its recomputed pairs (local indices)."""
        bi, ci = near
        H = G.mul_(-gamma.to(G.dtype))
        if bi.numel():
            self.near_b.append(bi)
            self.near_c.append(ci + c0)
            self.near_h.append(H[bi, ci].to(self.rows.wide))
            H.index_put_((bi, ci), H.new_zeros(()))
            a.index_put_((bi, ci), a.new_ones(()))
            r.index_put_((bi, ci), r.new_ones(()))
        if self.eps == 0.0:  # an exact hit's P and R are 0 by convention (README, Guarantees)
            a.masked_fill_(a == 0, float("inf"))
            r.masked_fill_(r == 0, float("inf"))
        self.dlam += torch.vdot(H.flatten(), r.flatten())
        P = H / a
        R = H.mul_(s).div_(r).mul_(self.lam)
        self.rowsum += P.sum(dim=1)
        mup_c = self.cols.mup[c0:c1]
        self.dxp.addmm_(P, mup_c, alpha=-1)
        self.dmup[c0:c1] = torch.addmm(P.sum(dim=0)[:, None] * mup_c, P.T, self.plain.xp, alpha=-1)
        self.dsx += R.sum(dim=1).to(self.dsx.dtype)
        self.dsmu[c0:c1] = -R.sum(dim=0).to(self.dsmu.dtype)

    def finish(self):
        """The gradients of (x, mu, L, beta, lam, gamma) in their dtypes (None where not needed)."""
        rows, eps = self.rows, self.eps
        lx, lmu, lL, lbeta, llam, lgamma = self.leaves
        self.dxp += self.rowsum[:, None] * self.plain.xp
        outputs, grads = [rows.xp, rows.sx, self.mup], [self.dxp, self.dsx, self.dmup]
        with torch.enable_grad():
            if self.near_b:
                b, c = torch.cat(self.near_b), torch.cat(self.near_c)
                # index_select, not x[b]: its backward is index_add_, deterministic on the CPU, where the
                # accumulating index_put_ of x[b]'s backward adds duplicates in a varying order.
                na, nr = _direct_pairs(rows, rows.x_wide.index_select(0, b), lmu.index_select(0, c).to(rows.wide), eps)
                lam = llam.to(rows.wide)
                outputs.append(na + lam * nr)
                grads.append(torch.cat(self.near_h))
            sources = [t for t in (lx, lmu, lL, lbeta, llam) if t.requires_grad]
            keep = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
            got = torch.autograd.grad([o for o, _ in keep], sources, [g.to(o.dtype) for o, g in keep],
                                      allow_unused=True) if keep and sources else [None] * len(sources)
        result = dict(zip(map(id, sources), got))
        for leaf, extra in ((lmu, lambda: self.dsmu.to(rows.compute)[:, None] * self.rows.beta_wide.detach().to(rows.compute)),
                            (lbeta, lambda: tdot_wide(self.inputs[1], self.dsmu))):
            if leaf.requires_grad:
                g = extra()
                result[id(leaf)] = g if result.get(id(leaf)) is None else result[id(leaf)] + g
        out = []
        for i, (t, leaf, n) in enumerate(zip(self.inputs, self.leaves, self.needs)):
            if not n:
                out.append(None)
                continue
            g = result.get(id(leaf))
            if i == 4:
                g = self.dlam if g is None else g + self.dlam
            if i == 5:
                g = self.dgamma
            out.append(torch.zeros_like(t) if g is None else g.to(t.dtype).reshape(t.shape))
        return out


def _double_backward_error():
    return RuntimeError(
        "faim_kernels: backend='torch' differentiates once in eager mode (its backward is a closed form, "
        "like the fused kernels'). For second derivatives use torch.func (torch.func.grad(torch.func.grad(f)), jacfwd, "
        "hessian: these run the plain-ops form of backend='torch', which differentiates any number of "
        "times) or backend='reference'.")


class _RefuseSecondDerivative(torch.autograd.Function):
    """Identity on the gradients of the eager form, attached to the differentiable inputs so that
    differentiating the gradients again reaches it and raises (the way PyTorch's
    once_differentiable does, with the way out)."""

    @staticmethod
    def forward(ctx, n, *args):
        return tuple(g.clone() for g in args[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error()


def _once(grads, inputs):
    """The gradients as they are, or (under create_graph=True) behind _RefuseSecondDerivative."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    anchors = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not present or not anchors:
        return grads
    wrapped = _RefuseSecondDerivative.apply(len(present), *[grads[i] for i in present], *anchors)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return out


def _scalar_tensor(v, like: torch.Tensor):
    return v if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64, device=like.device)


# Below this |γ| the backward recomputes d instead of reading it back from the logits (−logits/γ),
# where float32 logits of a tiny γ would be denormal or zero.
GAMMA_READBACK_MIN = 1e-4


class _Logits(torch.autograd.Function):
    """logits [B, C] = −γ·d, class chunk by class chunk (module docstring, eager form); the backward is
    the closed form (ClosedFormBackward), d read back from the saved logits as the kernels do."""

    @staticmethod
    def forward(ctx, x, mu, L, beta, lam, gamma, eps):
        B, C = x.shape[0], mu.shape[0]
        out = x.new_empty((B, C))
        rows = _prepare(x, mu, L, beta, lam, eps, static=False)
        cols = Cols(rows, mu, rows.beta_wide)
        g, lam_f = gamma.to(rows.compute), float(lam)
        near_b, near_c = [], []
        for c0, c1 in chunk_classes(B, C):
            d, (bi, ci) = cols.chunk(rows, c0, c1, eps, lam_f)
            out[:, c0:c1] = d.mul_(-g)
            near_b.append(bi)
            near_c.append(ci + c0)
        near = (torch.cat(near_b), torch.cat(near_c)) if near_b else (x.new_zeros(0, dtype=torch.long),) * 2
        ctx.save_for_backward(x, mu, L, beta, lam, gamma, out, *near)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mu, L, beta, lam, gamma, out, near_b, near_c = ctx.saved_tensors
        inputs = (x, mu, L, beta, lam, gamma)
        bw = ClosedFormBackward(inputs, list(ctx.needs_input_grad[:6]), ctx.eps)
        rows, compute = bw.plain, bw.rows.compute
        g = gamma.to(compute)
        readback = out.dtype == compute and abs(float(gamma)) >= GAMMA_READBACK_MIN
        for c0, c1 in chunk_classes(x.shape[0], mu.shape[0]):
            G = grad[:, c0:c1].to(compute, copy=True)  # (bw.chunk overwrites it)
            if readback:
                d = out[:, c0:c1] / (-g)
                s = (rows.sx[:, None] - bw.cols.smu[c0:c1][None, :]).to(compute)
                r = torch.square(s).add_(ctx.eps).sqrt_()
                a = d - bw.lam * r if bw.lam != 0.0 else d.clone()
                here = (near_c >= c0) & (near_c < c1)  # (their a, r, s do not matter: P = R = 0 there)
                near = (near_b[here], near_c[here] - c0)
            else:
                d, a, r, s, near = bw.cols.chunk(rows, c0, c1, ctx.eps, bw.lam, parts=True)
            bw.dgamma -= torch.vdot(G.flatten(), d.flatten()).to(bw.dgamma.dtype)
            bw.chunk(c0, c1, G, a, r, s, near, g)
        return (*_once(bw.finish(), inputs), None)


def logits(x, mu, L, beta, lam, gamma, eps: float) -> torch.Tensor:
    """−γ·d [B, C] in x's dtype (inputs validated; lam, gamma floats or 0-dim tensors)."""
    if static_shapes():
        rows = _prepare(x, mu, L, beta, lam, eps, static=True)
        d = distance_static(rows, mu, eps)
        g = gamma.to(rows.compute) if isinstance(gamma, torch.Tensor) else gamma
        return (-g * d).to(x.dtype)
    return _Logits.apply(x, mu, L, beta, _scalar_tensor(lam, x), _scalar_tensor(gamma, x), eps)


# ----------------------------------------------------------------------------------------------
# The cross-entropy's row statistics (ops/row_stats.py's contract: (lse, tl, sl, pl), float64)
# ----------------------------------------------------------------------------------------------

def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1]; [B, k] as it is (a reshape(B, -1) is ambiguous at B = 0)."""
    return t.unsqueeze(1) if t.dim() == 1 else t


def _margin_logits(rows, d, gamma, target, c0, c1, margin):
    """logit'_bc = −γ·(d_bc + margin·[c = t_b]) over classes [c0, c1), in float64 (the wide dtype)."""
    g = gamma.to(rows.wide) if isinstance(gamma, torch.Tensor) else gamma
    lg = -g * d.to(rows.wide)
    if margin != 0.0:
        t = _as_2d(target)
        here = (t >= c0) & (t < c1)
        hit = torch.zeros_like(lg, dtype=torch.bool).scatter(1, torch.where(here, t - c0, 0), here)
        lg = lg - (g * margin) * hit.to(lg.dtype)
    return lg


def _chunk_stats(lg, target, c0, c1, class_weight, soft_target):
    """(lse, tl, sl, pl) of one chunk's logits' [B, c] (tl over the chunk's targets, 0 elsewhere)."""
    B = lg.shape[0]
    t = _as_2d(target)
    here = (t >= c0) & (t < c1)
    tl = torch.where(here, lg.gather(1, torch.where(here, t - c0, 0)), 0.0).reshape(target.shape)
    lse = torch.logsumexp(lg, dim=1) if lg.shape[1] else lg.new_full((B,), float("-inf"))
    v = None if class_weight is None else class_weight[c0:c1].to(lg.dtype)
    sl = lg.sum(dim=1) if v is None else lg @ v
    if soft_target is None:
        pl = torch.zeros_like(sl)
    else:
        pw = soft_target[:, c0:c1].to(lg.dtype) * lg
        pl = pw.sum(dim=1) if v is None else pw @ v
    return lse, tl, sl, pl


class _RowStats(torch.autograd.Function):
    """(lse, tl, sl, pl) class chunk by class chunk, O(B) memory besides one chunk (eager form); the
    backward recomputes each chunk's d (no [B, C] is kept) and applies the closed form."""

    @staticmethod
    def forward(ctx, x, mu, L, beta, lam, gamma, target, eps, margin, class_weight, soft_target):
        B, C = x.shape[0], mu.shape[0]
        rows = _prepare(x, mu, L, beta, lam, eps, static=False)
        cols = Cols(rows, mu, rows.beta_wide)
        lam_f = float(lam)
        lse_parts, tl, sl, pl = [], None, None, None
        for c0, c1 in chunk_classes(B, C):
            d, _ = cols.chunk(rows, c0, c1, eps, lam_f)
            lg = _margin_logits(rows, d, gamma, target, c0, c1, margin)
            stats = _chunk_stats(lg, target, c0, c1, class_weight, soft_target)
            lse_parts.append(stats[0])
            tl, sl, pl = stats[1:] if tl is None else (tl + stats[1], sl + stats[2], pl + stats[3])
        if C == 0:
            wide = rows.wide
            lse = x.new_full((B,), float("-inf"), dtype=wide)
            tl, sl, pl = torch.zeros(target.shape, dtype=wide, device=x.device), x.new_zeros(B, dtype=wide), \
                x.new_zeros(B, dtype=wide)
        else:
            lse = torch.logsumexp(torch.stack(lse_parts, dim=1), dim=1)
        ctx.save_for_backward(x, mu, L, beta, lam, gamma, target, lse, class_weight, soft_target)
        ctx.eps, ctx.margin = eps, margin
        return lse, tl, sl, pl

    @staticmethod
    def backward(ctx, w_lse, w_tl, w_sl, w_pl):
        x, mu, L, beta, lam, gamma, target, lse, class_weight, soft_target = ctx.saved_tensors
        inputs = (x, mu, L, beta, lam, gamma)
        bw = ClosedFormBackward(inputs, list(ctx.needs_input_grad[:6]), ctx.eps)
        rows, compute = bw.plain, bw.rows.compute
        t = _as_2d(target)
        wt = None if w_tl is None else _as_2d(w_tl)
        g = gamma.to(rows.wide)
        for c0, c1 in chunk_classes(x.shape[0], mu.shape[0]):
            d, a, r, s, near = bw.cols.chunk(rows, c0, c1, ctx.eps, bw.lam, parts=True)
            lg = _margin_logits(rows, d, gamma, target, c0, c1, ctx.margin)   # wide dtype
            G = torch.zeros_like(lg)
            if w_lse is not None:
                G += w_lse[:, None] * torch.exp(lg - lse[:, None])
            if wt is not None:
                here = (t >= c0) & (t < c1)
                G.scatter_add_(1, torch.where(here, t - c0, 0), torch.where(here, wt.to(G.dtype), 0.0))
            v = None if class_weight is None else class_weight[c0:c1].to(G.dtype)
            row_w = None
            if w_sl is not None:
                row_w = w_sl[:, None].expand_as(G)
            if w_pl is not None and soft_target is not None:
                pw = w_pl[:, None] * soft_target[:, c0:c1].to(G.dtype)
                row_w = pw if row_w is None else row_w + pw
            if row_w is not None:
                G += row_w if v is None else row_w * v[None, :]
            # ∂/∂γ of logit' = −γ·(d + margin·[c = t]) is −(d + margin·[c = t]) = logit'/γ
            bw.dgamma -= torch.vdot(G.flatten(), (lg / -g).flatten() if bool(g != 0) else
                                    _margin_distance(d, target, c0, c1, ctx.margin).flatten().to(G.dtype))
            bw.chunk(c0, c1, G.to(compute), a, r, s, near, gamma)
        grads = _once(bw.finish(), inputs)
        return (*grads, None, None, None, None, None)


def _margin_distance(d, target, c0, c1, margin):
    """d + margin·[c = t] over a chunk (the ∂γ weight when γ = 0, where logit'/γ is undefined)."""
    if margin == 0.0:
        return d
    t = _as_2d(target)
    here = (t >= c0) & (t < c1)
    hit = torch.zeros_like(d, dtype=torch.bool).scatter(1, torch.where(here, t - c0, 0), here)
    return d + margin * hit.to(d.dtype)


def row_stats(x, mu, L, beta, lam, gamma, target, eps: float, margin: float, class_weight=None, soft_target=None):
    """(lse, tl, sl, pl) in the wide dtype, differentiable in x, mu, L, beta, lam, gamma (contract of
    ops/row_stats.py). target: local class indices [B] or [B, k], −1 where a row has none here."""
    if not static_shapes() and target.numel() and bool((target == -2).any()):
        raise ValueError("faim_kernels: target holds a class index out of range [0, C)")
    class_weight = None if class_weight is None else class_weight.detach()
    soft_target = None if soft_target is None else soft_target.detach()
    if static_shapes():
        rows = _prepare(x, mu, L, beta, lam, eps, static=True)
        lg = _margin_logits(rows, distance_static(rows, mu, eps), gamma, target, 0, mu.shape[0], margin)
        return _chunk_stats(lg, target, 0, mu.shape[0], class_weight, soft_target)
    target = target.to(torch.int64)
    return _RowStats.apply(x, mu, L, beta, _scalar_tensor(lam, x), _scalar_tensor(gamma, x), target, eps,
                           margin, class_weight, soft_target)


# ----------------------------------------------------------------------------------------------
# Top-k (forward only, like the kernels'): chunked over classes, a running [B, k] merged by a
# stable sort (ties by the lower index: the earlier chunk comes first), NaN ranked as torch.topk.
# ----------------------------------------------------------------------------------------------

def topk_by_sort(d: torch.Tensor, k: int, largest: bool):
    """The k smallest (largest) entries of each row of d [B, C], sorted, ties by the lower index
    (a stable sort; torch.topk leaves the order of ties unspecified), NaN as torch.topk ranks it."""
    values, index = torch.sort(d, dim=1, descending=largest, stable=True)
    return values[:, :k], index[:, :k]


def topk(x, mu, L, beta, lam, eps: float, k: int, largest: bool):
    """(distances [B, k] in x's dtype, indices int64 [B, k]); nothing differentiable comes back."""
    with torch.no_grad():
        x, mu, L, beta = x.detach(), mu.detach(), L.detach(), beta.detach()
        lam = lam.detach() if isinstance(lam, torch.Tensor) else lam
        B, C = x.shape[0], mu.shape[0]
        if static_shapes():
            rows = _prepare(x, mu, L, beta, lam, eps, static=True)
            values, index = topk_by_sort(distance_static(rows, mu, eps), k, largest)
            return values.to(x.dtype), index
        rows = _prepare(x, mu, L, beta, lam, eps, static=False)
        cols, lam_f = Cols(rows, mu, rows.beta_wide), float(lam)
        compute = rows.compute
        values = x.new_empty((B, 0), dtype=compute)
        index = torch.empty((B, 0), dtype=torch.int64, device=x.device)
        for c0, c1 in chunk_classes(B, C):
            d, _ = cols.chunk(rows, c0, c1, eps, lam_f)
            ids = torch.arange(c0, c1, device=x.device).expand(B, -1)
            v, pos = topk_by_sort(torch.cat([values, d], dim=1), k, largest)
            values, index = v, torch.cat([index, ids], dim=1).gather(1, pos)
        return values.to(x.dtype), index
