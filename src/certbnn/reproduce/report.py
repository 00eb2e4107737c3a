"""RESULTS.md and plots of a grid (from its ``results.json`` dict alone).

Per experiment: a table like the paper's (rows = inference method, columns =
training mode, cells = clean / PGD / certified accuracy at the last (headline) evaluation
eps), calibration (ECE / NLL), uncertainty (OOD AUROC), wall-clock time per
cell, the certified-accuracy lift of robust over standard training, and plots:
certified accuracy against eps, reliability diagrams, OOD entropy. Experiments
with a sweep get one table row per sweep point instead.

Plots give every curve its own colour and marker (:mod:`certbnn.evaluation.plots`); certified
accuracy against eps is a full curve from the per-point certified radii when the evaluation
computed them (``radius = true``), reliability diagrams carry the number of points per bin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from certbnn.evaluation import plots
from certbnn.fileio import atomic_write_text, save_figure
from certbnn.reproduce.grid import file_stem

ROBUST_LIKELIHOODS = ("ibp", "crown-ibp", "crown")


def dataset_label(entry: dict[str, Any]) -> str:
    """``cifar10 (jpeg-q75 copy)`` when the data came from a ``<name>-<variant>`` folder."""
    name, folder = entry["dataset"], Path(entry.get("data_source", "")).name
    return f"{name} ({folder[len(name) + 1 :]} copy)" if folder.startswith(name + "-") else name


PLOTS = ("certified_vs_eps", "reliability", "ood_entropy", "sweep")


def report_files(experiment_names: list[str]) -> list[str]:
    """Names of every file :func:`write_report` may write (for removing a killed write's temporary files)."""
    return ["RESULTS.md"] + [f"{plot}_{file_stem(name)}.png" for name in experiment_names for plot in PLOTS]


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``RESULTS.md`` and the plots into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    done = [c for c in results.get("cells", {}).values() if c.get("status") == "done"]
    machine = results.get("machine", {})
    lines = [f"# certbnn reproduce: `{results.get('preset')}`", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [
        f"- command: `{results.get('command') or 'certbnn reproduce --preset ' + str(results.get('preset'))}`",
        f"- machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores, torch {machine.get('torch')}, "
        f"{machine.get('torch_threads')} threads), device {machine.get('device')}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"- certbnn {results.get('certbnn_version')}; {len(done)} of {len(results.get('cells', {}))} recorded "
        f"cells finished; {results.get('seconds_total', 0):.0f} s of wall-clock time over the cells",
        "",
    ]
    failed = [c for c in results.get("cells", {}).values() if c.get("status") == "failed"]
    if failed:
        lines += ["**Failed cells** (rerun the command to retry):", ""]
        lines += [f"- `{c['id']}`: {c['error']}" for c in failed] + [""]
    for experiment in results.get("experiments", []):
        name = experiment.get("name", experiment["dataset"])
        cells = [c for c in done if c["experiment"] == name]
        if not cells:
            continue
        if any(c["sweep"] for c in cells):
            lines += _sweep_section(name, cells, out_dir)
        else:
            lines += _grid_section(name, cells, out_dir)
    path = out_dir / "RESULTS.md"
    atomic_write_text(path, "\n".join(lines) + "\n", "report")
    return path


def _ordered(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


def _main_row(cell: dict[str, Any]) -> dict[str, Any]:
    """The evaluation at the last (by convention the headline, largest) eps of the list."""
    return cell["evaluation"]["per_eps"][-1]


def _cert_name(cells: list[dict[str, Any]]) -> str | None:
    names = _ordered([k for c in cells for k in _main_row(c)["certified_accuracy"]])
    return "paper" if "paper" in names else (names[0] if names else None)


def _pct(value: Any) -> str:
    return "-" if not isinstance(value, (int, float)) else f"{100 * value:.1f}"


def _which_points(cell: dict[str, Any]) -> str:
    count = cell["evaluation"]["num_points"]
    return f"{count} evenly spaced" if cell["evaluate_options"].get("points") == "spread" else f"the first {count}"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{value:.0f} s"


def _triple(cell: dict[str, Any] | None, cert: str | None) -> str:
    if cell is None:
        return "-"
    row = _main_row(cell)
    return (
        f"{_pct(row['clean_accuracy'])} / {_pct(row.get('pgd_accuracy'))} / "
        f"{_pct(row['certified_accuracy'].get(cert)) if cert else '-'}"
    )


def _table(methods: list[str], modes: list[str], lookup, render) -> list[str]:
    lines = ["| method | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(render(lookup.get((method, mode))) for mode in modes) + " |")
    return lines + [""]


def _grid_section(name: str, cells: list[dict[str, Any]], out_dir: Path) -> list[str]:
    methods, modes = _ordered([c["method"] for c in cells]), _ordered([c["mode"] for c in cells])
    lookup = {(c["method"], c["mode"]): c for c in cells}
    cert = _cert_name(cells)
    first = cells[0]
    eps_test, eps_train = _main_row(first)["eps"], first["config"]["eps"]
    lines = [
        f"## {name}: {dataset_label(first)}, {first['model']}",
        "",
        f"Accuracy in % on {_which_points(first)} test points: clean / PGD "
        f"(eps {eps_test}, {first['evaluate_options']['pgd_steps']} steps, EOT over "
        f"{first['evaluation']['num_samples']} samples) / certified ({cert} certificate, "
        f"{first['evaluate_options']['bound']} bounds, eps {eps_test}). Training eps {eps_train}; "
        f"{first['config']['epochs']} epochs on {first.get('num_train')} training images.",
        "",
    ]
    lines += _table(methods, modes, lookup, lambda c: _triple(c, cert))
    lift = _lift(methods, lookup, cert)
    if lift:
        lines += [
            "Certified-accuracy lift of robust over standard training (percentage points): " + ", ".join(lift) + ".",
            "",
        ]
    lines += ["Calibration on clean test points, ECE / NLL:", ""]
    lines += _table(
        methods,
        modes,
        lookup,
        lambda c: (
            "-" if c is None else f"{c['evaluation']['clean']['ece']:.3f} / {c['evaluation']['clean']['nll']:.3f}"
        ),
    )
    ood_names = _ordered([k for c in cells for k in c["evaluation"].get("ood", {})])
    if ood_names:
        lines += [f"Uncertainty: AUROC of predictive entropy separating test points from {' / '.join(ood_names)}:", ""]
        lines += _table(
            methods,
            modes,
            lookup,
            lambda c: (
                "-"
                if c is None
                else " / ".join(
                    f"{c['evaluation']['ood'][k]['auroc_entropy']:.3f}" if k in c["evaluation"].get("ood", {}) else "-"
                    for k in ood_names
                )
            ),
        )
    lines += [
        "Seconds: training loop + evaluation; in brackets the whole cell's wall-clock time (data "
        "loading, per-epoch validation and the final test score included) and the time per epoch:",
        "",
    ]
    lines += _table(
        methods,
        modes,
        lookup,
        lambda c: (
            "-"
            if c is None
            else f"{c['train_seconds']:.0f} + {c['eval_seconds']:.0f} ({_seconds(c.get('wall_seconds'))}; "
            f"{c['seconds_per_epoch']:.1f}/epoch)"
        ),
    )
    plots = _grid_plots(name, methods, modes, lookup, out_dir, ood_names)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def _lift(methods: list[str], lookup, cert: str | None) -> list[str]:
    out = []
    for method in methods:
        standard = [c for (m, _), c in lookup.items() if m == method and c["config"]["likelihood"] == "standard"]
        robust = [c for (m, _), c in lookup.items() if m == method and c["config"]["likelihood"] in ROBUST_LIKELIHOODS]
        if standard and robust and cert:
            before = _main_row(standard[0])["certified_accuracy"].get(cert)
            after = _main_row(robust[0])["certified_accuracy"].get(cert)
            if before is not None and after is not None:
                out.append(f"{method} {100 * (after - before):+.1f}")
    return out


def _sweep_section(name: str, cells: list[dict[str, Any]], out_dir: Path) -> list[str]:
    keys = _ordered([k for c in cells for k in c["sweep"]])
    series = _ordered([f"{c['method']}/{c['mode']}" for c in cells])
    points = _ordered([tuple(c["sweep"].get(k) for k in keys) for c in cells])
    lookup = {(f"{c['method']}/{c['mode']}", tuple(c["sweep"].get(k) for k in keys)): c for c in cells}
    cert = _cert_name(cells)
    first = cells[0]
    lines = [
        f"## {name}: {dataset_label(first)}, {first['model']}, sweeping {', '.join(keys)}",
        "",
        f"Accuracy in % (clean / PGD / {cert} certified at eps {_main_row(first)['eps']}) on "
        f"{_which_points(first)} test points; rows are sweep points.",
        "",
    ]
    lines += ["| " + ", ".join(keys) + " | " + " | ".join(series) + " |", "|---|" + "---|" * len(series)]
    for point in points:
        lines.append(
            "| "
            + ", ".join(str(v) for v in point)
            + " | "
            + " | ".join(_triple(lookup.get((s, point)), cert) for s in series)
            + " |"
        )
    eps_list = first["evaluate_options"]["eps"]
    if len(eps_list) > 1 and cert:
        lines += [
            "",
            f"{cert} certified accuracy in % at each test eps:",
            "",
            "| " + ", ".join(keys) + " | series | " + " | ".join(str(e) for e in eps_list) + " |",
            "|---|---|" + "---|" * len(eps_list),
        ]
        for point in points:
            for s in series:
                cell = lookup.get((s, point))
                if cell is not None:
                    rows = cell["evaluation"]["per_eps"]
                    lines.append(
                        "| "
                        + ", ".join(str(v) for v in point)
                        + f" | {s} | "
                        + " | ".join(_pct(r["certified_accuracy"].get(cert)) for r in rows)
                        + " |"
                    )
    lines += [""]
    plot = _sweep_plot(name, keys, series, points, lookup, cert, out_dir)
    return lines + ([f"![{plot}]({plot})", ""] if plot else [])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cell_curves(cells: list[tuple[str, dict[str, Any]]], cert: str | None) -> list[plots.Curve]:
    """One certified-accuracy curve per cell (``(label, cell)`` pairs): the full curve from its
    per-point certified radii (decision certificate) when the evaluation computed them, and
    the ``cert`` certificate at the evaluated eps values."""
    curves = []
    for label, cell in cells:
        radius = cell["evaluation"].get("radius") or {}
        rows = cell["evaluation"]["per_eps"]
        points = [(r["eps"], r["certified_accuracy"].get(cert)) for r in rows] if cert else []
        points = [(e, v) for e, v in points if isinstance(v, float)]
        curves.append(
            plots.Curve(
                label,
                radii=radius.get("per_point"),
                eps_max=radius.get("eps_max"),
                points=points,
                points_label=f"{cert} certificate" if points else "",
            )
        )
    return curves


def _grid_plots(name, methods, modes, lookup, out_dir: Path, ood_names) -> list[str]:
    written = []
    cert = _cert_name(list(lookup.values()))
    cells = [
        (f"{method}/{mode}", lookup[(method, mode)]) for method in methods for mode in modes if (method, mode) in lookup
    ]
    written.append(f"certified_vs_eps_{file_stem(name)}.png")
    plots.certified_plot(
        cell_curves(cells, cert), out_dir / written[-1], title=f"{name}: certified accuracy against eps"
    )

    fig, axes = plots.figure(
        (3.4 * len(modes), 4.6), 2, len(modes), sharex=True, gridspec_kw={"height_ratios": [3, 1.3]}
    )
    for column, mode in enumerate(modes):
        series = [
            (method, lookup[(method, mode)]["evaluation"]["clean"]["reliability"])
            for method in methods
            if (method, mode) in lookup and "reliability" in lookup[(method, mode)]["evaluation"]["clean"]
        ]
        plots.draw_reliability(axes[0][column], axes[1][column], series)
        axes[0][column].set_title(mode, fontsize=9)
    written.append(f"reliability_{file_stem(name)}.png")
    plots.save(fig, out_dir / written[-1])

    plt = _pyplot()
    if ood_names:
        labels, groups = [], {"in-distribution": [], **{k: [] for k in ood_names}}
        for method in methods:
            for mode in modes:
                cell = lookup.get((method, mode))
                if cell is None:
                    continue
                labels.append(f"{method}\n{mode}")
                groups["in-distribution"].append(cell["evaluation"]["clean"]["entropy"])
                for k in ood_names:
                    groups[k].append(cell["evaluation"].get("ood", {}).get(k, {}).get("mean_entropy_out", 0.0))
        fig, ax = plt.subplots(figsize=(max(6, 0.55 * len(labels)), 3.5))
        width = 0.8 / len(groups)
        for g, (label, values) in enumerate(groups.items()):
            ax.bar([i + g * width for i in range(len(labels))], values, width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=6)
        ax.set(ylabel="mean predictive entropy (nats)", title=f"{name}: uncertainty in and out of distribution")
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(f"ood_entropy_{file_stem(name)}.png")
        save_figure(fig, out_dir / written[-1], dpi=110)
        plt.close(fig)
    return written


def _sweep_plot(name, keys, series, points, lookup, cert, out_dir: Path) -> str | None:
    if len(keys) != 1 or cert is None:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [p[0] for p in points]
    for i, s in enumerate(series):
        clean, certified = [], []
        for p in points:
            row = _main_row(lookup[(s, p)]) if (s, p) in lookup else None
            clean.append(row["clean_accuracy"] if row else None)
            certified.append(row["certified_accuracy"].get(cert) if row else None)
        style = plots.curve_style(i)
        ax.plot(xs, certified, marker=style["marker"], color=style["color"], label=f"{s} certified")
        ax.plot(
            xs,
            clean,
            marker=style["marker"],
            markerfacecolor="none",
            linestyle="--",
            color=style["color"],
            label=f"{s} clean",
        )
    ax.set(xlabel=keys[0], ylabel="accuracy", ylim=(0, 1), title=name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = f"sweep_{file_stem(name)}.png"
    save_figure(fig, out_dir / path, dpi=110)
    plt.close(fig)
    return path
