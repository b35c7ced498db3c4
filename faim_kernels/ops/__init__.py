"""Kernel families, one module each: the op registrations (custom ops with fake kernels and
autograd) and the launchers. `randers_logits` is the dispatch layer for the fused logits op."""
