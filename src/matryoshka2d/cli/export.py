"""``m2d export MODEL --layer N --dim D --format hf|sentence-transformers|onnx|openvino --output DIR``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from matryoshka2d.cli.common import add_input_type_arg, add_model_args, load_model
from matryoshka2d.vocab import FORMAT_ALIASES, FORMATS, QUANTIZATIONS

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export one exit (layer, dim) as a standalone model folder")
    add_model_args(p)
    p.add_argument("--layer", type=int, default=None, help="exit layer 1..N (default: the model's default)")
    p.add_argument("--dim", type=int, default=None, help="embedding dims 1..D (default: the model's default)")
    p.add_argument("--format", default="hf", choices=[*FORMATS, *FORMAT_ALIASES],
                   help="hf (transformers folder), sentence-transformers (alias st), onnx, openvino (IR of the graph)")
    add_input_type_arg(p, default="document", when="the exported exit: ")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="onnx: also write model_int8.onnx (dynamic int8 weights)")
    p.add_argument("--opset", type=int, default=None, help="onnx/openvino: opset version (default 17)")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                   help="load the export back and compare it with the source exit (onnx is always checked)")
    p.add_argument("--eval-results", default=None, help="m2d eval results JSON for the card's STS table")
    p.add_argument("--bench-results", default=None, help="m2d bench results JSON for the card's speed table")
    p.add_argument("--sts", default=None,
                   help="STS set (e.g. stsb) on which the export's Spearman is compared with the source's")
    p.add_argument("--data-dir", default=None, help="data folder for --sts (default: M2D_DATA_DIR or shared)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.locks import claim_output

    with claim_output(args.output, kind="folder", overwrite=args.overwrite, what="--output folder"):
        return export(args)


def export(args: argparse.Namespace) -> int:
    """The work of ``m2d export`` once its output folder is claimed."""
    from matryoshka2d.export.exporter import export_model

    sts = None
    if args.sts:
        from matryoshka2d.data.datasets import load_sts

        sts = load_sts(args.sts, data_dir=args.data_dir)
    model = load_model(args)
    folder = export_model(
        model, args.output, layer=args.layer, dim=args.dim, format=args.format, overwrite=args.overwrite,
        quantize=args.quantize, opset=args.opset, verify=args.verify, eval_results=args.eval_results,
        bench_results=args.bench_results, sts=sts, source=args.model, input_type=args.input_type,
    )
    meta = json.loads((folder / "matryoshka2d.json").read_text(encoding="utf-8"))
    files = [p for p in folder.rglob("*") if p.is_file()]
    origin, export = meta["exported_from"], meta["export"]
    print(f"exported layer {origin['layer']} (of {origin['num_layers']}), dim {origin['dim']} (of "
          f"{origin['hidden_size']}) as {export['format']} to {folder}: {len(files)} files, "
          f"{folder_size_mib(folder):.1f} MiB")
    space = origin.get("document_space") or {}
    if space.get("input_type") == "query":
        print(f"  the own query path of layer {origin['layer']}: encode queries with it, and search an index built "
              f"at layer {space.get('document_exit')} of {args.model}")
    for section in ("verification", "quantization"):
        for key, value in (export.get(section) or {}).items():
            print(f"  {section}: {key} = {value}")
    return 0


def folder_size_mib(folder: Path) -> float:
    """Total size of the files under ``folder`` in MiB."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
