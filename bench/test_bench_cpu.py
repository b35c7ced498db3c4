"""pytest-benchmark cases for the CPU (not part of the test suite; run with
`.venv/bin/python -m pytest bench/test_bench_cpu.py --benchmark-enable`)."""
from __future__ import annotations

import pytest
import torch

from bench import impls

SIZES = [(256, 1000, 128), (512, 4096, 256)]
NAMES = ["einsum", "composite", "composite_compiled", "cpp"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_logits(benchmark, name, size, mode):
    B, C, D = size
    if name == "einsum" and B * C * D > 50_000_000:
        pytest.skip("the einsum reference takes seconds here; bench/cpu_bench.py times it once")
    f = impls.LOGITS_IMPLS[name]
    inputs = impls.make_inputs(B, C, D, requires_grad=(mode == "fwdbwd"))
    grad = torch.randn(B, C)
    benchmark.group = f"{mode} {B}x{C}x{D}"
    if mode == "fwd":
        with torch.no_grad():
            benchmark(f, *inputs)
    else:
        benchmark(lambda: torch.autograd.grad(f(*inputs), inputs, grad))


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_linear_cross_entropy(benchmark, size, mode):
    B, C, D = size
    head = impls.LinearCE(C, D, torch.float32, "cpu")
    x = torch.randn(B, D, requires_grad=True)
    target = torch.randint(0, C, (B,))
    benchmark.group = f"{mode} {B}x{C}x{D}"
    if mode == "fwd":
        with torch.no_grad():
            benchmark(head, x, target)
    else:
        benchmark(lambda: torch.autograd.grad(head(x, target), [x] + list(head.linear.parameters())))
