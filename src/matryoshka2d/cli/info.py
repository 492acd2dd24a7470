"""``m2d info MODEL``: architecture, depth, width, pooling and parameters per exit."""

from __future__ import annotations

import argparse
import json

from matryoshka2d.cli.common import add_model_args, load_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="describe a model and its exits")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = load_model(args).describe()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"architecture:   {info['architecture']}")
    print(f"layers:         {info['layers']}")
    print(f"hidden size:    {info['hidden_size']}")
    print(f"pooling:        {info['pooling']}")
    print(f"max seq length: {info['max_seq_length']}")
    print(f"parameters:     {info['parameters']:,}")
    heads = info.get("exit_heads")
    if heads:
        print(f"exit heads:     {heads['kind']} on layers {heads['layers']} "
              f"({heads['parameters_per_head']:,} parameters each)")
    space = info["document_space"]
    how = {"own": "query exits with their own parameters: encode queries with input_type='query'",
           "shared": "trained into it", None: "no other exit is known to share it"}[space["query_path"]]
    print(f"document space: an index built at layer {space['document_exit']} can be searched with queries at layers "
          f"{space['query_exits']} ({how})")
    for n, own in (info.get("query_exit_parameters") or {}).items():
        print(f"  query exit {n}: {own['head']:,} head + {own['lora']:,} adapter parameters of its own")
    print("parameters per exit (layer: params, share of full):")
    for n, count in info["parameters_per_exit"].items():
        print(f"  {n:>3}: {count:>12,}  {count / info['parameters']:6.1%}")
    return 0
