"""The ``certbnn`` command line: one sub-command per task.

Each sub-command lives in its own module exposing ``register(subparsers)``,
which adds its parser and sets ``handler`` (a function ``args -> int``) as a
default. Errors derived from :class:`certbnn.errors.CertbnnError` become one
line on stderr and exit status 1; usage errors exit with status 2 (argparse).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from certbnn import __version__, distributed
from certbnn.cli import data_cmd, demo_cmd, evaluate_cmd, reproduce_cmd, train_cmd
from certbnn.errors import CertbnnError

_COMMAND_MODULES = (demo_cmd, data_cmd, train_cmd, evaluate_cmd, reproduce_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="certbnn",
        description=(
            "Train Bayesian neural networks that are certifiably robust to adversarial "
            "input perturbations, then certify, attack and calibrate them."
        ),
        epilog="Run `certbnn COMMAND --help` for the options of one command.",
    )
    parser.add_argument("--version", action="version", version=f"certbnn {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in _COMMAND_MODULES:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``certbnn`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    prefix = ""
    try:
        if distributed.launched_by_torchrun():  # torchrun: join the group; rank 0 alone prints
            comm = distributed.init_from_env(getattr(args, "device", None) or "cpu")
            if comm is not None and not comm.is_main:
                prefix = f"[rank {comm.rank}] "
                sys.stdout = open(os.devnull, "w")
        return int(handler(args) or 0)
    except CertbnnError as exc:
        print(f"certbnn: {prefix}error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("certbnn: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `certbnn ... | head`: the reader left, nothing to report
        sys.stdout = open(os.devnull, "w")
        return 0
    finally:
        distributed.shutdown()
