"""Train a small MLP on scikit-learn's handwritten digits with three classifier heads.

    python -m faim_kernels.demo                 # about 30 s on 2 CPU cores
    python -m faim_kernels.demo --help

The data (1,797 8x8 images, 10 classes) ship with scikit-learn: nothing is downloaded. The same
backbone, 64 -> 128 -> ReLU -> 32 features, is trained with three heads in turn, every head from the
same backbone initialisation and the same batch order for a given seed:

    nn.Linear(32, 10)                          + F.cross_entropy
    FAIMHead(32, 10)                 diagonal  + head.loss (the fused Randers cross-entropy)
    FAIMHead(32, 10, full_sigma=True) full      + head.loss

under two recipes, each head with the same settings as nn.Linear (the head's defaults are meant to
be a drop-in under both):

    adamw   AdamW lr 3e-3, weight decay 1e-4
    sgd     SGD lr 0.05, momentum 0.9, weight decay 1e-4 (at lr 0.1 this MLP, which has no normalisation
            layer, diverged to NaN with nn.Linear itself on seed 2, and with FAIMHead too)

It prints a table of test accuracy (mean ± std over the seeds) and training time per epoch, and
saves a plot of the training curves (training loss and test accuracy per epoch).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .nn import FAIMHead

HEADS = {
    "linear": "nn.Linear",
    "faim_diag": "FAIMHead diagonal",
    "faim_full": "FAIMHead full",
}
RECIPES = {
    "adamw": "AdamW",
    "sgd": "SGD momentum 0.9",
}


@dataclass
class Run:
    head: str
    seed: int
    recipe: str = "adamw"
    train_loss: list[float] = field(default_factory=list)   # mean over the epoch's batches
    test_acc: list[float] = field(default_factory=list)     # after each epoch
    epoch_time: list[float] = field(default_factory=list)   # seconds of training (no evaluation)
    head_params: int = 0


def load_data(split_seed: int = 0):
    """Digits, standardised with the training split's statistics; a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=split_seed)
    mean, std = X_tr.mean(0), X_tr.std(0) + 1e-6  # some border pixels are always 0
    to_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    to_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(X_tr), to_y(y_tr), to_x(X_te), to_y(y_te)


def make_model(head: str, in_dim: int, num_classes: int, features: int, hidden: int, backend: str):
    backbone = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, features))
    if head == "linear":
        classifier = nn.Linear(features, num_classes)
    elif head in ("faim_diag", "faim_full"):
        classifier = FAIMHead(features, num_classes, full_sigma=head == "faim_full", backend=backend)
    else:
        raise ValueError(f"unknown head {head!r}; choose from {list(HEADS)}")
    return backbone, classifier


def _loss(classifier: nn.Module, feats: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if isinstance(classifier, FAIMHead):
        return classifier.loss(feats, target)  # no logits formed
    return F.cross_entropy(classifier(feats), target)


def make_optimizer(recipe: str, groups: list[dict], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if recipe == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if recipe == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown recipe {recipe!r}; choose from {list(RECIPES)}")


def train_one(head: str, seed: int, data, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
              features: int, hidden: int, backend: str, recipe: str = "adamw", on_epoch=None) -> Run:
    X_tr, y_tr, X_te, y_te = data
    torch.manual_seed(seed)  # the backbone is built first: the same start for every head
    backbone, classifier = make_model(head, X_tr.shape[1], int(y_tr.max()) + 1, features, hidden, backend)
    if isinstance(classifier, FAIMHead):
        # Decay the prototypes like weights; leave the metric (Sigma, beta, λ, γ) undecayed
        # (no_weight_decay()). Two groups, decayed and not, as timm's optimizer factory builds them: each
        # group is one more pass of the optimizer's step (four groups cost ~7 % of this small model's step).
        keep = classifier.no_weight_decay()
        named = list(classifier.named_parameters())
        groups = [{"params": list(backbone.parameters()) + [p for n, p in named if n not in keep]},
                  {"params": [p for n, p in named if n in keep], "weight_decay": 0.0}]
    else:
        groups = [{"params": list(backbone.parameters())}, {"params": list(classifier.parameters())}]
    opt = make_optimizer(recipe, groups, lr, weight_decay)
    run = Run(head, seed, recipe, head_params=sum(p.numel() for p in classifier.parameters()))
    order = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        backbone.train()
        classifier.train()
        perm = torch.randperm(X_tr.shape[0], generator=order)
        total, count = 0.0, 0
        start = time.perf_counter()
        for i in range(0, X_tr.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = _loss(classifier, backbone(X_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * idx.numel()
            count += idx.numel()
        run.epoch_time.append(time.perf_counter() - start)
        run.train_loss.append(total / count)
        backbone.eval()
        classifier.eval()
        with torch.no_grad():
            run.test_acc.append((classifier(backbone(X_te)).argmax(dim=1) == y_te).float().mean().item())
        if on_epoch is not None:
            on_epoch(run)
    return run


def run_all(heads=tuple(HEADS), seeds: int = 3, epochs: int = 25, batch_size: int = 64, lr: float = 3e-3,
            weight_decay: float = 1e-4, features: int = 32, hidden: int = 128, backend: str = "auto",
            progress: bool = True, recipes=tuple(RECIPES), sgd_lr: float = 0.05) -> list[Run]:
    data = load_data()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(recipes) * len(heads) * seeds * epochs, unit="epoch", file=sys.stderr)

    def on_epoch(run: Run) -> None:
        if bar is not None:
            bar.set_description(f"{run.recipe:<5} {HEADS[run.head]:<17} seed {run.seed}")
            bar.set_postfix(loss=f"{run.train_loss[-1]:.3f}", test_acc=f"{100 * run.test_acc[-1]:.1f}%")
            bar.update(1)

    runs = []
    try:
        for recipe in recipes:
            for head in heads:
                for seed in range(seeds):
                    runs.append(train_one(head, seed, data, epochs=epochs, batch_size=batch_size,
                                          lr=sgd_lr if recipe == "sgd" else lr, weight_decay=weight_decay,
                                          features=features, hidden=hidden, backend=backend, recipe=recipe,
                                          on_epoch=on_epoch))
    finally:
        if bar is not None:
            bar.close()
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summary(runs: list[Run]) -> list[dict]:
    """One row per recipe and head: final test accuracy (mean, std over seeds), time per epoch."""
    rows = []
    for recipe, head in dict.fromkeys((r.recipe, r.head) for r in runs):
        rs = [r for r in runs if r.head == head and r.recipe == recipe]
        acc, acc_std = _mean_std([r.test_acc[-1] for r in rs])
        # The median epoch time of each run (robust to a slow first epoch), then the mean over seeds.
        per_epoch = statistics.fmean(statistics.median(r.epoch_time) for r in rs)
        rows.append({"recipe": recipe, "head": head, "name": HEADS[head], "seeds": len(rs), "epochs": len(rs[0].test_acc),
                     "test_acc": acc, "test_acc_std": acc_std, "epoch_seconds": per_epoch,
                     "head_params": rs[0].head_params})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'recipe':<17} {'head':<19} {'head params':>11}   {'test accuracy':>17}   {'time / epoch':>12}",
             f"{'-' * 17} {'-' * 19} {'-' * 11}   {'-' * 17}   {'-' * 12}"]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f} ± {100 * r['test_acc_std']:.2f} %"
        lines.append(f"{RECIPES[r['recipe']]:<17} {r['name']:<19} {r['head_params']:>11,}   {acc:>17}   "
                     f"{1000 * r['epoch_seconds']:>9.1f} ms")
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    colors = {head: f"C{i}" for i, head in enumerate(HEADS)}
    for recipe, head in dict.fromkeys((r.recipe, r.head) for r in runs):
        rs = [r for r in runs if r.head == head and r.recipe == recipe]
        epochs = range(1, len(rs[0].train_loss) + 1)
        for ax, key in ((ax_loss, "train_loss"), (ax_acc, "test_acc")):
            curves = torch.tensor([getattr(r, key) for r in rs], dtype=torch.float64)
            scale = 100.0 if key == "test_acc" else 1.0
            (line,) = ax.plot(epochs, scale * curves.mean(0), label=f"{HEADS[head]}, {RECIPES[recipe]}",
                              color=colors[head], linestyle="-" if recipe == "adamw" else "--",
                              marker="." if len(epochs) < 3 else None)
            if len(rs) > 1:
                ax.fill_between(epochs, scale * curves.min(0).values, scale * curves.max(0).values,
                                color=line.get_color(), alpha=0.2, linewidth=0)
    n_seeds = len([r for r in runs if r.head == runs[0].head and r.recipe == runs[0].recipe])
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    top = max(max(r.test_acc) for r in runs) * 100
    ax_acc.set_ylim(max(0.0, min(80.0, top - 20)), min(100.0, top + 2))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"digits (scikit-learn), MLP backbone; mean over {n_seeds} seed{'s' * (n_seeds > 1)}, "
                 f"band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m faim_kernels.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=25, help="epochs per run")
    p.add_argument("--seeds", type=int, default=3, help="runs per head (seeds 0..N-1)")
    p.add_argument("--heads", nargs="+", choices=list(HEADS), default=list(HEADS), help="heads to train")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="optimisers to train every head with")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--sgd-lr", type=float, default=0.05, help="SGD (momentum 0.9) learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4,
                   help="weight decay (backbone, nn.Linear, prototypes; not the metric)")
    p.add_argument("--features", type=int, default=32, help="feature size the heads see")
    p.add_argument("--hidden", type=int, default=128, help="hidden width of the MLP")
    p.add_argument("--backend", default="auto", choices=["auto", "cpp", "triton", "reference"],
                   help="the FAIM heads' kernels")
    # One thread: every op here is tiny, and on a busy 2-core machine the threads' synchronisation
    # cost more than they gave (a 64x10x32 fused loss step: 2 ms on 1 thread, 6-7 ms on 2).
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", default="demo_curves.png", help="where the plot goes ('' for no plot)")
    p.add_argument("--json", default="", help="also write the runs and the table as JSON to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.seeds < 1:
        p.error("--epochs and --seeds must be >= 1")

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    runs = run_all(heads=tuple(args.heads), seeds=args.seeds, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, weight_decay=args.weight_decay, features=args.features, hidden=args.hidden,
                   backend=args.backend, progress=not args.no_progress, recipes=tuple(args.recipes),
                   sgd_lr=args.sgd_lr)
    rows = summary(runs)
    print(f"\ndigits: {args.epochs} epochs, {args.seeds} seed(s) per head, batch {args.batch_size}, AdamW lr {args.lr}, "
          f"SGD lr {args.sgd_lr} momentum 0.9, weight decay {args.weight_decay}; "
          f"test accuracy after the last epoch, time per epoch = median training time of an epoch "
          f"({torch.get_num_threads()} thread(s))\n")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "table": rows, "runs": [asdict(r) for r in runs]}, f, indent=1)
    if args.out:
        print(f"\ntraining curves: {plot(runs, args.out)}")
    print(f"total time: {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
