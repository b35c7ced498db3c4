"""The ops, one way down: dispatch.py (which backend runs a call) → the backends (the C++ kernels in
csrc/, registered for CPU tensors when the extension loads; triton/, registered for CUDA tensors on
first use) → contract.py (the schemas, fake kernels and autograd formulas, registered once) →
faim_kernels/transform.py. row_stats.py turns the cross-entropy op's row statistics into the loss."""
from . import contract  # noqa: F401  (defines the ops before any kernel registers for them)
