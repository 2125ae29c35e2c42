"""`mlxmoe ablate`: train every LoRA strategy on the same budget, evaluate each and the base."""

from __future__ import annotations

import sys

import click
from rich.table import Table

from ..ablate import DEFAULT_STRATEGIES
from ..evaluate import DEFAULT_MAX_NEW_TOKENS
from ._options import recipe_from_options, training_options
from ._ui import TransientBar, console


@click.command()
@click.option("--model", help="Model folder or hub id (overrides the recipe).")
@click.option("--data", help="Folder with train.jsonl and test.jsonl or valid.jsonl.")
@click.option("--out", required=True, type=click.Path(), help="Output folder (one subfolder per run).")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe YAML (see recipes/).")
@click.option(
    "--strategies",
    default=",".join(DEFAULT_STRATEGIES),
    show_default=True,
    help="Comma-separated LoRA strategies to compare.",
)
@click.option(
    "--eval-data",
    type=click.Path(exists=True),
    help="Held-out JSONL (or folder) to evaluate on (default: DATA's test.jsonl, else valid.jsonl).",
)
@training_options
@click.option("--seed", type=int, help="Seed of every run (data order, LoRA init, dropout).")
@click.option(
    "--max-new-tokens", default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Greedy answer length cap."
)
@click.option("--limit", type=int, help="Evaluate only the first N held-out samples.")
@click.option("--no-plots", is_flag=True, help="Write no PNG plots.")
def ablate(
    model,
    data,
    out,
    recipe_file,
    strategies,
    eval_data,
    iters,
    batch_size,
    grad_accum,
    max_seq_len,
    learning_rate,
    rank,
    quantize,
    dtype,
    seed,
    max_new_tokens,
    limit,
    no_plots,
) -> None:
    """Train each of STRATEGIES on DATA with the same budget and seed, evaluate each and the
    untouched base on the same held-out file, and print the table side by side. A re-run
    with the same OUT skips what is done and resumes an interrupted run."""
    from ..ablate import BASE, EVAL_COLUMNS, TRAIN_COLUMNS
    from ..ablate import ablate as run_ablation

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
        seed=seed,
    )
    bar = TransientBar()
    try:
        result = run_ablation(
            recipe,
            out,
            strategies,
            eval_data=eval_data,
            max_new_tokens=max_new_tokens,
            limit=limit,
            plots=not no_plots,
            eval_progress=bar,
            note=lambda line: console.print(line, highlight=False, soft_wrap=True),
        )
    except KeyboardInterrupt:
        bar.close()
        console.print(
            f"interrupted: run the same command again to continue ({out} keeps every "
            "finished configuration; an interrupted run resumes from its last checkpoint)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(130)
    finally:
        bar.close()

    train = result.settings["recipe"]["train"]
    for title, columns, rows in (
        (f"evaluation on {result.eval_data}", EVAL_COLUMNS, result.rows),
        (
            f"training: {train['iters']} steps each, seed {train['seed']}",
            TRAIN_COLUMNS,
            [row for row in result.rows if row.name != BASE],
        ),
    ):
        table = Table(title=title)
        for i, (_, header, _) in enumerate(columns):
            table.add_column(header, justify="left" if i == 0 else "right", no_wrap=i == 0)
        for row in rows:
            table.add_row(*(row.cell(key, spec) for key, _, spec in columns))
        console.print(table)
    for row in result.rows:
        if row.stopped:
            console.print(f"[yellow]{row.name} stopped early:[/] {row.stopped}")
    for strategy, why in result.skipped.items():
        console.print(f"[yellow]{strategy} skipped:[/] {why}", highlight=False, soft_wrap=True)
    for path in [*result.files, *result.plots]:
        console.print(f"wrote {path}", highlight=False, soft_wrap=True)
