"""The recipe overrides that `train` and `ablate` both take, and how they reach the recipe."""

from __future__ import annotations

from collections.abc import Callable

import click

from ..adapt.strategies import STRATEGIES
from ..dtypes import DTYPE_CHOICES
from ..errors import MlxMoeError
from ..quantize import quantization


class Bits(click.ParamType):
    """``--quantize``: bits of the frozen base (2, 3, 4, 5, 6 or 8, or ``none``: float
    weights), optionally with groups of roles at their own, e.g. ``4,experts=3``; given to the
    API as written at its shortest (``quantize.Quantization.written``). An option left out
    stays None: the recipe's or the adapter's choice."""

    name = "bits"

    def convert(self, value, param, ctx) -> int | dict[str, int]:
        if isinstance(value, (int, dict)):
            return value
        try:
            return quantization(value).written()
        except MlxMoeError as exc:
            self.fail(str(exc), param, ctx)

    def get_metavar(self, param, ctx=None) -> str:
        return "BITS[,GROUP=BITS...]"


BITS = Bits()
QUANTIZE_HELP = (
    "Bits of the frozen base: 2, 3, 4, 5, 6, 8 or none; groups at their own bits after commas, "
    "e.g. 4,experts=3 (groups: experts, shared_experts, attention, embeddings)."
)

# train, eval, ablate, demo and plan: what the model computes in (mlxmoe.dtypes)
DTYPE_OPTION = click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    help="Model dtype: auto = bfloat16 on a GPU, float32 on the CPU (recipe: train.dtype).",
)

# train and plan: where LoRA goes (adapt.strategies); the API names the choices when refusing one
STRATEGY_OPTION = click.option("--strategy", help=" | ".join(STRATEGIES))

TRAINING_OPTIONS = (
    click.option("--iters", type=int),
    click.option("--batch-size", type=int),
    click.option("--grad-accum", type=int),
    click.option("--max-seq-len", type=int),
    click.option("--learning-rate", type=float),
    click.option("--rank", type=int, help="LoRA rank."),
    click.option("--quantize", type=BITS, help=QUANTIZE_HELP),
    DTYPE_OPTION,
)


def training_options(command: Callable) -> Callable:
    for option in reversed(TRAINING_OPTIONS):
        command = option(command)
    return command


def recipe_from_options(
    recipe_file,
    model,
    data,
    *,
    iters,
    batch_size,
    grad_accum,
    max_seq_len,
    learning_rate,
    rank,
    quantize,
    dtype=None,
    strategy=None,
    seed=None,
):
    """The recipe file (or the defaults) with the command line's values on top."""
    from ..recipe import load_recipe

    recipe = load_recipe(
        recipe_file,
        lora={"strategy": strategy, "rank": rank},
        train={
            "iters": iters,
            "batch_size": batch_size,
            "grad_accum": grad_accum,
            "max_seq_len": max_seq_len,
            "learning_rate": learning_rate,
            "seed": seed,
            "quantize": quantize,
            "dtype": dtype,
        },
    )
    if model:
        recipe.model = model
    if data:
        recipe.data.path = data
    return recipe
