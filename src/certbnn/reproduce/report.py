"""RESULTS.md and plots of a grid (from its ``results.json`` dict alone).

Per experiment: a table like the paper's (rows = inference method, columns =
training mode, cells = clean / PGD / certified accuracy at the last (headline) evaluation
eps), calibration (ECE / NLL), uncertainty (OOD AUROC), wall-clock time per
cell, the certified-accuracy lift of robust over standard training, and plots:
certified accuracy against eps, reliability diagrams, OOD entropy. Experiments
with a sweep get one table row per sweep point instead.

With ``front`` true in the results (``[preset] front = true``), a last section shows per data
set the front of clean against certified accuracy (the tables' headline certificate and eps)
over every finished cell of every experiment: a scatter plot ``front.png`` (``front_<dataset>.png``
when the preset has several data sets) with the Pareto-optimal cells joined and numbered, a
table of those cells, and, given a ``target``, the best cell meeting it or else the closest.

Plots give every curve its own colour and marker (:mod:`certbnn.evaluation.plots`); certified
accuracy against eps is a full curve from the per-point certified radii when the evaluation
computed them (``radius = true``), reliability diagrams carry the number of points per bin.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from certbnn.evaluation import plots
from certbnn.fileio import atomic_write_text, save_figure
from certbnn.reproduce.grid import CELL_REF, file_stem

ROBUST_LIKELIHOODS = ("ibp", "crown-ibp", "crown")


def dataset_label(entry: dict[str, Any]) -> str:
    """``cifar10 (jpeg-q75 copy)`` when the data came from a ``<name>-<variant>`` folder."""
    name, folder = entry["dataset"], Path(entry.get("data_source", "")).name
    return f"{name} ({folder[len(name) + 1 :]} copy)" if folder.startswith(name + "-") else name


PLOTS = ("certified_vs_eps", "reliability", "ood_entropy", "sweep")


def report_files(experiment_names: list[str], datasets: Sequence[str] = ()) -> list[str]:
    """Names of every file :func:`write_report` may write (for removing a killed write's temporary
    files), the front plots of ``datasets`` (the experiments' ``dataset`` values) included."""
    per_experiment = [f"{plot}_{file_stem(name)}.png" for name in experiment_names for plot in PLOTS]
    return ["RESULTS.md", *per_experiment, "front.png", *(front_file(d, []) for d in datasets)]


def front_file(dataset: str, datasets: Sequence[str]) -> str:
    """The front plot of ``dataset``: ``front.png`` when it is the preset's only data set
    (``datasets``), else ``front_<dataset>.png``."""
    return "front.png" if list(datasets) == [dataset] else f"front_{file_stem(dataset)}.png"


def write_report(results: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``RESULTS.md`` and the plots into ``out_dir``; returns the Markdown path."""
    out_dir = Path(out_dir)
    done = [c for c in results.get("cells", {}).values() if c.get("status") == "done"]
    lines = [f"# certbnn reproduce: `{results.get('preset')}`", ""]
    if results.get("description"):
        lines += [results["description"], ""]
    lines += [
        f"- command: `{results.get('command') or 'certbnn reproduce --preset ' + str(results.get('preset'))}`",
        *_invocation_lines(done),
        *_machine_lines(results.get("machine", {}), done),
        f"- certbnn {results.get('certbnn_version')}; {len(done)} of {len(results.get('cells', {}))} recorded "
        f"cells finished; {results.get('seconds_total', 0):.0f} s of wall-clock time over the cells",
        f"- code: {_code_line(results)}",
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
    if results.get("front") is True:
        lines += _front_section(results.get("experiments", []), done, results.get("target"), out_dir)
    path = out_dir / "RESULTS.md"
    atomic_write_text(path, "\n".join(lines) + "\n", "report")
    return path


def _commit(code: Any) -> str:
    if not isinstance(code, dict) or not code.get("commit"):
        return "unrecorded"
    return str(code["commit"])[:10] + (" (with local changes)" if code.get("dirty") else "")


def _machine(machine: dict[str, Any]) -> str:
    return (
        f"{machine.get('cpu')} ({machine.get('cpu_count')} cores, torch {machine.get('torch')}, "
        f"{machine.get('torch_threads')} threads), device {machine.get('device')}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else "")
    )


def _invocation_lines(cells: list[dict[str, Any]]) -> list[str]:
    """The exact command lines (with ``--only``/``--keep-from``) that trained the cells, when any
    cell records one (``invocation``; cells made before it was recorded count as unrecorded)."""
    lines = [c.get("invocation") or "" for c in cells]
    if not any(lines):
        return []
    counts = {line: lines.count(line) for line in sorted(dict.fromkeys(lines), key=lambda line: not line)}
    tally = "; ".join(
        f"{f'`{line}`' if line else 'unrecorded'} ({n} cell{'s' if n != 1 else ''})" for line, n in counts.items()
    )
    return [f"- cells trained by: {tally}"]


def _machine_lines(last_run: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    """Where the cells ran. A grid resumed on another machine holds cells from both, so each cell's
    own record (``train_machine``, ``evaluation.machine``) is counted; results without them (made
    before they were recorded) show the machine of the last run alone, as they always did."""
    trained = [c.get("train_machine") for c in cells]
    evaluated = [c.get("evaluation", {}).get("machine") for c in cells]
    if not any(trained + evaluated):
        return [f"- machine: {_machine(last_run)}"]

    def tally(machines: list[Any]) -> str:
        names = [_machine(m) if isinstance(m, dict) and m else "unrecorded" for m in machines]
        counts = {name: names.count(name) for name in sorted(set(names))}
        return "; ".join(f"{name}: {n} cell{'s' if n != 1 else ''}" for name, n in counts.items())

    return [
        f"- machine of the last run: {_machine(last_run)}",
        f"- cells trained on: {tally(trained)}",
        f"- cells evaluated on: {tally(evaluated)}",
    ]


def _code_line(results: dict[str, Any]) -> str:
    """The commits that trained and evaluated the cells, and the one that wrote this report."""
    cells = [c for c in results.get("cells", {}).values() if c.get("status") == "done"]
    trained = sorted({_commit(c.get("train_code")) for c in cells})
    evaluated = sorted({_commit(c.get("evaluation", {}).get("code")) for c in cells})
    return (
        f"report written by {_commit(results.get('code'))}; cells trained by {', '.join(trained) or '-'}; "
        f"evaluated by {', '.join(evaluated) or '-'}"
    )


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


def _training_phrase(cells: list[dict[str, Any]]) -> str:
    """Epochs and training images of the first cell, then those of the methods that differ, and
    which methods start from another method's cell (``init_from = "cell:M"``)."""
    first = cells[0]
    base = (first["config"]["epochs"], first.get("num_train"))
    others: dict[tuple, list[str]] = {}
    for c in cells:
        key = (c["config"]["epochs"], c.get("num_train"))
        if key != base and c["method"] not in others.setdefault(key, []):
            others[key].append(c["method"])
    text = f"{base[0]} epochs on {base[1]} training images"
    if others:
        text += " (" + "; ".join(f"{', '.join(m)}: {e} on {n}" for (e, n), m in others.items()) + ")"
    starts: dict[str, list[str]] = {}
    for c in cells:
        ref = c["config"].get("init_from")
        start = ref[len(CELL_REF) :] if isinstance(ref, str) and ref.startswith(CELL_REF) else None
        if start is not None and c["method"] not in starts.get(start, []):
            starts.setdefault(start, []).append(c["method"])
    for start, methods in starts.items():
        text += f"; {', '.join(methods)} start{'s' if len(methods) == 1 else ''} from the {start} cell of the same mode"
    return text


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
        f"{_training_phrase(cells)}.",
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
    lines += _chain_lines([c for c in cells if c.get("chain")])
    plots = _grid_plots(name, methods, modes, lookup, out_dir, ood_names)
    lines += [f"![{p}]({p})" for p in plots] + [""]
    return lines


def _chain_lines(cells: list[dict[str, Any]]) -> list[str]:
    """One line per Markov chain (HMC cells): did it move? A chain whose samples are all one network
    gives the row of its starting point, whatever the method's name."""
    if not cells:
        return []
    lines = ["Markov chains: acceptance after burn-in, distinct stored samples, distance travelled from the start:", ""]
    for c in cells:
        chain = c["chain"]
        rate = chain.get("accept_rate_after_burnin")
        frozen = " **(frozen: every sample is the starting network)**" if chain["distinct_samples"] == 1 else ""
        lines.append(
            f"- {c['method']} / {c['mode']}: acceptance {_pct(rate) if rate is not None else '-'} %, "
            f"{chain['distinct_samples']} of {chain['stored_samples']} samples distinct, last sample "
            f"{chain['distance_from_start']:.2g} of ||w0|| from the start{frozen}"
        )
    return [*lines, ""]


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


TARGET_SLACK = 1e-6  # accuracies computed in float32 may miss a target such as 0.9 by rounding alone


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (in input order) of the Pareto-optimal points, both coordinates maximised: no
    other point is at least as large in both and larger in one. Equal points are all kept."""
    return [i for i, (x, y) in enumerate(points) if not any(a >= x and b >= y and (a > x or b > y) for a, b in points)]


def target_sentence(target: dict[str, float], scored: list[tuple[str, float, float]]) -> str:
    """The target line of the front: the best of the ``(cell id, clean, certified)`` that meet
    every given ``clean`` / ``certified`` threshold (highest certified, then clean), else the
    closest: the one whose largest shortfall is smallest."""
    keys = [k for k in ("clean", "certified") if k in target]
    wanted = ", ".join(f"{k} >= {100 * target[k]:.1f} %" for k in keys)

    def shortfall(entry: tuple[str, float, float]) -> float:
        value = {"clean": entry[1], "certified": entry[2]}
        return max(target[k] - value[k] for k in keys)

    def numbers(entry: tuple[str, float, float]) -> str:
        return f"clean {_pct(entry[1])} %, certified {_pct(entry[2])} %"

    met = [e for e in scored if shortfall(e) <= TARGET_SLACK]
    if met:
        best = max(met, key=lambda e: (e[2], e[1]))
        return f"Target ({wanted}): met by `{best[0]}` ({numbers(best)}; {len(met)} of {len(scored)} cells meet it)."
    closest = min(scored, key=lambda e: (shortfall(e), -e[2], -e[1]))
    return (
        f"Target ({wanted}): not met; closest: `{closest[0]}` ({numbers(closest)}; "
        f"{100 * shortfall(closest):.1f} points short)."
    )


class _Scored(NamedTuple):
    """A finished cell placed on the front: its headline row, clean and certified accuracy."""

    cell: dict[str, Any]
    row: dict[str, Any]
    clean: float
    certified: float


def _front_section(
    experiments: list[dict[str, Any]], done: list[dict[str, Any]], target: dict[str, float] | None, out_dir: Path
) -> list[str]:
    """The front section: per data set of ``experiments``, the cells of ``done`` with a headline certificate."""
    dataset_of = {e.get("name", e["dataset"]): str(e["dataset"]) for e in experiments}
    datasets = _ordered(list(dataset_of.values()))
    body: list[str] = []
    for dataset in datasets:
        groups = [
            (name, [c for c in done if c["experiment"] == name]) for name, d in dataset_of.items() if d == dataset
        ]
        cells = [c for _, group in groups for c in group]
        cert = _cert_name(cells)
        scored: dict[str, list[_Scored]] = {}
        for name, group in groups:
            for c in group:
                row = _main_row(c)
                value = row["certified_accuracy"].get(cert)
                if isinstance(value, (int, float)):
                    scored.setdefault(name, []).append(_Scored(c, row, row["clean_accuracy"], value))
        if not scored:
            continue
        if len(datasets) > 1:
            body += [f"### {dataset_label(cells[0])}", ""]
        skipped = len(cells) - sum(map(len, scored.values()))
        body += _front_dataset(front_file(dataset, datasets), scored, skipped, cert, target, out_dir)
    return ["## Clean vs certified front", "", *body] if body else []


def _front_dataset(
    path: str,
    scored: dict[str, list[_Scored]],
    skipped: int,
    cert: str,
    target: dict[str, float] | None,
    out_dir: Path,
) -> list[str]:
    """Text, Pareto table, target line and plot ``path`` of one data set's ``scored`` cells (by experiment)."""
    every = [s for group in scored.values() for s in group]
    front = [every[i] for i in pareto_front([(s.clean, s.certified) for s in every])]
    front.sort(key=lambda s: (s.certified, s.clean), reverse=True)
    eps = _ordered([str(s.row["eps"]) for s in every])
    first = every[0].cell
    lines = [
        f"Every finished cell of {', '.join(scored)} on {dataset_label(first)}: clean accuracy against "
        f"{cert}-certificate certified accuracy at eps {' / '.join(eps)} (the tables' headline), on "
        f"{_which_points(first)} test points. The Pareto-optimal cells (no other cell at least as good "
        "in both and better in one) are joined by the line and numbered as listed below, by certified accuracy.",
        "",
    ]
    if len(eps) > 1:
        lines += [
            f"**The cells differ in headline eps ({', '.join(eps)}): compare certified accuracies with care.**",
            "",
        ]
    if skipped:
        lines += [f"{skipped} finished cell(s) without a {cert} certificate are left out.", ""]
    certs = _ordered([k for s in front for k in s.row["certified_accuracy"]])
    pgd = any("pgd_accuracy" in s.row for s in front)
    header = ["#", "cell", "clean %", *(["PGD %"] if pgd else []), *(f"{k} certified %" for k in certs), "train s"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
    for number, s in enumerate(front, 1):
        seconds = s.cell.get("train_seconds")
        values = [str(number), f"`{s.cell['id']}`", _pct(s.clean)]
        values += [_pct(s.row.get("pgd_accuracy"))] if pgd else []
        values += [_pct(s.row["certified_accuracy"].get(k)) for k in certs]
        values += [f"{seconds:.0f}" if isinstance(seconds, (int, float)) else "-"]
        lines.append("| " + " | ".join(values) + " |")
    lines.append("")
    if target:
        lines += [target_sentence(target, [(s.cell["id"], s.clean, s.certified) for s in every]), ""]
    plots.front_plot(
        [(name, [(100 * s.clean, 100 * s.certified) for s in group]) for name, group in scored.items()],
        [(s.cell["id"], 100 * s.clean, 100 * s.certified) for s in front],  # numbered like the table's rows
        out_dir / path,
        xlabel="clean accuracy (%)",
        ylabel=f"certified accuracy (%), {cert} certificate at eps {' / '.join(eps)}",
        title=f"{first['dataset']}: clean vs certified accuracy, every finished cell",
        target=(
            100 * target["clean"] if target and "clean" in target else None,
            100 * target["certified"] if target and "certified" in target else None,
        ),
    )
    return lines + [f"![{path}]({path})", ""]
