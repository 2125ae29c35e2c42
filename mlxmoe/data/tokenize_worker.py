"""Tokenize training files in a child process, so that the trainer never loads a tokenizer.

Loading a Hugging Face tokenizer (through mlx-lm) imports transformers and, where it is
installed, torch: ~300 MB of resident memory that training never uses again once its files
are token ids. ``tokenize_files`` runs ``load_dataset`` in ``python -m mlxmoe.data.tokenize_worker``
and reads the datasets back from plain arrays (``.npz`` without pickles) and JSON; the
child's errors come back as the same one-line errors (a bad line is named by file and line).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MlxMoeError
from ..thinking import DEFAULT_THINKING
from .samples import DataError, Dataset, Example, load_dataset

DATA_ERROR, OTHER_ERROR = 3, 4


class TokenizeJob:
    """``load_dataset`` of each file (None stays None) with the tokenizer of ``model_folder``,
    computed in a child process that starts at once: the caller loads its model meanwhile.
    Use as a context manager (a job left unfinished is killed) and call ``result()``."""

    def __init__(
        self,
        model_folder: str | Path,
        files: list[Path | None],
        max_seq_len: int,
        mask_prompt: bool,
        thinking: str = DEFAULT_THINKING,
    ):
        self.files = files
        self._tmp = tempfile.TemporaryDirectory(prefix="mlxmoe-tokenize-")
        self.folder = Path(self._tmp.name)
        job = {
            "model": str(model_folder),
            "files": [str(f) if f else None for f in files],
            "max_seq_len": max_seq_len,
            "mask_prompt": mask_prompt,
            "thinking": thinking,
            "out": str(self.folder),
        }
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mlxmoe.data.tokenize_worker", json.dumps(job)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self) -> list[Dataset | None]:
        _, stderr = self._proc.communicate()
        code = self._proc.returncode
        if code in (DATA_ERROR, OTHER_ERROR):
            message = json.loads((self.folder / "error.json").read_text())["message"]
            raise (DataError if code == DATA_ERROR else MlxMoeError)(message)
        if code != 0:
            raise MlxMoeError(f"tokenizing the training data failed:\n{stderr[-2000:]}")
        return [read_dataset(self.folder, i) if f else None for i, f in enumerate(self.files)]

    def __enter__(self) -> TokenizeJob:
        return self

    def __exit__(self, *exc) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.communicate()
        self._tmp.cleanup()


def tokenize_files(
    model_folder: str | Path,
    files: list[Path | None],
    max_seq_len: int,
    mask_prompt: bool,
    thinking: str = DEFAULT_THINKING,
) -> list[Dataset | None]:
    """``TokenizeJob(...).result()``: the datasets, tokenized in a child process."""
    with TokenizeJob(model_folder, files, max_seq_len, mask_prompt, thinking) as job:
        return job.result()


def write_dataset(folder: Path, index: int, dataset: Dataset) -> None:
    lengths = np.array([len(e.tokens) for e in dataset.examples], np.int64)
    np.savez(
        folder / f"{index}.npz",
        lengths=lengths,
        tokens=np.concatenate([e.tokens for e in dataset.examples]).astype(np.int32),
        loss_mask=np.concatenate([e.loss_mask for e in dataset.examples]).astype(bool),
    )
    (folder / f"{index}.json").write_text(
        json.dumps(
            {"source": str(dataset.source), "truncated": dataset.truncated, "dropped": dataset.dropped}
        )
    )


def read_dataset(folder: Path, index: int) -> Dataset:
    meta = json.loads((folder / f"{index}.json").read_text())
    with np.load(folder / f"{index}.npz", allow_pickle=False) as arrays:
        cuts = np.cumsum(arrays["lengths"])[:-1]
        tokens = np.split(arrays["tokens"], cuts)
        masks = np.split(arrays["loss_mask"], cuts)
    examples = [Example(t, m) for t, m in zip(tokens, masks)]
    return Dataset(examples, Path(meta["source"]), meta["truncated"], meta["dropped"])


def main(job: dict) -> int:
    from ..load import require_tokenizer

    out = Path(job["out"])
    try:
        tokenizer = require_tokenizer(job["model"])
        for i, path in enumerate(job["files"]):
            if path is not None:
                write_dataset(
                    out,
                    i,
                    load_dataset(path, tokenizer, job["max_seq_len"], job["mask_prompt"], job["thinking"]),
                )
    except MlxMoeError as exc:
        (out / "error.json").write_text(json.dumps({"message": str(exc)}))
        return DATA_ERROR if isinstance(exc, DataError) else OTHER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
