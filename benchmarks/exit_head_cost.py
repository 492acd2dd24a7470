"""Inference cost of an exit head (issue 9): a physically truncated model with and without its head.

For each exit ``n`` it builds ``model.truncate(n)`` twice, one copy without heads and one with a linear head
at layer ``n`` (a head's cost does not depend on its values, so the identity head of ``add_exit_heads`` is
used). It then times ``encode`` on the same real STS-B sentences. The two copies run interleaved, round after
round, so load changes on the machine hit both alike. It reports the median of ``--repeats`` rounds after
``--warmup`` discarded ones.

    python benchmarks/exit_head_cost.py [--layers 1,3,5] [--sentences 1000] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="1,3,5")
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "exit_head_cost.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.data.datasets import load_sts

    pairs = load_sts("stsb", "test")
    texts = list(dict.fromkeys([*pairs.sentences1, *pairs.sentences2]))[: args.sentences]
    base = MatryoshkaEncoder.from_pretrained("minilm")
    rows = []
    for n in (int(v) for v in args.layers.split(",")):
        plain = base.truncate(n)
        headed = base.truncate(n)
        headed.add_exit_heads("linear", layers=[n])
        assert headed.exit_head_layers == [n] and not plain.exit_head_layers
        times: dict[str, list[float]] = {"plain": [], "head": []}
        for _ in range(args.warmup + args.repeats):
            for name, model in (("plain", plain), ("head", headed)):
                start = time.perf_counter()
                model.encode(texts, batch_size=args.batch_size)
                times[name].append(time.perf_counter() - start)
        med = {k: statistics.median(v[args.warmup :]) for k, v in times.items()}
        info = headed.describe()
        rows.append({"layer": n, "plain_s": round(med["plain"], 4), "head_s": round(med["head"], 4),
                     "overhead": round(med["head"] / med["plain"] - 1, 4),
                     "sentences_per_s_plain": round(len(texts) / med["plain"], 1),
                     "sentences_per_s_head": round(len(texts) / med["head"], 1),
                     "head_parameters": info["exit_heads"]["parameters_per_head"],
                     "all_s": {k: [round(t, 4) for t in v] for k, v in times.items()}})
        print(f"layer {n}: {rows[-1]['sentences_per_s_plain']:.0f}/s without head, "
              f"{rows[-1]['sentences_per_s_head']:.0f}/s with ({100 * rows[-1]['overhead']:+.2f}%)", file=sys.stderr)
    result = {"what": "encode time of truncate(n) with and without a linear exit head at n (all-MiniLM-L6-v2)",
              "sentences": len(texts), "batch_size": args.batch_size, "repeats": args.repeats,
              "warmup": args.warmup, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "results": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
