"""`mlxmoe train`: fine-tune adapters with a router-aware loss."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ._options import STRATEGY_OPTION, recipe_from_options, training_options
from ._ui import console


@click.command()
@click.option("--model", help="Model folder or hub id (overrides the recipe).")
@click.option("--data", help="Folder with train.jsonl [valid.jsonl], or a JSONL file.")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe YAML (see recipes/).")
@STRATEGY_OPTION
@training_options
@click.option("--resume", is_flag=True, help="Continue from OUT's latest checkpoint.")
@click.option("--no-plots", is_flag=True, help="Write no loss.png / expert_load.png.")
def train(
    model,
    data,
    out,
    recipe_file,
    strategy,
    iters,
    batch_size,
    grad_accum,
    max_seq_len,
    learning_rate,
    rank,
    quantize,
    dtype,
    resume,
    no_plots,
) -> None:
    """Fine-tune MODEL's adapters on DATA with a router-aware loss."""
    from ..train import train as run_training

    recipe = recipe_from_options(
        recipe_file,
        model,
        data,
        iters=iters,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        learning_rate=learning_rate,
        rank=rank,
        quantize=quantize,
        dtype=dtype,
        strategy=strategy,
    )
    result = run_training(recipe, out, resume=resume)
    summary = Table(title="training summary", show_header=False)
    summary.add_row("steps", str(result.steps))
    summary.add_row("final loss", f"{result.loss:.4f}" if result.loss is not None else "-")
    if result.val_loss is not None:
        summary.add_row("validation loss", f"{result.val_loss:.4f}")
    summary.add_row("trainable", f"{result.trainable['trainable']:,} ({result.trainable['percent']:.2f}%)")
    summary.add_row("truncated samples", str(result.truncated))
    summary.add_row("adapters", str(result.out_dir / "adapters.safetensors"))
    if result.stopped:
        summary.add_row("stopped early", result.stopped)
    console.print(summary)
    if not no_plots and result.rank == 0:
        from ..errors import MlxMoeError
        from ..plots import training_plots

        try:
            for path in training_plots(result.out_dir):
                console.print(f"plot: {path}", highlight=False, soft_wrap=True)
        except MlxMoeError as exc:
            console.print(f"no plots: {exc}", highlight=False, soft_wrap=True)
    if result.stopped:
        sys.exit(1)
