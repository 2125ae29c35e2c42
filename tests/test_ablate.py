"""`mlxmoe ablate` on tiny models: every strategy on one budget, one held-out file, a table
made of the evaluations' own numbers, plots, resume, and the strategies a model cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import pytest
from matplotlib.image import imread
from tiny_models import make_hf_model, make_trainable_checkpoint, save, write_qa_data

from mlxmoe.ablate import DEFAULT_STRATEGIES, EVAL_COLUMNS, TRAIN_COLUMNS, ablate
from mlxmoe.adapt.files import read_adapter_config
from mlxmoe.errors import MlxMoeError
from mlxmoe.evaluate import evaluate
from mlxmoe.recipe import load_recipe

RECIPE = """\
lora:
  rank: 4
train:
  iters: 6
  batch_size: 4
  learning_rate: 2.0e-3
  warmup: 0
  quantize: 0
  max_seq_len: 64
  report_every: 2
  val_every: 0
  save_every: 3
"""
NAMES = ["base", *DEFAULT_STRATEGIES]


def make_recipe(path: Path, model: Path, data: Path, **train):
    recipe = load_recipe(path, train=train)
    recipe.model, recipe.data = str(model), str(data)
    return recipe


def run_cli(*args):
    from click.testing import CliRunner

    from mlxmoe.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def ablation_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ablate")
    model = make_trainable_checkpoint("qwen2_moe", root / "qwen2_moe")
    data = write_qa_data(root / "data", n_train=32, n_valid=8)
    lines = (data / "valid.jsonl").read_text().splitlines()
    (data / "test.jsonl").write_text("\n".join(lines[:5]) + "\n")  # preferred over valid.jsonl
    (root / "recipe.yaml").write_text(RECIPE)
    return root, model, data


@pytest.fixture(scope="module")
def finished(ablation_setup):
    """One whole ablation of the default strategies on a Qwen2-MoE (it has a shared expert)."""
    root, model, data = ablation_setup
    notes: list[str] = []
    result = ablate(
        make_recipe(root / "recipe.yaml", model, data),
        root / "out",
        max_new_tokens=4,
        show_progress=False,
        note=notes.append,
    )
    return result, notes


def record(out: Path, name: str) -> dict:
    return json.loads((out / name / "eval.json").read_text())


@pytest.mark.slow
def test_every_strategy_trains_on_the_same_data_budget_and_seed(ablation_setup, finished):
    root, model, data = ablation_setup
    result, _ = finished
    assert [row.name for row in result.rows] == NAMES
    recipes = {}
    for strategy in DEFAULT_STRATEGIES:
        run = result.out_dir / strategy
        config = read_adapter_config(run)
        assert config["strategy"] == strategy and config["steps"] == 6
        assert config["base_model"] == str(model)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [2, 4, 6]
        saved = json.loads((run / "checkpoints/step-000006/state.json").read_text())["recipe"]
        assert saved["lora"].pop("strategy") == strategy
        recipes[strategy] = saved
    first = recipes["attention"]
    assert first["data"] == {"path": str(data), "thinking": "off"}
    assert first["train"]["seed"] == 0 and first["train"]["iters"] == 6
    assert all(saved == first for saved in recipes.values())
    assert "router" in str(read_adapter_config(result.out_dir / "experts+router")["targets"])
    assert "shared_expert" in str(read_adapter_config(result.out_dir / "shared")["targets"])
    trainable = {row.name: row.trainable for row in result.rows}
    assert trainable["base"] is None
    assert trainable["attention"] < trainable["shared"] and trainable["attention"] < trainable["experts"]


@pytest.mark.slow
def test_the_table_is_each_evaluation_on_the_same_held_out_file(ablation_setup, finished):
    root, model, data = ablation_setup
    result, _ = finished
    assert result.eval_data == data / "test.jsonl"
    for name in NAMES:
        report = record(result.out_dir, name)["eval"]
        assert report["data"] == str(data / "test.jsonl") and report["samples"] == 5
        assert report["adapter"] == (None if name == "base" else str(result.out_dir / name))
    rows = {row.name: row for row in result.rows}
    # Independent evaluations of two configurations give the table's numbers.
    base = evaluate(model, data / "test.jsonl", max_seq_len=64, generate=False)
    experts = evaluate(
        model, data / "test.jsonl", adapter=result.out_dir / "experts", max_seq_len=64, generate=False
    )
    assert rows["base"].perplexity == pytest.approx(base.perplexity, rel=1e-5)
    assert rows["experts"].perplexity == pytest.approx(experts.perplexity, rel=1e-5)
    assert rows["experts"].spread == pytest.approx(experts.experts["spread"], rel=1e-5)
    for name in DEFAULT_STRATEGIES:  # six steps at a high learning rate already help
        assert rows[name].perplexity < 0.8 * rows["base"].perplexity, name
        assert rows[name].generation_tps > 0 and 0.0 <= rows[name].rouge_l <= 1.0
        assert rows[name].final_loss == pytest.approx(
            json.loads((result.out_dir / name / "metrics.jsonl").read_text().splitlines()[-1])["loss"]
        )


@pytest.mark.slow
def test_json_and_markdown_hold_the_table_and_the_plots_exist(finished):
    result, _ = finished
    table = json.loads((result.out_dir / "ablation.json").read_text())
    assert [row["name"] for row in table["rows"]] == NAMES
    for row in table["rows"]:
        report = record(result.out_dir, row["name"])["eval"]
        assert row["perplexity"] == report["perplexity"] and row["rouge_l"] == report["rouge_l"]
        assert row["spread"] == report["experts"]["spread"]
        assert row["generation_tps"] == report["generation_tps"]
    markdown = (result.out_dir / "ablation.md").read_text()
    for columns, rows in ((EVAL_COLUMNS, result.rows), (TRAIN_COLUMNS, result.rows[1:])):
        assert "| " + " | ".join(header for _, header, _ in columns) + " |" in markdown
        for row in rows:
            assert "| " + " | ".join(row.cell(key, spec) for key, _, spec in columns) + " |" in markdown
    assert "| base |" not in markdown.split("| strategy |")[1]  # the base did not train
    expected = [result.out_dir / s / f for s in DEFAULT_STRATEGIES for f in ("loss.png", "expert_load.png")]
    expected += [result.out_dir / "ablation.png", result.out_dir / "ablation_expert_load.png"]
    assert result.plots == expected
    for path in result.plots:
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400 and pixels.std() > 0.05, path
        assert f"]({path.relative_to(result.out_dir)})" in markdown


@pytest.mark.slow
def test_a_rerun_of_the_cli_reuses_every_finished_configuration(ablation_setup, finished):
    root, model, data = ablation_setup
    result, _ = finished
    stamps = {p: p.stat().st_mtime_ns for name in NAMES for p in (result.out_dir / name).glob("*.*")}
    proc = run_cli(
        "ablate",
        "--model",
        model,
        "--data",
        data,
        "--out",
        result.out_dir,
        "--recipe",
        root / "recipe.yaml",
        "--max-new-tokens",
        4,
        "--no-plots",
    )
    assert proc.exit_code == 0, proc.output + repr(proc.exception)
    for name in NAMES:
        assert f"{name}: done earlier" in proc.output
    assert ": training" not in proc.output and ": evaluating" not in proc.output
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    for _, header, _ in (*EVAL_COLUMNS, *TRAIN_COLUMNS):
        assert header in proc.output
    for row in result.rows:  # every row in full: both tables fit 80 columns
        assert row.name in proc.output
        for key, _, spec in EVAL_COLUMNS[1:]:
            assert row.cell(key, spec) in proc.output, (row.name, key)
        if row.name != "base":
            assert row.cell("trainable", "trainable") in proc.output
    assert f"wrote {result.out_dir / 'ablation.md'}" in proc.output


@pytest.mark.slow
def test_other_settings_in_the_same_out_are_refused(ablation_setup, finished):
    root, model, data = ablation_setup
    result, _ = finished
    with pytest.raises(MlxMoeError, match=r"other settings \(recipe.train.iters: 6 before, 8 now"):
        ablate(
            make_recipe(root / "recipe.yaml", model, data, iters=8),
            result.out_dir,
            max_new_tokens=4,
            show_progress=False,
        )


@pytest.mark.slow
def test_an_interrupted_ablation_resumes_where_it_stopped(ablation_setup, finished, tmp_path):
    root, model, data = ablation_setup
    result, _ = finished
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(result.out_dir / "ablation_settings.json", out)
    shutil.copytree(result.out_dir / "base", out / "base")
    # attention: killed during its evaluation; experts: killed at step 5, after the step-3
    # checkpoint (metrics.jsonl still holds the rows of steps 4 and 6 as the killed run left them).
    shutil.copytree(result.out_dir / "attention", out / "attention")
    (out / "attention" / "eval.json").unlink()
    shutil.copytree(result.out_dir / "experts", out / "experts")
    experts = out / "experts"
    for name in ("eval.json", "adapters.safetensors", "adapter_config.json"):
        (experts / name).unlink()
    shutil.rmtree(experts / "checkpoints" / "step-000006")
    (experts / "checkpoints" / "latest").write_text("step-000003\n")
    # experts+router: killed before its first checkpoint, with a report row already written.
    (out / "experts+router").mkdir()
    (out / "experts+router" / "metrics.jsonl").write_text(
        (result.out_dir / "experts+router" / "metrics.jsonl").read_text().splitlines()[0] + "\n"
    )

    notes: list[str] = []
    again = ablate(
        make_recipe(root / "recipe.yaml", model, data),
        out,
        ["attention", "experts", "experts+router"],
        max_new_tokens=4,
        show_progress=False,
        plots=False,
        note=notes.append,
    )
    assert "base: done earlier" in notes[0]
    assert f"attention: resuming {out / 'attention'} from step-000006" in notes
    assert f"experts: resuming {experts} from step-000003" in notes
    assert f"experts+router: training 6 steps into {out / 'experts+router'}" in notes
    for name in ("attention", "experts", "experts+router"):
        one, two = (mx.load(str(d / name / "adapters.safetensors")) for d in (result.out_dir, out))
        assert one.keys() == two.keys()
        assert all(mx.array_equal(one[k], two[k]) for k in one), name  # as if never interrupted
        rows = (out / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in rows] == [2, 4, 6], name
    rows = {row.name: row for row in again.rows}
    assert [row.name for row in again.rows] == ["base", "attention", "experts", "experts+router"]
    before = {row.name: row for row in result.rows}
    for name in rows:
        assert rows[name].perplexity == pytest.approx(before[name].perplexity, rel=1e-5)


@pytest.mark.slow
def test_shared_is_skipped_with_a_note_on_a_model_without_a_shared_expert(ablation_setup, tmp_path):
    root, _, data = ablation_setup
    model = make_trainable_checkpoint("mixtral", tmp_path / "mixtral")
    notes: list[str] = []
    result = ablate(
        make_recipe(root / "recipe.yaml", model, data, iters=2, report_every=1),
        tmp_path / "out",
        "attention,shared",
        max_new_tokens=2,
        limit=2,
        show_progress=False,
        plots=False,
        note=notes.append,
    )
    assert [row.name for row in result.rows] == ["base", "attention"]
    assert "no shared expert" in result.skipped["shared"]
    assert notes[0] == f"shared: skipped: {result.skipped['shared']}"
    assert not (tmp_path / "out" / "shared").exists()
    markdown = (tmp_path / "out" / "ablation.md").read_text()
    assert f"- `shared` skipped: {result.skipped['shared']}" in markdown
    assert json.loads((tmp_path / "out" / "ablation.json").read_text())["skipped"] == result.skipped


def test_what_cannot_be_compared_is_refused_before_any_training(ablation_setup, tmp_path):
    root, model, data = ablation_setup
    recipe = make_recipe(root / "recipe.yaml", model, data)
    with pytest.raises(MlxMoeError, match=r"unknown strategies 'routr' \(choose from: attention"):
        ablate(recipe, tmp_path / "a", "experts,routr")
    dense = save(make_hf_model("llama"), tmp_path / "llama")
    with pytest.raises(MlxMoeError, match="dense llama model has no experts"):
        ablate(make_recipe(root / "recipe.yaml", dense, data), tmp_path / "b")
    with pytest.raises(MlxMoeError, match="needs held-out data"):
        ablate(make_recipe(root / "recipe.yaml", model, data / "train.jsonl"), tmp_path / "c")
    recipe.lora.targets = ["attention"]
    with pytest.raises(MlxMoeError, match="lora.targets"):
        ablate(recipe, tmp_path / "d")
    assert not any(tmp_path.glob("[abcd]"))  # nothing written
