// Fused Randers top-k on the CPU: the CPU kernel of the op
//   faim_kernels::randers_topk(x, mu, lc, beta, lam, eps, tau, k, largest) -> (distances [B, k], indices [B, k])
// whose schema and fake kernel are in faim_kernels/ops/contract.py (no autograd: see there).
//
// The k nearest (or farthest) prototypes of each row without the [B, C] distances: the classes are
// cut into tiles of kTileC; each tile's mu' = (mu − m)·Lc is formed on the fly, multiplied with a
// block of rows of x' (one BLAS GEMM into a scratch tile), turned into distances in place by the
// epilogue of docs/design.md §1 (the function)-2 (row_keys), the near pairs recomputed from the raw difference
// (docs/design.md §2.1, near pairs) BEFORE any comparison, and the row's candidates offered to a per-row partial top-k.
//
// Partial top-k per row: a buffer of (key, index) candidates and a threshold, the k-th best after
// the last compaction; a candidate enters only if it beats the threshold; a buffer holding 2k is
// compacted to its k best (nth_element), so each candidate costs one comparison and O(1)
// amortised moves, and a row segment whose smallest key does not beat the threshold (most of
// them, once the threshold is tight) costs one comparison in all. Work units are (class group,
// row block): each group holds its own per-row buffers, merged at the end by a sort of at most
// groups·(2k + kTileC) candidates per row.
//
// Order: by distance, ties by the lower index; NaN ranks after +inf for the k smallest and before
// everything for the k largest (torch.topk's rule). This order is total, so the result does not
// depend on how the classes were split into groups; the groups and row blocks depend on the
// shapes only, so every distance is computed by the same GEMM on any machine (deterministic).
//
// Extra memory: x' [B, D] (as the other ops), O(C) per-class terms (|mu'_c|², mu_c·beta), the
// candidate buffers groups·B·(2k + kTileC)·(sizeof(T) + 8) bytes (groups capped by kStateBytes), one
// [rows, kTileC] scratch tile plus one mu' tile per worker. Nothing of size [B, C] or [C, D].
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "randers_common.h"

namespace faim_kernels {
namespace {

constexpr int64_t kUnits = 16;                        // work units wanted (from the shapes only)
constexpr int64_t kMinTilesPerGroup = 16;             // a group's first tiles fill its buffers (slow path)
constexpr int64_t kStateBytes = int64_t(64) << 20;    // cap on the groups' candidate buffers

// Rows of x' per GEMM: each unit forms its mu' tiles itself, which costs nc·D (diagonal Lc) or
// nc·D² (full Lc) per tile against the GEMM's nr·nc·D, so a full Lc takes blocks of at least 4·D
// rows (the projection then costs at most a quarter of the GEMM).
inline int64_t rows_per_block(bool full, int64_t D) { return full ? std::max<int64_t>(128, 4 * D) : 128; }

// (key, index) order: key = d for the k smallest, −d for the k largest, so smaller is better in
// both; NaN is worst for the k smallest and best for the k largest (nan_first).
template <typename T>
inline bool better(T a, int64_t ia, T b, int64_t ib, bool nan_first) {
    const bool na = a != a, nb = b != b;
    if (na || nb) {
        if (na && nb) return ia < ib;
        return nan_first ? na : nb;
    }
    return a < b || (a == b && ia < ib);
}

template <typename T>
struct TopkProblem {
    Operands<T> in;            // x', |x'|², sx; per class |mu'_c|², smu (O(C)); raw x, mu, lc
    at::Tensor x, mu, lc, beta, m, sx, smu;
    const T* center;
    int64_t k;
    bool largest;
};

// mu'[0:nc] = (mu[c0:c0+nc] − m)·Lc into `mup` (cent: scratch of kTileC·D). The same function
// forms a tile in the norms pass and in the main pass, so both see the same values.
template <typename T>
void project_tile(const TopkProblem<T>& pb, int64_t c0, int64_t nc, T* cent, T* mup) {
    const Operands<T>& in = pb.in;
    const int64_t D = in.D;
    const T* __restrict__ m = pb.center;
    const T* __restrict__ lc = in.lc;
    if (in.full) {
        for (int64_t j = 0; j < nc; ++j) {
            const T* __restrict__ row = in.mu + (c0 + j) * D;
            T* __restrict__ out = cent + j * D;
#pragma omp simd
            for (int64_t k = 0; k < D; ++k) out[k] = row[k] - m[k];
        }
        at::Tensor out = at::from_blob(mup, {nc, D}, pb.lc.options());
        at::mm_out(out, at::from_blob(cent, {nc, D}, pb.lc.options()), pb.lc);
        return;
    }
    for (int64_t j = 0; j < nc; ++j) {
        const T* __restrict__ row = in.mu + (c0 + j) * D;
        T* __restrict__ out = mup + j * D;
#pragma omp simd
        for (int64_t k = 0; k < D; ++k) out[k] = (row[k] - m[k]) * lc[k];
    }
}

template <typename T>
TopkProblem<T> setup(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc, const at::Tensor& beta,
                     const at::Tensor& lam, double eps, double tau, int64_t k, bool largest) {
    TopkProblem<T> pb;
    Operands<T>& in = pb.in;
    pb.x = x;
    pb.mu = mu;
    pb.lc = lc;
    in.B = x.size(0);
    in.C = mu.size(0);
    in.D = x.size(1);
    in.K = in.D;  // a square factor (check_operands)
    in.full = lc.dim() == 2;
    in.x = x.data_ptr<T>();
    in.mu = mu.data_ptr<T>();
    in.lc = lc.data_ptr<T>();
    in.lower = in.full && is_lower_triangular(in.lc, in.D);
    pb.beta = beta;  // in.beta points into it (near pairs take s from the difference)
    in.beta = beta.data_ptr<T>();
    in.lam = lam.item<double>();
    in.eps = eps;
    in.tau = tau;
    pb.k = k;
    pb.largest = largest;
    pb.m = center_of<T>(mu);
    pb.center = pb.m.template data_ptr<T>();
    in.xp = project<T>(x, pb.m, lc).contiguous();
    in.xnorm = row_sq_norms<T>(in.xp);
    const auto f64 = x.options().dtype(at::kDouble);
    pb.sx = at::empty({in.B}, f64);
    pb.smu = at::empty({in.C}, f64);
    row_dots64<T>(x, beta.data_ptr<T>(), pb.sx.template data_ptr<double>());
    row_dots64<T>(mu, beta.data_ptr<T>(), pb.smu.template data_ptr<double>());
    in.sx = pb.sx.template data_ptr<double>();
    in.smu = pb.smu.template data_ptr<double>();
    split_all(in.sx, in.B, in.sx_hi, in.sx_lo);
    split_all(in.smu, in.C, in.smu_hi, in.smu_lo);
    // |mu'_c|² for every class (O(C)), from the tiles the main pass will form again.
    in.munorm.assign(in.C, T(0));
    T* norms = in.munorm.data();
    const int64_t D = in.D, n_ct = ceil_div(in.C, kTileC);
    at::parallel_for(0, n_ct, 1, [&pb, norms, D](int64_t begin, int64_t end) {
        std::vector<T> cent(kTileC * D), mup(kTileC * D);
        for (int64_t ct = begin; ct < end; ++ct) {
            const int64_t c0 = ct * kTileC, nc = std::min(kTileC, pb.in.C - c0);
            project_tile(pb, c0, nc, cent.data(), mup.data());
            for (int64_t j = 0; j < nc; ++j) norms[c0 + j] = row_sq_norm(mup.data() + j * D, D);
        }
    });
    return pb;
}

// One row's partial top-k inside one class group: `cap` = 2k slots of (key, index), a count, and
// the threshold (the k-th best key and its index) once the buffer has been compacted.
template <typename T>
void compact(T* key, int64_t* idx, int64_t n, int64_t k, bool nan_first, std::vector<int64_t>& order,
             std::vector<T>& tmp_key, std::vector<int64_t>& tmp_idx) {
    order.resize(n);
    for (int64_t i = 0; i < n; ++i) order[i] = i;
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t a, int64_t b) {
        return better(key[a], idx[a], key[b], idx[b], nan_first);
    });
    tmp_key.resize(k);
    tmp_idx.resize(k);
    // order[0:k] holds the k best, order[k-1] the k-th best (nth_element's guarantee).
    std::swap(order[k - 1], order[0]);  // keep the threshold first, the rest in any order
    for (int64_t i = 0; i < k; ++i) {
        tmp_key[i] = key[order[i]];
        tmp_idx[i] = idx[order[i]];
    }
    std::copy(tmp_key.begin(), tmp_key.end(), key);
    std::copy(tmp_idx.begin(), tmp_idx.end(), idx);
}

// The keys (±d, docs/design.md §1 (the function)) of one row of a tile, in place over its GEMM entries, with what the
// selection needs to skip the row: the smallest key, and counts of NaN keys and of near pairs
// (flagged in `near`; their keys here come from the expansion and must be recomputed). The same
// per-pair formulas as randers_common.h's row_terms, fused into one vectorised loop that keeps
// only d (row_terms stores a, r, s and d for the backward passes): with row_terms the top-k took
// 1.7x the time of randers_distance + torch.topk at (256, 20000, 64), k = 10, two threads; with
// this loop 1.06x (ratios within one run each; the skip and the branchless append below do the rest).
template <typename T>
struct RowSummary {
    T min_key, n_nan, n_near;
};

template <typename T>
RowSummary<T> row_keys(const Operands<T>& in, int64_t b, int64_t c0, int64_t nc, T sign, T* __restrict__ key,
                       T* __restrict__ near) {
    const T xn = in.xnorm[b], eps = T(in.eps), tau = T(in.tau), lam = T(in.lam);
    const T sxh = in.sx_hi[b], sxl = in.sx_lo[b];
    const T* __restrict__ mn = in.munorm.data() + c0;
    const T* __restrict__ smh = in.smu_hi.data() + c0;
    const T* __restrict__ sml = in.smu_lo.data() + c0;
    T min_key = std::numeric_limits<T>::infinity(), n_nan = 0, n_near = 0;
#pragma omp simd reduction(min : min_key) reduction(+ : n_nan, n_near)
    for (int64_t j = 0; j < nc; ++j) {
        const T norms = xn + mn[j];
        const T q = norms - T(2) * key[j];
        const T s = (sxh - smh[j]) + (sxl - sml[j]);
        near[j] = (is_near_pair(q, norms, tau) | s_cancels(s, sxh, smh[j])) ? T(1) : T(0);
        n_near += near[j];
        const T v = sign * (std::sqrt((q < T(0) ? T(0) : q) + eps) + lam * std::sqrt(s * s + eps));
        key[j] = v;
        n_nan += v != v ? T(1) : T(0);
        min_key = v < min_key ? v : min_key;
    }
    return {min_key, n_nan, n_near};
}

// The per-row partial top-k buffers of every class group: for slot = g·B + b, `cap` (key, index)
// slots, a count, and the threshold (the k-th best key after the last compaction) once there is one.
template <typename T>
struct Candidates {
    int64_t G, cap, full_at;  // groups; slots per row and group; the count that triggers a compaction
    std::vector<T> keys;
    std::vector<int64_t> idxs;
    std::vector<int64_t> counts;
    std::vector<T> thr;
    std::vector<uint8_t> has_thr;

    Candidates(int64_t G_, int64_t B, int64_t k)
        : G(G_), cap(2 * k + kTileC), full_at(2 * k), keys(G_ * B * cap), idxs(G_ * B * cap), counts(G_ * B, 0),
          thr(G_ * B), has_thr(G_ * B, 0) {}
};

// Class groups: enough units for the threads, but each group long enough that its buffers spend
// most of its tiles in the fast path (its first tiles, with no or a loose threshold, do not), and
// their buffers within kStateBytes. From the shapes only (deterministic).
template <typename T>
int64_t num_groups(int64_t B, int64_t k, int64_t n_ct, int64_t n_rb) {
    // Slots per row and group: 2k candidates before a compaction, plus one tile's worth of slack
    // for the branchless append (offer_row).
    const int64_t per_group = B * (2 * k + kTileC) * int64_t(sizeof(T) + sizeof(int64_t));
    const int64_t by_memory = std::max<int64_t>(1, kStateBytes / std::max<int64_t>(1, per_group));
    return std::max<int64_t>(1, std::min({n_ct / kMinTilesPerGroup, ceil_div(kUnits, n_rb), by_memory}));
}

// One worker's scratch: a mu' tile (and its centred rows for a full factor), the GEMM's dots,
// the near-pair flags, the near-pair recompute's accumulator, and compact()'s buffers.
template <typename T>
struct TopkScratch {
    std::vector<T> cent, mup, dots, near;
    std::vector<double> acc;
    std::vector<int64_t> order;
    std::vector<T> tmp_key;
    std::vector<int64_t> tmp_idx;

    TopkScratch(const Operands<T>& in, int64_t rows)
        : cent(in.full ? kTileC * in.D : 0), mup(kTileC * in.D), dots(std::min(in.B, rows) * kTileC),
          near(kTileC), acc(in.D) {}
};

// Offer row b's keys of one tile (classes c0 .. c0+nc, near pairs already recomputed) to its
// partial top-k in `slot`, compacting the buffer to its k best when it holds 2k.
template <typename T>
void offer_row(Candidates<T>& cand, int64_t slot, const T* d, int64_t c0, int64_t nc, bool any_nan, int64_t k,
               bool nan_first, TopkScratch<T>& sc) {
    T* key = cand.keys.data() + slot * cand.cap;
    int64_t* idx = cand.idxs.data() + slot * cand.cap;
    int64_t n = cand.counts[slot];
    const T t = cand.thr[slot];
    const bool has_thr = cand.has_thr[slot];
    if (has_thr && t == t && !any_nan) {
        // The common case, branchless: every key is written, the count advances for those under
        // the threshold (a tie loses: indices grow within a group). Branches here mispredict for as
        // long as the threshold is loose (with k = 10 and 256-wide tiles, until a group has seen a
        // few thousand classes): the top-k's time over the distance kernel's went from 3.6x to 1.6x
        // at (256, 20000, 64), k = 10, two threads (ratios within one run each).
        for (int64_t j = 0; j < nc; ++j) {
            key[n] = d[j];
            idx[n] = c0 + j;
            n += d[j] < t ? 1 : 0;
        }
    } else {
        // Filling the buffer (no threshold yet), or NaN keys or a NaN threshold.
        for (int64_t j = 0; j < nc; ++j) {
            const T v = d[j];
            const bool take = !has_thr || (nan_first ? (v < t || (v != v && t == t)) : (t != t ? v == v : v < t));
            if (!take) continue;
            key[n] = v;
            idx[n++] = c0 + j;
        }
    }
    if (n >= cand.full_at) {
        compact(key, idx, n, k, nan_first, sc.order, sc.tmp_key, sc.tmp_idx);
        n = k;
        cand.thr[slot] = key[0];
        cand.has_thr[slot] = 1;
    }
    cand.counts[slot] = n;
}

// One class tile for the rows r0 .. r0+nr of group g: the tile of mu', one GEMM into the dots,
// then each row's keys (the epilogue, row_keys), its near pairs recomputed, and its offer.
template <typename T>
void topk_tile(const TopkProblem<T>& pb, Candidates<T>& cand, int64_t g, int64_t ct, int64_t r0, int64_t nr,
               TopkScratch<T>& sc) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, C = in.C, D = in.D;
    const T sign = pb.largest ? T(-1) : T(1);
    const int64_t c0 = ct * kTileC, nc = std::min(kTileC, C - c0);
    project_tile(pb, c0, nc, sc.cent.data(), sc.mup.data());
    at::Tensor out = at::from_blob(sc.dots.data(), {nr, nc}, in.xp.options());
    at::mm_out(out, in.xp.narrow(0, r0, nr), at::from_blob(sc.mup.data(), {nc, D}, in.xp.options()).t());
    for (int64_t i = 0; i < nr; ++i) {
        const int64_t b = r0 + i;
        T* __restrict__ key_row = sc.dots.data() + i * nc;
        const RowSummary<T> sum = row_keys(in, b, c0, nc, sign, key_row, sc.near.data());
        const int64_t slot = g * B + b;
        // Most row segments hold nothing better than the row's threshold (after the first tiles,
        // about k·tile/c of them do): one comparison skips them.
        if (sum.n_near == T(0) && sum.n_nan == T(0) && cand.has_thr[slot] && cand.thr[slot] == cand.thr[slot] &&
            !(sum.min_key < cand.thr[slot]))
            continue;
        // Near pairs take their exact distance before any comparison (docs/design.md §2.1, near pairs).
        if (sum.n_near != T(0))
            for (int64_t j = 0; j < nc; ++j)
                if (sc.near[j] != T(0))
                    key_row[j] = sign * recompute_near_pair(in, b, c0 + j, sc.acc.data(), (T*)nullptr).d;
        offer_row(cand, slot, key_row, c0, nc, sum.n_nan != T(0), pb.k, pb.largest, sc);
    }
}

// Merge the groups row by row: sort the union of their candidates, keep the first k.
template <typename T>
void merge_groups(const TopkProblem<T>& pb, const Candidates<T>& cand, T* out_d, int64_t* out_i) {
    const int64_t B = pb.in.B, k = pb.k, G = cand.G, cap = cand.cap;
    const bool largest = pb.largest, nan_first = pb.largest;
    at::parallel_for(0, B, 16, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> order;
        std::vector<T> ck;
        std::vector<int64_t> ci;
        for (int64_t b = begin; b < end; ++b) {
            ck.clear();
            ci.clear();
            for (int64_t g = 0; g < G; ++g) {
                const int64_t slot = g * B + b;
                ck.insert(ck.end(), cand.keys.begin() + slot * cap, cand.keys.begin() + slot * cap + cand.counts[slot]);
                ci.insert(ci.end(), cand.idxs.begin() + slot * cap, cand.idxs.begin() + slot * cap + cand.counts[slot]);
            }
            const int64_t n = int64_t(ck.size());
            TORCH_CHECK(n >= k, "randers_topk: internal error, fewer candidates than k");
            order.resize(n);
            for (int64_t i = 0; i < n; ++i) order[i] = i;
            std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int64_t a, int64_t c) {
                return better(ck[a], ci[a], ck[c], ci[c], nan_first);
            });
            for (int64_t i = 0; i < k; ++i) {
                const T v = ck[order[i]];
                out_d[b * k + i] = largest ? -v : v;
                out_i[b * k + i] = ci[order[i]];
            }
        }
    });
}

// Work units are (class group, row block); each unit runs its group's class tiles over its rows
// (topk_tile), then the groups are merged (merge_groups).
template <typename T>
void topk_cpu_impl(const TopkProblem<T>& pb, T* out_d, int64_t* out_i) {
    const Operands<T>& in = pb.in;
    const int64_t B = in.B, C = in.C;
    const int64_t kRows = rows_per_block(in.full, in.D);
    const int64_t n_ct = ceil_div(C, kTileC), n_rb = ceil_div(B, kRows);
    const int64_t G = num_groups<T>(B, pb.k, n_ct, n_rb);
    Candidates<T> cand(G, B, pb.k);
    at::parallel_for(0, G * n_rb, 1, [&](int64_t begin, int64_t end) {
        TopkScratch<T> sc(in, kRows);
        for (int64_t u = begin; u < end; ++u) {
            const int64_t g = u / n_rb, rb = u % n_rb;
            const int64_t t0 = g * n_ct / G, t1 = (g + 1) * n_ct / G;
            const int64_t r0 = rb * kRows, nr = std::min(kRows, B - r0);
            for (int64_t ct = t0; ct < t1; ++ct) topk_tile(pb, cand, g, ct, r0, nr, sc);
        }
    });
    merge_groups(pb, cand, out_d, out_i);
}

std::tuple<at::Tensor, at::Tensor> randers_topk_cpu(const at::Tensor& x, const at::Tensor& mu, const at::Tensor& lc,
                                                    const at::Tensor& beta, const at::Tensor& lam, double eps,
                                                    double tau, int64_t k, bool largest) {
    check_operands(x, mu, lc, beta, lam, lam);
    TORCH_CHECK(k >= 0 && k <= mu.size(0), "randers_topk: k must be in [0, C] = [0, ", mu.size(0), "], got ", k);
    at::NoGradGuard no_grad;  // not differentiable (see the contract); the ATen calls are internal
    const int64_t B = x.size(0);
    at::Tensor dist = at::empty({B, k}, x.options());
    at::Tensor index = at::empty({B, k}, x.options().dtype(at::kLong));
    if (B == 0 || k == 0) return {dist, index};
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "randers_topk", [&] {
        const auto pb = setup<scalar_t>(x.detach().contiguous(), mu.detach().contiguous(), lc.detach().contiguous(),
                                        beta.detach().contiguous(), lam, eps, tau, k, largest);
        topk_cpu_impl<scalar_t>(pb, dist.data_ptr<scalar_t>(), index.data_ptr<int64_t>());
    });
    return {dist, index};
}

}  // namespace

TORCH_LIBRARY_IMPL(faim_kernels, CPU, m) {
    m.impl("randers_topk", &randers_topk_cpu);
}

}  // namespace faim_kernels
