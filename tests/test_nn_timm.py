"""FAIMHead as the classifier of real timm models. timm needs a torchvision that matches torch, which
the CPU torch wheel of the main environment lacks: these tests skip there, and `make test-timm`
runs them in an environment of their own (scripts/test_timm.sh)."""
from __future__ import annotations

import io

import pytest
import torch

try:
    import timm
except Exception as e:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
    pytest.skip(f"timm does not import here ({type(e).__name__}: {e}); `make test-timm` runs these tests",
                allow_module_level=True)

import faim_kernels as fk


def _images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,classifier", [("resnet18", "fc"), ("convnext_atto", "head.fc"),
                                             ("vit_tiny_patch16_224", "head")])
def test_swap_classifier_on_timm_models(name, classifier):
    kwargs = {"img_size": 32} if name.startswith("vit") else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs)
    head = fk.swap_classifier(model, full_sigma=True)
    assert model.get_submodule(classifier) is head and model.get_classifier() is head
    assert (head.in_features, head.num_classes) == (model.num_features, 10)
    x, target = _images(), torch.tensor([1, 7])
    logits = model(x)
    assert logits.shape == (2, 10)
    feats = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(logits, head(feats))
    loss = head.loss(feats, target)  # the fused cross-entropy on the backbone's features
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, target))
    loss.backward()
    assert head.mu.grad is not None and head.L.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_reset_classifier_then_assign_and_state_dict_round_trip():
    model = timm.create_model("resnet18", pretrained=False)
    model.reset_classifier(0)  # timm's way: no classifier, forward returns pooled features
    model.fc = fk.FAIMHead(model.num_features, 5)
    model.eval()
    x = _images()
    out = model(x)
    assert out.shape == (2, 5)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    other.fc = fk.FAIMHead(other.num_features, 5)
    other.load_state_dict(torch.load(buf))
    other.eval()
    torch.testing.assert_close(other(x), out)


@pytest.mark.parametrize("mode", ["batch", "elem"])
def test_mixup_labels_through_the_compact_target(mode):
    """timm's Mixup/CutMix output converts to SoftTargets (fk.soft_targets_from_dense), and the head's
    loss on it equals F.cross_entropy of the logits against timm's dense target."""
    from timm.data import Mixup
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=10, mode=mode)
    x, target = _images(4), torch.tensor([1, 7, 3, 3])
    _, dense = mixup(x, target)
    compact = fk.soft_targets_from_dense(dense)
    torch.testing.assert_close(compact.to_dense(10), dense)
    head = fk.FAIMHead(8, 10)
    feats = torch.randn(4, 8)
    torch.testing.assert_close(head.loss(feats, compact), torch.nn.functional.cross_entropy(head(feats), dense))
