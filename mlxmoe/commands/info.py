"""`mlxmoe info`: what a model is and what its weights weigh."""

from __future__ import annotations

import click
from rich.table import Table

from ._options import BITS, QUANTIZE_HELP
from ._ui import console, human_bytes, human_params


@click.command()
@click.argument("model")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size.")
@click.option("--quantize", type=BITS, help="Also the weights under this scheme. " + QUANTIZE_HELP)
def info(model: str, group_size: int, quantize) -> None:
    """Family, experts, parameters and weight memory of MODEL (folder, config.json or hub id)."""
    from ..info import model_info

    i = model_info(model, group_size, quantize)
    table = Table(title=f"{model}", show_header=False)
    table.add_row("family", f"{i.family} (model_type {i.model_type})")
    table.add_row("layers", f"{i.layers} ({i.moe_layers} mixture-of-experts)")
    if i.experts:
        shared = " + 1 shared" if i.shared_expert else ""
        table.add_row("experts", f"{i.experts} routed{shared}, {i.experts_per_token} active per token")
    table.add_row(
        "parameters", f"{human_params(i.total_params)} total, {human_params(i.active_params)} active"
    )
    for bits, size in i.weight_bytes.items():
        label = "16-bit (bf16)" if bits == 16 else f"{bits}-bit (group {group_size})"
        table.add_row(f"weights at {label}", human_bytes(size))
    if i.scheme is not None:
        label = f"{i.scheme.per_role()} (group {group_size})" if i.scheme else "float (bf16)"
        table.add_row(f"weights at {label}", human_bytes(i.scheme_bytes))
    console.print(table)
