"""The README's one plot, drawn from the numbers in bench/RESULTS.md (no number is typed in here):

    left   time of a training step of the head, as a ratio to nn.Linear + F.cross_entropy in the same
           run, for `F.cross_entropy(head(x), y)` and `head.loss(x, y)`, both Sigma modes, at each size
           of the section "CPU, the head against nn.Linear, features with grad"
    right  peak extra memory of one forward+backward of the cross-entropy at the largest class count
           of the section "Fused cross-entropy" (the fused loss against the unfused paths)

    .venv/bin/python docs/plot_headline.py     # rewrites docs/headline.png

Rerun it after a benchmark rewrites those sections of bench/RESULTS.md.
"""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
OUT = Path(__file__).resolve().parent / "headline.png"


def section(text: str, name: str) -> str:
    """The text between `<!-- begin name -->` and `<!-- end name -->`."""
    match = re.search(rf"<!-- begin {re.escape(name)} -->(.*?)<!-- end {re.escape(name)} -->", text, re.S)
    if match is None:
        raise SystemExit(f"bench/RESULTS.md has no section {name!r}")
    return match.group(1)


def table_rows(block: str) -> list[list[str]]:
    """The body rows of the first Markdown table in `block`, as lists of stripped cells."""
    rows = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def date_of(block: str) -> str:
    match = re.search(r"\d{4}-\d{2}-\d{2}", block)
    return match.group(0) if match else "undated"


def main() -> None:
    text = RESULTS.read_text()
    module = section(text, "cpu-module")
    ce = section(text, "ce-cpu-diag")

    # | B, C, D | Σ | Linear+CE µs | head(x)+CE µs | ratio | head.loss µs | ratio | ... |
    speed = [(row[0], row[1], float(row[4].rstrip("x")), float(row[6].rstrip("x"))) for row in table_rows(module)]
    # | B, C, D | implementation | fwd+bwd ms | / fused | / linear+ce | peak MB | / fused |
    ce_rows = table_rows(ce)
    largest = max({row[0] for row in ce_rows}, key=lambda s: int(s.strip("()").split(",")[1]))
    wanted = {"fused": "fused\ncross-entropy", "linear+ce": "nn.Linear\n+ CE", "logits+ce": "fused logits\n+ CE",
              "composite+ce": "plain PyTorch\n+ CE"}
    memory = [(wanted[row[1]], float(row[5])) for row in ce_rows if row[0] == largest and row[1] in wanted]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    labels = [f"{size.replace(', ', ',')}\n{sigma}" for size, sigma, _, _ in speed]
    xs = range(len(speed))
    width = 0.38
    left.bar([x - width / 2 for x in xs], [s[2] for s in speed], width, label="F.cross_entropy(head(x), y)")
    left.bar([x + width / 2 for x in xs], [s[3] for s in speed], width, label="head.loss(x, y)")
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks(list(xs), labels, fontsize=7)
    left.set_ylabel("time / (nn.Linear + F.cross_entropy)")
    left.set_title(f"Training step of the head (B, C, D; Σ),\nCPU float32, {date_of(module)}", fontsize=9)
    left.legend(fontsize=8)

    right.bar([m[0] for m in memory], [m[1] for m in memory],
              color=["tab:green" if m[0].startswith("fused\n") else "tab:gray" for m in memory])
    right.set_ylabel("peak extra memory, MB")
    right.set_title(f"Cross-entropy fwd+bwd at (B, C, D) = {largest},\nCPU float32, {date_of(ce)}", fontsize=9)
    right.tick_params(axis="x", labelsize=7)

    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
