"""`mlxmoe train`: LoRA strategies, router-aware losses, monitoring, checkpoints, resume."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import make_trainable_checkpoint

from mlxmoe.adapt.files import read_adapter_config
from mlxmoe.errors import MlxMoeError
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train


def recipe(model: Path, data: Path, **train_overrides):
    lora = train_overrides.pop("lora", {})
    loss = train_overrides.pop("loss", {})
    collapse = train_overrides.pop("collapse", {})
    # float32 on every backend: these tests compare runs to float32 tolerances (the Mac's
    # bfloat16 over 4 bits: tests/test_mac_profile.py)
    settings = dict(
        iters=12,
        batch_size=4,
        learning_rate=2e-3,
        warmup=0,
        quantize=0,
        dtype="float32",
        report_every=4,
        val_every=6,
        save_every=0,
        max_seq_len=64,
    )
    settings.update(train_overrides)
    r = load_recipe(None, train=settings, lora=lora, loss=loss, collapse=collapse)
    r.model, r.data = str(model), str(data)
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def router_weights(folder: Path) -> dict[str, np.ndarray]:
    import mlxmoe

    model, _ = mlxmoe.load(folder)
    return {f"{i}": np.array(model.layers[i].moe.router.weight) for i in model.moe_layers}


@pytest.mark.parametrize("strategy", ["attention", "experts", "shared", "experts+router", "all"])
@pytest.mark.slow
def test_loss_falls_for_every_strategy(qwen2_moe, data, tmp_path, strategy):
    result = train(recipe(qwen2_moe, data, lora={"strategy": strategy}), tmp_path, show_progress=False)
    rows = metrics(tmp_path)
    assert result.steps == 12
    assert rows[-1]["ce"] < rows[0]["ce"] - 0.3, [r["ce"] for r in rows]
    assert result.val_loss is not None and np.isfinite(result.val_loss)


@pytest.mark.slow
def test_run_folder_holds_adapters_config_metrics_and_checkpoints(qwen2_moe, data, tmp_path):
    train(recipe(qwen2_moe, data, save_every=6), tmp_path, show_progress=False)
    assert (tmp_path / "adapters.safetensors").is_file()
    config = read_adapter_config(tmp_path)
    assert config["family"] == "qwen2_moe" and config["strategy"] == "experts"
    assert config["rank"] == 8 and config["alpha"] == 16.0 and config["quantization"] is None
    assert config["base_model"] == str(qwen2_moe) and len(config["base_fingerprint"]) == 32
    assert "layers.0.moe.experts.gate_proj" in config["targets"]
    assert "layers.0.moe.router" not in config["targets"]
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [4, 8, 12]
    for key in ("loss", "ce", "aux", "z", "tokens_per_s", "peak_memory_gb", "learning_rate"):
        assert all(np.isfinite(r[key]) for r in rows), key
    layer = rows[-1]["experts"]["layers"][0]
    assert sum(layer["load"]) == pytest.approx(1.0)
    assert {"spread", "entropy", "dead_experts", "lora_update_counts"} <= set(layer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "latest",
        "step-000006",
        "step-000012",
    ]


@pytest.mark.slow
def test_experts_strategy_leaves_the_router_bit_identical(qwen2_moe, data, tmp_path):
    import mlxmoe
    from mlxmoe.adapt.files import load_adapters

    train(recipe(qwen2_moe, data, lora={"strategy": "experts"}), tmp_path, show_progress=False)
    model, _ = mlxmoe.load(qwen2_moe)
    before = {i: np.array(model.layers[i].moe.router.weight) for i in model.moe_layers}
    load_adapters(model, tmp_path)
    for i in model.moe_layers:
        assert np.array_equal(np.array(model.layers[i].moe.router.weight), before[i])
    weights = mx.load(str(tmp_path / "adapters.safetensors"))
    assert not any("router" in name for name in weights)


@pytest.mark.parametrize("router_mode", ["full", "lora"])
@pytest.mark.slow
def test_experts_plus_router_changes_the_router(qwen2_moe, data, tmp_path, router_mode):
    import mlxmoe
    from mlxmoe.adapt.files import load_adapters

    spec = {"strategy": "experts+router", "router_mode": router_mode, "rank": 4}
    train(recipe(qwen2_moe, data, lora=spec), tmp_path, show_progress=False)
    base, _ = mlxmoe.load(qwen2_moe)
    tuned, _ = mlxmoe.load(qwen2_moe)
    load_adapters(tuned, tmp_path)
    tokens = mx.array([[5, 17, 40, 2, 99, 120]])
    _, base_logits = base(tokens, return_router_logits=True)
    _, tuned_logits = tuned(tokens, return_router_logits=True)
    assert not np.allclose(np.array(base_logits[0]), np.array(tuned_logits[0]))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
@pytest.mark.slow
def test_backward_through_a_4bit_quantized_moe_trains_the_adapters(family, data, tmp_path):
    model = make_trainable_checkpoint(family, tmp_path / "model")
    r = recipe(model, data, quantize=4, group_size=32, iters=4, report_every=2, val_every=0)
    result = train(r, tmp_path / "out", show_progress=False)
    rows = metrics(tmp_path / "out")
    assert read_adapter_config(tmp_path / "out")["quantization"] == {"bits": 4, "group_size": 32}
    assert all(np.isfinite(row["loss"]) and row["grad_norm"] > 0 for row in rows)
    weights = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    b = [v for k, v in weights.items() if k.endswith("experts.down_proj.lora_b")]
    assert b and all(mx.abs(v).max().item() > 0 for v in b)
    assert result.steps == 4


@pytest.mark.slow
def test_resume_continues_exactly(qwen2_moe, data, tmp_path):
    r = recipe(qwen2_moe, data, iters=10, save_every=5, lora={"dropout": 0.1})
    train(r, tmp_path / "one_run", show_progress=False)
    # A second run that stopped at step 5: its checkpoint is the first run's.
    resumed = tmp_path / "resumed" / "checkpoints"
    resumed.mkdir(parents=True)
    import shutil

    shutil.copytree(tmp_path / "one_run" / "checkpoints" / "step-000005", resumed / "step-000005")
    (resumed / "latest").write_text("step-000005\n")
    train(r, tmp_path / "resumed", resume=True, show_progress=False)
    one = mx.load(str(tmp_path / "one_run" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "resumed" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    for name in one:
        assert mx.array_equal(one[name], two[name]), name


@pytest.mark.slow
def test_an_existing_run_is_not_overwritten_without_resume(qwen2_moe, data, tmp_path):
    train(recipe(qwen2_moe, data, iters=2, report_every=1, val_every=0), tmp_path, show_progress=False)
    with pytest.raises(MlxMoeError, match="already holds a run"):
        train(recipe(qwen2_moe, data, iters=2), tmp_path, show_progress=False)


KILL_DURING_SAVE = """
import os, signal, sys
import mlx.core as mx
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train
real_save = mx.save_safetensors
calls = {"n": 0}
def dying_save(file, arrays, *a, **k):  # mlxmoe saves through an open file
    calls["n"] += 1
    if calls["n"] > int(os.environ["SAVES_BEFORE_KILL"]):
        file.write(b"half a file")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(file, arrays, *a, **k)
mx.save_safetensors = dying_save
r = load_recipe(None, train=dict(iters=8, batch_size=4, quantize=0, save_every=4, warmup=0,
                                 report_every=4, val_every=0, max_seq_len=64, learning_rate=2e-3,
                                 dtype="float32"))  # the resume below must use the same settings
r.model, r.data = sys.argv[1], sys.argv[2]
train(r, sys.argv[3], show_progress=False)
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_usable(qwen2_moe, data, tmp_path):
    out = tmp_path / "run"
    # The first checkpoint writes 2 safetensors files; die inside the second checkpoint.
    proc = subprocess.run(
        [sys.executable, "-c", KILL_DURING_SAVE, str(qwen2_moe), str(data), str(out)],
        env={**os.environ, "SAVES_BEFORE_KILL": "2"},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000004"
    assert not (checkpoints / "step-000008").exists()
    assert [p.name.split(".")[1] for p in checkpoints.glob(".step-*")] == ["step-000008"]  # its temp
    r = recipe(qwen2_moe, data, iters=8, save_every=4, report_every=4, val_every=0)
    result = train(r, out, resume=True, show_progress=False)
    assert result.steps == 8
    assert not list(checkpoints.glob(".step-*"))  # the killed write's temp is gone


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_the_run_stops_with_a_checkpoint(qwen2_moe, data, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    broken = Path(shutil.copytree(qwen2_moe, tmp_path / "broken"))
    tensors = load_file(broken / "model.safetensors")
    tensors["lm_head.weight"][3, 0] = np.nan  # every loss is NaN from here on
    save_file(tensors, broken / "model.safetensors")
    r = recipe(broken, data, iters=20, nan_patience=3, report_every=1)
    result = train(r, tmp_path / "out", show_progress=False)
    assert result.stopped == "3 non-finite steps in a row"
    assert result.steps == 3
    state = json.loads((tmp_path / "out/checkpoints/step-000003/state.json").read_text())
    assert state["state"]["skipped_steps"] == 3
    weights = mx.load(str(tmp_path / "out" / "adapters.safetensors"))
    # no update was applied: every B is still its initial zero
    assert all(mx.all(v == 0).item() for k, v in weights.items() if k.endswith("lora_b"))


@pytest.mark.slow
def test_collapse_alarm_can_stop_the_run(qwen2_moe, data, tmp_path):
    r = recipe(
        qwen2_moe,
        data,
        iters=12,
        report_every=2,
        collapse={"max_expert_share": 0.34, "patience": 2, "action": "stop"},
    )
    result = train(r, tmp_path, show_progress=False)
    assert result.stopped and "router collapse" in result.stopped
    assert result.steps == 4
    assert (tmp_path / "checkpoints" / "step-000004").is_dir()


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_training(qwen2_moe, data, tmp_path):
    train(recipe(qwen2_moe, data, iters=3, val_every=0), tmp_path / "plain", show_progress=False)
    train(
        recipe(qwen2_moe, data, iters=3, val_every=0, grad_checkpoint=True),
        tmp_path / "ckpt",
        show_progress=False,
    )
    a = mx.load(str(tmp_path / "plain" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "ckpt" / "adapters.safetensors"))
    for name in a:
        assert mx.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.slow
def test_cli_trains_from_a_recipe_with_flags_overriding(qwen2_moe, data, tmp_path):
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        "lora:\n  strategy: attention\ntrain:\n  iters: 50\n  quantize: 0\n"
        "  report_every: 1\n  val_every: 0\n  max_seq_len: 64\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxmoe",
            "train",
            "--model",
            str(qwen2_moe),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--recipe",
            str(recipe_file),
            "--iters",
            "2",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training summary" in proc.stdout
    assert read_adapter_config(tmp_path / "out")["strategy"] == "attention"
    assert len(metrics(tmp_path / "out")) == 2


@pytest.mark.slow
def test_bad_data_line_is_reported_by_file_and_line(qwen2_moe, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "fine"}\n{"prompt": "no completion"}\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxmoe",
            "train",
            "--model",
            str(qwen2_moe),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "out"),
            "--iters",
            "1",
            "--quantize",
            "none",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "train.jsonl:2" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_training_process_never_loads_a_tokenizer(qwen2_moe, data, tmp_path):
    """Token ids come from a child process: transformers and mlx-lm (~300 MB resident with
    torch) never enter the trainer."""
    argv = [
        "mlxmoe",
        "train",
        "--model",
        str(qwen2_moe),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
        "--iters",
        "1",
        "--quantize",
        "none",
    ]
    code = (
        f"import runpy, sys\nsys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('mlxmoe', run_name='__main__')\nexcept SystemExit as e:\n"
        "    assert not e.code, e.code\n"
        "print('LOADED', sorted(m for m in ('transformers', 'torch', 'mlx_lm') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "MLXMOE_BLAS": "bundled"},
    )  # no re-exec
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "training summary" in proc.stdout
    assert "LOADED []" in proc.stdout


@pytest.mark.slow
def test_a_model_folder_without_a_tokenizer_is_refused(qwen2_moe, data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(qwen2_moe, bare)
    for name in ("tokenizer.json", "tokenizer.model"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(MlxMoeError, match=f"^{re.escape(str(bare))}: the model folder ships no tokenizer"):
        train(recipe(bare, data, iters=1), tmp_path / "out", show_progress=False)


@pytest.mark.parametrize("mac", [False, True], ids=["float32", "bfloat16-over-4-bit"])
@pytest.mark.slow
def test_a_compiled_step_trains_the_same_under_the_grouped_dispatch_as_under_gather(
    qwen2_moe, data, tmp_path, mac
):
    """The grouped dispatch's shapes do not follow the routing, so the step compiles with it;
    the Mac's configuration (bfloat16 over a 4-bit base) runs it on the CPU too."""
    mac_settings = dict(dtype="bfloat16", quantize=4, group_size=32) if mac else {}
    losses = {}
    for dispatch in ("gather", "grouped"):
        r = recipe(
            qwen2_moe, data, iters=4, report_every=1, val_every=0, moe_dispatch=dispatch, **mac_settings
        )
        assert r.train.compile
        train(r, tmp_path / dispatch, show_progress=False)
        losses[dispatch] = [row["loss"] for row in metrics(tmp_path / dispatch)]
    assert len(losses["grouped"]) == 4 and losses["grouped"][-1] < losses["grouped"][0]
    np.testing.assert_allclose(losses["grouped"], losses["gather"], rtol=2e-2 if mac else 1e-4)
