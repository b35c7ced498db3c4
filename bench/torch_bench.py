"""CPU benchmark of backend="torch" (plain PyTorch ops, faim_kernels/ops/torch_ops.py) against the C++
kernels: logits and fused cross-entropy forward+backward, peak memory, operator counts and the
near-prototype error (docs/design.md §2.1's case); then the cross-entropy at (512, 100000, 256)
through backend="auto" with the C++ kernels off (FAIM_KERNELS_CPP=0).

    python -m bench.torch_bench                  # table on the terminal
    python -m bench.torch_bench --write-results  # also rewrite the torch-cpu section of bench/RESULTS.md

How it measures, so that a shared, loaded machine still gives comparable numbers:
- Time: the torch and cpp calls of one shape alternate in one process (torch, cpp, torch, cpp, ...)
  and each keeps its fastest of N, so both see the same load; the ratio of the two is the number to
  quote. Twice: with 2 threads (the target's setting; under load a parallel region waits for a
  descheduled thread, which hurts the path with more regions), and with 1 thread as the CPU time of
  the calling thread (time.thread_time: the work itself, blind to time spent waiting for a core).
- Operators: top-level ATen calls per forward+backward (torch.profiler), a load-independent proxy
  for the per-call overhead and the number of parallel regions.
- Memory, in [B, C] float32 tensors, counting everything the call allocates (the returned logits and
  gradients, and every temporary; not the inputs or the incoming gradient): the peak of live tensor
  bytes from the profiler's allocation events, and the resident-set peak of a fresh process
  (bench/peak_memory.py) with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_), so
  that freed blocks leave the resident set as they do the tensors (with glibc's default, the
  dynamic threshold keeps freed chunk-sized blocks in the heap and adds allocator slack).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections import Counter

import torch

import faim_kernels as fk
from bench import impls
from bench.cpu_bench import environment, near_case_error
from bench.measure import fastest_interleaved
from bench.peak_memory import measure
from bench.results import write_section

SIZES = [(256, 1000, 128), (512, 4096, 256)]
BACKENDS = ("torch", "cpp")


def _calls(inputs, grad, target):
    """{(backend, 'logits' | 'ce'): forward+backward callable}."""
    calls = {}
    for be in BACKENDS:
        f = impls.LOGITS_IMPLS[be]
        calls[be, "logits"] = lambda f=f: torch.autograd.grad(f(*inputs), inputs, grad)
        calls[be, "ce"] = lambda be=be: torch.autograd.grad(
            fk.randers_cross_entropy(*inputs, target, backend=be), inputs)
    return calls


def live_peak_bytes(fn) -> int:
    """Peak of live tensor bytes allocated while fn() runs (the profiler's allocation events)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def top_level_ops(fn) -> int:
    """ATen calls per fn() made directly by Python (not from inside another ATen op)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.events()
    return sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def rss_peak_bytes(impl, B, C, D, full) -> int:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # (inherited by the fresh process only)
    try:
        return measure(impl, B, C, D, "fwdbwd", full)
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]


def run(rounds: int):
    rows = []
    threads = torch.get_num_threads()
    for full in (False, True):
        for (B, C, D) in SIZES:
            inputs = impls.make_inputs(B, C, D, full=full)
            grad = torch.randn(B, C)
            target = torch.randint(0, C, (B,))
            calls = _calls(inputs, grad, target)
            row = {"shape": (B, C, D), "full": full}
            row["wall2"] = fastest_interleaved(calls, rounds, time.perf_counter)
            torch.set_num_threads(1)
            try:
                row["cpu1"] = fastest_interleaved(calls, rounds, time.thread_time)
            finally:
                torch.set_num_threads(threads)
            row["ops"] = {k: top_level_ops(fn) for k, fn in calls.items()}
            row["live"] = {k: live_peak_bytes(fn) for k, fn in calls.items() if k[1] == "logits"}
            row["rss"] = {be: rss_peak_bytes(be, B, C, D, full) for be in BACKENDS}
            rows.append(row)
    errors = {(name, full): near_case_error(impls.LOGITS_IMPLS[name], full)
              for name in ("torch", "cpp", "composite") for full in (False, True)}
    return rows, errors


def big_auto_ce() -> str:
    """The cross-entropy fwd+bwd at (512, 100000, 256), diagonal L, through backend='auto' with the C++
    kernels off, in a fresh process: seconds and peak memory in [B, C] float32 tensors."""
    code = (
        "import torch, time, json, faim_kernels as fk\n"
        "from bench.impls import make_inputs\nfrom bench.measure import host_peak_bytes\n"
        "from bench.torch_bench import live_peak_bytes\n"
        "B, C, D = 512, 100000, 256\ninp = make_inputs(B, C, D)\nt = torch.randint(0, C, (B,))\n"
        "from faim_kernels.ops.dispatch import resolve_backend\n"
        "assert resolve_backend('auto', inp[0].device) == 'torch'\n"
        "def run():\n    torch.autograd.grad(fk.randers_cross_entropy(*inp, t), inp)\n"
        "t0 = time.perf_counter(); b = host_peak_bytes(run); s = time.perf_counter() - t0\n"
        "live = live_peak_bytes(run)\n"
        "print(json.dumps({'s': s, 'bytes': b, 'live': live}))\n")
    env = dict(os.environ, FAIM_KERNELS_CPP="0", MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return "failed: " + res.stderr[-500:]
    import json
    out = json.loads(res.stdout.strip().splitlines()[-1])
    bc = 512 * 100000 * 4
    return (f"(512, 100000, 256), diagonal L, fused cross-entropy forward+backward through backend='auto' "
            f"with FAIM_KERNELS_CPP=0 (so the torch path), one call: {out['s']:.1f} s; peak memory "
            f"{out['live'] / bc:.2f} [B, C] float32 tensors of live tensors, {out['bytes'] / bc:.2f} of "
            f"resident set ({out['live'] / 2 ** 20:.0f} / {out['bytes'] / 2 ** 20:.0f} MB; the [C, D] "
            f"gradient of mu alone is 0.50).")


def render(rows, errors, big: str, load) -> str:
    ms = lambda t: f"{t * 1e3:.1f}"  # noqa: E731
    bc = lambda r: r["shape"][0] * r["shape"][1] * 4  # noqa: E731
    lines = [
        "### backend='torch' (plain PyTorch ops) against the C++ kernels, CPU float32",
        "",
        environment() + f"; load average {load[0]} before the run, {load[1]} after (1-minute, 2 cores).",
        "",
        "Forward+backward, fastest of the interleaved rounds (ms, torch / cpp = ratio). 2 threads: wall",
        "time. 1 thread: CPU time of the calling thread.",
        "",
        "| Σ | B, C, D | logits, 2 threads | logits, 1 thread CPU | CE, 2 threads | CE, 1 thread CPU |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        B, C, D = r["shape"]
        cells = []
        for fam in ("logits", "ce"):
            for key in ("wall2", "cpu1"):
                t, c = r[key]["torch", fam], r[key]["cpp", fam]
                cells.append(f"{ms(t)} / {ms(c)} = {t / c:.2f}x")
        lines.append(f"| {'full' if r['full'] else 'diag'} | {B}, {C}, {D} | {cells[0]} | {cells[1]} | "
                     f"{cells[2]} | {cells[3]} |")
    lines += ["", "Top-level ATen calls per forward+backward (torch; the C++ kernels' calls are its custom ops "
              "and the preparation around them) and peak memory of the logits forward+backward in [B, C] "
              "float32 tensors (live tensors / resident set of a fresh process):", "",
              "| Σ | B, C, D | ops logits torch / cpp | ops CE torch / cpp | memory torch | memory cpp |",
              "|---|---|---|---|---|---|"]
    for r in rows:
        B, C, D = r["shape"]
        o = r["ops"]
        lines.append(
            f"| {'full' if r['full'] else 'diag'} | {B}, {C}, {D} | {o['torch', 'logits']} / {o['cpp', 'logits']} "
            f"| {o['torch', 'ce']} / {o['cpp', 'ce']} | {r['live']['torch', 'logits'] / bc(r):.2f} / "
            f"{r['rss']['torch'] / bc(r):.2f} | {r['live']['cpp', 'logits'] / bc(r):.2f} / {r['rss']['cpp'] / bc(r):.2f} |")
    lines += ["", "Near-prototype case (docs/design.md §2.1, float32, max relative error of the logits): "
              + ", ".join(
        f"{n} {'full' if f else 'diag'} {e:.1e}" for (n, f), e in errors.items()) + ".", "", big]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per call (fastest kept)")
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    before = os.getloadavg()[0]
    rows, errors = run(args.rounds)
    big = big_auto_ce()
    load = (f"{before:.1f}", f"{os.getloadavg()[0]:.1f}")
    text = render(rows, errors, big, load)
    print(text)
    if args.write_results:
        write_section("torch-cpu", text)


if __name__ == "__main__":
    main()
