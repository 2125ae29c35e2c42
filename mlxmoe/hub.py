"""Turning a local path or a Hugging Face hub id into a local folder."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CheckpointError

# What a model needs; never *.bin/*.pt (pickles) and never *.py (remote code).
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(text: str) -> bool:
    """'org/name', as opposed to a path (which may simply not exist)."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def resolve(path_or_id: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id downloaded (or found in the cache).

    Honors HF_HUB_OFFLINE: offline, only what is already cached is used.
    """
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if not is_hub_id(text):
        raise CheckpointError(f"{text}: no such model folder (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = (
            "HF_HUB_OFFLINE is set and it is not in the cache"
            if offline
            else ("the hub cannot be reached and it is not in the cache")
        )
        raise CheckpointError(f"{text}: cannot load from the Hugging Face hub: {why}") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"{text}: Hugging Face hub error: {exc}") from exc
