"""`mlxmoe eval`: perplexity, ROUGE-L, expert load, speed and memory on a Q&A file."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from ..evaluate import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_SEQ_LEN
from ._options import BITS, DTYPE_OPTION
from ._ui import console


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@click.command("eval")
@click.option("--model", required=True, help="Base model folder or hub id.")
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Adapter folder from `mlxmoe train` (attached, not merged).",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True),
    help="A JSONL file, or a folder with test.jsonl (else valid.jsonl).",
)
@click.option(
    "--max-new-tokens", default=DEFAULT_MAX_NEW_TOKENS, show_default=True, help="Greedy answer length cap."
)
@click.option("--limit", type=int, help="Evaluate only the first N samples.")
@click.option(
    "--max-seq-len", default=DEFAULT_MAX_SEQ_LEN, show_default=True, help="Truncation for perplexity."
)
@click.option(
    "--quantize",
    type=BITS,
    help="Bits of the base, e.g. 4 or 4,experts=3 (default: as the adapter was trained, else none).",
)
@DTYPE_OPTION
@click.option("--no-generate", is_flag=True, help="Perplexity and expert load only.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Also write the report here.")
@click.option(
    "--plot",
    "plot_out",
    type=click.Path(dir_okay=False),
    help="PNG of the per-layer x per-expert load (default with --json: beside it).",
)
@click.option("--no-plots", is_flag=True, help="Write no PNG, even with --json.")
@click.option(
    "--force", is_flag=True, help="Attach the adapter even if it was trained on other base weights."
)
def evaluate_command(
    model,
    adapter,
    data,
    max_new_tokens,
    limit,
    max_seq_len,
    quantize,
    dtype,
    no_generate,
    json_out,
    plot_out,
    no_plots,
    force,
) -> None:
    """Evaluate MODEL (with ADAPTER) on DATA: answer perplexity, ROUGE-L of greedy answers,
    expert-load spread per layer, tokens/s and peak memory."""
    from rich.progress import Progress

    from ..atomic import write_text_atomic
    from ..evaluate import evaluate

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("eval", total=None)
        report = evaluate(
            model,
            data,
            adapter=adapter,
            max_new_tokens=max_new_tokens,
            limit=limit,
            max_seq_len=max_seq_len,
            quantize=quantize,
            dtype=dtype,
            generate=not no_generate,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
            force=force,
        )

    summary = Table(title=f"eval: {report.data}", show_header=False)
    summary.add_row("model", report.model + (f" + {report.adapter}" if report.adapter else ""))
    summary.add_row("computed in", f"{report.dtype}, base {report.quantization}")
    summary.add_row(
        "samples",
        f"{report.samples} ({report.answer_tokens:,} answer tokens"
        + (f", {report.truncated} truncated" if report.truncated else "")
        + ")",
    )
    summary.add_row("perplexity", f"{report.perplexity:.3f} (cross-entropy {report.cross_entropy:.4f})")
    if report.generated_samples:
        summary.add_row(
            "ROUGE-L F1",
            f"{report.rouge_l:.4f} (P {report.rouge_l_precision:.4f}, "
            f"R {report.rouge_l_recall:.4f}, {report.generated_samples} answers)",
        )
        summary.add_row(
            "prompt", f"{_num(report.prompt_tps, '.1f')} tokens/s ({report.prompt_tokens:,} tokens)"
        )
        summary.add_row(
            "generation",
            f"{_num(report.generation_tps, '.1f')} tokens/s ({report.generation_tokens:,} tokens)",
        )
    summary.add_row("peak memory", f"{report.peak_memory_gb:.3f} GB")
    if report.experts:
        summary.add_row(
            "expert spread", f"{_num(report.experts['spread'], '.3f')} (mean of layers; 0 = balanced)"
        )
    console.print(summary)

    if report.experts:
        layers = Table(
            title=f"expert load ({report.experts['num_experts']} experts, top-{report.experts['top_k']})"
        )
        for column in ("layer", "spread", "max share", "busiest", "dead", "entropy"):
            layers.add_column(column, justify="right")
        for entry in report.experts["layers"]:
            layers.add_row(
                str(entry["layer"]),
                _num(entry["spread"], ".3f"),
                _num(entry["max_share"], ".3f"),
                _num(entry["busiest_expert"], "d"),
                str(len(entry["dead_experts"])),
                _num(entry["entropy"], ".3f"),
            )
        console.print(layers)

    if json_out:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")
    if json_out and not plot_out:
        plot_out = Path(json_out).with_name(f"{Path(json_out).stem}_expert_load.png")
    if plot_out and not no_plots:
        from ..plots import eval_plot

        title = Path(report.adapter).name if report.adapter else Path(report.model).name
        if eval_plot(report.experts, plot_out, f"expert load: {title} on {Path(report.data).name}"):
            console.print(f"plot: {plot_out}", highlight=False, soft_wrap=True)
        else:
            console.print("no plot: a dense model has no expert load", highlight=False)


eval = evaluate_command  # noqa: A001 - cli.py registers each module's object by the module's name
