"""The logits op for CUDA tensors (and CPU tensors through Triton's interpreter): its forward
kernels and the launchers of both directions, with the contract of faim_kernels/ops/contract.py.

Forward, four launches after the preparation (common.Operands: centre, x', mu' with ATen, then one
side-prep launch per side for the norms and the float64 s = v·beta):
  _logits_fwd_kernel     tiles of x'·mu'ᵀ (tl.dot over D, grouped launch order) with the epilogue
                         fused: q = |x'|² + |mu'|² − 2x'·mu', the near-pair test of docs/design.md §2.1 (near pairs), s, d,
                         −γ·d, written once. Near pairs go to a short list (atomic counter).
  _logits_near_pairs_kernel   recomputes the listed pairs from the raw difference (x_b − mu_c)·Lc and
                         overwrites them, and every pair of each listed tile (a tile with more near
                         pairs than it lists one by one, or past the list's capacity): an overfull
                         tile costs its own pairs' near-pair recompute, never the whole call's.
Backward: backward.py's kernel once per side (float32/float64 logits give a back without a GEMM),
then the chain rule to the raw inputs (common.Operands.chain).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common, configs
from .backward import backward_both_sides, zero_grads
from .common import (_cast, _gemm_q, _load_eps, _near_pair_distance, _pair_distance, _pair_s, _recompute_near_pairs,
                     _s_is_near, _tile_dot)


@triton.jit(do_not_specialize=["B", "capacity", "KEY_B", "KEY_C"])
def _logits_fwd_kernel(
        xp_ptr, mup_ptr, xn_ptr, mn_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam_ptr, gamma_ptr,
        out_ptr, count_ptr, near_b_ptr, near_c_ptr, near_tile_ptr,
        B, C, D, eps_hi, eps_lo, tau, capacity,
        KEY_B, KEY_C,  # power-of-two buckets of B and C: the autotuning key only
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_B: tl.constexpr,
        IMPL: tl.constexpr, PREC: tl.constexpr, BF16_BY_HAND: tl.constexpr, NEAR_PER_TILE: tl.constexpr,
        LOCAL64: tl.constexpr):
    """One [BLOCK_B, BLOCK_C] tile of logits = −γ·d from one GEMM tile and the fused epilogue.

    Parameters (`forward` passes them by keyword):
      xp_ptr, mup_ptr [B, D], [C, D]       x', mu' as the GEMM takes them (operand dtype)
      xn_ptr, mn_ptr [B], [C]              |x'|², |mu'|² (compute dtype)
      sx_*_ptr, smu_*_ptr [B], [C]         s = raw·beta in hi + lo parts (common._pair_s)
      lam_ptr, gamma_ptr                   0-dim float64
      out_ptr [B, C]                       out: the logits (x's dtype)
      count_ptr [2] int32                  out: listed near pairs, listed tiles (zeroed before)
      near_b_ptr, near_c_ptr [capacity]    out: the listed near pairs (b, c)
      near_tile_ptr [tiles]                out: the listed tiles (row-major tile index)
      B, C, D; eps_hi + eps_lo = eps; tau  sizes; the epsilon; the near threshold
      capacity                             slots of the near-pair list
      KEY_B, KEY_C                         power-of-two buckets of B, C: the autotuning key only
      BLOCK_B, BLOCK_C, BLOCK_K, GROUP_B   the config: tile, K step, grouped launch order
      IMPL, PREC                           how the GEMM tiles multiply (common.DOT/DOT_UPCAST/FMA; PREC)
      BF16_BY_HAND                         round to bf16 by hand (interpreter.py, item 3)
      NEAR_PER_TILE                        near pairs a tile lists one by one (more: the tile is listed)
      LOCAL64                              int64 offsets inside a tile (BLOCK_B·C may pass 2³¹)
    grid = (tiles,), in grouped order."""
    # Grouped launch order (Triton's matmul tutorial): GROUP_B row tiles sweep the column tiles
    # together, so each mu' tile is read from L2 rather than DRAM by the whole group.
    pid = tl.program_id(0)
    n_b = tl.cdiv(B, BLOCK_B)
    n_c = tl.cdiv(C, BLOCK_C)
    in_group = GROUP_B * n_c
    first_b = (pid // in_group) * GROUP_B
    size_b = tl.minimum(n_b - first_b, GROUP_B)
    pid_b = first_b + (pid % in_group) % size_b
    pid_c = (pid % in_group) // size_b

    # 64-bit offsets only where they can pass 2³¹: the tile's corner; inside the tile int32 (or
    # int64 where BLOCK_B·C may pass 2³¹, LOCAL64), which keeps the epilogue's registers free.
    acc_t = xn_ptr.dtype.element_ty
    b0 = pid_b * BLOCK_B
    c0 = pid_c * BLOCK_C
    lb = tl.arange(0, BLOCK_B)
    lc = tl.arange(0, BLOCK_C)
    bm = lb < B - b0
    cm = lc < C - c0
    dot = _tile_dot(xp_ptr + b0.to(tl.int64) * D, mup_ptr + c0.to(tl.int64) * D, lb, lc, bm, cm, D,
                    tl.zeros((BLOCK_B, BLOCK_C), dtype=acc_t), BLOCK_K, IMPL, PREC)

    q, near = _gemm_q(dot, tl.load(xn_ptr + b0 + lb, mask=bm, other=0.0), tl.load(mn_ptr + c0 + lc, mask=cm, other=0.0),
                      tau)
    sx_hi = tl.load(sx_hi_ptr + b0 + lb, mask=bm, other=0.0)
    smu_hi = tl.load(smu_hi_ptr + c0 + lc, mask=cm, other=0.0)
    s = _pair_s(sx_hi, tl.load(sx_lo_ptr + b0 + lb, mask=bm, other=0.0),
                smu_hi, tl.load(smu_lo_ptr + c0 + lc, mask=cm, other=0.0))
    near = near | _s_is_near(s, sx_hi, smu_hi)
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    a, r, d, ia, ir = _pair_distance(q, s, lam, _load_eps(eps_hi, eps_lo, acc_t))
    mask = bm[:, None] & cm[None, :]
    if LOCAL64:
        offs = lb.to(tl.int64)[:, None] * C + lc[None, :]
    else:
        offs = lb[:, None] * C + lc[None, :]
    tl.store(out_ptr + (b0.to(tl.int64) * C + c0) + offs, _cast(-gamma * d, out_ptr.dtype.element_ty, BF16_BY_HAND),
             mask=mask)

    # Near pairs: append (b, c) to the list (typically about one per row, a sample's own
    # prototype, so zero to two per tile), one atomic per tile to reserve their slots. A tile
    # with more than NEAR_PER_TILE of them, or whose slots pass the list's capacity, is listed
    # itself instead (count_ptr[1], near_tile_ptr): the near-pair kernel recomputes that tile's pairs, and
    # only that tile's, exactly.
    near = near & mask
    n_near = tl.sum(near.to(tl.int32))
    if n_near > 0:
        start = capacity
        if n_near <= NEAR_PER_TILE:
            start = tl.atomic_add(count_ptr, n_near, sem="relaxed")
        if start + n_near > capacity:
            tile = tl.atomic_add(count_ptr + 1, 1, sem="relaxed")
            tl.store(near_tile_ptr + tile, pid_b * n_c + pid_c)
        flat = tl.arange(0, BLOCK_B)[:, None] * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
        for k in range(0, tl.minimum(n_near, capacity - start)):  # (the slots it holds: written)
            f = tl.min(tl.where(near, flat, BLOCK_B * BLOCK_C))
            near = near & (flat != f)
            tl.store(near_b_ptr + start + k, b0 + f // BLOCK_C)
            tl.store(near_c_ptr + start + k, c0 + f % BLOCK_C)


# Nothing here is specialised on sizes (one build per dtype and Σ mode): its loads are per pair.
@triton.jit(do_not_specialize=["B", "C", "D", "capacity", "tile_b", "tile_c"])
def _logits_near_pairs_kernel(
        x_ptr, mu_ptr, lc_ptr, beta_ptr, sx_hi_ptr, sx_lo_ptr, smu_hi_ptr, smu_lo_ptr, lam_ptr, gamma_ptr, out_ptr,
        count_ptr, near_b_ptr, near_c_ptr, near_tile_ptr,
        B, C, D, eps_hi, eps_lo, capacity, tile_b, tile_c,
        FULL: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
        USE_DOT: tl.constexpr, BF16_BY_HAND: tl.constexpr):
    """Overwrites the listed pairs, and every pair of the listed tiles ([tile_b, tile_c] tiles of
    the forward's grid, row-major tile index), with logits from the exact q. A persistent grid:
    program p takes blocks p, p + P, p + 2P, ... of BLOCK_P pairs.

    Parameters (`forward` passes them by keyword):
      x_ptr, mu_ptr [B, D], [C, D]         the raw rows (compute dtype)
      lc_ptr [D] or [D, D], beta_ptr [D]   the metric factor and the 1-form
      sx_*_ptr, smu_*_ptr, lam_ptr, gamma_ptr, out_ptr, count_ptr, near_*_ptr, B, C, D, eps_*,
      capacity                             as in _logits_fwd_kernel (out_ptr, count_ptr, near_*: read here)
      tile_b, tile_c                       the forward's tile (its config's BLOCK_B, BLOCK_C)
      FULL                                 full Lc ([D, D]) rather than diagonal
      BLOCK_P, BLOCK_K, BLOCK_J, USE_DOT   the near-pair recompute's blocks (configs.NEAR_TILES)
      BF16_BY_HAND                         as in _logits_fwd_kernel"""
    n_listed = tl.minimum(tl.load(count_ptr), capacity)
    per_tile = tile_b * tile_c
    n_items = n_listed + tl.load(count_ptr + 1).to(tl.int64) * per_tile
    n_c = tl.cdiv(C, tile_c)
    acc_t = x_ptr.dtype.element_ty
    lam = tl.load(lam_ptr).to(acc_t)
    gamma = tl.load(gamma_ptr).to(acc_t)
    eps = _load_eps(eps_hi, eps_lo, acc_t)
    for start in range(tl.program_id(0) * BLOCK_P, n_items, tl.num_programs(0) * BLOCK_P):
        idx = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        from_list = idx < n_listed
        lb = tl.load(near_b_ptr + idx, mask=from_list, other=0).to(tl.int64)
        lcol = tl.load(near_c_ptr + idx, mask=from_list, other=0).to(tl.int64)
        j = tl.where(from_list, 0, idx - n_listed)
        tile = tl.load(near_tile_ptr + j // per_tile, mask=(idx < n_items) & ~from_list, other=0).to(tl.int64)
        b = tl.where(from_list, lb, (tile // n_c) * tile_b + (j % per_tile) // tile_c)
        c = tl.where(from_list, lcol, (tile % n_c) * tile_c + j % tile_c)
        pm = (idx < n_items) & (b < B) & (c < C)
        q, _, s_near = _recompute_near_pairs(x_ptr, mu_ptr, lc_ptr, beta_ptr, b, c, pm, -1, D, FULL, BLOCK_P, BLOCK_K,
                                       BLOCK_J, USE_DOT)
        s = ((tl.load(sx_hi_ptr + b, mask=pm, other=0.0) - tl.load(smu_hi_ptr + c, mask=pm, other=0.0))
             + (tl.load(sx_lo_ptr + b, mask=pm, other=0.0) - tl.load(smu_lo_ptr + c, mask=pm, other=0.0)))
        a, r, d, _, _, _ = _near_pair_distance(q, s_near, s, lam, eps)
        tl.store(out_ptr + b * C + c, _cast(-gamma * d, out_ptr.dtype.element_ty, BF16_BY_HAND), mask=pm)


# (The counters are reset before each autotuning trial: a trial's list must not add to the next one's.)
_FWD = configs.Tuned(_logits_fwd_kernel, "FWD_CONFIGS", key=["KEY_B", "KEY_C", "D"], reset=["count_ptr"])


def forward(x, mu, lc, beta, lam, gamma, eps: float, tau: float):
    """(logits [B, C] in x's dtype, xp, mup, sx, smu): the randers_logits op of the contract."""
    o = common.Operands(x, mu, lc, beta, lam, gamma, eps, tau)
    B, C = o.B, o.C
    out = common._empty((B, C), x.dtype, o.device)
    if out.numel():
        with common.device_ctx(o.device):
            capacity = configs.NEAR_CAPACITY if configs.NEAR_CAPACITY is not None else max(1024, 2 * (B + C))
            count = torch.zeros(2, dtype=torch.int32, device=o.device)  # listed pairs, listed tiles
            near_b = torch.empty(capacity, dtype=torch.int32, device=o.device)
            near_c = torch.empty(capacity, dtype=torch.int32, device=o.device)
            n_tiles = max(triton.cdiv(B, c.kwargs["BLOCK_B"]) * triton.cdiv(C, c.kwargs["BLOCK_C"])
                          for c in configs.FWD_CONFIGS[o.precision_mode])
            near_tile = torch.empty(n_tiles, dtype=torch.int32, device=o.device)
            grid = lambda meta: (triton.cdiv(B, meta["BLOCK_B"]) * triton.cdiv(C, meta["BLOCK_C"]),)  # noqa: E731
            sides = dict(sx_hi_ptr=o.sx[0], sx_lo_ptr=o.sx[1], smu_hi_ptr=o.smu[0], smu_lo_ptr=o.smu[1],
                         lam_ptr=o.lam, gamma_ptr=o.gamma, out_ptr=out, count_ptr=count, near_b_ptr=near_b,
                         near_c_ptr=near_c, near_tile_ptr=near_tile, B=B, C=C, D=o.D, eps_hi=o.eps_hi,
                         eps_lo=o.eps_lo, capacity=capacity, BF16_BY_HAND=o.bf16_by_hand)
            tuned = _FWD[o.precision_mode]
            tuned[grid](
                xp_ptr=o.xp, mup_ptr=o.mup, xn_ptr=o.xn, mn_ptr=o.mn, tau=o.tau,
                KEY_B=triton.next_power_of_2(B), KEY_C=triton.next_power_of_2(C), IMPL=o.impl, PREC=o.prec,
                NEAR_PER_TILE=configs.NEAR_PER_TILE, LOCAL64=256 * C >= 2 ** 31, **sides)
            BLOCK_P, BLOCK_K, BLOCK_J, use_dot = o.near_tiles()
            n_prog = max(1, min(triton.cdiv(B * C, BLOCK_P), 2 * common.parallel_width(o.device)))
            _logits_near_pairs_kernel[(n_prog,)](
                x_ptr=o.x, mu_ptr=o.mu, lc_ptr=o.lc, beta_ptr=o.beta, tile_b=tuned.best_config.kwargs["BLOCK_B"],
                tile_c=tuned.best_config.kwargs["BLOCK_C"], FULL=o.full, BLOCK_P=BLOCK_P, BLOCK_K=BLOCK_K,
                BLOCK_J=BLOCK_J, USE_DOT=use_dot, **sides)
    return out, o.xp, o.mup, o.sx64, o.smu64


def backward(grad, logits, x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps: float, tau: float,
             grad_mask: int = 63):
    """(dx, dmu, dlc, dbeta, dlam, dgamma) in the inputs' dtypes: the randers_logits_backward op.
    Bit k of grad_mask asks for gradient k (x, mu, lc, beta, lam, gamma); an unasked one is an
    empty tensor of its input's dtype (backward.backward_both_sides)."""
    B, C = x.shape[0], mu.shape[0]
    inputs = (x, mu, lc, beta, lam, gamma)
    if B == 0 or C == 0:
        return zero_grads(inputs, grad_mask)
    if grad.shape != (B, C):
        raise ValueError(f"grad must have shape [B, C] = [{B}, {C}], got {tuple(grad.shape)}")
    o = common.Operands.saved(x, mu, lc, beta, lam, gamma, xp, mup, sx, smu, eps, tau)
    g = grad.detach()
    if g.device != o.device:
        raise ValueError(f"grad is on {g.device} but x is on {o.device}")
    if g.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        g = g.to(x.dtype)
    # Half logits are rounded too coarsely to give a back (~4e-3 off): those recompute the tiles.
    lg = logits.detach() if logits.dtype in (torch.float32, torch.float64) else None
    # Expanded gradients (stride 0, e.g. from out.sum()) are read in place through their strides.
    return backward_both_sides(o, inputs, grad_mask, grad=g, logits=lg)
