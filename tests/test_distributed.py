"""The class-sharded cross-entropy and top-k (faim_kernels.distributed) on 2 and 3 CPU processes
with the gloo backend over loopback: on every rank, the loss and the gradients of x, L, beta, lam,
gamma equal the single-process ones, and each rank's slice of mu gets its slice of the gradient;
the top-k distances and global indices equal the single-process ones."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import faim_kernels as fk
from conftest import INTERPRET, assert_norm_close, assert_rel_close, end_process_group, free_port, make_inputs
from faim_kernels.distributed import shard_range, sharded_randers_cross_entropy, sharded_randers_topk

NAMES = ["x", "L", "beta", "lam", "gamma"]

# Each case: the problem, the options, and the class boundaries per world size (None: shard_range).
CASES = [
    dict(B=9, C=11, D=5, full=False, dtype=torch.float64, backend="cpp", bounds=None,
         opts=dict(margin=0.3, label_smoothing=0.1, reduction="mean")),
    dict(B=7, C=600, D=6, full=True, dtype=torch.float64, backend="cpp", bounds=None,
         opts=dict(reduction="sum", label_smoothing=0.2)),
    dict(B=6, C=10, D=4, full=True, dtype=torch.float64, backend="reference", bounds=None,
         opts=dict(margin=0.5, reduction="none")),
    # uneven slices, one of them empty
    dict(B=8, C=12, D=3, full=False, dtype=torch.float64, backend="cpp", bounds={2: [0, 0, 12], 3: [0, 9, 9, 12]},
         opts=dict(margin=0.2, label_smoothing=0.3, reduction="mean")),
    dict(B=16, C=300, D=8, full=False, dtype=torch.float32, backend="cpp", bounds=None,
         opts=dict(margin=0.1, label_smoothing=0.05, reduction="mean")),
    # The cross-entropy options: class weights, probability targets (dense, and k pairs per row),
    # z-loss, the returned logsumexp; "form" names the target, "weighted" adds class weights.
    dict(B=9, C=13, D=4, full=True, dtype=torch.float64, backend="cpp", bounds=None, form="index", weighted=True,
         opts=dict(label_smoothing=0.2, reduction="mean", lse_square_scale=0.01, return_lse=True)),
    dict(B=8, C=12, D=3, full=False, dtype=torch.float64, backend="cpp", bounds={2: [0, 0, 12], 3: [0, 9, 9, 12]},
         form="dense", weighted=True, opts=dict(label_smoothing=0.1, reduction="none", lse_square_scale=0.02)),
    dict(B=7, C=11, D=5, full=True, dtype=torch.float64, backend="cpp", bounds=None, form="pairs", weighted=True,
         opts=dict(label_smoothing=0.1, reduction="mean", lse_square_scale=0.01, return_lse=True)),
    dict(B=6, C=10, D=4, full=False, dtype=torch.float64, backend="cpp", bounds=None, form="pairs", weighted=False,
         opts=dict(reduction="sum")),
    dict(B=6, C=10, D=4, full=False, dtype=torch.float64, backend="reference", bounds=None, form="dense",
         weighted=False, opts=dict(reduction="mean", label_smoothing=0.3)),
]


def _targets(B, C, seed, form="index"):
    g = torch.Generator().manual_seed(seed)
    if form == "dense":
        return torch.softmax(3 * torch.randn(B, C, generator=g, dtype=torch.float64), dim=1)
    if form == "pairs":  # mixup of each row with another, per-row lam, and timm's smoothing
        a, b = torch.randint(0, C, (2, B), generator=g)
        return fk.mixup_soft_targets(a, b, torch.rand(B, generator=g), smoothing=0.1)
    target = torch.randint(0, C, (B,), generator=g)
    target[1::4] = -100
    return target


def _run_case(case, rank, world, seed, group=None):
    B, C, D, dtype = case["B"], case["C"], case["D"], case["dtype"]
    full_inputs = make_inputs(B, C, D, full=case["full"], dtype=dtype, seed=seed, requires_grad=True)
    target = _targets(B, C, seed, case.get("form", "index"))
    opts = dict(case["opts"])
    learned = []  # a weighted case learns its class weights: their gradient is checked too
    if case.get("weighted"):
        opts["weight"] = 0.2 + torch.rand(C, dtype=dtype, generator=torch.Generator().manual_seed(seed + 2))
        learned = [opts["weight"].requires_grad_()]
    return_lse = opts.get("return_lse", False)
    weight = torch.randn(B if opts["reduction"] == "none" else (), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(seed + 1))
    lse_weight = torch.randn(B, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 3))

    def objective(out):  # the loss and, where returned, the logsumexp, weighted at random
        loss, lse = out if return_lse else (out, None)
        return (loss.double() * weight).sum() + (0.0 if lse is None else (lse.double() * lse_weight).sum())

    out1 = fk.randers_cross_entropy(*full_inputs, target, backend=case["backend"], **opts)
    loss1 = out1[0] if return_lse else out1
    grads1 = torch.autograd.grad(objective(out1), full_inputs + learned)

    bounds = case["bounds"][world] if case["bounds"] else None
    start, stop = (bounds[rank], bounds[rank + 1]) if bounds else shard_range(C, rank, world)
    x, mu, L, beta, lam, gamma = [t.detach().clone().requires_grad_() for t in full_inputs]
    mu_shard = mu[start:stop].detach().clone().requires_grad_()
    if learned:
        opts["weight"] = opts["weight"].detach().clone().requires_grad_()
    out = sharded_randers_cross_entropy(x, mu_shard, L, beta, lam, gamma, target, backend=case["backend"],
                                        group=group, **opts)
    objective(out).backward()
    loss = out[0] if return_lse else out

    tol = 1e-12 if dtype == torch.float64 else 1e-5
    where = f"rank {rank}/{world}, case {case}"
    assert loss.dtype == dtype, where
    assert_rel_close(loss, loss1, tol, f"loss ({where})")
    if return_lse:
        assert_rel_close(out[1], out1[1], tol, f"lse ({where})")
    for name, t, g1 in zip(NAMES, (x, L, beta, lam, gamma), (grads1[0],) + grads1[2:]):
        assert_norm_close(t.grad, g1, 10 * tol, f"d{name} ({where})")
    if learned:  # every rank gets the full gradient of the class weights
        assert_norm_close(opts["weight"].grad, grads1[6], 10 * tol, f"dweight ({where})")
    assert mu_shard.grad.shape == (stop - start, D)
    if stop > start:
        assert_norm_close(mu_shard.grad, grads1[1][start:stop], 10 * tol, f"dmu[{start}:{stop}] ({where})")


def _gathered_batch(rank, world):
    """The module docstring's pattern: each rank holds its own rows of x, gathers the batch, and
    its rows get their single-process gradient."""
    B, C, D = 4 * world, 10, 5
    inputs = make_inputs(B, C, D, dtype=torch.float64, seed=5, requires_grad=True)
    target = _targets(B, C, 5)
    loss1 = fk.randers_cross_entropy(*inputs, target, backend="cpp", label_smoothing=0.1)
    dx1 = torch.autograd.grad(loss1, inputs[0])[0]

    feats = inputs[0].detach()[4 * rank:4 * rank + 4].clone().requires_grad_()
    parts = [torch.empty_like(feats) for _ in range(world)]
    dist.all_gather(parts, feats.detach())
    parts[rank] = feats
    start, stop = shard_range(C, rank, world)
    mu = inputs[1].detach()[start:stop].clone().requires_grad_()
    L, beta, lam, gamma = [t.detach() for t in inputs[2:]]
    loss = sharded_randers_cross_entropy(torch.cat(parts), mu, L, beta, lam, gamma, target, backend="cpp",
                                         label_smoothing=0.1)
    loss.backward()
    assert_rel_close(loss, loss1, 1e-12, "loss (gathered batch)")
    assert_norm_close(feats.grad, dx1[4 * rank:4 * rank + 4], 1e-11, f"own rows of dx (rank {rank})")


# Top-k cases. Each rank's kernel centres its own slice (docs/design.md §2.1, near pairs), so its distances can differ
# from the single-process ones in the last bits: distances are compared within the float32/float64
# bounds and indices exactly, except among true ties. With "periodic" prototypes (period 2, and
# every slice a whole number of periods) each rank holds the same rows, so copies on different
# ranks tie bitwise and the merge must order them by global index exactly as one process does.
TOPK_CASES = [
    dict(B=9, C=40, D=5, k=6, largest=False, dtype=torch.float32, bounds=None),
    dict(B=7, C=13, D=4, k=9, largest=True, dtype=torch.float64, bounds={2: [0, 3, 13], 3: [0, 0, 4, 13]}),
    dict(B=5, C=12, D=3, k=12, largest=False, dtype=torch.float32, bounds=None, periodic=True),
    dict(B=6, C=12, D=3, k=5, largest=True, dtype=torch.float64, bounds=None, periodic=True),
    dict(B=6, C=11, D=3, k=11, largest=False, dtype=torch.float32, bounds=None, nan=True),
    dict(B=6, C=11, D=3, k=4, largest=True, dtype=torch.float32, bounds=None, nan=True),
]


def _run_topk_case(case, rank, world, seed, group=None):
    B, C, D, k = case["B"], case["C"], case["D"], case["k"]
    x, mu, L, beta, lam, _ = make_inputs(B, C, D, dtype=case["dtype"], seed=seed)
    if case.get("periodic"):
        mu = mu[:2].repeat(C // 2, 1)
    if case.get("nan"):
        mu[5, 1] = float("nan")
    d1, i1 = fk.randers_topk(x, mu, L, beta, lam, k, largest=case["largest"], backend="cpp")
    bounds = case["bounds"][world] if case["bounds"] else None
    start, stop = (bounds[rank], bounds[rank + 1]) if bounds else shard_range(C, rank, world)
    d, idx = sharded_randers_topk(x, mu[start:stop], L, beta, lam, k, largest=case["largest"], backend="cpp",
                                  group=group)
    where = f"rank {rank}/{world}, case {case}"
    tol = 1e-12 if case["dtype"] == torch.float64 else 1e-5
    assert d.dtype == case["dtype"] and idx.dtype == torch.int64 and d.shape == idx.shape == (B, k), where
    assert torch.equal(d.isnan(), d1.isnan()), f"NaN positions ({where})"
    assert_rel_close(d.nan_to_num(0.0), d1.nan_to_num(0.0), tol, f"distances ({where})")
    if case.get("periodic"):
        assert torch.equal(idx, i1), f"tie order ({where}): {idx.tolist()} vs {i1.tolist()}"
    d_all = fk.reference.randers_distance(*[t.double() for t in (x, mu, L, beta, lam)])
    differ = idx != i1
    a, b = d_all.gather(1, idx)[differ], d_all.gather(1, i1)[differ]
    assert ((a - b).abs() <= tol * b.abs()).all(), f"indices beyond a tie ({where}): {idx.tolist()} vs {i1.tolist()}"


def _worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        # Two processes: a group of ranks 0 and 1 (rank 2 sits it out); three: the whole world.
        pair = dist.new_group([0, 1])
        if rank < 2:
            for i, case in enumerate(CASES):
                _run_case(case, rank, 2, seed=10 + i, group=pair)
            for i, case in enumerate(TOPK_CASES):
                _run_topk_case(case, rank, 2, seed=30 + i, group=pair)
        dist.barrier()
        for i, case in enumerate(CASES):
            _run_case(case, rank, world, seed=20 + i)
        for i, case in enumerate(TOPK_CASES):
            _run_topk_case(case, rank, world, seed=40 + i)
        _gathered_batch(rank, world)
    finally:
        end_process_group()


def test_sharded_equals_single_process_on_2_and_3_processes():
    """One spawn of three processes (starting each costs seconds): the cases run on a group of
    two of them, then on all three."""
    mp.spawn(_worker, args=(3, free_port()), nprocs=3, join=True)


@pytest.fixture
def single_process_group():
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_and_validation(single_process_group):
    _run_case(CASES[0], 0, 1, seed=3)
    if INTERPRET:  # the Triton kernels through the same layer (small: the interpreter is slow)
        _run_case(dict(CASES[0], B=5, C=7, D=3, backend="triton"), 0, 1, seed=4)
        pairs_case = next(c for c in CASES if c.get("form") == "pairs" and c.get("weighted"))
        _run_case(dict(pairs_case, B=5, C=7, D=3, backend="triton"), 0, 1, seed=5)
    x, mu, L, beta, lam, gamma = make_inputs(4, 5, 3)
    with pytest.raises(ValueError, match="out of range"):
        sharded_randers_cross_entropy(x, mu, L, beta, lam, gamma, torch.tensor([0, 1, 2, 5]))
    with pytest.raises(ValueError, match="reduction"):
        sharded_randers_cross_entropy(x, mu, L, beta, lam, gamma, torch.tensor([0, 1, 2, 3]), reduction="avg")
    _run_topk_case(TOPK_CASES[0], 0, 1, seed=5)
    with pytest.raises(ValueError, match="k must be in"):
        sharded_randers_topk(x, mu, L, beta, lam, 6)


def test_shard_range_covers_every_class_once():
    for C in (0, 1, 7, 12):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(C, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == C
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [b - a for a, b in ranges]
            assert max(sizes) - min(sizes) <= 1
