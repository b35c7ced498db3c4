"""Triton internals the family tests do not reach on their own: the near-pair list and its
overflow (whole list and per tile), the backward's noted pairs vs its inline path, D chunks and
splits of the backward, TF32 as an opt-in, 64-bit offsets, the sm_90 build, and the clear error on
CPU tensors without the interpreter.

On a CUDA device, or on CPU tensors through Triton's interpreter (`TRITON_INTERPRET=1`); every
test runs with the kernels' output buffers poisoned with NaN.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import faim_kernels as fk
from conftest import (FWD_TOL, HAS_CUDA, INTERPRET, TRITON_DEVICE as DEVICE, TRITON_RUNS, assert_rel_close,
                      check_cross_entropy, check_logits, make_inputs, nearest_targets, poison_triton_outputs,
                      reference64)

pytestmark = [
    pytest.mark.interpret,
    pytest.mark.skipif(not TRITON_RUNS, reason="needs triton and a CUDA device, or TRITON_INTERPRET=1"),
]

needs_interpreter = pytest.mark.skipif(HAS_CUDA or not INTERPRET, reason="checks the CPU/interpreter path")
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
FULL = pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])


@pytest.fixture(autouse=True)
def _poisoned_outputs(monkeypatch):
    poison_triton_outputs(monkeypatch)


@pytest.fixture
def configs():
    from faim_kernels.ops.triton import configs
    return configs


def _inputs(*shape, **kw):
    return make_inputs(*shape, device=DEVICE, **kw)


def _near(*shape, **kw):
    return _inputs(*shape, near=True, lam=0.1, gamma=10.0, **kw)


@FULL
def test_backward_chunks_and_splits(monkeypatch, configs, full):
    """Narrow backward chunks: D is split over programs (each recomputing the GEMM tiles) and the
    other side over splits whose partial sums are added afterwards."""
    monkeypatch.setattr(configs, "BWD_BLOCK_D", {k: (16, 16) for k in configs.BWD_BLOCK_D})
    check_logits(_inputs(23, 34, 33, full=full, seed=7), "triton")
    check_logits(_near(10, 36, 40, full=full, seed=8), "triton", fwd_tol=1e-4, grad_tol=1e-3)


def test_near_list_overflow(monkeypatch, configs):
    """More near pairs than the lists hold: the forward's near-pair kernel recomputes every pair exactly,
    and the backward runs its second launch, which handles them inside the loop one at a time."""
    monkeypatch.setattr(configs, "NEAR_CAPACITY", 3)
    monkeypatch.setattr(configs, "BWD_NEAR_CAP", 2)
    for full in (False, True):
        check_logits(_near(20, 28, 24, full=full, seed=9), "triton", fwd_tol=1e-4, grad_tol=1e-3)


def test_near_pairs_per_tile_overflow(monkeypatch, configs):
    """A forward tile with more near pairs than it notes one by one marks the list overflowed."""
    monkeypatch.setattr(configs, "NEAR_PER_TILE", 1)
    inputs = _near(12, 20, 16, seed=17)
    with torch.no_grad():
        inputs[0][:4] = inputs[1][3] + 1e-3 * torch.randn(4, 16, device=DEVICE)  # four in one tile
    out = fk.randers_logits(*inputs, backend="triton")
    assert_rel_close(out, reference64(fk.reference.randers_logits, inputs), 1e-4)


def test_overfull_tile_is_recomputed_alone(monkeypatch, configs):
    """A forward tile with more near pairs than it lists is recomputed exactly, and only that tile:
    every other logit is bitwise what the call without the overfull tile gives (the whole call's
    pairs are not sent through the near-pair recompute)."""
    inputs = _inputs(70, 90, 16, seed=26)
    with torch.no_grad():
        inputs[0][:4] = inputs[1][3] + 1e-3 * torch.randn(4, 16, device=DEVICE)  # four near pairs in one tile
    default = fk.randers_logits(*inputs, backend="triton")
    monkeypatch.setattr(configs, "NEAR_PER_TILE", 1)
    overfull = fk.randers_logits(*inputs, backend="triton")
    ref = reference64(fk.reference.randers_logits, inputs)
    assert_rel_close(overfull, ref, 1e-4)
    from faim_kernels.ops.triton import common
    fam = "interpret" if common.INTERPRET else common.gemm_mode(torch.float32)[0]
    cfg = configs.FWD_CONFIGS[fam][0].kwargs
    tile_b, tile_c = cfg["BLOCK_B"], cfg["BLOCK_C"]
    outside = torch.ones_like(default, dtype=torch.bool)
    outside[:tile_b, (3 // tile_c) * tile_c:(3 // tile_c + 1) * tile_c] = False
    assert torch.equal(overfull[outside], default[outside])


@pytest.mark.parametrize("bwd_cap", [None, 4], ids=["noted", "inline"])
@FULL
def test_every_close_pair_recomputed(monkeypatch, configs, full, bwd_cap):
    """tau = 1: about half of all pairs are near pairs, mixed with GEMM pairs in the same
    tiles: in the forward list, and in the backward's noted pairs or (small cap) inline path."""
    monkeypatch.setattr(fk.transform, "near_threshold", lambda D, dtype, operand_eps=None: 1.0)
    if bwd_cap:
        monkeypatch.setattr(configs, "BWD_NEAR_CAP", bwd_cap)
    check_logits(_inputs(9, 14, 12, full=full, seed=10), "triton")


@pytest.mark.parametrize("bwd_cap", [None, 1], ids=["noted", "inline"])
def test_cross_entropy_near_pairs_noted_inline_and_chunked(monkeypatch, configs, bwd_cap):
    """The shared backward kernel's paths for the cross-entropy: near pairs and targets noted and
    handled after the loop, or (cap 1: every program overflows) the INLINE second launch; narrow D
    chunks, so each row block spans several programs."""
    monkeypatch.setattr(configs, "BWD_BLOCK_D", {k: (16, 16) for k in configs.BWD_BLOCK_D})
    if bwd_cap:
        monkeypatch.setattr(configs, "BWD_NEAR_CAP", bwd_cap)
    inputs = _inputs(10, 20, 40, full=True, near=True, gamma=0.05, seed=9)
    target = nearest_targets(inputs).to(DEVICE)
    check_cross_entropy(inputs, target, "triton", fwd_tol=1e-4, grad_tol=1e-3, reduction="none", margin=0.01)


def test_tf32_is_opt_in():
    """float32 GEMMs are IEEE by default; where PyTorch's matmuls may use TF32 the operands are
    rounded to TF32 (the result changes, within about 1e-3) and the near pairs stay exact."""
    inputs = _inputs(23, 31, 40, seed=13)
    ieee = fk.randers_logits(*inputs, backend="triton")
    ref = reference64(fk.reference.randers_logits, inputs)
    assert_rel_close(ieee, ref, 1e-5)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # what lets PyTorch's own float32 matmuls use TF32
    try:
        tf32 = fk.randers_logits(*inputs, backend="triton")
        near = _near(16, 24, 64, seed=14)
        near_out = fk.randers_logits(*near, backend="triton")
    finally:
        torch.set_float32_matmul_precision(before)
    assert not torch.equal(tf32, ieee)
    assert_rel_close(tf32, ref, 2e-3, "tf32 forward")
    ref = reference64(fk.reference.randers_logits, near)
    rows = torch.arange(16, device=DEVICE)
    target = ref.argmax(1)  # each sample's own prototype, the near pair
    assert_rel_close(near_out[rows, target], ref[rows, target], 1e-4, "tf32 near pairs")


@needs_interpreter
def test_cpu_without_interpreter_is_a_clear_error():
    code = ("import torch, faim_kernels as fk\n"
            "x, mu, L, beta = torch.randn(2, 3), torch.randn(4, 3), torch.rand(3), torch.randn(3)\n"
            "try:\n"
            "    fk.randers_logits(x, mu, L, beta, 0.1, 1.0, backend='triton')\n"
            "except ValueError as e:\n"
            "    assert 'TRITON_INTERPRET=1' in str(e), e\n"
            "    print('clear error')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and "clear error" in res.stdout, res.stderr[-2000:]


@pytest.mark.slow
@needs_interpreter  # on a GPU the family tests build every kernel they run
def test_kernels_build_for_sm90():
    """The interpreter never runs Triton's compiler: build each code path for sm_90 (H100/H200)
    with the ptxas that ships with triton, no GPU needed (bench/compile_check.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "bench.compile_check", "--quick"], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]


@gpu_only
@pytest.mark.slow
def test_64bit_offsets():
    """B·C past 2³¹: offsets into the [B, C] output and the gradient need 64 bits."""
    B, C, D = 65_600, 32_800, 16
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2 ** 30:
        pytest.skip("needs about 20 GB of GPU memory")
    x, mu, L, beta, lam, gamma = _inputs(B, C, D, dtype=torch.bfloat16, seed=16)
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    rows = torch.tensor([0, 1, B // 2, B - 2, B - 1], device=DEVICE)
    ref = reference64(fk.reference.randers_logits, [x[rows], mu, L, beta, lam, gamma])
    assert_rel_close(out[rows], ref, FWD_TOL[torch.bfloat16], "rows of a [B, C] past 2^31")
    del out
    x.requires_grad_()
    out = fk.randers_logits(x, mu, L, beta, lam, gamma, backend="triton")
    (gx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    assert torch.isfinite(gx).all()


@pytest.fixture
def autotuning(monkeypatch, configs):
    """Triton's real Autotuner on the real kernels, with two configs per kernel family and a
    stand-in timing function (the interpreter has no benchmarker) that runs each trial twice and
    ranks the configs in reverse, so the last config wins: the launches after tuning use a config
    other than the pinned first one. Yields the number of trials timed."""
    from faim_kernels.ops.triton import common
    trials = []

    def do_bench(kernel_call, quantiles=None, **_):
        kernel_call()
        kernel_call()
        trials.append(1)
        return [float(-len(trials))] * 3

    monkeypatch.setattr(configs, "AUTOTUNE", True)
    monkeypatch.setattr(configs, "DO_BENCH", do_bench)
    # Two configs per family (the first and another): the GPU builds stay few.
    b, f = configs.BWD_CONFIGS["interpret"][0], configs.FWD_CONFIGS["interpret"][0]
    monkeypatch.setitem(configs.BWD_CONFIGS, "interpret", [b, configs._bwd_cfg(32, 16, 32, 4, 1)])
    monkeypatch.setitem(configs.FWD_CONFIGS, "interpret", [f, configs._fwd_cfg(16, 32, 32, 4, 1, group=1)])
    for table in (configs.BWD_CONFIGS, configs.FWD_CONFIGS):
        for fam, cfgs in list(table.items()):
            if fam != "interpret" and len(cfgs) > 2:
                monkeypatch.setitem(table, fam, [cfgs[0], cfgs[-1]])
    assert common.INTERPRET or HAS_CUDA
    yield trials


@pytest.mark.parametrize("bwd_cap", [None, 2], ids=["noted", "overflow"])
def test_autotuned_backward_keeps_dlam_and_dgamma(autotuning, monkeypatch, configs, bwd_cap):
    """With autotuning on, every gradient of the first backward of a shape is right: the scalar
    sums of the first launch survive the second launch (which once was tuned on its own, its trials
    zeroing them), and after an overflow the second launch covers the first one's program grid."""
    if bwd_cap:
        monkeypatch.setattr(configs, "BWD_NEAR_CAP", bwd_cap)
    for seed, full in ((21, False), (22, True)):
        check_logits(_near(12, 40, 24, full=full, seed=seed), "triton", fwd_tol=1e-4, grad_tol=1e-3)
    inputs = _near(10, 36, 24, full=True, seed=23)
    check_cross_entropy(inputs, nearest_targets(inputs).to(DEVICE), "triton", fwd_tol=1e-4, grad_tol=1e-3,
                        reduction="none", margin=0.01)
    assert len(autotuning) >= 4  # the forward and the backward were tuned, not pinned


@pytest.mark.parametrize("gamma", [1e-40, 1e-44])
def test_tiny_gamma_backward_recomputes_the_tiles(gamma):
    """float32 γ = 1e-40: the logits −γ·d are subnormal (0 on a GPU, which flushes them) and
    cannot give d back; the backward recomputes the tiles there, as it does for γ = 0. (The
    interpreter keeps subnormals: at γ = 1e-44 they hold 1-2 digits, and the logits path was
    percent-level off there; the upstream gradient of 1e30 keeps x.grad a normal number.)"""
    for full in (False, True):
        inputs = _inputs(9, 21, 16, full=full, seed=24, gamma=gamma)
        for t in inputs:
            t.requires_grad_()
        out = fk.randers_logits(*inputs, backend="triton")
        gx, gmu = torch.autograd.grad(out, inputs[:2], torch.full_like(out, 1e30))
        ref_in = [t.detach().double().requires_grad_() for t in inputs]
        ref = fk.reference.randers_logits(*ref_in)
        rx, rmu = torch.autograd.grad(ref, ref_in[:2], torch.full_like(ref, 1e30))
        assert_rel_close(gx.double(), rx, 1e-4, f"x.grad at gamma = {gamma}")
        assert_rel_close(gmu.double(), rmu, 1e-4, f"mu.grad at gamma = {gamma}")


@pytest.mark.parametrize("family", ["logits", "cross_entropy"])
def test_grad_mask_skips_unneeded_gradients(family):
    """Gradients only where needed: an input without requires_grad gets None, the others are the
    full backward's, for a frozen backbone (x), frozen prototypes, a frozen metric, and only x;
    the launchers return an empty tensor for a gradient grad_mask does not ask for."""
    from faim_kernels.ops import triton as tri
    inputs = _near(11, 26, 20, full=True, seed=25)
    target = nearest_targets(inputs).to(DEVICE)

    def grads(needs):
        leaves = [t.detach().clone().requires_grad_(n) for t, n in zip(inputs, needs)]
        if family == "logits":
            out = fk.randers_logits(*leaves, backend="triton")
            out = (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum()
        else:
            out = fk.randers_cross_entropy(*leaves, target, margin=0.01, backend="triton")
        wanted = [t for t in leaves if t.requires_grad]
        got = iter(torch.autograd.grad(out, wanted))
        return [next(got) if t.requires_grad else None for t in leaves]

    full = grads([True] * 6)
    for needs in ([False, True, True, True, True, True], [True, False, True, True, True, True],
                  [True, True, False, False, False, False], [True, False, False, False, False, False],
                  [False, False, False, False, True, True], [False, True, False, False, False, False]):
        for name, g, f, n in zip(fk_names(), grads(needs), full, needs):
            if n:
                torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6, msg=f"{name} with {needs}")
            else:
                assert g is None, name
    o = (tri.logits.backward if family == "logits" else tri.cross_entropy.backward)
    assert o.__defaults__[-1] == 63  # grad_mask: every gradient unless told otherwise


def fk_names():
    return ["x", "mu", "L", "beta", "lam", "gamma"]


def test_grad_mask_at_the_launchers():
    """The backward launchers return an empty tensor of its input's dtype for a gradient grad_mask
    does not ask for, and the asked ones as the full backward gives them."""
    from faim_kernels.ops import triton as tri
    x, mu, L, beta, lam, gamma = _near(9, 17, 12, full=True, seed=27)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
    tau = fk.transform.near_threshold(12, torch.float32)
    logits, xp, mup, sx, smu = tri.logits.forward(x, mu, lc, beta, lam, gamma, 1e-6, tau)
    grad = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    full = tri.logits.backward(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, 1e-6, tau)
    for mask in (1, 2, 4, 8, 48, 1 | 32):
        got = tri.logits.backward(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, 1e-6, tau,
                                  grad_mask=mask)
        for k, (g, f, t) in enumerate(zip(got, full, (x, mu, lc, beta, lam, gamma))):
            if mask >> k & 1:
                torch.testing.assert_close(g, f, rtol=1e-5, atol=1e-6)
            else:
                assert g.numel() == 0 and g.dtype == t.dtype, (mask, k)


def test_dense_soft_target_by_position_and_by_name():
    """The cross-entropy launchers take the dense [B, C] probability target as dense_soft_target,
    positionally or by keyword (the same numbers bitwise), and read it."""
    from faim_kernels.ops import triton as tri
    x, mu, L, beta, lam, gamma = _near(7, 11, 10, seed=28)
    lc = fk.transform.metric_factor(L, 1e-6, torch.float32)
    tau = fk.transform.near_threshold(10, torch.float32)
    target = torch.full((7, 1), -1, dtype=torch.int64, device=DEVICE)
    dense = torch.softmax(torch.randn(7, 11, generator=torch.Generator().manual_seed(3)), 1).to(DEVICE)
    args = (x, mu, lc, beta, lam, gamma, target, 1e-6, tau, 0.0)
    by_name = tri.cross_entropy.forward(*args, dense_soft_target=dense)
    for a, b in zip(by_name, tri.cross_entropy.forward(*args, None, dense)):
        assert torch.equal(a, b)
    assert not torch.equal(by_name[3], tri.cross_entropy.forward(*args)[3])  # the target is read
    w = [torch.rand(7, dtype=torch.float64, device=DEVICE) for _ in range(3)]
    w_target_logit = torch.rand(7, 1, dtype=torch.float64, device=DEVICE)
    bwd = (w[0], w_target_logit, w[1], by_name[0], x, mu, lc, beta, lam, gamma, target, 1e-6, tau, 0.0, w[2])
    for a, b in zip(tri.cross_entropy.backward(*bwd, dense_soft_target=dense),
                    tri.cross_entropy.backward(*bwd, None, dense)):
        assert torch.equal(a, b)
