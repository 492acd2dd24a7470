"""The model card (README.md) written into every saved or exported folder.

The card is rendered from the folder's ``matryoshka2d.json`` content. Keys it reads besides the basics
(``num_layers``, ``hidden_size``, ``pooling``, ``max_seq_length``, ``default_layer``, ``default_dim``,
``source``): ``training`` (dict: strategy, data, steps, ...), ``evaluation`` (an ``m2d eval`` results dict,
``{"results": [{"set", "layer", "dim", "spearman", ...}]}``), ``benchmark`` (an ``m2d bench`` dict,
``{"records": [{"impl", "layer", "dtype", "batch_size", "sentences_per_s"}]}``), ``exit_heads``
(``{"kind", "layers"}``: the snippets apply the default exit's head), ``exported_from`` (with
``document_space``) and ``export`` (written by :func:`matryoshka2d.export.exporter.export_model`).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from matryoshka2d.vocab import st_pooling_name

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------- result files
def read_eval_results(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Read and check an ``m2d eval`` results JSON (or the dict itself).

    Returns:
        ``{"model": ..., "results": [{"set", "layer", "dim", "spearman", ...}, ...]}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or records without ``set``/``layer``/``dim``/``spearman``.
    """
    data = _read_json(source, "evaluation results")
    records = data.get("results") if isinstance(data, dict) else None
    _check_records(records, ("set", "layer", "dim", "spearman"), source, "results", "m2d eval --output")
    return data


def read_bench_results(source: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """Read and check an ``m2d bench`` results JSON (or the dict itself).

    Returns:
        ``{"records": [{"impl", "layer", "dtype", "batch_size", "sentences_per_s"}, ...], ...}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not JSON, or records without the keys above.
    """
    data = _read_json(source, "benchmark results")
    records = data.get("records") if isinstance(data, dict) else None
    keys = ("impl", "layer", "dtype", "batch_size", "sentences_per_s")
    _check_records(records, keys, source, "records", "m2d bench --output")
    return data


def _read_json(source: str | os.PathLike[str] | dict[str, Any], what: str) -> Any:
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist; pass the JSON written by m2d")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} file {path} is not valid JSON ({e}); pass the JSON written by m2d") from e


def _check_records(records: Any, keys: tuple[str, ...], source: Any, field: str, writer: str) -> None:
    where = source if not isinstance(source, dict) else "the given dict"
    if not isinstance(records, list) or not records:
        raise ValueError(f"{where} has no non-empty {field!r} list; pass the JSON written by {writer}")
    for i, rec in enumerate(records):
        missing = [k for k in keys if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise ValueError(f"{where}: {field}[{i}] lacks {', '.join(missing)}; every record needs "
                             f"{', '.join(keys)} (as written by {writer})")


def select_layers(data: dict[str, Any], field: str, max_layer: int) -> dict[str, Any]:
    """A copy of results ``data`` keeping only records at layers ``1..max_layer``."""
    return {**data, field: [r for r in data[field] if int(r["layer"]) <= max_layer]}


# ----------------------------------------------------------------------------------- tables
def quality_tables(evaluation: dict[str, Any], highlight: tuple[int, int] | None = None) -> str:
    """Markdown layer x dim tables of Spearman x100: the average over sets (when several) and each set."""
    grid: dict[str, dict[tuple[int, int], float]] = defaultdict(dict)
    for rec in evaluation.get("results", []):
        grid[str(rec["set"])][(int(rec["layer"]), int(rec["dim"]))] = float(rec["spearman"])
    if not grid:
        return ""
    parts = []
    if len(grid) > 1:
        common = set.intersection(*(set(g) for g in grid.values()))
        if common:
            avg = {k: sum(g[k] for g in grid.values()) / len(grid) for k in common}
            parts.append(f"Average over {len(grid)} sets ({', '.join(sorted(grid))}):\n\n"
                         + _grid_table(avg, highlight))
    for name in sorted(grid):
        table = _grid_table(grid[name], highlight)
        parts.append(f"{name}:\n\n{table}" if len(grid) == 1 else
                     f"<details><summary>{name}</summary>\n\n{table}\n</details>")
    return "\n\n".join(parts)


def _grid_table(cells: dict[tuple[int, int], float], highlight: tuple[int, int] | None) -> str:
    layers = sorted({n for n, _ in cells})
    dims = sorted({d for _, d in cells})
    lines = ["| layer \\ dim | " + " | ".join(str(d) for d in dims) + " |",
             "|---|" + "---:|" * len(dims)]
    for n in layers:
        row = []
        for d in dims:
            value = cells.get((n, d))
            text = "" if value is None else f"{value:.2f}"
            row.append(f"**{text}**" if (n, d) == highlight and text else text)
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def speed_table(benchmark: dict[str, Any]) -> str:
    """Markdown table of sentences/s per layer, one column per (implementation, dtype, batch size)."""
    cells: dict[tuple[int, str], float] = {}
    columns: list[str] = []
    for rec in benchmark.get("records", []):
        col = f"{rec['impl']} {rec['dtype']} bs={rec['batch_size']}"
        if col not in columns:
            columns.append(col)
        cells[(int(rec["layer"]), col)] = float(rec["sentences_per_s"])
    if not cells:
        return ""
    lines = ["| layer | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for n in sorted({n for n, _ in cells}):
        row = [f"{cells[(n, c)]:.0f}" if (n, c) in cells else "" for c in columns]
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- the card
def render_model_card(meta: dict[str, Any], *, name: str = "model") -> str:
    """Markdown model card from the folder's ``matryoshka2d.json`` content.

    Args:
        meta: the folder's config (see the module docstring for the keys read).
        name: the folder's name, used in the copy-paste snippets (run them from the folder's parent).
    """
    export = meta.get("export") or {}
    origin = meta.get("exported_from") or {}
    fmt = export.get("format")
    layer, dim = meta.get("default_layer"), meta.get("default_dim")
    highlight = (int(layer), int(dim)) if layer and dim else None
    lines = ["---", "library_name: " + ("sentence-transformers" if fmt == "sentence-transformers"
                                         else "matryoshka2d"),
             "pipeline_tag: sentence-similarity",
             "tags: [sentence-embeddings, sentence-similarity, matryoshka, 2dmse, matryoshka2d"
             + (", onnx" if fmt == "onnx" else "") + "]"]
    if _is_hub_id(meta.get("source")):
        lines.append(f"base_model: {meta['source']}")
    lines += ["---", "", f"# {name}", "", *_summary(meta, export, origin), "", "## Model", "",
              "| | |", "|---|---|"]
    facts = {
        "source": f"`{meta.get('source', 'unknown')}`",
        "architecture": meta.get("architecture"),
        "layers stored": meta.get("num_layers"),
        "hidden size (D)": meta.get("hidden_size"),
        "pooling": f"`{meta.get('pooling')}`",
        "max sequence length": meta.get("max_seq_length"),
        "default exit": f"layer {layer}, dim {dim}",
        "exit heads": _heads_fact(meta),
        "document space": _space_fact(meta),
    }
    lines += [f"| {k} | {v} |" for k, v in facts.items() if v is not None]
    training = meta.get("training")
    if training:
        lines += ["", "## Training", ""]
        lines += [f"- {k}: `{v}`" for k, v in training.items()]
    if export:
        lines += ["", "## Export", "", *_export_lines(export)]
    evaluation = meta.get("evaluation")
    quality = quality_tables(evaluation, highlight) if evaluation else meta.get("eval_table")
    if quality:
        lines += ["", "## Quality (STS, Spearman x100 of cosine)", ""]
        if origin:
            lines += [f"Measured on the source model `{origin.get('source')}` at the same exits (the "
                      f"exported model computes exactly these); the exported exit is in bold.", ""]
        lines.append(quality)
    speed = speed_table(meta["benchmark"]) if meta.get("benchmark") else meta.get("speed_table")
    if speed:
        lines += ["", "## Encoding speed (sentences/s)", ""]
        bench_model = (meta.get("benchmark") or {}).get("model")
        if bench_model:
            lines += [f"Measured on `{bench_model}`, the model physically truncated to each layer.", ""]
        lines.append(speed)
    lines += ["", "## Usage", "", f"Run these from the folder that contains `{name}/`.", ""]
    lines += usage_sections(meta, name)
    lines += ["", f"Library versions: `{json.dumps(meta.get('library_versions', {}), sort_keys=True)}`", ""]
    return "\n".join(lines)


def _summary(meta: dict[str, Any], export: dict[str, Any], origin: dict[str, Any]) -> list[str]:
    text = ("A 2D Matryoshka sentence encoder (matryoshka2d): its embeddings are usable from any layer "
            "1..N (the forward pass stops there) and at any truncated dimension (first d coordinates, "
            "then L2-normalised).")
    if not origin:
        return [text]
    n, d = origin.get("layer"), origin.get("dim")
    what = {"hf": "a Hugging Face model folder", "sentence-transformers": "a sentence-transformers model",
            "onnx": "an ONNX graph", "openvino": "an OpenVINO model"}.get(export.get("format", ""), "a model folder")
    return [f"The exit (layer {n}, dim {d}) of `{origin.get('source')}` ({origin.get('num_layers')} layers, "
            f"{origin.get('hidden_size')} dims), exported as {what}. Only transformer blocks 1..{n} are "
            f"stored, so it runs {n} of {origin.get('num_layers')} blocks per sentence and returns "
            f"{d}-dim L2-normalised embeddings by default.", "", text]


def _export_lines(export: dict[str, Any]) -> list[str]:
    lines = [f"- format: `{export.get('format')}`"]
    for key in ("exporter", "opset", "exit_head", "files"):
        if export.get(key) is not None:
            lines.append(f"- {key}: `{export[key]}`")
    for key, value in (export.get("verification") or {}).items():
        lines.append(f"- check, {key}: `{value}`")
    for key, value in (export.get("quantization") or {}).items():
        lines.append(f"- int8 quantisation, {key}: `{value}`")
    return lines


def _heads_fact(meta: dict[str, Any]) -> str | None:
    heads = meta.get("exit_heads")
    if not isinstance(heads, dict):
        return None
    return f"`{heads.get('kind')}` on layers {heads.get('layers')} (`exit_heads.safetensors`, before truncation)"


def _head_layer(meta: dict[str, Any]) -> int | None:
    """The default exit's layer when it has an exit head (its snippets must apply it), else ``None``."""
    heads, layer = meta.get("exit_heads"), meta.get("default_layer")
    return layer if isinstance(heads, dict) and layer in (heads.get("layers") or []) else None


def _is_hub_id(source: Any) -> bool:
    return isinstance(source, str) and source.count("/") == 1 and not Path(source).exists()


def _space_fact(meta: dict[str, Any]) -> str | None:
    """Which exits of the source search an index built at its document exit, and what this folder encodes
    (``exported_from.document_space``, written by :func:`~matryoshka2d.export.exporter.export_model`)."""
    space = (meta.get("exported_from") or {}).get("document_space")
    if not isinstance(space, dict) or not isinstance(space.get("document_exit"), int):
        return None
    doc, exits = space["document_exit"], space.get("query_exits") or [space["document_exit"]]
    text = f"an index built at layer {doc} of the source is searched by queries at layers {', '.join(map(str, exits))}"
    if space.get("input_type") == "query":
        return text + f"; this folder is the own query path of layer {space.get('exit')}: encode queries only"
    if space.get("exit") in exits:
        return text + (f"; this folder encodes documents (layer {doc})" if space.get("exit") == doc else
                       f"; this folder is layer {space.get('exit')}'s shared path")
    return text + f"; this folder (layer {space.get('exit')}) is not in that space: index its own vectors"


def write_model_card(folder: Path, meta: dict[str, Any], *, name: str | None = None) -> None:
    """Write ``README.md`` into ``folder``.

    Args:
        folder: the folder (possibly the temporary sibling of :func:`~matryoshka2d.io.atomic.atomic_dir`).
        meta: its ``matryoshka2d.json`` content.
        name: the folder's final name for the snippets; ``None`` derives it from ``folder``.
    """
    text = render_model_card(meta, name=name or _card_name(folder))
    (Path(folder) / "README.md").write_text(text, encoding="utf-8")


def _card_name(folder: Path) -> str:
    # atomic_dir writes into ".NAME.tmp-XXXX"; the card must name the final folder
    name = Path(folder).name
    if name.startswith(".") and ".tmp-" in name:
        name = name[1:].rsplit(".tmp-", 1)[0]
    return name


# ----------------------------------------------------------------------------------- usage snippets
_EXAMPLE = 'sentences = ["A man is playing a guitar.", "A dog runs in the park."]'
_MASK = 'mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)'
_MEAN = "(hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)"
_POOLING_CODE = {
    "mean": [_MASK, f"pooled = {_MEAN}"],
    "cls": ["pooled = hidden[:, 0]"],
    "cls_avg": [_MASK, f"pooled = ({_MEAN} + hidden[:, 0]) / 2"],
    "max": [_MASK, "pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values"],
    "last": ['positions = torch.arange(batch["attention_mask"].shape[1])',
             'last = (batch["attention_mask"] * positions).argmax(1)',
             "pooled = hidden[torch.arange(hidden.shape[0]), last]"],
}


def usage_sections(meta: dict[str, Any], name: str) -> list[str]:
    """Copy-paste snippets for matryoshka2d, sentence-transformers, transformers (or onnxruntime)."""
    if (meta.get("export") or {}).get("format") == "onnx":
        return _onnx_usage(meta, name)
    if (meta.get("export") or {}).get("format") == "openvino":
        return _openvino_usage(meta, name)
    return _m2d_usage(meta, name) + _st_usage(meta, name) + _hf_usage(meta, name)


def _tokenize_line(meta: dict[str, Any], tensors: str) -> str:
    return (f"batch = tokenizer(sentences, padding=True, truncation=True, "
            f'max_length={meta.get("max_seq_length")}, return_tensors="{tensors}")')


def _shape_line(meta: dict[str, Any]) -> str:
    return f"print(embeddings.shape)  # (2, {meta.get('default_dim')})"


def _onnx_usage(meta: dict[str, Any], name: str) -> list[str]:
    out = ["### onnxruntime", "",
           "Tokenize with the tokenizer in this folder; pooling, truncation to the exit's dim and L2 "
           "normalisation run inside the graph.", "",
           "```python", "import onnxruntime as ort", "from transformers import AutoTokenizer", "", _EXAMPLE,
           f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
           f'session = ort.InferenceSession("{name}/model.onnx", providers=["CPUExecutionProvider"])',
           "names = [i.name for i in session.get_inputs()]", _tokenize_line(meta, "np"),
           'embeddings = session.run(["sentence_embedding"], {k: batch[k] for k in names})[0]',
           _shape_line(meta), "```"]
    if "model_int8.onnx" in ((meta.get("export") or {}).get("files") or []):
        out += ["", "`model_int8.onnx` is the same graph with dynamically quantised int8 weights "
                "(smaller, faster on CPU; the Export section gives its agreement with fp32)."]
    return out


def _openvino_usage(meta: dict[str, Any], name: str) -> list[str]:
    return ["### OpenVINO", "", "Pooling, truncation and L2 normalisation run inside the model; `m2d encode "
            f"{name}` runs it with the tokenizers library (no torch).", "",
            "```python", "import openvino as ov", "from transformers import AutoTokenizer", "", _EXAMPLE,
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            f'model = ov.Core().compile_model("{name}/openvino_model.xml", "CPU", '
            '{"INFERENCE_PRECISION_HINT": "f32"})',
            _tokenize_line(meta, "np"),
            'embeddings = model({p.get_any_name(): batch[p.get_any_name()] for p in model.inputs})'
            '["sentence_embedding"]', _shape_line(meta), "```"]


def _m2d_usage(meta: dict[str, Any], name: str) -> list[str]:
    return ["### matryoshka2d", "", "```python", "from matryoshka2d import MatryoshkaEncoder", "", _EXAMPLE,
            f'model = MatryoshkaEncoder.from_pretrained("{name}")',
            f"embeddings = model.encode(sentences)  # the default exit: layer {meta.get('default_layer')}, "
            f"dim {meta.get('default_dim')}", _shape_line(meta),
            f"# any other exit: model.encode(sentences, layer=1..{meta.get('num_layers')}, "
            f"dim=1..{meta.get('hidden_size')})", "```", ""]


def _st_usage(meta: dict[str, Any], name: str) -> list[str]:
    layer, dim, pooling = meta.get("default_layer"), meta.get("default_dim"), meta.get("pooling", "mean")
    out = ["### sentence-transformers", ""]
    if (meta.get("export") or {}).get("format") == "sentence-transformers":
        return out + ["```python", "from sentence_transformers import SentenceTransformer", "", _EXAMPLE,
                      f'model = SentenceTransformer("{name}")',
                      "embeddings = model.encode(sentences)  # L2-normalised", _shape_line(meta), "```", ""]
    st_pooling = st_pooling_name(pooling) if isinstance(pooling, str) else None
    if layer == meta.get("num_layers") and st_pooling and _head_layer(meta) is None:
        return out + [
            "```python", "from sentence_transformers import SentenceTransformer, models", "", _EXAMPLE,
            f'transformer = models.Transformer("{name}", max_seq_length={meta.get("max_seq_length")})',
            f'pooling = models.Pooling({meta.get("hidden_size")}, "{st_pooling}")',
            f"model = SentenceTransformer(modules=[transformer, pooling], truncate_dim={dim})",
            "# sentence-transformers truncates after its modules: normalise afterwards",
            "embeddings = model.encode(sentences, normalize_embeddings=True)", _shape_line(meta), "```", ""]
    why = ("pool with cls_avg" if pooling == "cls_avg" else f"apply the exit head of layer {layer}"
           if _head_layer(meta) is not None else f"stop at layer {layer} of this folder")
    return out + [f"sentence-transformers cannot {why} by itself; export the exit:", "", "```bash",
                  f"m2d export {name} --layer {layer} --dim {dim} --format sentence-transformers "
                  f"--output {name}-st", "```", ""]


def _hf_usage(meta: dict[str, Any], name: str) -> list[str]:
    layer, depth = meta.get("default_layer"), meta.get("num_layers")
    kwargs = "".join(f", {k}={v!r}" for k, v in (meta.get("transformers_kwargs") or {}).items())
    if layer == depth:
        forward = f"    hidden = model(**batch).last_hidden_state  # the output of block {layer}"
        note = (f"This folder holds only blocks 1..{depth}, so plain transformers runs exactly the exit's "
                "compute." if meta.get("exported_from") else "")
    else:
        forward = f"    hidden = model(**batch, output_hidden_states=True).hidden_states[{layer}]"
        note = (f"Plain transformers runs all {depth} blocks here; for a real early exit use matryoshka2d "
                "or export the exit (`m2d export`).")
    head, head_import = [], []
    if _head_layer(meta) is not None:
        note = (note + " " if note else "") + (f"Layer {layer} has a linear exit head (in "
                                               "`exit_heads.safetensors`), applied before truncation.")
        head_import = ["from safetensors.torch import load_file"]
        head = [f'head = load_file("{name}/exit_heads.safetensors")',
                f'pooled = pooled.float() @ head["{layer}.weight"].T + head["{layer}.bias"]']
    return ["### transformers", "", *([note, ""] if note else []),
            "```python", "import torch", "import torch.nn.functional as F", *head_import,
            "from transformers import AutoModel, AutoTokenizer", "", _EXAMPLE,
            f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            f'model = AutoModel.from_pretrained("{name}"{kwargs}).eval()', _tokenize_line(meta, "pt"),
            "with torch.no_grad():", forward, *_POOLING_CODE[str(meta.get("pooling", "mean"))], *head,
            f"embeddings = F.normalize(pooled[:, :{meta.get('default_dim')}], dim=-1)", _shape_line(meta),
            "```"]
