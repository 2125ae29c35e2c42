"""`mlxmoe demo`: data -> upcycled MoE -> eval -> train -> eval -> GGUF -> llama.cpp -> Ollama."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ._options import DTYPE_OPTION
from ._ui import TransientBar, console, human_bytes


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


@click.command()
@click.option(
    "--out",
    default="demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the dataset, model, run, GGUF and Modelfile (reused if present).",
)
@click.option(
    "--recipe",
    type=click.Path(exists=True, dir_okay=False),
    help="Training recipe (default: recipes/smollm2-faq-demo.yaml).",
)
@click.option("--iters", type=int, help="Training steps (overrides the recipe).")
@click.option(
    "--eval-answers",
    default=4,
    show_default=True,
    help="Held-out questions answered greedily before and after training.",
)
@DTYPE_OPTION
@click.option(
    "--check", is_flag=True, help="Exit 1 unless held-out perplexity fell and llama.cpp answered (for CI)."
)
def demo(out, recipe, iters, eval_answers, dtype, check) -> None:
    """Run the whole pipeline on the real SmolLM2 weights and the Python FAQ, no downloads."""
    from ..demo import DemoSettings, run_demo

    settings = DemoSettings(
        out=Path(out),
        recipe=Path(recipe) if recipe else None,
        iters=iters,
        eval_answers=eval_answers,
        dtype=dtype,
    )
    with TransientBar() as bar:
        report = run_demo(
            settings,
            say=lambda text: console.print(text, highlight=False),
            tick=lambda label, done, total: bar(done, total, label),
        )

    table = Table(title="mlxmoe demo", show_header=True)
    for column in ("", "base", "fine-tuned"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row(
        "held-out perplexity", _num(report.base["perplexity"], ".2f"), _num(report.tuned["perplexity"], ".2f")
    )
    table.add_row(
        f"ROUGE-L ({report.base['generated']} answers)",
        _num(report.base["rouge_l"], ".3f"),
        _num(report.tuned["rouge_l"], ".3f"),
    )
    table.add_row("expert spread", _num(report.base["spread"], ".3f"), _num(report.tuned["spread"], ".3f"))
    table.add_row(
        "generation tokens/s",
        _num(report.base["generation_tps"], ".1f"),
        _num(report.tuned["generation_tps"], ".1f"),
    )
    console.print(table)

    t = report.training
    facts = Table(show_header=False)
    facts.add_row(
        "training",
        f"{t['steps']} steps, loss {t['first_loss']:.3f} -> {t['last_loss']:.3f}, "
        f"{_num(t['tokens_per_s'], '.1f')} tokens/s, peak {t['peak_memory_gb']:.2f} GB",
    )
    facts.add_row("GGUF (q8_0)", f"{report.gguf['path']} ({human_bytes(report.gguf['bytes'])})")
    facts.add_row("Modelfile", report.modelfile)
    facts.add_row("plots", ", ".join(report.plots))
    facts.add_row(
        "time",
        ", ".join(f"{k} {v:.0f} s" for k, v in report.stages_s.items())
        + f"; total {sum(report.stages_s.values()) / 60:.1f} min",
    )
    console.print(facts)

    answer = report.llama_cpp
    console.print(f"[bold]llama.cpp, asked a held-out question:[/] {answer['question']}", highlight=False)
    console.print(
        f"[bold]answer[/] ({answer['tokens']} tokens, ROUGE-L {answer['rouge_l']:.3f}): {answer['answer']}",
        highlight=False,
    )
    console.print(f"[bold]reference:[/] {answer['reference']}", highlight=False)
    console.print(report.ollama, highlight=False)
    console.print(f"report: {Path(report.out) / 'demo.json'}")
    if check:
        failed = [
            what
            for what, ok in (
                ("held-out perplexity did not fall", report.perplexity_fell),
                ("llama.cpp gave no answer", report.llama_cpp_answered),
            )
            if not ok
        ]
        if failed:
            console.print(f"[bold red]check failed:[/] {'; '.join(failed)}")
            sys.exit(1)
        console.print("check passed: held-out perplexity fell and llama.cpp answered")
