"""The Triton backend: the CUDA kernels of the four ops of faim_kernels/ops/contract.py, and the same
launchers for CPU tensors under Triton's interpreter (TRITON_INTERPRET=1 set before import: the tests).

    common.py         shared @triton.jit pieces, side kernels, the GEMM precision mode, `Operands`
    configs.py        launch configurations per precision mode, with their reasons
    interpreter.py    what differs under TRITON_INTERPRET=1 (CPU tensors, the tests), and why
    backward.py       the one backward kernel of both families (constexpr variants) and its launcher
    logits.py         the logits forward kernels; the logits op's launchers (forward, backward)
    cross_entropy.py  the cross-entropy forward kernel; the cross-entropy op's launchers
    topk.py           the top-k kernel (per-tile partial top-k, merged) and its launcher

Importing this package queries no GPU; `register()` attaches the launchers to the ops' CUDA key.
"""
from __future__ import annotations

import functools

import torch

from .. import contract
from . import cross_entropy, logits, topk


@functools.cache
def register() -> None:
    """Registers the launchers as the CUDA kernels of the contract's ops (once)."""
    for op, kernel in ((contract.logits_op, logits.forward), (contract.logits_backward_op, logits.backward),
                       (contract.cross_entropy_op, cross_entropy.forward),
                       (contract.cross_entropy_backward_op, cross_entropy.backward)):
        torch.library.register_kernel(op, "cuda", kernel)
    torch.library.register_kernel(contract.topk_op, "cuda", topk.forward)


# The ops on CPU tensors under the interpreter (whose CPU dispatch key belongs to the C++ kernels):
# the same launchers inside the contract's autograd formula.
interpreted_logits = contract.autograd_function("logits", logits.forward, logits.backward)
interpreted_cross_entropy = contract.autograd_function("cross_entropy", cross_entropy.forward,
                                                       cross_entropy.backward)
