"""Which code made a result: the package version and, in a git checkout, the commit.

``code_version()`` is recorded in ``metrics.json`` (training), ``evaluation.json`` and a grid's
``results.json`` so that a table can name the code that produced it. Outside a git checkout (an
installed wheel) or without git, ``commit`` is None.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from certbnn import __version__

__all__ = ["code_version"]


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
