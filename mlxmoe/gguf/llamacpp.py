"""Running a GGUF in a real llama.cpp (llama-cpp-python): logits, tokens, generation.

Used to prove what we export and by ``mlxmoe demo``. llama-cpp-python is an optional
dependency (the ``test`` extra).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import MlxMoeError


def _import():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MlxMoeError(
            "llama-cpp-python is not installed: pip install 'mlxmoe[test]' (or llama-cpp-python)"
        ) from exc
    return llama_cpp


@contextmanager
def open_gguf(
    path: str | Path,
    *,
    lora: str | Path | None = None,
    n_ctx: int = 512,
    logits_all: bool = True,
    vocab_only: bool = False,
    n_threads: int = 2,
) -> Iterator:
    """A ``llama_cpp.Llama`` over ``path`` (optionally with a LoRA adapter GGUF), closed on exit.

    llama.cpp's "extra buffer types" (weights repacked for AMX and similar kernels) are
    turned off: on some x86 VMs the AMX tile setup faults and kills the process, and the
    plain CPU kernels compute the same results.
    """
    llama_cpp = _import()
    original = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        params = original()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama_cpp.llama_model_default_params = without_extra_buffers
    try:
        model = llama_cpp.Llama(
            model_path=str(path),
            lora_path=str(lora) if lora else None,
            n_ctx=n_ctx,
            logits_all=logits_all,
            vocab_only=vocab_only,
            n_threads=n_threads,
            verbose=False,
        )
    except ValueError as exc:
        raise MlxMoeError(f"{path}: llama.cpp cannot load it ({exc})") from exc
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = original
    try:
        yield model
    finally:
        model.close()


def logits(model, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits [len(tokens), vocab] for one sequence."""
    model.reset()
    model.eval(tokens)
    return np.array(model.scores[: len(tokens)], dtype=np.float32)
