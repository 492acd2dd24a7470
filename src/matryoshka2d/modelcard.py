"""The model card (README.md) written into every saved or exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_model_card(meta: dict[str, Any]) -> str:
    """Markdown model card from the folder's ``matryoshka2d.json`` content."""
    layers, dim = meta.get("default_layer"), meta.get("default_dim")
    lines = [
        "---",
        "library_name: matryoshka2d",
        "tags: [sentence-embeddings, matryoshka, 2dmse]",
        "---",
        f"# 2D Matryoshka sentence encoder ({meta.get('num_layers')} layers, {meta.get('hidden_size')} dims)",
        "",
        "Embeddings are usable from any layer 1..N (stopping the forward pass there) and at any "
        "truncated dimension (first d coordinates, then L2-normalised).",
        "",
        f"- source: `{meta.get('source', 'unknown')}`",
        f"- pooling: `{meta.get('pooling')}`; max sequence length {meta.get('max_seq_length')}",
        f"- default exit: layer {layers}, dim {dim}",
    ]
    training = meta.get("training")
    if training:
        lines += ["", "## Training", ""] + [f"- {k}: `{v}`" for k, v in training.items()]
    table = meta.get("eval_table")
    if table:
        lines += ["", "## Quality (Spearman x100)", "", table]
    speed = meta.get("speed_table")
    if speed:
        lines += ["", "## Encoding speed", "", speed]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from matryoshka2d import MatryoshkaEncoder",
        'model = MatryoshkaEncoder.from_pretrained("PATH")',
        f'emb = model.encode(["A sentence."], layer={layers}, dim={dim})',
        "```",
        "",
        f"Library versions: {meta.get('library_versions', {})}",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "README.md").write_text(render_model_card(meta), encoding="utf-8")
