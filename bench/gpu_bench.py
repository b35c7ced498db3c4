"""GPU benchmark of the fused logits (docs/benchmarks.md): the Triton kernel against the einsum reference (where
it fits), the plain-PyTorch GEMM composite (eager and torch.compile), torch.mm(x', mu'ᵀ) of the
same shape and dtype (the GEMM alone, the floor of any fused kernel), and nn.Linear +
F.cross_entropy of the same B, C, D (the floor of any classification head).

    python -m bench.gpu_bench                    # CUDA: docs/benchmarks.md sizes, bf16 and fp32; writes bench/RESULTS.md
    python -m bench.gpu_bench --smoke            # CPU, TRITON_INTERPRET=1: tiny sizes, checks the script runs

Times are medians of triton.testing.do_bench (CUDA events; 20th/80th percentiles in the JSON log;
bench/measure.py),
forward under torch.no_grad() and forward+backward with every input requiring grad. Peak memory is
the CUDA allocator's high-water mark during one forward+backward, beyond the inputs and the incoming
gradient. Ratios are baseline time / Triton time (above 1: Triton is faster); for torch.mm the
ratio is the Triton forward's throughput relative to the bare GEMM's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

from bench.impls import LOGITS_IMPLS, LinearCE, composite_logits, einsum_bytes, make_inputs
from bench.measure import cuda_peak_bytes, emit_row, quantiles_ms

SIZES = [(256, 1000, 512), (1024, 10000, 512), (4096, 100000, 256)]
SMOKE_SIZES = [(8, 24, 16), (13, 40, 33)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
IMPLS = ["triton", "mm", "composite", "composite_compiled", "linear_ce", "einsum"]
TARGETS = "forward ≥ 0.8x torch.mm throughput; ≥ 3x the composite at (4096, 100000, 256); fwd+bwd ≥ 100x einsum at (256, 1000, 512)"


def _factor(L, eps=1e-6):
    return torch.sqrt(L * L + eps) if L.dim() == 1 else torch.linalg.cholesky(L @ L.T + eps * torch.eye(
        L.shape[0], dtype=L.dtype, device=L.device))


def _cases(name, B, C, D, dtype, device, full):
    """(forward callable, forward+backward callable) for one implementation, or None (does not fit)."""
    inputs = make_inputs(B, C, D, full=full, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(B, C, dtype=dtype, device=device)
    if name == "linear_ce":
        head = LinearCE(C, D, dtype, device)
        x, target = inputs[0], torch.randint(0, C, (B,), device=device)
        params = [x] + list(head.linear.parameters())

        def fwd():
            with torch.no_grad():
                return head(x, target)

        return fwd, lambda: torch.autograd.grad(head(x, target), params)
    if name == "mm":
        lc = _factor(inputs[2].detach())
        xp = (inputs[0].detach() * lc if lc.dim() == 1 else inputs[0].detach() @ lc).requires_grad_()
        mup = (inputs[1].detach() * lc if lc.dim() == 1 else inputs[1].detach() @ lc).requires_grad_()

        def fwd():
            with torch.no_grad():
                return torch.mm(xp, mup.T)

        return fwd, lambda: torch.autograd.grad(torch.mm(xp, mup.T), [xp, mup], grad)
    if name == "einsum" and device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        if einsum_bytes(B, C, D, dtype) > 0.7 * free:
            return None
    f = composite_logits if name == "composite" else LOGITS_IMPLS[name]

    def fwd():
        with torch.no_grad():
            return f(*inputs)

    return fwd, lambda: torch.autograd.grad(f(*inputs), inputs, grad)


def run(sizes, dtypes, device, full):
    cuda = device == "cuda"
    rows = []
    for dname in dtypes:
        for (B, C, D) in sizes:
            for name in IMPLS:
                row = {"B": B, "C": C, "D": D, "dtype": dname, "full": full, "impl": name,
                       "fwd_ms": None, "fwdbwd_ms": None, "fwd_q": None, "fwdbwd_q": None, "peak_mb": None,
                       "note": ""}
                try:
                    case = _cases(name, B, C, D, DTYPES[dname], device, full)
                    if case is None:
                        row["note"] = "does not fit"
                    else:
                        fwd, fwdbwd = case
                        row["fwd_q"] = quantiles_ms(fwd, device)
                        row["fwd_ms"] = row["fwd_q"][0]
                        row["fwdbwd_q"] = quantiles_ms(fwdbwd, device)
                        row["fwdbwd_ms"] = row["fwdbwd_q"][0]
                        row["peak_mb"] = cuda_peak_bytes(fwdbwd, empty_cache=True) / 2 ** 20 if cuda else None
                except torch.cuda.OutOfMemoryError:
                    row["note"] = "out of memory"
                except Exception as e:  # a baseline that fails must not hide the others
                    row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
                if cuda:
                    torch.cuda.empty_cache()
                emit_row(rows, row, lambda line: print(line, flush=True))
    return rows


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"


def table(rows):
    """Markdown table: times, ratios to the Triton kernel of the same size and dtype, peak memory."""
    lines = ["| B, C, D | dtype | impl | fwd ms | fwd+bwd ms | fwd: x Triton | fwd+bwd: x Triton | peak MB (fwd+bwd) | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tri = next(t for t in rows if t["impl"] == "triton" and (t["B"], t["C"], t["D"], t["dtype"]) ==
                   (r["B"], r["C"], r["D"], r["dtype"]))
        ratio = lambda k: (r[k] / tri[k]) if (r[k] and tri[k]) else None  # noqa: E731
        lines.append(f"| {r['B']}, {r['C']}, {r['D']} | {r['dtype']} | {r['impl']} | {_fmt(r['fwd_ms'])} | "
                     f"{_fmt(r['fwdbwd_ms'])} | {_fmt(ratio('fwd_ms'))} | {_fmt(ratio('fwdbwd_ms'))} | "
                     f"{_fmt(r['peak_mb'])} | {r['note']} |")
    return "\n".join(lines)


def targets(rows):
    """The targets of docs/benchmarks.md, each as (what, measured, goal, met)."""
    out = []

    def get(impl, B, C, D, dname):
        return next((r for r in rows if r["impl"] == impl and (r["B"], r["C"], r["D"], r["dtype"]) == (B, C, D, dname)),
                    None)

    for dname in sorted({r["dtype"] for r in rows}):
        for (B, C, D) in sorted({(r["B"], r["C"], r["D"]) for r in rows}):
            tri, mm = get("triton", B, C, D, dname), get("mm", B, C, D, dname)
            if tri and mm and tri["fwd_ms"] and mm["fwd_ms"]:
                v = mm["fwd_ms"] / tri["fwd_ms"]
                tflops = 2 * B * C * D / (tri["fwd_ms"] * 1e-3) / 1e12
                out.append((f"{dname} ({B}, {C}, {D}) forward vs torch.mm ({tflops:.0f} TFLOP/s)", v, 0.8, v >= 0.8))
        tri, comp = get("triton", 4096, 100000, 256, dname), get("composite", 4096, 100000, 256, dname)
        if tri and comp and tri["fwd_ms"] and comp["fwd_ms"]:
            v = comp["fwd_ms"] / tri["fwd_ms"]
            out.append((f"{dname} (4096, 100000, 256) forward vs composite", v, 3.0, v >= 3.0))
        tri, ein = get("triton", 256, 1000, 512, dname), get("einsum", 256, 1000, 512, dname)
        if tri and ein and tri["fwdbwd_ms"] and ein["fwdbwd_ms"]:
            v = ein["fwdbwd_ms"] / tri["fwdbwd_ms"]
            out.append((f"{dname} (256, 1000, 512) fwd+bwd vs einsum", v, 100.0, v >= 100.0))
    return out


def header(device):
    import triton
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        dev = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2 ** 30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        dev = "CPU through Triton's interpreter (smoke run: times mean nothing)"
    return (f"Device: {dev}. torch {torch.__version__}, triton {triton.__version__}. "
            f"{datetime.date.today().isoformat()}. Diagonal L (FAIMHead's default), lam = 0.1, gamma = 10.")


def write_results(path, device, rows, tests_status):
    from bench.results import write_section
    section = ["## GPU (bench/gpu_check.sh)", "", header(device), "",
               f"Test suite on this device: {tests_status}.", "", table(rows), "", f"Targets: {TARGETS}.", ""]
    for what, v, goal, met in targets(rows):
        section.append(f"- {what}: {v:.2f}x (goal {goal:g}x) {'met' if met else 'NOT met'}")
    write_section("gpu-logits", "\n".join(section), path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, kernels through TRITON_INTERPRET=1")
    ap.add_argument("--dtypes", default=None, help="comma-separated from bf16, fp16, fp32 (default bf16,fp32)")
    ap.add_argument("--full", action="store_true", help="full L instead of diagonal")
    ap.add_argument("--results", default=None, help="markdown file whose GPU section to write "
                    "(default bench/RESULTS.md; a smoke run writes only where given)")
    ap.add_argument("--log", default=None, help="also write the rows as JSON lines here")
    ap.add_argument("--tests-status", default="not run by this command")
    args = ap.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke needs TRITON_INTERPRET=1 in the environment before Python starts")
        device, sizes = "cpu", SMOKE_SIZES
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) on a CPU-only machine")
        device, sizes = "cuda", SIZES
    dtypes = (args.dtypes or ("fp32" if args.smoke else "bf16,fp32")).split(",")
    rows = run(sizes, dtypes, device, args.full)
    if args.log:
        with open(args.log, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    results = args.results or (None if args.smoke else os.path.join(os.path.dirname(__file__), "RESULTS.md"))
    if results:
        write_results(results, device, rows, args.tests_status)
    print()
    print(header(device))
    print(table(rows))
    for what, v, goal, met in (targets(rows) if device == "cuda" else []):  # a smoke run's times mean nothing
        print(f"{what}: {v:.2f}x (goal {goal:g}x) {'met' if met else 'NOT met'}")
    if results:
        print(f"(written to {results})")
    bad = [r for r in rows if r["impl"] == "triton" and r["fwd_ms"] is None]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
