"""Bad model folders get one clear error naming the problem, and nothing from them is run."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file
from tiny_models import make_hf_model, save

import mlxmoe
from mlxmoe.errors import CheckpointError


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save(make_hf_model("mixtral"), tmp_path_factory.mktemp("good"))


def copy_of(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "model"))


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


class RunsCode:
    """Unpickling this writes a file: the proof that a loader executed it."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.write_text, (self.sentinel, "executed"))


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        mlxmoe.load(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such model folder"):
        mlxmoe.load(tmp_path / "nope")


def test_unknown_model_type_lists_the_supported_ones(good, tmp_path):
    folder = copy_of(good, tmp_path)
    edit_config(folder, model_type="gpt_neox")
    with pytest.raises(CheckpointError) as err:
        mlxmoe.load(folder)
    message = str(err.value)
    assert "'gpt_neox' is not supported" in message
    for family in ("llama", "mixtral", "qwen2_moe", "qwen3_moe"):
        assert family in message


def test_invalid_config_json_names_the_line(good, tmp_path):
    folder = copy_of(good, tmp_path)
    (folder / "config.json").write_text('{\n  "model_type": "mixtral",\n  oops\n}')
    with pytest.raises(CheckpointError, match=r"config.json: invalid JSON at line 3"):
        mlxmoe.load(folder)


def test_missing_tensor_is_named(good, tmp_path):
    folder = copy_of(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight'"
    ):
        mlxmoe.load(folder)


def test_misshaped_tensor_is_named_with_both_shapes(good, tmp_path):
    folder = copy_of(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.weight"
    tensors[name] = tensors[name][:-1]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"'{name}' has shape \(31, 64\), config.json implies \(32, 64\)"
    ):
        mlxmoe.load(folder)


def test_unexpected_tensor_is_named(good, tmp_path):
    folder = copy_of(good, tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mystery.weight"] = tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mystery\.weight'"):
        mlxmoe.load(folder)


@pytest.mark.parametrize("weights_name", ["pytorch_model.bin", "model.pt"])
def test_pickle_only_weights_are_refused_and_never_unpickled(good, tmp_path, weights_name):
    folder = copy_of(good, tmp_path)
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"
    (folder / weights_name).write_bytes(pickle.dumps(RunsCode(sentinel)))
    with pytest.raises(CheckpointError, match="never unpickles"):
        mlxmoe.load(folder)
    assert not sentinel.exists()


def test_remote_code_is_refused_and_never_executed(good, tmp_path):
    folder = copy_of(good, tmp_path)
    sentinel = tmp_path / "pwned"
    (folder / "modeling_custom.py").write_text(f"open({str(sentinel)!r}, 'w').write('executed')\n")
    edit_config(folder, auto_map={"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    with pytest.raises(CheckpointError, match="auto_map"):
        mlxmoe.load(folder)
    assert not sentinel.exists()


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True
    )


@pytest.mark.slow
def test_hub_id_offline_and_not_cached_says_so(tmp_path):
    result = _run_python(
        "import mlxmoe\ntry:\n    mlxmoe.load('mlxmoe-test/absent')\n"
        "except mlxmoe.CheckpointError as e:\n    print(e)",
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
    )
    assert "mlxmoe-test/absent: cannot load from the Hugging Face hub: HF_HUB_OFFLINE" in result.stdout


@pytest.mark.slow
def test_hub_id_offline_loads_from_the_cache(good, tmp_path):
    # The layout huggingface-hub itself writes: refs/main -> snapshots/<commit>/
    repo = tmp_path / "cache" / "models--mlxmoe-test--tiny"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(good, repo / "snapshots" / commit)
    result = _run_python(
        "import mlxmoe\nm, _ = mlxmoe.load('mlxmoe-test/tiny')\nprint(m.family, len(m.layers))",
        {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")},
    )
    assert result.stdout.strip() == "mixtral 3", result.stderr


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlxmoe", "info", str(tmp_path / "absent")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stdout.strip().splitlines() == [f"error: {tmp_path / 'absent'}: no such file or folder"]
