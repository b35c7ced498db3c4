// Pieces shared by the fused CPU kernels (randers_logits.cpp, randers_cross_entropy.cpp):
// tiling, the row norms, the per-pair epilogue, and the exact recomputation of near pairs.
// The math is SPEC §1-2; the exactness rule is SPEC §2.1.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
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

// Everything a kernel needs about the transformed inputs (see faim_kernels/transform.py).
template <typename T>
struct RandersInputs {
    at::Tensor xp, mup;         // [B, D], [C, D] x', mu' (contiguous, T)
    const double* sx;           // [B] x·beta (float64)
    const double* smu;          // [C] mu·beta
    const T* x;                 // [B, D] raw x: near-pair hint
    const T* mu;                // [C, D] raw mu
    const T* lc;                // [D] or [D, D] metric factor
    bool full;                  // lc is [D, D]
    std::vector<T> xnorm, munorm;  // |x'_b|², |mu'_c|²
    int64_t B, C, D;
    double lam, eps, tau;
};

template <typename T>
std::vector<T> row_sq_norms(const at::Tensor& v) {
    const int64_t n = v.size(0), D = v.size(1);
    const T* p = v.data_ptr<T>();
    std::vector<T> out(n);
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
            double acc = 0;
            for (int64_t k = 0; k < D; ++k) acc += double(p[i * D + k]) * double(p[i * D + k]);
            out[i] = T(acc);
        }
    });
    return out;
}

// Checks and unpacks the op's arguments (the schema is in randers_logits.cpp).
template <typename T>
RandersInputs<T> unpack(const at::Tensor& xp, const at::Tensor& mup, const at::Tensor& sx,
                        const at::Tensor& smu, const at::Tensor& x, const at::Tensor& mu,
                        const at::Tensor& lc, const at::Tensor& lam, double eps, double tau) {
    RandersInputs<T> in;
    in.B = xp.size(0);
    in.C = mup.size(0);
    in.D = xp.size(1);
    // Detached: the tiles' GEMMs run on worker threads, which do not inherit the dispatcher's
    // below-autograd state, and an input that requires grad would make at::mm_out refuse.
    in.xp = xp.detach().contiguous();
    in.mup = mup.detach().contiguous();
    in.sx = sx.data_ptr<double>();
    in.smu = smu.data_ptr<double>();
    in.x = x.data_ptr<T>();
    in.mu = mu.data_ptr<T>();
    in.lc = lc.data_ptr<T>();
    in.full = lc.dim() == 2;
    in.xnorm = row_sq_norms<T>(in.xp);
    in.munorm = row_sq_norms<T>(in.mup);
    in.lam = lam.item<double>();
    in.eps = eps;
    in.tau = tau;
    return in;
}

inline void check_args(const at::Tensor& xp, const at::Tensor& mup, const at::Tensor& sx,
                       const at::Tensor& smu, const at::Tensor& x, const at::Tensor& mu,
                       const at::Tensor& lc, const at::Tensor& lam, const at::Tensor& gamma) {
    TORCH_CHECK(xp.dim() == 2 && mup.dim() == 2 && xp.size(1) == mup.size(1),
                "xp [B, D] and mup [C, D] must share D");
    TORCH_CHECK(xp.scalar_type() == at::kFloat || xp.scalar_type() == at::kDouble,
                "the CPU kernel computes in float32 or float64, got ", xp.scalar_type());
    for (const at::Tensor* t : {&mup, &x, &mu, &lc})
        TORCH_CHECK(t->scalar_type() == xp.scalar_type(), "all tensors must share xp's dtype");
    TORCH_CHECK(x.sizes() == xp.sizes() && mu.sizes() == mup.sizes(), "x, mu must match xp, mup");
    TORCH_CHECK(x.is_contiguous() && mu.is_contiguous() && lc.is_contiguous(), "x, mu, lc must be contiguous");
    TORCH_CHECK((lc.dim() == 1 && lc.size(0) == xp.size(1)) ||
                    (lc.dim() == 2 && lc.size(0) == xp.size(1) && lc.size(1) == xp.size(1)),
                "lc must be [D] or [D, D]");
    TORCH_CHECK(sx.scalar_type() == at::kDouble && smu.scalar_type() == at::kDouble &&
                    sx.is_contiguous() && smu.is_contiguous(),
                "sx, smu must be contiguous float64");
    TORCH_CHECK(sx.numel() == xp.size(0) && smu.numel() == mup.size(0), "sx [B], smu [C]");
    TORCH_CHECK(lam.numel() == 1 && gamma.numel() == 1, "lam and gamma must be 0-dim tensors");
    for (const at::Tensor* t : {&xp, &mup, &sx, &smu, &x, &mu, &lc})
        TORCH_CHECK(t->device().is_cpu(), "the C++ kernel takes CPU tensors");
}

// q = |diff'|² with diff' = (x_b − mu_c)·Lc formed from the raw inputs: x_b − mu_c is nearly
// exact when the pair is close, which is exactly when the GEMM expansion is not (SPEC §2.1).
// O(D) for a diagonal factor, O(D²) for a full one; run only for the pairs at risk.
// diffp (optional) receives diff'; acc is scratch of D doubles.
template <typename T>
double direct_q(const RandersInputs<T>& in, int64_t b, int64_t c, double* acc, T* diffp) {
    const int64_t D = in.D;
    const T* xb = in.x + b * D;
    const T* mc = in.mu + c * D;
    double q = 0;
    if (!in.full) {
        for (int64_t k = 0; k < D; ++k) {
            const double v = (double(xb[k]) - double(mc[k])) * double(in.lc[k]);
            if (diffp) diffp[k] = T(v);
            q += v * v;
        }
        return q;
    }
    for (int64_t j = 0; j < D; ++j) acc[j] = 0;
    for (int64_t k = 0; k < D; ++k) {  // diff'_j = Σ_k diff_k·Lc[k, j], row by row of Lc
        const double dk = double(xb[k]) - double(mc[k]);
        if (dk == 0) continue;
        const T* row = in.lc + k * D;
        for (int64_t j = 0; j < D; ++j) acc[j] += dk * double(row[j]);
    }
    for (int64_t j = 0; j < D; ++j) {
        if (diffp) diffp[j] = T(acc[j]);
        q += acc[j] * acc[j];
    }
    return q;
}

// The per-pair quantities of SPEC §1.
template <typename T>
struct Pair {
    T a;       // sqrt(q + eps)
    T r;       // sqrt(s² + eps)
    T s;       // beta·(x_b − mu_c)
    T d;       // a + lam·r
    bool near; // recomputed from the raw difference
};

// A pair through the direct path (SPEC §2.1): q from the raw difference, never the expansion.
template <typename T>
inline Pair<T> pair_direct(const RandersInputs<T>& in, int64_t b, int64_t c, double* acc, T* diffp) {
    Pair<T> p;
    p.near = true;
    const T q = T(direct_q(in, b, c, acc, diffp));
    p.a = std::sqrt(q + T(in.eps));
    p.s = T(in.sx[b] - in.smu[c]);  // float64 difference: no cancellation
    p.r = std::sqrt(p.s * p.s + T(in.eps));
    p.d = p.a + T(in.lam) * p.r;
    return p;
}

// One pair from its GEMM entry dot = x'_b·mu'_c, through the direct path when it is at risk.
template <typename T>
inline Pair<T> pair_from_dot(const RandersInputs<T>& in, int64_t b, int64_t c, T dot, double* acc, T* diffp) {
    const T norms = in.xnorm[b] + in.munorm[c];
    T q = norms - T(2) * dot;
    if (q < T(in.tau) * norms) return pair_direct(in, b, c, acc, diffp);  // false for NaN: NaN flows on
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
// the compiler vectorises (-O3 -fno-math-errno): about 3x faster than pair by pair. Pairs at
// risk are only flagged in `near`; their a and d here come from the expansion and the caller
// replaces them through pair_direct.
template <typename T>
struct RowTerms {
    std::vector<T> a, r, s, d;
    std::vector<T> near;  // 1 where the pair is at risk, else 0 (T, not bool: one type per loop vectorises)
    explicit RowTerms(int64_t n) : a(n), r(n), s(n), d(n), near(n) {}
};

template <typename T>
void row_terms(const RandersInputs<T>& in, int64_t b, int64_t c0, int64_t nc, const T* dots, RowTerms<T>& w) {
    const T xn = in.xnorm[b], eps = T(in.eps), tau = T(in.tau), lam = T(in.lam);
    const double sxb = in.sx[b];
    const T* mn = in.munorm.data() + c0;
    const double* smu = in.smu + c0;
    T* __restrict__ a = w.a.data();
    T* __restrict__ r = w.r.data();
    T* __restrict__ s = w.s.data();
    T* __restrict__ d = w.d.data();
    T* __restrict__ near = w.near.data();
    for (int64_t j = 0; j < nc; ++j) {
        const T norms = xn + mn[j];
        T q = norms - T(2) * dots[j];
        near[j] = q < tau * norms ? T(1) : T(0);
        q = q < T(0) ? T(0) : q;
        a[j] = std::sqrt(q + eps);
    }
    for (int64_t j = 0; j < nc; ++j) s[j] = T(sxb - smu[j]);  // float64 difference: no cancellation
    for (int64_t j = 0; j < nc; ++j) {
        r[j] = std::sqrt(s[j] * s[j] + eps);
        d[j] = a[j] + lam * r[j];
    }
}

// dots[0:nb, 0:nc] = x'[b0:b0+nb] · mu'[c0:c0+nc]ᵀ through ATen's BLAS, into a caller's buffer.
template <typename T>
void tile_dots(const RandersInputs<T>& in, int64_t b0, int64_t nb, int64_t c0, int64_t nc, T* buffer) {
    at::Tensor out = at::from_blob(buffer, {nb, nc}, in.xp.options());
    at::mm_out(out, in.xp.narrow(0, b0, nb), in.mup.narrow(0, c0, nc).t());
}

}  // namespace faim_kernels
