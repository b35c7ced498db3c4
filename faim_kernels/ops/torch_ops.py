"""backend="torch": the logits, the cross-entropy's row statistics and the top-k in plain PyTorch ops,
so the same code runs on every device PyTorch runs on (CPU without a compiler, CUDA without Triton,
MPS, XPU, ...), under torch.func transforms and in exported graphs (torch.export, ONNX).

The algorithm is the kernels' (docs/design.md §2, the algorithm): x' = (x − m)·Lc and mu' = (mu − m)·Lc (m the detached mean
prototype), one GEMM for x'·mu'ᵀ, q = |x'|² + |mu'|² − 2·x'·mu', s = x·beta − mu·beta in float64,
then the epilogue as elementwise ops. The near pairs, whose expansion cannot be trusted (the kernels'
rule: transform.near_threshold's tau and the s-cancellation test: `_expansion`, `Eager.chunk`), are
recomputed from the raw difference x_b − mu_c in float64, so they are exact, gradients included: the
expansion's backward (which cancels on near pairs just as its forward does, docs/design.md §2.1 (near pairs)) never sees
those pairs (masked before the square roots, or P = R = 0 in the closed form); the recomputed pairs
get theirs from the raw difference.

Two ways to run the same math (gradients: autograd through the ops below, or the closed form):

- Eager (the default): an autograd.Function per call that works class chunk by class chunk
  (`chunk_classes`: the logits' forward in one chunk, the cross-entropy's in halves of [B, C], the
  logits' read-back backward in halves (diagonal L) or thirds, the others in eighths, each at most
  CHUNK_ELEMENTS per [B, chunk] temporary), the class side formed per chunk too, the epilogue as
  in-place passes over the chunk (the logits' forward runs them in the output's own columns). One
  GEMM of [x' | 1 | |x'|²] against [−2·mu' | |mu'|² + eps | 1] gives q + eps with the norms added
  inside it. The forward keeps no graph; the backward is docs/design.md §2's closed form
  (ClosedFormBackward: two gradient GEMMs per chunk), a read back from the saved logits as the
  kernels do (the cross-entropy recomputes each chunk: it keeps no [B, C]). Memory: the [B, C]
  output (none for the cross-entropy), the returned gradients and one chunk's temporaries (one in
  the logits' forward, two in the read-back backward, a diagonal L's class side inside the second
  once it is spent): at most 3 [B, C] float32 tensors in all for the logits at the benchmark's
  shapes (bench/RESULTS.md, "torch-cpu"). Near pairs are found by a prefilter (a chunk's smallest
  q + eps against the largest threshold, then the rows under theirs) and nonzero() of the test on
  those rows, and recomputed pair by pair (O(D) each, O(D²) with a full L); their gradients come
  from autograd over the gathered raw differences. The CPU cost beyond the GEMMs is one memory pass
  per elementwise step (9 per [B, chunk] block in the logits' forward, 14 in its backward, where the
  C++ kernels run one fused epilogue) and the per-operator overhead (a few µs per call, and with
  several threads a parallel region per pass: fewer, larger chunks pay it fewer times).
- Static (under torch.func transforms, torch.compile, torch.export and ONNX export, where a
  data-dependent shape cannot exist): plain differentiable ops over all classes at once, so every
  transform composes (vmap, jacfwd, second derivatives). Per row, the STATIC_NEAR_PAIRS pairs nearest
  to cancellation are recomputed (a top-k with a static k, gathered, recomputed, scattered back); a
  row with more near pairs than that keeps the expansion's value for the rest (the plain GEMM's
  accuracy, e.g. for many prototypes all within a few percent of one sample far from the prototypes'
  mean: test_static_form_bound_on_near_pairs_per_row). The bound is kept on purpose: recomputing
  every pair from the raw difference, the only static-shape way to be exact for any count, is
  B·C·D work and memory (the einsum reference's cost) in every exported or transformed call, where
  these shapes are what deployment runs. Under export and torch.func a
  full L enters as [x·L, sqrt(eps)·x] (q = |diff·L|² + eps·|diff|²: a GEMM twice as wide, but no Cholesky, which
  ONNX lacks, and no positive-definiteness check that would read a value under vmap).

Dtypes: float32 and float64 compute as themselves, float16/bfloat16 in float32 (transform.compute_dtype);
the s terms and the recomputed pairs in float64 except on MPS, which has no float64 (there in float32,
with a stricter s test).
"""
from __future__ import annotations

import copy
import math

import torch

from .. import transform

# Per-row pairs recomputed from the raw difference where shapes must be static (module docstring).
STATIC_NEAR_PAIRS = 16
# The eager form's class chunks (chunk_classes): at most CHUNK_ELEMENTS elements per [B, chunk]
# temporary (2^18: one [512, 512] float32 block, cache-sized), at most 1/CHUNKS_PER_CALL of [B, C]
# (the memory target), and at least MIN_CHUNK_CLASSES classes unless CHUNK_ELEMENTS says less.
CHUNK_ELEMENTS = 2 ** 18
CHUNKS_PER_CALL = 8
# The cross-entropy's forward holds two [B, chunk] temporaries (a, and s then r in one buffer), so it
# runs a quarter as many, four times larger chunks (GEMMs run faster wide, and the per-operator cost is
# paid per chunk). The logits' forward writes a into the output's columns and holds one (s then r):
# one chunk where CHUNK_ELEMENTS allows. The logits' read-back backward holds two beside the output
# and the returned gradients: a third as many (half as many would pass 3 [B, C] with a full Σ).
FORWARD_CHUNKS_PER_CALL = 2
LOGITS_FORWARD_CHUNKS_PER_CALL = 1
READBACK_CHUNKS_PER_CALL = 3
MIN_CHUNK_CLASSES = 64
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
    convention at an exact hit with eps = 0 (docs/guarantees.md, the convention at an exact hit). NaN stays NaN."""
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
            self.factor = torch.sqrt(torch.square(L if L.dtype == dtype else L.to(dtype)) + eps)
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
        self.tau = transform.near_threshold(x.shape[1], compute)
        self.s_risk = S_RISK[wide]


def _direct_pairs(rows: Rows, xb: torch.Tensor, mc: torch.Tensor, eps: float):
    """(a, r) of pairs from their raw difference xb − mc (each [..., D] in the wide dtype): q and s
    from the difference itself, as the kernels' near-pair recompute (csrc/randers_common.h, pair_direct):
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


def distance_static(rows: Rows, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """d [B, C] (compute dtype) with static shapes: per row the STATIC_NEAR_PAIRS pairs nearest to cancellation
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



# ----------------------------------------------------------------------------------------------
# Eager form: class-chunked autograd.Functions (no graph in the forward; closed-form backward)
# ----------------------------------------------------------------------------------------------

def chunk_classes(B: int, C: int, parts: int | None = None):
    """Class ranges [c0, c1) of the eager form's chunks. A chunk's [B, c] temporaries (up to about six
    live at once in the cross-entropy's backward, two in the forwards and the logits' read-back
    backward) are kept to 1/parts of [B, C] each, so that they add up to under one [B, C] whatever the
    shape (the memory target: 3 [B, C] with the output), and to at most
    CHUNK_ELEMENTS elements (a chunk stays in cache); at least MIN_CHUNK_CLASSES wide, so that the
    per-chunk GEMMs stay efficient and the per-op overhead stays small against the work. `parts`
    replaces CHUNKS_PER_CALL (FORWARD_CHUNKS_PER_CALL, READBACK_CHUNKS_PER_CALL)."""
    parts = CHUNKS_PER_CALL if parts is None else parts
    step = min(CHUNK_ELEMENTS // max(B, 1), max(MIN_CHUNK_CLASSES, -(-C // parts)))
    step = max(step, 16)
    return [(c0, min(C, c0 + step)) for c0 in range(0, C, step)]




def dot_wide(v: torch.Tensor, w: torch.Tensor, rows: int) -> torch.Tensor:
    """v·w [n] in w's (wide) dtype, v [n, D] cast `rows` rows at a time: no wide copy of a large v."""
    if v.shape[0] <= rows:
        return v.to(w.dtype) @ w
    return torch.cat([v[i:i + rows].to(w.dtype) @ w for i in range(0, v.shape[0], rows)])


def tdot_wide(v: torch.Tensor, g: torch.Tensor, rows: int) -> torch.Tensor:
    """Σ_i g_i·v_i [D] in g's (wide) dtype, v [n, D] cast `rows` rows at a time (dot_wide's transpose)."""
    if v.shape[0] <= rows:
        return g @ v.to(g.dtype)
    out = g.new_zeros(v.shape[1])
    for i in range(0, v.shape[0], rows):
        out += g[i:i + rows] @ v[i:i + rows].to(g.dtype)
    return out


def _split(v: torch.Tensor, dtype: torch.dtype):
    """(hi, lo) in dtype with hi + lo = v to about dtype's round-off squared (v wide)."""
    hi = v.to(dtype)
    return hi, (v - hi.to(v.dtype)).to(dtype)


def _cols(t: torch.Tensor, c0: int, c1: int, dim: int = 0) -> torch.Tensor:
    """t's entries [c0, c1) along dim, t itself when that is all of them (no view op)."""
    return t if c0 == 0 and c1 == t.shape[dim] else t.narrow(dim, c0, c1 - c0)


def _no_pairs(device):
    empty = torch.empty(0, dtype=torch.long, device=device)
    return empty, empty


_CONSTANTS = {}


def _constant(value, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.tensor(value) (a float, or a tuple of floats), made once per (value, dtype, device) (a
    fresh torch.tensor is several operator calls); never written to."""
    key = (value, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 64:  # (a value that changes every call must not grow it without bound)
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(value, dtype=dtype, device=device)
    return t


class Eager:
    """The eager form's view of one call, formed once without a graph: the row side (x' [B, D'] in
    the GEMM operand [x' | 1 | |x'|²], sx = x·beta [B] in the wide dtype and as hi + lo parts),
    smu = mu·beta [C] (likewise) and the pairs of the s test; per class chunk the class side (`classes`), and the chunk's
    a = sqrt(q + eps), r = sqrt(s² + eps), s and near pairs (`chunk`). The class side is formed chunk
    by chunk, so that no [C, D] temporary exists besides the returned gradient."""

    def __init__(self, x, mu, L, beta, lam, eps: float, parts: int | None = None):
        self.compute, self.wide = transform.compute_dtype(x.dtype), _wide_dtype(x.device)
        self.metric = Metric(L, eps, self.compute, wide_form=False)
        self.eps, self.lam = eps, float(lam)
        self.x, self.mu = x, mu
        self.mu_c = mu if mu.dtype == self.compute else mu.to(self.compute)
        # transform.center_of (the mean prototype, non-finite coordinates 0) in one operator after the mean
        self.m = (self.mu_c.mean(dim=0).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0) if mu.shape[0]
                  else transform.center_of(self.mu_c))
        width = self.width = x.shape[1] if self.metric.diagonal else self.metric.factor.shape[1]
        # The row side [x' | 1 | |x'|²] against the class side [−2·mu' | |mu'|² + eps | 1] (`classes`):
        # one GEMM returns q + eps of Eq. 7 (docs/design.md §2) with both norms added inside it, no
        # [B, c] pass for them.
        self.xs = self.metric.factor.new_ones((x.shape[0], width + 2))  # (x' and |x'|² written below)
        self.xp = self.xs[:, :width]
        if self.metric.diagonal and x.dtype == self.compute:  # (x − m)·Lc formed in place
            torch.sub(x, self.m, out=self.xp).mul_(self.metric.factor)
        else:
            self._project(x.to(self.compute) - self.m, self.xp)
        self.xn = torch.linalg.vecdot(self.xp, self.xp, out=self.xs[:, width + 1])
        self.xn_col = self.xn[:, None]
        self.beta_wide = beta.to(self.wide)
        self.beta_c = beta if beta.dtype == self.compute else self.beta_wide.to(self.compute)
        self.chunks = chunk_classes(x.shape[0], mu.shape[0], parts)  # (the backwards take their own grid)
        # one class-side buffer for every chunk of a loop (each chunk's class side is consumed before
        # the next), formed on first use and released after the loop (`release`)
        self._side = self._side_w = None
        self.factor_m2 = -2 * self.metric.factor  # (×−2 is exact: the GEMM's −2·x'·mu' costs no pass)
        # rows of x or mu cast to the wide dtype at once: no more than two [B, chunk] temporaries' bytes
        # of the backward's (smaller) chunks
        grid = chunk_classes(x.shape[0], mu.shape[0])
        small = grid[0][1] - grid[0][0] if grid else 1
        self.wide_rows = max(16, 2 * x.shape[0] * small * x.element_size() // max(1, 8 * x.shape[1]))
        # here, before any chunk exists, the wide casts may take up to one [B, C] float32 tensor's
        # bytes (and 8 MiB): usually one cast each
        rows = max(self.wide_rows, min(x.shape[0] * mu.shape[0] * 4, 2 ** 23) // max(1, 8 * x.shape[1]))
        self.sx = dot_wide(x, self.beta_wide, rows)
        self.sx_col = self.sx[:, None]
        self.smu = dot_wide(mu, self.beta_wide, rows)
        if self.wide != self.compute:  # sx and smu as hi + lo pairs of the compute dtype (`s`)
            self.sx_hi, self.sx_lo = _split(self.sx_col, self.compute)
            self.smu_hi, self.smu_lo = _split(self.smu, self.compute)
        self.tau = transform.near_threshold(x.shape[1], self.compute)
        self.s_risk = S_RISK[self.wide]
        # the near test's row term, eps folded in: q + eps >= tau·|x'|² + tau·|mu'|² + eps
        self.eps_c = _constant(eps, self.compute, x.device)
        self.row_threshold = torch.add(self.eps_c, self.xn_col, alpha=self.tau)
        self.max_row_threshold = 0.0  # (set by _plain where it matters)
        self._row_bound = None  # max |x'|², or None until the first chunk reads it back (`_plain`)
        self._band = False  # not searched yet (`band`)

    def _plain(self, a: torch.Tensor, mn: torch.Tensor):
        """(plain, max |mu'_c|², min (q + eps)) of a chunk: plain when every input is finite and no norm
        can overflow (the chunk's largest |mu'|² and the largest |x'|² far from the dtype's max,
        Σ sx + Σ smu finite, which it is only if every sx and smu is, and q + eps NaN-free): then
        q cannot be NaN or lose the norms to overflow, and the chunk's near test is one comparison
        (`_near_plain`). Otherwise (NaN, ±inf, or huge values) the chunk runs the full test. One
        read-back per chunk (a sync on a GPU), the row side's terms with the first chunk's."""
        if not a.numel():
            return True, 0.0, 0.0
        first = self._row_bound is None
        parts = [mn.max(), a.amin()]
        if first:
            parts += [self.xn.max(), self.sx.sum(), self.smu.sum()]
        got = torch.stack(parts).tolist()
        mn_max, a_min = got[0], got[1]
        if first:
            xmax, sx_total, smu_total = got[2:]
            self.max_row_threshold = self.tau * xmax + self.eps
            finite = math.isfinite(sx_total + smu_total)
            self._row_bound = xmax if finite else math.nan  # (NaN compares False below)
        limit = torch.finfo(self.compute).max / 4
        plain = mn_max + self._row_bound < limit and math.isfinite(a_min)  # (NaN compares False)
        return plain, mn_max, a_min

    @property
    def band(self):
        """The s test's pairs, searched on first use (the logits' backward never needs them)."""
        if self._band is False:
            self._band = self._s_band()
        return self._band

    def _project(self, v: torch.Tensor, out: torch.Tensor, factor: torch.Tensor | None = None) -> None:
        """out = v·Lc (or v·factor), written into out (a view beside the norm columns)."""
        factor = self.metric.factor if factor is None else factor
        if self.metric.diagonal:
            torch.mul(v, factor, out=out)
        else:
            torch.mm(v, factor, out=out)

    def classes(self, c0: int, c1: int, norms: bool = True, centred: bool = True):
        """(mu_c − m [c, D], [−2·mu'_c | |mu'_c|² + eps | 1] [c, D' + 2] (a view of the shared
        buffer), |mu'_c|² [c], smu_c [c] wide) of classes [c0, c1). norms=False (the read-back
        backward, whose GEMMs do not use that column) leaves the norm column as it is and gives None.
        mu_c − m is None for a diagonal L (formed in the buffer: ClosedFormBackward takes ∂Lc from the
        buffer), and with centred=False (the logits' forward: no [c, D] temporary outlives the GEMM)."""
        if self._side is None or self._side.shape[0] < c1 - c0:  # (a loop's first chunk is its largest)
            # the ones column, and the norm column 1 until `norms` writes it (finite where no pass does)
            self._side = self.metric.factor.new_empty((c1 - c0, self.width + 2))
            self._side[:, self.width:] = 1
            self._side_w = self._side[:, :self.width]
        whole = c1 - c0 == self._side.shape[0]
        side = self._side if whole else self._side[:c1 - c0]
        mup2 = self._side_w if whole else side[:, :self.width]
        muc = None
        if self.metric.diagonal:  # (−2·(mu − m))·Lc in the buffer, no [c, D] temporary
            torch.sub(_cols(self.mu_c, c0, c1), self.m, out=mup2).mul_(self.factor_m2)
        else:
            centred_mu = torch.sub(_cols(self.mu_c, c0, c1), self.m)
            torch.mm(centred_mu, self.factor_m2, out=mup2)
            muc = centred_mu if centred else None
            del centred_mu
        mn = None
        if norms:
            mn = torch.linalg.vecdot(mup2, mup2).mul_(0.25)  # |−2·mu'|²/4, exact
            torch.add(mn, self.eps, out=side[:, self.width])
        return muc, side, mn, _cols(self.smu, c0, c1)

    def class_side_in(self, c0: int, c1: int, storage: torch.Tensor) -> torch.Tensor:
        """−2·mu'_c [c, D] of classes [c0, c1) (a diagonal L) written into the first c·D elements of a
        spent contiguous buffer: the read-back backward's GEMM operand without a buffer of its own."""
        side_w = storage.as_strided((c1 - c0, self.width), (self.width, 1))  # (storage: contiguous, its own)
        torch.sub(_cols(self.mu_c, c0, c1), self.m, out=side_w).mul_(self.factor_m2)
        return side_w

    def release(self):
        """Frees the class-side buffer after a loop over the chunks (the backward's end holds the most)."""
        self._side = self._side_w = None

    def _s_band(self):
        """The pairs (b, c) of the kernels' s test |s| < S_RISK·(|sx| + |smu|) (s = sx − smu lost too
        many digits), found once per call without a [B, C] pass: the test holds only where sx and smu
        have the same sign and |smu|/|sx| lies in ((1 − k)/(1 + k), (1 + k)/(1 − k)), so a search in
        the sorted smu gives each row's band (NaN and ±inf give none, as the test does). The band is
        widened to 2k so that rounding at its edges can only add pairs (a pair recomputed from the raw
        difference is exact: one more costs O(D)). None when no pair passes (the usual case)."""
        k = 2 * self.s_risk
        sorted_smu, order = torch.sort(self.smu)
        # each row's band ends [2, B], ordered per row (sx < 0 swaps them); an smu equal to the upper end
        # counts (the band is widened: an extra pair costs one recompute)
        scale = _constant(((1 - k) / (1 + k), (1 + k) / (1 - k)), self.sx.dtype, self.sx.device)
        ends = torch.outer(scale, self.sx).sort(dim=0).values
        start, end = torch.searchsorted(sorted_smu, ends, right=True).unbind(0)
        count = end - start  # (>= 0: the ends are ordered, a NaN row's two ends search alike)
        total = int(count.sum())
        if total == 0:
            return None
        b = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count)
        within = torch.arange(total, device=count.device) - (torch.cumsum(count, 0) - count)[b]
        return b, order[start[b] + within]

    def s(self, c0: int, c1: int) -> torch.Tensor:
        """s = sx − smu [B, c] of classes [c0, c1) in the compute dtype: (sx_hi − smu_hi) + sx_lo − smu_lo,
        three passes of the compute dtype instead of a wide [B, c] difference and its rounding (a K = 2
        GEMM adding the lo parts in one pass is as fast with one thread, but several times slower with
        two). Within 3 units of round-off of s, plus u²·(|sx| + |smu|), which matters only inside the s
        test's band (docs/design.md §2.1, Eq. 16), where the pairs are recomputed."""
        if self.wide == self.compute:
            return torch.sub(self.sx_col, _cols(self.smu, c0, c1))
        return torch.sub(self.sx_hi, _cols(self.smu_hi, c0, c1)).add_(self.sx_lo).sub_(_cols(self.smu_lo, c0, c1))

    def r(self, s: torch.Tensor, in_place: bool = False) -> torch.Tensor:
        """r = sqrt(s² + eps) in two passes (torch.hypot is one, but unvectorised: 10x slower on CPU),
        in s's storage with in_place."""
        return torch.addcmul(self.eps_c, s, s, out=s if in_place else None).sqrt_()

    def chunk(self, cls, c0: int, want_s: bool = False, out: torch.Tensor | None = None):
        """(a, r, s, near) of one chunk from the expansion, no graph: a = sqrt(q + eps) [B, c] (in out
        when given), r (None when λ = 0 and s is not asked for), s (None unless asked for), and the near
        pairs (b, c local), whose a and r are NOT exact (`recompute` gives theirs). The near test is the
        kernels' (csrc/randers_common.h at_risk and s_at_risk, with the same tau)."""
        muc, side, mn, smu = cls
        a = torch.mm(self.xs, side.T, out=out)  # |x'|² + |mu'|² + eps − 2·x'·mu' = q + eps
        band = None
        if self.band is not None:
            bb, bc = self.band
            here = (bc >= c0) & (bc < c0 + a.shape[1])
            band = (bb[here], bc[here] - c0) if bool(here.any()) else None
        plain, mn_max, a_min = self._plain(a, mn) if band is None else (False, 0.0, 0.0)
        if plain:  # (no NaN, no overflow possible)
            near = self._near_plain(a, mn, mn_max, a_min)
            # no clamp: q < 0 is a near pair (q + eps < eps <= its threshold), whose NaN root the
            # callers overwrite (the recomputed value) or zero (P = R = 0)
            a.sqrt_()
        else:
            threshold = torch.add(self.row_threshold, mn, alpha=self.tau)
            mask = torch.ge(a, threshold).logical_not_()  # NaN: near
            mask |= ~((self.xn_col + mn[None, :]) <= torch.finfo(a.dtype).max)  # overflowing norms
            if band is not None:
                mask[band] = True
            near = mask.nonzero(as_tuple=True)
            a.clamp_min_(self.eps).sqrt_()
        s = self.s(c0, c0 + a.shape[1]) if want_s or self.lam != 0.0 else None
        r = self.r(s, in_place=not want_s) if s is not None else None
        return a, r, (s if want_s else None), near

    def _near_plain(self, a: torch.Tensor, mn: torch.Tensor, mn_max: float, a_min: float):
        """The near pairs (b, c) of a chunk of finite q + eps (its largest |mu'|² and smallest entry
        read back by `_plain`): none unless the chunk's smallest entry is under the largest threshold
        (one reduction instead of a [B, c] comparison, the usual case); else the test on the rows
        whose smallest entry is under their largest threshold."""
        if not a.numel():
            return _no_pairs(a.device)
        # (both bounds widened by 2^-16, so that their rounding can only add candidates: the test
        # itself decides)
        top = self.tau * mn_max * (1 + 2 ** -16)
        if a_min >= (self.max_row_threshold + top) * (1 + 2 ** -16):
            return _no_pairs(a.device)
        rows = (a.amin(dim=1) < torch.add(self.row_threshold[:, 0], top).mul_(1 + 2 ** -16)).nonzero()[:, 0]
        sub = a.index_select(0, rows)
        bi, ci = torch.lt(sub, torch.add(self.row_threshold.index_select(0, rows), mn, alpha=self.tau)) \
            .nonzero(as_tuple=True)
        return rows[bi], ci

    def recompute(self, c0: int, bi: torch.Tensor, ci: torch.Tensor):
        """(a, r) of near pairs (b, c0 + c) from their raw difference, in the wide dtype, in groups
        of NEAR_GROUP pairs (their [P, D] temporaries)."""
        parts = []
        for start in range(0, bi.numel(), NEAR_GROUP):
            b, c = bi[start:start + NEAR_GROUP], ci[start:start + NEAR_GROUP] + c0
            parts.append(_direct_pairs(self, self.x.index_select(0, b).to(self.wide),
                                       self.mu.index_select(0, c).to(self.wide), self.eps))
        if not parts:
            empty = self.sx.new_zeros(0)
            return empty, empty
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def distance(self, cls, c0: int, want_parts: bool = False):
        """d [B, c] of one chunk, its near pairs exact (compute dtype); with want_parts also (a, r, s)
        for the backward, whose near entries do not matter (the backward zeroes P and R there)."""
        a, r, s, (bi, ci) = self.chunk(cls, c0, want_s=want_parts)
        d = a.clone() if want_parts else a
        if self.lam != 0.0:
            d.add_(r, alpha=self.lam)
        if bi.numel():
            na, nr = self.recompute(c0, bi, ci)
            d.index_put_((bi, ci), (na + self.lam * nr).to(d.dtype))
        return (d, (bi, ci), (a, r, s)) if want_parts else (d, (bi, ci))


class ClosedFormBackward:
    """The backward of docs/design.md §2 (the algorithm) for the eager form, chunk by chunk. Given G = ∂loss/∂logit over a
    chunk and its a, r, s, with H = −γ·G, P = H/a and R = H·λ·s/r (both 0 on near pairs):

        ∂x' = rowsum(P)·x' − P·mu'    ∂mu' = colsum(P)·mu' − Pᵀ·x'    (two GEMMs, as nn.Linear's)
        ∂sx = rowsum(R)    ∂smu = −colsum(R)    ∂λ = Σ H·r

    The code forms P' = G/a (from a or from a multiple k·a of it, the scale folded back into the
    GEMMs) and R' = G·s/r and folds −γ and λ into the GEMMs' scalars and the reductions; the GEMMs
    run against the forward's −2·mu' (the class-side buffer) and x'. Each chunk's ∂mu' goes to ∂Lc
    at once and to ∂mu (·Lcᵀ) in ∂mu's rows (a diagonal L: formed there, scaled by Lc for all
    classes in `finish`), ∂smu·beta added to ∂mu once in `finish`, so that the only [C, D] tensor
    is the returned ∂mu.
    ∂γ is the caller's (it knows d). The near pairs are differentiated from their raw difference
    (autograd over the gathered pairs, exact where the expansion's backward cancels, docs/design.md
    §2.1 (near pairs)); `finish` adds their ∂Lc to the GEMMs' and chains Lc to L (by hand for a
    diagonal L, autograd over the Cholesky for a full one)."""

    def __init__(self, ev: Eager, inputs, needs, gamma: float):
        self.ev, self.inputs, self.needs, self.g = ev, inputs, needs, gamma
        x, mu = inputs[0], inputs[1]
        want_x, want_mu, want_L, want_beta, want_lam = needs[:5]
        self.want_xp, self.want_mup = want_x or want_L, want_mu or want_L
        compute, wide = ev.compute, ev.wide
        f = ev.metric.factor
        # g·P'·(−2·mu') and g·rowsum(P'), summed over chunks (the GEMMs run D' wide: a width that is a
        # multiple of the vector length is faster than D' + 1 plus the ones column's sums)
        self.dxp_acc = ev.xp.new_zeros(ev.xp.shape)
        self.rowsum_P = ev.xp.new_zeros(x.shape[0])
        self.dsx = torch.zeros(x.shape[0], dtype=wide, device=x.device)
        # colsum(R') [C] in the compute dtype (∂smu = γλ·colsum(R')), each chunk's written in place
        self.colsum_R = (torch.zeros(mu.shape[0], dtype=compute, device=x.device)
                         if want_beta or (want_mu and ev.lam != 0.0) else None)
        self.dmu = torch.empty(mu.shape, dtype=compute, device=x.device) if want_mu else None
        # a diagonal L: each chunk's ∂mu'/γ is formed in ∂mu's rows and the whole taken to ∂mu in finish
        # (·γLc, plus ∂smu·beta: two passes over [C, D] instead of two per chunk)
        self.dmup_in_dmu = ev.metric.diagonal and want_mu
        self.xpT = ev.xp.T if self.dmup_in_dmu else None
        self.dmuT = self.dmu.T if self.dmup_in_dmu else None
        self.g_factor = f * gamma if ev.metric.diagonal else (f * gamma).T  # ∂mu = (∂mu'/γ)·(γ·Lcᵀ)
        # ∂Lc from the class side, /γ (a diagonal L: times −2·Lc, from the spent class-side buffer)
        self.dfactor = torch.zeros_like(f) if want_L else None
        self.beta_c = ev.beta_c
        self.dlam = torch.zeros((), dtype=wide, device=x.device)
        self.near_b, self.near_c, self.near_g = [], [], []
        self.zero = _constant(0.0, compute, x.device)
        # the read-back's class side in r's storage once r is spent (a [B, c] buffer holds a [c, D] one
        # where D <= B), so that the chunk holds two [B, c] temporaries and nothing else
        self.side_in_r = ev.metric.diagonal and ev.width <= x.shape[0]

    def chunk(self, c0, c1, cls, G, parts: list, near, logits=None):
        """Accumulates one chunk: G [B, c] (the caller's, read only), parts = [a, r, s] as Eager.chunk's
        (handed over: emptied, overwritten, freed as soon as spent), or, with logits (the chunk's
        forward output), none: then a, r, s are read back from the logits (docs/design.md §2, Eq. 12)
        in two [B, c] buffers. near: the chunk's near pairs (local indices); cls: its class side
        (None: formed here, once the [B, c] temporaries but P are gone)."""
        ev, g, lam = self.ev, self.g, self.ev.lam
        bi, ci = near
        if bi.numel():
            self.near_b.append(bi)
            self.near_c.append(ci + c0)
            self.near_g.append(G[bi, ci].to(ev.wide))
        scale = 1.0
        if logits is None:
            a, r, s = parts
            parts.clear()
        else:
            # −γ·a = logit + γλ·r: P' = G/a = −γ·G/(−γ·a), the −γ folded into the GEMMs
            a, scale = None, -g
            if lam != 0.0 or self.needs[4]:
                s = ev.s(c0, c1)
                r = ev.r(s)
            else:
                s = r = None
                a = logits.clone()
        want_x, want_mu, _, want_beta = self.needs[:4]
        if lam != 0.0 and (want_x or want_mu or want_beta):  # (R feeds ∂x, ∂mu and ∂beta only)
            u = s.div_(r)                                           # s/r
            if ev.eps == 0.0:  # an exact hit's P and R are 0 by convention (docs/guarantees.md, the convention at an exact hit)
                u.masked_fill_(r == 0, 0.0)
            R = u.mul_(G)
            if bi.numel():
                R.index_put_((bi, ci), self.zero)
            # (the chunk sums run in the compute dtype, as the GEMMs' rowsum(P') and colsum(P'); their
            # sums over chunks in the wide dtype)
            if want_x or want_beta:
                self.dsx.sub_(R.sum(dim=1), alpha=g * lam)                  # ∂sx = rowsum(R) = −γλ·rowsum(R')
            if self.colsum_R is not None:                                   # ∂smu = −colsum(R) = γλ·colsum(R')
                torch.sum(R, dim=0, out=_cols(self.colsum_R, c0, c1))
            del u
        else:
            R = s
        del s
        if a is None:  # (into R's storage, spent)
            a = torch.add(logits, r, alpha=g * lam, out=R)
        del R
        if self.needs[4]:                                           # ∂λ = Σ H·r = −γ·Σ G·r
            Gr = r.mul_(G)
            if bi.numel():
                Gr.index_put_((bi, ci), self.zero)
            self.dlam.sub_(Gr.sum(), alpha=g)
            del Gr
        hit = (a == 0) if ev.eps == 0.0 else None
        P = torch.div(G, a, out=a)                                  # P'/scale, in a's storage
        del a
        if hit is not None:
            P.masked_fill_(hit, 0.0)
        if bi.numel():
            P.index_put_((bi, ci), self.zero)
        if cls is not None:
            muc, side, _, _ = cls
            side_w = side[:, :ev.width]
        elif r is not None and self.side_in_r:  # a diagonal L's −2·mu' [c, D] in r's spent storage
            muc, side_w = None, ev.class_side_in(c0, c1, r)
        else:
            r = None  # (freed before the class side's temporaries exist)
            muc, side, _, _ = ev.classes(c0, c1, norms=False)
            side_w = side[:, :ev.width]
        del cls, r
        if self.want_xp:
            self.dxp_acc.addmm_(P, side_w, alpha=g * scale)
            self.rowsum_P.add_(P.sum(dim=1), alpha=g * scale)
        if self.want_mup:
            colsum_P = P.sum(dim=0)[:, None]
            # P'ᵀ·x' (beta = 0: the input is not read), into ∂mu's rows (as the transpose of x'ᵀ·P', which
            # the GEMM writes through the transposed view) or a temporary
            if self.dmup_in_dmu:
                rows_t = _cols(self.dmuT, c0, c1, 1)
                dmup = torch.addmm(rows_t, self.xpT, P, beta=0, alpha=scale, out=rows_t).T
            else:
                dmup = torch.addmm(self.zero, P.T, ev.xp, beta=0, alpha=scale)
            del P
            dmup.addcmul_(colsum_P, side_w, value=0.5 * scale)  # ∂mu'/γ = P'ᵀ·x' − colsum(P')·mu', mu' = −side/2
            if self.dfactor is not None:
                if ev.metric.diagonal:  # Σ_c −2·(mu_c − m)·Lc·∂mu'_c from the spent buffer (÷ −2·Lc in finish)
                    self.dfactor += side_w.mul_(dmup).sum(dim=0)
                else:
                    self.dfactor.addmm_(muc.T, dmup)
            if self.dmu is not None and not self.dmup_in_dmu:
                torch.mm(dmup, self.g_factor, out=self.dmu[c0:c1])

    def _chain_to_L(self, L, dfactor):
        """∂L from ∂Lc: by hand for a diagonal L (Lc = sqrt(L² + eps): ∂L = ∂Lc·L/Lc), through
        autograd over the Cholesky of docs/design.md §2 (Eq. 5) for a full one."""
        ev = self.ev
        if ev.metric.diagonal:
            return dfactor.mul_(L.to(ev.compute)).div_(ev.metric.factor)
        with torch.enable_grad():
            lL = L.detach().requires_grad_(True)
            factor = transform.metric_factor(lL, ev.eps, ev.compute)
            return torch.autograd.grad(factor, lL, dfactor.to(factor.dtype))[0]

    def _class_dfactor(self):
        """∂Lc/γ from the class side: a diagonal L's sums over the buffer divided by −2·Lc (an Lc of 0,
        eps = 0 and L = 0 there, takes no gradient from the class side: its ∂mu' is 0)."""
        dfactor = self.dfactor
        if self.ev.metric.diagonal:
            dfactor.div_(self.ev.factor_m2)
            if self.ev.eps == 0.0:
                dfactor.masked_fill_(self.ev.factor_m2 == 0, 0.0)
        return dfactor

    def finish(self, dgamma):
        """The gradients of (x, mu, L, beta, lam, gamma) in their dtypes (None where not needed)."""
        ev = self.ev
        x, mu, L, beta, lam, gamma = self.inputs
        want_x, want_mu, want_L, want_beta, want_lam, want_gamma = self.needs
        f = ev.metric.factor
        dx, dfactor = None, None
        if self.want_xp:
            width = ev.width
            # g·(P'·mu' − rowsum(P')·x') from g·P'·(−2·mu') and g·rowsum(P')
            dxp = self.dxp_acc.mul_(-0.5)
            dxp.addcmul_(self.rowsum_P[:, None], ev.xp, value=-1)
            self.dxp_acc = None
            # (each [B, D] temporary freed as soon as it is spent: the Cholesky's backward comes next)
            if want_L:
                xc = torch.sub(x, ev.m) if x.dtype == ev.compute else x.to(ev.compute) - ev.m
                dfactor = xc.mul_(dxp).sum(dim=0) if ev.metric.diagonal else xc.T @ dxp
                del xc
                dfactor.add_(self._class_dfactor(), alpha=self.g)
                self.dfactor = None
            if want_x:
                dx = dxp.mul_(f) if ev.metric.diagonal else dxp @ f.T
                dx.addr_(self.dsx.to(dx.dtype), self.beta_c)
            del dxp
        if self.dmu is not None:
            if self.dmup_in_dmu:
                self.dmu.mul_(self.g_factor)
            if ev.lam != 0.0:
                self.dmu.addr_(self.colsum_R, self.beta_c, alpha=self.g * ev.lam)
        self.g_factor = None  # (the Cholesky's backward comes next)
        dbeta = None
        if want_beta:
            # (the wide casts may take half a [B, C] float32 tensor's bytes here: no chunk is live)
            rows = max(ev.wide_rows, min(x.shape[0] * mu.shape[0] * 2, 2 ** 23) // max(1, 8 * x.shape[1]))
            dbeta = tdot_wide(x, self.dsx, rows).add_(tdot_wide(mu, self.colsum_R.to(ev.wide), rows),
                                                      alpha=self.g * ev.lam)
        dL, dlam = None, self.dlam
        near, sources, got, lf = None, [], [], None
        if self.near_b:
            with torch.enable_grad():
                # the metric factor as a leaf: the near pairs' ∂Lc joins the GEMMs' before the chain to L
                lf = f.detach().requires_grad_(want_L)
                metric = copy.copy(ev.metric)
                metric.factor = lf
                b, c = torch.cat(self.near_b), torch.cat(self.near_c)
                # index_select, not x[b]: deterministic gathers; the gradients come back per pair and
                # are added with index_add_ below
                xb = x.detach().index_select(0, b).to(ev.wide).requires_grad_(want_x)
                mc = mu.detach().index_select(0, c).to(ev.wide).requires_grad_(want_mu)
                lbeta = beta.detach().to(ev.wide).requires_grad_(want_beta)
                llam = lam.detach().to(ev.wide).requires_grad_(want_lam)
                side = copy.copy(ev)
                side.metric, side.beta_wide = metric, lbeta
                na, nr = _direct_pairs(side, xb, mc, ev.eps)
                pairs = na + llam * nr
                near = (b, c, xb, mc, lbeta, llam)
                sources = [t for t in (lf, xb, mc, lbeta, llam) if t.requires_grad]
                if sources and pairs.requires_grad:
                    weight = torch.cat(self.near_g) * (-self.g)
                    got = torch.autograd.grad(pairs, sources, weight.to(pairs.dtype), allow_unused=True)
        got = dict(zip(map(id, sources), got))
        if want_L:
            if lf is not None and got.get(id(lf)) is not None:
                dfactor += got[id(lf)].to(dfactor.dtype)
            dL = self._chain_to_L(L, dfactor)
        if near is not None:
            b, c, xb, mc, lbeta, llam = near
            if got.get(id(xb)) is not None:
                dx.index_add_(0, b, got[id(xb)].to(dx.dtype))
            if got.get(id(mc)) is not None:
                self.dmu.index_add_(0, c, got[id(mc)].to(self.dmu.dtype))
            if got.get(id(lbeta)) is not None:
                dbeta = dbeta + got[id(lbeta)]
            if got.get(id(llam)) is not None:
                dlam = dlam + got[id(llam)]
        out = []
        for t, n, gr in zip(self.inputs, self.needs, (dx, self.dmu, dL, dbeta, dlam, dgamma)):
            if not n:
                out.append(None)
            else:
                if gr is None:
                    gr = torch.zeros_like(t)
                else:
                    gr = gr if gr.dtype == t.dtype else gr.to(t.dtype)
                    gr = gr if gr.shape == t.shape else gr.reshape(t.shape)
                out.append(gr)
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
        ev = Eager(x, mu, L, beta, lam, eps, LOGITS_FORWARD_CHUNKS_PER_CALL)
        g, lam_f = float(gamma), ev.lam
        near_b, near_c = [], []
        # a formed in the output's columns (the GEMM writes them, every pass after it is in place), then
        # −γ·(a + λ·r) there; half-precision logits take a in a temporary of the compute dtype
        in_place = out.dtype == ev.compute
        views = [out] if len(ev.chunks) <= 1 else out.split(ev.chunks[0][1], dim=1)
        for (c0, c1), o in zip(ev.chunks, views):
            a, r, _, (bi, ci) = ev.chunk(ev.classes(c0, c1, centred=False), c0, out=o if in_place else None)
            if lam_f != 0.0:  # −γ·(a + λ·r)
                torch.add(a.mul_(-g), r, alpha=-g * lam_f, out=o)
            else:
                torch.mul(a, -g, out=o)
            if bi.numel():
                na, nr = ev.recompute(c0, bi, ci)
                o.index_put_((bi, ci), ((na + lam_f * nr) * -g).to(o.dtype))
                near_b.append(bi)
                near_c.append(ci + c0)
            del a, r  # (before the next chunk's temporaries exist: the peak is one chunk's)
        ev.release()
        empty = x.new_zeros(0, dtype=torch.long)
        near = (torch.cat(near_b), torch.cat(near_c)) if near_b else (empty, empty)
        ctx.save_for_backward(x, mu, L, beta, lam, gamma, out, *near)
        ctx.eps = eps
        ctx.eager = ev  # (the row side, mu·beta and the chunk grid: [B, D] and [C], reused by the backward)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, mu, L, beta, lam, gamma, out, near_b, near_c = ctx.saved_tensors
        inputs = (x, mu, L, beta, lam, gamma)
        with torch.no_grad():  # (under create_graph=True too: _once refuses a second derivative)
            grads = _Logits._gradients(ctx, grad, *ctx.saved_tensors)  # (no graph is recorded under no_grad)
        return (*_once(grads, inputs), None)

    @staticmethod
    def _gradients(ctx, grad, x, mu, L, beta, lam, gamma, out, near_b, near_c):
        inputs, needs = (x, mu, L, beta, lam, gamma), list(ctx.needs_input_grad[:6])
        ev = ctx.eager
        g, compute = float(gamma), ev.compute
        bw = ClosedFormBackward(ev, inputs, needs, g)
        readback = out.dtype == compute and abs(g) >= GAMMA_READBACK_MIN
        # ∂γ from the read-back logits in one dot product where both are contiguous (no temporary)
        whole = readback and needs[5] and grad.dtype == out.dtype and grad.is_contiguous() and out.is_contiguous()
        if whole:
            dgamma = torch.dot(grad.view(-1), out.view(-1)).to(ev.wide).div_(g)
        else:
            dgamma = torch.zeros((), dtype=ev.wide, device=x.device)
        # the read-back holds two [B, c] temporaries and the class side: half as many chunks as the
        # other backwards where the class side fits in a spent temporary (bw.side_in_r), a third otherwise
        parts = (READBACK_CHUNKS_PER_CALL - 1 if bw.side_in_r else READBACK_CHUNKS_PER_CALL) if readback else None
        grid = chunk_classes(x.shape[0], mu.shape[0], parts)
        no_pairs = (near_b, near_c) if not near_b.numel() else (near_b[:0], near_c[:0])
        ends = [0] * len(grid)
        if readback and near_c.numel():  # the saved near pairs by class, and where each chunk's end
            order = torch.argsort(near_c, stable=True)
            near_b, near_c = near_b[order], near_c[order]
            ends = torch.searchsorted(near_c, torch.tensor([c1 for _, c1 in grid], device=x.device)).tolist()
        # every chunk's columns of the incoming gradient and of the logits at once (one call each)
        grads = [grad] if len(grid) <= 1 else grad.split(grid[0][1], dim=1)
        outs = ([out] if len(grid) <= 1 else out.split(grid[0][1], dim=1)) if readback else grads
        n1 = 0
        for (c0, c1), end, G, logits in zip(grid, ends, grads, outs):
            G = G if G.dtype == compute else G.to(compute)
            cls, parts = None, []
            if readback:  # a = d − λ·r, d = −logit/γ: no GEMM (the near pairs' a is not used: P = 0 there)
                n0, n1 = n1, end
                near = (near_b[n0:n1], near_c[n0:n1] - c0) if n1 > n0 else no_pairs
                if needs[5] and not whole:  # ∂γ = Σ G·∂logit/∂γ = Σ G·logit/γ
                    dgamma += torch.mul(G, logits).sum(dtype=ev.wide) / g
            else:
                logits = None
                cls = ev.classes(c0, c1)
                d, near, (a, r, s) = ev.distance(cls, c0, want_parts=True)
                if needs[5]:  # ∂γ = −Σ G·d
                    dgamma -= torch.mul(G, d).sum(dtype=ev.wide)
                del d
                parts = [a, r, s]
                del a, r, s  # (handed over: bw.chunk frees each as soon as it is spent)
            bw.chunk(c0, c1, cls, G, parts, near, logits)
            del cls, G  # (before the next chunk's temporaries exist)
        ev.release()
        return bw.finish(dgamma)


def logits(x, mu, L, beta, lam, gamma, eps: float) -> torch.Tensor:
    """−γ·d [B, C] in x's dtype (inputs validated; lam, gamma floats or 0-dim tensors)."""
    if static_shapes():
        rows = _prepare(x, mu, L, beta, lam, eps, static=True)
        d = distance_static(rows, mu, eps)
        g = gamma.to(rows.compute) if isinstance(gamma, torch.Tensor) else gamma
        return (-g * d).to(x.dtype)
    return _Logits.apply(x, mu, L, beta, _scalar_tensor(lam, x), _scalar_tensor(gamma, x), eps)


# ----------------------------------------------------------------------------------------------
# The cross-entropy's row statistics (ops/row_stats.py's contract: (lse, target_logit, sl, pl), float64)
# ----------------------------------------------------------------------------------------------

def _as_2d(t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1]; [B, k] as it is (a reshape(B, -1) is ambiguous at B = 0)."""
    return t.unsqueeze(1) if t.dim() == 1 else t


def _margin_logits(rows, d, gamma, target, c0, c1, margin):
    """logit'_bc = −γ·(d_bc + margin·[c = t_b]) over classes [c0, c1), in float64 (the wide dtype):
    the static form's."""
    g = gamma.to(rows.wide) if isinstance(gamma, torch.Tensor) else gamma
    lg = -g * d.to(rows.wide)
    if margin != 0.0:
        t = _as_2d(target)
        here = (t >= c0) & (t < c1)
        hit = torch.zeros_like(lg, dtype=torch.bool).scatter(1, torch.where(here, t - c0, 0), here)
        lg = lg - (g * margin) * hit.to(lg.dtype)
    return lg


def _chunk_stats(lg, target, c0, c1, class_weight, dense_soft_target):
    """(lse, target_logit, sl, pl) of one chunk's logits' [B, c] (target_logit over the chunk's targets, 0 elsewhere): the
    static form's."""
    B = lg.shape[0]
    t = _as_2d(target)
    here = (t >= c0) & (t < c1)
    target_logit = torch.where(here, lg.gather(1, torch.where(here, t - c0, 0)), 0.0).reshape(target.shape)
    lse = torch.logsumexp(lg, dim=1) if lg.shape[1] else lg.new_full((B,), float("-inf"))
    v = None if class_weight is None else class_weight[c0:c1].to(lg.dtype)
    sl = lg.sum(dim=1) if v is None else lg @ v
    if dense_soft_target is None:
        pl = torch.zeros_like(sl)
    else:
        pw = dense_soft_target[:, c0:c1].to(lg.dtype) * lg
        pl = pw.sum(dim=1) if v is None else pw @ v
    return lse, target_logit, sl, pl


def _target_cells(t2: torch.Tensor, c0: int, c1: int):
    """(b, k, c): the targets t2[b, k] among classes [c0, c1), c local."""
    b, k = ((t2 >= c0) & (t2 < c1)).nonzero(as_tuple=True)
    return b, k, t2[b, k] - c0


def _margin_chunk_logits(ev: Eager, cls, c0, c1, g, t2, margin, want_parts=False):
    """logit' = −γ·(d + margin·[c = t]) [B, c] in the compute dtype, its target cells, and (with
    want_parts) d's parts for the backward. A row's repeated target gets the margin once."""
    got = ev.distance(cls, c0, want_parts)
    lg = got[0].mul_(-g) if g != 0.0 else torch.zeros_like(got[0])  # (γ = 0: d kept for ∂γ)
    cells = _target_cells(t2, c0, c1)
    b, _, c = cells
    if margin != 0.0 and b.numel():
        lg.index_put_((b, c), lg[b, c] - g * margin)
    return lg, cells, got


def _row_weights(lg, c0, c1, class_weight, dense_soft_target):
    """v [c] (None without class weights) and the dense soft target's columns [B, c] (or None)."""
    v = None if class_weight is None else class_weight[c0:c1].to(lg.dtype)
    p = None if dense_soft_target is None else dense_soft_target[:, c0:c1].to(lg.dtype)
    return v, p


class _RowStats(torch.autograd.Function):
    """(lse, target_logit, sl, pl) class chunk by class chunk, O(B) memory besides one chunk (eager form): the
    logits in the compute dtype, every row statistic summed in the wide dtype (as the kernels); the
    backward recomputes each chunk's d (no [B, C] is kept) and applies the closed form."""

    @staticmethod
    def forward(ctx, x, mu, L, beta, lam, gamma, target, eps, margin, class_weight, dense_soft_target):
        B, C = x.shape[0], mu.shape[0]
        ev = Eager(x, mu, L, beta, lam, eps, FORWARD_CHUNKS_PER_CALL)
        wide, g, t2 = ev.wide, float(gamma), _as_2d(target)
        target_logit = torch.zeros(t2.shape, dtype=wide, device=x.device)
        sl, pl = x.new_zeros(B, dtype=wide), x.new_zeros(B, dtype=wide)
        maxes, sums = [], []
        for c0, c1 in ev.chunks:
            lg, (b, k, c), _ = _margin_chunk_logits(ev, ev.classes(c0, c1), c0, c1, g, t2, margin)
            if b.numel():
                target_logit[b, k] = lg[b, c].to(wide)
            v, p = _row_weights(lg, c0, c1, class_weight, dense_soft_target)
            sl += lg.sum(dim=1, dtype=wide) if v is None else (lg @ v).to(wide)
            if p is not None:
                pw = torch.mul(p, lg)
                pl += pw.sum(dim=1, dtype=wide) if v is None else (pw @ v).to(wide)
            # logsumexp of the chunk: its max (a logit, exact), Σ exp(logit − max) summed in the wide dtype
            mx = lg.amax(dim=1)
            shift = torch.where(torch.isfinite(mx), mx, 0.0)
            maxes.append(shift.to(wide))
            sums.append(lg.sub_(shift[:, None]).exp_().sum(dim=1, dtype=wide))
            del lg  # (before the next chunk's temporaries exist)
        if C == 0:
            lse = x.new_full((B,), float("-inf"), dtype=wide)
        else:
            lse = torch.logsumexp(torch.stack(maxes, 1) + torch.log(torch.stack(sums, 1)), dim=1)
        ctx.save_for_backward(x, mu, L, beta, lam, gamma, target, lse, class_weight, dense_soft_target)
        ctx.eps, ctx.margin = eps, margin
        ctx.eager = ev  # (the row side, mu·beta, the s test's pairs and the chunk grid, reused by the backward)
        return lse, target_logit.reshape(target.shape), sl, pl

    @staticmethod
    def backward(ctx, *weights):
        inputs = ctx.saved_tensors[:6]
        with torch.no_grad():  # (under create_graph=True too: _once refuses a second derivative)
            grads = _RowStats._gradients(ctx, *[None if w is None else w.detach() for w in weights],
                                         *[None if t is None else t.detach() for t in ctx.saved_tensors])
        return (*_once(grads, inputs), None, None, None, None, None)

    @staticmethod
    def _gradients(ctx, w_lse, w_target_logit, w_sl, w_pl, x, mu, L, beta, lam, gamma, target, lse, class_weight, dense_soft_target):
        inputs, needs = (x, mu, L, beta, lam, gamma), list(ctx.needs_input_grad[:6])
        ev = ctx.eager
        compute, wide, g, t2 = ev.compute, ev.wide, float(gamma), _as_2d(target)
        bw = ClosedFormBackward(ev, inputs, needs, g)
        wt = None if w_target_logit is None else _as_2d(w_target_logit).to(compute)
        # lse as hi + lo in the compute dtype: logit − lse_hi − lse_lo keeps the softmax's exponent
        # to the compute dtype's precision where it matters (logit near lse), without a wide [B, c] pass
        finite = torch.isfinite(lse)
        lse_hi = lse.to(compute)
        lse_lo = torch.where(finite, lse - lse_hi.to(wide), 0.0).to(compute)
        w_lse_c = None if w_lse is None else w_lse.to(compute)[:, None]
        dgamma = torch.zeros((), dtype=wide, device=x.device)
        for c0, c1 in chunk_classes(x.shape[0], mu.shape[0]):  # (the backward's grid: smaller chunks)
            cls = ev.classes(c0, c1)
            lg, (b, k, c), (d, near, (a, r, s)) = _margin_chunk_logits(ev, cls, c0, c1, g, t2, ctx.margin, True)
            if w_lse_c is not None:
                G = torch.sub(lg, lse_hi[:, None]).sub_(lse_lo[:, None]).exp_().mul_(w_lse_c)
            else:
                G = torch.zeros_like(lg)
            if wt is not None and b.numel():
                G.index_put_((b, c), wt[b, k], accumulate=True)
            v, p = _row_weights(lg, c0, c1, class_weight, dense_soft_target)
            lin = None
            if w_sl is not None:
                lin = w_sl.to(compute)[:, None]
            if w_pl is not None and p is not None:
                wp = w_pl.to(compute)[:, None]
                lin = torch.mul(p, wp) if lin is None else torch.addcmul(lin, p, wp)
            if lin is not None:
                G.add_(lin if v is None else lin * v[None, :])
            if needs[5]:
                # ∂/∂γ of logit' = −γ·(d + margin·[c = t]): logit'/γ (γ ≠ 0), else −(d + margin·[c = t])
                if g != 0.0:
                    dgamma += torch.mul(G, lg).sum(dtype=wide) / g
                else:
                    dm = d  # d is a's clone with the near pairs exact (λ·r added)
                    if ctx.margin != 0.0 and b.numel():
                        dm = dm.index_put((b, c), dm[b, c] + ctx.margin)
                    dgamma -= torch.mul(G, dm).sum(dtype=wide)
            del lg, d, lin
            parts = [a, r, s]
            del a, r, s  # (handed over: bw.chunk frees each as soon as it is spent)
            bw.chunk(c0, c1, cls, G, parts, near)
            del cls, G  # (before the next chunk's temporaries exist)
        ev.release()
        return bw.finish(dgamma)


def row_stats(x, mu, L, beta, lam, gamma, target, eps: float, margin: float, class_weight=None, dense_soft_target=None):
    """(lse, target_logit, sl, pl) in the wide dtype, differentiable in x, mu, L, beta, lam, gamma (contract of
    ops/row_stats.py). target: local class indices [B] or [B, k], −1 where a row has none here."""
    if not static_shapes() and target.numel() and bool((target == -2).any()):
        raise ValueError("faim_kernels: target holds a class index out of range [0, C)")
    class_weight = None if class_weight is None else class_weight.detach()
    dense_soft_target = None if dense_soft_target is None else dense_soft_target.detach()
    if static_shapes():
        rows = _prepare(x, mu, L, beta, lam, eps, static=True)
        lg = _margin_logits(rows, distance_static(rows, mu, eps), gamma, target, 0, mu.shape[0], margin)
        return _chunk_stats(lg, target, 0, mu.shape[0], class_weight, dense_soft_target)
    target = target.to(torch.int64)
    return _RowStats.apply(x, mu, L, beta, _scalar_tensor(lam, x), _scalar_tensor(gamma, x), target, eps,
                           margin, class_weight, dense_soft_target)


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
        ev = Eager(x, mu, L, beta, lam, eps)
        values = x.new_empty((B, 0), dtype=ev.compute)
        index = torch.empty((B, 0), dtype=torch.int64, device=x.device)
        for c0, c1 in ev.chunks:
            d, _ = ev.distance(ev.classes(c0, c1), c0)
            ids = torch.arange(c0, c1, device=x.device).expand(B, -1)
            v, pos = topk_by_sort(torch.cat([values, d], dim=1), k, largest)
            values, index = v, torch.cat([index, ids], dim=1).gather(1, pos)
        return values.to(x.dtype), index
