"""``m2d train --config FILE [flags] [--set key=value ...]``: train with the 2D Matryoshka objective.

Precedence: built-in defaults < the TOML file < the flags below < ``--set``. Under several processes run
it through ``accelerate launch`` or ``torchrun`` (see docs/training.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from matryoshka2d.vocab import BASE_LOSSES, STRATEGIES

logger = logging.getLogger(__name__)

# flag dest -> config key
_FLAGS = {
    "output_dir": "run.output_dir", "model": "model.name", "data": "data.source", "data_dir": "data.data_dir",
    "strategy": "objective.strategy", "loss": "loss.name", "max_steps": "train.max_steps",
    "epochs": "train.epochs", "batch_size": "train.batch_size", "lr": "train.lr", "seed": "train.seed",
    "mixed_precision": "train.mixed_precision", "save_every": "run.save_every",
    "eval_every": "run.eval_every",
    "gradient_checkpointing": "model.gradient_checkpointing", "progress_bar": "run.progress_bar",
}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model with the 2D Matryoshka objective (see configs/)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="TOML config, e.g. configs/stsb-minilm-2dmse.toml (with --resume: the run's own)")
    p.add_argument("--output-dir", default=None, help="run folder (run.output_dir)")
    p.add_argument("--model", default=None, help="model folder, hub id or 'minilm' (model.name)")
    p.add_argument("--data", default=None, help="stsb, sickr, nli or a .tsv/.csv/.jsonl file (data.source)")
    p.add_argument("--data-dir", default=None, help="folder of the named sets (data.data_dir)")
    p.add_argument("--strategy", default=None, help=f"objective.strategy: {', '.join(STRATEGIES)}")
    p.add_argument("--loss", default=None, help=f"base loss: {', '.join(BASE_LOSSES)} (loss.name)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, default=None, help="passes over the data")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (train.batch_size)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None, help="seed of the model RNGs, data order and sampler")
    p.add_argument("--mixed-precision", default=None, help="no, fp16 (CUDA) or bf16")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint every K steps (0: at the end)")
    p.add_argument("--eval-every", type=int, default=None, help="dev evaluation every K steps (0: never)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute activations in the backward pass (less memory)")
    p.add_argument("--progress-bar", action=argparse.BooleanOptionalAction, default=None, help="tqdm bar")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, e.g. --set objective.kl_weight=0.5 --set loss.options.scale=30")
    p.add_argument("--resume", action="store_true", help="continue the --output-dir run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):  # noqa: ANN201
    """The config from defaults < ``--config`` < flags < ``--set``.

    Raises:
        ValueError: ``--resume`` with neither ``--config`` nor ``--output-dir``, or an invalid value.
    """
    from matryoshka2d.training.config import load_config
    from matryoshka2d.training.loop import CONFIG_FILE

    path = args.config
    if path is None and args.resume:
        if args.output_dir is None:
            raise ValueError("--resume needs --output-dir RUN (its config.resolved.toml is used) or --config")
        path = Path(args.output_dir) / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"cannot resume: {path} does not exist; is {args.output_dir} a run "
                                    f"folder? Start it without --resume")
    overrides = {key: getattr(args, dest) for dest, key in _FLAGS.items() if getattr(args, dest) is not None}
    if getattr(args, "quiet", False) and args.progress_bar is None:
        overrides.setdefault("run.progress_bar", False)  # -q: no bar unless --progress-bar asks for one
    return load_config(path, overrides=overrides, assignments=args.assignments)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.training.loop import TrainingDivergedError, train

    config = resolve_config(args)
    if args.print_config:
        print(config.to_toml(), end="")
        return 0
    main_process = int(os.environ.get("RANK", "0")) == 0  # set by torchrun / accelerate launch
    if not main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one process reports progress
    try:
        with run_folder_claim(config.run.output_dir, main_process=main_process):
            result = train(config, resume=args.resume, overwrite=args.overwrite)
    except TrainingDivergedError as e:
        print(f"m2d train: error: {e}", file=sys.stderr)
        return 2
    if not main_process:
        return 0
    best = ""
    if result.best_step is not None:
        best = f"; best dev score {result.best_score:.2f} at step {result.best_step} ({result.run_dir}/best)"
    print(f"trained {result.steps} steps in {result.seconds:.1f}s; final model: {result.final_dir}{best}")
    print(f"evaluate it with: m2d eval {result.final_dir}")
    return 0


@contextlib.contextmanager
def run_folder_claim(run_dir: str, *, main_process: bool) -> Iterator[None]:
    """The main process holds the run folder's writer lock for the whole run (other ranks share it)."""
    from matryoshka2d.io.locks import output_lock
    from matryoshka2d.io.outputs import check_writable

    if not main_process:
        yield
        return
    check_writable(run_dir, kind="folder", overwrite=True, flag="--output-dir")
    with output_lock(run_dir, what="--output-dir"):
        yield
