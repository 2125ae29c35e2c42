"""`mlxmoe plan`: will loading, training and exporting a model fit in memory, from config.json alone."""

from __future__ import annotations

import click
from rich.table import Table

from ..gguf.export import FILE_TYPES
from ._options import BITS, DTYPE_OPTION, QUANTIZE_HELP, STRATEGY_OPTION
from ._ui import console, human_bytes


@click.command()
@click.argument("model", required=False)
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe YAML (see recipes/).")
@click.option("--memory", help="The Mac's RAM, e.g. 32GB (default: this Mac, else 32GB).")
@STRATEGY_OPTION
@click.option("--batch-size", type=int)
@click.option("--max-seq-len", type=int)
@click.option("--rank", type=int, help="LoRA rank.")
@click.option("--quantize", type=BITS, help=QUANTIZE_HELP)
@click.option("--grad-checkpoint/--no-grad-checkpoint", default=None)
@click.option(
    "--gguf-type",
    default="q8_0",
    show_default=True,
    type=click.Choice(list(FILE_TYPES)),
    help="Export type to plan for.",
)
@click.option(
    "--device",
    type=click.Choice(["gpu", "cpu"]),
    default="gpu",
    show_default=True,
    help="gpu: Metal; cpu: MLX's CPU backend (its MoE dispatch; float32 norms and "
    "gather_mm in a 16-bit model).",
)
@DTYPE_OPTION
def plan(
    model,
    recipe_file,
    memory,
    strategy,
    batch_size,
    max_seq_len,
    rank,
    quantize,
    grad_checkpoint,
    gguf_type,
    device,
    dtype,
) -> None:
    """Peak memory of training MODEL (folder, config.json or hub id: only the config is read)
    with the recipe, whether it fits, and what would make it fit."""
    from ..dtypes import dtype_name
    from ..errors import MlxMoeError
    from ..info import read_config
    from ..plan.advice import budget, suggestions, target, verdict
    from ..plan.load import plan_load
    from ..plan.training import DISPATCH_DETAIL, plan_export, plan_training
    from ..recipe import load_recipe

    recipe = load_recipe(
        recipe_file,
        lora={"strategy": strategy, "rank": rank},
        train={
            "batch_size": batch_size,
            "max_seq_len": max_seq_len,
            "grad_checkpoint": grad_checkpoint,
            "dtype": dtype,
            "quantize": quantize,
        },
    )
    model = model or recipe.model
    if not model:
        raise MlxMoeError("no model: pass MODEL or set 'model' in the recipe")
    cfg = read_config(model)
    training = plan_training(cfg, recipe, device)
    export = plan_export(cfg, gguf_type, training.memory)
    b = budget(memory)
    t = recipe.train

    table = Table(title=f"{model}: training peak", show_lines=False)
    for col, justify in (("", "left"), ("memory", "right"), ("", "left")):
        table.add_column(col, justify=justify)
    for item in training.items:
        table.add_row(item.name, human_bytes(item.bytes), item.detail)
    table.add_row("[bold]peak", f"[bold]{human_bytes(training.peak)}", f"during the {training.phase}")
    console.print(table)
    ckpt = "on" if t.grad_checkpoint else "off"
    console.print(
        f"batch {t.batch_size} x {t.max_seq_len} tokens, gradient checkpointing {ckpt}, "
        f"LoRA {recipe.lora.strategy} rank {recipe.lora.rank} on "
        f"{len(training.memory.adapted)} modules, {device}, {dtype_name(training.dtype)}"
        + (" (train.dtype auto)" if t.dtype == "auto" else "")
        + (f", {DISPATCH_DETAIL[training.dispatch]}" if training.memory.model.moe_layers else ""),
        highlight=False,
    )
    load = plan_load(cfg, t.quantization, t.group_size, training.dtype)
    console.print(
        f"load: peak {human_bytes(load.peak)} ("
        + "; ".join(f"{i.name} {human_bytes(i.bytes)}" for i in load.items)
        + ")",
        highlight=False,
    )
    console.print(
        f"export to GGUF {gguf_type}: peak {human_bytes(export.peak)} ("
        + "; ".join(f"{i.name} {human_bytes(i.bytes)}" for i in export.items)
        + ")",
        highlight=False,
    )
    phases = {"load": load.peak, "training": training.peak, "export": export.peak}
    phase = max(phases, key=phases.get)
    peak = phases[phase]

    def overall(change) -> int:  # a recipe change's peak over all three phases
        tc = change.recipe.train
        return max(
            change.peak, export.peak, plan_load(cfg, tc.quantization, tc.group_size, training.dtype).peak
        )

    v = verdict(peak, b)
    console.print(
        f"\nbudget: {human_bytes(b.ram)} of RAM, {human_bytes(b.wired_default)} for the GPU "
        f"by default ({b.source}); the largest phase is the {phase}, {human_bytes(peak)}",
        highlight=False,
    )
    if v.fits_default:
        console.print("[green]fits[/] under the default GPU limit")
        return
    if v.fits_raised:
        console.print("[yellow]fits after raising the GPU wired limit[/] (until the next reboot):")
        console.print(f"  {v.sysctl}", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"[red]does not fit[/]: {human_bytes(peak)} is more than "
            f"{human_bytes(b.wired_max)} (RAM less 4 GiB for macOS)",
            highlight=False,
        )
    limit = target(training, b, cfg, recipe)
    changes = suggestions(cfg, recipe, training, limit, device)
    if changes:
        which = "default" if limit == b.wired_default else "raised"
        console.print(f"to fit under the {which} limit ({human_bytes(limit)}), change in this order:")
        for change in changes:
            total = overall(change)
            mark = "fits" if total <= limit else "still over"
            console.print(f"  - {change.what}: peak {human_bytes(total)} ({mark})", highlight=False)
    if phase == "load" and load.peak > limit:
        console.print(
            f"the load peaks with {load.part} in flight: an mlx-lm {t.quantization.bits or 4}-bit "
            "release of the model is read as stored, without its float copies",
            highlight=False,
        )
