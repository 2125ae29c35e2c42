"""Resumable run state: adapters, optimizer moments, data position and step.

Randomness (dropout, router jitter) is reseeded from (seed, step) before every step, so
the step number is all the RNG state a resume needs.

Each checkpoint is a folder ``checkpoints/step-NNNNNN`` written under a temporary name and
renamed when complete; ``checkpoints/latest`` names the newest one and is replaced
atomically after it. A run killed mid-write leaves the previous checkpoint as it was, and
its temporary folder, which the next run in that folder removes.

A checkpoint also holds its recipe and fingerprints of the base weights and the tokenized
training data. A resume must compute what the checkpoint's run computed: every setting
equal to the checkpoint's but those in ``RESUME_FREE`` (what is reported, saved, checked,
and how fast), and ``train.iters``, which may grow. ``check_resume`` names each difference.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from ..adapt.files import ADAPTER_FILE, adapter_tensors
from ..atomic import atomic_dir, remove_stale_temps, write_text_atomic
from ..errors import MlxMoeError
from ..model import CausalLM
from ..safetensors_io import save_arrays

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
# Recipe keys a resume may change: they decide what is reported, saved and checked, and how
# fast (the same math: compiled or not, recomputed activations, gathered or dense experts).
RESUME_FREE = frozenset(
    {
        "train.report_every",
        "train.val_every",
        "train.val_batches",
        "train.save_every",
        "train.nan_patience",
        "train.compile",
        "train.grad_checkpoint",
        "train.moe_dispatch",
        "collapse.max_expert_share",
        "collapse.max_spread",
        "collapse.patience",
        "collapse.action",
    }
)
# Compared by what they stand for, recorded in the checkpoint: the weights (fingerprint),
# the tokenized training data (fingerprint), the dtype computed in ("auto" resolved).
RESUME_BY_VALUE = {
    "model": ("base", "weights fingerprint"),
    "data.path": ("data", "tokenized training data fingerprint"),
    "train.dtype": ("dtype", "computed in"),
}


@dataclass
class RunState:
    step: int = 0  # optimizer steps done; the data position is step * grad_accum micro-batches
    skipped_steps: int = 0  # non-finite steps whose update was skipped
    nan_streak: int = 0
    trained_tokens: int = 0
    lora_update_counts: dict[str, list[float]] = field(default_factory=dict)


def save_checkpoint(
    out_dir: Path,
    model: CausalLM,
    optimizer: optim.Optimizer,
    state: RunState,
    recipe: dict[str, Any],
    fingerprints: dict[str, str] | None = None,
) -> Path:
    """``fingerprints``: what ``check_resume`` compares (``RESUME_BY_VALUE``)."""
    folder = Path(out_dir) / CHECKPOINTS / f"step-{state.step:06d}"
    with atomic_dir(folder) as tmp:
        save_arrays(tmp / ADAPTER_FILE, adapter_tensors(model))
        save_arrays(tmp / OPTIMIZER_FILE, dict(tree_flatten(optimizer.state)))
        saved = {"state": state.__dict__, "recipe": recipe, "fingerprints": fingerprints or {}}
        (tmp / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n")
    write_text_atomic(Path(out_dir) / CHECKPOINTS / LATEST, folder.name + "\n")
    return folder


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if (folder / STATE_FILE).is_file() else None


def remove_stale_checkpoints(out_dir: Path) -> None:
    """Removes the temporary folders of checkpoints a killed run was writing."""
    folder = Path(out_dir) / CHECKPOINTS
    if folder.is_dir():
        for entry in folder.iterdir():
            written = re.fullmatch(r"\.(step-\d+)\..+", entry.name)
            if written:
                remove_stale_temps(folder / written.group(1))


def read_checkpoint(folder: Path) -> dict[str, Any]:
    """The checkpoint's state.json: run state, recipe, fingerprints."""
    try:
        saved = json.loads((folder / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise MlxMoeError(f"{folder}: unreadable checkpoint ({exc})") from exc
    if not isinstance(saved, dict) or not {"state", "recipe"} <= set(saved):
        raise MlxMoeError(f"{folder}/{STATE_FILE}: not a checkpoint's state (no 'state' and 'recipe')")
    return saved


def check_resume(folder: Path, saved: dict[str, Any], recipe: dict[str, Any], **values: str) -> None:
    """Raises naming every setting of ``recipe`` that differs from the checkpoint's but the
    free ones (``RESUME_FREE``) and ``train.iters`` grown. ``values`` ("base", "data",
    "dtype") stand for the keys of ``RESUME_BY_VALUE``; a key whose value the checkpoint
    did not record is compared as written. Keys the checkpoint's recipe lacks (an older
    mlxmoe's) are not compared."""
    old, new = _flat(saved["recipe"]), _flat(json.loads(json.dumps(recipe)))
    recorded = saved.get("fingerprints") or {}
    changes = []
    for key in sorted(set(old) & set(new)):
        if key in RESUME_FREE:
            continue
        if key in RESUME_BY_VALUE and RESUME_BY_VALUE[key][0] in recorded:
            name, what = RESUME_BY_VALUE[key]
            if name in values and values[name] != recorded[name]:
                changes.append(
                    f"{key} {old[key]!r} -> {new[key]!r} ({what} {recorded[name]} -> {values[name]})"
                )
        elif key == "train.iters":
            if new[key] < old[key]:
                changes.append(f"train.iters {old[key]} -> {new[key]} (it may only grow)")
        elif old[key] != new[key]:
            changes.append(f"{key} {old[key]!r} -> {new[key]!r}")
    if changes:
        raise MlxMoeError(
            f"{folder}: cannot resume, this run differs from the checkpoint's: {'; '.join(changes)}. "
            "Resume with the checkpoint's settings (only train.iters may grow, and "
            f"{', '.join(sorted(RESUME_FREE))} may change), or train into another --out"
        )


# Compared whole: a quantization scheme ({bits: 4, experts: 3}) against bits (4) is a change
WHOLE_SETTINGS = frozenset({"train.quantize"})


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and f"{prefix}{key}" not in WHOLE_SETTINGS:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_checkpoint(
    folder: Path, model: CausalLM, optimizer: optim.Optimizer
) -> tuple[RunState, dict[str, Any]]:
    """Restores adapters, optimizer and RNG into ``model``/``optimizer``; returns the run
    state and the recipe the checkpoint was written with."""
    saved = read_checkpoint(folder)
    try:
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
