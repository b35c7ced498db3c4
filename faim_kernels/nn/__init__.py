"""The modules users put in their models (docs/design.md §3, the public API; the reference design's three integrations):

- A, the head:   FAIMHead (a drop-in for nn.Linear as a classifier), swap_classifier
- B, the losses: FAIMInfoNCELoss, FAIMNTXentLoss, FAIMTripletLoss and their functional forms
- C, the block:  FAIMBlock (log map -> module -> exp map)
and RandersMetric, the learnable metric alone, for B and C.
"""
from .block import FAIMBlock
from .head import FAIMHead, RandersMetric, ledoit_wolf_shrinkage, swap_classifier
from .losses import (
    FAIMInfoNCELoss,
    FAIMNTXentLoss,
    FAIMTripletLoss,
    randers_batch_hard_triplet_loss,
    randers_info_nce,
    randers_nt_xent,
    randers_paired_distance,
    randers_triplet_loss,
)

__all__ = [
    "FAIMHead", "RandersMetric", "FAIMBlock", "swap_classifier", "ledoit_wolf_shrinkage",
    "FAIMInfoNCELoss", "FAIMNTXentLoss", "FAIMTripletLoss",
    "randers_paired_distance", "randers_info_nce", "randers_nt_xent", "randers_triplet_loss",
    "randers_batch_hard_triplet_loss",
]
