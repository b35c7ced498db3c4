"""Forward+backward time and peak memory of the fused Randers cross-entropy (docs/design.md §2.2, the fused cross-entropy) against
the unfused paths and the cost floor of a classification head:

    fused          fk.randers_cross_entropy (C++ kernel on CPU, Triton on CUDA): no [B, C] logits
    logits+ce      F.cross_entropy(fk.randers_logits(...)): our fused logits kernel, then torch's CE
    composite+ce   F.cross_entropy over the plain-PyTorch GEMM composite (bench/impls.py)
    linear+ce      nn.Linear(D, C) + F.cross_entropy: the floor of any head of this size
and the fused loss's options beside the hard label, with the floor of the soft-target form:
    fused:weight       class weights and label smoothing 0.1 (hard labels)
    fused:dense        a dense [B, C] probability target (timm Mixup's output), read in place
    fused:pairs        the same mixup as SoftTargets: two (class, probability) pairs per row + smoothing
    linear+ce:dense    nn.Linear + F.cross_entropy with the dense probability target

Gradients are taken with respect to every input (x, mu, L, beta, lam, gamma; x, weight, bias).
Time: torch.utils.benchmark on CPU, triton.testing.do_bench on CUDA (median); the implementations
of a size are timed in turn, in rounds (--rounds, default 3), and each keeps its fastest round
(bench/measure.py).
Peak memory: the peak beyond the inputs during one forward+backward, gradients included (they
are allocated by the call). CPU: resident memory in a fresh process (bench/peak_memory.py);
CUDA: torch.cuda.max_memory_allocated() after reset_peak_memory_stats().

    python -m bench.ce_bench                          # CPU at (256, 1000, 128), (256, 100000, 128)
    python -m bench.ce_bench --device cuda            # CUDA at docs/benchmarks.md's sizes
    python -m bench.ce_bench --sizes 512,4096,256 --out ce.md
    TRITON_INTERPRET=1 python -m bench.ce_bench --backend triton --sizes 8,50,16 --min-time 0.1   # smoke

From another script (e.g. the GPU check): `from bench.ce_bench import run, format_table, check_targets`.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

import faim_kernels as fk
from bench.impls import composite_logits, make_inputs
from bench.measure import (MEASURE_ERRORS, cuda_peak_bytes, device_name, host_peak_bytes, median_seconds,
                           emit_row, peak_bytes_in_fresh_process, print_probe, record_failure,
                           parse_sizes, rounds_seconds)
from bench.results import print_and_save

CPU_SIZES = [(256, 1000, 128), (256, 100_000, 128)]
GPU_SIZES = [(256, 1000, 512), (1024, 10_000, 512), (4096, 100_000, 256)]
IMPLS = ["fused", "fused:weight", "fused:dense", "fused:pairs", "logits+ce", "composite+ce", "linear+ce",
         "linear+ce:dense"]
EPS = 1e-6


def _default_backend(device: str) -> str:
    return "cpp" if device == "cpu" else "triton"


def _problem(impl: str, B: int, C: int, D: int, device: str, full: bool, backend: str | None = None):
    """(fn, inputs): fn() runs forward+backward once and returns the gradients. backend: the
    fused kernels' backend (default: C++ on CPU, Triton on CUDA)."""
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, C, (B,), generator=g).to(device)
    # timm's Mixup of the batch with its flipped self (lam 0.7, smoothing 0.1): compact and dense
    pairs = fk.mixup_soft_targets(target, lam=0.7, smoothing=0.1)
    weight = (0.5 + torch.rand(C, generator=g)).to(device)
    if impl.startswith("linear+ce"):
        x = torch.randn(B, D, device=device, requires_grad=True)
        linear = torch.nn.Linear(D, C, device=device)
        inputs = [x, linear.weight, linear.bias]
        if impl == "linear+ce:dense":
            dense = pairs.to_dense(C, torch.float32)
            loss_fn = lambda: F.cross_entropy(linear(x), dense)
        else:
            loss_fn = lambda: F.cross_entropy(linear(x), target)
    else:
        inputs = make_inputs(B, C, D, full=full, device=device)
        backend = backend or _default_backend(device)
        if impl == "fused":
            loss_fn = lambda: fk.randers_cross_entropy(*inputs, target, EPS, backend=backend)
        elif impl == "fused:weight":
            loss_fn = lambda: fk.randers_cross_entropy(*inputs, target, EPS, label_smoothing=0.1, weight=weight,
                                                       backend=backend)
        elif impl == "fused:dense":
            dense = pairs.to_dense(C, torch.float32)
            loss_fn = lambda: fk.randers_cross_entropy(*inputs, dense, EPS, backend=backend)
        elif impl == "fused:pairs":
            loss_fn = lambda: fk.randers_cross_entropy(*inputs, pairs, EPS, backend=backend)
        elif impl == "logits+ce":
            loss_fn = lambda: F.cross_entropy(fk.randers_logits(*inputs, EPS, backend=backend), target)
        elif impl == "composite+ce":
            loss_fn = lambda: F.cross_entropy(composite_logits(*inputs, EPS), target)
        else:
            raise ValueError(f"unknown implementation {impl!r}")
    return (lambda: torch.autograd.grad(loss_fn(), inputs)), inputs


def time_ms(impl, B, C, D, device, full=False, min_run_time=1.0, backend=None) -> float:
    """Median forward+backward time in milliseconds."""
    fn, _ = _problem(impl, B, C, D, device, full, backend)
    return median_seconds(fn, min_run_time, device) * 1e3  # the first call (untimed): registration, autotuning


def peak_bytes(impl, B, C, D, device, full=False, backend=None) -> int:
    """Peak memory beyond the inputs of one forward+backward (gradients included); -1 if failed."""
    if device == "cpu":  # fresh process: one implementation's freed pages must not hide another's
        return peak_bytes_in_fresh_process(["bench.ce_bench", "--probe", impl, str(B), str(C), str(D), "--backend",
                                            backend or _default_backend(device)] + (["--full"] if full else []))
    fn, _ = _problem(impl, B, C, D, device, full, backend)
    fn()
    return cuda_peak_bytes(fn)


def _probe(impl, B, C, D, full, backend):
    small, _ = _problem(impl, 4, 8, D, "cpu", full, backend)
    small()  # import-time and first-call allocations on a tiny problem first
    fn, _ = _problem(impl, B, C, D, "cpu", full, backend)
    print_probe(host_peak_bytes(fn))


def run(device: str = "cpu", sizes=None, impls=IMPLS, full: bool = False, min_run_time: float = 1.0,
        backend: str | None = None, log=print, rounds: int = 3) -> list[dict]:
    """One row per (size, implementation): time (ms) and peak memory (bytes). backend: the fused
    kernels' backend (default: C++ on CPU, Triton on CUDA; "triton" on CPU needs TRITON_INTERPRET=1
    and is only a smoke test of the code path). The implementations of a size are timed in turn,
    `rounds` times over (min_run_time / rounds each; a round's time is its median), and each keeps
    its fastest round: on a shared machine load comes and goes, and the least disturbed round is
    the closest to the implementation's own cost, while taking turns spreads the load over all."""
    sizes = sizes or (CPU_SIZES if device == "cpu" else GPU_SIZES)
    rows = []
    for B, C, D in sizes:
        size_rows, fns = {}, {}

        def failed(impl, e):  # e.g. out of memory for an unfused path
            record_failure(size_rows[impl], e)
        for impl in impls:
            size_rows[impl] = dict(B=B, C=C, D=D, impl=impl, device=device, full=full,
                                   backend=backend or _default_backend(device))
            try:
                fns[impl], _ = _problem(impl, B, C, D, device, full, backend)
            except MEASURE_ERRORS as e:
                failed(impl, e)
        # The first call of each (registration, autotuning, compilation) runs untimed in rounds_seconds.
        times = rounds_seconds(fns, rounds, min_run_time / rounds, device, on_error=failed)
        fns.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
        for impl in impls:
            row = size_rows[impl]
            if "error" not in row:
                row["ms"] = min(times[impl]) * 1e3
                row["rounds_ms"] = [round(t * 1e3, 3) for t in times[impl]]
                try:
                    row["peak_bytes"] = peak_bytes(impl, B, C, D, device, full, backend)
                except MEASURE_ERRORS as e:
                    record_failure(row, e, device)
            emit_row(rows, row, log)
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown: time and peak memory per implementation, with ratios to fused (the hard-label
    fused loss) and to linear+ce."""
    out = ["| B, C, D | implementation | fwd+bwd ms | / fused | / linear+ce | peak MB | / fused |",
           "|---|---|---:|---:|---:|---:|---:|"]
    by_size: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        by_size.setdefault((r["B"], r["C"], r["D"]), {})[r["impl"]] = r
    for size, impls in by_size.items():
        lin, fused = impls.get("linear+ce", {}), impls.get("fused", {})
        for impl, r in impls.items():
            if "error" in r:
                out.append(f"| {size} | {impl} | failed: {r['error']} | | | | |")
                continue
            f_ratio = f"{r['ms'] / fused['ms']:.2f}x" if fused.get("ms") else "n/a"
            t_ratio = f"{r['ms'] / lin['ms']:.2f}x" if lin.get("ms") else "n/a"
            m_ratio = f"{r['peak_bytes'] / fused['peak_bytes']:.1f}x" if fused.get("peak_bytes", 0) > 0 else "n/a"
            out.append(f"| {size} | {impl} | {r['ms']:.2f} | {f_ratio} | {t_ratio} | {r['peak_bytes'] / 1e6:.1f} "
                       f"| {m_ratio} |")
    return "\n".join(out)


def check_targets(rows: list[dict]) -> list[str]:
    """The issue's targets, where the rows have the sizes: CPU, peak memory at C = 100,000 at
    least 5x below the unfused path (logits+ce); CUDA at (4096, 100000, 256), forward+backward
    at most 1.3x linear+ce's time and peak memory below it."""
    get = {(r["device"], r["B"], r["C"], r["D"], r["impl"]): r for r in rows if "error" not in r}
    lines = []
    for (dev, B, C, D, impl), r in get.items():
        if impl != "fused":
            continue
        if dev == "cpu" and C == 100_000 and (dev, B, C, D, "logits+ce") in get:
            ratio = get[(dev, B, C, D, "logits+ce")]["peak_bytes"] / r["peak_bytes"]
            lines.append(f"CPU ({B}, {C}, {D}): unfused/fused peak memory {ratio:.1f}x (target >= 5x): "
                         f"{'met' if ratio >= 5 else 'NOT met'}")
        if dev == "cuda" and (B, C, D) == (4096, 100_000, 256) and (dev, B, C, D, "linear+ce") in get:
            lin = get[(dev, B, C, D, "linear+ce")]
            t, m = r["ms"] / lin["ms"], r["peak_bytes"] / lin["peak_bytes"]
            lines.append(f"CUDA ({B}, {C}, {D}): fused/linear+ce time {t:.2f}x (target <= 1.3x): "
                         f"{'met' if t <= 1.3 else 'NOT met'}; peak memory {m:.2f}x (target < 1): "
                         f"{'met' if m < 1 else 'NOT met'}")
    return lines


def environment(device: str) -> str:
    load = f"; load average {os.getloadavg()[0]:.1f} at the start" if hasattr(os, "getloadavg") else ""
    return (f"device: {device_name(device)}; torch {torch.__version__}; threads {torch.get_num_threads()}; "
            f"python {platform.python_version()}{load}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="*", default=None, help="B,C,D triples (default: the device's sizes in docs/benchmarks.md)")
    p.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS)
    p.add_argument("--full", action="store_true", help="full [D, D] L (default: diagonal)")
    p.add_argument("--backend", default=None, choices=["cpp", "triton"],
                   help="the fused kernels' backend (default: cpp on CPU, triton on CUDA)")
    p.add_argument("--min-time", type=float, default=1.0, help="CPU: seconds of timing per measurement")
    p.add_argument("--rounds", type=int, default=3, help="times each implementation is timed, in turn with "
                   "the others (the fastest round is kept)")
    p.add_argument("--out", default=None, help="also write the markdown table here")
    p.add_argument("--write-results", action="store_true", help="rewrite this device's cross-entropy "
                   "section of bench/RESULTS.md")
    p.add_argument("--probe", nargs=4, metavar=("IMPL", "B", "C", "D"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        impl, B, C, D = args.probe
        return _probe(impl, int(B), int(C), int(D), args.full, args.backend)
    sizes = parse_sizes(args.sizes)
    rows = run(args.device, sizes, args.impls, args.full, args.min_time, args.backend, rounds=args.rounds)
    text = "\n".join([environment(args.device), "", format_table(rows), ""] + check_targets(rows))
    print_and_save(text, args.out)
    if args.write_results:
        from bench.results import write_section
        write_section(f"ce-{args.device}-{'full' if args.full else 'diag'}",
                      f"### Fused cross-entropy, {args.device}, {'full' if args.full else 'diagonal'} L "
                      f"({time.strftime('%Y-%m-%d')})\n\n{text}\n")


if __name__ == "__main__":
    main()
