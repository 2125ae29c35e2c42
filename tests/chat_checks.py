"""What training makes of a chat sample, for the thinking-template tests: the example one
conversation tokenizes to, the text its loss mask trains, and the tokens before its last
trained answer (what a Modelfile's TEMPLATE must render as the prompt)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxmoe.data import Example, load_dataset


def example(
    tmp_path: Path, tokenizer, messages: list[dict], thinking: str, max_seq_len: int = 1024
) -> Example:
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    return load_dataset(path, tokenizer, max_seq_len, thinking=thinking).examples[0]


def trained(tokenizer, ex: Example) -> list[str]:
    """The decoded runs of tokens the loss mask trains."""
    edges = np.flatnonzero(np.diff(np.r_[0, ex.loss_mask.astype(int), 0]))
    return [tokenizer.decode(ex.tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]


def before_last_answer(ex: Example) -> list[int]:
    starts = np.flatnonzero(np.diff(ex.loss_mask.astype(int)) == 1) + 1
    return ex.tokens[: starts[-1]].tolist()
