// Fused Randers logits on the CPU (docs/design.md §2, the algorithm): the CPU kernels of the ops
//   faim_kernels::randers_logits(x, mu, lc, beta, lam, gamma, eps, tau) -> (logits, xp, mup, sx, smu)
//   faim_kernels::randers_logits_backward(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps, tau)
//       -> (dx, dmu, dlc, dbeta, dlam, dgamma)
// whose schemas, fake kernels and autograd formula are in faim_kernels/ops/contract.py.
// Forward: the preparation (centre, x', mu', norms, float64 s), ONE GEMM x'·mu'ᵀ into the output,
// the epilogue in place row by row, and the near pairs recomputed from the raw difference.
// Backward: a = sqrt(q + eps) comes back from the logits, so the two gradient GEMMs are the only
// B×C×D products (as in nn.Linear's backward); no [B, C, D] is ever formed.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>

#include "randers_common.h"

namespace faim_kernels {
namespace {

// Raw inputs, made contiguous and detached (GEMMs on worker threads do not inherit the
// dispatcher's below-autograd state, and at::mm_out refuses inputs that require grad).
struct RawInputs {
    at::Tensor x, mu, lc, beta;
    double ridge = 0;  // > 0: lc is a wide factor [A | ridge·I] (wide_factor_ridge)
    RawInputs(const at::Tensor& x_, const at::Tensor& mu_, const at::Tensor& lc_, const at::Tensor& beta_)
        : x(x_.detach().contiguous()), mu(mu_.detach().contiguous()), lc(lc_.detach().contiguous()),
          beta(beta_.detach().contiguous()) {
        if (lc.dim() == 2 && lc.size(1) == 2 * lc.size(0) && (lc.scalar_type() == at::kFloat || lc.scalar_type() == at::kDouble))
            AT_DISPATCH_FLOATING_TYPES(lc.scalar_type(), "wide_factor_ridge",
                                       [&] { ridge = double(wide_factor_ridge<scalar_t>(lc)); });
    }
};

// norms: |x'_b|², |mu'_c|² where the caller has them (diagonal_preparation), else computed here.
template <typename T>
Operands<T> operands(const RawInputs& raw, at::Tensor xp, at::Tensor mup, const at::Tensor& sx,
                     const at::Tensor& smu, double lam, double eps, double tau,
                     std::pair<std::vector<T>, std::vector<T>>* norms = nullptr) {
    Operands<T> in;
    in.B = raw.x.size(0);
    in.C = raw.mu.size(0);
    in.D = raw.x.size(1);
    in.K = xp.size(1);  // D, or the columns of a wide factor [D, K]
    in.xp = std::move(xp);
    in.mup = std::move(mup);
    in.sx = sx.data_ptr<double>();
    in.smu = smu.data_ptr<double>();
    in.x = raw.x.data_ptr<T>();
    in.mu = raw.mu.data_ptr<T>();
    in.lc = raw.lc.data_ptr<T>();
    in.beta = raw.beta.data_ptr<T>();
    in.full = raw.lc.dim() == 2;
    in.ridge = raw.ridge;
    in.lower = in.full && (in.K == in.D || in.ridge > 0) && is_lower_triangular(in.lc, in.D, in.K);
    if (norms != nullptr) {
        in.xnorm = std::move(norms->first);
        in.munorm = std::move(norms->second);
    } else {
        in.xnorm = row_sq_norms<T>(in.xp);
        in.munorm = row_sq_norms<T>(in.mup);
    }
    split_all(in.sx, in.B, in.sx_hi, in.sx_lo);
    split_all(in.smu, in.C, in.smu_hi, in.smu_lo);
    in.lam = lam;
    in.eps = eps;
    in.tau = tau;
    return in;
}

// out holds the GEMM x'·mu'ᵀ on entry and the logits −γ·d (Eq. 3) on return: one vectorised
// loop per row segment, everything in T (the shared row_terms also stores a, r, s, d for the
// cross-entropy), then the near pairs (about one per row: a sample's
// own prototype) recomputed from the raw difference.
template <typename T>
void logits_epilogue(const Operands<T>& in, double gamma, T* out) {
    const int64_t B = in.B, C = in.C, K = in.K;
    const int64_t n_ct = ceil_div(C, kTileC);
    // At least 16 full tiles' worth of pairs (4096) per task: with few classes a tile is narrow, and
    // a grain counted in tiles sent a (64, 10) head through a parallel region for ~600 pairs, whose
    // thread wake-up cost more than the work (a small head's call several times slower on 2 threads
    // than on 1).
    const int64_t grain = ceil_div(16 * kTileC, std::max<int64_t>(1, std::min(C, kTileC)));
    at::parallel_for(0, B * n_ct, grain, [&](int64_t begin, int64_t end) {
        // Locals, not captured references: a store to the output could alias those, which keeps
        // the loop scalar (measured: 2.7x a bare GEMM at (256, 1000, 128) instead of ~1.2x).
        const T neg_gamma = T(-gamma), eps = T(in.eps), tau = T(in.tau), lam = T(in.lam);
        std::vector<double> acc(K);
        std::vector<T> near_flags(kTileC);
        for (int64_t t = begin; t < end; ++t) {
            const int64_t b = t / n_ct, c0 = (t % n_ct) * kTileC, nc = std::min(kTileC, C - c0);
            T* __restrict__ row = out + b * C + c0;
            T* __restrict__ near = near_flags.data();
            const T* __restrict__ mn = in.munorm.data() + c0;
            const T* __restrict__ smh = in.smu_hi.data() + c0;
            const T* __restrict__ sml = in.smu_lo.data() + c0;
            const T xn = in.xnorm[b], sxh = in.sx_hi[b], sxl = in.sx_lo[b];
            T n_near = 0;
#pragma omp simd reduction(+ : n_near)
            for (int64_t j = 0; j < nc; ++j) {
                const T norms = xn + mn[j];
                const T q = norms - T(2) * row[j];
                const T s = (sxh - smh[j]) + (sxl - sml[j]);
                near[j] = (is_near_pair(q, norms, tau) | s_cancels(s, sxh, smh[j])) ? T(1) : T(0);
                n_near += near[j];
                row[j] = neg_gamma * (std::sqrt((q < T(0) ? T(0) : q) + eps) + lam * std::sqrt(s * s + eps));
            }
            if (n_near == T(0)) continue;
            for (int64_t j = 0; j < nc; ++j)
                if (near[j] != T(0)) row[j] = neg_gamma * recompute_near_pair(in, b, c0 + j, acc.data(), (T*)nullptr).d;
        }
    });
}

// The logits (gamma) or distances (gamma = −1) of prepared operands, [B, C].
template <typename T>
at::Tensor logits_of(const Operands<T>& in, double gamma) {
    at::Tensor out = at::empty({in.B, in.C}, in.xp.options());
    if (out.numel() == 0) return out;
    at::mm_out(out, in.xp, in.mup.t());
    logits_epilogue(in, gamma, out.data_ptr<T>());
    return out;
}

// The prototypes' half of the preparation: the centre m, mu' = (mu − m)·Lc and smu = mu·beta (float64).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> prototype_half(const RawInputs& raw) {
    const at::Tensor m = center_of<T>(raw.mu);
    at::Tensor smu = at::empty({raw.mu.size(0)}, raw.mu.options().dtype(at::kDouble));
    row_dots64<T>(raw.mu, raw.beta.template data_ptr<T>(), smu.template data_ptr<double>());
    return {m, project<T>(raw.mu, m, raw.lc, T(raw.ridge)), smu};
}

// x's half of the preparation and the logits against prepared prototypes: (logits, x', sx).
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> logits_with_prototypes(const RawInputs& raw, const at::Tensor& m,
                                                                      const at::Tensor& mup, const at::Tensor& smu,
                                                                      double lam, double gamma, double eps,
                                                                      double tau) {
    at::Tensor sx = at::empty({raw.x.size(0)}, raw.x.options().dtype(at::kDouble));
    at::Tensor xp = project<T>(raw.x, m, raw.lc, T(raw.ridge));
    row_dots64<T>(raw.x, raw.beta.template data_ptr<T>(), sx.template data_ptr<double>());
    const auto in = operands<T>(raw, xp, mup, sx, smu, lam, eps, tau);
    return {logits_of(in, gamma), xp, sx};
}

// The whole preparation of a diagonal factor after the centre, both sides in ONE parallel region
// over fixed row chunks (x's, then mu's): per row v' = (v − m)·Lc, |v'|² (from the row just
// written, still in L1) and v·beta in float64: the values of project, row_sq_norms and row_dots64
// bit for bit, which took six regions and read x, mu and x', mu' twice.
template <typename T>
struct DiagonalPreparation {
    at::Tensor xp, mup, sx, smu;
    std::pair<std::vector<T>, std::vector<T>> norms;
};

template <typename T>
DiagonalPreparation<T> diagonal_preparation(const RawInputs& raw, const at::Tensor& m) {
    const int64_t B = raw.x.size(0), C = raw.mu.size(0), D = raw.x.size(1);
    DiagonalPreparation<T> out;
    out.xp = at::empty_like(raw.x);
    out.mup = at::empty_like(raw.mu);
    out.sx = at::empty({B}, raw.x.options().dtype(at::kDouble));
    out.smu = at::empty({C}, raw.x.options().dtype(at::kDouble));
    out.norms.first.resize(B);
    out.norms.second.resize(C);
    struct Side {
        const T* v;
        T *vp, *norm;
        double* s;
        int64_t n;
    };
    const Side sides[2] = {{raw.x.data_ptr<T>(), out.xp.template data_ptr<T>(), out.norms.first.data(),
                            out.sx.template data_ptr<double>(), B},
                           {raw.mu.data_ptr<T>(), out.mup.template data_ptr<T>(), out.norms.second.data(),
                            out.smu.template data_ptr<double>(), C}};
    const T* bp = raw.beta.data_ptr<T>();
    std::vector<double> beta64(bp, bp + D);
    const double* b64 = beta64.data();
    const T *lp = raw.lc.data_ptr<T>(), *mp = m.data_ptr<T>();
    const TwoSideChunks chunks(B, C, D);
    at::parallel_for(0, chunks.n_chunks, chunks.grain, [&sides, &chunks, D, lp, mp, b64](int64_t begin, int64_t end) {
        const T* __restrict__ l = lp;
        const T* __restrict__ mm = mp;
        for (int64_t ch = begin; ch < end; ++ch) {
            const Side& sd = sides[chunks.side(ch)];
            const int64_t r0 = chunks.first_row(ch), r1 = std::min(sd.n, r0 + chunks.chunk_rows);
            for (int64_t i = r0; i < r1; ++i) {
                const T* __restrict__ vrow = sd.v + i * D;
                T* __restrict__ orow = sd.vp + i * D;
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) orow[k] = (vrow[k] - mm[k]) * l[k];
                sd.norm[i] = row_sq_norm(orow, D);
                sd.s[i] = dot64(vrow, b64, D);
            }
        }
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_logits_cpu(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta, const at::Tensor& lam,
    const at::Tensor& gamma, double eps, double tau) {
    check_operands(x, mu, lc, beta, lam, gamma, /*allow_wide=*/true);
    const RawInputs raw(x, mu, lc, beta);
    at::Tensor logits, xp, mup, sx, smu;
    AT_DISPATCH_FLOATING_TYPES(raw.x.scalar_type(), "randers_logits", [&] {
        if (raw.lc.dim() == 1) {
            auto prep = diagonal_preparation<scalar_t>(raw, center_of<scalar_t>(raw.mu));
            xp = prep.xp;
            mup = prep.mup;
            sx = prep.sx;
            smu = prep.smu;
            const auto in = operands<scalar_t>(raw, xp, mup, sx, smu, lam.item<double>(), eps, tau, &prep.norms);
            logits = logits_of(in, gamma.item<double>());
            return;
        }
        at::Tensor m;
        std::tie(m, mup, smu) = prototype_half<scalar_t>(raw);
        std::tie(logits, xp, sx) =
            logits_with_prototypes<scalar_t>(raw, m, mup, smu, lam.item<double>(), gamma.item<double>(), eps, tau);
    });
    return {logits, xp, mup, sx, smu};
}

// The two halves as ops of their own, for a caller that scores many batches against unchanged
// prototypes (FAIMHead caches the first under no_grad for a full L, where mu' = (mu − m)·Lc is a C×D²
// GEMM: at (512, 4096, 256) half the logits GEMM's work; docs/design.md §2.4):
//   randers_prototypes(mu, lc, beta) -> (m, mup, smu)
//   randers_logits_prepared(x, mu, lc, beta, lam, gamma, m, mup, smu, eps, tau) -> logits
// The second computes exactly what randers_logits computes (the same functions, hence the same bits).
// Forward only: the caller records no graph through them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> randers_prototypes_cpu(const at::Tensor& mu, const at::Tensor& lc,
                                                                      const at::Tensor& beta) {
    check_operands(mu, mu, lc, beta, beta.new_zeros({}), beta.new_zeros({}), /*allow_wide=*/true);
    at::NoGradGuard no_grad;
    const RawInputs raw(mu, mu, lc, beta);
    std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
    AT_DISPATCH_FLOATING_TYPES(raw.mu.scalar_type(), "randers_prototypes", [&] { out = prototype_half<scalar_t>(raw); });
    return out;
}

at::Tensor randers_logits_prepared_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc,
                                       const at::Tensor& beta, const at::Tensor& lam, const at::Tensor& gamma,
                                       const at::Tensor& m, const at::Tensor& mup, const at::Tensor& smu, double eps,
                                       double tau) {
    check_operands(x, mu, lc, beta, lam, gamma, /*allow_wide=*/true);
    const int64_t C = mu.size(0), D = mu.size(1), K = lc.dim() == 2 ? lc.size(1) : D;
    TORCH_CHECK(m.dim() == 1 && m.size(0) == D && m.scalar_type() == x.scalar_type() && m.device().is_cpu(),
                "m must be a CPU tensor [D] of x's dtype");
    TORCH_CHECK(mup.dim() == 2 && mup.size(0) == C && mup.size(1) == K && mup.scalar_type() == x.scalar_type() &&
                    mup.device().is_cpu(),
                "mup must be a CPU tensor [C, K] of x's dtype (K: the factor's width)");
    TORCH_CHECK(smu.dim() == 1 && smu.size(0) == C && smu.scalar_type() == at::kDouble && smu.device().is_cpu(),
                "smu must be a float64 CPU tensor [C]");
    at::NoGradGuard no_grad;
    const RawInputs raw(x, mu, lc, beta);
    at::Tensor logits;
    AT_DISPATCH_FLOATING_TYPES(raw.x.scalar_type(), "randers_logits_prepared", [&] {
        logits = std::get<0>(logits_with_prototypes<scalar_t>(raw, m.contiguous(), mup.contiguous(),
                                                               smu.contiguous(), lam.item<double>(),
                                                               gamma.item<double>(), eps, tau));
    });
    return logits;
}

// The chain rule for one side of a full factor (v = x or mu, with its ∂v' and ∂s): returns
// ∂v = ∂v'·Lcᵀ + ∂s·betaᵀ (want_dv) and adds (v − m)ᵀ·∂v' to dlc (want_dlc) and Σ_i ∂s_i·(v_i − m)
// to dbeta (want_dbeta; float64, centred, see centred_weighted_sum): two GEMMs and one pass. dvp may
// be undefined where neither ∂v nor ∂Lc is wanted. (A diagonal factor's chain rule is in its
// backward tail, diagonal_backward_tail.)
template <typename T>
at::Tensor chain_rows(const RawInputs& raw, const at::Tensor& m, const at::Tensor& dvp, const double* ds,
                      at::Tensor& dlc, std::vector<double>& dbeta, bool x_side, bool want_dv, bool want_dlc,
                      bool want_dbeta) {
    const at::Tensor& v = x_side ? raw.x : raw.mu;
    const int64_t n = v.size(0), D = v.size(1);
    const T* mp = m.data_ptr<T>();
    const T* bp = raw.beta.data_ptr<T>();
    if (want_dbeta) {
        const std::vector<double> db = centred_weighted_sum<T>(v, mp, ds);
        for (int64_t k = 0; k < D; ++k) dbeta[k] += db[k];
    }
    if (!want_dv && !want_dlc) return at::Tensor();
    if (want_dlc) dlc.addmm_((v - m).t(), dvp);
    if (!want_dv) return at::Tensor();
    // A wide factor [A | ridge·I]: ∂v = ∂v'[:, :D]·Aᵀ + ridge·∂v'[:, D:] (no product with the identity block).
    const T ridge = T(raw.ridge);
    at::Tensor dv = ridge > T(0) ? at::mm(dvp.narrow(1, 0, D), raw.lc.narrow(1, 0, D).t()) : at::mm(dvp, raw.lc.t());
    T* o = dv.data_ptr<T>();
    const T* gp = dvp.data_ptr<T>();
    at::parallel_for(0, n, rows_per_task(D), [o, ds, bp, gp, ridge, D](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            const T dsi = T(ds[i]);
            T* __restrict__ row = o + i * D;
            if (ridge > T(0)) {
                const T* __restrict__ right = gp + i * 2 * D + D;
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) row[k] += dsi * bp[k] + ridge * right[k];
            } else {
#pragma omp simd
                for (int64_t k = 0; k < D; ++k) row[k] += dsi * bp[k];
            }
        }
    });
    return dv;
}

// A near pair: its ∂x', ∂mu' terms are added from diff' directly instead of through
// rowsum(P)·x' − P·mu', which cancels there (docs/design.md §2.1, near pairs).
struct NearTerm {
    int64_t b, c;
    double p;
};

// Where the backward reads the distances: d_bc = scale·src_bc. The logits carry d only where γ·d
// is a normal number of T: with a tiny γ (float32 γ = 1e-40, say) they are subnormal or 0 and hold
// a few bits of d, or none, so d is recomputed then (one forward, gamma = −1), as for γ = 0. (With
// |γ| >= 1 a subnormal logit means d < the smallest normal number, an absolute error below any
// distance that matters; such a pair is a near pair anyway.)
template <typename T>
struct DistanceSource {
    at::Tensor src;  // [B, C], any strides
    T scale;
};

template <typename T>
DistanceSource<T> distance_source(const Operands<T>& in, const at::Tensor& logits, double gamma) {
    const bool logits_hold_d =
        gamma != 0 && (std::abs(gamma) >= 1 ||
                       !at::lt(logits.abs(), double(std::numeric_limits<T>::min())).any().item<bool>());
    if (logits_hold_d) return {logits, T(-1.0 / gamma)};
    return {logits_of(in, -1.0), T(1)};
}

// What the backward's pass over the pairs leaves for the gradient GEMMs and the chain rule.
// Column sums and scalar sums are kept per row tile and added in tile order afterwards, so the
// results do not depend on thread timing.
template <typename T>
struct PairSums {
    at::Tensor P;                                 // [B, C] P of the far pairs, 0 at near pairs
    at::Tensor row_p;                             // [B] rowsum(P) (far pairs)
    at::Tensor dsx;                               // [B] float64 rowsum(R) = ∂sx
    int64_t n_bt;                                 // row tiles of kTileBBackward rows
    std::vector<T> col_p, col_r;                  // [n_bt, C] column sums of P and R per row tile
    std::vector<double> dlam_part, dgam_part;     // [n_bt] Σ H·r and −Σ G·d per row tile
    std::vector<std::vector<NearTerm>> near;      // per row tile: the near pairs' p
    std::vector<std::vector<T>> near_diff;        // per row tile: their diff' rows [K] each

    PairSums(int64_t B, int64_t C, const at::TensorOptions& opts)
        : P(at::empty({B, C}, opts)), row_p(at::empty({B}, opts)), dsx(at::empty({B}, opts.dtype(at::kDouble))),
          n_bt(ceil_div(B, kTileBBackward)), col_p(n_bt * C, T(0)), col_r(n_bt * C, T(0)),
          dlam_part(n_bt, 0.0), dgam_part(n_bt, 0.0), near(n_bt), near_diff(n_bt) {}
};

// f(t, diff') for every near pair the pass over the pairs kept (t: its b, c, p; diff' [K]), in the
// pass's row-tile order (fixed: the sums it feeds do not depend on the threads).
template <typename T, typename F>
void for_each_near_term(const PairSums<T>& sums, int64_t K, F&& f) {
    for (int64_t bt = 0; bt < sums.n_bt; ++bt)
        for (size_t n = 0; n < sums.near[bt].size(); ++n) f(sums.near[bt][n], sums.near_diff[bt].data() + n * K);
}

// The scalars of the backward's epilogue, as locals of each worker: a store to an output could
// alias captured references, which keeps the loops scalar (see the forward).
template <typename T>
struct BackwardScalars {
    T g, lam, eps, tau, dscale;
};

// One worker's scratch: diff' of a near pair, the gathered rows of strided inputs, the near-pair
// flags of one row segment, and the near-pair recompute's float64 accumulator.
template <typename T>
struct BackwardScratch {
    std::vector<T> diffp, gr, lr, near_flags;
    std::vector<double> acc;
    explicit BackwardScratch(int64_t K) : diffp(K), gr(kTileC), lr(kTileC), near_flags(kTileC), acc(K) {}
};

// The sums of one row segment's far pairs (in T over the segment).
template <typename T>
struct SegmentSums {
    T sp, sr, shr, sgd, n_near;
};

// The epilogue of one row segment (row b, classes c0 .. c0+nc), one vectorised loop: d from the
// logits, a = d − λ·r, the near-pair test q = a² − eps < tau·(|x'|² + |mu'|²), and for the far
// pairs P = H/a, R = H·λ·s/r written to prow and added to the tile's column sums cp, cr. Near pairs
// get P = R = 0 here and are flagged in nf for near_pair_terms.
template <typename T>
SegmentSums<T> far_pair_terms(const Operands<T>& in, const BackwardScalars<T>& k, int64_t b, int64_t c0, int64_t nc,
                              const T* __restrict__ gv, const T* __restrict__ lv, T* __restrict__ prow,
                              T* __restrict__ cp, T* __restrict__ cr, T* __restrict__ nf) {
    const T g = k.g, lam = k.lam, eps = k.eps, tau = k.tau, ds = k.dscale;
    const T xn = in.xnorm[b], sxh = in.sx_hi[b], sxl = in.sx_lo[b];
    const T* __restrict__ mn = in.munorm.data() + c0;
    const T* __restrict__ smh = in.smu_hi.data() + c0;
    const T* __restrict__ sml = in.smu_lo.data() + c0;
    T sp = 0, sr = 0, shr = 0, sgd = 0, n_near = 0;
    // Reductions need the pragma: without it the compiler may not reorder float sums.
#pragma omp simd reduction(+ : sp, sr, shr, sgd, n_near)
    for (int64_t j = 0; j < nc; ++j) {
        const T s = (sxh - smh[j]) + (sxl - sml[j]);
        const T r = std::sqrt(s * s + eps);
        const T d = ds * lv[j];
        const T a = d - lam * r;
        nf[j] = (is_near_pair(a * a - eps, xn + mn[j], tau) | s_cancels(s, sxh, smh[j])) ? T(1) : T(0);
        const T H = -g * gv[j];
        const T p = a > T(0) ? H / a : T(0);  // eps = 0 at an exact hit: subgradient 0
        const T R = r > T(0) ? H * lam * s / r : T(0);
        // Near pairs take all their a, s, r terms from the near-pair recompute.
        const bool far = nf[j] == T(0);
        const T pf = far ? p : T(0);
        const T Rf = far ? R : T(0);
        prow[j] = pf;
        cp[j] += pf;
        cr[j] += Rf;
        sp += pf;
        sr += Rf;
        shr += far ? H * r : T(0);
        sgd += gv[j] * d;
        n_near += nf[j];
    }
    return {sp, sr, shr, sgd, n_near};
}

// The near-pair recompute of one row segment: each flagged pair's a, s, r from the raw difference
// (recompute_near_pair), its R added to the row and column sums, its p and diff' kept for the GEMMs' results.
template <typename T>
void near_pair_terms(const Operands<T>& in, const BackwardScalars<T>& k, int64_t b, int64_t c0, int64_t nc,
                     const T* gv, const T* nf, BackwardScratch<T>& w, T* cr, double& sum_r, double& dlam,
                     std::vector<NearTerm>& near, std::vector<T>& near_diff) {
    for (int64_t j = 0; j < nc; ++j) {
        if (nf[j] == T(0)) continue;
        const Pair<T> pr = recompute_near_pair(in, b, c0 + j, w.acc.data(), w.diffp.data());
        const T H = -k.g * gv[j];
        const T p = pr.a > T(0) ? H / pr.a : T(0);
        const T R = pr.r > T(0) ? H * k.lam * pr.s / pr.r : T(0);
        sum_r += double(R);
        cr[j] += R;
        dlam += double(H * pr.r);
        // p = 0 exactly (an infinite distance, or no gradient) adds nothing: diff' may hold Inf there.
        if (p == T(0)) continue;
        near.push_back({b, c0 + j, double(p)});
        near_diff.insert(near_diff.end(), w.diffp.begin(), w.diffp.end());
    }
}

// The pass over the pairs of row tile bt (rows b0 .. b0+nb), class tile by class tile.
template <typename T>
void backward_row_tile(const Operands<T>& in, const BackwardScalars<T>& k, int64_t bt, const T* G, int64_t gs0,
                       int64_t gs1, const T* L, int64_t ls0, int64_t ls1, PairSums<T>& out, BackwardScratch<T>& w) {
    const int64_t B = in.B, C = in.C;
    const int64_t b0 = bt * kTileBBackward, nb = std::min(kTileBBackward, B - b0);
    T* Pp = out.P.template data_ptr<T>();
    T* row_pp = out.row_p.template data_ptr<T>();
    double* dsxp = out.dsx.template data_ptr<double>();
    double dlam = 0, dgam = 0;
    for (int64_t i = 0; i < nb; ++i) {
        const int64_t b = b0 + i;
        double sum_p = 0, sum_r = 0;
        for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
            const int64_t nc = std::min(kTileC, C - c0);
            // Rows with unit column stride are read in place; others (e.g. an expanded gradient,
            // stride 0) are gathered into a row buffer first.
            const T* gsrc = G + b * gs0 + c0 * gs1;
            const T* lsrc = L + b * ls0 + c0 * ls1;
            if (gs1 != 1) {
                for (int64_t j = 0; j < nc; ++j) w.gr[j] = gsrc[j * gs1];
                gsrc = w.gr.data();
            }
            if (ls1 != 1) {
                for (int64_t j = 0; j < nc; ++j) w.lr[j] = lsrc[j * ls1];
                lsrc = w.lr.data();
            }
            T* cr = out.col_r.data() + bt * C + c0;
            const SegmentSums<T> s = far_pair_terms(in, k, b, c0, nc, gsrc, lsrc, Pp + b * C + c0,
                                                    out.col_p.data() + bt * C + c0, cr, w.near_flags.data());
            sum_p += s.sp;
            sum_r += s.sr;
            dlam += s.shr;
            dgam -= s.sgd;
            if (s.n_near == T(0)) continue;
            near_pair_terms(in, k, b, c0, nc, gsrc, w.near_flags.data(), w, cr, sum_r, dlam, out.near[bt],
                            out.near_diff[bt]);
        }
        row_pp[b] = T(sum_p);
        dsxp[b] = sum_r;
    }
    out.dlam_part[bt] = dlam;
    out.dgam_part[bt] = dgam;
}

// colsum(P) [C] and ∂smu = −colsum(R) [C] (float64) from the per-row-tile partials, in tile order.
template <typename T>
void column_sums(const PairSums<T>& sums, int64_t C, T* colsum_p, double* dsmu) {
    const int64_t n_bt = sums.n_bt;
    at::parallel_for(0, C, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            double tp = 0, tr = 0;
            for (int64_t bt = 0; bt < n_bt; ++bt) {
                tp += double(sums.col_p[bt * C + c]);
                tr += double(sums.col_r[bt * C + c]);
            }
            colsum_p[c] = T(tp);
            dsmu[c] = -tr;
        }
    });
}

// scale_i·v_i − (a·b)_i for the rows i of v [n, K]: the GEMM into a fresh result, then one fused
// pass for the rank-one part (a broadcast ATen multiply before an addmm_ cost ~10 µs per call at
// (64, 10, 64), more than the GEMM; this pass ~1 µs).
template <typename T>
at::Tensor scaled_rows_minus_product(const at::Tensor& v, const T* scale, const at::Tensor& a, const at::Tensor& b) {
    at::Tensor out = at::mm(a, b);
    const int64_t n = v.size(0), K = v.size(1);
    T* o = out.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    at::parallel_for(0, n, rows_per_task(K), [o, vp, scale, K](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            T* __restrict__ orow = o + i * K;
            const T* __restrict__ vrow = vp + i * K;
            const T si = scale[i];
#pragma omp simd
            for (int64_t k = 0; k < K; ++k) orow[k] = si * vrow[k] - orow[k];
        }
    });
    return out;
}

// The gradient GEMMs ∂x' = rowsum(P)·x' − P·mu' and ∂mu' = colsum(P)·mu' − Pᵀ·x' (the rank-one part
// added after each GEMM: no [C, D] temporary besides the result; only the wanted sides run), then
// ± p·diff' for the near pairs. P is released as soon as both GEMMs are done.
template <typename T>
std::pair<at::Tensor, at::Tensor> gradient_gemms(const Operands<T>& in, PairSums<T>& sums, const at::Tensor& colsum_p,
                                                 bool want_xp, bool want_mup) {
    const int64_t K = in.K;
    at::Tensor dxp, dmup;
    if (want_xp) dxp = scaled_rows_minus_product<T>(in.xp, sums.row_p.template data_ptr<T>(), sums.P, in.mup);
    if (want_mup) dmup = scaled_rows_minus_product<T>(in.mup, colsum_p.template data_ptr<T>(), sums.P.t(), in.xp);
    sums.P.reset();
    T* dx_ = want_xp ? dxp.data_ptr<T>() : nullptr;
    T* dm_ = want_mup ? dmup.data_ptr<T>() : nullptr;
    for_each_near_term(sums, K, [&](const NearTerm& t, const T* df) {
        for (int64_t k = 0; k < K; ++k) {
            if (dx_) dx_[t.b * K + k] += T(t.p) * df[k];
            if (dm_) dm_[t.c * K + k] -= T(t.p) * df[k];
        }
    });
    return {dxp, dmup};
}

// Features without grad and a trainable full metric (a linear probe, or a head behind a frozen
// backbone; a diagonal factor does the same in diagonal_backward_tail): ∂x' is wanted only for ∂Lc's x half, (x − m)ᵀ·∂x' with ∂x' = rowsum(P)·x' − P·mu' (+ p·diff' at the
// near pairs). Its GEMM term is (x − m)ᵀ·P·mu' = Aᵀ·mu' with A = Pᵀ·(x − m), and A is the ∂mu' side's
// GEMM too (Pᵀ·x' = A·Lc): one B×C×D product instead of two, as nn.Linear's backward without ∂x
// (a full L adds A·Lc and Aᵀ·mu', two C×D² products, so it is taken there for B > D only).
// Returns ∂mu' (as gradient_gemms does) and adds the x half of ∂Lc to dlc.
template <typename T>
at::Tensor gradient_gemms_without_dxp(const Operands<T>& in, const RawInputs& raw, const at::Tensor& m,
                                      PairSums<T>& sums, const at::Tensor& colsum_p, at::Tensor& dlc) {
    const int64_t D = in.D, K = in.K;
    const at::Tensor xc = raw.x - m;
    const at::Tensor A = at::mm(sums.P.t(), xc);
    sums.P.reset();
    const at::Tensor dmup = scaled_rows_minus_product<T>(in.mup, colsum_p.template data_ptr<T>(), A, raw.lc);
    const at::Tensor xr = xc * sums.row_p.unsqueeze(1);  // rowsum(P)_b·(x_b − m)
    dlc.addmm_(xr.t(), in.xp).addmm_(A.t(), in.mup, 1, -1);
    T* dm_ = dmup.data_ptr<T>();
    T* dl_ = dlc.data_ptr<T>();
    const T* xcp = xc.data_ptr<T>();
    for_each_near_term(sums, K, [&](const NearTerm& t, const T* df) {
        const T* xb = xcp + t.b * D;
        for (int64_t k = 0; k < K; ++k) dm_[t.c * K + k] -= T(t.p) * df[k];
        // ∂x'_b gains p·diff': (x_b − m)ᵀ·p·diff' in ∂Lc [D, K]
        for (int64_t i = 0; i < D; ++i)
            for (int64_t k = 0; k < K; ++k) dl_[i * K + k] += xb[i] * T(t.p) * df[k];
    });
    return dmup;
}

// The backward's tail for a diagonal factor, after the pass over the pairs: the two gradient GEMMs
// G_x = P·mu' and G_mu = Pᵀ·x' (only the wanted sides), the near pairs' ± p·diff' folded into them,
// then ONE pass over the rows of x and mu together that forms ∂v' = scale_i·v'_i − G_i in registers
// (scale = rowsum(P) for x, colsum(P) for mu) and the chain rule of chain_rows: ∂v = ∂v'·Lc + ∂s·beta,
// the ∂Lc partials (v − m)·∂v' in T and the ∂beta partials ∂s·(v − m) in float64, per fixed chunk
// of rows_per_task(D) rows, added in chunk order (x's chunks, then mu's: the sums chain_rows and
// centred_weighted_sum make). Separately the rank-one part, the ∂beta sum and the chain rule were
// six parallel regions and wrote and re-read ∂x', ∂mu'.
template <typename T>
std::pair<at::Tensor, at::Tensor> diagonal_backward_tail(const Operands<T>& in, const RawInputs& raw,
                                                         const at::Tensor& m, PairSums<T>& sums,
                                                         const at::Tensor& colsum_p, const double* dsmu,
                                                         at::Tensor& dlc, std::vector<double>& dbeta,
                                                         const GradMask& want) {
    const int64_t B = in.B, C = in.C, D = in.D;
    // A linear probe (features without grad, Lc trained): ∂Lc's x half Σ_b (x_b − m)⊙∂x'_b, with
    // ∂x'_b = rowsum(P)_b·x'_b − (P·mu')_b (+ p·diff' at its near pairs), takes its GEMM term from the
    // mu side's GEMM: Σ_b (x_b − m)⊙(P·mu')_b = Σ_c A_c⊙mu'_c = Σ_c G_mu,c⊙(mu_c − m), with
    // A = Pᵀ·(x − m) and G_mu = Pᵀ·x' = A⊙Lc. One B×C×D product, as nn.Linear's backward without ∂x.
    const bool probe = !want.x && want.lc;
    at::Tensor gx = want.xp() && !probe ? at::mm(sums.P, in.mup) : at::Tensor();
    at::Tensor gmu = probe ? at::mm(sums.P.t(), raw.x - m).mul_(raw.lc)
                           : want.mup() ? at::mm(sums.P.t(), in.xp) : at::Tensor();
    sums.P.reset();
    // ∂x'_b gains + p·diff' and ∂mu'_c − p·diff' at a near pair: G_x − p·diff', G_mu + p·diff'.
    T* gx_ = gx.defined() ? gx.data_ptr<T>() : nullptr;
    T* gm_ = gmu.defined() ? gmu.data_ptr<T>() : nullptr;
    for_each_near_term(sums, D, [&](const NearTerm& t, const T* df) {
        for (int64_t k = 0; k < D; ++k) {
            if (gx_) gx_[t.b * D + k] -= T(t.p) * df[k];
            if (gm_) gm_[t.c * D + k] += T(t.p) * df[k];
        }
    });
    at::Tensor dx = want.x ? at::empty_like(raw.x) : at::Tensor();
    at::Tensor dmu = want.mu ? at::empty_like(raw.mu) : at::Tensor();
    // probe: x's rows add rowsum(P)_b·(x_b − m)⊙x'_b to ∂Lc (x_half_rows), mu's rows −G_mu,c⊙(mu_c − m)
    // (x_half_g), the two parts of ∂Lc's x half besides its near pairs (added after the pass).
    struct Side {
        const T *v, *vp, *g, *scale;
        const double* ds;
        T* dv;
        int64_t n;
        bool x_half_rows, x_half_g;
    };
    const Side sides[2] = {
        {raw.x.data_ptr<T>(), in.xp.template data_ptr<T>(), gx_, sums.row_p.template data_ptr<T>(),
         sums.dsx.template data_ptr<double>(), want.x ? dx.data_ptr<T>() : nullptr, B, probe, false},
        {raw.mu.data_ptr<T>(), in.mup.template data_ptr<T>(), gm_, colsum_p.template data_ptr<T>(), dsmu,
         want.mu ? dmu.data_ptr<T>() : nullptr, C, false, probe}};
    const TwoSideChunks chunks(B, C, D);
    const int64_t n_chunks = chunks.n_chunks;
    const bool want_dlc = want.lc, want_dbeta = want.beta;
    std::vector<T> lc_part(want_dlc ? n_chunks * D : 0, T(0));
    std::vector<double> beta_part(want_dbeta ? n_chunks * D : 0, 0.0);
    const T *lp = raw.lc.data_ptr<T>(), *bp = raw.beta.data_ptr<T>(), *mp = m.data_ptr<T>();
    T* lparts = lc_part.data();
    double* bparts = beta_part.data();
    at::parallel_for(0, n_chunks, chunks.grain, [&sides, &chunks, D, lp, bp, mp, lparts, bparts, want_dlc,
                                                 want_dbeta](int64_t begin, int64_t end) {
        const T* __restrict__ l = lp;
        const T* __restrict__ bb = bp;
        const T* __restrict__ mm = mp;
        for (int64_t ch = begin; ch < end; ++ch) {
            const Side& sd = sides[chunks.side(ch)];
            const int64_t r0 = chunks.first_row(ch), r1 = std::min(sd.n, r0 + chunks.chunk_rows);
            T* __restrict__ acc = want_dlc ? lparts + ch * D : nullptr;
            double* __restrict__ accb = want_dbeta ? bparts + ch * D : nullptr;
            for (int64_t i = r0; i < r1; ++i) {
                const T* __restrict__ vrow = sd.v + i * D;
                const double dsi64 = sd.ds[i];
                if (sd.g != nullptr) {
                    const T si = sd.scale[i], dsi = T(dsi64);
                    const T* __restrict__ vprow = sd.vp + i * D;
                    const T* __restrict__ grow = sd.g + i * D;
                    T* __restrict__ orow = sd.dv != nullptr ? sd.dv + i * D : nullptr;
                    if (sd.x_half_g) {  // a probe's mu rows: ∂mu' and, in ∂Lc, its mu half and −G⊙(mu − m)
#pragma omp simd
                        for (int64_t k = 0; k < D; ++k) {
                            const T dvp = si * vprow[k] - grow[k];
                            if (orow != nullptr) orow[k] = dvp * l[k] + dsi * bb[k];
                            acc[k] += (vrow[k] - mm[k]) * (dvp - grow[k]);
                        }
                    } else if (orow != nullptr && acc != nullptr) {
#pragma omp simd
                        for (int64_t k = 0; k < D; ++k) {
                            const T dvp = si * vprow[k] - grow[k];
                            orow[k] = dvp * l[k] + dsi * bb[k];
                            acc[k] += (vrow[k] - mm[k]) * dvp;
                        }
                    } else if (orow != nullptr) {
#pragma omp simd
                        for (int64_t k = 0; k < D; ++k) orow[k] = (si * vprow[k] - grow[k]) * l[k] + dsi * bb[k];
                    } else if (acc != nullptr) {
#pragma omp simd
                        for (int64_t k = 0; k < D; ++k) acc[k] += (vrow[k] - mm[k]) * (si * vprow[k] - grow[k]);
                    }
                } else if (sd.x_half_rows) {  // a probe's x rows: rowsum(P)_b·(x_b − m)⊙x'_b
                    const T si = sd.scale[i];
                    const T* __restrict__ vprow = sd.vp + i * D;
#pragma omp simd
                    for (int64_t k = 0; k < D; ++k) acc[k] += (vrow[k] - mm[k]) * (si * vprow[k]);
                }
                if (accb != nullptr) {
#pragma omp simd
                    for (int64_t k = 0; k < D; ++k) accb[k] += dsi64 * (double(vrow[k]) - double(mm[k]));
                }
            }
        }
    });
    if (want_dlc) {
        T* dl = dlc.data_ptr<T>();
        for (int64_t ch = 0; ch < n_chunks; ++ch)
            for (int64_t k = 0; k < D; ++k) dl[k] += lc_part[ch * D + k];
        // A probe's near pairs: ∂x'_b's + p·diff' in the x half, and the pass's −G_mu,c⊙(mu_c − m)
        // took G_mu with their + p·diff' (for ∂mu'), which the x half's GEMM term does not have.
        if (probe) {
            const T *x_raw = raw.x.data_ptr<T>(), *mu_raw = raw.mu.data_ptr<T>();
            for_each_near_term(sums, D, [&](const NearTerm& t, const T* df) {
                const T *xb = x_raw + t.b * D, *mc = mu_raw + t.c * D;
                for (int64_t k = 0; k < D; ++k) dl[k] += ((xb[k] - mp[k]) + (mc[k] - mp[k])) * (T(t.p) * df[k]);
            });
        }
    }
    if (want_dbeta) {
        std::vector<double> x_sum(D, 0.0), mu_sum(D, 0.0);
        for (int64_t ch = 0; ch < n_chunks; ++ch) {
            double* total = chunks.side(ch) == 0 ? x_sum.data() : mu_sum.data();
            for (int64_t k = 0; k < D; ++k) total[k] += beta_part[ch * D + k];
        }
        for (int64_t k = 0; k < D; ++k) dbeta[k] += x_sum[k] + mu_sum[k];
    }
    return {dx, dmu};
}

// Backward (docs/design.md §2, the algorithm), with H = −γ·G, P = H/a, R = H·λ·s/r:
//   ∂x' = rowsum(P)·x' − P·mu',  ∂mu' = colsum(P)·mu' − Pᵀ·x'   (far pairs: two BLAS GEMMs)
//   ± P·diff' for the near pairs; ∂sx = rowsum(R), ∂smu = −colsum(R), ∂λ = Σ H·r, ∂γ = −Σ G·d,
// then the chain to the raw inputs: ∂x = ∂x'·Lcᵀ + ∂sx·betaᵀ, ∂mu likewise,
// ∂Lc = (x − m)ᵀ∂x' + (mu − m)ᵀ∂mu', ∂beta = Σ ∂sx_b·(x_b − m) + Σ ∂smu_c·(mu_c − m).
// d comes from the logits (d = −logits/γ: one rounding, so a = d − λ·r is within a few units of
// round-off of the forward's a wherever λ·r is not much larger than a, i.e. wherever the metric is
// a Randers metric, λ·|beta|_{Sigma⁻¹} < 1), and the near-pair test q = a² − eps < tau·(|x'|² +
// |mu'|²) picks the pairs recomputed from the raw difference. With γ = 0 the logits carry no d, and
// with a tiny γ they are subnormal: the distances are recomputed (one forward) then
// (distance_source). One pass, parallel over row tiles (backward_row_tile), writes P (far pairs;
// 0 at near pairs) into the backward's one [B, C] temporary; then the column sums, the gradient
// GEMMs, and the chain rule.
template <typename T>
std::vector<at::Tensor> logits_backward(const Operands<T>& in, const RawInputs& raw, const at::Tensor& grad,
                                        const at::Tensor& logits, double gamma, const GradMask& want) {
    const int64_t B = in.B, C = in.C, D = in.D;
    const auto opts = in.xp.options();
    const DistanceSource<T> dist = distance_source(in, logits, gamma);
    const T* G = grad.data_ptr<T>();
    const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);  // expanded grads (stride 0) are fine
    const T* L = dist.src.template data_ptr<T>();
    const int64_t ls0 = dist.src.stride(0), ls1 = dist.src.stride(1);

    PairSums<T> sums(B, C, opts);
    const BackwardScalars<T> k{T(gamma), T(in.lam), T(in.eps), T(in.tau), dist.scale};
    at::parallel_for(0, sums.n_bt, 1, [&](int64_t begin, int64_t end) {
        BackwardScratch<T> w(in.K);
        for (int64_t bt = begin; bt < end; ++bt) backward_row_tile(in, k, bt, G, gs0, gs1, L, ls0, ls1, sums, w);
    });

    at::Tensor dsmu = at::empty({C}, opts.dtype(at::kDouble));
    at::Tensor colsum_p = at::empty({C}, opts);
    column_sums(sums, C, colsum_p.data_ptr<T>(), dsmu.data_ptr<double>());
    // The chain to the raw inputs (x' = (x − m)·Lc, sx = x·beta, and the same for mu).
    const at::Tensor m = center_of<T>(raw.mu);
    at::Tensor dlc = want.lc ? at::zeros_like(raw.lc) : at::empty({0}, opts);
    const bool fold_x_side = !want.x && want.lc && B > D;  // a full factor's probe (the diagonal's: in its tail)
    std::vector<double> dbeta64(D, 0.0);
    at::Tensor dx, dmu;
    if (raw.lc.dim() == 1) {
        std::tie(dx, dmu) = diagonal_backward_tail(in, raw, m, sums, colsum_p, dsmu.data_ptr<double>(), dlc, dbeta64,
                                                   want);
    } else {
        at::Tensor dxp, dmup;
        if (fold_x_side)
            dmup = gradient_gemms_without_dxp(in, raw, m, sums, colsum_p, dlc);
        else
            std::tie(dxp, dmup) = gradient_gemms(in, sums, colsum_p, want.xp(), want.mup());
        dx = chain_rows<T>(raw, m, dxp, sums.dsx.template data_ptr<double>(), dlc, dbeta64, true, want.x,
                           want.lc && !fold_x_side, want.beta);
        dmu = chain_rows<T>(raw, m, dmup, dsmu.data_ptr<double>(), dlc, dbeta64, false, want.mu, want.lc, want.beta);
    }
    if (!want.x) dx = at::empty({0}, opts);
    if (!want.mu) dmu = at::empty({0}, opts);
    at::Tensor dbeta = at::empty({want.beta ? D : 0}, opts);
    if (want.beta)
        for (int64_t j = 0; j < D; ++j) dbeta.data_ptr<T>()[j] = T(dbeta64[j]);

    double dlam = 0, dgam = 0;
    for (int64_t bt = 0; bt < sums.n_bt; ++bt) {
        dlam += sums.dlam_part[bt];
        dgam += sums.dgam_part[bt];
    }
    const auto f64 = opts.dtype(at::kDouble);
    return {dx, dmu, dlc, dbeta, at::scalar_tensor(dlam, f64), at::scalar_tensor(dgam, f64)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_logits_backward_cpu(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc,
    const at::Tensor& beta, const at::Tensor& lam, const at::Tensor& gamma, const at::Tensor& xp, const at::Tensor& mup,
    const at::Tensor& sx, const at::Tensor& smu, double eps, double tau, int64_t grad_mask) {
    check_operands(x, mu, lc, beta, lam, gamma, /*allow_wide=*/true);
    const int64_t B = x.size(0), C = mu.size(0), K = lc.dim() == 2 ? lc.size(1) : x.size(1);
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == C, "grad must be [B, C]");
    TORCH_CHECK(logits.dim() == 2 && logits.size(0) == B && logits.size(1) == C, "logits must be [B, C]");
    TORCH_CHECK(xp.dim() == 2 && xp.size(0) == B && xp.size(1) == K && mup.dim() == 2 && mup.size(0) == C &&
                    mup.size(1) == K && xp.scalar_type() == x.scalar_type() &&
                    mup.scalar_type() == x.scalar_type(),
                "xp, mup must be the forward's x', mu'");
    TORCH_CHECK(sx.scalar_type() == at::kDouble && smu.scalar_type() == at::kDouble && sx.numel() == B &&
                    smu.numel() == C,
                "sx [B], smu [C] must be the forward's float64 projections");
    const RawInputs raw(x, mu, lc, beta);
    std::vector<at::Tensor> res;
    AT_DISPATCH_FLOATING_TYPES(raw.x.scalar_type(), "randers_logits_backward", [&] {
        if (B == 0 || C == 0) {
            res = {at::zeros_like(raw.x), at::zeros_like(raw.mu), at::zeros_like(raw.lc), at::zeros_like(raw.beta),
                   at::zeros({}, raw.x.options().dtype(at::kDouble)), at::zeros({}, raw.x.options().dtype(at::kDouble))};
            for (int64_t bit : {kGradX, kGradMu, kGradLc, kGradBeta})
                if (!wants_grad(grad_mask, bit)) res[bit] = at::empty({0}, res[bit].options());
            return;
        }
        const auto in = operands<scalar_t>(raw, xp.detach().contiguous(), mup.detach().contiguous(),
                                           sx.contiguous(), smu.contiguous(), lam.item<double>(), eps, tau);
        res = logits_backward<scalar_t>(in, raw, grad.to(raw.x.scalar_type()), logits.to(raw.x.scalar_type()),
                                        gamma.item<double>(), GradMask(grad_mask));
    });
    // ∂λ and ∂γ are scalar sums the pass computes anyway; the mask only decides what comes back.
    return {res[0], res[1], res[2], res[3], scalar_grad(res[kGradLam], lam, grad_mask, kGradLam),
            scalar_grad(res[kGradGamma], gamma, grad_mask, kGradGamma)};
}

// The autograd formula of faim_kernels/ops/contract.py, also in C++ for CPU tensors: the same
// saved tensors and the same backward op, minus the Python around them. Registered for the
// AutogradCPU key, which takes precedence over the Python formula's Autograd (alias) registration
// for CPU tensors; CUDA tensors keep the Python formula. Measured on one thread, a tiny problem
// (4 x 5 x 8, so overhead only): forward+backward through autograd 208 us with the Python formula,
// and this saves most of the 150 us that surround the two kernels' own 55 us.
class LogitsAutograd : public torch::autograd::Function<LogitsAutograd> {
   public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                  const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
                                                  const at::Tensor& lam, const at::Tensor& gamma, double eps,
                                                  double tau) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [logits, xp, mup, sx, smu] = call_logits(x, mu, lc, beta, lam, gamma, eps, tau);
        ctx->save_for_backward({logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["tau"] = tau;
        ctx->mark_non_differentiable({xp, mup, sx, smu});
        ctx->set_materialize_grads(false);
        return {logits, xp, mup, sx, smu};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        if (!grads[0].defined()) return torch::autograd::variable_list(8);
        const int64_t mask = needed_grad_mask(ctx);
        const LogitsGrads res = call_logits_backward(grads[0], ctx->get_saved_variables(),
                                                     ctx->saved_data["eps"].toDouble(),
                                                     ctx->saved_data["tau"].toDouble(), mask);
        auto [dx, dmu, dlc, dbeta, dlam, dgamma] = res;
        torch::autograd::variable_list out{dx, dmu, dlc, dbeta, dlam, dgamma, at::Tensor(), at::Tensor()};
        for (int64_t k = 0; k < kNumGrads; ++k)
            if (!wants_grad(mask, k)) out[k] = at::Tensor();  // unneeded: None, as the Python formula gives
        return out;
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_logits_autograd_cpu(
    const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta, const at::Tensor& lam,
    const at::Tensor& gamma, double eps, double tau) {
    const auto out = LogitsAutograd::apply(x, mu, lc, beta, lam, gamma, eps, tau);
    return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) {
    m.impl("randers_logits", &randers_logits_cpu);
    m.impl("randers_logits_backward", &randers_logits_backward_cpu);
    m.impl("randers_prototypes", &randers_prototypes_cpu);
    m.impl("randers_logits_prepared", &randers_logits_prepared_cpu);
}

TORCH_LIBRARY_IMPL(faim_kernels, AutogradCPU, m) {
    m.impl("randers_logits", &randers_logits_autograd_cpu);
}

}  // namespace faim_kernels
