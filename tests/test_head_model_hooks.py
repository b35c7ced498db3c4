"""What swap_classifier gives a model with a FAIMHead, without timm (these run everywhere; the same
with real timm models, create_model, registered names and timm's optimizer factory: tests/test_nn_timm.py,
`make test-timm`): the model's no_weight_decay() (one policy for both Sigma modes), reset_classifier
keeping a FAIM head, nn.Linear checkpoints loading the backbone, and a clear answer for .weight/.bias."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import faim_kernels as fk


class TimmLike(nn.Module):
    """timm's pattern: pretrained_cfg names the classifier, reset_classifier builds an nn.Linear,
    and a model-level no_weight_decay()."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.pretrained_cfg = {"classifier": "head.fc"}
        self.num_features, self.num_classes = 6, num_classes
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.pos = nn.Parameter(torch.zeros(6))
        self.head = nn.Module()
        self.head.fc = nn.Linear(6, num_classes)

    def no_weight_decay(self):
        return {"pos"}

    def reset_classifier(self, num_classes):
        self.num_classes = num_classes
        self.head.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        return self.head.fc(self.body(x) + self.pos)


@pytest.mark.parametrize("full", [False, True])
def test_no_weight_decay_is_the_same_policy_for_both_sigma_modes(full):
    model = TimmLike()
    head = fk.swap_classifier(model, full_sigma=full)
    sigma = "L" if full else "log_sigma_diag"
    assert head.no_weight_decay() == {"beta", "lmbda", "scale", sigma}
    assert model.no_weight_decay() == {"pos", "head.fc.beta", "head.fc.lmbda", "head.fc.scale", f"head.fc.{sigma}"}
    decayed = {n for n, _ in model.named_parameters() if n.startswith("head.fc.")} - model.no_weight_decay()
    assert decayed == {"head.fc.mu"}  # mu only, as nn.Linear's weight
    assert fk.RandersMetric(5, full_sigma=full).no_weight_decay() == {"beta", "lmbda", sigma}


def test_reset_classifier_keeps_the_faim_head_and_its_configuration():
    model = TimmLike()
    fk.swap_classifier(model, full_sigma=True, lambda_init=0.25, scale_init=4.0, eps=1e-5, init="reference")
    model.reset_classifier(3)
    head = model.head.fc
    assert isinstance(head, fk.FAIMHead) and model.num_classes == 3
    assert (head.num_classes, head.full_sigma, head.lam.item(), head.gamma.item(), head.eps, head.init) == \
        (3, True, 0.25, 4.0, 1e-5, "reference")
    model.reset_classifier(0)
    assert isinstance(model.head.fc, nn.Identity)
    model.reset_classifier(2)
    assert isinstance(model.head.fc, fk.FAIMHead) and model(torch.randn(5, 4)).shape == (5, 2)
    default_full = TimmLike()
    fk.swap_classifier(default_full, full_sigma=True)  # the full default start: L = 3·I stored, Sigma = I, γ = 10
    default_full.reset_classifier(4)
    torch.testing.assert_close(default_full.head.fc.L.detach(), 3 * torch.eye(6))
    torch.testing.assert_close(default_full.head.fc.metric_L().detach(), torch.eye(6))
    assert default_full.head.fc.gamma.item() == pytest.approx(10)
    ema = copy.deepcopy(model)  # timm's ModelEma: the copy's hooks act on the copy
    ema.reset_classifier(7)
    assert ema.head.fc.num_classes == 7 and model.head.fc.num_classes == 2
    buf = io.BytesIO()
    torch.save(model, buf)  # a whole pickled model keeps them too
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    loaded.reset_classifier(5)
    assert loaded.head.fc.num_classes == 5 and model.head.fc.num_classes == 2
    assert "head.fc.beta" in loaded.no_weight_decay()


def test_nn_linear_state_dict_loads_the_backbone_and_keeps_the_head():
    torch.manual_seed(0)
    linear = TimmLike()
    model = TimmLike()
    head = fk.swap_classifier(model)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.warns(UserWarning, match=r"head.fc is an nn.Linear \(weight \[10, 6\]\)"):
        model.load_state_dict(linear.state_dict())  # strict
    torch.testing.assert_close(model.body[0].weight, linear.body[0].weight, rtol=0, atol=0)
    for k, v in before.items():
        torch.testing.assert_close(head.state_dict()[k], v, rtol=0, atol=0)
    trained = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(trained)  # a FAIM state dict loads as it is
    torch.testing.assert_close(head.mu, trained["head.fc.mu"], rtol=0, atol=0)


def test_weight_and_bias_give_a_clear_answer():
    head = fk.FAIMHead(4, 3)
    for name in ("weight", "bias"):
        with pytest.raises(AttributeError, match=f"FAIMHead has no '{name}': it is not a linear layer.*head.scale"):
            getattr(head, name)
    assert not hasattr(head, "weight")  # hasattr and getattr(..., default) still work
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        head.nothing
    assert head.mu.shape == (3, 4)
