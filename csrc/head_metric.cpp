// The FAIMHead's metric operands from its raw parameters, in one op (CPU):
//   faim_kernels::head_metric(sigma, lmbda, scale, full, eps) -> (lc, lam, gamma, factor64)
//     full = false: sigma = log_sigma_diag [D],  lc = sqrt(exp(sigma) + eps)          (Sigma = diag(lc²))
//     full = true:  sigma = L [D, D],            lc = cholesky(tril(L)·tril(L)ᵀ + eps·I), formed in float64
//     lam = |lmbda|, gamma = |scale|, with the derivative of |v| taken as +1 at v = 0 (so a head
//     started at λ = 0 can learn λ; faim_kernels/nn/head.py).
// lc comes in the compute dtype (float64 for float64 parameters, else float32), lam and gamma in
// the parameters' dtype; factor64 is the float64 Cholesky factor (full; empty for the diagonal), which
// the backward reuses instead of factorising again. Why an op: the head's forward used to form these with ~12 small ATen ops
// and as many autograd nodes, which cost more than the fused logits themselves on a small head
// (the module-speed section of README). The schema and fake kernel are in ops/contract.py; the
// Python composite (faim_kernels/nn/head.py, _MetricParams.metric_args) is the oracle in the tests
// and serves other devices.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>

namespace faim_kernels {
namespace {

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The sign that |v| is differentiated with: +1 at v = 0 (and for NaN: the NaN reaches the gradient
// through the upstream value).
at::Tensor plus_sign(const at::Tensor& v) { return at::where(v >= 0, at::ones_like(v), -at::ones_like(v)); }

// Sigma = tril(L)·tril(L)ᵀ + eps·I and its Cholesky factor, float64; the same checks (and messages)
// as faim_kernels/transform.py metric_factor.
std::pair<at::Tensor, at::Tensor> full_factor(const at::Tensor& L, double eps) {
    const at::Tensor A = L.detach().to(at::kDouble).tril();
    const at::Tensor sigma = at::addmm(at::eye(A.size(0), A.options()), A, A.t(), /*beta=*/eps, /*alpha=*/1.0);
    auto [factor, info] = at::linalg_cholesky_ex(sigma);
    TORCH_CHECK_VALUE(at::isfinite(L).all().item<bool>(),
                      "L holds non-finite values (NaN or Inf): Sigma = L Lᵀ + eps·I cannot be factorised");
    TORCH_CHECK_VALUE(info.item<int64_t>() == 0,
                      "Sigma = L Lᵀ + eps·I is not positive definite in float64 (eps = 0 with a singular L?): "
                      "use eps > 0");
    return {A, factor};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_metric_cpu(const at::Tensor& sigma, const at::Tensor& lmbda,
                                                               const at::Tensor& scale, bool full, double eps) {
    TORCH_CHECK(lmbda.dim() == 0 && scale.dim() == 0, "lmbda and scale must be 0-dim tensors");
    TORCH_CHECK(sigma.dim() == (full ? 2 : 1), "sigma must be L [D, D] (full) or log_sigma_diag [D]");
    // lam and gamma reach every pair: NaN or Inf there is an error (as the functional API's check),
    // not a matrix of NaN. Reading them is free on the CPU.
    const double lam_value = lmbda.item<double>(), gamma_value = scale.item<double>();
    TORCH_CHECK_VALUE(std::isfinite(lam_value), "lam must be >= 0 and finite, got ", std::abs(lam_value));
    TORCH_CHECK_VALUE(std::isfinite(gamma_value), "gamma must be finite, got ", std::abs(gamma_value));
    const at::ScalarType ct = compute_type(sigma.scalar_type());
    // Plain loops and scalar results rather than ATen calls: on a small head each ATen call here
    // costs about as much as its arithmetic.
    auto scalar = [](const at::Tensor& like, double v) { return at::scalar_tensor(v, like.options()); };
    if (full) {
        at::Tensor factor = full_factor(sigma, eps).second.contiguous();
        return {factor.to(ct).clone(), scalar(lmbda, std::abs(lam_value)), scalar(scale, std::abs(gamma_value)),
                factor};
    }
    const at::Tensor v = sigma.detach().to(at::kDouble).contiguous();
    at::Tensor lc = at::empty({v.size(0)}, sigma.options().dtype(ct));
    AT_DISPATCH_FLOATING_TYPES(ct, "head_metric", [&] {
        const double* vp = v.data_ptr<double>();
        scalar_t* out = lc.data_ptr<scalar_t>();
        for (int64_t k = 0; k < v.size(0); ++k) out[k] = scalar_t(std::sqrt(std::exp(vp[k]) + eps));
    });
    return {lc, scalar(lmbda, std::abs(lam_value)), scalar(scale, std::abs(gamma_value)),
            at::empty({0}, sigma.options().dtype(at::kDouble))};
}

// Backward: ∂log_sigma_diag = ∂lc·exp(v)/(2·lc); for the full factor, the Cholesky backward
// (Murray 2016, as PyTorch's own): with Φ(X) = tril(X) with its diagonal halved,
// ∂Sigma = ½(G + Gᵀ), G = Lc⁻ᵀ·Φ(Lcᵀ·∂Lc)·Lc⁻¹, then ∂L = tril(2·∂Sigma·tril(L)). All in float64.
class HeadMetric : public torch::autograd::Function<HeadMetric> {
   public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& sigma,
                                                  const at::Tensor& lmbda, const at::Tensor& scale, bool full,
                                                  double eps) {
        // Through the dispatcher (not a direct call), so that modes and tracing see one op.
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("faim_kernels::head_metric", "")
                             .typed<decltype(head_metric_cpu)>();
        at::AutoDispatchBelowADInplaceOrView guard;
        auto [lc, lam, gamma, factor64] = op.call(sigma, lmbda, scale, full, eps);
        ctx->save_for_backward({sigma, lmbda, scale, factor64});
        ctx->mark_non_differentiable({factor64});
        ctx->saved_data["full"] = full;
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
        if (grads[0].defined() && ctx->needs_input_grad(0)) {
            const at::Tensor g = grads[0].to(at::kDouble);
            if (full) {
                const at::Tensor A = sigma.detach().to(at::kDouble).tril();
                at::Tensor phi = at::matmul(Lc.t(), g).tril();
                phi.diagonal().mul_(0.5);
                // G = Lc⁻ᵀ·Φ·Lc⁻¹: X = Lc⁻ᵀ·Φ (an upper solve), then G = X·Lc⁻¹ = (Lc⁻ᵀ·Xᵀ)ᵀ.
                const at::Tensor X = at::linalg_solve_triangular(Lc.t(), phi, /*upper=*/true);
                const at::Tensor G = at::linalg_solve_triangular(Lc.t(), X.t(), /*upper=*/true).t();
                dsigma = at::matmul(G + G.t(), A).tril().to(sigma.scalar_type());
            } else {
                const at::Tensor e = at::exp(sigma.detach().to(at::kDouble));
                dsigma = (g * e / (2.0 * at::sqrt(e + eps))).to(sigma.scalar_type());
            }
        }
        if (grads[1].defined() && ctx->needs_input_grad(1)) dlmbda = grads[1] * plus_sign(lmbda.detach());
        if (grads[2].defined() && ctx->needs_input_grad(2)) dscale = grads[2] * plus_sign(scale.detach());
        return {dsigma, dlmbda, dscale, at::Tensor(), at::Tensor()};  // no gradient flows from factor64
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> head_metric_autograd_cpu(
    const at::Tensor& sigma, const at::Tensor& lmbda, const at::Tensor& scale, bool full, double eps) {
    const auto out = HeadMetric::apply(sigma, lmbda, scale, full, eps);
    return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) { m.impl("head_metric", &head_metric_cpu); }

TORCH_LIBRARY_IMPL(faim_kernels, AutogradCPU, m) { m.impl("head_metric", &head_metric_autograd_cpu); }

}  // namespace faim_kernels
