"""The head as a user trains it, against the cost floor: `randers_logits + F.cross_entropy` vs
`nn.Linear + F.cross_entropy` (the same number of B×C×D products) and vs `torch.compile` of the
plain composite + F.cross_entropy, forward+backward; the no_grad forward vs `F.linear`; and the
fused `randers_cross_entropy` vs `nn.Linear + F.cross_entropy` at a large C.

    python -m bench.head_bench                    # table on the terminal
    python -m bench.head_bench --write-results    # also rewrite its section of bench/RESULTS.md
    python -m bench.head_bench --device cuda --write-results   # the same on a GPU (the Triton kernels)

Times are medians of torch.utils.benchmark (blocked_autorange), all in one run, so the ratios
compare like with like on a noisy machine. Targets (CPU, 2 threads, float32): logits+CE <= 1.25x
Linear+CE with a diagonal L and <= 1.75x with a full L, faster than the compiled composite; the
no_grad forward (diagonal L) <= 1.2x F.linear; the fused cross-entropy <= 1.0x Linear+CE at
(256, 100000, 128).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import faim_kernels as fk
from bench import impls

SIZES = [(256, 1000, 128), (512, 4096, 256)]
BACKEND = {"cpu": "cpp", "cuda": "triton"}
CE_SIZE = (256, 100000, 128)


def median_seconds(fn, min_run_time: float) -> float:
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def fwd_bwd(loss_fn, params):
    def step():
        torch.autograd.grad(loss_fn(), params)
    return step


def head_rows(min_run_time: float, device: str = "cpu"):
    rows = []
    for (B, C, D) in SIZES:
        target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(0)).to(device)
        linear = torch.nn.Linear(D, C, device=device)
        xl = torch.randn(B, D, requires_grad=True, device=device)
        t_linear = median_seconds(fwd_bwd(lambda: F.cross_entropy(linear(xl), target), [xl, *linear.parameters()]),
                                  min_run_time)
        with torch.no_grad():
            t_flinear = median_seconds(lambda: F.linear(xl, linear.weight, linear.bias), min_run_time)
        for full in (False, True):
            inputs = impls.make_inputs(B, C, D, full=full, device=device)
            ours = fwd_bwd(lambda: F.cross_entropy(fk.randers_logits(*inputs, backend=BACKEND[device]), target),
                           inputs)
            comp = fwd_bwd(lambda: F.cross_entropy(impls.composite_compiled(*inputs), target), inputs)
            t_ours = median_seconds(ours, min_run_time)
            t_comp = median_seconds(comp, min_run_time)
            with torch.no_grad():
                t_nograd = median_seconds(lambda: fk.randers_logits(*inputs, backend=BACKEND[device]), min_run_time)
            rows.append(dict(size=(B, C, D), L="full" if full else "diagonal", ours=t_ours, linear=t_linear,
                             compiled=t_comp, nograd=t_nograd, flinear=t_flinear))
    return rows


def ce_row(min_run_time: float, device: str = "cpu"):
    B, C, D = CE_SIZE
    target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(0)).to(device)
    inputs = impls.make_inputs(B, C, D, device=device)
    linear = torch.nn.Linear(D, C, device=device)
    xl = torch.randn(B, D, requires_grad=True, device=device)
    t_fused = median_seconds(fwd_bwd(lambda: fk.randers_cross_entropy(*inputs, target, backend=BACKEND[device]),
                                     inputs), min_run_time)
    t_linear = median_seconds(fwd_bwd(lambda: F.cross_entropy(linear(xl), target), [xl, *linear.parameters()]),
                              min_run_time)
    return dict(size=CE_SIZE, fused=t_fused, linear=t_linear)


def render(rows, ce) -> str:
    ms = lambda t: f"{t * 1e3:.2f}"  # noqa: E731
    lines = ["| B, C, D | L | logits+CE ms | Linear+CE ms | / Linear+CE | compiled composite+CE ms | / compiled | "
             "no_grad fwd ms | F.linear ms | / F.linear |", "|" + "---|" * 10]
    for r in rows:
        B, C, D = r["size"]
        lines.append(f"| {B}, {C}, {D} | {r['L']} | {ms(r['ours'])} | {ms(r['linear'])} | "
                     f"{r['ours'] / r['linear']:.2f}x | {ms(r['compiled'])} | {r['ours'] / r['compiled']:.2f}x | "
                     f"{ms(r['nograd'])} | {ms(r['flinear'])} | {r['nograd'] / r['flinear']:.2f}x |")
    if ce:
        B, C, D = ce["size"]
        lines += ["", f"Fused cross-entropy at ({B}, {C}, {D}), diagonal L, fwd+bwd: {ms(ce['fused'])} ms against "
                  f"{ms(ce['linear'])} ms for nn.Linear + F.cross_entropy ({ce['fused'] / ce['linear']:.2f}x)."]
    return "\n".join(lines)


def environment(device: str = "cpu") -> str:
    if device == "cuda":
        import triton
        return (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, triton {triton.__version__}, "
                f"Python {platform.python_version()}")
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--min-run-time", type=float, default=1.0, help="seconds per timing (default 1)")
    p.add_argument("--no-ce", action="store_true", help="skip the large-C fused cross-entropy row")
    p.add_argument("--write-results", action="store_true", help="rewrite the head section of bench/RESULTS.md")
    p.add_argument("--device", choices=sorted(BACKEND), default="cpu",
                   help="cpu (the C++ kernels) or cuda (the Triton kernels)")
    args = p.parse_args(argv)
    dev = args.device
    table = render(head_rows(args.min_run_time, dev), None if args.no_ce else ce_row(args.min_run_time, dev))
    print(f"\nThe head against nn.Linear ({environment(dev)}), float32, forward+backward\n")
    print(table)
    if args.write_results:
        from bench.results import write_section
        flag = "" if dev == "cpu" else " --device cuda"
        write_section(f"{dev}-head", f"### {dev.upper() if dev == 'cpu' else 'GPU'}, the head against nn.Linear, "
                                     f"float32\n\n{environment(dev)}, {time.strftime('%Y-%m-%d')}. "
                                     f"`python -m bench.head_bench{flag} --write-results`.\n\n{table}\n")


if __name__ == "__main__":
    main()
