"""Resumable run state: adapters, optimizer moments, data position and step.

Randomness (dropout, router jitter) is reseeded from (seed, step) before every step, so
the step number is all the RNG state a resume needs.

Each checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary name and
renamed when complete; ``checkpoints/latest`` names the newest one and is replaced
atomically after it. A run killed mid-write leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..adapters import ADAPTER_FILE, adapter_tensors
from ..atomic import atomic_dir, write_text_atomic
from ..errors import MlxMoeError
from ..model import CausalLM

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"


@dataclass
class RunState:
    step: int = 0  # optimizer steps done; the data position is step * grad_accum micro-batches
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    nan_streak: int = 0
    trained_tokens: int = 0
    lora_update_counts: dict[str, list[float]] = field(default_factory=dict)


def save_checkpoint(
    out_dir: Path, model: CausalLM, optimizer: optim.Optimizer, state: RunState,
    recipe: dict[str, Any],
) -> Path:
    folder = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    with atomic_dir(folder) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), adapter_tensors(model))
        mx.save_safetensors(str(tmp / OPTIMIZER_FILE), dict(tree_flatten(optimizer.state)))
        (tmp / STATE_FILE).write_text(
            json.dumps({"state": state.__dict__, "recipe": recipe}, indent=2) + "\n"
        )
    write_text_atomic(Path(out_dir) / CHECKPOINTS / LATEST, folder.name + "\n")
    return folder


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def load_checkpoint(
    folder: Path, model: CausalLM, optimizer: optim.Optimizer
) -> tuple[RunState, dict[str, Any]]:
    """Restores adapters, optimizer and RNG into ``model``/``optimizer``; returns the run
    state and the recipe the checkpoint was written with."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
        adapters = mx.load(str(folder / ADAPTER_FILE))
        opt = mx.load(str(folder / OPTIMIZER_FILE))
    except (OSError, ValueError, RuntimeError) as exc:
        raise MlxMoeError(f"{folder}: unreadable checkpoint ({exc})") from exc
    expected = adapter_tensors(model)
    if set(adapters) != set(expected):
        raise MlxMoeError(
            f"{folder}: its adapters do not match this run's LoRA settings "
            f"({len(adapters)} tensors saved, {len(expected)} expected)"
        )
    model.load_weights(list(adapters.items()), strict=False)
    optimizer.init(model.trainable_parameters())
    for path, value in opt.items():
        set_path(optimizer.state, path, value)
    mx.eval(model.parameters(), optimizer.state)
    return RunState(**saved["state"]), saved["recipe"]


def set_path(tree: Any, path: str, value: mx.array) -> None:
    *parents, last = path.split(".")
    node = tree
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
