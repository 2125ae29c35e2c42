"""What every command prints with: one console and human-readable sizes."""

from __future__ import annotations

from rich.console import Console

console = Console()


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def human_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.3f} M"


class TransientBar:
    """A transient bar while work reports (done, total) — evaluation samples, exported
    tensors — and none in between, so a training run's own bar has the terminal to itself."""

    def __init__(self) -> None:
        self.progress = self.task = None

    def __enter__(self) -> TransientBar:
        return self

    def __call__(self, done: int, total: int, label: str = "eval") -> None:
        from rich.progress import Progress

        if self.progress is None:
            self.progress = Progress(console=console, transient=True)
            self.progress.start()
            self.task = self.progress.add_task(label, total=total)
        self.progress.update(self.task, completed=done, total=total, description=label)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = self.task = None

    def __exit__(self, *exc) -> None:
        self.close()
