"""The charts `bench`, `bench.compare` and `diagnose.gpu` draw, with matplotlib.

Each function builds a ``matplotlib.figure.Figure`` and returns it (tests read its axes: scale,
labels, lines, bands); ``save`` and ``png`` render one with Agg: no display, no pyplot state shared
between threads. A chart is always the same size in pixels (its figure size at 100 dpi).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

DPI = 100
# matplotlib's tab10 colours under the names `diagnose.gpu` prints beside its chart.
COLOURS = {"blue": "tab:blue", "orange": "tab:orange", "green": "tab:green", "red": "tab:red",
           "purple": "tab:purple", "brown": "tab:brown", "pink": "tab:pink", "grey": "tab:gray",
           "olive": "tab:olive", "cyan": "tab:cyan"}
PALETTE = list(COLOURS.values())
LINE_CHART_SIZE = (760, 460)
BAND_PANEL_SIZE = (760, 300)
LEGEND_CHARACTERS = 27  # longer series names are cut to fit the legend beside the plot

Series = dict[str, list[tuple[float, float | None]]]
# name → [(x, p50, p90, p99)]: a median line and the bands up to p90 and p99 above it.
Bands = dict[str, list[tuple[float, float | None, float | None, float | None]]]
# name → [(percentile 0..100, value)]: a distribution, drawn as its cumulative share.
Distributions = dict[str, list[tuple[float, float]]]


def _figure(width: int, height: int):
    # Imported here, not at the top: matplotlib takes over half a second to import, and every
    # invoke command (`invoke --list` too) imports the modules that draw charts.
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save(figure, path: Path) -> Path:
    path.write_bytes(png(figure))
    return path


def _missing(value: float | None) -> bool:
    return value is None or math.isnan(value)


def _drawn(points: list[tuple[float, float | None]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if not _missing(y)]


def _label(value: float) -> str:
    if value >= 10000:
        return f"{value / 1000:.0f}K"
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def _log2_axis(axes, xs: list[float]) -> None:
    """Concurrency (or rate) on a log2 scale, ticked at the values measured: 1, 2, 4, ... evenly.
    The limits come from those values, so a level with nothing drawn (every request failed) still
    has its place on the axis."""
    xs = sorted(x for x in xs if x > 0)
    axes.set_xscale("log", base=2)
    if xs:
        axes.set_xlim(xs[0] / 2 ** 0.2, xs[-1] * 2 ** 0.2)
        axes.set_xticks(xs, [_label(x) for x in xs])
        axes.minorticks_off()
    else:
        axes.set_xlim(1, 2)  # nothing to place: an empty axis, still on the log2 scale


def _legend(axes) -> None:
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)


def _style(axes, title: str, x_label: str, y_label: str) -> None:
    axes.set_title(title, loc="left", fontsize=10)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    axes.grid(axis="y", color="0.88")


def line_chart(title: str, x_label: str, y_label: str, series: Series, *, log_x: bool = True,
               dashed: Series | None = None):
    """A line with points per series, the y axis from zero, the x axis on a log2 scale ticked at the
    x values the series have. ``dashed`` series (a ceiling, say) are drawn as dashed lines."""
    figure = _figure(*LINE_CHART_SIZE)
    figure.subplots_adjust(left=0.1, right=0.68, top=0.9, bottom=0.13)
    axes = figure.add_subplot()
    _style(axes, title, x_label, y_label)
    for index, (name, points) in enumerate(series.items()):
        drawn = sorted(_drawn(points))
        axes.plot([x for x, _ in drawn], [y for _, y in drawn], marker="o", markersize=4, linewidth=2,
                  color=PALETTE[index % len(PALETTE)], label=name[:LEGEND_CHARACTERS])
    for name, points in (dashed or {}).items():
        drawn = sorted(_drawn(points))
        axes.plot([x for x, _ in drawn], [y for _, y in drawn], linestyle="--", linewidth=1.5,
                  color="0.35", label=name[:LEGEND_CHARACTERS])
    xs = sorted({x for points in (series | (dashed or {})).values() for x, _ in points})
    if log_x:
        _log2_axis(axes, xs)
    axes.set_ylim(bottom=0)
    _legend(axes)
    return figure


def _stacked(count: int):
    """A figure of ``count`` panels (at least one) stacked on one shared x axis, room for legends
    on the right: the figure and its axes, top first."""
    width, panel_height = BAND_PANEL_SIZE
    count = max(1, count)
    height = panel_height * count
    figure = _figure(width, height)
    figure.subplots_adjust(left=0.1, right=0.68, top=1 - 24 / height, bottom=44 / height, hspace=0.45)
    return figure, figure.subplots(count, 1, sharex=True, squeeze=False)[:, 0]


def bands(panels: list[tuple[str, Bands]], x_label: str, y_label: str):
    """One panel per metric, stacked: per series its p50 as a line, a darker band from p50 to p90 and
    a lighter one from p90 to p99, against x on a log2 scale (concurrency 1, 2, 4, ...)."""
    figure, axes_list = _stacked(len(panels))
    xs: set[float] = set()
    for axes, (title, series) in zip(axes_list, panels or [("", {})], strict=True):
        _style(axes, title, "", y_label)
        for index, (name, points) in enumerate(series.items()):
            colour = PALETTE[index % len(PALETTE)]
            xs.update(p[0] for p in points)
            kept = sorted(p for p in points if not _missing(p[1]))
            x = [p[0] for p in kept]
            p50 = [p[1] for p in kept]
            p90 = [p[1] if _missing(p[2]) else p[2] for p in kept]
            p99 = [p90[i] if _missing(p[3]) else p[3] for i, p in enumerate(kept)]
            axes.fill_between(x, p50, p90, color=colour, alpha=0.3, linewidth=0,
                              label=f"{name} p50–p90"[:LEGEND_CHARACTERS])
            axes.fill_between(x, p90, p99, color=colour, alpha=0.12, linewidth=0,
                              label=f"{name} p90–p99"[:LEGEND_CHARACTERS])
            axes.plot(x, p50, color=colour, marker="o", markersize=4, linewidth=2,
                      label=f"{name} p50"[:LEGEND_CHARACTERS])
        axes.set_ylim(bottom=0)
        _legend(axes)
    _log2_axis(axes_list[-1], sorted(xs))
    axes_list[-1].set_xlabel(x_label)
    return figure


def depth_position(depth: float, depths: list[float]) -> float:
    """Where a context depth sits on a log2 axis: itself, or depth 0 half the smallest other depth
    below it (labelled 0), since a log axis has no 0."""
    others = [d for d in depths if d > 0]
    return depth if depth > 0 else (min(others) / 2 if others else 1.0)


def depth(panels: list[tuple[str, dict[str, list[tuple[float, float | None, float | None]]]]]):
    """One panel per speed (prompt processing, generation), stacked: per series its mean tokens/s
    with ± one standard deviation as error bars, against the context depth on a log2 axis ticked at
    the depths measured (depth 0 placed below the smallest other one)."""
    figure, axes_list = _stacked(len(panels))
    depths = sorted({p[0] for _, series in panels for points in series.values() for p in points})
    for axes, (title, series) in zip(axes_list, panels or [("", {})], strict=True):
        _style(axes, title, "", "tokens/s")
        for index, (name, points) in enumerate(series.items()):
            kept = sorted(p for p in points if not _missing(p[1]))
            axes.errorbar([depth_position(p[0], depths) for p in kept], [p[1] for p in kept],
                          yerr=[0 if _missing(p[2]) else p[2] for p in kept], marker="o", markersize=4,
                          linewidth=2, capsize=3, color=PALETTE[index % len(PALETTE)],
                          label=name[:LEGEND_CHARACTERS])
        axes.set_ylim(bottom=0)
        _legend(axes)
    last = axes_list[-1]
    last.set_xscale("log", base=2)
    if depths:
        positions = [depth_position(d, depths) for d in depths]
        last.set_xlim(min(positions) / 2 ** 0.3, max(positions) * 2 ** 0.3)
        last.set_xticks(positions, [_label(d) for d in depths])
        last.minorticks_off()
    last.set_xlabel("context depth (tokens), log2 axis")
    return figure


def curve(title: str, x_label: str, y_label: str, series: dict[str, list[tuple[float, float, str]]]):
    """The trade-off curve: per series its points (x, y), joined in order and each labelled (with its
    concurrency, say); both axes linear from zero, so a point up and to the right is better on both."""
    figure = _figure(*LINE_CHART_SIZE)
    figure.subplots_adjust(left=0.1, right=0.68, top=0.9, bottom=0.13)
    axes = figure.add_subplot()
    _style(axes, title, x_label, y_label)
    axes.grid(axis="x", color="0.88")
    for index, (name, points) in enumerate(series.items()):
        kept = [(x, y, text) for x, y, text in points if not _missing(x) and not _missing(y)]
        colour = PALETTE[index % len(PALETTE)]
        axes.plot([x for x, _, _ in kept], [y for _, y, _ in kept], marker="o", markersize=5, linewidth=2,
                  color=colour, label=name[:LEGEND_CHARACTERS])
        for x, y, text in kept:
            axes.annotate(text, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=colour)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    _legend(axes)
    return figure


def distributions(panels: list[tuple[str, Distributions]], x_label: str, note: str = ""):
    """One panel per metric side by side: per series the share of requests (or gaps) at or under
    each value, a step line from the fastest to the slowest; the value axis logarithmic where the
    values span more than ten times (a long tail and a tight middle both show), else linear."""
    width, height = LINE_CHART_SIZE[0] + 240, LINE_CHART_SIZE[1]
    count = max(1, len(panels))
    figure = _figure(width, height)
    figure.subplots_adjust(left=0.07, right=0.8, top=0.87, bottom=0.13, wspace=0.25)
    axes_list = figure.subplots(1, count, squeeze=False)[0]
    for axes, (title, series) in zip(axes_list, panels or [("", {})], strict=True):
        _style(axes, title, x_label, "share at or under")
        axes.grid(axis="x", color="0.88")
        values: list[float] = []
        for index, (name, points) in enumerate(series.items()):
            kept = sorted((value, q / 100) for q, value in points if not _missing(value))
            values += [value for value, _ in kept]
            axes.step([v for v, _ in kept], [share for _, share in kept], where="post", linewidth=1.8,
                      color=PALETTE[index % len(PALETTE)], label=name[:LEGEND_CHARACTERS])
        if values and min(values) > 0 and max(values) > 10 * min(values):
            axes.set_xscale("log")
        axes.set_ylim(0, 1.02)
    if note:
        figure.suptitle(note, fontsize=8, x=0.07, ha="left")
    _legend(axes_list[-1])
    return figure


def panels_figure(series_by_panel: list[Series], *, titles: list[str] | None = None, width: int = 800,
                  panel_height: int = 160):
    """One panel per metric stacked vertically, sharing the time axis; each panel's series
    ``name → [(t, value)]`` from zero up, the same name the same colour in every panel. A gap (None)
    breaks the line. Returns the figure and the legend ``name → colour``, for the caller to print."""
    names: list[str] = []
    for panel in series_by_panel:
        names += [name for name in panel if name not in names]
    colour_names = list(COLOURS)
    legend = {name: colour_names[index % len(colour_names)] for index, name in enumerate(names)}
    count = max(1, len(series_by_panel))
    height = panel_height * count
    figure = _figure(width, height)
    # Margins in pixels, whatever the number of panels: the first title above, the time axis below.
    figure.subplots_adjust(left=0.08, right=0.98, top=1 - 20 / height, bottom=36 / height, hspace=0.45)
    axes_list = figure.subplots(count, 1, sharex=True, squeeze=False)[:, 0]
    for index, (axes, panel) in enumerate(zip(axes_list, series_by_panel or [{}], strict=True)):
        if titles:
            axes.set_title(titles[index], loc="left", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(axis="y", color="0.88")
        for name, points in panel.items():
            values = [math.nan if v is None else v for _, v in points]
            # NaN where a value is missing: matplotlib leaves a gap there. A value alone between
            # gaps has no line to be part of, so it is drawn as a dot.
            alone = [i for i, v in enumerate(values) if not math.isnan(v)
                     and all(not 0 <= j < len(values) or math.isnan(values[j]) for j in (i - 1, i + 1))]
            axes.plot([t for t, _ in points], values, color=COLOURS[legend[name]], linewidth=1.5,
                      marker="o" if alone else "", markersize=3, markevery=alone or None, label=name)
        if any(v is not None for points in panel.values() for _, v in points):
            axes.set_ylim(bottom=0)  # from zero: utilisation and power read honestly
    axes_list[-1].set_xlabel("seconds", fontsize=7)
    return figure, legend


def panels(series_by_panel: list[Series], *, titles: list[str] | None = None, width: int = 800,
           panel_height: int = 160) -> tuple[bytes, dict[str, str]]:
    """``panels_figure`` rendered: the PNG and the legend."""
    figure, legend = panels_figure(series_by_panel, titles=titles, width=width, panel_height=panel_height)
    return png(figure), legend
