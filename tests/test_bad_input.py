"""Bad input: one clear error each, naming the problem; nothing half-written; no traceback.

README's "Bad input" table lists every case with the test that backs it, here or elsewhere.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from assets import mixtral_tokenizer_folder
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file
from tiny_models import make_hf_model, make_trainable_checkpoint, save, write_qa_data

import mlxmoe
from mlxmoe import atomic
from mlxmoe.adapt import AdapterSpec, apply_adapters
from mlxmoe.adapt.files import ADAPTER_CONFIG, ADAPTER_FILE, AdapterError, adapter_config, save_adapters
from mlxmoe.atomic import atomic_dir, atomic_file, remove_stale_temps, write_text_atomic
from mlxmoe.checkpoint import INDEX_FILE
from mlxmoe.cli import main
from mlxmoe.data import DataError, read_samples
from mlxmoe.errors import CheckpointError, MlxMoeError
from mlxmoe.evaluate import evaluate
from mlxmoe.gguf import export as gguf_export
from mlxmoe.gguf.export import ExportError, export_gguf
from mlxmoe.recipe import RecipeError, load_recipe
from mlxmoe.safetensors_io import save_arrays
from mlxmoe.train import train
from mlxmoe.train.loop import learning_rate_schedule

EXPERT_W1 = "model.layers.{layer}.block_sparse_moe.experts.{expert}.w1.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny Mixtral without a tokenizer: enough to load."""
    return save(make_hf_model("mixtral"), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def exportable(tmp_path_factory) -> Path:
    """A tiny Mixtral with Mixtral's tokenizer: enough to export."""
    folder = tmp_path_factory.mktemp("exportable")
    vocab = mixtral_tokenizer_folder(folder)
    return save(make_hf_model("mixtral", vocab_size=vocab), folder)


def copy_of(folder: Path, tmp_path: Path, name: str = "model") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0][len("error: ") :]


# --- model folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage header", "empty"])
def test_a_truncated_or_corrupt_safetensors_file_is_named_by_the_loader_and_the_exporter(
    tiny, tmp_path, damage
):
    folder = copy_of(tiny, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(
        {
            "truncated": data[: len(data) // 2],
            "garbage header": (16).to_bytes(8, "little") + b"{not json at all",
            "empty": b"",
        }[damage]
    )
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: cannot read safetensors"):
        mlxmoe.load(folder)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: cannot read safetensors"):
        export_gguf(folder, tmp_path / "out" / "x.gguf", "f16")
    assert not (tmp_path / "out").exists()


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    folder = save(make_hf_model("mixtral"), tmp_path / "sharded", shard_kb=100)
    shards = sorted(set(json.loads((folder / INDEX_FILE).read_text())["weight_map"].values()))
    assert len(shards) > 1
    (folder / shards[-1]).unlink()
    message = f"{folder / INDEX_FILE}: lists {shards[-1]}, which is not in {folder}"
    with pytest.raises(CheckpointError, match=re.escape(message)):
        mlxmoe.load(folder)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        export_gguf(folder, tmp_path / "x.gguf", "f16")


def test_an_expert_index_out_of_range_is_named_by_the_loader_and_the_exporter(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    experts = json.loads((folder / "config.json").read_text())["num_local_experts"]
    extra = EXPERT_W1.format(layer=1, expert=experts)

    def add_expert(tensors):
        tensors[extra] = tensors[EXPERT_W1.format(layer=1, expert=0)]

    edit_tensors(folder, add_expert)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(extra)}': expert {experts} out of range"):
        mlxmoe.load(folder)
    with pytest.raises(CheckpointError, match=rf"tensor '{re.escape(extra)}': expert {experts} out of range"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_mxfp4_is_refused_for_a_family_that_does_not_read_it(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'mxfp4'"):
        mlxmoe.load(folder)


# --- recipes ------------------------------------------------------------------------------------

BAD_RECIPES = [
    (
        "train:\n  iters: 10\n  learning_rat: 0.1\n",
        r"recipe\.yaml\.train: unknown key 'learning_rat' \(known: iters, .*learning_rate",
    ),
    ("mystery: 1\n", r"recipe\.yaml: unknown key 'mystery' \(known: model, data, lora"),
    ("lora:\n  rank: eight\n", r"recipe\.yaml\.lora\.rank: expected int, got 'eight'"),
    ("train:\n  iters: 1.5\n", r"recipe\.yaml\.train\.iters: expected int, got 1\.5"),
    ("loss:\n  mask_prompt: 1\n", r"recipe\.yaml\.loss\.mask_prompt: expected bool, got 1"),
    ("lora:\n  targets: attention\n", r"recipe\.yaml\.lora\.targets: expected list, got 'attention'"),
    ("train:\n  iters:\n", r"recipe\.yaml\.train\.iters: must not be empty"),
    ("train: [1, 2]\n", r"recipe\.yaml\.train: expected a mapping, got list"),
    ("- a\n- b\n", r"recipe\.yaml: expected a mapping at the top level"),
    (
        "train:\n  iters: 10\n   batch_size: 2\n",
        r"recipe\.yaml: invalid YAML at line 3, column 14: mapping values are not allowed here",
    ),
]


@pytest.mark.parametrize("text, error", BAD_RECIPES, ids=[e.split(":")[1][:40] for _, e in BAD_RECIPES])
def test_a_bad_recipe_is_one_error_naming_the_key(tmp_path, text, error):
    (recipe := tmp_path / "recipe.yaml").write_text(text)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path))}/{error}"):
        load_recipe(recipe)


def test_a_float_yaml_reads_as_a_string_is_a_float():
    """PyYAML reads YAML 1.1, where `1e-4` (no dot) is a string."""
    assert load_recipe(None, train={"learning_rate": "1e-4"}).train.learning_rate == 1e-4


def test_a_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path / 'nope.yaml'))}: no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_cli_prints_a_bad_recipe_as_one_line(tmp_path):
    (recipe := tmp_path / "recipe.yaml").write_text("train:\n  itres: 10\n")
    result = CliRunner().invoke(
        main,
        [
            "train",
            "--model",
            str(tmp_path),
            "--data",
            str(tmp_path),
            "--out",
            str(tmp_path / "out"),
            "--recipe",
            str(recipe),
        ],
    )
    assert one_line_error(result).startswith(f"{recipe}.train: unknown key 'itres'")
    assert not (tmp_path / "out").exists()


# --- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"], ids=["plain", "with a BOM"])
def test_invalid_utf8_in_data_names_the_file_line_and_byte(tmp_path, bom):
    path = tmp_path / "train.jsonl"
    path.write_bytes(bom + b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(
        DataError,
        match=rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xe9, "
        r"byte 14 of the line\)",
    ):
        list(read_samples(path))


# --- resuming a run -----------------------------------------------------------------------------


def recipe(model: Path, data: Path, **changes):
    sections = {"lora": changes.pop("lora", {}), "loss": changes.pop("loss", {})}
    settings = dict(
        iters=4,
        batch_size=4,
        learning_rate=2e-3,
        warmup=0,
        quantize=0,
        dtype="float32",
        report_every=2,
        val_every=0,
        save_every=2,
        max_seq_len=64,
    )
    r = load_recipe(None, train={**settings, **changes}, **sections)
    r.model, r.data = str(model), str(data)
    return r


@pytest.fixture(scope="module")
def run(qwen2_moe, data, tmp_path_factory) -> Path:
    """A finished 4-step run (checkpoints at steps 2 and 4) and its adapter."""
    out = tmp_path_factory.mktemp("run")
    train(recipe(qwen2_moe, data), out, show_progress=False)
    return out


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


RESUME_CHANGES = [
    ({"learning_rate": 1e-3}, r"train\.learning_rate 0\.002 -> 0\.001"),
    ({"warmup": 2}, r"train\.warmup 0 -> 2"),
    ({"min_lr_ratio": 0.5}, r"train\.min_lr_ratio 0\.1 -> 0\.5"),
    ({"weight_decay": 0.1}, r"train\.weight_decay 0\.0 -> 0\.1"),
    ({"batch_size": 2}, r"train\.batch_size 4 -> 2"),
    ({"grad_accum": 2}, r"train\.grad_accum 1 -> 2"),
    ({"seed": 1}, r"train\.seed 0 -> 1"),
    ({"max_seq_len": 48}, r"train\.max_seq_len 64 -> 48"),
    ({"quantize": 4}, r"train\.quantize 0 -> 4"),
    ({"quantize": "none,experts=4"}, r"train\.quantize 0 -> \{'bits': 0, 'experts': 4\}"),
    ({"dtype": "bfloat16"}, r"train\.dtype 'float32' -> 'bfloat16' \(computed in float32 -> bfloat16\)"),
    ({"lora": {"rank": 4}}, r"lora\.rank 8 -> 4"),
    ({"lora": {"strategy": "attention"}}, r"lora\.strategy 'experts' -> 'attention'"),
    ({"loss": {"aux_coef": 0.1}}, r"loss\.aux_coef 0\.01 -> 0\.1"),
    ({"iters": 2}, r"train\.iters 4 -> 2 \(it may only grow\)"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "change, error", RESUME_CHANGES, ids=[e.split(" ")[0].replace("\\", "") for _, e in RESUME_CHANGES]
)
def test_resume_with_changed_settings_is_refused_naming_old_and_new(run, qwen2_moe, data, change, error):
    before = snapshot(run)
    with pytest.raises(MlxMoeError, match=rf"step-000004: cannot resume, .*{error}"):
        train(recipe(qwen2_moe, data, **change), run, resume=True, show_progress=False)
    assert snapshot(run) == before  # refused before anything is written


@pytest.mark.slow
def test_resume_names_every_changed_setting_at_once(run, qwen2_moe, data):
    with pytest.raises(MlxMoeError) as caught:
        train(
            recipe(qwen2_moe, data, learning_rate=1e-3, seed=3, lora={"rank": 4}),
            run,
            resume=True,
            show_progress=False,
        )
    message = str(caught.value)
    for change in ("lora.rank 8 -> 4", "train.learning_rate 0.002 -> 0.001", "train.seed 0 -> 3"):
        assert change in message


@pytest.mark.slow
def test_resume_on_other_base_weights_is_refused(run, data, tmp_path):
    other = make_trainable_checkpoint("qwen2_moe", tmp_path / "other", seed=1)  # same shapes
    with pytest.raises(
        MlxMoeError,
        match=rf"cannot resume, .*model '.*' -> '{re.escape(str(other))}' "
        r"\(weights fingerprint \w+ -> \w+\)",
    ):
        train(recipe(other, data), run, resume=True, show_progress=False)


@pytest.mark.slow
def test_resume_on_other_training_data_is_refused(run, qwen2_moe, tmp_path):
    other = write_qa_data(tmp_path / "other", n_train=24)
    with pytest.raises(
        MlxMoeError,
        match=r"cannot resume, .*data\.path .* \(tokenized training data "
        r"fingerprint \w+ -> \w+\)",
    ):
        train(recipe(qwen2_moe, other), run, resume=True, show_progress=False)


@pytest.mark.slow
def test_resume_may_grow_iters_and_change_bookkeeping(run, qwen2_moe, data, tmp_path):
    out = copy_of(run, tmp_path, "grown")
    grown = recipe(
        qwen2_moe, data, iters=6, report_every=1, save_every=0, val_every=3, nan_patience=2, compile=False
    )
    result = train(grown, out, resume=True, show_progress=False)
    assert result.steps == 6
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 5, 6]
    # The schedule is the 6-step one from the resumed step on (row k: the rate of step k).
    schedule = learning_rate_schedule(grown.train)
    for row in rows[2:]:
        assert row["learning_rate"] == pytest.approx(float(schedule(row["step"] - 1)), rel=1e-6)


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(MlxMoeError, match=f"^{re.escape(str(tmp_path))}: nothing to resume"):
        train(recipe(tmp_path / "model", tmp_path / "data"), tmp_path, resume=True, show_progress=False)


# --- adapters in eval ---------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_refuses_an_adapter_for_other_base_weights_unless_forced(run, data, tmp_path):
    other = make_trainable_checkpoint("qwen2_moe", tmp_path / "other", seed=1)
    args = [
        "eval",
        "--model",
        str(other),
        "--adapter",
        str(run),
        "--data",
        str(data / "valid.jsonl"),
        "--limit",
        "2",
        "--no-generate",
    ]
    refused = one_line_error(CliRunner().invoke(main, args))
    assert refused.startswith(f"{run}: adapter was trained on different base weights than {other}")
    assert refused.endswith("or force it (--force)")
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "perplexity" in forced.output


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, error",
    [
        ("no config", "no adapter_config.json"),
        ("no tensors", "no adapters.safetensors"),
        ("truncated tensors", "adapters.safetensors: cannot read safetensors"),
        ("config without base", "adapter_config.json: missing key 'base_fingerprint'"),
        ("config of another tool", "adapter_config.json: not an mlxmoe adapter"),
        ("tensors missing", r"adapters.safetensors: no tensor '.*lora_[ab]' \(1 of the \d+"),
    ],
)
def test_eval_names_what_is_wrong_with_an_adapter_folder(run, qwen2_moe, data, tmp_path, damage, error):
    adapter = copy_of(run, tmp_path, "adapter")
    config, tensors = adapter / ADAPTER_CONFIG, adapter / ADAPTER_FILE
    if damage == "no config":
        config.unlink()
    elif damage == "no tensors":
        tensors.unlink()
    elif damage == "truncated tensors":
        tensors.write_bytes(tensors.read_bytes()[:200])
    elif damage == "config without base":
        config.write_text(
            json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "base_fingerprint"})
        )
    elif damage == "config of another tool":
        config.write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    else:
        weights = mx.load(str(tensors))
        weights.pop(sorted(weights)[0])
        mx.save_safetensors(str(tensors), weights)
    with pytest.raises(AdapterError, match=error):
        evaluate(qwen2_moe, data / "valid.jsonl", adapter=adapter, limit=2, generate=False)


# --- exporting non-finite weights ---------------------------------------------------------------


@pytest.mark.parametrize("file_type", ["f32", "f16", "bf16", "q8_0"])
@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
def test_nan_or_inf_in_the_weights_is_refused_by_every_export_type(exportable, tmp_path, file_type, value):
    folder = copy_of(exportable, tmp_path)
    name = EXPERT_W1.format(layer=1, expert=2)

    def poison(tensors):
        tensors[name][3, 5] = value

    edit_tensors(folder, poison)
    out = tmp_path / "out"
    with pytest.raises(
        CheckpointError,
        match=rf"^{re.escape(str(folder))}: tensor '{re.escape(name)}' "
        r"\(at \[3, 5\]\) holds NaN or infinity; refusing to export it",
    ):
        export_gguf(folder, out / "model.gguf", file_type)
    assert list(out.iterdir()) == []  # neither the target nor a temporary file


def test_an_adapter_holding_nan_is_refused_naming_its_tensor(exportable, tmp_path):
    adapter = make_adapter(
        exportable,
        tmp_path / "adapter",
        lambda name, v: mx.full(v.shape, np.nan) if name == "layers.0.attn.q_proj.lora_b" else v,
    )
    with pytest.raises(
        AdapterError,
        match=r"adapters\.safetensors: tensor 'layers\.0\.attn\.q_proj\.lora_b' "
        r"holds NaN or infinity \(at \[0, 0\]\)",
    ):
        export_gguf(exportable, tmp_path / "x.gguf", "f16", adapter)
    assert not (tmp_path / "x.gguf").exists()


def test_an_adapter_whose_merge_overflows_is_refused_naming_the_tensor(exportable, tmp_path):
    adapter = make_adapter(
        exportable,
        tmp_path / "adapter",
        lambda name, v: mx.full(v.shape, 1e20) if name.startswith("layers.0.attn.q_proj.") else v,
    )
    with pytest.raises(
        AdapterError,
        match=r"merging the adapter into 'model\.layers\.0\.self_attn\.q_proj"
        r"\.weight' \(at \[0, 0\]\) overflows to infinity",
    ):
        export_gguf(exportable, tmp_path / "x.gguf", "f32", adapter)
    assert not (tmp_path / "x.gguf").exists()


def test_f16_export_refuses_values_float16_cannot_hold(exportable, tmp_path):
    folder = copy_of(exportable, tmp_path)

    def enlarge(tensors):
        tensors["model.layers.0.self_attn.q_proj.weight"][0, 0] = 1e6

    edit_tensors(folder, enlarge)
    with pytest.raises(
        ExportError,
        match=r"tensor blk\.0\.attn_q\.weight: values up to 1e\+06 overflow "
        r"float16 \(largest 65504\).*export bf16 or f32",
    ):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()
    assert export_gguf(folder, tmp_path / "x.gguf", "bf16").path.is_file()


def make_adapter(model_folder: Path, folder: Path, edit) -> Path:
    """An untrained adapter (attention + experts) for ``model_folder``, its tensors edited."""
    model, _ = mlxmoe.load(model_folder, dtype="float32")
    spec = AdapterSpec()
    adapted = apply_adapters(model, spec)
    save_adapters(model, folder, adapter_config(model, spec, adapted, str(model_folder)))
    weights = mx.load(str(folder / ADAPTER_FILE))
    mx.save_safetensors(str(folder / ADAPTER_FILE), {k: edit(k, v) for k, v in weights.items()})
    return folder


# --- the disk: full, not a folder, killed writes ------------------------------------------------


def test_a_full_disk_during_export_is_one_line_naming_the_file_and_leaves_nothing(
    exportable, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model.gguf"
    real = gguf_export.GGUFWriter.write_tensor_data
    calls = {"n": 0}

    def full_disk(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write(2) says: no name
        return real(self, *args, **kwargs)

    monkeypatch.setattr(gguf_export.GGUFWriter, "write_tensor_data", full_disk)
    result = CliRunner().invoke(main, ["export", "--model", str(exportable), "--gguf", str(target)])
    assert one_line_error(result) == f"{target}: {os.strerror(errno.ENOSPC)}"
    assert list(out.iterdir()) == []


def test_an_output_path_under_a_file_is_one_line_naming_it(exportable, tmp_path):
    (blocker := tmp_path / "file").write_text("not a folder")
    result = CliRunner().invoke(
        main, ["export", "--model", str(exportable), "--gguf", str(blocker / "model.gguf")]
    )
    assert one_line_error(result) == f"{blocker}: {os.strerror(errno.ENOTDIR)}"
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_safetensors_writes_raise_the_disks_own_error():
    """MLX's own file writer raises a bare RuntimeError; through a Python file it is ENOSPC."""
    with pytest.raises(OSError) as caught:
        save_arrays(Path("/dev/full"), {"a": mx.ones((1024, 1024))})
    assert caught.value.errno == errno.ENOSPC


def test_a_failed_atomic_write_names_the_target_and_keeps_the_old_version(tmp_path):
    target = tmp_path / "adapters.safetensors"
    target.write_text("previous")
    with pytest.raises(OSError) as caught, atomic_file(target) as tmp:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.filename == str(target)
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_a_killed_writes_temporaries_are_removed_by_the_next_write_of_that_target(tmp_path):
    target = tmp_path / "model.gguf"
    stale = [tmp_path / ".model.tmp-ab12cd_9.gguf", tmp_path / ".model.tmp-zzzzzzzz.gguf"]
    kept = [
        tmp_path / ".other.tmp-ab12cd_9.gguf",  # another target's
        tmp_path / ".model.tmp-ab12cd_9.safetensors",  # model.safetensors'
        tmp_path / ".model2.tmp-ab12cd_9.gguf",
        tmp_path / "model.gguf.bak",
    ]
    for path in stale + kept:
        path.write_bytes(b"x" * 100)
    write_text_atomic(target, "new")
    assert target.read_text() == "new"
    assert [p.exists() for p in stale] == [False, False]
    assert all(p.exists() for p in kept)


def test_a_killed_checkpoints_temporary_folder_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "step-000008"
    stale = tmp_path / ".step-000008.k1ll3d_x.tmp"
    other = tmp_path / ".step-000004.k1ll3d_x.tmp"
    for folder in (stale, other):
        folder.mkdir()
        (folder / "optimizer.safetensors").write_bytes(b"x" * 100)
    with atomic_dir(target) as tmp:
        (tmp / "state.json").write_text("{}")
    assert not stale.exists() and other.exists()
    assert [p.name for p in target.iterdir()] == ["state.json"]


def test_a_folder_killed_between_its_two_renames_gets_its_previous_version_back(tmp_path):
    target = tmp_path / "merged"
    old = tmp_path / ".merged.old"  # the previous version, moved aside; the new one not yet in
    old.mkdir()
    (old / "model.safetensors").write_text("previous")
    assert remove_stale_temps(target) == []
    assert (target / "model.safetensors").read_text() == "previous" and not old.exists()


def test_atomic_writes_fsync_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.stat(src).st_ino))
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    write_text_atomic(tmp_path / "eval.json", "{}")
    file, folder = (tmp_path / "eval.json").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("fsync", file), ("rename", file), ("fsync", folder)]

    events.clear()
    with atomic_dir(tmp_path / "step-000002") as tmp:
        (tmp / "state.json").write_text("{}")
    inner = (tmp_path / "step-000002" / "state.json").stat().st_ino
    made = (tmp_path / "step-000002").stat().st_ino
    assert events == [("fsync", inner), ("fsync", made), ("rename", made), ("fsync", folder)]


def test_mxfp4_export_of_a_family_other_than_gpt_oss_is_refused(tmp_path):
    from tiny_models import make_hf_model, save

    from mlxmoe.gguf.export import ExportError, export_gguf

    folder = save(make_hf_model("qwen3_moe"), tmp_path / "m")
    with pytest.raises(ExportError, match="mxfp4 is for gpt-oss's experts; qwen3_moe"):
        export_gguf(folder, tmp_path / "x.gguf", "mxfp4")
    assert not (tmp_path / "x.gguf").exists()
