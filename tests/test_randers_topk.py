"""The top-k family (fk.randers_topk) on every backend against the float64 einsum oracle (distances
and a stable sort): odd shapes, full and diagonal L, k from 1 to C and up to 1024, largest, the
near-prototype hard case of docs/design.md §2.1 (near pairs) (the right prototype first), exact ties (lower index first),
NaN, every dtype, edge cases, determinism, the op contract (opcheck), the Triton fallback above its
limit, FAIMHead.predict / FAIMHead.topk, and the differentiable recomputation randers_distance_at.
"""
from __future__ import annotations

import pytest
import torch

import faim_kernels as fk
from conftest import (shape_key, FWD_TOL, assert_norm_close, assert_rel_close, backends, device_of, make_inputs,
                      per_backend)

FULL = pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])


def oracle(inputs, k, largest=False, row_chunk=256):
    """(distances, indices, all distances) of the float64 reference: einsum distances, stable sort
    (row chunks keep the [B, C, D] temporaries small)."""
    x, mu, L, beta, lam = [t.detach().double().cpu() for t in inputs[:5]]
    d = torch.cat([fk.reference.randers_distance(x[i:i + row_chunk], mu, L, beta, lam)
                   for i in range(0, x.shape[0], row_chunk)]) if x.shape[0] else x.new_empty((0, mu.shape[0]))
    values, index = torch.sort(d, dim=1, descending=largest, stable=True)
    return values[:, :k], index[:, :k], d


def check_topk(inputs, k, backend, largest=False, tol=None):
    """Distances within tol (relative) of the oracle's, each the distance of the index it comes
    with; indices the oracle's except among true ties (oracle distances within tol of each other);
    no index twice in a row; dtype, device and shapes kept."""
    x = inputs[0]
    tol = tol or FWD_TOL[x.dtype]
    d, idx = fk.randers_topk(*inputs[:5], k, largest=largest, backend=backend)
    B = x.shape[0]
    assert d.shape == (B, k) and idx.shape == (B, k)
    assert d.dtype == x.dtype and idx.dtype == torch.int64 and d.device == x.device == idx.device
    assert not d.requires_grad
    ref_d, ref_i, d64 = oracle(inputs, k, largest)
    d, idx = d.cpu(), idx.cpu()
    assert_rel_close(d, ref_d, tol, "distances")
    if idx.numel():
        assert_rel_close(d, d64.gather(1, idx), tol, "distance of the returned index")
        assert (idx.sort(dim=1).values.diff(dim=1) > 0).all(), "an index appears twice in a row"
    differ = idx != ref_i
    if differ.any():
        mine, theirs = d64.gather(1, idx)[differ], d64.gather(1, ref_i)[differ]
        rel = ((mine - theirs).abs() / theirs.abs().clamp_min(1e-30)).nan_to_num(0.0)
        assert rel.max() <= tol, (f"indices differ from the oracle beyond a tie at {differ.nonzero()[:3].tolist()}: "
                                  f"distances {mine[:3].tolist()} vs {theirs[:3].tolist()}")
    return d, idx


# Odd shapes. C++: 300 rows are three row blocks (128 each); 9000 and 12000 classes are two class
# groups (of >= 16 tiles of 256), so the merge across groups runs; k = C; k = 1024 over two groups.
CASES = per_backend(
    cpp=[(1, 1, 1, 1), (3, 17, 5, 17), (65, 300, 33, 7), (300, 600, 9, 50), (40, 9000, 8, 1024),
         (130, 12000, 6, 3)],
    triton=[(1, 1, 1, 1), (5, 70, 17, 3), (19, 100, 33, 40)],
)


@FULL
@pytest.mark.parametrize("largest", [False, True], ids=["smallest", "largest"])
@pytest.mark.parametrize("backend, case", CASES, indirect=["backend"])
def test_random_float32(backend, case, full, largest):
    B, C, D, k = case
    check_topk(make_inputs(B, C, D, full=full, seed=B + C + D, device=device_of(backend)), k, backend, largest)


def test_compaction_of_the_candidate_buffers():
    """One class group (C < 16 tiles) with more than 2k classes: each row's buffer is compacted to
    its k best, once for k = 1024, repeatedly for k = 3."""
    check_topk(make_inputs(50, 2600, 4, seed=7), 1024, "cpp")
    check_topk(make_inputs(300, 2600, 4, near=True, seed=8), 3, "cpp", largest=True)


@FULL
@pytest.mark.parametrize("k", [1, 3])
def test_near_prototype_float32(backend, device, full, k):
    """docs/design.md §2.1's hard case (samples 1e-3 from prototypes offset by 5, scale 10, D = 256; sample 0
    exactly on prototype 0): the plain expansion is 800 % off there and would rank the wrong
    prototype; each sample's own prototype must come first, at its exact distance."""
    inputs = make_inputs(32, 64, 256, full=full, near=True, lam=0.1, seed=11, device=device)
    d, idx = check_topk(inputs, k, backend, tol=1e-4)
    ref_d = oracle(inputs, 1)[2]
    assert torch.equal(idx[:, 0], ref_d.argmin(dim=1)), "the sample's own prototype is not first"
    assert idx[0, 0] == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_dtypes(backend, device, dtype):
    inputs = make_inputs(21, 90, 24, near=True, dtype=dtype, seed=3, device=device)
    check_topk(inputs, 4, backend)


def test_ties_go_to_the_lower_index(backend, device):
    """Prototypes repeated 4 times: every distance occurs 4 times, bitwise (the same row of mu'
    through the same kernel), and the returned indices are those of a stable sort."""
    x, mu, L, beta, lam, _ = make_inputs(9, 5, 6, seed=4, device=device)
    mu = mu.repeat(4, 1)
    d, idx = check_topk([x, mu, L, beta, lam], 7, backend, tol=FWD_TOL[torch.float32])
    first = idx[:, :4].sort(dim=1).values
    assert torch.equal(idx[:, :4] % 5, idx[:, :1].expand(-1, 4) % 5), "the 4 copies of the nearest are not first"
    assert torch.equal(idx[:, :4], first), "copies not in index order"
    d_l, idx_l = fk.randers_topk(x, mu, L, beta, lam, 4, largest=True, backend=backend)
    assert torch.equal(idx_l.cpu(), idx_l.cpu().sort(dim=1).values)


def test_nan_ranks_as_in_torch_topk(backend, device):
    """A NaN row of x: every distance NaN, indices 0..k-1. A NaN prototype: last for the k smallest,
    first for the k largest (torch.topk's rule); other rows and classes unaffected."""
    C = {"cpp": 600, "triton": 100}[shape_key(backend)]  # C++: buffers compacted with NaN thresholds (k = 3)
    x, mu, L, beta, lam, _ = make_inputs(6, C, 5, seed=6, device=device)
    x[2, 1] = float("nan")
    mu[7, 0] = float("nan")
    for largest in (False, True):
        for k in (3, C):
            d, idx = fk.randers_topk(x, mu, L, beta, lam, k, largest=largest, backend=backend)
            ref_d, ref_i, _ = oracle([x, mu, L, beta, lam], k, largest)
            assert torch.equal(idx.cpu(), ref_i), f"largest={largest}, k={k}"
            assert torch.equal(torch.isnan(d.cpu()), torch.isnan(ref_d))
            assert_rel_close(d.cpu(), ref_d, FWD_TOL[torch.float32], "distances with NaN")
            assert torch.equal(idx[2].cpu(), torch.arange(k))
            if largest or k == C:
                assert idx[0, 0 if largest else -1] == 7


def test_edge_cases(backend, device):
    x, mu, L, beta, lam, _ = make_inputs(4, 6, 3, device=device)
    for B, C, k in ((0, 6, 2), (4, 6, 0), (4, 0, 0), (0, 0, 0)):
        d, idx = fk.randers_topk(x[:B], mu[:C], L, beta, lam, k, backend=backend)
        assert d.shape == idx.shape == (B, k) and d.dtype == x.dtype and idx.dtype == torch.int64
    # non-contiguous x (a transposed view) and expanded mu (stride 0: every class ties)
    x_t = x.T.contiguous().T
    assert not x_t.is_contiguous()
    mu_e = mu[:1].expand(6, 3)
    d, idx = check_topk([x_t, mu_e, L, beta, lam], 2, backend)
    assert (idx == torch.arange(2, device=idx.device)).all()


def test_validation():
    x, mu, L, beta, lam, _ = make_inputs(4, 6, 3)
    with pytest.raises(ValueError, match=r"k must be in \[0, C\] = \[0, 6\]"):
        fk.randers_topk(x, mu, L, beta, lam, 7)
    with pytest.raises(ValueError, match="k must be in"):
        fk.randers_topk(x, mu, L, beta, lam, -1)
    with pytest.raises(TypeError, match="k must be an int"):
        fk.randers_topk(x, mu, L, beta, lam, 2.0)
    with pytest.raises(TypeError, match="largest must be a bool"):
        fk.randers_topk(x, mu, L, beta, lam, 2, largest=1)
    with pytest.raises(ValueError, match="mu must have shape"):
        fk.randers_topk(x, mu[:, :2], L, beta, lam, 2)
    with pytest.raises(ValueError, match="indices must lie in"):
        fk.randers_distance_at(x, mu, L, beta, lam, torch.tensor([[0], [1], [2], [6]]))


def test_deterministic_and_independent_of_threads():
    inputs = make_inputs(300, 1100, 16, seed=9)
    first = fk.randers_topk(*inputs[:5], 20, backend="cpp")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fk.randers_topk(*inputs[:5], 20, backend="cpp")
    finally:
        torch.set_num_threads(threads)
    again = fk.randers_topk(*inputs[:5], 20, backend="cpp")
    for a, b in ((first, one), (first, again)):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_agrees_with_the_logits_kernel():
    """The same distances as randers_distance's kernel at the returned indices (one epilogue)."""
    inputs = make_inputs(50, 700, 12, full=True, near=True, seed=10)
    d, idx = fk.randers_topk(*inputs[:5], 5, backend="cpp")
    dist = fk.randers_distance(*inputs[:5], backend="cpp")
    assert_rel_close(d, dist.gather(1, idx), 1e-6, "top-k vs the logits kernel")


def test_opcheck_and_no_autograd():
    from faim_kernels.ops import contract
    fk._cpp_loader.load()
    x, mu, L, beta, lam, _ = make_inputs(5, 9, 4, full=True)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
    for largest in (False, True):
        torch.library.opcheck(contract.topk_op, (x, mu, lc, beta, lam, 1e-6, 0.01, 3, largest),
                              test_utils=("test_schema", "test_faketensor"))
    inputs = [t.requires_grad_() for t in make_inputs(5, 9, 4)[:5]]
    d, idx = fk.randers_topk(*inputs, 3)
    assert not d.requires_grad and not idx.requires_grad


def test_distance_at_is_differentiable(backend, device):
    """The documented way to gradients: randers_distance_at on the returned indices equals the
    top-k distances and has the reference's gradients (gradcheck in float64)."""
    inputs = make_inputs(6, 11, 4, full=True, dtype=torch.float64, near=True, seed=12, device=device)[:5]
    d, idx = fk.randers_topk(*inputs, 3, backend=backend)
    again = fk.randers_distance_at(*inputs, idx)
    assert_rel_close(again, d, 1e-12, "randers_distance_at at the top-k indices")
    for t in inputs:
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda *a: fk.randers_distance_at(*a, idx), inputs)
    ref = fk.reference.randers_distance(*inputs)
    grads = torch.autograd.grad(fk.randers_distance_at(*inputs, idx).sum(), inputs)
    want = torch.autograd.grad(ref.gather(1, idx).sum(), inputs)
    for g, w in zip(grads, want):
        assert_norm_close(g, w, 1e-10)


@pytest.mark.parametrize("backend, dtype", per_backend(triton=[torch.float32, torch.float64], id_of=str),
                         indirect=["backend"])
def test_triton_fallback_above_its_limit(backend, dtype, monkeypatch):
    """Calls the Triton kernel does not serve (k above MAX_K, narrowed here; float64) sort
    randers_distance instead, with a warning that says so, and give the same answer."""
    from faim_kernels.ops import dispatch
    from faim_kernels.ops.triton import topk as triton_topk
    monkeypatch.setattr(triton_topk, "MAX_K", 4)
    monkeypatch.setattr(dispatch, "_warned", set())
    inputs = make_inputs(7, 30, 5, dtype=dtype, seed=13, device=device_of(backend))
    k = 6 if dtype == torch.float32 else 3
    with pytest.warns(UserWarning, match="sorts randers_distance"):
        check_topk(inputs, k, backend)


@pytest.mark.parametrize("backend", backends("triton"), indirect=True)
def test_triton_splits_and_large_k(backend, monkeypatch):
    """Several class splits per row block, merged by the launcher; k = 1024 (KP = 1024 keys per row)."""
    from faim_kernels.ops.triton import topk as triton_topk
    monkeypatch.setattr(triton_topk, "SPLITS", 3)
    dev = device_of("triton")
    check_topk(make_inputs(9, 200, 7, full=True, near=True, seed=14, device=dev), 5, "triton")
    monkeypatch.setattr(triton_topk, "SPLITS", None)
    check_topk(make_inputs(3, 1100, 4, seed=15, device=dev), 1024, "triton")


def test_head_predict_and_topk(backend, device):
    head = fk.FAIMHead(6, 50, full_sigma=True, backend=backend).to(device)
    x = torch.randn(2, 3, 6, device=device)
    with torch.no_grad():
        logits = head(x)
    assert torch.equal(head.predict(x), logits.argmax(-1))
    d, idx = head.topk(x, 4)
    assert d.shape == idx.shape == (2, 3, 4)
    assert torch.equal(idx, logits.topk(4, dim=-1).indices)
    assert torch.equal(head.predict(x, k=4), idx)
    assert_rel_close(d, head.distance(x).detach().gather(-1, idx), 1e-5, "head.topk distances")
    far = head.topk(x, 2, largest=True)[1]
    assert torch.equal(far, (-logits).topk(2, dim=-1).indices)


def test_torch_compile_fullgraph():
    """fk.randers_topk inside torch.compile(fullgraph=True): the op's fake kernel traces, and the
    compiled call returns what the eager one does."""
    torch._dynamo.reset()
    x, mu, L, beta, lam, _ = make_inputs(6, 40, 5, full=True, seed=16)
    eager = fk.randers_topk(torch.tanh(x), mu, L, beta, lam, 3, backend="cpp")
    f = torch.compile(lambda x: fk.randers_topk(torch.tanh(x), mu, L, beta, lam, 3, backend="cpp"), fullgraph=True,
                      backend="aot_eager")
    d, idx = f(x)
    assert torch.equal(idx, eager[1]) and torch.equal(d, eager[0])
