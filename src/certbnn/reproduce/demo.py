"""``run_demo(out_dir)``: robust vs standard BNN on the first MNIST-like data set at hand.

The demo is the shipped ``demo`` preset run by :func:`~certbnn.reproduce.run_grid`
(so it resumes and writes the same results.json / RESULTS.md / plots), on MNIST
or else Fashion-MNIST: found locally, or downloaded (checksummed) into the user
cache when there is internet. The other of the two, when present, is the
out-of-distribution set of the uncertainty check.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from certbnn import data
from certbnn.errors import CertbnnError, DataError
from certbnn.reproduce.grid import load_preset
from certbnn.reproduce.runner import run_grid

CANDIDATES = ("mnist", "fashion-mnist")  # same shapes, same radii: the demo settings fit both


def find_demo_dataset(data_dir: str | None = None, *, fetch: bool = True, log: Callable[[str], None] = print) -> str:
    """The first of :data:`CANDIDATES` found locally, else the first one that downloads."""
    for name in CANDIDATES:
        if data.find_dataset(data.get_spec(name), data_dir) is not None:
            return name
    errors = []
    if fetch and data_dir is None:
        for name in CANDIDATES:
            log(f"{name} not found locally; downloading it into {data.cache_root()}")
            try:
                from certbnn.data.download import download_dataset

                download_dataset(data.get_spec(name), data.cache_root())
                return name
            except DataError as exc:
                errors.append(f"{name}: {exc}")
    detail = f" ({'; '.join(errors)})" if errors else ""
    raise CertbnnError(
        f"the demo needs MNIST or Fashion-MNIST and found neither{detail}; "
        f"put one under $CERTBNN_DATA or run `certbnn data download mnist` where there is internet"
    )


def run_demo(
    out_dir: str | Path,
    *,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
    fetch: bool = True,
    overrides: dict[str, Any] | None = None,
    eval_overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train, certify and attack a standard and an IBP-robust BBB posterior; returns the results dict."""
    name = find_demo_dataset(data_dir, fetch=fetch, log=log)
    other = next((c for c in CANDIDATES if c != name), None)
    evaluate = {"device": device, **(eval_overrides or {})}
    if other and data.find_dataset(data.get_spec(other), data_dir) is not None:
        evaluate.setdefault("ood", other)
    if data_dir:
        evaluate["data_dir"] = data_dir
    train = {"dataset": name, "device": device, **({"data_dir": data_dir} if data_dir else {}), **(overrides or {})}
    preset = load_preset("demo", train, evaluate)
    return run_grid(preset, out_dir, progress=progress, log=log, command=f"certbnn demo --out {out_dir}")


def summary(results: dict[str, Any]) -> str:
    """A few lines: clean / PGD / certified accuracy of the standard and the robust BNN."""
    cells = [c for c in results["cells"].values() if c.get("status") == "done"]
    if not cells:
        return "no finished cells"
    first = cells[0]
    rows = first["evaluation"]["per_eps"]
    eps = rows[-1]["eps"]
    label = {"standard": "standard BNN", "ibp": "IBP-robust BNN"}
    lines = [
        f"{first['dataset']}, Bayes by Backprop, {first['model']}, {first['config']['epochs']} epochs on "
        f"{first['num_train']} images; {first['evaluation']['num_points']} test points, "
        f"{first['evaluation']['num_samples']} posterior samples",
        "",
        f"{'':16s} {'clean':>7s} {'PGD@' + str(eps):>9s} {'certified@' + str(eps):>14s} {'ECE':>6s} {'train s':>8s}",
    ]
    for cell in cells:
        row = cell["evaluation"]["per_eps"][-1]
        cert = row["certified_accuracy"].get("paper", next(iter(row["certified_accuracy"].values()), None))
        lines.append(
            f"{label.get(cell['mode'], cell['mode']):16s} {100 * row['clean_accuracy']:6.1f}% "
            f"{100 * row.get('pgd_accuracy', float('nan')):8.1f}% {100 * cert:13.1f}% "
            f"{cell['evaluation']['clean']['ece']:6.3f} {cell['train_seconds']:8.0f}"
        )
    lines += ["", "certified = the paper's protocol (24 posterior samples, IBP bounds); see RESULTS.md for the rest"]
    return "\n".join(lines)
