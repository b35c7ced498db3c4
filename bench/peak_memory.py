"""Peak extra host memory of one call, measured in a fresh process.

CPU tensors have no caching allocator to ask, so the probe reads the kernel's own accounting of
resident memory (bench/measure.py's host_peak_bytes): the peak extra memory of the call beyond the
inputs (and, for forward+backward, the incoming gradient), which exist before it. A fresh process
per measurement keeps one implementation's freed pages from hiding another's.

    python -m bench.peak_memory IMPL B C D MODE [full]     (MODE: fwd | fwdbwd)
"""
from __future__ import annotations

import sys

import torch

from bench.measure import host_peak_bytes, peak_bytes_in_fresh_process, print_probe


def measure(impl: str, B: int, C: int, D: int, mode: str, full: bool = False) -> int:
    """Runs the probe in a fresh interpreter; returns bytes (or -1 if the probe failed)."""
    return peak_bytes_in_fresh_process(["bench.peak_memory", impl, str(B), str(C), str(D), mode]
                                       + (["full"] if full else []))


def _main(argv):
    from bench.impls import LOGITS_IMPLS, LinearCE, make_inputs
    impl, B, C, D, mode = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    full = len(argv) > 5 and argv[5] == "full"
    inputs = make_inputs(B, C, D, full=full, requires_grad=(mode == "fwdbwd"))
    if impl == "linear_ce":
        head = LinearCE(C, D, torch.float32, "cpu")
        target = torch.randint(0, C, (B,))
        x = inputs[0]

        def run():
            loss = head(x, target)
            if mode == "fwdbwd":
                loss.backward()
    else:
        f = LOGITS_IMPLS[impl]
        grad = torch.randn(B, C)

        def run():
            out = f(*inputs)
            if mode == "fwdbwd":
                torch.autograd.grad(out, inputs, grad)
    # Import-time and first-call allocations (libraries, thread pools) on a tiny problem first.
    small = make_inputs(2, 3, D, full=full, requires_grad=True)
    if impl != "linear_ce":
        out = LOGITS_IMPLS[impl](*small)
        torch.autograd.grad(out, small, torch.ones_like(out))
    print_probe(host_peak_bytes(run))


if __name__ == "__main__":
    _main(sys.argv[1:])
