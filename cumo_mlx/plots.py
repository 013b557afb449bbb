"""The PNG plots cumo-mlx writes: a training run's loss curve and the expert-share heatmap of
`cumo-mlx experts`, drawn with matplotlib (Agg, imported when a plot is drawn: the CLI starts
without it)."""

import json
import math
from pathlib import Path

# The heatmap's cells in pixels: the grid stored in its PNG lets a reader find each cell.
CELL_W, CELL_H, PAD = 72, 28, 10
DPI = 100


def _figure(width: int, height: int):
    """A figure of `width` x `height` pixels, on the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path, metadata=None) -> None:
    """Write the PNG through a temporary file, so a reader never sees half of it."""
    path = Path(path)
    temp = path.with_name(path.name + ".tmp")
    figure.savefig(temp, format="png", dpi=DPI, metadata=metadata)
    temp.replace(path)


def plot_losses(records: list, path) -> None:
    """The loss curve of a training run (total and language loss per step); nothing without records."""
    series = {}
    for key in ("loss", "lm_loss"):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and math.isfinite(r[key])]
        if points:
            series[key] = points
    if not series:
        return
    figure = _figure(800, 480)
    axes = figure.add_subplot()
    for key, points in series.items():
        steps, values = zip(*points)
        axes.plot(steps, values, label=key, marker="o" if len(points) == 1 else None, linewidth=1.5)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    _save(figure, path)


def colour_of(value: float) -> tuple[int, int, int]:
    """The viridis colour (0-255 RGB) of a value in [0, 1], as the heatmap paints it."""
    from matplotlib import colormaps

    rgba = colormaps["viridis"](min(max(float(value), 0.0), 1.0))
    return tuple(int(round(255 * c)) for c in rgba[:3])


def heatmap(stats, path, title: str = "expert share per MoE layer") -> dict:
    """Write a PNG heatmap of a `routes.RouteStats` (rows: layers, columns: experts); returns its grid.

    A cell's colour is its share on a scale from 0 to 1/top-k (the most an expert can get); the
    grid geometry (pixels) and the numbers are stored in the PNG's text chunks ("grid", "stats").
    """
    labels = [layer.name + ("*" if layer.router_only else "") for layer in stats.layers]
    rows, cols = len(stats.layers), max(layer.num_experts for layer in stats.layers)
    vmax = 1.0 / min(layer.top_k for layer in stats.layers)
    footnote = "* last CLIP layer: router only at inference" if any(layer.router_only for layer in stats.layers) else None
    x0 = PAD + 8 * max(len(label) for label in labels) + PAD
    y0 = PAD + 24 + 20  # the title, then the expert header
    width = max(x0 + cols * CELL_W + PAD, PAD + 8 * len(title) + PAD, 2 * PAD + 260)
    legend_y = y0 + rows * CELL_H + PAD
    height = legend_y + 12 + 20 + (18 if footnote else 0) + PAD
    figure = _figure(width, height)
    _draw_cells(figure, stats.shares, labels, cols, vmax, (x0, y0, width, height))
    _draw_legend(figure, vmax, (PAD, legend_y, width - 2 * PAD - 80, width, height))
    figure.text(PAD / width, 1 - PAD / height, title, va="top", fontsize=11)
    if footnote:
        figure.text(PAD / width, 1 - (legend_y + 34) / height, footnote, va="top", fontsize=9)
    grid = {"rows": rows, "cols": cols, "x0": x0, "y0": y0, "cell_w": CELL_W, "cell_h": CELL_H, "vmax": vmax}
    _save(figure, path, metadata={"grid": json.dumps(grid), "stats": json.dumps(stats.to_dict())})
    return grid


def _draw_cells(figure, shares: list, labels: list, cols: int, vmax: float, frame: tuple) -> None:
    """The layer x expert cells at pixel (x0, y0) of a width x height figure, each with its share."""
    import numpy as np

    x0, y0, width, height = frame
    rows = len(labels)
    axes = figure.add_axes(
        (x0 / width, 1 - (y0 + rows * CELL_H) / height, cols * CELL_W / width, rows * CELL_H / height)
    )
    colours = np.full((rows, cols, 3), 220, dtype=np.uint8)  # grey: no such expert in this layer
    for r, layer_shares in enumerate(shares):
        for e, share in enumerate(layer_shares):
            colours[r, e] = colour_of(share / vmax)
            ink = "black" if share / vmax > 0.55 else "white"
            axes.text(e, r, f"{100 * share:.1f}%", ha="center", va="center", color=ink, fontsize=9)
    axes.imshow(colours, aspect="auto", interpolation="nearest", extent=(-0.5, cols - 0.5, rows - 0.5, -0.5))
    axes.set_xticks(range(cols), [f"e{e}" for e in range(cols)])
    axes.set_yticks(range(rows), labels)
    axes.xaxis.tick_top()
    axes.tick_params(length=0, labelsize=9)
    for spine in axes.spines.values():
        spine.set_visible(False)


def _draw_legend(figure, vmax: float, frame: tuple) -> None:
    """The colour scale from 0 to `vmax`: a bar `bar_w` pixels wide at pixel (x, y)."""
    import numpy as np

    x, y, bar_w, width, height = frame
    axes = figure.add_axes((x / width, 1 - (y + 10) / height, bar_w / width, 10 / height))
    axes.imshow(np.linspace(0, 1, 256)[None], cmap="viridis", aspect="auto", interpolation="nearest")
    axes.set_xticks([0, 255], ["0%", f"{100 * vmax:.0f}% (1/top-k)"])
    axes.set_yticks([])
    axes.tick_params(length=0, labelsize=9)
    for spine in axes.spines.values():
        spine.set_visible(False)


def plot_scores(series: dict, path, title: str, ylabel: str = "%", ymax: float = 100.0) -> None:
    """A benchmark's bar chart (`cumo-mlx eval`): a group of bars per category, one bar per figure of
    `series` ({figure: {category: value}}), each bar labelled with its value, on a scale from 0 to
    `ymax` (the best score)."""
    categories = list(dict.fromkeys(category for values in series.values() for category in values))
    if not categories:
        return
    width = max(640, 120 + len(categories) * (24 + 26 * len(series)))
    figure = _figure(width, 480)
    axes = figure.add_subplot()
    step = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [k + (i - (len(series) - 1) / 2) * step for k, category in enumerate(categories) if category in values]
        bars = axes.bar(xs, [values[c] for c in categories if c in values], width=step, label=name)
        axes.bar_label(bars, fmt="%.1f", fontsize=7)
    axes.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0, ha="right" if len(categories) > 4 else "center")
    axes.set_ylim(0, 1.08 * ymax)  # room for the labels of full bars
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(axis="y", alpha=0.3)
    if len(series) > 1:
        axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, path)
