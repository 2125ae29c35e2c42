"""`mlxmoe export`: GGUF for llama.cpp, Modelfile for Ollama."""

from __future__ import annotations

import click

from ..gguf.export import FILE_TYPES
from ._ui import console, human_bytes


@click.command()
@click.option("--model", required=True, help="Base model folder or hub id.")
@click.option(
    "--adapter", type=click.Path(exists=True, file_okay=False), help="Adapter folder from `mlxmoe train`."
)
@click.option("--gguf", "gguf_out", required=True, type=click.Path(dir_okay=False), help="Output .gguf file.")
@click.option("--type", "file_type", default="f16", show_default=True, type=click.Choice(list(FILE_TYPES)))
@click.option(
    "--adapter-only", is_flag=True, help="Write only the LoRA tensors (llama.cpp --lora, Ollama ADAPTER)."
)
@click.option(
    "--ollama",
    "ollama_dir",
    is_flag=False,
    flag_value=".",
    default=None,
    help="Also write an Ollama Modelfile (into DIR, default: beside the GGUF).",
)
@click.option("--name", help="Model name for `ollama create` (default: the GGUF's stem).")
@click.option("--force", is_flag=True, help="Merge even if the adapter's base fingerprint differs.")
@click.option(
    "--base-weights",
    type=click.Path(exists=True, file_okay=False),
    help="For a MODEL that arrived quantized (mlx-lm's format): its full-precision "
    "release, merged into instead of the quantized grid.",
)
def export(model, adapter, gguf_out, file_type, adapter_only, ollama_dir, name, force, base_weights) -> None:
    """Merge adapters and write a GGUF that llama.cpp and Ollama load."""
    from rich.progress import Progress

    from ..gguf.adapter import export_adapter_gguf
    from ..gguf.export import export_gguf

    if adapter_only:
        if not adapter:
            raise click.UsageError("--adapter-only needs --adapter")
        if ollama_dir is not None:  # ADAPTER needs a base GGUF, which this run does not write
            raise click.UsageError("--ollama needs a full GGUF: export without --adapter-only")
        report = export_adapter_gguf(model, adapter, gguf_out, force=force)
    else:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("export", total=None)
            report = export_gguf(
                model,
                gguf_out,
                file_type,
                adapter,
                force,
                on_tensor=lambda i, n, t: progress.update(task, total=n, completed=i, description=t),
                base_weights=base_weights,
            )
    types = ", ".join(f"{k} x{v}" for k, v in sorted(report.types.items()))
    console.print(
        f"wrote {report.path} ({human_bytes(report.bytes)}, {report.tensors} tensors: {types}) "
        f"in {report.seconds:.1f} s"
    )
    if ollama_dir is not None:
        from pathlib import Path

        from ..gguf.ollama import (
            create_model,
            default_system_prompt,
            detect_chat_format,
            model_parameters,
            write_modelfile,
        )
        from ..hub import resolve

        model_dir = resolve(model)
        folder = Path(gguf_out).parent if ollama_dir == "." else Path(ollama_dir)
        modelfile = write_modelfile(
            folder,
            Path(gguf_out),
            detect_chat_format(model_dir),
            system=default_system_prompt(model_dir),
            params=model_parameters(model_dir),
        )
        console.print(f"wrote {modelfile}")
        console.print(create_model(modelfile, name or Path(gguf_out).stem))
