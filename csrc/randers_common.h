// Pieces shared by the fused CPU kernels (randers_logits.cpp, randers_cross_entropy.cpp): the
// preparation of the operands (centring, x·Lc, mu·Lc, the float64 s terms, the row norms), the
// argument checks, the per-pair epilogue, and the near-pair recompute.
// The math is docs/design.md §1 (the function)-2; the exactness rule is docs/design.md §2.1 (near pairs). The op schemas are defined in Python
// (faim_kernels/ops/contract.py); these files only register CPU kernels for them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace faim_kernels {

// Output tiles of kTileB x kTileC: a 256 x 256 float tile (256 KiB) stays in L2 while the
// epilogue runs over it right after its GEMM. 256 rows rather than 64 cut the repacking of each
// mu' tile by the BLAS: forward 26 -> 20 ms, backward 69 -> 59 ms at (512, 4096, 256), one thread.
constexpr int64_t kTileB = 256;
constexpr int64_t kTileC = 256;
// The logits backward parallelises over row tiles only, so its tiles are shorter: 64 rows keep
// both cores busy from B = 128 on.
constexpr int64_t kTileBBackward = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per task of a pass over the rows of an [n, D] array, and rows per chunk of the passes that
// sum over rows in fixed chunks added in chunk order (so that a sum does not depend on the thread
// count): about 16k elements, 64 KiB of float, each. The fixed grains of 256 and 512 rows these
// passes had ran every pass over x of a (256, 1000, 128) head on one thread while the other
// waited, ~150 µs of a ~1.9 ms training step on two threads; below 16k elements a pass takes a few
// µs, less than waking a thread.
constexpr int64_t kRowPassElements = 16384;
inline int64_t rows_per_task(int64_t D) { return std::max<int64_t>(1, kRowPassElements / std::max<int64_t>(D, 1)); }

// The rows of x [B, D] and mu [C, D] as one range of fixed chunks of rows_per_task(D) rows, x's
// first, for a pass over both sides in one parallel region: chunk ch covers rows first_row(ch) ..
// first_row(ch) + chunk_rows (clipped) of side side(ch) (0: x, 1: mu). grain: one task per chunk, but
// all of them on the calling thread where the two sides together are one chunk's worth (a small
// head: x's and mu's partial chunks would otherwise wake a second thread for a few µs of work).
struct TwoSideChunks {
    int64_t chunk_rows, x_chunks, n_chunks, grain;
    TwoSideChunks(int64_t B, int64_t C, int64_t D)
        : chunk_rows(rows_per_task(D)),
          x_chunks(ceil_div(B, chunk_rows)),
          n_chunks(x_chunks + ceil_div(C, chunk_rows)),
          grain((B + C) * D > kRowPassElements ? 1 : std::max<int64_t>(n_chunks, 1)) {}
    int side(int64_t ch) const { return ch < x_chunks ? 0 : 1; }
    int64_t first_row(int64_t ch) const { return (ch < x_chunks ? ch : ch - x_chunks) * chunk_rows; }
};

// The prepared operands of one call (one name for the idea, as on the Triton side):
// x' = (x − m)·Lc and mu' = (mu − m)·Lc (m the centre of the prototypes), their squared norms,
// sx = x·beta and smu = mu·beta in float64, and the raw rows and factor for the near pairs.
template <typename T>
struct Operands {
    at::Tensor xp, mup;         // [B, K], [C, K] x', mu' (contiguous, T)
    const double* sx;           // [B] x·beta (float64)
    const double* smu;          // [C] mu·beta
    const T* x;                 // [B, D] raw x: near-pair recomputation
    const T* mu;                // [C, D] raw mu
    const T* lc;                // [D] or [D, K] metric factor (K = D but for the logits ops' wide factor)
    const T* beta = nullptr;    // [D] the 1-form: near pairs take s = beta·(x_b − mu_c) from the difference
    bool full;                  // lc is [D, K] (a matrix; [D] for a diagonal factor)
    bool lower = false;         // a full lc (its A block if wide) is lower triangular: near pairs skip its zeros
    std::vector<T> xnorm, munorm;  // |x'_b|², |mu'_c|²
    // sx, smu split into hi + lo parts in T: s = (sx_hi − smu_hi) + (sx_lo − smu_lo) keeps the
    // float64 difference's accuracy (the hi difference is exact when they are close: Sterbenz)
    // in loops that stay in T and so vectorise at full width. For T = double, lo is 0.
    std::vector<T> sx_hi, sx_lo, smu_hi, smu_lo;
    int64_t B, C, D;
    int64_t K = 0;              // the width of x' and mu': D, or a full factor's column count (set by every builder)
    double ridge = 0;           // > 0: lc is the wide factor [A | ridge·I] [D, 2D] (wide_factor_ridge)
    double lam, eps, tau;
};

template <typename T>
inline void split_hi_lo(double s, T& hi, T& lo) {
    hi = T(s);
    lo = std::isfinite(hi) ? T(s - double(hi)) : T(0);  // Inf − Inf would make every s NaN
}

template <typename T>
void split_all(const double* s, int64_t n, std::vector<T>& hi, std::vector<T>& lo) {
    hi.resize(n);
    lo.resize(n);
    for (int64_t i = 0; i < n; ++i) split_hi_lo(s[i], hi[i], lo[i]);
}

// |row|² of one row, summed in float64 (vectorised). Never inlined: the simd reduction's order is
// the compiler's choice, and two inlined copies (a parallel region's body and its one-thread path,
// say) were seen to sum in different orders, so float64 norms, and logits, changed with the thread
// count. One compiled copy serves every caller (the logits, cross-entropy and top-k ops alike).
template <typename T>
__attribute__((noinline)) T row_sq_norm(const T* __restrict__ row, int64_t D) {
    double acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < D; ++k) acc += double(row[k]) * double(row[k]);
    return T(acc);
}

template <typename T>
std::vector<T> row_sq_norms(const at::Tensor& v) {
    const int64_t n = v.size(0), D = v.size(1);
    const T* p = v.data_ptr<T>();
    std::vector<T> out(n);
    T* o = out.data();
    // Loops read captured values into locals first: a store through a captured reference could
    // alias them, which keeps a loop scalar (3-5x slower here).
    at::parallel_for(0, n, rows_per_task(D), [p, o, D](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) o[i] = row_sq_norm(p + i * D, D);
    });
    return out;
}

// The centre m: the mean prototype with non-finite coordinates replaced by 0, so a NaN or Inf in
// one prototype cannot reach every pair (faim_kernels/transform.py center_of states the rule). One
// pass in float64 over fixed row chunks summed in order (deterministic), instead of four ATen ops.
template <typename T>
at::Tensor center_of(const at::Tensor& mu) {
    const int64_t C = mu.size(0), D = mu.size(1);
    at::Tensor m = at::empty({D}, mu.options());
    T* out = m.data_ptr<T>();
    if (C == 0) {
        std::fill(out, out + D, T(0));
        return m;
    }
    const T* p = mu.data_ptr<T>();
    const int64_t chunk_rows = rows_per_task(D);
    const int64_t n_chunks = ceil_div(C, chunk_rows);
    std::vector<double> part(n_chunks * D, 0.0);
    double* parts = part.data();
    at::parallel_for(0, n_chunks, 1, [p, parts, C, D, chunk_rows](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) {
            double* __restrict__ acc = parts + ch * D;
            for (int64_t i = ch * chunk_rows; i < std::min(C, (ch + 1) * chunk_rows); ++i) {
                const T* __restrict__ row = p + i * D;
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) acc[k] += double(row[k]);
            }
        }
    });
    for (int64_t k = 0; k < D; ++k) {
        double total = 0;
        for (int64_t ch = 0; ch < n_chunks; ++ch) total += parts[ch * D + k];
        const T v = T(total / double(C));
        out[k] = std::isfinite(v) ? v : T(0);
    }
    return m;
}

// row·b in float64 with eight independent accumulators in a fixed order (deterministic), a shape
// the compiler turns into full-width vector code (one running sum is a chain of dependent adds).
template <typename T>
inline double dot64(const T* __restrict__ row, const double* __restrict__ b, int64_t D) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= D; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += double(row[k + j]) * b[k + j];
    double tail = 0;
    for (; k < D; ++k) tail += double(row[k]) * b[k];
    return (((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))) + tail;
}

// s[i] = v_i·beta in float64 (s = sx − smu then cancels harmlessly, docs/design.md §2.1 (near pairs)), row by row: no
// float64 copy of v (the plain loop across rows became a gather).
template <typename T>
void row_dots64(const at::Tensor& v, const T* beta, double* s) {
    const int64_t n = v.size(0), D = v.size(1);
    const T* p = v.data_ptr<T>();
    std::vector<double> beta64(beta, beta + D);
    const double* b = beta64.data();
    at::parallel_for(0, n, rows_per_task(D), [p, b, s, D](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) s[i] = dot64(p + i * D, b, D);
    });
}

// (v − m)·Lc for the rows of v: one fused pass for a diagonal factor, a GEMM for a full one; a wide
// factor [A | ridge·I] (ridge > 0) takes the GEMM for A and ridge·(v − m) for the right half.
template <typename T>
at::Tensor project(const at::Tensor& v, const at::Tensor& m, const at::Tensor& lc, T ridge = T(0)) {
    if (lc.dim() == 2 && ridge > T(0)) {
        const int64_t n = v.size(0), D = v.size(1);
        const at::Tensor vc = v - m;
        at::Tensor out = at::empty({n, 2 * D}, v.options());
        at::Tensor left = out.narrow(1, 0, D);
        at::mm_out(left, vc, lc.narrow(1, 0, D));
        const T* cp = vc.data_ptr<T>();
        T* o = out.data_ptr<T>();
        at::parallel_for(0, n, rows_per_task(D), [cp, o, D, ridge](int64_t begin, int64_t end) {
            for (int64_t i = begin; i < end; ++i)
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) o[i * 2 * D + D + k] = ridge * cp[i * D + k];
        });
        return out;
    }
    if (lc.dim() == 2) return at::mm(v - m, lc);
    at::Tensor out = at::empty_like(v);
    const int64_t n = v.size(0), D = v.size(1);
    const T *p = v.data_ptr<T>(), *mp = m.data_ptr<T>(), *lp = lc.data_ptr<T>();
    T* o = out.data_ptr<T>();
    at::parallel_for(0, n, rows_per_task(D), [p, mp, lp, o, D](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i)
#pragma omp simd
            for (int64_t k = 0; k < D; ++k) o[i * D + k] = (p[i * D + k] - mp[k]) * lp[k];
    });
    return out;
}

// Σ_i w_i·(v_i − m) [D] in float64 (the centred chain rule to beta: in exact arithmetic the x and
// mu halves' Σ w add to zero, so centring keeps them from cancelling when the prototypes lie far
// from the origin). Fixed row chunks summed in order: the result does not depend on threads.
template <typename T>
std::vector<double> centred_weighted_sum(const at::Tensor& v, const T* m, const double* w) {
    const int64_t n = v.size(0), D = v.size(1);
    const T* p = v.data_ptr<T>();
    const int64_t chunk_rows = rows_per_task(D);
    const int64_t n_chunks = ceil_div(n, chunk_rows);
    std::vector<double> part(n_chunks * D, 0.0);
    double* parts = part.data();
    at::parallel_for(0, n_chunks, 1, [p, m, w, parts, n, D, chunk_rows](int64_t begin, int64_t end) {
        for (int64_t ch = begin; ch < end; ++ch) {
            double* __restrict__ acc = parts + ch * D;
            for (int64_t i = ch * chunk_rows; i < std::min(n, (ch + 1) * chunk_rows); ++i) {
                const double wi = w[i];
                const T* __restrict__ row = p + i * D;
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) acc[k] += wi * (double(row[k]) - double(m[k]));
            }
        }
    });
    std::vector<double> out(D, 0.0);
    for (int64_t ch = 0; ch < n_chunks; ++ch)
        for (int64_t k = 0; k < D; ++k) out[k] += part[ch * D + k];
    return out;
}

// Whether a [D, D] factor (or the first D columns of a [D, ld] one) is lower triangular (every
// entry above the diagonal exactly 0).
template <typename T>
bool is_lower_triangular(const T* lc, int64_t D, int64_t ld = -1) {
    if (ld < 0) ld = D;
    for (int64_t k = 0; k < D; ++k)
        for (int64_t j = k + 1; j < D; ++j)
            if (lc[k * ld + j] != T(0)) return false;
    return true;
}

// The ridge rho of a wide factor lc = [A | rho·I] [D, 2D] (FAIMHead's, docs/design.md Eq. 23;
// contiguous), or 0 where lc has another form. The kernels then form x'·s right half as rho·(x − m)
// and its chain rule as rho·∂x'[:, D:] instead of multiplying by the identity block: the projection
// and ∂x cost the square factor's (B + C)·D² each, not 2·(B + C)·D². O(D²) to check.
template <typename T>
T wide_factor_ridge(const at::Tensor& lc) {
    if (lc.dim() != 2 || lc.size(0) == 0 || lc.size(1) != 2 * lc.size(0)) return T(0);
    const int64_t D = lc.size(0);
    const T* p = lc.data_ptr<T>();
    const T rho = p[D];
    if (!(rho > T(0)) || !std::isfinite(rho)) return T(0);
    for (int64_t i = 0; i < D; ++i) {
        const T* __restrict__ right = p + i * 2 * D + D;
        int mismatch = 0;  // a whole row per test (no early exit inside it): the loop vectorises
#pragma omp simd reduction(| : mismatch)
        for (int64_t j = 0; j < D; ++j) mismatch |= right[j] != (j == i ? rho : T(0));
        if (mismatch) return T(0);
    }
    return rho;
}

// The backward ops' grad_mask: bit k stands for gradient k of (x, mu, lc, beta, lam, gamma)
// (faim_kernels/ops/contract.py). Skipped where a bit is 0: the ∂x GEMM for features without grad,
// the ∂mu GEMM for frozen prototypes, the ∂Lc products for a frozen metric.
enum GradBit : int64_t { kGradX = 0, kGradMu = 1, kGradLc = 2, kGradBeta = 3, kGradLam = 4, kGradGamma = 5 };
constexpr int64_t kNumGrads = 6;

inline bool wants_grad(int64_t mask, int64_t bit) { return (mask >> bit) & 1; }

// The grad_mask of a C++ autograd formula whose first kNumGrads inputs are (x, mu, lc, beta, lam,
// gamma) or map onto them one to one (head_logits'): bit k set where input k needs its gradient.
// A template, so this header needs no autograd header (Ctx: torch::autograd::AutogradContext).
template <typename Ctx>
int64_t needed_grad_mask(Ctx* ctx) {
    int64_t mask = 0;
    for (int64_t k = 0; k < kNumGrads; ++k)
        if (ctx->needs_input_grad(k)) mask |= int64_t(1) << k;
    return mask;
}

struct GradMask {
    bool x, mu, lc, beta;
    explicit GradMask(int64_t m)
        : x(wants_grad(m, kGradX)), mu(wants_grad(m, kGradMu)), lc(wants_grad(m, kGradLc)),
          beta(wants_grad(m, kGradBeta)) {}
    bool xp() const { return x || lc; }  // ∂x' is needed for ∂x or ∂Lc
    bool mup() const { return mu || lc; }
};

using LogitsOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using LogitsGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// randers_logits through the dispatcher (so that modes, tracing and fake tensors see the op), from
// a C++ autograd formula: the logits op's own, and head_logits' in head_metric.cpp.
inline LogitsOutputs call_logits(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc,
                                 const at::Tensor& beta, const at::Tensor& lam, const at::Tensor& gamma, double eps,
                                 double tau) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("faim_kernels::randers_logits", "")
                         .typed<LogitsOutputs(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                              const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                              double)>();
    return op.call(x, mu, lc, beta, lam, gamma, eps, tau);
}

// randers_logits_backward called from a C++ autograd formula (the logits op's own, and head_logits'
// in head_metric.cpp), with the forward's saved tensors s = (logits, x, mu, lc, beta, lam, gamma,
// xp, mup, sx, smu, ...). Without create_graph (grad mode off, the usual backward) the op is called
// below autograd: its autograd kernel (contract.py's refusal of second derivatives, a Python
// function) only matters when a graph is recorded, and entering it cost ~40 µs per call, half of a
// small head's backward. With create_graph it runs, and a second derivative raises.
inline LogitsGrads call_logits_backward(const at::Tensor& grad, const std::vector<at::Tensor>& s, double eps,
                                        double tau, int64_t grad_mask) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("faim_kernels::randers_logits_backward", "")
                         .typed<LogitsGrads(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                            double, double, int64_t)>();
    auto call = [&] {
        return op.call(grad, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], s[10], eps, tau, grad_mask);
    };
    if (at::GradMode::is_enabled()) return call();
    at::AutoDispatchBelowADInplaceOrView guard;
    return call();
}

// ∂λ or ∂γ as the op returns it: the float64 sum the backward computes anyway, in the parameter's
// dtype where its bit is set, else an empty tensor.
inline at::Tensor scalar_grad(const at::Tensor& sum64, const at::Tensor& param, int64_t mask, int64_t bit) {
    return wants_grad(mask, bit) ? sum64.to(param.scalar_type()) : at::empty({0}, param.options());
}

// The common argument checks of the ops (the Python layer validates user input; these guard the
// contract itself: dtypes, shapes, device).
// allow_wide: a full factor may be [D, K] with any K >= 1 (the logits ops: FAIMHead's wide factor
// [tril(L) | sqrt(eps)·I], docs/design.md §2.4); the other ops take a square one.
inline void check_operands(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
                           const at::Tensor& lam, const at::Tensor& gamma, bool allow_wide = false) {
    TORCH_CHECK(x.dim() == 2 && mu.dim() == 2 && x.size(1) == mu.size(1), "x [B, D] and mu [C, D] must share D");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "the CPU kernels compute in float32 or float64, got ", x.scalar_type());
    const int64_t D = x.size(1);
    for (const at::Tensor* t : {&mu, &lc, &beta})
        TORCH_CHECK(t->scalar_type() == x.scalar_type(), "x, mu, lc and beta must share one dtype");
    TORCH_CHECK((lc.dim() == 1 && lc.size(0) == D) ||
                    (lc.dim() == 2 && lc.size(0) == D && (allow_wide ? lc.size(1) >= 1 : lc.size(1) == D)),
                allow_wide ? "lc must be [D] or [D, K]" : "lc must be [D] or [D, D]");
    TORCH_CHECK(beta.dim() == 1 && beta.size(0) == D, "beta must be [D]");
    TORCH_CHECK(lam.numel() == 1 && gamma.numel() == 1, "lam and gamma must be 0-dim tensors");
    for (const at::Tensor* t : {&x, &mu, &lc, &beta, &lam, &gamma})
        TORCH_CHECK(t->device().is_cpu(), "the C++ kernels take CPU tensors");
}

// q = |diff'|² with diff' = (x_b − mu_c)·Lc formed from the raw inputs: x_b − mu_c is nearly
// exact when the pair is close, which is exactly when the GEMM expansion is not (docs/design.md §2.1, near pairs).
// O(D) for a diagonal factor, O(D²) for a full one; run only for the near pairs (and for pairs
// whose expansion overflowed or is NaN). In float64 throughout, so float32 inputs near 1e30 give a
// finite q where the float32 norms overflow. Non-finite differences take their limit: NaN if any
// coordinate of x_b − mu_c is NaN (a NaN input, or Inf − Inf), else +Inf if any is infinite (Sigma
// is positive definite, so q grows without bound; diff' itself would give Inf·0 = NaN).
// diffp (optional) receives diff' (K values); acc is scratch of K doubles.
template <typename T>
double near_pair_q(const Operands<T>& in, int64_t b, int64_t c, double* acc, T* diffp) {
    const int64_t D = in.D;
    const T* xb = in.x + b * D;
    const T* mc = in.mu + c * D;
    bool has_nan = false, has_inf = false;
    for (int64_t k = 0; k < D; ++k) {
        const double dk = double(xb[k]) - double(mc[k]);
        has_nan = has_nan || std::isnan(dk);
        has_inf = has_inf || std::isinf(dk);
    }
    if (has_nan || has_inf) {
        const double q = has_nan ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
        if (diffp)
            for (int64_t k = 0; k < in.K; ++k) diffp[k] = T(q);
        return q;
    }
    double q = 0;
    if (!in.full) {
        for (int64_t k = 0; k < D; ++k) {
            const double v = (double(xb[k]) - double(mc[k])) * double(in.lc[k]);
            if (diffp) diffp[k] = T(v);
            q += v * v;
        }
        return q;
    }
    const int64_t K = in.K;  // Lc is [D, K]
    const bool wide = in.ridge > 0;  // [A | ridge·I]: the right half of diff' is ridge·diff
    for (int64_t j = 0; j < K; ++j) acc[j] = 0;
    for (int64_t k = 0; k < D; ++k) {  // diff'_j = Σ_k diff_k·Lc[k, j], row by row of Lc
        const double dk = double(xb[k]) - double(mc[k]);
        if (wide) acc[D + k] = in.ridge * dk;
        if (dk == 0) continue;
        const T* row = in.lc + k * K;
        // A Cholesky factor's row k ends at column k: half the work of this O(D²) step.
        const int64_t width = in.lower ? k + 1 : (wide ? D : K);
        for (int64_t j = 0; j < width; ++j) acc[j] += dk * double(row[j]);
    }
    for (int64_t j = 0; j < K; ++j) {
        if (diffp) diffp[j] = T(acc[j]);
        q += acc[j] * acc[j];
    }
    return q;
}

// The per-pair quantities of docs/design.md §1 (the function).
template <typename T>
struct Pair {
    T a;       // sqrt(q + eps)
    T r;       // sqrt(s² + eps)
    T s;       // beta·(x_b − mu_c)
    T d;       // a + lam·r
    bool near; // recomputed from the raw difference
};

// Whether a pair is a near pair: its GEMM expansion q = norms − 2·dot cannot be trusted because it
// cancels (q < tau·norms, docs/design.md §2.1 (near pairs)), is NaN (Inf − Inf from an infinite coordinate, or overflow),
// or the norms overflowed (float32 inputs near 1e19 and beyond). The near-pair recompute gives the
// limit (+Inf for an infinite coordinate) or the finite value; a NaN input stays NaN.
template <typename T>
inline bool is_near_pair(T q, T norms, T tau) {
    return !(q >= tau * norms) | (norms > std::numeric_limits<T>::max());
}

// Whether s = sx − smu cancels: |s| far below |sx| + |smu| (a sample near its prototype along beta,
// both far from the origin), where the float64 difference keeps only ~u·(|sx| + |smu|) absolute
// (3.5e-9 relative measured in float64 at |x| = 1e3, |x − mu| = 1e-6 when centring made the pair's
// q safe). Such pairs are near pairs too: the recompute forms s from the difference. 2^-20: rare elsewhere.
template <typename T>
inline bool s_cancels(T s, T sx, T smu) {
    return std::abs(s) < T(9.5367431640625e-07) * (std::abs(sx) + std::abs(smu));
}

// The near-pair recompute of one pair (docs/design.md §2.1, near pairs): q from the raw difference, never the expansion, and
// the square roots in float64 (q may exceed T's range where the distance does not).
// s = beta·(x_b − mu_c) from the difference too; at an exact hit (q = 0: x_b = mu_c in the metric)
// s = 0 exactly: sx − smu, two different float64 dot products, would leave ±1e-16 there, and with eps = 0 the 1-form's gradient
// λ·beta·s/|s| would jump to ±λ·beta instead of the convention 0 (docs/guarantees.md, the convention at an exact hit).
template <typename T>
inline Pair<T> recompute_near_pair(const Operands<T>& in, int64_t b, int64_t c, double* acc, T* diffp) {
    Pair<T> p;
    p.near = true;
    const double q = near_pair_q(in, b, c, acc, diffp);
    double s;
    if (q == 0) {
        s = 0.0;
    } else if (in.beta != nullptr && std::isfinite(q)) {
        // s from the difference, like q: sx − smu loses |x_b|·|beta|·u against a small s when the
        // prototypes lie far from the origin (1e-7 relative in float64 at |mu| = 1e3, |x − mu| = 1e-6).
        const T* xb = in.x + b * in.D;
        const T* mc = in.mu + c * in.D;
        s = 0;
        for (int64_t k = 0; k < in.D; ++k) s += (double(xb[k]) - double(mc[k])) * double(in.beta[k]);
    } else {
        s = in.sx[b] - in.smu[c];  // float64 difference
    }
    const double a = std::sqrt(q + in.eps), r = std::sqrt(s * s + in.eps);
    p.a = T(a);
    p.s = T(s);
    p.r = T(r);
    p.d = T(in.lam == 0 ? a : a + in.lam * r);  // λ = 0 with an infinite s: 0·Inf is not NaN here
    return p;
}

// One pair from its GEMM entry dot = x'_b·mu'_c, through the near-pair recompute when it is a near pair.
template <typename T>
inline Pair<T> pair_from_dot(const Operands<T>& in, int64_t b, int64_t c, T dot, double* acc, T* diffp) {
    const T norms = in.xnorm[b] + in.munorm[c];
    T q = norms - T(2) * dot;
    if (is_near_pair(q, norms, T(in.tau)) || s_cancels(T(in.sx[b] - in.smu[c]), T(in.sx[b]), T(in.smu[c])))
        return recompute_near_pair(in, b, c, acc, diffp);
    Pair<T> p;
    p.near = false;
    if (q < T(0)) q = T(0);
    p.a = std::sqrt(q + T(in.eps));
    p.s = T(in.sx[b] - in.smu[c]);
    p.r = std::sqrt(p.s * p.s + T(in.eps));
    p.d = p.a + T(in.lam) * p.r;
    return p;
}

// The same quantities for one row of a tile (row b, classes c0 .. c0+nc), as plain loops that
// the compiler vectorises (-O3 -fno-math-errno): about 3x faster than pair by pair. Near
// pairs are only flagged in `near`; their a and d here come from the expansion and the caller
// replaces them through recompute_near_pair.
template <typename T>
struct RowTerms {
    std::vector<T> a, r, s, d;
    std::vector<T> near;  // 1 at a near pair, else 0 (T, not bool: one type per loop vectorises)
    T n_near = 0;         // their number in the last row segment (row_terms)
    explicit RowTerms(int64_t n) : a(n), r(n), s(n), d(n), near(n) {}
};

template <typename T>
void row_terms(const Operands<T>& in, int64_t b, int64_t c0, int64_t nc, const T* dots, RowTerms<T>& w) {
    const T xn = in.xnorm[b], eps = T(in.eps), tau = T(in.tau), lam = T(in.lam);
    const T sxh = in.sx_hi[b], sxl = in.sx_lo[b];
    const T* __restrict__ mn = in.munorm.data() + c0;
    const T* __restrict__ smh = in.smu_hi.data() + c0;
    const T* __restrict__ sml = in.smu_lo.data() + c0;
    T* __restrict__ a = w.a.data();
    T* __restrict__ r = w.r.data();
    T* __restrict__ s = w.s.data();
    T* __restrict__ d = w.d.data();
    T* __restrict__ near = w.near.data();
    // One vector loop: the two tests are combined with a bitwise | (a short-circuit || is a branch
    // per pair, which kept GCC from vectorising the loop: every square root ran one lane at a time).
    T n_near = 0;
#pragma omp simd reduction(+ : n_near)
    for (int64_t j = 0; j < nc; ++j) {
        const T norms = xn + mn[j];
        T q = norms - T(2) * dots[j];
        const T sj = (sxh - smh[j]) + (sxl - sml[j]);
        s[j] = sj;
        near[j] = (is_near_pair(q, norms, tau) | s_cancels(sj, sxh, smh[j])) ? T(1) : T(0);
        n_near += near[j];
        q = q < T(0) ? T(0) : q;
        const T aj = std::sqrt(q + eps), rj = std::sqrt(sj * sj + eps);
        a[j] = aj;
        r[j] = rj;
        d[j] = aj + lam * rj;
    }
    w.n_near = n_near;
}

// dots[0:nb, 0:nc] = x'[b0:b0+nb] · mu'[c0:c0+nc]ᵀ through ATen's BLAS, into a caller's buffer.
template <typename T>
void tile_dots(const Operands<T>& in, int64_t b0, int64_t nb, int64_t c0, int64_t nc, T* buffer) {
    at::Tensor out = at::from_blob(buffer, {nb, nc}, in.xp.options());
    at::mm_out(out, in.xp.narrow(0, b0, nb), in.mup.narrow(0, c0, nc).t());
}

}  // namespace faim_kernels
