"""CPU benchmark of backend="torch" (plain PyTorch ops, faim_kernels/ops/torch_ops.py) against the
C++ kernels and the einsum reference: logits forward and forward+backward, the fused cross-entropy
forward+backward, peak memory (fresh process per measurement, bench/peak_memory.py), and the
near-prototype error (SPEC §2.1's case); then the cross-entropy at (512, 100000, 256) through
backend="auto" with the C++ kernels off (FAIM_KERNELS_CPP=0).

    python -m bench.torch_bench                  # table on the terminal
    python -m bench.torch_bench --write-results  # also rewrite the torch-cpu section of bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import torch

import faim_kernels as fk
from bench import impls
from bench.cpu_bench import environment, near_case_error
from bench.measure import median_seconds
from bench.peak_memory import measure
from bench.results import write_section

SIZES = [(256, 1000, 128), (512, 4096, 256)]
EINSUM_MAX_BYTES = 3 * 2 ** 30  # the shared machine: run the einsum only where its [B, C, D] tensors fit easily


def _ce(backend):
    def f(x, mu, L, beta, lam, gamma, target):
        return fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, backend=backend)
    return f


def run(min_run_time: float):
    rows = []
    for full in (False, True):
        for (B, C, D) in SIZES:
            inputs = impls.make_inputs(B, C, D, full=full)
            grad = torch.randn(B, C)
            target = torch.randint(0, C, (B,))
            row = {"shape": (B, C, D), "full": full}
            names = ["torch", "cpp"] + (["einsum"] if impls.einsum_bytes(B, C, D) <= EINSUM_MAX_BYTES else [])
            for name in names:
                f = impls.LOGITS_IMPLS[name]
                with torch.no_grad():
                    row[f"{name}_fwd"] = median_seconds(lambda: f(*inputs), min_run_time)
                row[f"{name}_fwdbwd"] = median_seconds(lambda: torch.autograd.grad(f(*inputs), inputs, grad), min_run_time)
                row[f"{name}_mem"] = measure(name, B, C, D, "fwdbwd", full)
            for name in ("torch", "cpp"):
                f = _ce(name)
                row[f"{name}_ce"] = median_seconds(lambda: torch.autograd.grad(f(*inputs, target), inputs), min_run_time)
            rows.append(row)
    errors = {(name, full): near_case_error(impls.LOGITS_IMPLS[name], full)
              for name in ("torch", "cpp", "composite") for full in (False, True)}
    return rows, errors


def big_auto_ce() -> str:
    """The cross-entropy fwd+bwd at (512, 100000, 256), diagonal L, through backend='auto' with the C++
    kernels off, in a fresh process: seconds and peak extra memory in [B, C] float32 tensors."""
    code = (
        "import torch, time, json, faim_kernels as fk\n"
        "from bench.impls import make_inputs\nfrom bench.measure import host_peak_bytes\n"
        "B, C, D = 512, 100000, 256\ninp = make_inputs(B, C, D)\nt = torch.randint(0, C, (B,))\n"
        "from faim_kernels.ops.dispatch import resolve_backend\nassert resolve_backend('auto', inp[0].device) == 'torch'\n"
        "def run():\n    fk.randers_cross_entropy(*inp, t).backward()\n"
        "t0 = time.perf_counter(); b = host_peak_bytes(run); s = time.perf_counter() - t0\n"
        "print(json.dumps({'s': s, 'bytes': b}))\n")
    env = dict(os.environ, FAIM_KERNELS_CPP="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return "failed: " + res.stderr[-500:]
    import json
    out = json.loads(res.stdout.strip().splitlines()[-1])
    bc = 512 * 100000 * 4
    return (f"(512, 100000, 256), diagonal L, fused cross-entropy forward+backward through backend='auto' "
            f"with FAIM_KERNELS_CPP=0 (so the torch path): {out['s']:.2f} s, peak extra memory "
            f"{out['bytes'] / 2 ** 20:.0f} MB = {out['bytes'] / bc:.2f} [B, C] float32 tensors "
            f"(beyond the inputs and their gradients).")


def render(rows, errors, big: str) -> str:
    ms = lambda t: f"{t * 1e3:.1f}"  # noqa: E731
    mb = lambda b: "n/a" if b < 0 else f"{b / 2 ** 20:.0f}"  # noqa: E731
    lines = [
        "### backend='torch' (plain PyTorch ops) vs the C++ kernels vs the einsum, CPU float32",
        "",
        environment(),
        "",
        "| Σ | B, C, D | torch fwd / fwd+bwd (ms) | cpp fwd / fwd+bwd (ms) | torch ÷ cpp fwd+bwd | einsum fwd+bwd (ms) "
        "| CE fwd+bwd torch / cpp (ms) | peak fwd+bwd MB torch / cpp / einsum | torch peak in [B, C] |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        B, C, D = r["shape"]
        bc = B * C * 4
        ein = ms(r["einsum_fwdbwd"]) if "einsum_fwdbwd" in r else "not run (memory)"
        ein_mem = mb(r["einsum_mem"]) if "einsum_mem" in r else "-"
        lines.append(
            f"| {'full' if r['full'] else 'diag'} | {B}, {C}, {D} | {ms(r['torch_fwd'])} / {ms(r['torch_fwdbwd'])} "
            f"| {ms(r['cpp_fwd'])} / {ms(r['cpp_fwdbwd'])} | {r['torch_fwdbwd'] / r['cpp_fwdbwd']:.2f}x | {ein} "
            f"| {ms(r['torch_ce'])} / {ms(r['cpp_ce'])} | {mb(r['torch_mem'])} / {mb(r['cpp_mem'])} / {ein_mem} "
            f"| {r['torch_mem'] / bc:.2f} |")
    lines += ["", "Near-prototype case (SPEC §2.1, float32, max relative error of the logits): " + ", ".join(
        f"{n} {'full' if f else 'diag'} {e:.1e}" for (n, f), e in errors.items()) + ".", "", big]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--write-results", action="store_true")
    args = p.parse_args(argv)
    rows, errors = run(args.min_run_time)
    text = render(rows, errors, big_auto_ce())
    print(text)
    if args.write_results:
        write_section("torch-cpu", text)


if __name__ == "__main__":
    main()
