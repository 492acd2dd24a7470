"""Running the copy-paste snippets of a model card."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

SNIPPET_SENTENCES = ["A man is playing a guitar.", "A dog runs in the park."]


def snippets(readme: Path) -> dict[str, str]:
    """``{section title: python code}`` for every python block of the card's Usage section."""
    text = readme.read_text(encoding="utf-8")
    found = {}
    for title, body in re.findall(r"### ([^\n]+)\n(.*?)(?=\n### |\nLibrary versions)", text, flags=re.S):
        code = re.search(r"```python\n(.*?)```", body, flags=re.S)
        if code:
            found[title] = code.group(1)
    return found


def run_snippets(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    monkeypatch.chdir(folder.parent)
    results = {}
    for title, code in snippets(folder / "README.md").items():
        scope: dict = {}
        exec(compile(code, f"{folder.name}/README.md [{title}]", "exec"), scope)
        embeddings = scope["embeddings"]
        results[title] = embeddings.numpy() if hasattr(embeddings, "numpy") else np.asarray(embeddings)
    return results
