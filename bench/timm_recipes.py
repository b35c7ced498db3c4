"""ResNet-18 (timm) with nn.Linear, a diagonal and a full FAIMHead, trained as a timm user trains it:
top-1 and time per epoch under timm train.py's default recipe and under an AdamW recipe.

    python -m bench.timm_recipes                                # the full run: 20 epochs, 2 seeds
    python -m bench.timm_recipes --epochs 5 --seeds 0 --write   # a reduced run, into bench/RESULTS.md

Needs timm, torchvision, Pillow and scikit-learn (the .venv-timm of `make test-timm`, plus
`pip install scikit-learn`). Data: scikit-learn's 8x8 digits (1,797 images) upscaled to 32x32 RGB
PNGs in an image folder (train/ and val/ per class, a stratified 80/20 split fixed by its own seed),
read by timm's ImageDataset with timm's transforms, as train.py reads a folder.

Recipes (train.py's code path: timm.create_model, create_optimizer_v2, which reads the model's
no_weight_decay(), create_scheduler_v2 stepped per epoch, the loss on the logits):
    timm   train.py's defaults: SGD (Nesterov) momentum 0.9, lr 0.1 x batch/256, weight decay 2e-5,
           cosine with 5 warm-up epochs from 1e-5, label smoothing 0.1, timm's training transform
           (random resized crop, horizontal flip, colour jitter 0.4)
    adamw  AdamW lr 1e-3, weight decay 0.05, mixup 0.8 / cutmix 1.0 (SoftTargetCrossEntropy, label
           smoothing 0.1), cosine with 1 warm-up epoch, the same transform
Heads: "linear" (timm's fc), "diagonal" and "full" (faim_kernels.integrations.timm.create_model,
the head's defaults). Batch 128, DataLoader without workers; every run of one seed starts from the
same backbone weights and sees the same batches.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.measure import set_threads

HEADS = ("linear", "diagonal", "full")
RECIPES = ("timm", "adamw")
NUM_CLASSES = 10
IMG = 32


def make_image_folder(root: Path) -> Path:
    """scikit-learn's digits as 32x32 RGB PNGs in root/{train,val}/<digit>/; reused when present."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if (root / "done").is_file():
        return root
    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, val = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=0)
    for split, rows in (("train", train), ("val", val)):
        for i in rows:
            d = root / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            img = Image.fromarray((digits.images[i] * (255 / 16)).astype("uint8"), mode="L")
            img.resize((IMG, IMG), Image.BILINEAR).convert("RGB").save(d / f"{i}.png")
    (root / "done").write_text("")
    return root


def build_model(head: str, seed: int):
    import timm

    from faim_kernels.integrations.timm import create_model

    torch.manual_seed(seed)
    backbone = timm.create_model("resnet18", num_classes=NUM_CLASSES)
    if head == "linear":
        return backbone
    model = create_model("resnet18", num_classes=NUM_CLASSES, full_sigma=head == "full")
    sd = {k: v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
    missing = model.load_state_dict(sd, strict=False).missing_keys  # the same backbone as nn.Linear's
    assert all(k.startswith("fc.") for k in missing), missing
    return model


def loaders(root: Path, recipe: str, batch: int, seed: int):
    from timm.data import ImageDataset, create_transform

    train_tf = create_transform(IMG, is_training=True, color_jitter=0.4, interpolation="bilinear",
                                mean=(0.5,) * 3, std=(0.5,) * 3)
    val_tf = create_transform(IMG, is_training=False, interpolation="bilinear", mean=(0.5,) * 3, std=(0.5,) * 3)
    g = torch.Generator().manual_seed(seed)
    train = torch.utils.data.DataLoader(ImageDataset(str(root / "train"), transform=train_tf), batch_size=batch,
                                        shuffle=True, drop_last=True, generator=g)
    val = torch.utils.data.DataLoader(ImageDataset(str(root / "val"), transform=val_tf), batch_size=256)
    return train, val


def run(head: str, recipe: str, seed: int, epochs: int, root: Path, batch: int = 128) -> dict:
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    model = build_model(head, seed)
    if recipe == "timm":
        opt = create_optimizer_v2(model, "sgd", lr=0.1 * batch / 256, weight_decay=2e-5, momentum=0.9)
        warmup, mixup, loss_fn = 5, None, LabelSmoothingCrossEntropy(0.1)
    else:
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
        warmup, loss_fn = 1, SoftTargetCrossEntropy()
        mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=NUM_CLASSES)
    sched, _ = create_scheduler_v2(opt, "cosine", num_epochs=epochs, warmup_epochs=min(warmup, epochs - 1),
                                   warmup_lr=1e-5, min_lr=0.0)
    torch.manual_seed(seed)  # the same augmentation draws for every head
    train, val = loaders(root, recipe, batch, seed)
    seconds, losses, acc = [], [], []
    for epoch in range(epochs):
        model.train()
        t0, total, n = time.perf_counter(), 0.0, 0
        for x, y in train:
            if mixup is not None:
                x, y = mixup(x, y)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item(), n + 1
        seconds.append(time.perf_counter() - t0)
        sched.step(epoch + 1)
        losses.append(total / max(n, 1))
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for x, y in val:
                correct += int((model(x).argmax(1) == y).sum())
                count += len(y)
        acc.append(100.0 * correct / count)
        print(f"  {recipe:5s} {head:8s} seed {seed} epoch {epoch + 1:2d}: loss {losses[-1]:.3f} "
              f"top-1 {acc[-1]:5.1f} % ({seconds[-1]:.1f} s)", flush=True)
    return {"top1": acc[-1], "best": max(acc), "loss": losses[-1], "s_per_epoch": statistics.median(seconds)}


def table(results: dict, seeds: list[int], epochs: int, reduced: bool, note: str) -> str:
    lines = [f"ResNet-18 (timm) on the digits image folder (1,437 train / 360 val, 32x32), {epochs} epochs, "
             f"seeds {seeds}{' -- a REDUCED run, not the full one' if reduced else ''}. top-1 on val after the last "
             f"epoch, mean ± half the seeds' spread (max − min)/2; the best epoch's; seconds per training epoch "
             f"(median). {note}", "",
             "| recipe | head | top-1 % (last) | top-1 % (best) | last epoch's loss | s / epoch | Δ top-1 vs nn.Linear |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for recipe in RECIPES:
        if not any(k[0] == recipe for k in results):
            continue
        base = statistics.mean(results[(recipe, "linear", s)]["top1"] for s in seeds) \
            if all((recipe, "linear", s) in results for s in seeds) else None
        for head in HEADS:
            rs = [results[(recipe, head, s)] for s in seeds if (recipe, head, s) in results]
            if not rs:
                continue
            top = [r["top1"] for r in rs]
            m = statistics.mean(top)
            delta = "" if base is None or head == "linear" else f"{m - base:+.1f}"
            lines.append(f"| {recipe} | {head} | {m:.1f} ± {(max(top) - min(top)) / 2:.1f} | "
                         f"{statistics.mean(r['best'] for r in rs):.1f} | {statistics.mean(r['loss'] for r in rs):.3f} | "
                         f"{statistics.mean(r['s_per_epoch'] for r in rs):.2f} | {delta} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.timm_recipes", description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "faim_digits_folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--write", action="store_true", help="write the table into bench/RESULTS.md")
    args = p.parse_args(argv)
    set_threads(args.threads)
    root = make_image_folder(args.data)
    results = {}
    t0 = time.perf_counter()
    for recipe in args.recipes:
        for seed in args.seeds:
            for head in args.heads:
                results[(recipe, head, seed)] = run(head, recipe, seed, args.epochs, root)
    reduced = args.epochs < 15 or len(args.seeds) < 2
    note = (f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads "
            f"(a shared machine: the times are rough); whole run {time.perf_counter() - t0:.0f} s.")
    text = table(results, args.seeds, args.epochs, reduced, note)
    print(text)
    if args.write:
        from bench.results import write_section
        write_section("timm_recipes", "## timm recipes: ResNet-18, nn.Linear vs FAIMHead (`python -m "
                      "bench.timm_recipes`)\n\n" + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
