// The FAIMHead's metric operands from its raw parameters, in one op (CPU):
//   faim_kernels::head_metric(sigma, lmbda, scale, full, eps, wide=False, through_gram=False)
//       -> (lc, lam, gamma, factor64)
//     full = false: sigma = log_sigma_diag [D],  lc = sqrt(exp(sigma) + eps)          (Sigma = diag(lc²))
//     full = true:  sigma = L [D, D],            lc = cholesky(tril(L)·tril(L)ᵀ + eps·I), formed in float64
//     full, wide:   sigma = L [D, D],            lc = [tril(L) | sqrt(eps)·I]  [D, 2D]  (lc·lcᵀ = Sigma too)
//     lam = |lmbda|, gamma = |scale|, with the derivative of |v| taken as +1 at v = 0 (so a head
//     started at λ = 0 can learn λ; faim_kernels/nn/head.py).
// through_gram (full, not wide): the caller promises that whatever consumes lc depends on it only
// through lc·lcᵀ (FAIMHead's logits and cross-entropy ops: q = |(x − mu)·lc|²), which allows the
// cheaper backward of gram_backward_loops below; the default backward is the Cholesky's own, exact
// for any consumer.
// lc comes in the compute dtype (float64 for float64 parameters, else float32), lam and gamma in
// the parameters' dtype; factor64 is the float64 Cholesky factor (full; empty for the diagonal), which
// the backward reuses instead of factorising again. Why an op: the head's forward used to form these with ~12 small ATen ops
// and as many autograd nodes, which cost more than the fused logits themselves on a small head
// (docs/usage.md, "What a module call costs"). The schema and fake kernel are in ops/contract.py; the
// Python composite (faim_kernels/nn/head.py, _MetricParams.metric_args) is the oracle in the tests
// and serves other devices.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

#include "randers_common.h"  // call_logits, call_logits_backward

namespace faim_kernels {
namespace {

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Up to this D the Cholesky factor and its own backward run as plain float64 loops here; above it,
// through ATen (LAPACK). (The through_gram backward has its own bound, below.) Why: at a small head's D the ~15 ATen calls of the factorisation and its
// backward (eye, addmm, cholesky, two triangular solves, matmuls, trils, casts) cost several times
// their ~1.5·D³ multiply-adds, and they were most of a full-Σ training step at (64, 10, 64)
// (bench/head_breakdown.py). Above the cutoff LAPACK's blocked kernels win (bench/RESULTS.md, the
// head_metric timing).
constexpr int64_t LOOP_CHOLESKY_MAX_D = 128;

// The through_gram backward (one triangular solve and one product, ~0.8·D³) is three ATen calls,
// so its loops pay only below this D. Measured on 2 threads (Intel Xeon, MKL), loops against ATen,
// the backward alone: 7 against 15 µs at D = 16, ~14 against 18 at D = 32, 32 against 30 at
// D = 48, 62 against 39 at D = 64, 360 against 105 at D = 128 (the loops' solve runs ~3 GMAC/s,
// MKL's blocked trsm several times that). At (256, 1000, 128) that was a fifth of a full head's
// training step.
constexpr int64_t LOOP_GRAM_BACKWARD_MAX_D = 48;

const char* NON_FINITE_L = "L holds non-finite values (NaN or Inf): Sigma = L Lᵀ + eps·I cannot be factorised";
const char* NOT_POSITIVE_DEFINITE =
    "Sigma = L Lᵀ + eps·I is not positive definite in float64 (eps = 0 with a singular L?): use eps > 0";

double dot(const double* a, const double* b, int64_t n) {
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
    return s;
}

// lc = cholesky(A·Aᵀ + eps·I) with A = tril(L) [D, D] float64 row-major (both contiguous), by rows
// (Cholesky–Banachiewicz): every inner product runs over two contiguous row prefixes.
void cholesky_of_gram(const double* A, double eps, int64_t D, double* lc) {
    for (int64_t i = 0; i < D; ++i) {
        for (int64_t j = 0; j <= i; ++j) {
            // (A·Aᵀ)_ij = Σ_{k ≤ j} A_ik·A_jk (A lower triangular, j ≤ i)
            double s = dot(A + i * D, A + j * D, j + 1) + (i == j ? eps : 0.0) - dot(lc + i * D, lc + j * D, j);
            if (i == j) {
                TORCH_CHECK_VALUE(s > 0.0, NOT_POSITIVE_DEFINITE);  // also catches NaN
                lc[i * D + i] = std::sqrt(s);
            } else {
                lc[i * D + j] = s / lc[j * D + j];
            }
        }
        for (int64_t j = i + 1; j < D; ++j) lc[i * D + j] = 0.0;
    }
}

// Solves lcᵀ·Y = B in place (B [D, D] row-major becomes Y), lc lower triangular: back substitution
// by rows, each step an axpy over a whole row of Y.
void solve_upper_transposed(const double* lc, int64_t D, double* B) {
    for (int64_t i = D - 1; i >= 0; --i) {
        double* yi = B + i * D;
        for (int64_t k = i + 1; k < D; ++k) {
            const double c = lc[k * D + i];  // (lcᵀ)_ik
            const double* yk = B + k * D;
#pragma omp simd
            for (int64_t j = 0; j < D; ++j) yi[j] -= c * yk[j];
        }
        const double inv = 1.0 / lc[i * D + i];
#pragma omp simd
        for (int64_t j = 0; j < D; ++j) yi[j] *= inv;
    }
}

at::Tensor tril_product(const double* M, const double* AT, int64_t D, const at::TensorOptions& options);

// ∂A = tril((G + Gᵀ)·A) with G = lc⁻ᵀ·Φ(lcᵀ·∂lc)·lc⁻¹ (the backward below), all float64 [D, D].
at::Tensor cholesky_of_gram_backward_loops(const at::Tensor& A, const at::Tensor& lc, const at::Tensor& grad) {
    const int64_t D = A.size(0);
    const at::Tensor lcT = lc.t().contiguous(), gT = grad.t().contiguous(), AT = A.t().contiguous();
    const double *pl = lc.data_ptr<double>(), *plT = lcT.data_ptr<double>(), *pgT = gT.data_ptr<double>(),
                 *pAT = AT.data_ptr<double>();
    at::Tensor work = at::empty({D, D}, A.options());
    double* w = work.data_ptr<double>();
    // Φ = tril(lcᵀ·∂lc) with its diagonal halved: Φ_ij = Σ_{k ≥ i} lc_ki·∂lc_kj (lc_ki = 0 for k < i).
    for (int64_t i = 0; i < D; ++i) {
        for (int64_t j = 0; j <= i; ++j) w[i * D + j] = dot(plT + i * D + i, pgT + j * D + i, D - i);
        w[i * D + i] *= 0.5;
        for (int64_t j = i + 1; j < D; ++j) w[i * D + j] = 0.0;
    }
    solve_upper_transposed(pl, D, w);  // X = lc⁻ᵀ·Φ
    at::Tensor XT = work.t().contiguous();
    double* xt = XT.data_ptr<double>();
    solve_upper_transposed(pl, D, xt);  // Gᵀ = lc⁻ᵀ·Xᵀ, i.e. G = X·lc⁻¹
    // M = G + Gᵀ, symmetric (xt holds Gᵀ)
    for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j <= i; ++j) w[i * D + j] = w[j * D + i] = xt[i * D + j] + xt[j * D + i];
    return tril_product(w, pAT, D, A.options());
}

// ∂A = tril(M·A) for a symmetric M [D, D] and A lower triangular (AT = Aᵀ, contiguous): ∂A_ij =
// Σ_{k ≥ j} M_ik·A_kj for j ≤ i, 0 above the diagonal. float64.
at::Tensor tril_product(const double* M, const double* AT, int64_t D, const at::TensorOptions& options) {
    at::Tensor dA = at::zeros({D, D}, options);
    double* pd = dA.data_ptr<double>();
    for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j <= i; ++j) pd[i * D + j] = dot(M + i * D + j, AT + j * D + j, D - j);
    return dA;
}

// The backward for a consumer of lc that depends on it only through Sigma = lc·lcᵀ (through_gram):
// then ∂lc = (∂Sigma + ∂Sigmaᵀ)·lc, so ∂Sigma's symmetric part is ½·∂lc·lc⁻¹, one triangular solve,
// and ∂A = tril((X + Xᵀ)/2·A) with X = ∂lc·lc⁻¹ (docs/design.md §2.4). About 0.8·D³ multiply-adds
// against the Cholesky backward's 1.5·D³ (a second solve and Φ = tril(lcᵀ·∂lc)); the two agree to
// rounding for such a consumer (tests/test_nn_head_paths.py). All float64 [D, D].
at::Tensor gram_backward_loops(const at::Tensor& A, const at::Tensor& lc, const at::Tensor& grad) {
    const int64_t D = A.size(0);
    const at::Tensor AT = A.t().contiguous();
    at::Tensor Y = grad.t().contiguous();  // ∂lcᵀ, solved in place into Xᵀ = lc⁻ᵀ·∂lcᵀ
    double* y = Y.data_ptr<double>();
    solve_upper_transposed(lc.data_ptr<double>(), D, y);
    at::Tensor Msym = at::empty({D, D}, A.options());
    double* w = Msym.data_ptr<double>();
    for (int64_t i = 0; i < D; ++i)
        for (int64_t j = 0; j <= i; ++j) w[i * D + j] = w[j * D + i] = 0.5 * (y[i * D + j] + y[j * D + i]);
    return tril_product(w, AT.data_ptr<double>(), D, A.options());
}

// Sigma = tril(L)·tril(L)ᵀ + eps·I and its Cholesky factor, float64 (A = tril(L), lc); the same
// checks (and messages) as faim_kernels/transform.py metric_factor.
std::pair<at::Tensor, at::Tensor> full_factor(const at::Tensor& L, double eps) {
    const int64_t D = L.size(0);
    if (D <= LOOP_CHOLESKY_MAX_D) {
        const at::Tensor L64 = L.detach().to(at::kDouble).contiguous();
        const double* pl = L64.data_ptr<double>();
        at::Tensor A = at::empty({D, D}, L64.options()), factor = at::empty({D, D}, L64.options());
        double* pa = A.data_ptr<double>();
        for (int64_t i = 0; i < D; ++i)
            for (int64_t j = 0; j < D; ++j) {
                TORCH_CHECK_VALUE(std::isfinite(pl[i * D + j]), NON_FINITE_L);
                pa[i * D + j] = j <= i ? pl[i * D + j] : 0.0;
            }
        cholesky_of_gram(pa, eps, D, factor.data_ptr<double>());
        return {A, factor};
    }
    const at::Tensor A = L.detach().to(at::kDouble).tril().contiguous();
    const at::Tensor sigma = at::addmm(at::eye(D, A.options()), A, A.t(), /*beta=*/eps, /*alpha=*/1.0);
    auto [factor, info] = at::linalg_cholesky_ex(sigma);
    TORCH_CHECK_VALUE(at::isfinite(L).all().item<bool>(), NON_FINITE_L);
    TORCH_CHECK_VALUE(info.item<int64_t>() == 0, NOT_POSITIVE_DEFINITE);
    return {A, factor};
}

// The wide factor [tril(L) | sqrt(eps)·I] [D, 2D] in dtype ct: no factorisation, so no D³ work in the
// forward or the backward, at the price of x' and mu' twice as wide (a GEMM of width 2D in the logits
// op). FAIMHead takes it where B and C are small against D (docs/design.md §2.4, Eq. 23).
// sqrt(eps) is rounded once to ct: Sigma's ridge is eps·(1 + 2u) instead of eps.
// L is read in its own dtype (no float64 copy: each entry is exact in double, and the factor is
// tril(L) itself, rounded once to ct).
at::Tensor wide_factor(const at::Tensor& L, double eps, at::ScalarType ct) {
    const int64_t D = L.size(0);
    const at::Tensor Lc = L.detach().contiguous();
    at::Tensor lc = at::zeros({D, 2 * D}, L.options().dtype(ct));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, Lc.scalar_type(), "head_metric_wide", [&] {
        const scalar_t* pl = Lc.data_ptr<scalar_t>();
        auto fill = [&](auto* out) {
            using out_t = std::remove_pointer_t<decltype(out)>;
            const out_t ridge = out_t(std::sqrt(eps));
            for (int64_t i = 0; i < D; ++i) {
                for (int64_t j = 0; j < D; ++j) {
                    const double v = double(pl[i * D + j]);
                    TORCH_CHECK_VALUE(std::isfinite(v), NON_FINITE_L);
                    if (j <= i) out[i * 2 * D + j] = out_t(v);
                }
                out[i * 2 * D + D + i] = ridge;
            }
        };
        if (ct == at::kDouble)
            fill(lc.data_ptr<double>());
        else
            fill(lc.data_ptr<float>());
    });
    return lc;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_metric_cpu(const at::Tensor& sigma, const at::Tensor& lmbda,
                                                               const at::Tensor& scale, bool full, double eps, bool wide,
                                                               bool through_gram) {
    TORCH_CHECK(lmbda.dim() == 0 && scale.dim() == 0, "lmbda and scale must be 0-dim tensors");
    TORCH_CHECK(sigma.dim() == (full ? 2 : 1), "sigma must be L [D, D] (full) or log_sigma_diag [D]");
    TORCH_CHECK(!wide || (full && eps > 0), "wide takes a full L and eps > 0 (with eps = 0 the Cholesky factor is as cheap to use)");
    // lam and gamma reach every pair: NaN or Inf there is an error (as the functional API's check),
    // not a matrix of NaN. Reading them is free on the CPU.
    const double lam_value = lmbda.item<double>(), gamma_value = scale.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(lam_value), "lam must be >= 0 and finite, got ", std::abs(lam_value));
    TORCH_CHECK_VALUE(std::isfinite(gamma_value), "gamma must be finite, got ", std::abs(gamma_value));
    const at::ScalarType ct = compute_type(sigma.scalar_type());
    // Plain loops and scalar results rather than ATen calls: on a small head each ATen call here
    // costs about as much as its arithmetic.
    auto scalar = [](const at::Tensor& like, double v) { return at::scalar_tensor(v, like.options()); };
    if (full && wide)
        return {wide_factor(sigma, eps, ct), scalar(lmbda, std::abs(lam_value)), scalar(scale, std::abs(gamma_value)),
                at::empty({0}, sigma.options().dtype(at::kDouble))};
    if (full) {
        at::Tensor factor = full_factor(sigma, eps).second.contiguous();
        return {factor.to(ct).clone(), scalar(lmbda, std::abs(lam_value)), scalar(scale, std::abs(gamma_value)),
                factor};
    }
    // Read in the parameter's own dtype (no float64 copy of it), each element widened to double.
    const at::Tensor v = sigma.detach().contiguous();
    at::Tensor lc = at::empty({v.size(0)}, sigma.options().dtype(ct));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "head_metric", [&] {
        const scalar_t* vp = v.data_ptr<scalar_t>();
        if (ct == at::kDouble) {
            double* out = lc.data_ptr<double>();
            for (int64_t k = 0; k < v.size(0); ++k) out[k] = std::sqrt(std::exp(double(vp[k])) + eps);
        } else {
            float* out = lc.data_ptr<float>();
            for (int64_t k = 0; k < v.size(0); ++k) out[k] = float(std::sqrt(std::exp(double(vp[k])) + eps));
        }
    });
    return {lc, scalar(lmbda, std::abs(lam_value)), scalar(scale, std::abs(gamma_value)),
            at::empty({0}, sigma.options().dtype(at::kDouble))};
}

// ∂sigma (the raw metric parameter: L, or log_sigma_diag) from ∂lc, for lc = head_metric's first output:
// the wide factor's tril(∂lc[:, :D]), the full factor's Cholesky backward (or its through_gram form),
// or the diagonal's ∂lc·e/(2·sqrt(e + eps)), e = exp(log σ). factor64: the forward's float64 Cholesky
// factor (full, not wide). Shared by head_metric's backward and head_logits' (below).
at::Tensor metric_parameter_grad(const at::Tensor& sigma, const at::Tensor& factor64, const at::Tensor& grad, bool full,
                                 bool wide, bool through_gram, double eps) {
    const at::Tensor& Lc = factor64;
    at::Tensor dsigma;
    if (full && wide) {
        // lc = [tril(L) | sqrt(eps)·I]: ∂L = tril(∂lc[:, :D]), one copy in the gradient's dtype (the
        // ridge block takes no gradient).
        const at::Tensor gc = grad.contiguous();
        const int64_t D = gc.size(0);
        at::Tensor out = at::zeros({D, D}, gc.options());
        AT_DISPATCH_FLOATING_TYPES(gc.scalar_type(), "head_metric_wide_backward", [&] {
            const scalar_t* gp = gc.data_ptr<scalar_t>();
            scalar_t* op = out.data_ptr<scalar_t>();
            for (int64_t i = 0; i < D; ++i)
                for (int64_t j = 0; j <= i; ++j) op[i * D + j] = gp[i * 2 * D + j];
        });
        dsigma = out.to(sigma.scalar_type());
    } else {
        const at::Tensor g = grad.to(at::kDouble);
        // A = tril(L) in float64, for either full backward
        const at::Tensor A = full ? sigma.detach().to(at::kDouble).tril().contiguous() : at::Tensor();
        if (full && through_gram) {
            if (A.size(0) <= LOOP_GRAM_BACKWARD_MAX_D) {
                dsigma = gram_backward_loops(A, Lc.contiguous(), g.contiguous()).to(sigma.scalar_type());
            } else {
                // X = ∂lc·Lc⁻¹, as Xᵀ = Lc⁻ᵀ·∂lcᵀ (an upper solve); ∂A = tril((X + Xᵀ)/2·A).
                const at::Tensor XT = at::linalg_solve_triangular(Lc.t(), g.t(), /*upper=*/true);
                dsigma = at::matmul((XT + XT.t()) * 0.5, A).tril().to(sigma.scalar_type());
            }
        } else if (full) {
            if (A.size(0) <= LOOP_CHOLESKY_MAX_D) {
                dsigma = cholesky_of_gram_backward_loops(A, Lc.contiguous(), g.contiguous()).to(sigma.scalar_type());
            } else {
                at::Tensor phi = at::matmul(Lc.t(), g).tril();
                phi.diagonal().mul_(0.5);
                // G = Lc⁻ᵀ·Φ·Lc⁻¹: X = Lc⁻ᵀ·Φ (an upper solve), then G = X·Lc⁻¹ = (Lc⁻ᵀ·Xᵀ)ᵀ.
                const at::Tensor X = at::linalg_solve_triangular(Lc.t(), phi, /*upper=*/true);
                const at::Tensor G = at::linalg_solve_triangular(Lc.t(), X.t(), /*upper=*/true).t();
                dsigma = at::matmul(G + G.t(), A).tril().to(sigma.scalar_type());
            }
        } else {
            // ∂log σ_k = ∂lc_k·e_k / (2·sqrt(e_k + eps)), e = exp(log σ): one float64 loop, not the
            // seven ATen ops (and their allocations) of the expression, a tenth of a small head's step.
            const at::Tensor v = sigma.detach().contiguous(), gc = g.contiguous();
            dsigma = at::empty({v.size(0)}, v.options());
            const double* gp = gc.data_ptr<double>();
            AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "head_metric_backward", [&] {
                const scalar_t* vp = v.data_ptr<scalar_t>();
                scalar_t* out = dsigma.data_ptr<scalar_t>();
                for (int64_t k = 0; k < v.size(0); ++k) {
                    const double e = std::exp(double(vp[k]));
                    out[k] = scalar_t(gp[k] * e / (2.0 * std::sqrt(e + eps)));
                }
            });
        }
    }
    return dsigma;
}

// d|v|/dv = +1 for v >= 0 (1 at 0, where |v| is not differentiable), −1 below (and for NaN): the
// incoming gradient itself or its negation, one op at most.
at::Tensor through_abs(const at::Tensor& grad, const at::Tensor& v) {
    return v.detach().item<double>() >= 0 ? grad : grad.neg();
}

// head_metric through the dispatcher, not as a direct call: modes and tracing see one op, and under
// FakeTensor (torch.compile, opcheck) the fake kernel answers (a direct call would read values that
// fake tensors do not have). Used by head_metric's autograd formula and by head_logits.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_head_metric(const at::Tensor& sigma,
                                                                            const at::Tensor& lmbda,
                                                                            const at::Tensor& scale, bool full,
                                                                            double eps, bool wide, bool through_gram) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("faim_kernels::head_metric", "")
                         .typed<decltype(head_metric_cpu)>();
    return op.call(sigma, lmbda, scale, full, eps, wide, through_gram);
}

// Backward: ∂log_sigma_diag = ∂lc·exp(v)/(2·lc); for the full factor, the Cholesky backward
// (Murray 2016, as PyTorch's own): with Φ(X) = tril(X) with its diagonal halved,
// ∂Sigma = ½(G + Gᵀ), G = Lc⁻ᵀ·Φ(Lcᵀ·∂Lc)·Lc⁻¹, then ∂L = tril(2·∂Sigma·tril(L)). All in float64.
class HeadMetric : public torch::autograd::Function<HeadMetric> {
   public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& sigma,
                                                  const at::Tensor& lmbda, const at::Tensor& scale, bool full,
                                                  double eps, bool wide, bool through_gram) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [lc, lam, gamma, factor64] = call_head_metric(sigma, lmbda, scale, full, eps, wide, through_gram);
        ctx->save_for_backward({sigma, lmbda, scale, factor64});
        ctx->mark_non_differentiable({factor64});
        ctx->saved_data["full"] = full;
        ctx->saved_data["wide"] = wide;
        ctx->saved_data["through_gram"] = through_gram;
        ctx->saved_data["eps"] = eps;
        ctx->set_materialize_grads(false);
        return {lc, lam, gamma, factor64};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const at::Tensor &sigma = saved[0], &lmbda = saved[1], &scale = saved[2], &Lc = saved[3];
        const bool full = ctx->saved_data["full"].toBool();
        const double eps = ctx->saved_data["eps"].toDouble();
        at::Tensor dsigma, dlmbda, dscale;
        if (grads[0].defined() && ctx->needs_input_grad(0))
            dsigma = metric_parameter_grad(sigma, Lc, grads[0], full, ctx->saved_data["wide"].toBool(),
                                           ctx->saved_data["through_gram"].toBool(), eps);
        if (grads[1].defined() && ctx->needs_input_grad(1)) dlmbda = through_abs(grads[1], lmbda);
        if (grads[2].defined() && ctx->needs_input_grad(2)) dscale = through_abs(grads[2], scale);
        return {dsigma, dlmbda, dscale, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};  // none from factor64
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_metric_autograd_cpu(
    const at::Tensor& sigma, const at::Tensor& lmbda, const at::Tensor& scale, bool full, double eps, bool wide,
    bool through_gram) {
    const auto out = HeadMetric::apply(sigma, lmbda, scale, full, eps, wide, through_gram);
    return {out[0], out[1], out[2], out[3]};
}

// FAIMHead's training forward as ONE op (docs/design.md §2, "Where the ops live"):
//   faim_kernels::head_logits(x, mu, sigma, beta, lmbda, scale, full, eps, tau, wide=False) -> logits
// = head_metric(sigma, lmbda, scale, full, eps, wide, through_gram=True) followed by randers_logits,
// with one autograd node whose backward is the logits backward op followed by head_metric's
// backward math (metric_parameter_grad, through_abs). Why: the two ops and their two autograd nodes
// cost ~20-40 µs of a ~140 µs training step of a small head (64, 10, 64), against ~70 µs for
// nn.Linear + CE's whole step. The values and gradients are the two ops' own, bit for bit
// (tests/test_nn_head_paths.py).
at::Tensor head_logits_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma, const at::Tensor& beta,
                           const at::Tensor& lmbda, const at::Tensor& scale, bool full, double eps, double tau,
                           bool wide) {
    auto [lc, lam, gamma, factor64] = call_head_metric(sigma, lmbda, scale, full, eps, wide, /*through_gram=*/true);
    return std::get<0>(call_logits(x, mu, lc, beta, lam, gamma, eps, tau));
}

class HeadLogits : public torch::autograd::Function<HeadLogits> {
   public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                                                  const at::Tensor& mu, const at::Tensor& sigma,
                                                  const at::Tensor& beta, const at::Tensor& lmbda,
                                                  const at::Tensor& scale, bool full, double eps, double tau,
                                                  bool wide) {
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [lc, lam, gamma, factor64] = call_head_metric(sigma, lmbda, scale, full, eps, wide, /*through_gram=*/true);
        auto [logits, xp, mup, sx, smu] = call_logits(x, mu, lc, beta, lam, gamma, eps, tau);
        ctx->save_for_backward({logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, sigma, lmbda, scale, factor64});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["tau"] = tau;
        ctx->saved_data["full"] = full;
        ctx->saved_data["wide"] = wide;
        ctx->set_materialize_grads(false);
        return {logits};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                   torch::autograd::variable_list grads) {
        torch::autograd::variable_list out(10);
        if (!grads[0].defined()) return out;
        const auto s = ctx->get_saved_variables();
        // The inputs (x, mu, sigma, beta, lmbda, scale) map one to one onto the logits op's
        // (x, mu, lc, beta, lam, gamma): the same grad_mask bits.
        const int64_t mask = needed_grad_mask(ctx);
        const LogitsGrads res = call_logits_backward(grads[0], s, ctx->saved_data["eps"].toDouble(),
                                                     ctx->saved_data["tau"].toDouble(), mask);
        auto [dx, dmu, dlc, dbeta, dlam, dgamma] = res;
        if (mask & 1) out[0] = dx;
        if (mask & 2) out[1] = dmu;
        if (mask & 4)
            out[2] = metric_parameter_grad(s[11], s[14], dlc, ctx->saved_data["full"].toBool(),
                                           ctx->saved_data["wide"].toBool(), /*through_gram=*/true,
                                           ctx->saved_data["eps"].toDouble());
        if (mask & 8) out[3] = dbeta;
        if (mask & 16) out[4] = through_abs(dlam, s[12]);
        if (mask & 32) out[5] = through_abs(dgamma, s[13]);
        return out;
    }
};

at::Tensor head_logits_autograd_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& sigma,
                                    const at::Tensor& beta, const at::Tensor& lmbda, const at::Tensor& scale, bool full,
                                    double eps, double tau, bool wide) {
    return HeadLogits::apply(x, mu, sigma, beta, lmbda, scale, full, eps, tau, wide)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) {
    m.impl("head_metric", &head_metric_cpu);
    m.impl("head_logits", &head_logits_cpu);
}

TORCH_LIBRARY_IMPL(faim_kernels, AutogradCPU, m) {
    m.impl("head_metric", &head_metric_autograd_cpu);
    m.impl("head_logits", &head_logits_autograd_cpu);
}

}  // namespace faim_kernels
