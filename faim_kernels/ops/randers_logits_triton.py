"""Triton kernels for the fused logits op: not implemented yet (see the README's status)."""
from __future__ import annotations


def triton_logits_op():
    raise NotImplementedError("backend='triton' is not implemented yet: use backend='cpp' (CPU tensors) "
                              "or backend='reference'")
