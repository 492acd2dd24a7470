"""Every relative link in the repository's Markdown resolves (README, docs/, research/, benchmarks/)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "runs", "fixtures", ".pytest_cache", "node_modules", "models"}
LINK = re.compile(r"(?:\]\(|^\s*\[[^\]]+\]: |src=\")([^)\s\"#]+)", re.M)


def test_every_relative_markdown_link_resolves():
    pages = [p for p in ROOT.rglob("*.md") if not SKIP & set(p.relative_to(ROOT).parts)]
    assert any(p.parts[-2:] == ("docs", "export.md") for p in pages) and (ROOT / "research" / "README.md") in pages
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)  # code is not a link
        for target in LINK.findall(text):
            if not re.match(r"^[a-z]+:", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "\n".join(broken)
