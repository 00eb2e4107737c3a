"""Options shared by several sub-commands, declared once so their help stays the same."""

from __future__ import annotations

import argparse


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device cpu|cuda[:N]|auto`` (default auto: a GPU when present; under torchrun, the process's GPU)."""
    parser.add_argument(
        "--device",
        default="auto",
        help="cpu, cuda[:N] or auto (a GPU when present; under torchrun each process's own GPU; default auto)",
    )
