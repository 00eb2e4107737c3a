"""Which code made a result, and on which machine.

``code_version()`` (the package version and, in a git checkout, the commit) and
``machine_info(device)`` (CPU, cores, torch and its threads, device) are recorded in
``metrics.json`` (training), ``evaluation.json`` and a grid's ``results.json``, so that a table can
name the code and the machine that produced each figure, even when a grid's cells ran on different
machines. Outside a git checkout (an installed wheel) or without git, ``commit`` is None.
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from certbnn import __version__

__all__ = ["code_version", "machine_info"]


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, str | bool | None]:
    """``{"version", "commit", "dirty"}``: the certbnn version, the git commit of the source tree
    it was imported from (None when that is not a git checkout) and whether tracked files under
    ``src/certbnn`` differed from that commit (None when unknown). Computed once per process, when
    ``certbnn`` is imported (``certbnn/__init__.py`` calls it): the code a long run imported at its
    start is the code that ran, whatever the checkout holds when the run writes its record."""
    source = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".") if commit else None
    return {"version": __version__, "commit": commit, "dirty": None if status is None else bool(status)}


def machine_info(device: str) -> dict[str, Any]:
    """What ran it: ``{"platform", "cpu", "cpu_count", "torch", "torch_threads", "device"}`` and,
    on a CUDA device, ``"gpu"`` (its name). No host name and no path."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device.split(",")[0]))
    return info
