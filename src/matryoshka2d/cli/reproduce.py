"""``m2d reproduce --config FILE``: the reproduction study (train, evaluate, report), resumable."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the reproduction study from a TOML file (resumes)")
    p.add_argument("--config", required=True, help="study TOML, e.g. configs/reproduce-stsb-minilm.toml")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.add_argument("--seeds", default=None, metavar="S[,S...]",
                   help="run only these of the study's seeds now (e.g. 0 on a CPU, the rest later); the report "
                        "covers every run that is finished")
    p.add_argument("--first", default=None, metavar="PATTERN[,PATTERN...]",
                   help="train the units whose label matches one of these shell patterns before the others "
                        "(e.g. 'dense-heads,separate-head-*' to get the decisive runs of a long CPU study first)")
    p.add_argument("--only", default=None, metavar="PATTERN[,PATTERN...]",
                   help="train only the units whose label matches one of these shell patterns now, the rest in a "
                        "later call (e.g. two workers: --only '2dmse,starbucks,separate-[0-9]*' and "
                        "--only 'separate-head-*'); the report covers every finished run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.outputs import check_writable
    from matryoshka2d.study.config import load_study
    from matryoshka2d.study.runner import run_study

    study = load_study(args.config)
    seeds = None if args.seeds is None else _seed_subset(args.seeds, study.seeds)
    for key in ("runs_dir", "output_dir"):  # each unit takes its own lock inside
        check_writable(getattr(study, key), kind="folder", overwrite=True, flag=f"[study] {key}")
    first, only = (None if text is None else [part.strip() for part in text.split(",") if part.strip()]
                   for text in (args.first, args.only))
    if only == []:
        raise ValueError(f"--only {args.only!r} names no pattern; give unit labels or shell patterns such as "
                         "'separate-head-*', or leave --only out to train every unit")
    report = run_study(study, report_only=args.report_only, seeds=seeds, first=first, only=only)
    print(f"wrote {report}")
    return 0


def _seed_subset(text: str, seeds: list[int]) -> list[int]:
    """The seeds of ``--seeds`` (a comma-separated subset of the study's ``seeds``), in the study's order."""
    try:
        chosen = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        chosen = set()
    if not chosen or not chosen <= set(seeds):
        raise ValueError(f"--seeds {text!r}: expected a comma-separated subset of the study's seeds "
                         f"{','.join(map(str, seeds))}, e.g. --seeds {seeds[0]}")
    return [s for s in seeds if s in chosen]
