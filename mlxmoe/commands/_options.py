"""The recipe overrides that `train` and `ablate` both take, and how they reach the recipe."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..adapt.strategies import STRATEGIES
from ..dtypes import DTYPE_CHOICES
from ..quantize import NO_QUANTIZATION, SUPPORTED_BITS


class Bits(click.Choice):
    """``--quantize``: 4 or 8 bits of the frozen base, or ``none``, given to the API as
    ``NO_QUANTIZATION`` (0: float weights). An option left out stays None: the recipe's or the
    adapter's choice."""

    def __init__(self) -> None:
        super().__init__([*map(str, SUPPORTED_BITS), "none"])

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        choice = super().convert(value, param, ctx)
        return NO_QUANTIZATION if choice == "none" else int(choice)


BITS = Bits()

# train, eval, ablate, demo and plan: what the model computes in (mlxmoe.dtypes)
DTYPE_OPTION = click.option(
    "--dtype", type=click.Choice(DTYPE_CHOICES),
    help="Model dtype: auto = bfloat16 on a GPU, float32 on the CPU (recipe: train.dtype).")

# train and plan: where LoRA goes (adapt.strategies); the API names the choices when refusing one
STRATEGY_OPTION = click.option("--strategy", help=" | ".join(STRATEGIES))

TRAINING_OPTIONS = (
    click.option("--iters", type=int),
    click.option("--batch-size", type=int),
    click.option("--grad-accum", type=int),
    click.option("--max-seq-len", type=int),
    click.option("--learning-rate", type=float),
    click.option("--rank", type=int, help="LoRA rank."),
    click.option("--quantize", type=BITS, help="Bits of the frozen base."),
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
            "quantize": quantize,
            "dtype": dtype,
        },
    )
    if model:
        recipe.model = model
    if data:
        recipe.data.path = data
    return recipe
