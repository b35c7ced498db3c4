"""FAIMHead against nn.Linear under the training recipes people use, on a small CNN: the loss table
behind the head's default initialisation (docs/training.md).

    python -m bench.head_recipes                  # both data sets, every head and recipe (~3 min, 1 thread)
    python -m bench.head_recipes --data random    # only the memorisation task
    python -m bench.head_recipes --sweep          # also the candidate initialisations that were compared

Backbone: conv3x3(1→16)-BN-ReLU, conv3x3(16→32, stride 2)-BN-ReLU, conv3x3(32→D)-BN-ReLU,
global average pool (ResNet's pattern, D = 64 features). Every head starts from the same backbone
weights and sees the same batches. Data:

    random   64 seeded N(0, 1) images 1×16×16 with random labels among 10, full-batch steps: pure
             memorisation, what the recipe does to the head in the first steps (the issue's setting).
    digits   scikit-learn's 8×8 handwritten digits (1,347 train / 450 test), batch 64, 4 epochs.

Recipes (as their users run them):

    sgd      SGD lr 0.1, momentum 0.9 (torchvision's ImageNet recipe)
    adamw    AdamW lr 1e-3 (PyTorch's defaults otherwise: weight decay 0.01)
    timm     timm's train.py defaults: SGD with Nesterov momentum 0.9, lr 0.1 × batch / 256, weight
             decay 2e-5 on parameters with ndim >= 2 only, label smoothing 0.1, linear warm-up from
             1e-5 (here over the first 5 % of the steps) then cosine decay

Heads: nn.Linear + F.cross_entropy; FAIMHead (diagonal and full Sigma) + head.loss with the
defaults and with init="reference" (the reference design's mu, beta ~ N(0, 1), γ = 10); each FAIM
head also with `init_from_features` on the untrained backbone's training features (train mode,
no_grad; with the recipe's label smoothing) before the first step. Reported: the first loss, the loss after 10 % and at the end
(random: the full batch; digits: the mean of the last epoch), the largest loss on the way, test
accuracy (digits), and `nan` where the loss stopped being finite.
"""
from __future__ import annotations

import argparse
import math
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

import faim_kernels as fk
from bench.measure import set_threads

RECIPES = ("sgd", "adamw", "timm")
FEATURES = 64
NUM_CLASSES = 10


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages and a global average pool: [N, 1, H, W] -> [N, features]."""

    def __init__(self, features: int = FEATURES):
        super().__init__()

        def stage(i, o, s):
            return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.body = nn.Sequential(*stage(1, 16, 1), *stage(16, 32, 2), *stage(32, features, 1),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        return self.body(x)


def make_head(kind: str, features: int = FEATURES, num_classes: int = NUM_CLASSES, candidate: dict | None = None):
    """kind: "linear", "faim_diag", "faim_full", "faim_diag_ref", "faim_full_ref"."""
    if kind == "linear":
        return nn.Linear(features, num_classes)
    full = kind.startswith("faim_full")
    init = "reference" if kind.endswith("_ref") else "default"
    head = fk.FAIMHead(features, num_classes, full_sigma=full, init=init)
    if candidate:  # an initialisation compared in --sweep (the parameters set by hand)
        with torch.no_grad():
            head.mu.normal_().mul_(candidate["mu_std"])
            head.beta.normal_().mul_(candidate["beta_std"] / math.sqrt(features))
            head.scale.fill_(candidate["scale"])
            head.lmbda.fill_(candidate.get("lambda", 0.1))
    return head


def loss_of(head: nn.Module, feats: torch.Tensor, target: torch.Tensor, smoothing: float) -> torch.Tensor:
    if isinstance(head, fk.FAIMHead):
        return head.loss(feats, target, label_smoothing=smoothing)
    return F.cross_entropy(head(feats), target, label_smoothing=smoothing)


def make_optimizer(recipe: str, modules: list[nn.Module], batch_size: int):
    params = [p for m in modules for p in m.parameters()]
    if recipe == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9), 0.0
    if recipe == "adamw":
        return torch.optim.AdamW(params, lr=1e-3), 0.0
    if recipe == "timm":
        # timm's param_groups_weight_decay: no decay on biases and other 1-D parameters.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.SGD([{"params": decay, "weight_decay": 2e-5}, {"params": no_decay, "weight_decay": 0.0}],
                              lr=0.1 * batch_size / 256, momentum=0.9, nesterov=True)
        return opt, 0.1
    raise ValueError(f"unknown recipe {recipe!r}; choose from {RECIPES}")


def lr_factor(recipe: str, step: int, steps: int, base_lr: float) -> float:
    """timm: linear warm-up from lr 1e-5 over the first 5 % of the steps, then cosine to 0."""
    if recipe != "timm":
        return 1.0
    warm = max(1, round(0.05 * steps))
    if step < warm:
        start = 1e-5 / base_lr
        return start + (1 - start) * step / warm
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


def load_data(name: str, seed: int = 0):
    if name == "random":
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(64, 1, 16, 16, generator=g)
        y = torch.randint(0, NUM_CLASSES, (64,), generator=g)
        return X, y, None, None
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    mean, std = X_tr.mean(), X_tr.std()
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32).reshape(-1, 1, 8, 8)  # noqa: E731
    return to_x(X_tr), torch.tensor(y_tr), to_x(X_te), torch.tensor(y_te)


def train(kind: str, recipe: str, data, *, init_features: bool = False, steps: int = 60, epochs: int = 4,
          batch_size: int = 64, seed: int = 0, candidate: dict | None = None) -> dict:
    X, y, X_te, y_te = data
    torch.manual_seed(seed)
    backbone = SmallCNN()
    torch.manual_seed(seed + 1)
    head = make_head(kind, candidate=candidate)
    if init_features and isinstance(head, fk.FAIMHead):
        with torch.no_grad():
            head.init_from_features(backbone(X), y, label_smoothing=0.1 if recipe == "timm" else 0.0)
    full_batch = X_te is None
    n_steps = steps if full_batch else epochs * math.ceil(X.shape[0] / batch_size)
    bs = X.shape[0] if full_batch else batch_size
    opt, smoothing = make_optimizer(recipe, [backbone, head], bs)
    base_lrs = [g["lr"] for g in opt.param_groups]
    order = torch.Generator().manual_seed(seed)
    losses, step = [], 0
    while step < n_steps:
        perm = torch.arange(X.shape[0]) if full_batch else torch.randperm(X.shape[0], generator=order)
        for i in range(0, X.shape[0], bs):
            if step == n_steps:
                break
            for g, lr in zip(opt.param_groups, base_lrs):
                g["lr"] = lr * lr_factor(recipe, step, n_steps, lr)
            idx = perm[i:i + bs]
            loss = loss_of(head, backbone(X[idx]), y[idx], smoothing)
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return {"losses": losses, "nan": True, "acc": float("nan")}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    acc = float("nan")
    if X_te is not None:
        backbone.eval()
        with torch.no_grad():
            acc = (head(backbone(X_te)).argmax(1) == y_te).float().mean().item()
    return {"losses": losses, "nan": False, "acc": acc}


def row(result: dict, last: int) -> dict:
    L = result["losses"]
    if result["nan"]:
        return {"first": L[0], "early": float("nan"), "end": float("nan"), "max": float("nan"), "acc": float("nan")}
    k = max(1, len(L) // 10)
    return {"first": L[0], "early": L[k], "end": sum(L[-last:]) / last, "max": max(L), "acc": result["acc"]}


def fmt(v: float) -> str:
    if math.isnan(v):
        return "nan"
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.2e}"


KINDS = ("linear", "faim_diag", "faim_full", "faim_diag_ref", "faim_full_ref")

# The initialisations compared before settling the defaults (--sweep), on the diagonal head:
# prototype std, beta std × sqrt(D), γ.
CANDIDATES = {
    "mu N(0,1), beta N(0,1), γ 10 (reference)": dict(mu_std=1.0, beta_std=8.0, scale=10.0),
    "mu 0.01, beta 1/√D, γ 10": dict(mu_std=0.01, beta_std=1.0, scale=10.0),
    "mu 1/√(3D) (nn.Linear's), beta 1/√D, γ 10": dict(mu_std=(3 * FEATURES) ** -0.5, beta_std=1.0, scale=10.0),
    "mu 1/√D, beta 1/√D, γ 10": dict(mu_std=FEATURES ** -0.5, beta_std=1.0, scale=10.0),
    "mu 1/√(3D), beta 1/√D, γ 3": dict(mu_std=(3 * FEATURES) ** -0.5, beta_std=1.0, scale=3.0),
    "mu 1/√(3D), beta 1/√D, γ 30": dict(mu_std=(3 * FEATURES) ** -0.5, beta_std=1.0, scale=30.0),
    "mu 1/√D, beta 1/√D, γ 1": dict(mu_std=FEATURES ** -0.5, beta_std=1.0, scale=1.0),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.head_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", choices=["random", "digits"], default=["random", "digits"])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--steps", type=int, default=60, help="full-batch steps on the random data")
    p.add_argument("--epochs", type=int, default=4, help="epochs on digits")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="the candidate initialisations instead of the heads")
    p.add_argument("--no-features-init", action="store_true", help="skip the init_from_features rows")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} thread(s), seed {args.seed}")
    start = time.perf_counter()
    for data_name in args.data:
        data = load_data(data_name, args.seed)
        last = 1 if data_name == "random" else math.ceil(data[0].shape[0] / 64)
        cols = "first   10 %    end     max     " + ("test acc" if data_name == "digits" else "")
        print(f"\n## {data_name}: " + (f"{args.steps} full-batch steps" if data_name == "random"
                                        else f"{args.epochs} epochs of batch 64"))
        print(f"{'recipe':<6} {'head':<44} {cols}")
        for recipe in args.recipes:
            if args.sweep:
                cases = [(name, "faim_diag", False, cand) for name, cand in CANDIDATES.items()]
                cases += [(name + " + init_from_features", "faim_diag", True, cand)
                          for name, cand in CANDIDATES.items() if not args.no_features_init]
                cases.insert(0, ("nn.Linear", "linear", False, None))
            else:
                cases = []
                for kind in args.kinds:
                    cases.append((kind, kind, False, None))
                    if kind != "linear" and not args.no_features_init:
                        cases.append((kind + " + init_from_features", kind, True, None))
            for name, kind, feat_init, cand in cases:
                r = row(train(kind, recipe, data, init_features=feat_init, steps=args.steps, epochs=args.epochs,
                              seed=args.seed, candidate=cand), last)
                acc = f"{100 * r['acc']:.1f} %" if data_name == "digits" and not math.isnan(r["acc"]) else ""
                print(f"{recipe:<6} {name:<44} {fmt(r['first']):<7} {fmt(r['early']):<7} {fmt(r['end']):<7} "
                      f"{fmt(r['max']):<7} {acc}", flush=True)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
