"""The charts `bench`, `bench.compare` and `diagnose.gpu` write: PNG files drawn with matplotlib.

Figures are made with ``matplotlib.figure.Figure`` and rendered by Agg: no display, no pyplot state
shared between threads. A chart is always the same size in pixels (its figure size at 100 dpi).
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
LINE_CHART_SIZE = (760, 460)
LEGEND_CHARACTERS = 27  # longer series names are cut to fit the legend beside the plot

Series = dict[str, list[tuple[float, float | None]]]


def _figure(width: int, height: int):
    # Imported here, not at the top: matplotlib takes over half a second to import, and every
    # invoke command (`invoke --list` too) imports the modules that draw charts.
    from matplotlib.figure import Figure

    return Figure(figsize=(width / DPI, height / DPI), dpi=DPI)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _drawn(points: list[tuple[float, float | None]]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in points if y is not None and not math.isnan(y)]


def _label(value: float) -> str:
    if value >= 10000:
        return f"{value / 1000:.0f}K"
    return f"{value:g}" if abs(value) >= 1 or value == 0 else f"{value:.2g}"


def line_chart(path: Path, title: str, x_label: str, y_label: str, series: Series,
               log_x: bool = True) -> Path:
    """One chart written to ``path``: a line with points per series, the y axis from zero and the x
    axis on a log2 scale (concurrency 1, 2, 4, ...) ticked at the x values the series have."""
    width, height = LINE_CHART_SIZE
    figure = _figure(width, height)
    figure.subplots_adjust(left=0.1, right=0.72, top=0.9, bottom=0.13)
    axes = figure.add_subplot()
    axes.set_title(title, loc="left", fontsize=11)
    axes.set_xlabel(x_label)
    axes.set_ylabel(y_label)
    xs = sorted({x for points in series.values() for x, _ in _drawn(points)})
    if log_x:
        axes.set_xscale("log", base=2)
    for name, points in series.items():
        drawn = sorted(_drawn(points))
        axes.plot([x for x, _ in drawn], [y for _, y in drawn], marker="o", markersize=4, linewidth=2,
                  label=name[:LEGEND_CHARACTERS])
    if xs:
        axes.set_xticks(xs, [_label(x) for x in xs])
        axes.minorticks_off()
    axes.set_ylim(bottom=0)
    axes.grid(axis="y", color="0.88")
    axes.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    path.write_bytes(_png(figure))
    return path


def panels(series_by_panel: list[Series], *, titles: list[str] | None = None, width: int = 800,
           panel_height: int = 160) -> tuple[bytes, dict[str, str]]:
    """One panel per metric stacked vertically, sharing the time axis; each panel's series
    ``name → [(t, value)]`` from zero up, the same name the same colour in every panel. A gap (None)
    breaks the line. Returns the PNG and the legend ``name → colour``, for the caller to print."""
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
                      marker="o" if alone else "", markersize=3, markevery=alone or None)
        if any(v is not None for points in panel.values() for _, v in points):
            axes.set_ylim(bottom=0)  # from zero: utilisation and power read honestly
    axes_list[-1].set_xlabel("seconds", fontsize=7)
    return _png(figure), legend
