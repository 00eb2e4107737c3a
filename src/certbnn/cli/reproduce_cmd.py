"""``certbnn reproduce``: run a preset grid of trainings and evaluations into one report."""

from __future__ import annotations

import argparse
import shlex

from certbnn.cli.options import add_device_option
from certbnn.config import parse_option


def register(subparsers: argparse._SubParsersAction) -> None:
    from certbnn.reproduce.grid import list_presets

    p = subparsers.add_parser(
        "reproduce",
        help="run a whole study (a preset grid) and write RESULTS.md",
        description="Train and evaluate every cell (data set x model x method x training mode [x sweep point]) "
        "of a preset, then write OUT/results.json, OUT/RESULTS.md (tables like the paper's: rows = "
        "inference method, columns = training mode, cells = clean / PGD / certified accuracy) and "
        "plots. Rerunning the same command skips finished cells and resumes interrupted ones.",
    )
    p.add_argument(
        "--preset",
        default="quick",
        metavar="NAME|FILE",
        help=f"a shipped preset ({', '.join(list_presets())}; --list describes them) or a path "
        "to your own TOML file in the same format (default quick)",
    )
    p.add_argument("--out", "-o", metavar="DIR", help="output directory (required unless --list)")
    p.add_argument(
        "--only",
        default="",
        metavar="PATTERNS",
        help="comma-separated substrings of cell ids (e.g. 'mnist/bbb,/ibp'); a leading ^ anchors a pattern at "
        "the id's start ('^mnist/' leaves out 'fashion-mnist/...'); runs the matching cells and the cells they "
        "start from",
    )
    p.add_argument(
        "--keep-from",
        metavar="RESULTS_JSON",
        help="another results.json of this preset (e.g. a committed study) whose finished cells this folder's "
        "results and report keep, unchanged, until this folder runs them: rerun a few cells into a fresh folder "
        "and still report the whole study. Its cells must have this grid's settings; cells this folder holds win",
    )
    add_device_option(p)
    p.add_argument("--data-dir", help="data directory for every data set (default: $CERTBNN_DATA, the usual search)")
    p.add_argument(
        "--set",
        dest="train_set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a training setting in every cell, e.g. --set epochs=2 (repeatable)",
    )
    p.add_argument(
        "--eval-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an evaluation setting in every cell, e.g. --eval-set limit=200 (repeatable)",
    )
    p.add_argument("--list", action="store_true", help="list the shipped presets and exit")
    p.add_argument("--dry-run", action="store_true", help="print the cells and their state, run nothing")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(handler=run_reproduce)


def overrides_from(args: argparse.Namespace) -> tuple[dict, dict]:
    """Training and evaluation overrides from --device/--data-dir/--set/--eval-set."""
    train = dict(parse_option(t) for t in args.train_set)
    evaluate = dict(parse_option(t) for t in args.eval_set)
    train["device"] = evaluate["device"] = args.device
    if args.data_dir:
        train["data_dir"] = args.data_dir
        evaluate["data_dir"] = args.data_dir
    return train, evaluate


def run_reproduce(args: argparse.Namespace) -> int:
    from certbnn.errors import ConfigError
    from certbnn.reproduce import list_presets, load_preset, run_grid, select
    from certbnn.reproduce.runner import cell_status, load_kept_cells

    if args.list:
        for name in list_presets():
            print(f"{name:16s} {load_preset(name).description}")
        return 0
    if not args.out:
        raise ConfigError("--out DIR is required (where the grid's runs and RESULTS.md go)")
    train, evaluate = overrides_from(args)
    preset = load_preset(args.preset, train, evaluate)
    cells = select(preset.cells, [p for p in args.only.split(",") if p])
    kept = load_kept_cells(args.keep_from, preset) if args.keep_from else None
    from certbnn.fileio import check_output_dir

    check_output_dir(args.out, "grid")  # not "/", a file nor someone else's folder, --dry-run too
    if args.dry_run:
        from pathlib import Path

        for cell in cells:
            print(f"{cell_status(cell, Path(args.out)):9s} {cell.id}")
        return 0
    results = run_grid(
        preset,
        args.out,
        cells=cells,
        progress=not args.no_progress,
        command=_command(args),
        invocation=_invocation(args),
        kept=kept,
        log=lambda line: print(line, flush=True),
    )
    print(f"wrote {args.out}/results.json and {args.out}/RESULTS.md ({len(results['cells'])} cells)")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this grid (for RESULTS.md); without --only, since
    results.json gathers the cells of every invocation into the same folder."""
    parts = ["certbnn", "reproduce", "--preset", args.preset, "--out", args.out]
    parts += ["--device", args.device] if args.device != "auto" else []
    for flag, values in (("--set", args.train_set), ("--eval-set", args.eval_set)):
        for value in values:
            parts += [flag, value]
    return " ".join(shlex.quote(p) for p in parts)


def _invocation(args: argparse.Namespace) -> str:
    """This invocation exactly: the grid's command plus the --only and --keep-from that chose
    which cells it ran and which it kept (recorded in the cells it trains)."""
    extra = ["--only", args.only] if args.only else []
    extra += ["--keep-from", args.keep_from] if args.keep_from else []
    return " ".join([_command(args), *(shlex.quote(p) for p in extra)])
