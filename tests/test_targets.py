"""The compact probability targets (faim_kernels/targets.py): SoftTargets stands for the dense
target it names, and the adapters reproduce timm's Mixup/CutMix labels without timm (timm's
`mixup_target` is restated below from timm.data.mixup, the formula the adapters must match)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import faim_kernels as fk
from conftest import assert_rel_close, make_inputs


def timm_mixup_target(target, num_classes, lam=1.0, smoothing=0.0):
    """timm.data.mixup.mixup_target (timm 1.0): one_hot with off/on values, mixed with the flipped batch."""
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value

    def one_hot(t):
        return torch.full((t.size(0), num_classes), off_value).scatter_(1, t.long().view(-1, 1), on_value)
    return one_hot(target) * lam + one_hot(target.flip(0)) * (1.0 - lam)


@pytest.mark.parametrize("lam, smoothing", [(0.7, 0.1), (1.0, 0.0), (0.35, 0.0), (0.5, 0.2)])
def test_mixup_soft_targets_match_timm(lam, smoothing):
    target = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    want = timm_mixup_target(target, 10, lam, smoothing)
    got = fk.mixup_soft_targets(target, lam=lam, smoothing=smoothing)
    assert got.classes.shape == (8, 2) and got.probs.shape == (8, 2)
    assert_rel_close(got.to_dense(10, torch.float32), want, 1e-6, "dense form")
    back = fk.soft_targets_from_dense(want)
    assert abs(back.smoothing - smoothing) < 1e-6
    assert_rel_close(back.to_dense(10, torch.float32), want, 1e-6, "from timm's dense target")


def test_per_row_lam_and_explicit_partner():
    """timm's 'elem'/'pair' modes draw lam per sample; cutmix's partner can be given."""
    a, b = torch.tensor([0, 1, 2]), torch.tensor([2, 2, 0])
    lam = torch.tensor([0.2, 1.0, 0.6])
    got = fk.mixup_soft_targets(a, b, lam, smoothing=0.1).to_dense(4, torch.float64)
    want = 0.9 * (lam[:, None] * F.one_hot(a, 4) + (1 - lam[:, None]) * F.one_hot(b, 4)).double() + 0.1 / 4
    assert_rel_close(got, want, 1e-7, "per-row lam")


def test_from_dense_refuses_what_it_cannot_represent():
    with pytest.raises(ValueError, match="uniform floor plus at most 2"):
        fk.soft_targets_from_dense(torch.softmax(torch.randn(4, 6), dim=1))
    fk.soft_targets_from_dense(torch.softmax(torch.randn(4, 6), dim=1), k=6)  # every class: always exact


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_loss_on_compact_equals_loss_on_timm_dense(backend):
    """The loss of the compact form equals the loss (and gradients) of the dense target it stands
    for (timm's, as test_mixup_soft_targets_match_timm shows; made dense in float64 here, as timm's
    float32 rounding is not the point), with the loss's own smoothing and class weights on top."""
    B, C = 8, 12
    inputs = make_inputs(B, C, 5, dtype=torch.float64, seed=2, requires_grad=True)
    target = torch.randint(0, C, (B,), generator=torch.Generator().manual_seed(1))
    compact = fk.mixup_soft_targets(target, lam=0.6, smoothing=0.1)
    dense = compact.to_dense(C, torch.float64)
    assert_rel_close(dense, timm_mixup_target(target, C, 0.6, 0.1).double(), 1e-6, "timm's target")
    weight = 0.5 + torch.rand(C, dtype=torch.float64)
    kw = dict(weight=weight, label_smoothing=0.05, backend=backend)
    a = fk.randers_cross_entropy(*inputs, compact, **kw)
    b = fk.randers_cross_entropy(*inputs, dense, **kw)
    assert_rel_close(a, b, 1e-12, "loss")
    for ga, gb in zip(torch.autograd.grad(a, inputs), torch.autograd.grad(b, inputs)):
        assert_rel_close(ga, gb, 1e-10, "gradient")
