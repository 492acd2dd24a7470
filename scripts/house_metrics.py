"""The house's counts for a review (issue 37's closing note): modules, lines, the largest functions, and the
modules that ``export_model`` and one request through the server pass through.

    python scripts/house_metrics.py [--src src/matryoshka2d] [--no-trace] [--output FILE.json]

A path is the sequence of package modules entered, in call order, with repeats of the same module in a row
merged; a "return" is entering a module the path had already left (A -> B -> A counts one). The trace uses
``sys.setprofile`` on the real all-MiniLM-L6-v2 (offline), an ``hf`` export of exit 3 and one
``POST /v1/embeddings`` through FastAPI's test client on the torch backend.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

PACKAGE = "matryoshka2d"


def code_counts(src: Path, top: int = 10) -> dict[str, Any]:
    """Modules, lines (all, and code lines without blanks or comments) and the ``top`` longest functions."""
    modules = sorted(p for p in src.rglob("*.py"))
    lines = code = 0
    functions = []
    for path in modules:
        text = path.read_text(encoding="utf-8")
        lines += len(text.splitlines())
        code += sum(1 for line in text.splitlines() if line.strip() and not line.strip().startswith("#"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(src.parent)}:{node.lineno} "
                                                                     f"{node.name}"))
    functions.sort(reverse=True)
    return {"modules": len(modules), "lines": lines, "code_lines": code,
            "largest_functions": [{"lines": n, "where": w} for n, w in functions[:top]]}


class Tracer:
    """Records the package modules entered while :attr:`active`, in every thread started after :meth:`install`
    (the server's batcher and the test client's event loop run in threads of their own)."""

    def __init__(self) -> None:
        self.active = False
        self.seen: list[str] = []

    def profile(self, frame: Any, event: str, arg: Any) -> None:
        if not self.active or event != "call":
            return
        name = frame.f_globals.get("__name__", "")
        if name.startswith(PACKAGE + ".") and (not self.seen or self.seen[-1] != name):
            self.seen.append(name)

    def install(self) -> None:
        sys.setprofile(self.profile)
        threading.setprofile(self.profile)

    def path(self, run: Callable[[], Any]) -> dict[str, Any]:
        """The modules ``run()`` enters, in order (repeats in a row merged), and how often it returns."""
        self.seen, self.active = [], True
        try:
            run()
        finally:
            self.active = False
        seen, left, returns = self.seen, set(), 0
        for prev, name in zip(seen, seen[1:], strict=False):
            left.add(prev)
            returns += name in left
        return {"modules": sorted(set(seen)), "distinct": len(set(seen)), "steps": len(seen), "returns": returns}


def traces() -> dict[str, Any]:
    """The paths of an export and of one server request (the real MiniLM)."""
    from fastapi.testclient import TestClient

    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.export import export_model
    from matryoshka2d.serve.app import create_app
    from matryoshka2d.serve.config import ServeConfig

    tracer = Tracer()
    tracer.install()
    model = MatryoshkaEncoder.from_pretrained("minilm").eval()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["export_model (hf, exit 3, verified)"] = tracer.path(
            lambda: export_model(model, Path(tmp) / "e", layer=3, format="hf"))
    app = create_app(model, ServeConfig(model_name="minilm"), threads=1)
    with TestClient(app) as client:
        client.post("/v1/embeddings", json={"input": ["warm-up"], "layer": 3})
        response: dict[str, Any] = {}
        out["POST /v1/embeddings (torch, layer 3)"] = tracer.path(lambda: response.update(client.post(
            "/v1/embeddings", json={"input": ["a man plays the guitar"], "layer": 3}).json()))
        assert len(response["data"][0]["embedding"]) == model.hidden_size
    sys.setprofile(None)
    threading.setprofile(None)  # type: ignore[arg-type]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=Path(__file__).resolve().parents[1] / "src" / PACKAGE)
    p.add_argument("--no-trace", action="store_true", help="counts only (no model is loaded)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args()
    result = {"code": code_counts(args.src)}
    if not args.no_trace:
        result["paths"] = traces()
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
