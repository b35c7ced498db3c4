"""The metric losses' defaults (γ of FAIMInfoNCELoss / FAIMNTXentLoss, the triplet margin) under
SGD and AdamW: an MLP embeds scikit-learn's digits (64 -> 128 -> ReLU -> 32), trained on two noisy
views of each image (InfoNCE, NT-Xent) or on labelled batches (batch-hard triplet), with a
RandersMetric (its defaults) learnt alongside. Reported: the first and last training loss and the
1-nearest-neighbour test accuracy in d_F (the point of an embedding).

    python -m bench.loss_recipes          # ~1 min on 1 thread
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import faim_kernels as fk
from bench.head_recipes import load_data
from bench.measure import set_threads

RECIPES = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3)}


def embed_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))


def make_loss(kind: str, value: float, metric):
    if kind == "info_nce":
        return fk.FAIMInfoNCELoss(metric, scale=value)
    if kind == "nt_xent":
        return fk.FAIMNTXentLoss(metric, scale=value)
    return fk.FAIMTripletLoss(metric, margin=value, mining="batch_hard")


def run(kind: str, value: float, recipe: str, data, epochs: int = 3, seed: int = 0) -> dict:
    X, y, X_te, y_te = data
    torch.manual_seed(seed)
    net, metric = embed_net(), fk.RandersMetric(32)
    loss_fn = make_loss(kind, value, metric)
    opt = RECIPES[recipe]([*net.parameters(), *metric.parameters()])
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=g)
        for i in range(0, X.shape[0] - 63, 64):
            xb, yb = X[perm[i:i + 64]], y[perm[i:i + 64]]
            if kind == "triplet":
                loss = loss_fn(net(xb), yb)
            else:
                noise = lambda: 0.3 * torch.randn(xb.shape, generator=g)  # noqa: E731
                loss = loss_fn(net(xb + noise()), net(xb + noise()))
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                return {"first": losses[0], "last": float("nan"), "knn": float("nan")}
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        d = metric.cdist(net(X_te), net(X))
        knn = (y[d.argmin(1)] == y_te).float().mean().item()
    return {"first": losses[0], "last": sum(losses[-10:]) / 10, "knn": knn}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loss_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    set_threads(args.threads)
    data = load_data("digits")
    start = time.perf_counter()
    print(f"{'recipe':<6} {'loss':<9} {'value':>6}   first    last   1-NN test acc")
    for recipe in RECIPES:
        for kind, values in (("info_nce", (0.3, 1.0, 3.0, 10.0)), ("nt_xent", (0.3, 1.0, 3.0, 10.0)),
                             ("triplet", (0.2, 1.0, 3.0))):
            for v in values:
                r = run(kind, v, recipe, data, args.epochs)
                print(f"{recipe:<6} {kind:<9} {v:>6g}   {r['first']:<7.3g}  {r['last']:<7.3g} {100 * r['knn']:.1f} %",
                      flush=True)
    print(f"total {time.perf_counter() - start:.0f} s (γ for info_nce / nt_xent, the margin for triplet)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
