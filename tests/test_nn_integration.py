"""FAIMHead inside whole models: DistributedDataParallel (gloo, 2 processes on loopback) gives the
single-process gradients, torch.compile(fullgraph=True) of a small CNN with the head and its .loss
matches eager, and channels-last / non-contiguous / expanded features give the contiguous results.
(FAIMBlock's metric as a submodule: tests/test_nn_block.py.)"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import faim_kernels as fk
from faim_kernels.nn import head as head_module
from tests.conftest import assert_norm_close, assert_rel_close, end_process_group, free_port

C = 6


class Net(nn.Module):
    """A small CNN (conv-ReLU, no BatchNorm: its batch statistics would differ per rank) and a FAIMHead."""

    def __init__(self, full: bool, D: int = 8):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, D, 3, stride=2),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = fk.FAIMHead(D, C, full_sigma=full)

    def forward(self, x, target=None):
        """The logits, or with a target the fused loss (the pattern for losses that take features)."""
        feats = self.backbone(x)
        return self.head(feats) if target is None else self.head.loss(feats, target, label_smoothing=0.1)


def _batch(n=8):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 3, 7, 7, generator=g, dtype=torch.float64),
            torch.randint(0, C, (n,), generator=g))


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _single_process(full: bool, via_loss: bool):
    torch.manual_seed(0)
    model = Net(full).double()
    x, y = _batch()
    loss = model(x, y) if via_loss else F.cross_entropy(model(x), y)
    loss.backward()
    return model.state_dict(), _grads(model)


def _ddp_worker(rank, world, port):
    from torch.nn.parallel import DistributedDataParallel as DDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x, y = _batch()
        rows = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
        for full, via_loss in ((False, False), (True, True)):  # each DDP construction costs ~1 s here
            state, want = _single_process(full, via_loss)
            model = Net(full).double()
            model.load_state_dict(state)
            ddp = DDP(model)  # find_unused_parameters=False: every parameter must get its gradient
            out = ddp(x[rows], y[rows]) if via_loss else F.cross_entropy(ddp(x[rows]), y[rows])
            out.backward()  # DDP averages the ranks' gradients: the mean over the whole batch
            got = _grads(model)
            assert got.keys() == want.keys()
            for name in want:
                assert_norm_close(got[name], want[name], 1e-10,
                                  f"{name} (rank {rank}, full={full}, via_loss={via_loss})")
            del ddp, out  # the reducer holds the process group: gone before the group (end_process_group)
    finally:
        end_process_group()


def test_distributed_data_parallel_gives_the_single_process_gradients():
    """Two ranks with half the batch each: after DDP's all-reduce every parameter of backbone and head
    (mu, beta, lmbda, scale, Sigma's) holds the full-batch gradient: logits + F.cross_entropy with a
    diagonal Sigma, and head.loss inside the wrapped forward with a full one."""
    mp.spawn(_ddp_worker, args=(2, free_port()), nprocs=2, join=True)


def test_torch_compile_fullgraph_of_a_model_with_the_head_and_its_loss(monkeypatch):
    """The whole model (conv, BatchNorm, head) and the fused loss in one graph: dynamo traces the
    head's Python, the custom ops' fake kernels and autograd formulas, without a graph break."""
    # Eager and compiled calls take the same (Cholesky) metric factor: the conv bias's gradient is
    # zero through BatchNorm up to rounding (~1e-6 against ~40 for the others), so its relative error
    # compares rounding noise, which differs between the two factors (docs/design.md Eq. 23).
    monkeypatch.setattr(head_module, "WIDE_FACTOR_MAX_COST", 0.0)
    torch._dynamo.reset()
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = fk.FAIMHead(4, C, full_sigma=True)

    def step(x, y):
        feats = backbone(x)
        return head(feats), head.loss(feats, y, margin=0.1)

    x, y = torch.randn(5, 3, 6, 6), torch.randint(0, C, (5,))
    params = [*backbone.parameters(), *head.parameters()]
    logits, loss = step(x, y)
    want = torch.autograd.grad(loss + logits.square().mean(), params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    c_logits, c_loss = compiled(x, y)
    got = torch.autograd.grad(c_loss + c_logits.square().mean(), params)
    assert_rel_close(c_logits, logits, 1e-5, "compiled logits")
    assert_rel_close(c_loss, loss, 1e-5, "compiled loss")
    for p, g, w in zip(params, got, want):
        assert_norm_close(g, w, 1e-4, f"compiled gradient {tuple(p.shape)}")


COLD_COMPILE = textwrap.dedent("""
    import sys, torch
    from torch import nn
    import faim_kernels as fk
    from faim_kernels import _cpp_loader

    what, full = sys.argv[1], sys.argv[2] == "full"
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = nn.Sequential(backbone, fk.FAIMHead(4, 5, full_sigma=full)).eval()
    x, y = torch.randn(3, 3, 6, 6), torch.tensor([0, 4, 2])
    step = model if what == "forward" else (lambda x, y: model[1].loss(model[0](x), y))
    args = (x,) if what == "forward" else (x, y)
    assert _cpp_loader._loaded_from() is None, "the kernels were loaded before the compile"
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)  # the process's first call
    assert _cpp_loader._loaded_from() is not None
    want = step(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    print("ok", _cpp_loader._loaded_from()[0])
""")


@pytest.mark.parametrize("what", ["forward", "loss"])
@pytest.mark.parametrize("sigma", ["diagonal", "full"])
def test_torch_compile_fullgraph_as_the_first_call_of_a_process(what, sigma):
    """A fresh process whose first call is torch.compile(fullgraph=True) of a model with the head (or
    of its .loss): the C++ kernels are loaded while Dynamo traces, and tracing does not stop at the
    loader's lock (a graph break, an error under fullgraph=True). In-process tests cannot show it:
    an earlier test has loaded the kernels."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", COLD_COMPILE, what, sigma], capture_output=True, text=True,
                         timeout=600, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and res.stdout.startswith("ok"), res.stdout + res.stderr[-4000:]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_channels_last_and_non_contiguous_features(backend):
    torch.manual_seed(0)
    D = 8
    head = fk.FAIMHead(D, C, full_sigma=True, backend=backend, dtype=torch.float64)
    conv = nn.Conv2d(3, D, 3, padding=1).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    target = torch.randint(0, C, (2, 5, 5))

    def run(model_x, to_features):
        for p in [*conv.parameters(), *head.parameters()]:
            p.grad = None
        feats = to_features(conv(model_x))
        logits = head(feats)
        loss = head.loss(feats, target)
        (loss + logits.square().mean()).backward()
        return logits.detach(), loss.detach(), [p.grad.clone() for p in [*conv.parameters(), *head.parameters()]]

    # per-pixel features [B, H, W, D]: a permuted (non-contiguous) view, then the contiguous copy
    want = run(x, lambda f: f.permute(0, 2, 3, 1).contiguous())
    cases = {
        "permuted view": (x, lambda f: f.permute(0, 2, 3, 1)),
        "channels_last input": (x.to(memory_format=torch.channels_last), lambda f: f.permute(0, 2, 3, 1)),
    }
    for what, (inp, to_features) in cases.items():
        got = run(inp, to_features)
        assert not to_features(conv(inp)).is_contiguous() or what == "channels_last input"
        assert_rel_close(got[0], want[0], 1e-12, f"logits ({what})")
        assert_rel_close(got[1], want[1], 1e-12, f"loss ({what})")
        for g, w in zip(got[2], want[2]):
            assert_norm_close(g, w, 1e-11, f"gradient ({what})")

    # strided, transposed and expanded [B, D] features against their contiguous copies
    wide = torch.randn(6, 2 * D, dtype=torch.float64)
    for what, f in {"strided": wide[:, ::2], "transposed": torch.randn(D, 6, dtype=torch.float64).t(),
                    "expanded": wide[:1, :D].expand(6, D)}.items():
        assert not f.is_contiguous()
        t = torch.randint(0, C, (6,))
        assert_rel_close(head(f), head(f.contiguous()), 1e-12, f"logits ({what})")
        assert_rel_close(head.loss(f, t), head.loss(f.contiguous(), t), 1e-12, f"loss ({what})")
        fg, cg = f.clone().requires_grad_(), f.contiguous().requires_grad_()
        head.loss(fg, t).backward()
        head.loss(cg, t).backward()
        assert_norm_close(fg.grad, cg.grad, 1e-12, f"d features ({what})")
