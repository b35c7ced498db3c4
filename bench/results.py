"""Rewrites one marked section of bench/RESULTS.md, leaving the others as they are."""
from __future__ import annotations

import pathlib
import re

RESULTS = pathlib.Path(__file__).with_name("RESULTS.md")


def write_section(key: str, body: str, path=None) -> None:
    """Replaces the section marked `key` in `path` (default bench/RESULTS.md), or appends it."""
    path = pathlib.Path(path) if path else RESULTS
    begin, end = f"<!-- begin {key} -->", f"<!-- end {key} -->"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def print_and_save(text: str, out=None) -> None:
    """Prints a table's text and, where `out` names a file (a script's --out), writes it there too."""
    print(text)
    if out:
        pathlib.Path(out).write_text(text + "\n")
