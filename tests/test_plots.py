"""Plots: what each figure draws is the data it was given, the PNG shows it, and the train and
eval commands write and print them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.image import imread
from tiny_models import write_qa_data

from mlxmoe import plots
from mlxmoe.errors import MlxMoeError


def report(step: int, loads: list[list[float] | None], layers=(0, 2)) -> dict:
    """A metrics.jsonl row as the trainer writes it, with the given per-layer expert load."""
    entries = []
    for layer, load in zip(layers, loads):
        spread = None if load is None else float(np.std(np.array(load) * len(load)))
        entries.append({"layer": layer, "tokens": 0 if load is None else 40, "load": load, "spread": spread})
    spreads = [e["spread"] for e in entries if e["spread"] is not None]
    return {
        "step": step,
        "loss": 6.0 - 0.1 * step,
        "ce": 5.9 - 0.1 * step,
        "aux": 2.0 + 0.01 * step,
        "z": 4.0 - 0.02 * step,
        "tokens_per_s": 100.0,
        "experts": {"spread": float(np.mean(spreads)), "layers": entries},
    }


ROWS = [
    report(2, [[0.5, 0.25, 0.25, 0.0], None]),
    {**report(4, [[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]]), "val_loss": 5.7},
    {**report(6, [[0.0, 0.0, 0.5, 0.5], [0.4, 0.3, 0.2, 0.1]]), "val_loss": 5.5},
]


def read_png(path: Path, fig) -> np.ndarray:
    """The decoded PNG, checked to be the figure's size and not blank."""
    pixels = imread(path)
    width, height = (fig.get_size_inches() * plots.DPI).round().astype(int)
    assert pixels.shape == (height, width, 4), pixels.shape
    colors = np.unique(pixels.reshape(-1, 4).round(2), axis=0)
    assert len(colors) > 20, f"{path} looks empty: {len(colors)} colors"
    return pixels


def pixel_at(pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The PNG's RGB at data point (x, y) of ``ax`` (display coordinates start bottom-left)."""
    px, py = ax.transData.transform((x, y))
    return pixels[pixels.shape[0] - int(round(py)), int(round(px)), :3]


def test_loss_figure_draws_loss_aux_and_z_against_the_step(tmp_path):
    fig = plots.loss_figure(ROWS, "run")
    ax_loss, ax_aux, ax_z = fig.axes
    lines = {line.get_label(): line for line in ax_loss.lines}
    assert set(lines) == {"loss (total)", "cross-entropy", "validation loss"}
    assert list(lines["loss (total)"].get_xdata()) == [2, 4, 6]
    assert list(lines["loss (total)"].get_ydata()) == [r["loss"] for r in ROWS]
    assert list(lines["cross-entropy"].get_ydata()) == [r["ce"] for r in ROWS]
    assert list(lines["validation loss"].get_xdata()) == [4, 6]  # only rows that validated
    assert list(lines["validation loss"].get_ydata()) == [5.7, 5.5]
    assert list(ax_aux.lines[0].get_ydata()) == [r["aux"] for r in ROWS]
    assert list(ax_z.lines[0].get_ydata()) == [r["z"] for r in ROWS]
    assert "aux" in ax_aux.get_title() and "z-loss" in ax_z.get_title()
    path = plots.save(fig, tmp_path / "loss.png")
    pixels = read_png(path, fig)
    # The z curve's first point is drawn in its color, where its marker sits.
    assert np.allclose(pixel_at(pixels, ax_z, 2, ROWS[0]["z"]), (0.839, 0.153, 0.157), atol=0.05)
    assert [p.name for p in tmp_path.iterdir()] == ["loss.png"]  # no temporary file left


def test_heatmap_shows_the_first_and_the_last_report_load(tmp_path):
    panels = plots.training_panels(ROWS)
    assert [title for title, _, _ in panels] == [
        "first report (step 2, spread 0.71)",
        "last report (step 6, spread 0.72)",
    ]
    fig = plots.load_heatmap_figure(panels)
    first, last = fig.axes[:2]
    expected_first = np.array([[0.5, 0.25, 0.25, 0.0], [np.nan] * 4])  # layer 2 saw no tokens
    expected_last = np.array([[0.0, 0.0, 0.5, 0.5], [0.4, 0.3, 0.2, 0.1]])
    np.testing.assert_array_equal(first.images[0].get_array().filled(np.nan), expected_first)
    np.testing.assert_array_equal(last.images[0].get_array().filled(np.nan), expected_last)
    assert [t.get_text() for t in first.get_yticklabels()] == ["0", "2"]  # MoE layer ids
    assert first.images[0].get_clim() == last.images[0].get_clim() == (0.0, 0.5)
    path = plots.save(fig, tmp_path / "load.png")
    pixels = read_png(path, fig)
    viridis = colormaps["viridis"]
    for ax, matrix in ((first, expected_first), (last, expected_last)):
        for (row, expert), value in np.ndenumerate(matrix):
            color = (1.0, 1.0, 1.0) if np.isnan(value) else viridis(value / 0.5)[:3]
            assert np.allclose(pixel_at(pixels, ax, expert, row), color, atol=0.02), (row, expert)


def test_training_plots_read_metrics_jsonl(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    written = plots.training_plots(tmp_path, "run")
    assert written == [tmp_path / "loss.png", tmp_path / "expert_load.png"]
    for path in written:
        assert imread(path).shape[2] == 4
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "metrics.jsonl").write_text(
        json.dumps({k: v for k, v in ROWS[0].items() if k != "experts"}) + "\n"
    )
    assert plots.training_plots(dense) == [dense / "loss.png"]  # no experts, no heatmap
    (dense / "metrics.jsonl").write_text("")
    with pytest.raises(MlxMoeError, match="no report rows"):
        plots.training_plots(dense)


def test_ablation_bars_are_the_table_values(tmp_path):
    rows = [
        {"name": "base", "rouge_l": 0.11, "perplexity": 34.4, "spread": 0.41, "generation_tps": 4.9},
        {"name": "attention", "rouge_l": None, "perplexity": 20.5, "spread": 0.52, "generation_tps": 4.7},
        {"name": "experts", "rouge_l": 0.30, "perplexity": 12.25, "spread": 0.38, "generation_tps": 3.1},
    ]
    fig = plots.ablation_figure(rows)
    assert len(fig.axes) == len(plots.ABLATION_BARS)
    for ax, (key, label, _) in zip(fig.axes, plots.ABLATION_BARS):
        assert label in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "attention", "experts"]
        drawn = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches}
        assert drawn == {i: r[key] for i, r in enumerate(rows) if r[key] is not None}, key
    assert "n/a" in [t.get_text() for t in fig.axes[0].texts]  # attention's missing ROUGE-L
    read_png(plots.save(fig, tmp_path / "bars.png"), fig)


def test_a_failed_save_leaves_neither_a_file_nor_a_temporary(tmp_path, monkeypatch):
    fig = plots.loss_figure(ROWS)

    def broken_savefig(path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(fig, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        plots.save(fig, tmp_path / "loss.png")
    assert list(tmp_path.iterdir()) == []


def run_cli(*args):
    """``mlxmoe ARGS`` in this process (a fresh interpreter would spend seconds on imports)."""
    from click.testing import CliRunner

    from mlxmoe.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def small_qa_data(tmp_path_factory) -> Path:
    return write_qa_data(tmp_path_factory.mktemp("data"), n_train=16, n_valid=4)


@pytest.mark.slow
def test_train_cli_writes_and_prints_the_loss_and_load_plots(qwen2_moe, small_qa_data, tmp_path):
    out = tmp_path / "run"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "train:\n  iters: 4\n  quantize: 0\n  report_every: 2\n  val_every: 0\n"
        "  save_every: 0\n  max_seq_len: 64\n  learning_rate: 2.0e-3\n"
    )
    proc = run_cli("train", "--model", qwen2_moe, "--data", small_qa_data, "--out", out, "--recipe", recipe)
    assert f"plot: {out / 'loss.png'}" in proc.output
    assert f"plot: {out / 'expert_load.png'}" in proc.output
    rows = plots.read_metrics(out)
    read_png(out / "loss.png", plots.loss_figure(rows))
    heatmap = plots.load_heatmap_figure(plots.training_panels(rows))
    read_png(out / "expert_load.png", heatmap)
    assert [row["step"] for row in rows] == [2, 4]
    for ax, row in zip(heatmap.axes, rows):  # the first report, then the last
        layers = row["experts"]["layers"]
        np.testing.assert_allclose(ax.images[0].get_array(), [e["load"] for e in layers])


def test_eval_cli_writes_the_load_heatmap_beside_the_json(qwen2_moe, small_qa_data, tmp_path):
    out = tmp_path / "eval.json"
    command = ["eval", "--model", qwen2_moe, "--data", small_qa_data, "--no-generate", "--json", out]
    proc = run_cli(*command)
    png = tmp_path / "eval_expert_load.png"
    assert f"plot: {png}" in proc.output
    experts = json.loads(out.read_text())["experts"]
    fig = plots.load_heatmap_figure([("eval", *plots.load_matrix(experts))])
    read_png(png, fig)
    png.unlink()
    proc = run_cli(*command, "--no-plots")
    assert not png.exists() and "plot:" not in proc.output
