"""PNG plots of training, evaluation and ablation runs (matplotlib, headless).

- ``loss_figure``: loss and cross-entropy (and validation loss), the load-balancing aux loss
  and the router z-loss against the step, from ``metrics.jsonl`` rows.
- ``load_heatmap_figure``: per-layer x per-expert load, one panel per report: the first and
  the last report of a training run, or an evaluation's one window.
- ``ablation_figure``: one bar per configuration for each column of the ablation table.

Each ``*_figure`` builds and returns a ``Figure`` (no pyplot state, nothing shown); ``save``
writes it under a temporary name and renames it, so a killed run never leaves half a PNG.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .atomic import atomic_file  # noqa: E402
from .errors import MlxMoeError  # noqa: E402

DPI = 100
LOSS_PLOT = "loss.png"
LOAD_PLOT = "expert_load.png"
METRICS_FILE = "metrics.jsonl"  # what mlxmoe.train.loop writes
# The ablation table's columns that get a bar chart: (key, title, what is better).
ABLATION_BARS = (
    ("rouge_l", "ROUGE-L F1", "higher is better"),
    ("perplexity", "perplexity", "lower is better"),
    ("spread", "expert spread", "0 = balanced"),
    ("generation_tps", "generation tokens/s", "higher is faster"),
)


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise MlxMoeError(f"{run_dir}: no {METRICS_FILE} to plot")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise MlxMoeError(f"{path}:{number}: not JSON ({exc.msg})") from exc
    if not rows:
        raise MlxMoeError(f"{path}: no report rows to plot")
    return rows


def loss_figure(rows: Sequence[dict[str, Any]], title: str = "training") -> Figure:
    """Three panels against the step: loss, ce and val_loss; aux; z."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    ax_loss, ax_aux, ax_z = fig.subplots(1, 3)
    steps = [row["step"] for row in rows]
    for key, label in (("loss", "loss (total)"), ("ce", "cross-entropy")):
        ax_loss.plot(steps, [row.get(key, math.nan) for row in rows], marker=".", label=label)
    validated = [row for row in rows if row.get("val_loss") is not None]
    if validated:
        ax_loss.plot(
            [row["step"] for row in validated],
            [row["val_loss"] for row in validated],
            marker="o",
            linestyle="--",
            label="validation loss",
        )
    ax_loss.set_title(f"{title}: loss")
    ax_loss.legend()
    ax_aux.plot(steps, [row.get("aux", math.nan) for row in rows], marker=".", color="tab:green")
    ax_aux.set_title("load-balancing aux loss (balanced = top-k)")
    ax_z.plot(steps, [row.get("z", math.nan) for row in rows], marker=".", color="tab:red")
    ax_z.set_title("router z-loss")
    for ax in (ax_loss, ax_aux, ax_z):
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return fig


def load_matrix(experts: dict[str, Any]) -> tuple[list[int], np.ndarray]:
    """(MoE layer ids, [layers, E] load) from a monitor report or an eval report's ``experts``;
    a layer that saw no tokens is a row of NaN."""
    layers = experts["layers"]
    width = max((len(entry["load"]) for entry in layers if entry.get("load")), default=0)
    if not width:
        raise MlxMoeError("the expert report holds no load to plot (no routed tokens)")
    matrix = np.full((len(layers), width), np.nan)
    for i, entry in enumerate(layers):
        if entry.get("load"):
            matrix[i] = entry["load"]
    return [int(entry["layer"]) for entry in layers], matrix


def load_heatmap_figure(panels: Sequence[tuple[str, Sequence[int], np.ndarray]]) -> Figure:
    """One heatmap per (title, layer ids, [layers, E] load), up to three a row; one color
    scale for all."""
    n_layers, n_experts = panels[0][2].shape
    columns = min(len(panels), 3)
    grid_rows = math.ceil(len(panels) / columns)
    width = min(max(2.5 + 0.2 * n_experts, 4.0), 12.0) * columns + 1.5
    height = min(max(1.2 + 0.3 * n_layers, 2.5), 10.0) * grid_rows
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(grid_rows, columns, squeeze=False).ravel())
    top = max(np.nanmax(matrix) for _, _, matrix in panels)
    image = None
    for ax, (title, layers, matrix) in zip(axes, panels):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        rows = np.arange(len(layers))
        step = max(1, len(layers) // 24)  # keep the labels of a 48-layer model legible
        ax.set_yticks(rows[::step], [str(layer) for layer in layers][::step])
        ax.set_ylabel("MoE layer")
    for ax in axes[len(panels) :]:
        ax.remove()
    used = list(axes[: len(panels)])
    fig.colorbar(image, ax=used, label=f"share of routed tokens\n(balanced: 1/{n_experts})")
    return fig


def training_panels(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[int], np.ndarray]]:
    """The first and the last report's expert load of a training run."""
    reports = [row for row in rows if row.get("experts")]
    if not reports:
        return []
    panels = []
    for label, row in (("first report", reports[0]), ("last report", reports[-1])):
        layers, matrix = load_matrix(row["experts"])
        spread = row["experts"].get("spread")
        detail = f", spread {spread:.2f}" if spread is not None else ""
        panels.append((f"{label} (step {row['step']}{detail})", layers, matrix))
    return panels


def training_plots(run_dir: str | Path, title: str | None = None) -> list[Path]:
    """loss.png and, for an MoE, expert_load.png in ``run_dir``, from its metrics.jsonl."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    written = [save(loss_figure(rows, title or run_dir.name), run_dir / LOSS_PLOT)]
    panels = training_panels(rows)
    if panels:
        written.append(save(load_heatmap_figure(panels), run_dir / LOAD_PLOT))
    return written


def eval_plot(experts: dict[str, Any] | None, path: str | Path, title: str = "evaluation") -> Path | None:
    """The expert-load heatmap of an eval report's ``experts``; None for a dense model."""
    if not experts:
        return None
    layers, matrix = load_matrix(experts)
    spread = experts.get("spread")
    detail = f" (spread {spread:.2f})" if spread is not None else ""
    return save(load_heatmap_figure([(f"{title}{detail}", layers, matrix)]), path)


def ablation_figure(rows: Sequence[dict[str, Any]], title: str = "ablation") -> Figure:
    """One panel per ``ABLATION_BARS`` column, one bar per row (by ``name``); a missing value
    (e.g. no ROUGE-L without generation) leaves its slot empty, marked n/a."""
    names = [row["name"] for row in rows]
    fig = Figure(figsize=(4.0 * len(ABLATION_BARS), 4.5), layout="constrained")
    axes = fig.subplots(1, len(ABLATION_BARS))
    colors = [f"C{i}" for i in range(len(names))]
    positions = np.arange(len(names))
    for ax, (key, label, better) in zip(axes, ABLATION_BARS):
        values = [row.get(key) for row in rows]
        present = [i for i, v in enumerate(values) if v is not None]
        bars = ax.bar(positions[present], [values[i] for i in present], color=[colors[i] for i in present])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        for i, value in enumerate(values):
            if value is None:
                ax.text(i, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(positions, names, rotation=30, ha="right")
        ax.set_title(f"{label}\n({better})")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return fig
