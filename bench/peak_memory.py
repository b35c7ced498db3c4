"""Peak extra host memory of one call, measured in a fresh process.

CPU tensors have no caching allocator to ask, so the probe reads the kernel's own accounting of
resident memory: it resets the high-water mark (writing 5 to /proc/self/clear_refs, Linux), reads
VmRSS, runs the call once, and reports VmHWM − VmRSS_before: the peak extra memory of the call
beyond the inputs (and, for forward+backward, the incoming gradient), which exist before it.
A fresh process per measurement keeps one implementation's freed pages from hiding another's.

    python -m bench.peak_memory IMPL B C D MODE [full]     (MODE: fwd | fwdbwd)
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import torch


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def measure_here(fn) -> int:
    """Bytes of peak extra resident memory while fn() runs."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


def measure(impl: str, B: int, C: int, D: int, mode: str, full: bool = False) -> int:
    """Runs the probe in a fresh interpreter; returns bytes (or -1 if the probe failed)."""
    cmd = [sys.executable, "-m", "bench.peak_memory", impl, str(B), str(C), str(D), mode] + (["full"] if full else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-2000:])
        return -1
    return json.loads(res.stdout.strip().splitlines()[-1])["bytes"]


def _main(argv):
    from bench.impls import LOGITS_IMPLS, LinearCE, make_inputs
    impl, B, C, D, mode = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), argv[4]
    full = len(argv) > 5 and argv[5] == "full"
    torch.set_num_threads(torch.get_num_threads())
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
    print(json.dumps({"bytes": measure_here(run)}))


if __name__ == "__main__":
    _main(sys.argv[1:])
