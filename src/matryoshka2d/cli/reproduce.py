"""``m2d reproduce --config FILE``: the reproduction study (train, evaluate, report), resumable; ``--pool``:
per-seed reports pooled over seeds."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the reproduction study from a TOML file (resumes)")
    p.add_argument("--config", default=None,
                   help="study TOML, e.g. configs/reproduce-stsb-minilm.toml (with --pool: its verdict thresholds)")
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
    g = p.add_argument_group("pooling per-seed reports (runs in different places; nothing is re-scored)")
    g.add_argument("--pool", nargs="+", default=None, metavar="SEED=DIR",
                   help="each seed's report folder (its output_dir), e.g. 0=research/controls "
                        "1=research/controls-seed1")
    g.add_argument("--out", default=None, help="with --pool: folder for pooled.json")
    g.add_argument("--report", default=None, help="with --pool: the Markdown report to write")
    g.add_argument("--title", default=None, help="with --pool: the report's title")
    g.add_argument("--main", default="all-sum-heads - separate-head",
                   help="with --pool: the comparison tabulated per exit (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.pool is not None:
        return run_pool(args)
    from matryoshka2d.io.outputs import check_writable
    from matryoshka2d.study.config import load_study
    from matryoshka2d.study.runner import run_study

    if args.config is None:
        raise ValueError("m2d reproduce needs --config FILE (a study TOML, e.g. configs/reproduce-stsb-minilm.toml), "
                         "or --pool SEED=DIR ... to pool per-seed reports")
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


def run_pool(args: argparse.Namespace) -> int:
    """``--pool``: :func:`matryoshka2d.study.pool.write_pooled_report`."""
    from pathlib import Path

    from matryoshka2d.study.config import StudyConfig, load_study
    from matryoshka2d.study.pool import parse_seed_dirs, write_pooled_report

    missing = [f"--{k}" for k in ("out", "report", "title") if getattr(args, k) is None]
    if missing:
        raise ValueError(f"--pool also needs {', '.join(missing)}: where pooled.json and the report go, and its title")
    dirs = parse_seed_dirs(args.pool)
    study = load_study(args.config) if args.config else StudyConfig()
    command = "m2d reproduce " + " ".join(
        [*(["--config", args.config] if args.config else []), "--pool",
         *(f"{s}={d.as_posix()}" for s, d in sorted(dirs.items())), "--out", Path(args.out).as_posix(),
         "--report", Path(args.report).as_posix(), "--title", f'"{args.title}"'])
    report = write_pooled_report(dirs, Path(args.out), Path(args.report), args.title, args.main, study, command)
    print(f"wrote {report}")
    return 0
