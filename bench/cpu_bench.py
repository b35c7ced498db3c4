"""CPU benchmark of the fused C++ kernel against the einsum reference, the plain-PyTorch GEMM
composite (eager and torch.compile) and nn.Linear + F.cross_entropy (docs/benchmarks.md).

    python -m bench.cpu_bench                  # default sizes, table on the terminal
    python -m bench.cpu_bench --write-results  # also rewrite the CPU section of bench/RESULTS.md
    python -m bench.cpu_bench --sizes 256,1000,128 --full

Times are medians of torch.utils.benchmark (blocked_autorange, bench/measure.py); peak memory is the
extra resident memory of one call in a fresh process (bench/peak_memory.py). Ratios are taken within
one run.
"""
from __future__ import annotations

import argparse
import time

import torch

import faim_kernels as fk
from bench import impls
from bench.measure import environment, median_seconds, parse_sizes
from bench.peak_memory import measure

DEFAULT_SIZES = [(256, 1000, 128), (512, 4096, 256)]
EINSUM_MAX_BYTES = 10 * 2 ** 30  # run the einsum reference only where its [B, C, D] tensors fit


def near_case_error(f, full: bool) -> float:
    """Max relative error of f on docs/design.md §2.1's near-prototype case (float32 in, float64 truth)."""
    g = torch.Generator().manual_seed(0)
    B, C, D = 32, 64, 256
    mu = 5 + 10 * torch.randn(C, D, generator=g)
    x = mu[torch.randint(0, C, (B,), generator=g)] + 1e-3 * torch.randn(B, D, generator=g)
    _, _, L, beta, lam, gamma = impls.make_inputs(B, C, D, full=full, requires_grad=False)
    ref = fk.reference.randers_logits(*[t.double() for t in (x, mu, L, beta, lam, gamma)])
    with torch.no_grad():
        out = f(x, mu, L, beta, lam, gamma).double()
    return ((out - ref).abs() / ref.abs()).max().item()


def run(sizes, full: bool, min_run_time: float, memory: bool, progress: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        tqdm = None
    names = ["einsum", "composite", "composite_compiled", "cpp"]
    jobs = [(s, n) for s in sizes for n in names + ["linear_ce"]]
    bar = tqdm(total=len(jobs), desc="benchmark", unit="case") if (tqdm and progress) else None
    rows = []
    for (B, C, D) in sizes:
        res = {}
        inputs = impls.make_inputs(B, C, D, full=full)
        grad = torch.randn(B, C)
        for name in names:
            if bar:
                bar.set_postfix_str(f"{name} {B}x{C}x{D}")
            if name == "einsum" and impls.einsum_bytes(B, C, D) > EINSUM_MAX_BYTES:
                res[name] = None
            else:
                f = impls.LOGITS_IMPLS[name]
                slow = name == "einsum" and B * C * D > 50_000_000
                mrt = 0 if slow else min_run_time
                with torch.no_grad():
                    t_fwd = median_seconds(lambda: f(*inputs), mrt)
                t_fb = median_seconds(lambda: torch.autograd.grad(f(*inputs), inputs, grad), mrt)
                mem = measure(name, B, C, D, "fwdbwd", full) if memory else None
                res[name] = dict(fwd=t_fwd, fwdbwd=t_fb, mem=mem)
            if bar:
                bar.update()
        head = impls.LinearCE(C, D, torch.float32, "cpu")
        x = inputs[0].detach().requires_grad_()
        target = torch.randint(0, C, (B,))
        with torch.no_grad():
            t_fwd = median_seconds(lambda: head(x, target), min_run_time)
        t_fb = median_seconds(lambda: torch.autograd.grad(head(x, target), [x] + list(head.linear.parameters())),
                         min_run_time)
        res["linear_ce"] = dict(fwd=t_fwd, fwdbwd=t_fb,
                                mem=measure("linear_ce", B, C, D, "fwdbwd", full) if memory else None)
        if bar:
            bar.update()
        rows.append(((B, C, D), res))
    if bar:
        bar.close()
    errors = {n: near_case_error(impls.LOGITS_IMPLS[n], full) for n in ("composite", "cpp")}
    return rows, errors


def _fmt_ms(t):
    return "—" if t is None else f"{t * 1e3:.2f}"


def _fmt_mb(b):
    return "—" if b is None or b < 0 else f"{b / 2 ** 20:.1f}"


def render(rows, errors, full: bool) -> str:
    """One row per implementation; the last two columns are that implementation's fwd+bwd time and
    peak memory over the C++ kernel's (> 1: the C++ kernel is faster / uses less)."""
    lines = ["| B, C, D | impl | fwd ms | fwd+bwd ms | peak extra MB (fwd+bwd) | fwd+bwd time / cpp | "
             "peak memory / cpp |", "|" + "---|" * 7]
    for (B, C, D), res in rows:
        cpp = res["cpp"]
        for name in ["einsum", "composite", "composite_compiled", "cpp", "linear_ce"]:
            r = res[name]
            if r is None:
                lines.append(f"| {B}, {C}, {D} | {name} | not run (too large) | | | | |")
                continue
            memr = (f"{r['mem'] / cpp['mem']:.2f}x" if (r["mem"] and r["mem"] > 0 and cpp["mem"]) else "—")
            lines.append(f"| {B}, {C}, {D} | {name} | {_fmt_ms(r['fwd'])} | {_fmt_ms(r['fwdbwd'])} | "
                         f"{_fmt_mb(r['mem'])} | {r['fwdbwd'] / cpp['fwdbwd']:.2f}x | {memr} |")
    lines.append("")
    lines.append(f"Near-prototype case (docs/design.md §2.1, near pairs, float32, D = 256, {'full' if full else 'diagonal'} L), "
                 f"max relative error vs float64: composite {errors['composite']:.2e}, cpp {errors['cpp']:.2e}.")
    return "\n".join(lines)


def write_results(table: str, full: bool) -> None:
    """Rewrites the CPU section of bench/RESULTS.md for this factor, with the device and the date."""
    from bench.results import write_section
    kind = "full" if full else "diagonal"
    write_section(f"cpu-{'full' if full else 'diag'}",
                  f"### CPU, {kind} L, float32\n\n{environment()}, {time.strftime('%Y-%m-%d')}.\n\n{table}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="*", help="B,C,D triples (default: docs/benchmarks.md's CPU sizes)")
    p.add_argument("--full", action="store_true", help="full L [D, D] instead of diagonal")
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--write-results", action="store_true", help="rewrite the CPU section of bench/RESULTS.md")
    args = p.parse_args(argv)
    sizes = parse_sizes(args.sizes) or DEFAULT_SIZES
    rows, errors = run(sizes, args.full, args.min_run_time, not args.no_memory, progress=True)
    table = render(rows, errors, args.full)
    print(f"\nCPU benchmark ({environment()}), {'full' if args.full else 'diagonal'} L, float32\n")
    print(table)
    if args.write_results:
        write_results(table, args.full)


if __name__ == "__main__":
    main()
