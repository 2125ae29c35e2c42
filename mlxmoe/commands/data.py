"""`mlxmoe data`: build training data sets from real sources on this machine."""

from __future__ import annotations

import click
from rich.table import Table

from ..data.faq import MAX_ANSWER_CHARS
from ._ui import console


@click.group()
def data() -> None:
    """Build training data sets (train/valid/test JSONL)."""


@data.command("python-faq")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--source",
    type=click.Choice(["auto", "debian", "pydoc"]),
    default="auto",
    show_default=True,
    help="debian: the Python FAQ of an installed python3.X-doc; pydoc: the language "
    "reference topics and docstrings of this Python; auto: debian if installed.",
)
@click.option(
    "--faq-dir",
    type=click.Path(exists=True, file_okay=False),
    help="A folder of FAQ *.rst.txt sources (e.g. from an unpacked python3.X-doc).",
)
@click.option(
    "--max-answer-chars",
    default=MAX_ANSWER_CHARS,
    show_default=True,
    help="Answers keep whole paragraphs up to this length.",
)
def python_faq(out_dir, source, faq_dir, max_answer_chars) -> None:
    """Python questions and answers from the documentation, split 80/10/10 by question hash."""
    from ..data.faq import build_dataset

    built = build_dataset(out_dir, source=source, faq_dir=faq_dir, max_chars=max_answer_chars)
    table = Table(title="python-faq", show_header=False)
    table.add_row("source", f"{built.source}: {built.origin}")
    for name, count in built.counts.items():
        table.add_row(f"{name}.jsonl", f"{count} samples")
    console.print(table)
    console.print(f"wrote {built.out_dir}")
