"""Time and peak memory of the fused Randers top-k (fk.randers_topk) against what a user would
write without it, in one run:

    fused            fk.randers_topk(x, mu, L, beta, lam, k): no [B, C] distances
    distance+topk    torch.topk(fk.randers_distance(...), k, largest=False): our fused distance
                     kernel, then torch's top-k over the [B, C] matrix
    einsum+topk      torch.topk over the einsum reference's distances (docs/design.md §1, the function: [B, C, D] temporaries)

The einsum reference needs B·C·D·4 bytes per temporary (65 GB at (256, 10⁶, 64)), so it is
measured at C / EINSUM_SHRINK classes and its time and memory are scaled up linearly in C (both
are proportional to B·C·D): those rows are marked "estimated".

Time: torch.utils.benchmark on CPU, triton.testing.do_bench on CUDA (median, bench/measure.py),
forward only (top-k has no backward). Peak memory: beyond the inputs, during one call; CPU: resident memory in a fresh
process (bench/peak_memory.py), CUDA: torch.cuda.max_memory_allocated().

    python -m bench.topk_bench                        # CPU at (1024, 10⁵, 128) and (256, 10⁶, 64), k = 10
    python -m bench.topk_bench --write-results        # ... and rewrite its section of bench/RESULTS.md
    python -m bench.topk_bench --device cuda --write-results
    python -m bench.topk_bench --sizes 64,5000,32 --k 1 100 --min-time 0.2
"""
from __future__ import annotations

import argparse
import time

import torch

import faim_kernels as fk
from bench.ce_bench import environment
from bench.impls import make_inputs
from bench.measure import (MEASURE_ERRORS, cuda_peak_bytes, host_peak_bytes, median_seconds,
                           emit_row, parse_sizes, peak_bytes_in_fresh_process, print_probe,
                           record_failure)
from bench.results import print_and_save

SIZES = [(1024, 100_000, 128), (256, 1_000_000, 64)]
IMPLS = ["fused", "distance+topk", "einsum+topk"]
EINSUM_SHRINK = 100
EPS = 1e-6


def _backend(device: str) -> str:
    return "cpp" if device == "cpu" else "triton"


def _fn(impl: str, B: int, C: int, D: int, k: int, device: str, full: bool):
    """A callable running one top-k of `impl` on fresh inputs (no gradients)."""
    x, mu, L, beta, lam, _ = [t.detach() for t in make_inputs(B, C, D, full=full, device=device)]
    backend = _backend(device)
    if impl == "fused":
        return lambda: fk.randers_topk(x, mu, L, beta, lam, k, EPS, backend=backend)
    if impl == "distance+topk":
        return lambda: torch.topk(fk.randers_distance(x, mu, L, beta, lam, EPS, backend=backend), k, largest=False)
    if impl == "einsum+topk":
        return lambda: torch.topk(fk.reference.randers_distance(x, mu, L, beta, lam, EPS), k, largest=False)
    raise ValueError(f"unknown implementation {impl!r}")


def time_ms(impl, B, C, D, k, device, full=False, min_run_time=1.0) -> float:
    fn = _fn(impl, B, C, D, k, device, full)
    with torch.no_grad():  # the first call (untimed): kernel loading, compilation, autotuning
        return median_seconds(fn, min_run_time, device) * 1e3


def peak_bytes(impl, B, C, D, k, device, full=False) -> int:
    if device == "cpu":  # a fresh process: one implementation's freed pages must not hide another's
        return peak_bytes_in_fresh_process(["bench.topk_bench", "--probe", impl, str(B), str(C), str(D), str(k)]
                                           + (["--full"] if full else []))
    fn = _fn(impl, B, C, D, k, device, full)
    with torch.no_grad():
        fn()
        return cuda_peak_bytes(fn)


def _probe(impl, B, C, D, k, full):
    with torch.no_grad():
        _fn(impl, 4, 8, D, 2, "cpu", full)()  # import-time and first-call allocations on a tiny problem first
        fn = _fn(impl, B, C, D, k, "cpu", full)
        print_probe(host_peak_bytes(fn))


def run(device="cpu", sizes=None, ks=(10,), impls=IMPLS, full=False, min_run_time=1.0, log=print) -> list[dict]:
    rows = []
    for B, C, D in sizes or SIZES:
        for k in ks:
            for impl in impls:
                measured_C = max(k, C // EINSUM_SHRINK) if impl == "einsum+topk" else C
                row = dict(B=B, C=C, D=D, k=k, impl=impl, device=device, full=full, measured_C=measured_C)
                try:
                    scale = C / measured_C
                    row["ms"] = time_ms(impl, B, measured_C, D, k, device, full, min_run_time) * scale
                    peak = peak_bytes(impl, B, measured_C, D, k, device, full)
                    row["peak_bytes"] = peak * scale if peak >= 0 else -1
                except MEASURE_ERRORS as e:
                    record_failure(row, e, device)
                emit_row(rows, row, log)
    return rows


def format_table(rows) -> str:
    out = ["| B, C, D | k | implementation | ms | / fused | peak MB | / fused |", "|---|---:|---|---:|---:|---:|---:|"]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["B"], r["C"], r["D"], r["k"]), {})[r["impl"]] = r
    for (B, C, D, k), impls in groups.items():
        fused = impls.get("fused", {})
        for impl, r in impls.items():
            name = impl if r["measured_C"] == C else f"{impl} (estimated: measured at C = {r['measured_C']}, x{C // r['measured_C']})"
            if "error" in r:
                out.append(f"| {B}, {C}, {D} | {k} | {name} | failed: {r['error']} | | | |")
                continue
            t = f"{r['ms'] / fused['ms']:.2f}x" if fused.get("ms") else "n/a"
            m = f"{r['peak_bytes'] / fused['peak_bytes']:.1f}x" if fused.get("peak_bytes", 0) > 0 else "n/a"
            out.append(f"| {B}, {C}, {D} | {k} | {name} | {r['ms']:.1f} | {t} | {r['peak_bytes'] / 1e6:.1f} | {m} |")
    return "\n".join(out)


def check_targets(rows) -> list[str]:
    """The issue's targets at C = 10⁶: fused at least 1.5x faster than distance+topk and at most
    1/10 of its peak memory."""
    get = {(r["device"], r["B"], r["C"], r["D"], r["k"], r["impl"]): r for r in rows if "error" not in r}
    lines = []
    for (dev, B, C, D, k, impl), r in get.items():
        base = get.get((dev, B, C, D, k, "distance+topk"))
        if impl != "fused" or C < 1_000_000 or base is None or r["peak_bytes"] <= 0:
            continue
        t, m = base["ms"] / r["ms"], base["peak_bytes"] / r["peak_bytes"]
        lines.append(f"{dev} ({B}, {C}, {D}), k = {k}: distance+topk / fused time {t:.2f}x (target >= 1.5x: "
                     f"{'met' if t >= 1.5 else 'NOT met'}), peak memory {m:.1f}x (target >= 10x: "
                     f"{'met' if m >= 10 else 'NOT met'})")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--sizes", nargs="*", default=None, help="B,C,D triples (default: the issue's two)")
    p.add_argument("--k", nargs="*", type=int, default=[10])
    p.add_argument("--impls", nargs="*", default=IMPLS, choices=IMPLS)
    p.add_argument("--full", action="store_true", help="full [D, D] L (default: diagonal)")
    p.add_argument("--min-time", type=float, default=1.0, help="CPU: seconds of timing per measurement")
    p.add_argument("--out", default=None, help="also write the markdown here")
    p.add_argument("--write-results", action="store_true", help="rewrite this device's top-k section of "
                   "bench/RESULTS.md")
    p.add_argument("--probe", nargs=5, metavar=("IMPL", "B", "C", "D", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        impl, B, C, D, k = args.probe
        return _probe(impl, int(B), int(C), int(D), int(k), args.full)
    sizes = parse_sizes(args.sizes)
    rows = run(args.device, sizes, args.k, args.impls, args.full, args.min_time)
    text = "\n".join([environment(args.device), "", format_table(rows), ""] + check_targets(rows))
    print_and_save(text, args.out)
    if args.write_results:
        from bench.results import write_section
        kind = "full" if args.full else "diagonal"
        write_section(f"topk-{args.device}-{'full' if args.full else 'diag'}",
                      f"### Fused top-k, {args.device}, {kind} L, float32 ({time.strftime('%Y-%m-%d')})\n\n"
                      f"`python -m bench.topk_bench{' --device cuda' if args.device == 'cuda' else ''}"
                      f"{' --full' if args.full else ''} --write-results`. Time of one call (no backward), "
                      f"peak memory beyond the inputs during it. The einsum rows are measured at "
                      f"C / {EINSUM_SHRINK} and scaled linearly in C (its time and memory are both "
                      f"proportional to B·C·D; at full size it needs B·C·D·4 bytes per temporary).\n\n{text}\n")


if __name__ == "__main__":
    main()
