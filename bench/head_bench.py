"""The head as users call it, against nn.Linear in the same run: `FAIMHead` and `head.loss` at the
sizes heads are trained at (a 10-class MLP head to 100,000 classes).

Rows, each a ratio to nn.Linear's matching call timed in the same run:
    head(x) + CE     F.cross_entropy(head(x), y), forward + backward   vs  F.cross_entropy(linear(x), y)
    head.loss        head.loss(x, y), forward + backward (the fused cross-entropy)   vs  the same floor
    no_grad          head(x) under torch.no_grad()                      vs  linear(x)
Features require grad (the head sits behind a backbone); `--frozen-features` times the linear-probe
case (features without grad) against nn.Linear on such features. Gradients go to the features and
every parameter that requires grad, through torch.autograd.grad (what .backward() runs, without the
accumulation into .grad).

Trained-model data (`--clustered`): in a trained model each sample sits next to its own prototype,
which is where the exact treatment of near pairs takes over. x = mu[y] + σ·s·noise, with s the
prototypes' coordinate scale and σ = 0.3 and 0.05, against the same call on independent draws.

Times are medians of torch.utils.benchmark's blocked_autorange; the calls of one row are timed in
turn, in rounds (--rounds), and each keeps its fastest round, so the ratios compare like with like
on a noisy machine (bench/measure.py's best_of_rounds).

    python -m bench.head_bench                          # the module table (CPU, the C++ kernels)
    python -m bench.head_bench --clustered              # trained-model data against independent draws
    python -m bench.head_bench --large                  # head.loss at (256, 100000, 128), time and memory,
                                                        # against nn.Linear + CE and F.cross_entropy(head(x), y)
    python -m bench.head_bench --wide-factor            # a full head's step: Cholesky against the wide factor
    python -m bench.head_bench --all --write-results    # all three; rewrites their sections of RESULTS.md
    python -m bench.head_bench --device cuda --all --write-results   # the same on a GPU (Triton)
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import faim_kernels as fk
from bench.measure import (best_of_rounds, environment, host_peak_bytes, cuda_peak_bytes,
                           peak_bytes_in_fresh_process, print_probe)

SIZES = [(64, 10, 64), (64, 100, 128), (256, 1000, 128), (512, 4096, 256)]
CLUSTER_SIZES = [(256, 1000, 128), (512, 4096, 256)]
CLUSTER_SIGMAS = (0.3, 0.05)
LARGE = (256, 100_000, 128)
# A full head's training step with each metric factor (docs/design.md §2.4, Eq. 23), around the
# bound where FAIMHead switches (faim_kernels.nn.head.WIDE_FACTOR_MAX_COST).
WIDE_SIZES = [(64, 10, 64), (64, 100, 128), (256, 100, 128), (128, 100, 256), (512, 100, 256), (32, 1000, 256),
              (64, 1000, 128), (256, 1000, 128)]


def train_step(module: torch.nn.Module, loss_of, x: torch.Tensor):
    """One forward + backward: gradients of loss_of() for x (if it requires grad) and the module's
    trainable parameters."""
    wrt = ([x] if x.requires_grad else []) + [p for p in module.parameters() if p.requires_grad]

    def step():
        torch.autograd.grad(loss_of(), wrt)
    return step


def make_problem(B, C, D, full: bool, device: str, features_grad: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    head = fk.FAIMHead(D, C, full_sigma=full, device=device)
    linear = torch.nn.Linear(D, C, device=device)
    x = torch.randn(B, D, device=device) * (1.0 / D ** 0.5)  # nn.Linear-sized features
    y = torch.randint(0, C, (B,), device=device)
    return head, linear, x.requires_grad_(features_grad), y


def clustered_features(head: fk.FAIMHead, y: torch.Tensor, sigma: float, features_grad: bool) -> torch.Tensor:
    """x_b = mu_{y_b} + σ·s·noise, s the prototypes' coordinate scale: trained-model data."""
    with torch.no_grad():
        scale = float(head.mu.std())
        x = head.mu[y] + sigma * scale * torch.randn(y.shape[0], head.in_features, device=head.mu.device)
    return x.requires_grad_(features_grad)


def module_rows(device: str, rounds: int, min_run_time: float, features_grad: bool = True):
    rows = []
    for (B, C, D) in SIZES:
        for full in (False, True):
            head, linear, x, y = make_problem(B, C, D, full, device, features_grad)

            def nograd(m):
                def call():
                    with torch.no_grad():
                        m(x)
                return call
            t = best_of_rounds({
                "linear_ce": train_step(linear, lambda: F.cross_entropy(linear(x), y), x),
                "head_ce": train_step(head, lambda: F.cross_entropy(head(x), y), x),
                "head_loss": train_step(head, lambda: head.loss(x, y), x),
                "linear_nograd": nograd(linear),
                "head_nograd": nograd(head),
            }, rounds, min_run_time)
            rows.append(dict(size=(B, C, D), sigma="full" if full else "diagonal", **t))
    return rows


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table: the header cells, then one row of cells per entry of body."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _us(t: float) -> str:
    return f"{t * 1e6:.0f}"


def render_module(rows) -> str:
    return markdown_table(
        ["B, C, D", "Σ", "Linear+CE µs", "head(x)+CE µs", "ratio", "head.loss µs", "ratio", "no_grad Linear µs",
         "no_grad head µs", "ratio"],
        [[", ".join(map(str, r["size"])), r["sigma"], _us(r["linear_ce"]), _us(r["head_ce"]),
          f"{r['head_ce'] / r['linear_ce']:.2f}x", _us(r["head_loss"]), f"{r['head_loss'] / r['linear_ce']:.2f}x",
          _us(r["linear_nograd"]), _us(r["head_nograd"]), f"{r['head_nograd'] / r['linear_nograd']:.2f}x"]
         for r in rows])


def clustered_rows(device: str, rounds: int, min_run_time: float):
    rows = []
    for (B, C, D) in CLUSTER_SIZES:
        for full in (False, True):
            head, _, x_random, y = make_problem(B, C, D, full, device)
            xs = {"independent": x_random}
            xs.update({f"σ={s}": clustered_features(head, y, s, True) for s in CLUSTER_SIGMAS})
            calls = {}
            for name, x in xs.items():
                calls[f"{name}/head_ce"] = train_step(head, lambda x=x: F.cross_entropy(head(x), y), x)
                calls[f"{name}/head_loss"] = train_step(head, lambda x=x: head.loss(x, y), x)
            t = best_of_rounds(calls, rounds, min_run_time)
            rows.append(dict(size=(B, C, D), sigma="full" if full else "diagonal", times=t))
    return rows


def render_clustered(rows) -> str:
    ms = lambda t: f"{t * 1e3:.2f}"  # noqa: E731
    kinds = ["independent"] + [f"σ={s}" for s in CLUSTER_SIGMAS]
    head = "| B, C, D | Σ | call | " + " | ".join(f"{k} ms" for k in kinds) + " | worst / independent |"
    lines = [head, "|" + "---|" * (4 + len(kinds))]
    for r in rows:
        for call in ("head_ce", "head_loss"):
            t = [r["times"][f"{k}/{call}"] for k in kinds]
            label = "head(x)+CE" if call == "head_ce" else "head.loss"
            lines.append(f"| {', '.join(map(str, r['size']))} | {r['sigma']} | {label} | "
                         + " | ".join(ms(v) for v in t) + f" | {max(t[1:]) / t[0]:.2f}x |")
    return "\n".join(lines)


def _peak_probe(which: str, device: str) -> int:
    """Peak extra memory of one head.loss / Linear+CE training step at LARGE, in a fresh process."""
    return peak_bytes_in_fresh_process(["bench.head_bench", "--probe", which, "--device", device])


def _probe(which: str, device: str) -> None:
    B, C, D = LARGE
    head, linear, x, y = make_problem(B, C, D, False, device)
    step = (train_step(head, lambda: head.loss(x, y), x) if which == "head_loss"
            else train_step(linear, lambda: F.cross_entropy(linear(x), y), x))
    if device == "cuda":
        peak = cuda_peak_bytes(step)
    else:
        small_head, small_linear, sx, sy = make_problem(4, 3, D, False, device)  # first-call allocations
        train_step(small_head, lambda: small_head.loss(sx, sy), sx)()
        train_step(small_linear, lambda: F.cross_entropy(small_linear(sx), sy), sx)()
        peak = host_peak_bytes(step)
    print_probe(peak)


def large_row(device: str, rounds: int, min_run_time: float):
    B, C, D = LARGE
    head, linear, x, y = make_problem(B, C, D, False, device)
    t = best_of_rounds({"linear_ce": train_step(linear, lambda: F.cross_entropy(linear(x), y), x),
                        "head_loss": train_step(head, lambda: head.loss(x, y), x),
                        "head_ce": train_step(head, lambda: F.cross_entropy(head(x), y), x)}, rounds, min_run_time)
    return dict(size=LARGE, **t, mem_head=_peak_probe("head_loss", device), mem_linear=_peak_probe("linear_ce", device))


def render_large(r) -> str:
    mib = lambda b: f"{b / 2 ** 20:.0f}"  # noqa: E731
    B, C, D = r["size"]
    return (f"head.loss at ({B}, {C}, {D}), diagonal Σ, forward + backward: {r['head_loss'] * 1e3:.1f} ms against "
            f"{r['linear_ce'] * 1e3:.1f} ms for nn.Linear + F.cross_entropy ({r['head_loss'] / r['linear_ce']:.2f}x) "
            f"and {r['head_ce'] * 1e3:.1f} ms for F.cross_entropy(head(x), y) "
            f"({r['head_ce'] / r['linear_ce']:.2f}x); "
            f"peak extra memory {mib(r['mem_head'])} MiB against {mib(r['mem_linear'])} MiB "
            f"({r['mem_head'] / max(r['mem_linear'], 1):.2f}x).")


def wide_factor_rows(device: str, rounds: int, min_run_time: float):
    """head(x) + CE, forward + backward, of a full head with the Cholesky factor and with the wide
    factor forced (WIDE_FACTOR_MAX_COST 0 and inf), against nn.Linear + CE."""
    from faim_kernels.nn import head as head_module
    bound = head_module.WIDE_FACTOR_MAX_COST
    rows = []
    for (B, C, D) in WIDE_SIZES:
        head, linear, x, y = make_problem(B, C, D, True, device)

        def forced(limit):
            step = train_step(head, lambda: F.cross_entropy(head(x), y), x)

            def call():
                head_module.WIDE_FACTOR_MAX_COST = limit
                try:
                    step()
                finally:
                    head_module.WIDE_FACTOR_MAX_COST = bound
            return call
        t = best_of_rounds({"linear_ce": train_step(linear, lambda: F.cross_entropy(linear(x), y), x),
                            "cholesky": forced(0.0), "wide": forced(float("inf"))}, rounds, min_run_time)
        cost = (B + C) / D + B * C / D ** 2
        rows.append(dict(size=(B, C, D), cost=cost, chosen="wide" if cost <= bound else "cholesky", **t))
    return rows


def render_wide_factor(rows) -> str:
    return markdown_table(
        ["B, C, D", "(B + C)/D + B·C/D²", "Linear+CE µs", "Cholesky µs", "ratio", "wide µs", "ratio", "Cholesky / wide",
         "the head takes"],
        [[", ".join(map(str, r["size"])), f"{r['cost']:.2f}", _us(r["linear_ce"]), _us(r["cholesky"]),
          f"{r['cholesky'] / r['linear_ce']:.2f}x", _us(r["wide"]), f"{r['wide'] / r['linear_ce']:.2f}x",
          f"{r['cholesky'] / r['wide']:.2f}", r["chosen"]] for r in rows])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=3, help="timing rounds; each call keeps its fastest (default 3)")
    p.add_argument("--min-run-time", type=float, default=0.5, help="seconds per timing (default 0.5)")
    p.add_argument("--frozen-features", action="store_true", help="features without grad (linear probing)")
    p.add_argument("--clustered", action="store_true", help="trained-model data against independent draws")
    p.add_argument("--large", action="store_true", help=f"head.loss at {LARGE}: time and peak memory")
    p.add_argument("--wide-factor", action="store_true", help="a full head's step with each metric factor")
    p.add_argument("--all", action="store_true",
                   help="the module table, frozen features, clustered, large, wide factor")
    p.add_argument("--write-results", action="store_true", help="rewrite these sections of bench/RESULTS.md")
    p.add_argument("--probe", choices=("head_loss", "linear_ce"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        return _probe(args.probe, args.device)
    dev, env = args.device, environment(args.device)
    stamp = f"{env}, {time.strftime('%Y-%m-%d')}"
    sections = []
    only_extras = (args.clustered or args.large or args.frozen_features or args.wide_factor) and not args.all
    if not only_extras:
        table = render_module(module_rows(dev, args.rounds, args.min_run_time))
        sections.append((f"{dev}-module", "the head against nn.Linear, features with grad", table))
    if args.all or args.frozen_features:
        table = render_module(module_rows(dev, args.rounds, args.min_run_time, features_grad=False))
        sections.append((f"{dev}-module-frozen", "the head against nn.Linear, features without grad (linear probe)",
                         table))
    if args.all or args.clustered:
        sections.append((f"{dev}-clustered", "trained-model data (x = mu[y] + σ·noise) against independent draws",
                         render_clustered(clustered_rows(dev, args.rounds, args.min_run_time))))
    if args.all or args.large:
        sections.append((f"{dev}-large", "head.loss at 100,000 classes",
                         render_large(large_row(dev, args.rounds, args.min_run_time))))
    if args.all or args.wide_factor:
        sections.append((f"{dev}-wide-factor", "a full head's training step, Cholesky factor against the wide factor",
                         render_wide_factor(wide_factor_rows(dev, args.rounds, args.min_run_time))))
    for _, title, body in sections:
        print(f"\n{title} ({stamp}), float32\n\n{body}")
    if args.write_results:
        from bench.results import write_section
        flag = "" if dev == "cpu" else " --device cuda"
        for key, title, body in sections:
            write_section(key, f"### {'CPU' if dev == 'cpu' else 'GPU'}, {title}, float32\n\n{stamp}. "
                               f"`python -m bench.head_bench{flag} --all --write-results`.\n\n{body}\n")


if __name__ == "__main__":
    main()
