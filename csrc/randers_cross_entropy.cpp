// Fused Randers cross-entropy on the CPU (docs/design.md §2.2, the fused cross-entropy). The forward returns per-row statistics of
// the logits logit'_bc = −γ·(d_bc + margin·[c ∈ t_b]), with v_c the class weights (1 without) and
// P an optional dense probability target [B, C] (read in place through its strides):
//     lse_b = logsumexp_c logit'_bc,   target_logit_bk = logit'_b,t_bk (k targets per row),
//     sl_b = Σ_c v_c·logit'_bc,        pl_b = Σ_c v_c·P_bc·logit'_bc
// from an online logsumexp over class tiles, and the backward takes per-row upstream weights
// (∂loss/∂lse, ∂loss/∂target_logit (the schema's w_target_logit), ∂loss/∂sl, ∂loss/∂pl) and recomputes each
// tile. No [B, C] array exists at any point. The loss itself (reduction, ignore_index, class
// weights, label smoothing, probability targets, z-loss) is O(B·k) work done in Python
// (faim_kernels/ops/row_stats.py); the schemas and the autograd formula are in
// faim_kernels/ops/contract.py.
//
// The op takes the raw inputs (x, mu, Lc, beta) and forms the centre m itself: the rows of
// mu' = (mu − m)·Lc are formed one class tile at a time and ∂mu is written directly, so nothing of
// size [C, D] exists besides ∂mu itself (the shared transform's mu' and ∂mu' would each be as big
// as mu, more than the [B, C] logits at D = 128, B = 256).
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "randers_common.h"

namespace faim_kernels {
namespace {

// Rows per GEMM: each worker holds one [kRowBlock, kTileC] tile of dots (1 MiB in float32).
constexpr int64_t kRowBlock = 1024;
// Class chunks (runs of class tiles) are the unit of parallel work; their number depends on the
// shapes only, never on the thread count, so results are bitwise the same on any machine. The
// backward keeps one ∂x' partial [B, D] per chunk, reduced in chunk order: capped in bytes.
constexpr int64_t kMaxChunks = 32;
constexpr int64_t kPartialBytes = int64_t(64) << 20;

int64_t num_chunks(int64_t B, int64_t C, int64_t D, int64_t elem_size) {
    const int64_t by_memory = std::max<int64_t>(1, kPartialBytes / std::max<int64_t>(1, B * D * elem_size));
    return std::max<int64_t>(1, std::min({ceil_div(C, kTileC), kMaxChunks, by_memory}));
}

// Class tiles [first, last) of chunk cc.
std::pair<int64_t, int64_t> chunk_tiles(int64_t cc, int64_t n_cc, int64_t n_ct) {
    return {cc * n_ct / n_cc, (cc + 1) * n_ct / n_cc};
}

template <typename T>
struct CEProblem {
    // raw x, mu, lc; x' = (x − m)·Lc, |x'|², sx. mu' is formed per tile (in.mup stays empty); the
    // tile that forms a class also fills its |mu'_c|² (in.munorm) and smu_c (in.smu), O(C) in all.
    Operands<T> in;
    at::Tensor lc;        // [D] or [D, D], detached
    at::Tensor xc;        // [B, D] x − m
    at::Tensor m;         // [D] the centre of the prototypes (accuracy only: q is shift-invariant)
    at::Tensor sx, smu;   // [B], [C] float64 x·beta, mu·beta (own in.sx, in.smu)
    const T* center;      // m's data
    const T* beta;        // [D]
    std::vector<double> beta64;  // beta in float64, for the tiles' smu (dot64)
    const int64_t* target;  // [B, K] class indices in [0, C); anything else: no target class in this op's classes
    int64_t K = 1;          // targets per row (1: class labels; k: the compact probability target)
    const T* cw = nullptr;  // [C] class weights v_c, or null (v = 1)
    const T* soft = nullptr;  // dense probability target P [B, C], or null
    int64_t soft_sb = 0, soft_sc = 0;  // its strides
    double gamma, margin;
    std::vector<at::Tensor> owned;  // keeps the (contiguous) tensors behind the raw pointers alive
};

template <typename T>
CEProblem<T> setup(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
                   const at::Tensor& lam, const at::Tensor& gamma, const at::Tensor& target, double eps, double tau,
                   double margin, const std::optional<at::Tensor>& class_weight,
                   const std::optional<at::Tensor>& dense_soft_target) {
    CEProblem<T> pb;
    Operands<T>& in = pb.in;
    in.B = x.size(0);
    in.C = mu.size(0);
    in.D = x.size(1);
    in.K = in.D;  // a square factor (check_operands)
    in.full = lc.dim() == 2;
    // Detached: GEMMs into caller buffers (mm_out) run in worker threads, where the no-grad guard
    // of the entry point does not reach.
    pb.lc = lc.detach();
    pb.m = center_of<T>(mu.detach());
    pb.xc = x.detach() - pb.m;
    in.xp = (in.full ? at::mm(pb.xc, lc) : pb.xc * lc).contiguous();
    in.xnorm = row_sq_norms<T>(in.xp);
    pb.sx = at::empty({in.B}, x.options().dtype(at::kDouble));
    row_dots64<T>(x, beta.template data_ptr<T>(), pb.sx.template data_ptr<double>());
    in.sx = pb.sx.template data_ptr<double>();
    split_all(in.sx, in.B, in.sx_hi, in.sx_lo);
    in.smu_hi.assign(in.C, T(0));
    in.smu_lo.assign(in.C, T(0));
    in.munorm.assign(in.C, T(0));
    pb.smu = at::zeros({in.C}, x.options().dtype(at::kDouble));
    in.smu = pb.smu.template data_ptr<double>();
    in.x = x.data_ptr<T>();
    in.mu = mu.data_ptr<T>();
    in.lc = lc.data_ptr<T>();
    in.lower = in.full && is_lower_triangular(in.lc, in.D);
    in.beta = beta.data_ptr<T>();
    in.lam = lam.item<double>();
    in.eps = eps;
    in.tau = tau;
    pb.center = pb.m.template data_ptr<T>();
    pb.beta = beta.data_ptr<T>();
    pb.beta64.assign(pb.beta, pb.beta + beta.numel());
    pb.target = target.data_ptr<int64_t>();
    pb.K = target.dim() == 2 ? target.size(1) : 1;
    pb.gamma = gamma.item<double>();
    pb.margin = margin;
    pb.owned = {x, mu, beta, target};
    if (class_weight.has_value()) {
        pb.owned.push_back(class_weight->contiguous());
        pb.cw = pb.owned.back().template data_ptr<T>();
    }
    if (dense_soft_target.has_value()) {  // read in place: no copy of the [B, C] target
        pb.owned.push_back(*dense_soft_target);
        pb.soft = dense_soft_target->template data_ptr<T>();
        pb.soft_sb = dense_soft_target->stride(0);
        pb.soft_sc = dense_soft_target->stride(1);
    }
    return pb;
}

// One class tile of mu' = (mu − m)·Lc, formed on the fly, with its norms |mu'_c|² and the
// projections smu_c = mu_c·beta (float64, as in the transform) written to the problem's [C]
// arrays (each class belongs to one tile, so workers never write the same entry).
// cent = mu − m is kept for the chain rule to Lc.
template <typename T>
struct ClassTile {
    int64_t c0 = 0, nc = 0, D;
    std::vector<T> cent, mup;

    explicit ClassTile(int64_t D_) : D(D_), cent(kTileC * D_), mup(kTileC * D_) {}

    void build(const CEProblem<T>& pb, int64_t first, int64_t count) {
        c0 = first;
        nc = count;
        const Operands<T>& in = pb.in;
        T* norm = const_cast<T*>(in.munorm.data()) + c0;
        double* smu = const_cast<double*>(in.smu) + c0;
        T* smu_hi = const_cast<T*>(in.smu_hi.data()) + c0;
        T* smu_lo = const_cast<T*>(in.smu_lo.data()) + c0;
        const T* __restrict__ center = pb.center;
        for (int64_t j = 0; j < nc; ++j) {
            const T* __restrict__ row = in.mu + (c0 + j) * D;
            T* __restrict__ out = cent.data() + j * D;
            for (int64_t k = 0; k < D; ++k) out[k] = row[k] - center[k];
            smu[j] = dot64(row, pb.beta64.data(), D);  // as the logits op's row_dots64
            split_hi_lo(smu[j], smu_hi[j], smu_lo[j]);
        }
        if (in.full) {
            at::Tensor out = at::from_blob(mup.data(), {nc, D}, pb.lc.options());
            at::mm_out(out, at::from_blob(cent.data(), {nc, D}, pb.lc.options()), pb.lc);
        } else {
            for (int64_t j = 0; j < nc; ++j)
                for (int64_t k = 0; k < D; ++k) mup[j * D + k] = cent[j * D + k] * in.lc[k];
        }
        for (int64_t j = 0; j < nc; ++j) norm[j] = row_sq_norm(mup.data() + j * D, D);  // as the logits op's
    }

    at::Tensor mup_tensor(const at::TensorOptions& opts) { return at::from_blob(mup.data(), {nc, D}, opts); }
};

// dots[0:nr, 0:nc] = x'[r0:r0+nr] · mu'_tileᵀ (BLAS).
template <typename T>
void row_dots(const CEProblem<T>& pb, ClassTile<T>& tile, int64_t r0, int64_t nr, T* dots) {
    const auto opts = pb.in.xp.options();
    at::Tensor out = at::from_blob(dots, {nr, tile.nc}, opts);
    at::mm_out(out, pb.in.xp.narrow(0, r0, nr), tile.mup_tensor(opts).t());
}

// exp(v) for v <= 0 (every exponent here is a logit minus a running max or minus lse) as
// plain arithmetic the compiler vectorises, unlike std::exp: 2^n·e^r with r = v − n·ln2,
// |r| <= ln2/2, and e^r from its Taylor series to r^7 (truncation below 1e-8 relative, under
// float's half-ulp). v < −80 gives 0; NaN stays NaN. The two limits are bit masks, not selects:
// GCC 12 left a select on NaN as a branch, and the whole loop then ran one lane at a time.
// float64 uses std::exp.
inline float exp_nonpositive(float v) {
    const float t = v < -80.0f ? -80.0f : v;
    const int32_t n = int32_t(t * 1.44269504f - 0.5f);  // round(t/ln2) for t <= 0, in [−116, 0]
    const float nf = float(n);
    const float r = (t - nf * 0.693359375f) + nf * 2.12194440e-4f;  // ln2 = 0.693359375 − 2.1219444e-4
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits, v_bits;
    std::memcpy(&bits, &p, 4);
    std::memcpy(&v_bits, &v, 4);
    const int32_t in_range = -int32_t(v >= -80.0f);  // all ones, else 0 (NaN too)
    const int32_t is_nan = -int32_t(v != v);
    // p·2^n (a normal number for n >= −116); e^−80 = 2e-35: nothing next to the row's total of at least 1
    bits = ((bits + (n << 23)) & in_range) | (v_bits & is_nan);
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}
inline double exp_nonpositive(double v) { return std::exp(v); }

// Σ v[j] and max v[j] with four independent accumulators (a fixed order: deterministic), which
// breaks the dependency chain of one running sum; the sum accumulates in float64.
template <typename T>
double sum_to_double(const T* v, int64_t n) {
    double s[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; ++k) s[k] += double(v[j + k]);
    for (; j < n; ++j) s[0] += double(v[j]);
    return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename T>
double dot_to_double(const T* a, const T* b, int64_t n) {
    double s[4] = {0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; ++k) s[k] += double(a[j + k]) * double(b[j + k]);
    for (; j < n; ++j) s[0] += double(a[j]) * double(b[j]);
    return (s[0] + s[1]) + (s[2] + s[3]);
}

template <typename T>
T max_ignoring_nan(const T* v, int64_t n) {  // NaN never wins: it reaches lse through Σ logits
    T m[4] = {-std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
              -std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity()};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
        for (int k = 0; k < 4; ++k) m[k] = v[j + k] > m[k] ? v[j + k] : m[k];
    for (; j < n; ++j) m[0] = v[j] > m[0] ? v[j] : m[0];
    return std::max(std::max(m[0], m[1]), std::max(m[2], m[3]));
}

// Per-row scratch of one worker: the shared epilogue terms (a, r, s, d, near-pair flags) and the
// backward's G, H, R.
template <typename T>
struct RowWork : RowTerms<T> {
    std::vector<T> logit, e, G, H, R;
    explicit RowWork(int64_t n) : RowTerms<T>(n), logit(n), e(n), G(n), H(n), R(n) {}
};

// The backward's per-pair terms of one row (docs/design.md §2, the algorithm): G = w_lse·softmax + lin (lin_j = w_sl·v_j +
// w_pl·v_j·P_bj, or the constant w_sl where lin is null; the targets' w_target_logit are added by the caller),
// H = −γ·G, P = H/a, R = H·λ·s/r. a = 0 only at an exact hit with eps = 0: subgradient 0 there (NaN
// stays NaN). Divide first, select after: the loop vectorises.
template <typename T>
void backward_terms(int64_t n, T wl, T ws, const T* __restrict__ lin, T g, T lam, const T* __restrict__ softmax,
                    const T* __restrict__ a, const T* __restrict__ r, const T* __restrict__ s, T* __restrict__ G,
                    T* __restrict__ H, T* __restrict__ P, T* __restrict__ R) {
    if (lin)
        for (int64_t j = 0; j < n; ++j) G[j] = wl * softmax[j] + lin[j];
    else
        for (int64_t j = 0; j < n; ++j) G[j] = wl * softmax[j] + ws;
    for (int64_t j = 0; j < n; ++j) {
        H[j] = -g * G[j];
        const T p = H[j] / a[j], rr = H[j] * lam * s[j] / r[j];
        P[j] = a[j] == T(0) ? T(0) : p;
        R[j] = r[j] == T(0) ? T(0) : rr;
    }
}

// The column of row b's k-th target in the tile [c0, c0 + nc), or −1.
inline int64_t target_column(const int64_t* target, int64_t K, int64_t b, int64_t k, int64_t c0, int64_t nc) {
    const int64_t j = target[b * K + k] - c0;
    return (j >= 0 && j < nc) ? j : -1;
}

// Row b's targets in the tile: is_t[j] = 1 on every target column (they carry the margin and take
// the near-pair recompute), cols[k] = the k-th target's column or −1. is_t is all zero on return elsewhere.
template <typename T>
bool mark_targets(const CEProblem<T>& pb, int64_t b, int64_t c0, int64_t nc, std::vector<int64_t>& cols,
                  std::vector<char>& is_t) {
    bool any = false;
    for (int64_t k = 0; k < pb.K; ++k) {
        cols[k] = target_column(pb.target, pb.K, b, k, c0, nc);
        if (cols[k] >= 0) {
            is_t[cols[k]] = 1;
            any = true;
        }
    }
    return any;
}

template <typename T>
void clear_targets(const std::vector<int64_t>& cols, std::vector<char>& is_t) {
    for (int64_t j : cols)
        if (j >= 0) is_t[j] = 0;
}

// The forward's per-chunk row statistics [n_cc, B]: each chunk keeps, per row, an online
// logsumexp (running max and Σ exp(l − max), as in flash attention), Σ v·logits and (with a dense
// soft target) Σ v·P·logits over its classes; ce_merge_chunks merges them in chunk order.
struct CEForwardPartials {
    std::vector<double> run_max, run_sum, run_sl, run_pl;
    CEForwardPartials(int64_t n_cc, int64_t B, bool soft)
        : run_max(n_cc * B, -std::numeric_limits<double>::infinity()), run_sum(n_cc * B, 0.0),
          run_sl(n_cc * B, 0.0), run_pl(soft ? n_cc * B : 0, 0.0) {}
};

// One worker's scratch for the forward: the class tile, the row terms, the [rows, tile] dots,
// v·P of one row, the near-pair recompute's accumulator, and the row's target columns.
template <typename T>
struct CEForwardScratch {
    ClassTile<T> tile;
    RowWork<T> w;
    std::vector<T> dots, vp;
    std::vector<double> acc;
    std::vector<int64_t> cols;
    std::vector<char> is_t;

    explicit CEForwardScratch(const CEProblem<T>& pb)
        : tile(pb.in.D), w(kTileC), dots(std::min(pb.in.B, kRowBlock) * kTileC), vp(pb.soft ? kTileC : 0),
          acc(pb.in.D), cols(pb.K), is_t(kTileC, 0) {}
};

// The epilogue of row b over the tile in sc.tile (its dots in `dots`): the logits (Eq. 3), the
// near pairs and the target pairs recomputed, the target logits written, and the row's
// statistics added to chunk cc's partials.
template <typename T>
void ce_forward_row(const CEProblem<T>& pb, int64_t cc, int64_t b, const T* dots, CEForwardScratch<T>& sc,
                    CEForwardPartials& parts, double* target_logit) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, K = pb.K, c0 = sc.tile.c0, nc = sc.tile.nc;
    const T g = T(pb.gamma), margin = T(pb.margin);
    RowWork<T>& w = sc.w;
    row_terms(in, b, c0, nc, dots, w);
    T* __restrict__ l = w.logit.data();
    const T* __restrict__ dist = w.d.data();
    for (int64_t j = 0; j < nc; ++j) l[j] = -g * dist[j];  // Eq. 3
    // Near pairs, and the target pairs always, from the raw difference (docs/design.md §2.1, near pairs): the target
    // logits and the margin, which dominate the loss, are exact. The scalar scan runs only in a row
    // segment that has one (most segments have neither).
    const bool any_target = mark_targets(pb, b, c0, nc, sc.cols, sc.is_t);
    if (any_target || w.n_near != T(0))
        for (int64_t j = 0; j < nc; ++j)
            if (w.near[j] != T(0) || sc.is_t[j])
                l[j] = -g * (recompute_near_pair(in, b, c0 + j, sc.acc.data(), (T*)nullptr).d +
                             (sc.is_t[j] ? margin : T(0)));
    for (int64_t k = 0; k < K; ++k)
        if (sc.cols[k] >= 0) target_logit[b * K + k] = double(l[sc.cols[k]]);
    clear_targets<T>(sc.cols, sc.is_t);
    const T mx = max_ignoring_nan(l, nc);
    parts.run_sl[cc * B + b] += pb.cw ? dot_to_double(l, pb.cw + c0, nc) : sum_to_double(l, nc);
    if (pb.soft) {  // Σ_c v_c·P_bc·logit'_bc over the tile
        const T* prow = pb.soft + b * pb.soft_sb + c0 * pb.soft_sc;
        for (int64_t j = 0; j < nc; ++j) sc.vp[j] = (pb.cw ? pb.cw[c0 + j] : T(1)) * prow[j * pb.soft_sc];
        parts.run_pl[cc * B + b] += dot_to_double(l, sc.vp.data(), nc);
    }
    if (mx == -std::numeric_limits<T>::infinity()) return;  // nothing to add
    double& m = parts.run_max[cc * B + b];
    double& sum = parts.run_sum[cc * B + b];
    if (double(mx) > m) {
        sum *= std::exp(m - double(mx));
        m = double(mx);
    }
    const T mt = T(m);  // m is a logit: exact in T
    T* __restrict__ e = w.e.data();
    for (int64_t j = 0; j < nc; ++j) e[j] = exp_nonpositive(T(l[j] - mt));
    sum += sum_to_double(e, nc);
}

// The chunks' partials merged row by row in chunk order: lse, Σ v·logits, Σ v·P·logits.
template <typename T>
void ce_merge_chunks(const CEProblem<T>& pb, int64_t n_cc, const CEForwardPartials& parts, double* lse, double* sl,
                     double* pl) {
    const int64_t B = pb.in.B;
    const double inf = std::numeric_limits<double>::infinity();
    for (int64_t b = 0; b < B; ++b) {
        double M = -inf, total = 0, lsum = 0, psum = 0;
        for (int64_t cc = 0; cc < n_cc; ++cc) {
            M = std::max(M, parts.run_max[cc * B + b]);
            lsum += parts.run_sl[cc * B + b];
            if (pb.soft) psum += parts.run_pl[cc * B + b];
        }
        pl[b] = psum;
        for (int64_t cc = 0; cc < n_cc; ++cc)
            if (parts.run_max[cc * B + b] > -inf)
                total += parts.run_sum[cc * B + b] * std::exp(parts.run_max[cc * B + b] - M);
        sl[b] = lsum;
        // M = ±inf: an infinite logit (γ < 0 with a class at distance +inf) or none: lse is M itself.
        lse[b] = std::isnan(lsum) ? lsum : (std::isinf(M) ? M : M + std::log(total));
    }
}

// Forward: the tile loop over class chunks (each tile's mu' formed on the fly, then one GEMM per
// row block and each row's epilogue, ce_forward_row), then the chunks merged (ce_merge_chunks).
template <typename T>
void ce_forward(const CEProblem<T>& pb, double* lse, double* target_logit, double* sl, double* pl) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, C = in.C, D = in.D, K = pb.K;
    std::fill(target_logit, target_logit + B * K, 0.0);
    if (C == 0) {
        std::fill(lse, lse + B, -std::numeric_limits<double>::infinity());
        std::fill(sl, sl + B, 0.0);
        std::fill(pl, pl + B, 0.0);
        return;
    }
    const int64_t n_ct = ceil_div(C, kTileC), n_cc = num_chunks(B, C, D, sizeof(T));
    CEForwardPartials parts(n_cc, B, pb.soft != nullptr);
    at::parallel_for(0, n_cc, 1, [&](int64_t begin, int64_t end) {
        CEForwardScratch<T> sc(pb);
        for (int64_t cc = begin; cc < end; ++cc) {
            const auto [t0, t1] = chunk_tiles(cc, n_cc, n_ct);
            for (int64_t ct = t0; ct < t1; ++ct) {
                sc.tile.build(pb, ct * kTileC, std::min(kTileC, C - ct * kTileC));
                for (int64_t r0 = 0; r0 < B; r0 += kRowBlock) {
                    const int64_t nr = std::min(kRowBlock, B - r0);
                    row_dots(pb, sc.tile, r0, nr, sc.dots.data());
                    for (int64_t i = 0; i < nr; ++i)
                        ce_forward_row(pb, cc, r0 + i, sc.dots.data() + i * sc.tile.nc, sc, parts, target_logit);
                }
            }
        }
    });
    ce_merge_chunks(pb, n_cc, parts, lse, sl, pl);
}

// The upstream weights of the backward, per row (float64): ∂loss/∂lse, ∂loss/∂target_logit [B, K],
// ∂loss/∂sl, ∂loss/∂pl (or null), and the forward's lse.
struct RowWeights {
    const double *w_lse, *w_target_logit, *w_sl, *w_pl, *lse;

    // A row whose every weight is 0 (e.g. an ignored target) adds nothing to any gradient.
    bool zero(int64_t b, int64_t K) const {
        bool z = w_lse[b] == 0 && w_sl[b] == 0 && (!w_pl || w_pl[b] == 0);
        for (int64_t k = 0; k < K; ++k) z = z && w_target_logit[b * K + k] == 0;
        return z;
    }
};

// What the class chunks leave behind: ∂mu (each chunk writes its own classes' rows) and, per
// chunk, a ∂x' partial, a ∂Lc partial and the row and scalar sums, added in chunk order at the end
// (ce_chain_rows) so that the result does not depend on thread timing.
template <typename T>
struct CEPartials {
    int64_t n_cc;
    at::Tensor dmu;                                   // [C, D]
    at::Tensor dxp_part;                              // [n_cc, B, D]
    at::Tensor dlc_part;                              // [n_cc, D] or [n_cc, D, D]
    std::vector<double> rowsum_part, dsx_part;        // [n_cc, B] rowsum(P), rowsum(R)
    std::vector<double> dbeta_part;                   // [n_cc, D] Σ_c ∂smu_c·(mu_c − m)
    std::vector<double> dlam_part, dgam_part;         // [n_cc]

    CEPartials(const CEProblem<T>& pb, int64_t n_cc_, const at::TensorOptions& opts)
        : n_cc(n_cc_), dmu(at::empty({pb.in.C, pb.in.D}, opts)), dxp_part(at::zeros({n_cc_, pb.in.B, pb.in.D}, opts)),
          rowsum_part(n_cc_ * pb.in.B, 0.0), dsx_part(n_cc_ * pb.in.B, 0.0), dbeta_part(n_cc_ * pb.in.D, 0.0),
          dlam_part(n_cc_, 0.0), dgam_part(n_cc_, 0.0) {
        std::vector<int64_t> lc_shape{n_cc_};
        for (int64_t s : pb.lc.sizes()) lc_shape.push_back(s);
        dlc_part = at::zeros(lc_shape, opts);
    }
};

// One worker's scratch: the class tile, the row terms, the [rows, tile] dots that P overwrites,
// the tile's ∂mu' and its column sums, the near-pair recompute's diff' and accumulator, and the
// row's target columns.
template <typename T>
struct CEBackwardScratch {
    ClassTile<T> tile;
    RowWork<T> w;
    std::vector<T> P, diffp, dmup;
    std::vector<T> lin;  // v_c·(w_sl + w_pl·P_bc) of one row (only with class weights or a dense soft target)
    std::vector<double> acc, colsum, dsmu;
    std::vector<int64_t> cols;
    std::vector<char> is_t;

    CEBackwardScratch(const CEProblem<T>& pb)
        : tile(pb.in.D), w(kTileC), P(std::min(pb.in.B, kRowBlock) * kTileC), diffp(pb.in.D),
          dmup(kTileC * pb.in.D), lin(pb.cw || pb.soft ? kTileC : 0), acc(pb.in.D), colsum(kTileC), dsmu(kTileC),
          cols(pb.K), is_t(kTileC, 0) {}
};

// The scalar sums of one chunk.
struct ChunkSums {
    double dlam = 0, dgam = 0;
};

// Row b's linear weights lin_j = v_j·(w_sl + w_pl·P_bj) over the tile, or null where they are the
// constant w_sl (no class weights, no dense soft target).
template <typename T>
T* row_linear_weights(const CEProblem<T>& pb, int64_t b, int64_t c0, int64_t nc, T ws, T wp, std::vector<T>& lin) {
    if (lin.empty()) return nullptr;
    T* linp = lin.data();
    const T* prow = pb.soft ? pb.soft + b * pb.soft_sb + c0 * pb.soft_sc : nullptr;
    for (int64_t j = 0; j < nc; ++j)
        linp[j] = (pb.cw ? pb.cw[c0 + j] : T(1)) * (ws + (prow ? wp * prow[j * pb.soft_sc] : T(0)));
    return linp;
}

// The near pairs and the target pairs of row b (docs/design.md §2.1, near pairs): exact terms from diff' added to the
// row's ∂x' (dxrow) and the tile's ∂mu', and P = 0 there so the GEMMs leave them out. G, H, R and
// d (then d + margin at a target) are replaced in the row's scratch.
template <typename T>
void ce_near_pairs(const CEProblem<T>& pb, const RowWeights& rw, int64_t b, int64_t c0, int64_t nc, T wl, T ws,
                   const T* linp, T* Prow, T* dxrow, CEBackwardScratch<T>& sc) {
    const Operands<T>& in = pb.in;
    const int64_t D = in.D, K = pb.K;
    const T g = T(pb.gamma), lam = T(in.lam), margin = T(pb.margin);
    const double lse_b = rw.lse[b];
    RowWork<T>& w = sc.w;
    T *G = w.G.data(), *H = w.H.data(), *R = w.R.data(), *d = w.d.data();
    const bool any_target = mark_targets(pb, b, c0, nc, sc.cols, sc.is_t);
    if (!any_target && w.n_near == T(0)) return;  // is_t is all zero
    for (int64_t j = 0; j < nc; ++j) {
        if (w.near[j] == T(0) && !sc.is_t[j]) continue;
        const Pair<T> pr = recompute_near_pair(in, b, c0 + j, sc.acc.data(), sc.diffp.data());
        const T dist = pr.d + (sc.is_t[j] ? margin : T(0));
        d[j] = dist;
        T wt = T(0);  // Σ_k w_target_logit,bk over the targets in this column (repeats add up)
        for (int64_t k = 0; k < K; ++k)
            if (sc.cols[k] == j) wt += T(rw.w_target_logit[b * K + k]);
        G[j] = wl * exp_nonpositive(T(double(-g * dist) - lse_b)) + (linp ? linp[j] : ws) + wt;
        H[j] = -g * G[j];
        R[j] = pr.r == T(0) ? T(0) : H[j] * lam * pr.s / pr.r;
        const T Pj = pr.a == T(0) ? T(0) : H[j] / pr.a;
        T* dmrow = sc.dmup.data() + j * D;
        for (int64_t k = 0; k < D && Pj != T(0); ++k) {  // diff' may be Inf where Pj = 0
            dxrow[k] += Pj * sc.diffp[k];
            dmrow[k] -= Pj * sc.diffp[k];
        }
        Prow[j] = T(0);
    }
    clear_targets<T>(sc.cols, sc.is_t);
}

// The epilogue of row b over the tile: Prow holds the dots on entry and P (far pairs; 0 at near
// and target pairs) on return; the row's column sums go to the tile's colsum and ∂smu, its row
// sums to the chunk's partials. Returns whether P has a nonzero (NaN counts) entry.
template <typename T>
bool ce_backward_row(const CEProblem<T>& pb, const RowWeights& rw, int64_t cc, int64_t b, int64_t c0, int64_t nc,
                     T* Prow, T* dxrow, CEBackwardScratch<T>& sc, CEPartials<T>& parts, ChunkSums& sums) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B;
    if (rw.zero(b, pb.K)) {
        std::fill(Prow, Prow + nc, T(0));
        return false;
    }
    const T g = T(pb.gamma), lam = T(in.lam);
    const T wl = T(rw.w_lse[b]), ws = T(rw.w_sl[b]), wp = T(rw.w_pl ? rw.w_pl[b] : 0.0);
    const T* linp = row_linear_weights(pb, b, c0, nc, ws, wp, sc.lin);
    const double lse_b = rw.lse[b];
    RowWork<T>& w = sc.w;
    row_terms(in, b, c0, nc, Prow, w);  // Prow holds the dots until P overwrites it
    T *l = w.logit.data(), *e = w.e.data(), *G = w.G.data(), *H = w.H.data(), *R = w.R.data();
    T* d = w.d.data();  // becomes d + margin·[target] in ce_near_pairs
    const T *a = w.a.data(), *r = w.r.data(), *sv = w.s.data();
    for (int64_t j = 0; j < nc; ++j) l[j] = T(double(-g * d[j]) - lse_b);
    for (int64_t j = 0; j < nc; ++j) e[j] = exp_nonpositive(l[j]);  // softmax_bc
    backward_terms(nc, wl, ws, linp, g, lam, e, a, r, sv, G, H, Prow, R);
    ce_near_pairs(pb, rw, b, c0, nc, wl, ws, linp, Prow, dxrow, sc);
    for (int64_t j = 0; j < nc; ++j) {
        sc.dsmu[j] -= double(R[j]);
        sc.colsum[j] += double(Prow[j]);
    }
    sums.dlam += dot_to_double(H, r, nc);
    sums.dgam -= dot_to_double(G, d, nc);
    parts.rowsum_part[cc * B + b] += sum_to_double(Prow, nc);
    parts.dsx_part[cc * B + b] += sum_to_double(R, nc);
    for (int64_t j = 0; j < nc; ++j)
        if (Prow[j] != T(0)) return true;
    return false;
}

// The end of a class tile: ∂mu' += colsum(P)·mu', then the chain rule for its classes:
// ∂mu = ∂mu'·Lcᵀ + ∂smu·betaᵀ, ∂Lc += (mu − m)ᵀ·∂mu', ∂beta += Σ_c ∂smu_c·(mu_c − m) (centred, as
// the x half in ce_chain_rows).
template <typename T>
void ce_chain_tile(const CEProblem<T>& pb, const GradMask& want, int64_t cc, CEBackwardScratch<T>& sc,
                   CEPartials<T>& parts) {
    const Operands<T>& in = pb.in;
    const int64_t D = in.D;
    const ClassTile<T>& tile = sc.tile;
    const int64_t c0 = tile.c0, nc = tile.nc;
    const auto opts = in.xp.options();
    T* dmup = sc.dmup.data();
    for (int64_t j = 0; j < nc; ++j)
        for (int64_t k = 0; k < D; ++k) dmup[j * D + k] += T(sc.colsum[j]) * tile.mup[j * D + k];
    at::Tensor dmup_t = at::from_blob(dmup, {nc, D}, opts);
    at::Tensor dmu_rows = parts.dmu.narrow(0, c0, nc);
    at::Tensor lcp = parts.dlc_part.select(0, cc);
    if (!want.mup()) {
        dmu_rows.zero_();  // not returned; the ∂beta terms below still read the row
    } else if (in.full) {
        if (want.mu) at::mm_out(dmu_rows, dmup_t, pb.lc.t());
        else dmu_rows.zero_();
        if (want.lc) lcp.addmm_(at::from_blob(const_cast<T*>(tile.cent.data()), {nc, D}, opts).t(), dmup_t);
    } else {
        T* lcpp = lcp.data_ptr<T>();
        T* out = dmu_rows.data_ptr<T>();
        for (int64_t j = 0; j < nc; ++j)
            for (int64_t k = 0; k < D; ++k) {
                out[j * D + k] = dmup[j * D + k] * in.lc[k];
                lcpp[k] += tile.cent[j * D + k] * dmup[j * D + k];
            }
    }
    T* out = dmu_rows.data_ptr<T>();
    for (int64_t j = 0; j < nc; ++j) {
        const T* murow = in.mu + (c0 + j) * D;
        for (int64_t k = 0; k < D; ++k) {
            out[j * D + k] += T(sc.dsmu[j]) * pb.beta[k];
            parts.dbeta_part[cc * D + k] += sc.dsmu[j] * (double(murow[k]) - double(pb.center[k]));
        }
    }
}

// One class tile of chunk cc: the tile loop over row blocks, each a GEMM of dots, the rows'
// epilogue, and the two gradient GEMMs (skipped where P is exactly zero: every exp underflowed),
// then ce_chain_tile.
template <typename T>
void ce_backward_tile(const CEProblem<T>& pb, const RowWeights& rw, const GradMask& want, int64_t cc, int64_t ct,
                      CEBackwardScratch<T>& sc, CEPartials<T>& parts, ChunkSums& sums) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, C = in.C, D = in.D;
    const auto opts = in.xp.options();
    at::Tensor part = parts.dxp_part.select(0, cc);
    T* partp = part.data_ptr<T>();
    sc.tile.build(pb, ct * kTileC, std::min(kTileC, C - ct * kTileC));
    const int64_t c0 = sc.tile.c0, nc = sc.tile.nc;
    std::fill(sc.dmup.begin(), sc.dmup.end(), T(0));
    std::fill(sc.colsum.begin(), sc.colsum.end(), 0.0);
    std::fill(sc.dsmu.begin(), sc.dsmu.end(), 0.0);
    at::Tensor mup_t = sc.tile.mup_tensor(opts);
    at::Tensor dmup_t = at::from_blob(sc.dmup.data(), {nc, D}, opts);
    for (int64_t r0 = 0; r0 < B; r0 += kRowBlock) {
        const int64_t nr = std::min(kRowBlock, B - r0);
        row_dots(pb, sc.tile, r0, nr, sc.P.data());  // dots, overwritten by P in place
        bool any = false;
        for (int64_t i = 0; i < nr; ++i) {
            const int64_t b = r0 + i;
            any = ce_backward_row(pb, rw, cc, b, c0, nc, sc.P.data() + i * nc, partp + b * D, sc, parts, sums) || any;
        }
        if (any) {
            at::Tensor Pt = at::from_blob(sc.P.data(), {nr, nc}, opts);
            if (want.xp()) part.narrow(0, r0, nr).addmm_(Pt, mup_t, 1, -1);
            if (want.mup()) dmup_t.addmm_(Pt.t(), in.xp.narrow(0, r0, nr), 1, -1);
        }
    }
    ce_chain_tile(pb, want, cc, sc, parts);
}

// The chunks' partials summed in chunk order, then the chain rule for the rows:
// ∂x' += rowsum(P)·x', ∂x = ∂x'·Lcᵀ + ∂sx·betaᵀ, ∂Lc += (x − m)ᵀ·∂x', ∂beta += Σ_b ∂sx_b·(x_b − m).
template <typename T>
std::vector<at::Tensor> ce_chain_rows(const CEProblem<T>& pb, const GradMask& want, CEPartials<T>& parts) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, D = in.D, n_cc = parts.n_cc;
    const auto opts = in.xp.options();
    at::Tensor dxp = parts.dxp_part.select(0, 0).clone();
    at::Tensor dlc = parts.dlc_part.select(0, 0).clone();
    for (int64_t cc = 1; cc < n_cc; ++cc) {
        dxp.add_(parts.dxp_part.select(0, cc));
        dlc.add_(parts.dlc_part.select(0, cc));
    }
    at::Tensor rowsum = at::empty({B}, opts), dsx = at::empty({B}, opts.dtype(at::kDouble));
    T* rs = rowsum.data_ptr<T>();
    double* dsxp = dsx.data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) {
        double r = 0, s = 0;
        for (int64_t cc = 0; cc < n_cc; ++cc) {
            r += parts.rowsum_part[cc * B + b];
            s += parts.dsx_part[cc * B + b];
        }
        rs[b] = T(r);
        dsxp[b] = s;
    }
    dxp.addcmul_(rowsum.unsqueeze(1), in.xp);
    at::Tensor beta_t = at::from_blob(const_cast<T*>(pb.beta), {D}, opts);
    at::Tensor dx = at::empty({0}, opts);
    if (want.x) {
        dx = in.full ? at::mm(dxp, pb.lc.t()) : dxp * pb.lc;
        dx.addcmul_(dsx.to(opts.dtype()).unsqueeze(1), beta_t.unsqueeze(0));
    }
    if (!want.lc)
        dlc = at::empty({0}, opts);
    else if (in.full)
        dlc.addmm_(pb.xc.t(), dxp);
    else
        dlc.add_((pb.xc * dxp).sum(0));
    std::vector<double> db = centred_weighted_sum<T>(at::from_blob(const_cast<T*>(in.x), {B, D}, opts), pb.center,
                                                     dsxp);
    for (int64_t cc = 0; cc < n_cc; ++cc)
        for (int64_t k = 0; k < D; ++k) db[k] += parts.dbeta_part[cc * D + k];
    at::Tensor dbeta = at::empty({want.beta ? D : 0}, opts);
    if (want.beta)
        for (int64_t k = 0; k < D; ++k) dbeta.data_ptr<T>()[k] = T(db[k]);
    double dlam = 0, dgam = 0;
    for (int64_t cc = 0; cc < n_cc; ++cc) {
        dlam += parts.dlam_part[cc];
        dgam += parts.dgam_part[cc];
    }
    const auto f64 = opts.dtype(at::kDouble);
    at::Tensor dmu = want.mu ? parts.dmu : at::empty({0}, opts);
    return {dx, dmu, dlc, dbeta, at::scalar_tensor(dlam, f64), at::scalar_tensor(dgam, f64)};
}

// Backward. With G_bc = ∂loss/∂logit'_bc = w_lse,b·exp(logit'_bc − lse_b) + v_c·(w_sl,b + w_pl,b·P_bc)
//                                          + Σ_k w_target_logit,bk·[c = t_bk],
// H = −γ·G, P = H/a and R = H·λ·s/r (docs/design.md §2, the algorithm):
//   ∂x'_b  = rowsum(P)_b·x'_b − (P·mu')_b,  ∂mu'_c = colsum(P)_c·mu'_c − (Pᵀ·x')_c   (far pairs, GEMMs)
//   ± P·diff' for pairs recomputed from the raw difference (near pairs and every target pair),
//   ∂sx = rowsum(R), ∂smu = −colsum(R), ∂λ = Σ H·r, ∂γ = −Σ G·(d + margin·[c = t]),
// then chained to the raw inputs: x' = (x − m)·Lc, mu' = (mu − m)·Lc, sx = x·beta, smu = mu·beta.
// Each chunk owns its classes' ∂mu rows (finished tile by tile, ce_backward_tile) and a ∂x'
// partial; the partials are summed in chunk order (ce_chain_rows).
template <typename T>
std::vector<at::Tensor> ce_backward(const CEProblem<T>& pb, const RowWeights& rw, int64_t grad_mask) {
    const GradMask want(grad_mask);
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, C = in.C, D = in.D;
    const int64_t n_ct = ceil_div(C, kTileC), n_cc = num_chunks(B, C, D, sizeof(T));
    CEPartials<T> parts(pb, n_cc, in.xp.options());
    at::parallel_for(0, C > 0 ? n_cc : 0, 1, [&](int64_t begin, int64_t end) {
        CEBackwardScratch<T> sc(pb);
        for (int64_t cc = begin; cc < end; ++cc) {
            ChunkSums sums;
            const auto [t0, t1] = chunk_tiles(cc, n_cc, n_ct);
            for (int64_t ct = t0; ct < t1; ++ct) ce_backward_tile(pb, rw, want, cc, ct, sc, parts, sums);
            parts.dlam_part[cc] = sums.dlam;
            parts.dgam_part[cc] = sums.dgam;
        }
    });
    return ce_chain_rows(pb, want, parts);
}

void check_ce_args(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
                   const at::Tensor& lam, const at::Tensor& gamma, const at::Tensor& target,
                   const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& dense_soft_target) {
    check_operands(x, mu, lc, beta, lam, gamma);
    TORCH_CHECK(target.scalar_type() == at::kLong && (target.dim() == 1 || target.dim() == 2) &&
                    target.size(0) == x.size(0),
                "target must be int64 [B] or [B, k]");
    TORCH_CHECK(target.device().is_cpu(), "the C++ kernels take CPU tensors");
    if (class_weight.has_value())
        TORCH_CHECK(class_weight->dim() == 1 && class_weight->size(0) == mu.size(0) &&
                        class_weight->scalar_type() == x.scalar_type() && class_weight->device().is_cpu(),
                    "class_weight must be a CPU tensor [C] of x's dtype");
    if (dense_soft_target.has_value())
        TORCH_CHECK(dense_soft_target->dim() == 2 && dense_soft_target->size(0) == x.size(0) &&
                        dense_soft_target->size(1) == mu.size(0) && dense_soft_target->scalar_type() == x.scalar_type() &&
                        dense_soft_target->device().is_cpu(),
                    "dense_soft_target must be a CPU tensor [B, C] of x's dtype");
    // The range check inside the op, so that it holds where the Python one does not run (torch.compile):
    // −1 means "no target among these classes"; −2 marks a target out of range (row_stats.local_targets).
    const at::Tensor t = target.contiguous();
    const int64_t* tp = t.data_ptr<int64_t>();
    const int64_t C = mu.size(0);
    for (int64_t i = 0; i < t.numel(); ++i)
        TORCH_CHECK_VALUE(tp[i] >= -1 && tp[i] < C, "target holds a class index out of range [0, ", C,
                          ") that is not ignore_index (entry ", i, ")");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_ce_fwd_cpu(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
    const at::Tensor& lam, const at::Tensor& gamma, const at::Tensor& target, double eps, double tau, double margin,
    const std::optional<at::Tensor>& class_weight, const std::optional<at::Tensor>& dense_soft_target) {
    check_ce_args(x, mu, lc, beta, lam, gamma, target, class_weight, dense_soft_target);
    at::NoGradGuard no_grad;  // the ATen calls below are part of this op, not of the autograd graph
    const auto f64 = x.options().dtype(at::kDouble);
    at::Tensor lse = at::empty({x.size(0)}, f64), target_logit = at::empty(target.sizes(), f64);
    at::Tensor sl = at::empty({x.size(0)}, f64), pl = at::empty({x.size(0)}, f64);
    if (x.size(0) == 0) return {lse, target_logit, sl, pl};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "randers_cross_entropy_fwd", [&] {
        const auto pb = setup<scalar_t>(x.detach().contiguous(), mu.detach().contiguous(), lc.detach().contiguous(),
                                        beta.detach().contiguous(), lam, gamma, target.contiguous(), eps, tau, margin,
                                        class_weight, dense_soft_target);
        ce_forward<scalar_t>(pb, lse.data_ptr<double>(), target_logit.data_ptr<double>(), sl.data_ptr<double>(),
                             pl.data_ptr<double>());
    });
    return {lse, target_logit, sl, pl};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_ce_bwd_cpu(
    const at::Tensor& w_lse, const at::Tensor& w_target_logit, const at::Tensor& w_sl, const at::Tensor& lse,
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
    const at::Tensor& lam, const at::Tensor& gamma, const at::Tensor& target, double eps, double tau, double margin,
    const std::optional<at::Tensor>& w_pl, const std::optional<at::Tensor>& class_weight,
    const std::optional<at::Tensor>& dense_soft_target, int64_t grad_mask) {
    check_ce_args(x, mu, lc, beta, lam, gamma, target, class_weight, dense_soft_target);
    at::NoGradGuard no_grad;
    for (const at::Tensor* t : {&w_lse, &w_sl, &lse})
        TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(0), "the row weights and lse must be [B]");
    TORCH_CHECK(w_target_logit.sizes() == target.sizes(), "w_target_logit must have the target's shape");
    if (w_pl.has_value()) TORCH_CHECK(w_pl->dim() == 1 && w_pl->size(0) == x.size(0), "w_pl must be [B]");
    const at::Tensor wl = w_lse.to(at::kDouble).contiguous(), wt = w_target_logit.to(at::kDouble).contiguous(),
                     ws = w_sl.to(at::kDouble).contiguous(), l = lse.to(at::kDouble).contiguous();
    const at::Tensor wp = w_pl.has_value() ? w_pl->to(at::kDouble).contiguous() : at::Tensor();
    std::vector<at::Tensor> res;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "randers_cross_entropy_bwd", [&] {
        const auto pb = setup<scalar_t>(x.detach().contiguous(), mu.detach().contiguous(), lc.detach().contiguous(),
                                        beta.detach().contiguous(), lam, gamma, target.contiguous(), eps, tau, margin,
                                        class_weight, dense_soft_target);
        const RowWeights rw{wl.data_ptr<double>(), wt.data_ptr<double>(), ws.data_ptr<double>(),
                            wp.defined() ? wp.data_ptr<double>() : nullptr, l.data_ptr<double>()};
        res = ce_backward<scalar_t>(pb, rw, grad_mask);
    });
    return {res[0], res[1], res[2], res[3], scalar_grad(res[kGradLam], lam, grad_mask, kGradLam),
            scalar_grad(res[kGradGamma], gamma, grad_mask, kGradGamma)};
}

}  // namespace

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) {
    m.impl("randers_cross_entropy", &randers_ce_fwd_cpu);
    m.impl("randers_cross_entropy_backward", &randers_ce_bwd_cpu);
}

}  // namespace faim_kernels
