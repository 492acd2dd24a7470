"""``m2d reproduce --config FILE``: the reproduction study (train, evaluate, report), resumable."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the reproduction study from a TOML file (resumes)")
    p.add_argument("--config", required=True, help="study TOML, e.g. configs/reproduce-stsb-minilm.toml")
    p.add_argument("--report-only", action="store_true", help="only rewrite the report from finished runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from matryoshka2d.io.outputs import check_writable
    from matryoshka2d.study.config import load_study
    from matryoshka2d.study.runner import run_study

    study = load_study(args.config)
    for key in ("runs_dir", "output_dir"):  # each unit takes its own lock inside
        check_writable(getattr(study, key), kind="folder", overwrite=True, flag=f"[study] {key}")
    report = run_study(study, report_only=args.report_only)
    print(f"wrote {report}")
    return 0
