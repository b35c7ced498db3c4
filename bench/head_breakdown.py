"""Where one call of a small head goes: per-call times and the operators a call runs, at a size
where the head's own work is tiny (B, C, D = 64, 10, 64) so that everything around it shows.

    python -m bench.head_breakdown                 # one thread, the diagonal and the full head
    python -m bench.head_breakdown --threads 2

Rows: `head(x)` under no_grad against `nn.Linear`; a training step (`F.cross_entropy(head(x), y)`
and `head.loss(x, y)`, forward + backward, features requiring grad) against nn.Linear + CE; and
the number of operators (ATen ops and custom ops dispatched from Python) and autograd nodes one
call runs, from torch.profiler. Times are the best of several rounds of many calls
(bench/measure.py's per_call_seconds).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import profile

import faim_kernels as fk
from bench.measure import per_call_seconds, set_threads

SIZE = (64, 10, 64)


def op_counts(fn) -> tuple[int, int]:
    """(operators called from Python, autograd nodes run) in one call of fn."""
    with profile() as prof:
        fn()
    top = [e for e in prof.events() if e.cpu_parent is None]
    nodes = sum(1 for e in top if e.name.startswith("autograd::engine::evaluate_function"))
    return len(top) - nodes, nodes


def rows(full: bool):
    B, C, D = SIZE
    torch.manual_seed(0)
    head, linear = fk.FAIMHead(D, C, full_sigma=full), torch.nn.Linear(D, C)
    x = torch.randn(B, D) / D ** 0.5
    y = torch.randint(0, C, (B,))
    xg = x.clone().requires_grad_()
    head_params, linear_params = [xg, *head.parameters()], [xg, *linear.parameters()]

    def no_grad(m):
        def call():
            with torch.no_grad():
                m(x)
        return call
    calls = {
        "no_grad head(x)": (no_grad(head), no_grad(linear)),
        "head(x) + CE, fwd+bwd": (lambda: torch.autograd.grad(F.cross_entropy(head(xg), y), head_params),
                                  lambda: torch.autograd.grad(F.cross_entropy(linear(xg), y), linear_params)),
        "head.loss, fwd+bwd": (lambda: torch.autograd.grad(head.loss(xg, y), head_params),
                               lambda: torch.autograd.grad(F.cross_entropy(linear(xg), y), linear_params)),
    }
    out = []
    for name, (ours, floor) in calls.items():
        t_ours, t_floor = per_call_seconds(ours) * 1e6, per_call_seconds(floor) * 1e6
        out.append((name, t_ours, t_floor, *op_counts(ours), *op_counts(floor)))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(f"B, C, D = {SIZE}, {args.threads} thread(s), torch {torch.__version__}\n")
    print("| Σ | call | head µs | nn.Linear µs | ratio | head ops / autograd nodes | nn.Linear ops / nodes |")
    print("|---|---|---|---|---|---|---|")
    for full in (False, True):
        for name, t_ours, t_floor, ops, nodes, lops, lnodes in rows(full):
            print(f"| {'full' if full else 'diagonal'} | {name} | {t_ours:.0f} | {t_floor:.0f} | {t_ours / t_floor:.1f}x | "
                  f"{ops} / {nodes} | {lops} / {lnodes} |")


if __name__ == "__main__":
    main()
