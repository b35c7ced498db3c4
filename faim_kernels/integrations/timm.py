"""timm models with a FAIMHead as their classifier: building them, their checkpoints, their optimizer.

    from faim_kernels.integrations import timm as fkt
    model = fkt.create_model("resnet18", num_classes=10)                  # diagonal Sigma
    model = fkt.create_model("resnet18", full_sigma=True, num_classes=10)
    model = fkt.create_model("resnet18", checkpoint_path="last.pth.tar")  # a FAIM or an nn.Linear checkpoint

timm's own scripts (train.py, validate.py) take model names: `register()` adds "faim_<name>" for
every timm model, so `--model faim_resnet18` (`--model-kwargs full_sigma=True` for a full Sigma)
builds it through create_model, and `--initial-checkpoint`, `--resume`, `--pretrained-path` and
validate.py's `--checkpoint` load FAIM checkpoints with their head. Run a script so:

    python -m faim_kernels.integrations.timm path/to/train.py --model faim_resnet18 ...

(it registers the names, then runs the script as `python train.py ...` would).

What a model with a FAIMHead gets (faim_kernels.nn.head.attach_head, which swap_classifier calls;
timm not needed):
- no_weight_decay(): the model's own names plus the head's undecayed parameters ("fc.beta", ...;
  FAIMHead.no_weight_decay says which and why), which timm's create_optimizer_v2 reads;
- reset_classifier(n): timm's, then a FAIMHead of n classes configured as the model's (n = 0 keeps
  timm's "no classifier");
- loading a state dict whose classifier is an nn.Linear ("fc.weight", "fc.bias"): those keys are
  dropped, the head keeps its initialisation, and a warning says so.

timm is imported by create_model and register only.
"""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from ..nn.head import attach_head, swap_classifier

__all__ = ["create_model", "register", "attach_head", "load_checkpoint", "PREFIX"]  # attach_head: nn.head's

PREFIX = "faim_"
# create_model's keyword arguments that configure the head (the rest go to timm.create_model)
HEAD_KWARGS = ("lambda_init", "scale_init", "eps", "init", "backend")


def load_checkpoint(model: nn.Module, checkpoint_path: str, *, use_ema: bool = True, strict: bool = True):
    """Loads a timm checkpoint file (a state dict, or train.py's {"state_dict": ...}, its EMA weights
    when use_ema and present; "module." prefixes removed) into `model`: a FAIM head's parameters when
    the file has them, else (an nn.Linear classifier) the backbone, the head initialised."""
    from timm.models import load_state_dict
    return model.load_state_dict(load_state_dict(checkpoint_path, use_ema=use_ema), strict=strict)


def _faim_head_in(state_dict: dict) -> tuple[int, bool] | None:
    """(num_classes, full_sigma) of the FAIM head in a state dict, or None when it has none."""
    for key, value in state_dict.items():
        if key.endswith(".mu") or key == "mu":
            prefix = key[:-2]
            if all(prefix + k in state_dict for k in ("beta", "lmbda", "scale")):
                return int(value.shape[0]), prefix + "L" in state_dict
    return None


# --- building models ------------------------------------------------------------------------------

def create_model(model_name: str, *, full_sigma: bool | None = None, pretrained: bool = False,
                 checkpoint_path: str | None = None, head_init_scale: float | None = None,
                 use_ema: bool = True, **timm_kwargs) -> nn.Module:
    """timm.create_model(model_name, pretrained=..., **timm_kwargs) with a FAIMHead as its classifier.

    full_sigma: a full Sigma; None (default): as the checkpoint's head, else diagonal.
    checkpoint_path: a checkpoint to load after the swap (timm's would load before it, and fail on
      the head's keys). A FAIM checkpoint loads whole, its head included (num_classes defaults to its
      head's); an nn.Linear one loads the backbone, the head keeps its initialisation, and a warning
      says so. use_ema: its EMA weights when it has them (as timm's).
    head_init_scale: multiplies γ (the head's scale): the initial logits scaled by it, what timm's
      --head-init-scale does to an nn.Linear.
    lambda_init, scale_init, eps, init, backend: FAIMHead's. pretrained=True loads timm's pretrained
      backbone (the classifier is replaced anyway); a pretrained_cfg_overlay={"file": path} with
      pretrained=True (train.py's --pretrained-path) loads that file as checkpoint_path does,
      except that a FAIM head of another size or Sigma mode is dropped with a warning instead of an error.
    """
    import timm

    head_kwargs = {k: timm_kwargs.pop(k) for k in HEAD_KWARGS if k in timm_kwargs}
    overlay = timm_kwargs.get("pretrained_cfg_overlay") or {}
    state_dict, strict = None, True
    if checkpoint_path:
        from timm.models import load_state_dict
        state_dict = load_state_dict(checkpoint_path, use_ema=use_ema)
    elif pretrained and overlay.get("file"):
        from timm.models import load_state_dict
        state_dict, strict, pretrained = load_state_dict(overlay["file"], use_ema=use_ema), False, False
        timm_kwargs["pretrained_cfg_overlay"] = {k: v for k, v in overlay.items() if k != "file"} or None
    found = _faim_head_in(state_dict) if state_dict is not None else None
    if found is not None and strict:
        timm_kwargs.setdefault("num_classes", found[0])
        if full_sigma is None:
            full_sigma = found[1]
    model = timm.create_model(model_name, pretrained=pretrained, **timm_kwargs)
    if not getattr(model, "num_classes", 1):
        raise ValueError(f"{model_name} was built without a classifier (num_classes=0): nothing to make a FAIMHead")
    head = swap_classifier(model, full_sigma=bool(full_sigma), **head_kwargs)
    if head_init_scale is not None:
        with torch.no_grad():
            head.scale.mul_(float(head_init_scale))
    if state_dict is not None:
        name = model.__dict__["_faim_classifier"]
        if found is not None:
            want = (head.num_classes, head.full_sigma)
            if found != want:
                what = (f"the checkpoint's FAIM head has {found[0]} classes and a "
                        f"{'full' if found[1] else 'diagonal'} Sigma, the model's {want[0]} and a "
                        f"{'full' if want[1] else 'diagonal'} one")
                if strict:
                    raise ValueError(f"{what}: pass num_classes= and full_sigma= as the checkpoint's "
                                     f"(or leave them out)")
                warnings.warn(f"faim_kernels: {what}: loaded the backbone, the head keeps its "
                              f"initialisation", stacklevel=2)
                state_dict = {k: v for k, v in state_dict.items() if not k.startswith(name + ".")}
                state_dict.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
        result = model.load_state_dict(state_dict, strict=strict)
        if not strict and (result.missing_keys or result.unexpected_keys):
            warnings.warn(f"faim_kernels: loading {overlay.get('file')}: missing keys "
                          f"{result.missing_keys[:8]}, unexpected keys {result.unexpected_keys[:8]}",
                          stacklevel=2)
    return model


def _entrypoint(base: str):
    def entry(pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        return create_model(base, pretrained=pretrained, pretrained_cfg=pretrained_cfg,
                            pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir, **kwargs)
    entry.__name__ = entry.__qualname__ = PREFIX + base
    entry.__module__ = __name__
    entry.__doc__ = f"timm's {base} with a FAIMHead (faim_kernels.integrations.timm.create_model)."
    return entry


def register(*model_names: str) -> list[str]:
    """Registers "faim_<name>" in timm's model registry for each name (every timm model when none is
    given), so that timm.create_model, train.py and validate.py build them with a FAIMHead; keyword
    arguments such as full_sigma=True (train.py: --model-kwargs full_sigma=True) reach create_model.
    Returns the registered names. Registering a name again replaces it silently."""
    import timm
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    module = sys.modules[__name__]
    names = []
    for base in model_names or timm.list_models():
        if base.startswith(PREFIX):
            continue
        name = PREFIX + base
        _model_entrypoints.pop(name, None)  # re-registering: no "overwriting" warning
        fn = _entrypoint(base)
        setattr(module, name, fn)  # register_model lists it in the module's __all__
        register_model(fn)
        names.append(name)
    return names


def _main(argv: list[str]) -> None:
    """python -m faim_kernels.integrations.timm SCRIPT [ARGS...]: runs SCRIPT (timm's train.py,
    validate.py, ...) as `python SCRIPT ARGS...` would, with the faim_ model names registered."""
    import runpy

    if not argv or argv[0] in ("-h", "--help"):
        print(_main.__doc__)
        raise SystemExit(0 if argv else 2)
    register()
    sys.argv = list(argv)
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":  # registered in the imported module, where timm's registry finds them
    from faim_kernels.integrations.timm import _main as main
    main(sys.argv[1:])
