"""The ``mlxmoe`` command: parses options and calls the Python API, nothing more.

Each subcommand lives in ``mlxmoe/commands/<name>.py`` as a click command of the same name,
listed in ``COMMANDS``.
"""

from __future__ import annotations

import sys

import click
from rich.markup import escape

from . import blas
from .commands import ablate, data, demo, export, info, plan, train, upcycle
from .commands import eval as eval_command
from .commands._ui import console
from .errors import MlxMoeError


class Group(click.Group):
    """Prints our own errors, and the system's (a full disk, a folder we may not write), as
    one line instead of a traceback. Writes are atomic (``atomic``): a failed one leaves the
    target as it was."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MlxMoeError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(describe_os_error(exc))


def describe_os_error(exc: OSError) -> str:
    """``PATH: reason`` (the errno's text), as the shell's own tools say it."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return f"{exc.filename}: {reason}" if exc.filename is not None else reason


def _fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(2)


@click.group(cls=Group)
@click.version_option(package_name="mlxmoe")
def main() -> None:
    """Fine-tune Mixture-of-Experts LLMs in MLX; ship them to llama.cpp and Ollama."""


# The commands that spend their time in MLX matmuls: worth a faster BLAS (see blas.py).
COMPUTE_COMMANDS = frozenset({"train", "eval", "ablate", "demo"})


def run() -> None:
    """The ``mlxmoe`` program: re-executes a compute command once with a fast BLAS
    preloaded (Linux), checks it, then runs ``main``."""
    if len(sys.argv) > 1 and sys.argv[1] in COMPUTE_COMMANDS:
        try:
            blas.reexec_with_blas()
            if blas.loaded_blas() != "bundled":
                blas.check_matmul()
        except MlxMoeError as exc:
            _fail(str(exc))
    main()


COMMANDS = (
    data.data,
    upcycle.upcycle,
    info.info,
    plan.plan,
    train.train,
    eval_command.eval,
    ablate.ablate,
    export.export,
    demo.demo,
)
for _command in COMMANDS:
    main.add_command(_command)
