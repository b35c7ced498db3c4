"""The metric losses against plain-PyTorch versions computed from the einsum reference distances
(values and gradients of every input, float64), plus float32 spot checks and bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import faim_kernels as fk
from faim_kernels import reference
from faim_kernels.nn import (randers_batch_hard_triplet_loss, randers_info_nce, randers_nt_xent,
                             randers_paired_distance, randers_triplet_loss)
from tests.conftest import assert_norm_close, assert_rel_close


def metric(D, full, dtype=torch.float64, seed=0):
    """(L, beta, lam, gamma) leaves that require grad."""
    g = torch.Generator().manual_seed(seed)
    if full:
        L = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    else:
        L = 0.5 + torch.rand(D, generator=g, dtype=torch.float64)
    beta = torch.randn(D, generator=g, dtype=torch.float64) / D ** 0.5
    out = [L, beta, torch.tensor(0.3, dtype=torch.float64), torch.tensor(1.7, dtype=torch.float64)]
    return [t.to(dtype).requires_grad_() for t in out]


def leaves(*shapes, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_() for s in shapes]


def clones(ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def assert_same_value_and_grads(out, ref, ins, ref_ins, tol_f=1e-10, tol_g=1e-9):
    assert_rel_close(out, ref, tol_f, "loss")
    w = torch.rand(ref.shape, dtype=ref.dtype) + 0.5 if ref.dim() else torch.tensor(1.0, dtype=ref.dtype)
    grads = torch.autograd.grad((out * w.to(out.dtype)).sum(), ins, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * w).sum(), ref_ins, allow_unused=True)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None or torch.count_nonzero(g) == 0, f"input {i}: gradient where the reference has none"
            continue
        assert_norm_close(g, r, tol_g, f"gradient of input {i}")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paired_distance_is_the_diagonal_of_the_reference(full, dtype):
    N, D = 9, 7
    a, b = leaves((N, D), (N, D), dtype=dtype)
    L, beta, lam, _ = metric(D, full, dtype)
    with torch.no_grad():
        b[2] = a[2]  # a zero difference
    out = randers_paired_distance(a, b, L, beta, lam)
    assert out.shape == (N,) and out.dtype == dtype
    ra, rb, rL, rbeta, rlam = clones([a, b, L, beta, lam])
    ref = torch.diagonal(reference.randers_distance(ra.double(), rb.double(), rL.double(), rbeta.double(), rlam.double()))
    tol_f, tol_g = (1e-12, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    assert_same_value_and_grads(out, ref, [a, b, L, beta, lam], [ra, rb, rL, rbeta, rlam], tol_f, tol_g)
    # broadcasting: one point against many
    assert_rel_close(randers_paired_distance(a[0], b, L, beta, lam),
                     randers_paired_distance(a[0].expand(N, D), b, L, beta, lam), 1e-12, "broadcast")


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("margin,reduction", [(0.0, "mean"), (0.5, "none"), (0.2, "sum")])
def test_info_nce_against_plain_pytorch(full, symmetric, margin, reduction):
    N, D = 10, 6
    a, p = leaves((N, D), (N, D))
    with torch.no_grad():
        p.copy_(a + 0.3 * p)  # positives near their anchors
    L, beta, lam, gamma = metric(D, full)
    ins = [a, p, L, beta, lam, gamma]
    out = randers_info_nce(a, p, L, beta, lam, gamma, symmetric=symmetric, margin=margin, reduction=reduction,
                           backend="cpp")

    ra, rp, rL, rbeta, rlam, rgamma = ref_ins = clones(ins)
    d = reference.randers_distance(ra, rp, rL, rbeta, rlam) + margin * torch.eye(N, dtype=torch.float64)
    target = torch.arange(N)
    ref = F.cross_entropy(-rgamma * d, target, reduction=reduction)
    if symmetric:  # the other direction: each positive against all anchors (the columns)
        ref = 0.5 * (ref + F.cross_entropy(-rgamma * d.T, target, reduction=reduction))
    assert_same_value_and_grads(out, ref, ins, ref_ins)


def test_info_nce_module_uses_the_metric_and_its_scale():
    N, D = 8, 5
    m = fk.RandersMetric(D, full_sigma=True, dtype=torch.float64)
    a, p = leaves((N, D), (N, D))
    loss = fk.FAIMInfoNCELoss(m, scale=3.0, symmetric=True)
    L, beta, lam = m.metric_args()
    want = randers_info_nce(a, p, L, beta, lam, 3.0, symmetric=True)
    assert_rel_close(loss(a, p), want, 1e-12, "module")
    assert {n for n, _ in loss.named_parameters()} == {"metric." + n for n, _ in m.named_parameters()}
    loss(a, p).backward()
    assert m.L.grad is not None and m.beta.grad is not None and m.lmbda.grad is not None


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nt_xent_against_plain_pytorch(full, reduction):
    N, D = 6, 5
    z1, z2 = leaves((N, D), (N, D), seed=4)
    L, beta, lam, gamma = metric(D, full, seed=5)
    ins = [z1, z2, L, beta, lam, gamma]
    out = randers_nt_xent(z1, z2, L, beta, lam, gamma, reduction=reduction)

    r1, r2, rL, rbeta, rlam, rgamma = ref_ins = clones(ins)
    z = torch.cat([r1, r2])
    d = reference.randers_distance(z, z, rL, rbeta, rlam)
    losses = []
    for i in range(2 * N):  # row by row, the self-pair dropped
        others = [j for j in range(2 * N) if j != i]
        pos = others.index((i + N) % (2 * N))
        losses.append(-torch.log_softmax(-rgamma * d[i, others], 0)[pos])
    ref = torch.stack(losses)
    ref = ref.mean() if reduction == "mean" else ref
    assert_same_value_and_grads(out, ref, ins, ref_ins)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_triplet_against_plain_pytorch(full, reduction):
    N, D = 12, 6
    a, p, n = leaves((N, D), (N, D), (N, D), seed=6)
    L, beta, lam, _ = metric(D, full, seed=7)
    ins = [a, p, n, L, beta, lam]
    out = randers_triplet_loss(a, p, n, L, beta, lam, margin=1.5, reduction=reduction)

    ra, rp, rn, rL, rbeta, rlam = ref_ins = clones(ins)
    d_ap = torch.diagonal(reference.randers_distance(ra, rp, rL, rbeta, rlam))
    d_an = torch.diagonal(reference.randers_distance(ra, rn, rL, rbeta, rlam))
    per = torch.clamp(d_ap - d_an + 1.5, min=0)
    assert 0 < int((per > 0).sum()) < N  # both sides of the hinge are exercised
    ref = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    assert_same_value_and_grads(out, ref, ins, ref_ins)


@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_hard_triplet_against_plain_pytorch(full, reduction):
    N, D = 14, 5
    (emb,) = leaves((N, D), seed=8)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 1, 2, 4, 4, 5])  # class 3 and 5: no positive
    L, beta, lam, _ = metric(D, full, seed=9)
    ins = [emb, L, beta, lam]
    out = randers_batch_hard_triplet_loss(emb, labels, L, beta, lam, margin=2.0, reduction=reduction)

    re, rL, rbeta, rlam = ref_ins = clones(ins)
    d = reference.randers_distance(re, re, rL, rbeta, rlam)
    per, valid = [], []
    for i in range(N):
        pos = [j for j in range(N) if labels[j] == labels[i] and j != i]
        neg = [j for j in range(N) if labels[j] != labels[i]]
        if not pos or not neg:
            per.append(torch.zeros((), dtype=torch.float64))
            continue
        hp = torch.stack([d[i, j] for j in pos]).max()
        hn = torch.stack([d[i, j] for j in neg]).min()
        per.append(torch.clamp(hp - hn + 2.0, min=0))
        valid.append(i)
    ref = torch.stack(per)
    ref = ref.sum() / len(valid) if reduction == "mean" else ref
    assert_same_value_and_grads(out, ref, ins, ref_ins)


def test_triplet_module_modes_share_a_head_metric():
    D = 6
    head = fk.FAIMHead(D, 3, full_sigma=True, dtype=torch.float64)
    a, p, n = leaves((5, D), (5, D), (5, D))
    L, beta, lam = head.metric_args()
    plain = fk.FAIMTripletLoss(head, margin=0.5)
    assert_rel_close(plain(a, p, n), randers_triplet_loss(a, p, n, L, beta, lam, 0.5), 1e-12, "triplet")
    hard = fk.FAIMTripletLoss(head, margin=0.5, mining="batch_hard")
    emb, labels = torch.cat([a, p]), torch.tensor([0, 1, 2, 0, 1] * 2)
    assert_rel_close(hard(emb, labels), randers_batch_hard_triplet_loss(emb, labels, L, beta, lam, 0.5), 1e-12, "hard")
    with pytest.raises(TypeError, match="embeddings, labels"):
        hard(a, p, n)
    with pytest.raises(TypeError, match="anchor, positive, negative"):
        plain(emb, labels)
    with pytest.raises(ValueError, match="mining"):
        fk.FAIMTripletLoss(head, mining="semi_hard")


def test_float32_losses_close_to_float64():
    N, D = 16, 8
    a64, p64 = leaves((N, D), (N, D), seed=11)
    L, beta, lam, gamma = metric(D, True, seed=12)
    want = randers_info_nce(a64, p64, L, beta, lam, gamma)
    got = randers_info_nce(a64.float(), p64.float(), L.float(), beta.float(), lam.float(), gamma.float())
    assert got.dtype == torch.float32
    assert_rel_close(got, want, 1e-4, "info_nce float32")
    labels = torch.arange(N) % 4
    want = randers_batch_hard_triplet_loss(a64, labels, L, beta, lam)
    got = randers_batch_hard_triplet_loss(a64.float(), labels, L.float(), beta.float(), lam.float())
    assert_rel_close(got, want, 1e-4, "batch hard float32")


def test_bad_input_and_edge_cases():
    D = 4
    L, beta, lam, gamma = metric(D, False)
    a = torch.randn(3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="same shape"):
        randers_info_nce(a, a[:2], L, beta, lam, gamma)
    with pytest.raises(ValueError, match="reduction"):
        randers_triplet_loss(a, a, a, L, beta, lam, reduction="max")
    with pytest.raises(ValueError, match="lam must be >= 0"):
        randers_paired_distance(a, a, L, beta, -1.0)
    with pytest.raises(ValueError, match="shapes"):
        randers_paired_distance(a, a, L[:3], beta, lam)
    with pytest.raises(ValueError, match="labels"):
        randers_batch_hard_triplet_loss(a, torch.zeros(2, dtype=torch.long), L, beta, lam)
    with pytest.raises(TypeError, match="metric"):
        fk.FAIMTripletLoss(torch.nn.Linear(2, 2))
    empty = torch.zeros(0, D, dtype=torch.float64)
    assert randers_batch_hard_triplet_loss(empty, torch.zeros(0, dtype=torch.long), L, beta, lam).item() == 0.0
    # one class only: no anchor has a negative, so nothing counts
    one = randers_batch_hard_triplet_loss(a, torch.zeros(3, dtype=torch.long), L, beta, lam)
    assert one.item() == 0.0
    one.backward()  # and it is still part of the graph
