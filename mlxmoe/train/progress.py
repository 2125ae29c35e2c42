"""The training progress bar: step, loss, aux, z, tokens/s, peak memory, expert spread."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, completed: int, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=self.console,
            disable=not enabled,
        )
        self.task = self.progress.add_task("train", total=total, completed=completed, stats="")

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def advance(self, step: int) -> None:
        self.progress.update(self.task, completed=step)

    def report(self, row: dict[str, Any]) -> None:
        stats = (
            f"loss {row['loss']:.3f} aux {row['aux']:.3f} z {row['z']:.2f} "
            f"{row['tokens_per_s']:.0f} tok/s {row['peak_memory_gb']:.1f} GB"
        )
        experts = row.get("experts")
        if experts:
            stats += f" spread {experts.get('spread') or 0.0:.2f}"
        if "val_loss" in row:
            stats += f" val {row['val_loss']:.3f}"
        self.progress.update(self.task, stats=stats)

    def note(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)
