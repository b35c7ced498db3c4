"""faim_kernels: fused, exact kernels for Finsler (Randers) metric heads.

    import faim_kernels as fk
    fk.randers_distance(x, mu, L, beta, lam, eps=1e-6)          -> [B, C]
    fk.randers_logits(x, mu, L, beta, lam, gamma, eps=1e-6)     -> [B, C]  (= −γ·d)
    fk.randers_topk(x, mu, L, beta, lam, k)                      -> ([B, k], [B, k]) the k nearest
    fk.reference.*                                               the einsum oracle
    fk.randers_cross_entropy(x, mu, L, beta, lam, gamma, target, ...)  F.cross_entropy without [B, C]
    fk.SoftTargets, fk.mixup_soft_targets                        compact probability targets
    fk.FAIMHead(in_features, num_classes)                        a drop-in for nn.Linear (faim_kernels.nn)
"""
from . import reference
from .functional import (randers_cross_entropy, randers_distance, randers_distance_at, randers_logits,
                         randers_topk)
from .targets import SoftTargets, mixup_soft_targets, soft_targets_from_dense
from . import nn
from .nn import (FAIMBlock, FAIMHead, FAIMInfoNCELoss, FAIMNTXentLoss, FAIMTripletLoss, RandersMetric,
                 swap_classifier)

__all__ = ["reference", "randers_distance", "randers_logits", "randers_cross_entropy", "randers_topk",
           "randers_distance_at", "nn",
           "FAIMHead", "FAIMBlock", "RandersMetric", "FAIMInfoNCELoss", "FAIMNTXentLoss", "FAIMTripletLoss",
           "swap_classifier", "SoftTargets", "mixup_soft_targets", "soft_targets_from_dense"]
__version__ = "0.1.0"
