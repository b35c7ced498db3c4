"""The documentation's shape: what the README promises a reader in its first screen, and the sections
and equation numbers of docs/design.md that comments in the code point to ("docs/design.md §2.1",
"docs/design.md Eq. 4"). The site itself is built by `make docs` (mkdocs --strict: broken links fail),
which `make test` runs before this suite."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DESIGN = (ROOT / "docs" / "design.md").read_text()


def test_readme_is_short_and_shows_pip_install_and_the_two_commands_first():
    lines = README.splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    first = "\n".join(lines[:40])
    assert "pip install faim_kernels" in first
    # .ci/run runs `make test`; the README names both commands in its first screen.
    assert re.search(r"^make demo\s+#", first, re.M) and re.search(r"^make test\s+#", first, re.M)


def test_readme_links_resolve_inside_the_repository():
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README):
        if "://" in target:
            continue
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


@pytest.mark.parametrize("heading", [
    "§1 The function", "§2 The algorithm", "§2.1 Near pairs (the cancellation trap)",
    "§2.2 The fused cross-entropy", "§2.3 Top-k", "§2.4 Memory and FLOP counts", "§3 The public API",
    "Glossary"])
def test_design_has_the_sections_the_code_cites(heading):
    assert re.search(rf"^#+ {re.escape(heading)}$", DESIGN, re.M), f"docs/design.md lacks the section {heading!r}"


def test_design_numbers_its_equations_in_order():
    numbers = [int(n) for n in re.findall(r"^ {4}.*\S\s+\((\d+)\)$", DESIGN, re.M)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers
    assert len(numbers) >= 4  # (1) Sigma, (2) d, (3) the logits, (4) the gradient of d in x


@pytest.mark.parametrize("name", [
    "near pair", "near-pair recompute", "near threshold", "metric parameter", "metric factor",
    "op family", "precision mode", "soft targets", "dense soft target", "target logit"])
def test_the_glossary_defines_each_name(name):
    glossary = DESIGN.split("## Glossary", 1)[1]
    assert re.search(rf"^\*\*{re.escape(name)}\*\*", glossary, re.M), f"the glossary does not define {name!r}"
