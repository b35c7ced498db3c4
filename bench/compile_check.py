"""Builds the Triton kernels (every op family) for a GPU target without a GPU (Triton's own ptxas), and reports
each variant's registers, spills (local-memory stack) and matrix instructions; exits 1 if any
variant fails to compile. The interpreter runs the kernels' logic on CPU tensors but never the
compiler, so this is where layout, type and resource problems show up before a GPU does.

    python -m bench.compile_check            # every config of every kernel variant for sm_90
    python -m bench.compile_check --quick    # the pinned config of each code path (CI runs this)
    python -m bench.compile_check --defaults --strict   # the configs the launchers run by default;
                                             # exit 2 on a spill above --max-spill (64 B/thread) or
                                             # a TF32/half GEMM kernel without mma/wgmma
    python -m bench.compile_check --defaults -j 2 --only "bwd tf32"   # 2 builds at a time, a subset

The summary at the end lists every variant whose stack (spilled registers, bytes per thread) passes
--max-spill, and every TF32/half variant of a GEMM kernel whose SASS holds no HGMMA/HMMA.

Run it without TRITON_INTERPRET (the interpreter stands in for the compiler when that is set).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench.compile_check compiles the kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from faim_kernels.ops.triton import backward, common, configs, cross_entropy, logits, topk  # noqa: E402

FLOAT_ARGS = ("eps_hi", "eps_lo", "tau", "margin_hi", "margin_lo")
ALIGNED_INTS = ("D",)  # Triton specializes a multiple of 16 at launch; D usually is one


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def build(fn, ptr_types, constexprs, num_warps, num_stages, arch, int64_args=()):
    """Compiles fn for the target; returns (seconds, resource-usage line, instruction counts)."""
    while not isinstance(fn, triton.runtime.JITFunction):  # under triton.heuristics / autotune
        fn = fn.fn
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in int64_args else "i32"
            if name in ALIGNED_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    t0 = time.time()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, "num_stages": num_stages})
    seconds = time.time() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    line = next((ln.strip() for ln in usage.splitlines() if "REG:" in ln), "?")
    fields = dict(kv.split(":") for kv in line.split() if ":" in kv)
    counts = {op: sass.count(op) for op in ("HGMMA", "HMMA", "LDL", "STL")}
    counts["stack"] = int(fields["STACK"]) if fields.get("STACK", "").isdigit() else -1
    return seconds, f"regs {fields.get('REG', '?')}, stack {fields.get('STACK', '?')} B", counts


# The GEMM kernels: in TF32 and half precision modes their tiles must reach the tensor cores.
GEMM_KERNELS = ("fwd ", "bwd ", "ce_fwd ", "topk ")


def needs_mma(name: str) -> bool:
    return name.startswith(GEMM_KERNELS) and ("tf32" in name.split()[1] or "half" in name.split()[1])


# precision mode -> (GEMM operand dtypes, compute dtype, IMPL, PREC)
PRECISION_MODES = {
    "half": (("bf16", "fp16"), "fp32", common.DOT, "ieee"),
    "ieee": (("fp32",), "fp32", common.DOT, "ieee"),
    "tf32": (("fp32",), "fp32", common.DOT, "tf32"),
    "fp64": (("fp64",), "fp64", common.FMA, "ieee"),
}


def fwd_ptrs(op, acc):
    return dict(xp_ptr=op, mup_ptr=op, xn_ptr=acc, mn_ptr=acc, sx_hi_ptr=acc, sx_lo_ptr=acc, smu_hi_ptr=acc,
                smu_lo_ptr=acc, lam_ptr="fp64", gamma_ptr="fp64", out_ptr=op, count_ptr="i32", near_b_ptr="i32",
                near_c_ptr="i32", near_tile_ptr="i32")


def bwd_ptrs(op, acc, ce, from_logits, opts):
    """As backward_side passes them; an absent input is None (a constexpr of the build)."""
    ptrs = dict(own_ptr=op, oth_ptr=op, own_n_ptr=acc, oth_n_ptr=acc, s_own_hi_ptr=acc, s_own_lo_ptr=acc,
                s_oth_hi_ptr=acc, s_oth_lo_ptr=acc, own_raw_ptr=acc, oth_raw_ptr=acc, lc_ptr=acc, beta_ptr=acc,
                lam_ptr="fp64", gamma_ptr="fp64", dp_ptr=acc, ds_ptr="fp64", scal_ptr="fp64", near_ptr="i64")
    if ce:
        ptrs.update(tgt_ptr="i64", w_lse_ptr="fp64", w_target_logit_ptr="fp64", w_sl_ptr="fp64", lse_ptr="fp64")
        if opts["HAS_SOFT"]:
            ptrs.update(w_pl_ptr="fp64", soft_ptr=acc)
        if opts["HAS_WEIGHT"]:
            ptrs.update(cw_ptr=acc)
    else:
        ptrs.update(g_ptr=op, **(dict(lg_ptr=op) if from_logits else {}))
    return ptrs


BWD_OPTIONAL = ("g_ptr", "lg_ptr", "tgt_ptr", "w_lse_ptr", "w_target_logit_ptr", "w_sl_ptr", "lse_ptr", "w_pl_ptr", "cw_ptr",
                "soft_ptr")


def near_kernel_ptrs(op, acc):
    return dict(x_ptr=acc, mu_ptr=acc, lc_ptr=acc, beta_ptr=acc, sx_hi_ptr=acc, sx_lo_ptr=acc, smu_hi_ptr=acc, smu_lo_ptr=acc,
                lam_ptr="fp64", gamma_ptr="fp64", out_ptr=op, count_ptr="i32", near_b_ptr="i32", near_c_ptr="i32",
                near_tile_ptr="i32")


def ce_fwd_ptrs(op, acc):
    return dict(xp_ptr=op, mup_ptr=op, xn_ptr=acc, mn_ptr=acc, sx_hi_ptr=acc, sx_lo_ptr=acc, smu_hi_ptr=acc,
                smu_lo_ptr=acc, x_ptr=acc, mu_ptr=acc, lc_ptr=acc, beta_ptr=acc, tgt_ptr="i64", lam_ptr="fp64", gamma_ptr="fp64",
                part_ptr="fp64", cw_ptr=acc, soft_ptr=acc)


# The cross-entropy's target forms as constexprs: class labels; two targets per row (the compact
# probability target) with class weights and a dense probability target.
CE_HARD = dict(N_TGT=1, HAS_WEIGHT=False, HAS_SOFT=False)
CE_OPTIONS = dict(N_TGT=2, HAS_WEIGHT=True, HAS_SOFT=True)


def _ce_option_sets(ce, full, quick):
    """The target forms to build a variant with: every one, or in a quick build one per variant."""
    if not ce:
        return [CE_HARD]
    return [CE_OPTIONS if full else CE_HARD] if quick else [CE_HARD, CE_OPTIONS]


# The backward variants of a quick build, per precision mode: (CE, FROM_LOGITS, FULL). Every variant holds
# both walks (noting, and the recomputing one an overflow or logits without d take). Half logits
# recompute their tiles; the cross-entropy runs in every precision mode.
_QUICK_BWD = {
    "half": [(False, False, False), (True, False, True)],
    "ieee": [(False, True, False), (False, True, True), (True, False, False), (True, False, True)],
    "fp64": [(False, True, True), (True, False, True)],
}


def _bwd_variants(fam, quick):
    if quick:
        return _QUICK_BWD.get(fam, [])
    out = []
    for ce in (False, True):
        for from_logits in ((False,) if ce or fam == "half" else (False, True)):
            out += [(ce, from_logits, full) for full in (False, True)]
    return out


def variants(quick, defaults=False):
    """(name, fn, ptr types, constexprs, warps, stages, int64 args) for every variant to build: every
    config of every code path, the pinned config of each (defaults), or fewer paths (quick)."""
    out = []
    for fam, (ops, acc, impl, prec) in PRECISION_MODES.items():
        if quick and fam == "tf32":
            continue
        pinned = quick or defaults
        near_p, near_k, near_j = configs.NEAR_TILES[fam]
        for op in (ops[:1] if quick else ops):
            fwd_cfgs = configs.FWD_CONFIGS[fam][:1] if pinned else configs.FWD_CONFIGS[fam]
            for cfg in fwd_cfgs:
                consts = dict(cfg.kwargs, IMPL=impl, PREC=prec, BF16_BY_HAND=False,
                              NEAR_PER_TILE=configs.NEAR_PER_TILE, LOCAL64=False)
                out.append((f"fwd {fam}/{op} {cfg.kwargs} w{cfg.num_warps}s{cfg.num_stages}",
                            logits._logits_fwd_kernel, fwd_ptrs(op, acc), consts, cfg.num_warps, cfg.num_stages, ()))
            bwd_cfgs = configs.BWD_CONFIGS[fam][:1] if pinned else configs.BWD_CONFIGS[fam]
            for cfg in bwd_cfgs:
                for ce, from_logits, full in _bwd_variants(fam, quick):
                    for own_is_x, ce_opts in itertools.product((True,) if quick else (True, False),
                                                               _ce_option_sets(ce, full, quick)):
                        ptrs = bwd_ptrs(op, acc, ce, from_logits, ce_opts)
                        block_d = configs.BWD_BLOCK_D[fam][1 if full else 0]
                        consts = dict(cfg.kwargs, BLOCK_D=block_d, CE=ce, OWN_IS_X=own_is_x,
                                      FROM_LOGITS=from_logits, FULL=full, IMPL=impl, PREC=prec,
                                      NEAR_P=near_p, NEAR_K=near_k, NEAR_DOT=acc == "fp32", BF16_BY_HAND=False,
                                      LOCAL64=False, NEED_DP=True, HAS_SCAL=own_is_x, **ce_opts,
                                      **{name: None for name in BWD_OPTIONAL if name not in ptrs})
                        out.append((f"bwd {fam}/{op} {cfg.kwargs} w{cfg.num_warps}s{cfg.num_stages} d{block_d} "
                                    f"{'ce' if ce else 'logits'} from_logits={from_logits} full={full} "
                                    f"own_is_x={own_is_x}"
                                    + (f" {ce_opts}" if ce else ""), backward._backward_kernel,
                                    ptrs, consts, cfg.num_warps, cfg.num_stages, ()))
            if fam in CE_MODES:
                bl = configs.CE_FWD_BLOCKS[fam]
                for full, ce_opts in itertools.product((True,) if quick else (False, True), (CE_HARD, CE_OPTIONS)):
                    consts = dict(BLOCK_B=bl["BLOCK_B"], BLOCK_C=bl["BLOCK_C"], BLOCK_K=bl["BLOCK_K"],
                                  NEAR_P=near_p, NEAR_K=near_k, NEAR_J=near_j, NEAR_DOT=acc == "fp32",
                                  FULL=full, IMPL=impl, PREC=prec,
                                  TGT_P=triton.next_power_of_2(ce_opts["N_TGT"]), **ce_opts)
                    consts.update({name: None for name, flag in (("cw_ptr", "HAS_WEIGHT"), ("soft_ptr", "HAS_SOFT"))
                                   if not ce_opts[flag]})
                    warps = configs.ce_fwd_warps(bl, ce_opts["N_TGT"], ce_opts["HAS_SOFT"])
                    out.append((f"ce_fwd {fam} full={full} {ce_opts} w{warps}", cross_entropy._ce_fwd_kernel,
                                ce_fwd_ptrs(op, acc), consts, warps, bl["stages"], ()))
            if fam in ("half", "ieee", "fp64"):
                for full in ((True,) if quick else (False, True)):
                    consts = dict(FULL=full, BLOCK_P=near_p, BLOCK_K=near_k, BLOCK_J=near_j, USE_DOT=acc == "fp32",
                                  BF16_BY_HAND=False)
                    out.append((f"near_pairs {op} full={full}", logits._logits_near_pairs_kernel,
                                near_kernel_ptrs(op, acc), consts, 4, 2, ()))
                for from_raw in (True, False):
                    consts = dict(S_FROM_RAW=from_raw, BLOCK_R=32, BLOCK_D=64)  # as Operands._prep_side
                    out.append((f"side_prep {op} s_from_raw={from_raw}", common._side_prep_kernel,
                                dict(v_ptr=op, raw_ptr=acc, beta_ptr=acc, s_ptr="fp64", norm_ptr=acc, hi_ptr=acc,
                                     lo_ptr=acc), consts, 4, 2, ()))
            if fam in ("ieee", "fp64"):
                for diag in (True, False):
                    ptrs = dict(raw_ptr=acc, m_ptr=acc, ds_ptr="fp64", dbeta_ptr="fp64")
                    if diag:
                        ptrs.update(dvp_ptr=acc, dlc_ptr="fp64")
                    consts = dict(DIAG=diag, BLOCK_R=32, BLOCK_D=64)
                    if not diag:  # absent inputs are None, as the launcher passes them
                        consts.update(dvp_ptr=None, dlc_ptr=None)
                    out.append((f"side_grad {acc} diag={diag}", common._side_grad_kernel, ptrs, consts, 4, 2, ()))
    return out + topk_variants(quick, defaults)


def topk_ptrs(op, acc):
    return dict(xp_ptr=op, mup_ptr=op, xn_ptr=acc, mn_ptr=acc, sx_hi_ptr=acc, sx_lo_ptr=acc, smu_hi_ptr=acc,
                smu_lo_ptr=acc, lam_ptr="fp64", x_ptr=acc, mu_ptr=acc, lc_ptr=acc, beta_ptr=acc, out_ptr="i64")


def topk_variants(quick, defaults=False):
    """The top-k kernel (float16/bfloat16/float32 inputs) at KP = 8 (k = 1) up to its limit, 1024. The quick
    build stops at KP = 64: KP = 1024 took 200 s (fp32) and 410 s (bf16) to build here, and spills
    about 3 KB per thread (the [16, 1024] running best and tile keys do not fit in registers)."""
    out = []
    for fam in (("ieee", "half") if quick else ("ieee", "tf32", "half")):
        ops, acc, impl, prec = PRECISION_MODES[fam]
        for KP in ((8, 64) if quick else (8, 64, 256) if defaults else (8, 64, 256, 1024)):
            for full in ((True,) if quick else (False, True)):
                for largest in ((False,) if quick else (False, True)):
                    BLOCK_B, BLOCK_C, BLOCK_K, warps = topk._blocks(fam, KP)
                    consts = dict(LARGEST=largest, BLOCK_B=BLOCK_B, BLOCK_C=BLOCK_C, KP=KP, BLOCK_K=BLOCK_K,
                                  IMPL=impl, PREC=prec, FULL=full, BLOCK_P=16, BLOCK_KN=32, BLOCK_J=64, USE_DOT=True)
                    out.append((f"topk {fam}/{ops[0]} KP={KP} full={full} largest={largest} "
                                f"[{BLOCK_B}x{BLOCK_C}] w{warps}", topk._topk_kernel, topk_ptrs(ops[0], acc), consts,
                                warps, 2, ()))
    return out


# The cross-entropy's forward runs on float32 (IEEE or TF32) and float64 inputs.
CE_MODES = ("half", "ieee", "tf32", "fp64")


def _build_one(job):
    """(instruction counts or None on failure, the line to print) for one variant."""
    (name, fn, ptrs, consts, warps, stages, int64_args), arch = job
    try:
        seconds, usage, counts = build(fn, ptrs, consts, warps, stages, arch, int64_args)
        return counts, f"ok    {name}: {usage}, {counts} ({seconds:.1f} s)"
    except Exception as e:
        return None, f"FAIL  {name}: {type(e).__name__}: {str(e).strip()[-1500:]}"


_TODO = []


def _build_nth(i, arch):
    return _build_one((_TODO[i], arch))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="the pinned config of each code path only")
    ap.add_argument("--defaults", action="store_true",
                    help="every code path with the configs the launchers run by default (the first of each list)")
    ap.add_argument("--max-spill", type=int, default=64, help="bytes of stack per thread a variant may use")
    ap.add_argument("--strict", action="store_true", help="exit 2 on a spill above --max-spill or a missing mma")
    ap.add_argument("--only", metavar="REGEX", help="only the variants whose name matches REGEX (re.search)")
    ap.add_argument("--jobs", "-j", type=int, default=1, help="variants built in parallel (processes)")
    args = ap.parse_args(argv)
    failures = 0
    spills, no_mma = [], []
    todo = variants(args.quick, args.defaults)
    if args.only:
        todo = [v for v in todo if re.search(args.only, v[0])]
    if args.jobs > 1:
        global _TODO
        _TODO = todo  # the forked workers inherit it (kernels do not pickle)
        ctx = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            results = [(v[0], r) for v, r in zip(todo, pool.map(_build_nth, range(len(todo)), [args.arch] * len(todo)))]
    else:
        results = ((v[0], _build_one((v, args.arch))) for v in todo)
    for name, (counts, message) in results:
        print(message, flush=True)
        if counts is None:  # report every failing variant, not just the first
            failures += 1
            continue
        if counts["stack"] > args.max_spill:
            spills.append(f"{counts['stack']:5d} B  {name}")
        if needs_mma(name) and counts["HGMMA"] + counts["HMMA"] == 0:
            no_mma.append(name)
    print(f"{failures} of {len(todo)} variants failed to build for sm_{args.arch}")
    print(f"{len(spills)} variants spill more than {args.max_spill} B/thread" + "".join(f"\n  {s}" for s in spills))
    print(f"{len(no_mma)} TF32/half GEMM variants without mma/wgmma" + "".join(f"\n  {s}" for s in no_mma))
    if failures:
        return 1
    return 2 if args.strict and (spills or no_mma) else 0


if __name__ == "__main__":
    sys.exit(main())
