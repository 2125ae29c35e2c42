"""The recipe overrides that `train` and `ablate` both take, and how they reach the recipe."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..dtypes import DTYPE_CHOICES

# train, eval, ablate, demo and plan: what the model computes in (mlxmoe.dtypes)
DTYPE_OPTION = click.option(
    "--dtype", type=click.Choice(DTYPE_CHOICES),
    help="Model dtype: auto = bfloat16 on a GPU, float32 on the CPU (recipe: train.dtype).")

TRAINING_OPTIONS = (
    click.option("--iters", type=int),
    click.option("--batch-size", type=int),
    click.option("--grad-accum", type=int),
    click.option("--max-seq-len", type=int),
    click.option("--learning-rate", type=float),
    click.option("--rank", type=int, help="LoRA rank."),
    click.option("--quantize", type=click.Choice(["4", "8", "none"]), help="Bits of the frozen base."),
    DTYPE_OPTION,
)


def training_options(command: Callable) -> Callable:
    for option in reversed(TRAINING_OPTIONS):
        command = option(command)
    return command


def recipe_from_options(recipe_file, model, data, *, iters, batch_size, grad_accum, max_seq_len,
                        learning_rate, rank, quantize, dtype=None, strategy=None, seed=None):
    """The recipe file (or the defaults) with the command line's values on top."""
    from ..recipe import load_recipe

    recipe = load_recipe(
        recipe_file,
        lora={"strategy": strategy, "rank": rank},
        train={
            "iters": iters, "batch_size": batch_size, "grad_accum": grad_accum,
            "max_seq_len": max_seq_len, "learning_rate": learning_rate, "seed": seed,
            "quantize": None if quantize is None else (0 if quantize == "none" else int(quantize)),
            "dtype": dtype,
        },
    )
    if model:
        recipe.model = model
    if data:
        recipe.data.path = data
    return recipe
