// Fused Randers logits on the CPU (SPEC §2): logits = −γ·d from one tiled GEMM of x' against mu'
// with the epilogue applied while each tile is in cache, and the closed-form backward.
// Nothing of size [B, C, D] is formed; the forward allocates only its [B, C] output.
#include <torch/library.h>

#include "randers_common.h"

namespace faim_kernels {
namespace {

template <typename T>
void logits_forward(const RandersInputs<T>& in, double gamma, T* out) {
    const int64_t B = in.B, C = in.C, D = in.D;
    const int64_t n_ct = ceil_div(C, kTileC);
    const T neg_gamma = T(-gamma);
    at::parallel_for(0, ceil_div(B, kTileB) * n_ct, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> dots(kTileB * kTileC);
        std::vector<double> acc(D);
        RowTerms<T> w(kTileC);
        for (int64_t t = begin; t < end; ++t) {
            const int64_t b0 = (t / n_ct) * kTileB, c0 = (t % n_ct) * kTileC;
            const int64_t nb = std::min(kTileB, B - b0), nc = std::min(kTileC, C - c0);
            tile_dots(in, b0, nb, c0, nc, dots.data());
            for (int64_t i = 0; i < nb; ++i) {
                const int64_t b = b0 + i;
                row_terms(in, b, c0, nc, dots.data() + i * nc, w);
                T* row = out + b * C + c0;
                for (int64_t j = 0; j < nc; ++j) row[j] = neg_gamma * w.d[j];  // Eq. 3
                for (int64_t j = 0; j < nc; ++j)
                    if (w.near[j] != T(0)) row[j] = neg_gamma * pair_direct(in, b, c0 + j, acc.data(), (T*)nullptr).d;
            }
        }
    });
}

at::Tensor randers_logits_fwd_cpu(const at::Tensor& xp, const at::Tensor& mup, const at::Tensor& sx,
                                  const at::Tensor& smu, const at::Tensor& x, const at::Tensor& mu,
                                  const at::Tensor& lc, const at::Tensor& lam, const at::Tensor& gamma,
                                  double eps, double tau) {
    check_args(xp, mup, sx, smu, x, mu, lc, lam, gamma);
    at::Tensor out = at::empty({xp.size(0), mup.size(0)}, xp.options());
    if (out.numel() == 0) return out;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "randers_logits_fwd", [&] {
        const auto in = unpack<scalar_t>(xp, mup, sx, smu, x, mu, lc, lam, eps, tau);
        logits_forward<scalar_t>(in, gamma.item<double>(), out.data_ptr<scalar_t>());
    });
    return out;
}

// A pair recomputed from the raw difference: its ∂x', ∂mu' terms are added from diff' directly
// instead of through rowsum(P)·x' − P·mu', which cancels there (SPEC §2.1).
struct NearTerm {
    int64_t b, c;
    double p;
};

// Backward (SPEC §2): with H = −γ·G, P = H/a, R = H·λ·s/r,
//   ∂x' = rowsum(P)·x' − P·mu',  ∂mu' = colsum(P)·mu' − Pᵀ·x'  (far pairs, two BLAS GEMMs)
//   plus ±P·diff' for near pairs; ∂sx = rowsum(R), ∂smu = −colsum(R), ∂λ = Σ H·r, ∂γ = −Σ G·d.
// One pass, parallel over row tiles, recomputes each tile's GEMM and writes P (far pairs; 0 at
// near pairs) into the backward's one [B, C] temporary; colsum(R) is kept per row tile
// ([B/256, C] doubles) and summed in tile order, so results do not depend on thread timing.
template <typename T>
std::vector<at::Tensor> logits_backward(const RandersInputs<T>& in, const at::Tensor& grad, double gamma) {
    const int64_t B = in.B, C = in.C, D = in.D;
    const T* G = grad.data_ptr<T>();
    const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1);  // expanded grads (stride 0) are fine
    const auto opts = in.xp.options();
    at::Tensor P = at::empty({B, C}, opts);
    T* Pp = P.data_ptr<T>();
    at::Tensor row_p = at::empty({B}, opts);
    at::Tensor dsx = at::empty({B}, opts.dtype(at::kDouble));
    T* row_pp = row_p.data_ptr<T>();
    double* dsxp = dsx.data_ptr<double>();

    const int64_t n_bt = ceil_div(B, kTileBBackward);
    std::vector<double> dlam_part(n_bt, 0.0), dgam_part(n_bt, 0.0);
    std::vector<double> col_r(n_bt * C, 0.0);
    std::vector<std::vector<NearTerm>> near(n_bt);
    std::vector<std::vector<T>> near_diff(n_bt);
    const T g = T(gamma), lam = T(in.lam);

    at::parallel_for(0, n_bt, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> dots(kTileBBackward * kTileC), diffp(D), grow(kTileC);
        std::vector<double> acc(D);
        RowTerms<T> w(kTileC);
        for (int64_t bt = begin; bt < end; ++bt) {
            const int64_t b0 = bt * kTileBBackward, nb = std::min(kTileBBackward, B - b0);
            double dlam = 0, dgam = 0;
            std::vector<double> rp(nb, 0.0), rr(nb, 0.0);
            for (int64_t c0 = 0; c0 < C; c0 += kTileC) {
                const int64_t nc = std::min(kTileC, C - c0);
                tile_dots(in, b0, nb, c0, nc, dots.data());
                for (int64_t i = 0; i < nb; ++i) {
                    const int64_t b = b0 + i;
                    row_terms(in, b, c0, nc, dots.data() + i * nc, w);
                    const T* a = w.a.data();
                    const T* r = w.r.data();
                    const T* s = w.s.data();
                    const T* d = w.d.data();
                    const T* nr = w.near.data();
                    T* gr = grow.data();
                    T* prow = Pp + b * C + c0;
                    double* crow = col_r.data() + bt * C + c0;
                    for (int64_t j = 0; j < nc; ++j) gr[j] = G[b * gs0 + (c0 + j) * gs1];
                    double sum_p = 0, sum_r = 0, sum_hr = 0, sum_gd = 0;
#pragma omp simd reduction(+ : sum_p, sum_r, sum_hr, sum_gd)
                    for (int64_t j = 0; j < nc; ++j) {
                        const T H = -g * gr[j];
                        const T p = a[j] > T(0) ? H / a[j] : T(0);  // eps = 0 at an exact hit: subgradient 0
                        const T R = r[j] > T(0) ? H * lam * s[j] / r[j] : T(0);
                        const bool far = nr[j] == T(0);
                        prow[j] = far ? p : T(0);
                        crow[j] += R;
                        sum_p += far ? p : T(0);
                        sum_r += R;
                        sum_hr += H * r[j];
                        sum_gd += far ? gr[j] * d[j] : T(0);
                    }
                    for (int64_t j = 0; j < nc; ++j) {
                        if (nr[j] == T(0)) continue;
                        const Pair<T> pr = pair_direct(in, b, c0 + j, acc.data(), diffp.data());
                        const T p = pr.a > T(0) ? -g * gr[j] / pr.a : T(0);
                        sum_gd += double(gr[j]) * double(pr.d);
                        near[bt].push_back({b, c0 + j, double(p)});
                        near_diff[bt].insert(near_diff[bt].end(), diffp.begin(), diffp.end());
                    }
                    rp[i] += sum_p;
                    rr[i] += sum_r;
                    dlam += sum_hr;
                    dgam -= sum_gd;
                }
            }
            for (int64_t i = 0; i < nb; ++i) {
                row_pp[b0 + i] = T(rp[i]);
                dsxp[b0 + i] = rr[i];
            }
            dlam_part[bt] = dlam;
            dgam_part[bt] = dgam;
        }
    });

    at::Tensor dsmu = at::empty({C}, opts.dtype(at::kDouble));
    double* dsmup = dsmu.data_ptr<double>();
    at::parallel_for(0, C, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
            double total = 0;
            for (int64_t bt = 0; bt < n_bt; ++bt) total += col_r[bt * C + c];
            dsmup[c] = -total;
        }
    });

    // In place after each GEMM: no [C, D] temporary besides the result.
    at::Tensor dxp = at::mm(P, in.mup).neg_().addcmul_(row_p.unsqueeze(1), in.xp);
    at::Tensor dmup = at::mm(P.t(), in.xp).neg_().addcmul_(P.sum(0).unsqueeze(1), in.mup);
    P.reset();
    T* dx = dxp.data_ptr<T>();
    T* dm = dmup.data_ptr<T>();
    for (int64_t bt = 0; bt < n_bt; ++bt) {
        for (size_t n = 0; n < near[bt].size(); ++n) {
            const NearTerm& t = near[bt][n];
            const T* df = near_diff[bt].data() + n * D;
            for (int64_t k = 0; k < D; ++k) {
                dx[t.b * D + k] += T(t.p) * df[k];
                dm[t.c * D + k] -= T(t.p) * df[k];
            }
        }
    }
    double dlam = 0, dgam = 0;
    for (int64_t bt = 0; bt < n_bt; ++bt) {
        dlam += dlam_part[bt];
        dgam += dgam_part[bt];
    }
    const auto scalar_opts = opts.dtype(at::kDouble);
    return {dxp, dmup, dsx, dsmu, at::scalar_tensor(dlam, scalar_opts), at::scalar_tensor(dgam, scalar_opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> randers_logits_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& xp, const at::Tensor& mup, const at::Tensor& sx,
    const at::Tensor& smu, const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc,
    const at::Tensor& lam, const at::Tensor& gamma, double eps, double tau) {
    check_args(xp, mup, sx, smu, x, mu, lc, lam, gamma);
    TORCH_CHECK(grad.dim() == 2 && grad.size(0) == xp.size(0) && grad.size(1) == mup.size(0),
                "grad must be [B, C]");
    const at::Tensor g = grad.to(xp.scalar_type());
    std::vector<at::Tensor> res;
    AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "randers_logits_bwd", [&] {
        const auto in = unpack<scalar_t>(xp, mup, sx, smu, x, mu, lc, lam, eps, tau);
        res = logits_backward<scalar_t>(in, g, gamma.item<double>());
    });
    return {res[0], res[1], res[2], res[3], res[4].to(lam.scalar_type()), res[5].to(gamma.scalar_type())};
}

}  // namespace

TORCH_LIBRARY(faim_kernels, m) {
    m.def("randers_logits_fwd(Tensor xp, Tensor mup, Tensor sx, Tensor smu, Tensor x, Tensor mu, Tensor lc, "
          "Tensor lam, Tensor gamma, float eps, float tau) -> Tensor");
    m.def("randers_logits_bwd(Tensor grad, Tensor xp, Tensor mup, Tensor sx, Tensor smu, Tensor x, Tensor mu, "
          "Tensor lc, Tensor lam, Tensor gamma, float eps, float tau) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) {
    m.impl("randers_logits_fwd", &randers_logits_fwd_cpu);
    m.impl("randers_logits_bwd", &randers_logits_bwd_cpu);
}

}  // namespace faim_kernels
