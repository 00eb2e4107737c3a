"""Figures of evaluations: certified accuracy against eps, reliability diagrams with bin counts.

Every figure is a matplotlib ``Figure`` on the Agg canvas (no pyplot, no global backend
change), written atomically by :func:`certbnn.fileio.save_figure`. Curves get a distinct
colour *and* marker each (:func:`curve_style`), so they stay apart in greyscale too.

Certified accuracy from radii: a point counts at radius ``eps`` when its certified radius
``r`` satisfies ``r >= eps`` and ``r > 0`` (radius 0 means nothing was certified), so the
curve is the survival function of the radii, non-increasing in ``eps`` by construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from certbnn.fileio import make_dir, save_figure

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
#: colour-blind-safe qualitative palette (Okabe-Ito), then matplotlib's tab10 for more curves
COLOURS = (
    "#0072B2",
    "#D55E00",
    "#009E73",
    "#CC79A7",
    "#E69F00",
    "#56B4E9",
    "#000000",
    "#F0E442",
    "tab:brown",
    "tab:olive",
    "tab:gray",
    "tab:cyan",
)


def curve_style(index: int) -> dict[str, Any]:
    """Colour and marker of curve ``index``: distinct for the first ``len(COLOURS)`` curves."""
    return {"color": COLOURS[index % len(COLOURS)], "marker": MARKERS[index % len(MARKERS)]}


def certified_curve(radii: Sequence[float] | np.ndarray, eps: Sequence[float] | np.ndarray) -> np.ndarray:
    """Fraction of points certified at each radius in ``eps``: ``mean(r >= e and r > 0)``
    over the per-point certified radii ``r`` (a point not certified or misclassified has
    ``r = 0``). Non-increasing in ``eps`` (for sorted ``eps``)."""
    r = np.asarray(radii, dtype=np.float64).reshape(-1)
    e = np.asarray(eps, dtype=np.float64).reshape(-1)
    if r.size == 0:
        return np.zeros_like(e)
    certified = (r[None, :] >= e[:, None]) & (r[None, :] > 0)
    return certified.mean(axis=1)


@dataclass
class Curve:
    """One line of a certified-accuracy plot: ``radii`` (per point, drawn as a full curve up to
    ``eps_max``) and/or ``points`` ((eps, value) pairs of a certificate evaluated at a few radii)."""

    label: str
    radii: Sequence[float] | None = None
    eps_max: float | None = None
    points: Sequence[tuple[float, float]] = ()
    points_label: str = ""


def figure(size: tuple[float, float] = (5.0, 3.6), rows: int = 1, cols: int = 1, **grid):
    """A Figure on the Agg canvas and its axes grid (a 2-d array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **grid)
    return fig, axes


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    path = Path(path)
    make_dir(path.parent, "plot folder")
    fig.tight_layout()
    return save_figure(fig, path, dpi=dpi)


def draw_certified_curves(ax, curves: Sequence[Curve], *, grid_points: int = 400) -> None:
    """Draw every curve in its own colour and marker: the radii as a solid step curve over
    ``[0, eps_max]`` (markers every few steps), the evaluated points as unfilled markers on
    a dashed line."""
    for i, curve in enumerate(curves):
        style = curve_style(i)
        if curve.radii is not None and len(curve.radii):
            top = float(curve.eps_max or max(curve.radii) or 1.0)
            grid = np.linspace(0.0, top, grid_points)
            ax.plot(
                grid,
                certified_curve(curve.radii, grid),
                color=style["color"],
                marker=style["marker"],
                markevery=max(1, grid_points // 8),
                markersize=5,
                linewidth=1.8,
                drawstyle="steps-post",
                label=f"{curve.label}: from certified radii",
            )
        if curve.points:
            xs, ys = zip(*curve.points)
            ax.plot(
                xs,
                ys,
                color=style["color"],
                marker=style["marker"],
                markersize=7,
                markerfacecolor="none",
                markeredgewidth=1.5,
                linestyle="--",
                linewidth=1.0,
                label=f"{curve.label}" + (f": {curve.points_label}" if curve.points_label else ""),
            )
    ax.set_xlabel("eps (l_inf radius, pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=6.5)


def certified_plot(curves: Sequence[Curve], path: str | Path, title: str = "") -> Path:
    """PNG of :func:`draw_certified_curves`; returns the written path."""
    fig, axes = figure((6.0, 4.0))
    draw_certified_curves(axes[0][0], curves)
    if title:
        axes[0][0].set_title(title, fontsize=9)
    return save(fig, path)


def _edges(bins: Mapping[str, Any]) -> np.ndarray:
    count = np.asarray(bins["count"])
    edges = bins.get("edges")
    return np.asarray(edges, dtype=np.float64) if edges is not None else np.linspace(0, 1, len(count) + 1)


def draw_reliability(ax, count_ax, series: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """Reliability curves (accuracy against mean confidence of the non-empty bins, one
    colour/marker per series) on ``ax``, and below them on ``count_ax`` the number of points
    per confidence bin (log scale, each bar annotated with its count). ``bins`` hold
    ``confidence``, ``accuracy``, ``count`` (and optionally ``edges``; default equal width)."""
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8, label="perfect calibration")
    width = 1.0 / max(1, len(series))
    top = 1
    for i, (label, bins) in enumerate(series):
        style = curve_style(i)
        count = np.asarray(bins["count"], dtype=np.int64)
        filled = count > 0
        conf, acc = np.asarray(bins["confidence"])[filled], np.asarray(bins["accuracy"])[filled]
        ax.plot(
            conf,
            acc,
            color=style["color"],
            marker=style["marker"],
            markersize=4,
            linewidth=1.2,
            label=f"{label} (n={int(count.sum())})",
        )
        edges = _edges(bins)
        left, step = edges[:-1], np.diff(edges)
        bars = count_ax.bar(
            left + step * width * i,
            count,
            width=step * width,
            align="edge",
            color=style["color"],
            edgecolor="black",
            linewidth=0.3,
            label=label,
        )
        for bar, n in zip(bars, count):
            if n > 0:
                count_ax.annotate(
                    str(int(n)),
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=5,
                    rotation=90 if len(series) > 1 else 0,
                )
        top = max(top, int(count.max(initial=0)))
    ax.set(xlim=(0, 1), ylim=(-0.02, 1.02), ylabel="accuracy")
    ax.tick_params(labelbottom=False)
    ax.legend(fontsize=6, loc="upper left")
    count_ax.set_yscale("log")
    count_ax.set_ylim(0.8, top * 6)  # head room for the count labels
    count_ax.set(xlim=(0, 1), xlabel="confidence (max predictive probability)", ylabel="points per bin")


def reliability_plot(
    series: Sequence[tuple[str, Mapping[str, Any]]],
    path: str | Path,
    title: str = "",
    size: tuple[float, float] = (4.6, 5.0),
) -> Path:
    """PNG of :func:`draw_reliability`: the diagram above, bin counts below."""
    fig, axes = figure(size, 2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.3]})
    draw_reliability(axes[0][0], axes[1][0], series)
    if title:
        axes[0][0].set_title(title, fontsize=9)
    return save(fig, path)


def draw_front(
    ax,
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    front: Sequence[tuple[str, float, float]],
    *,
    target: tuple[float | None, float | None] = (None, None),
) -> None:
    """Scatter of ``(x, y)`` points, one colour and marker per series (``(label, points)``); the
    ``front`` points (``(label, x, y)``) joined by a black line in order of ``x`` and numbered 1, 2,
    ... in the given order (points at one place share a tag ``1,2``), the legend (right of the axes)
    keying each number to its label; the ``target`` ``(x, y)`` as dotted lines."""
    for i, (label, points) in enumerate(series):
        if not points:
            continue
        style = curve_style(i)
        xs, ys = zip(*points)
        ax.scatter(
            xs,
            ys,
            color=style["color"],
            marker=style["marker"],
            s=34,
            edgecolors="black",
            linewidths=0.4,
            zorder=3,
            label=f"{label} ({len(points)})",
        )
    if front:
        placed: dict[tuple[float, float], list[str]] = {}
        for number, (_, x, y) in enumerate(front, 1):
            placed.setdefault((x, y), []).append(str(number))
        line = sorted(placed, key=lambda p: (p[0], -p[1]))
        ax.plot(
            [x for x, _ in line], [y for _, y in line], color="black", linewidth=1.0, zorder=2, label="Pareto front"
        )
        for (x, y), numbers in placed.items():
            ax.annotate(",".join(numbers), (x, y), xytext=(4, 4), textcoords="offset points", fontsize=7, weight="bold")
        for number, (label, _, _) in enumerate(front, 1):
            ax.plot([], [], linestyle="none", label=f"{number}: {label}")  # a legend line without a handle
    target_x, target_y = target
    if target_x is not None:
        ax.axvline(target_x, color="grey", linestyle=":", linewidth=1.0, label="target")
    if target_y is not None:
        ax.axhline(
            target_y, color="grey", linestyle=":", linewidth=1.0, label=None if target_x is not None else "target"
        )
    ax.margins(x=0.08, y=0.08)  # room for the tags
    ax.grid(alpha=0.3)
    if series or front:
        ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


def front_plot(
    series: Sequence[tuple[str, Sequence[tuple[float, float]]]],
    front: Sequence[tuple[str, float, float]],
    path: str | Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    target: tuple[float | None, float | None] = (None, None),
) -> Path:
    """PNG of :func:`draw_front` with the given axis labels; returns the written path."""
    fig, axes = figure((9.0, 5.0))
    ax = axes[0][0]
    draw_front(ax, series, front, target=target)
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    return save(fig, path)
