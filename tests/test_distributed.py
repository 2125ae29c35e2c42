"""Data-parallel training: real ranks started by `mlx.launch` (ring backend, 127.0.0.1).

The reference is always one process on the concatenated batch: N ranks of B must train like
one process of N*B, which holds only if gradients and the router losses are pooled right.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml
from local_ranks import LAUNCH, TRAIN_KEEPING_EACH_RANKS_ADAPTERS, launch
from tiny_models import write_qa_data

from mlxmoe.recipe import RecipeError, load_recipe
from mlxmoe.train import train

pytestmark = [
    pytest.mark.slow,  # every test launches ranks
    pytest.mark.skipif(not LAUNCH.is_file(), reason="mlx.launch is not installed"),
]

# experts+router with a large aux_coef: the balance loss moves the router, so a wrongly
# pooled balance loss shows in the adapters (balance_scope micro differs by ~4e-2 here).
SETTINGS = {
    "lora": {"strategy": "experts+router"},
    "loss": {"aux_coef": 0.5},
    "train": {
        "iters": 6,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "warmup": 0,
        "quantize": 0,
        "dtype": "float32",
        "report_every": 1,
        "val_every": 3,
        "save_every": 3,
        "max_seq_len": 64,
    },
}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def one_process(model: Path, data: Path, out: Path, settings: dict) -> None:
    r = load_recipe(None, **settings)
    r.model, r.data = str(model), str(data)
    train(r, out, show_progress=False)


def assert_same_training(one: Path, two: Path, steps: list[int]) -> float:
    """Same loss curve and expert load, step by step; returns the adapters' max difference."""
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == steps == [r["step"] for r in a][-len(steps) :]
    for x, y in zip(a[-len(steps) :], b):
        for key in ("loss", "ce", "aux", "z", "grad_norm", "val_loss"):
            assert (key in x) == (key in y), key
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-6), (x["step"], key)
        for la, lb in zip(x["experts"]["layers"], y["experts"]["layers"]):
            assert la["tokens"] == lb["tokens"]
            np.testing.assert_allclose(lb["load"], la["load"], atol=1e-7)
    wa = mx.load(str(one / "adapters.safetensors"))
    wb = mx.load(str(two / "adapters.safetensors"))
    assert wa.keys() == wb.keys()
    return max(mx.abs(wa[k] - wb[k]).max().item() for k in wa)


def test_two_ranks_of_batch_b_train_like_one_process_of_batch_2b(qwen2_moe, data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(TRAIN_KEEPING_EACH_RANKS_ADAPTERS)
    output = launch(str(script), str(qwen2_moe), str(data), str(tmp_path / "two"), json.dumps(SETTINGS))
    assert "rank 0 of 2 finished 6 steps" in output and "rank 1 of 2 finished 6 steps" in output, output
    one_process(qwen2_moe, data, tmp_path / "one", SETTINGS)

    diff = assert_same_training(tmp_path / "one", tmp_path / "two", steps=[1, 2, 3, 4, 5, 6])
    print(f"2 ranks of B vs 1 process of 2B, 6 Adam steps: adapters max-abs {diff:.1e}")
    assert diff < 1e-4, diff  # float32 sums in another order, through 6 Adam steps
    # Every rank holds the same adapters (bit for bit), and only rank 0 wrote the run.
    rank0 = mx.load(str(tmp_path / "two.rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "two.rank1.safetensors"))
    assert all(mx.array_equal(rank0[k], rank1[k]).item() for k in rank0)
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        "latest",
        "step-000003",
        "step-000006",
    ]
    row = metrics(tmp_path / "two")[-1]
    assert [r["rank"] for r in row["ranks"]] == [0, 1]
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_gb"] > 0 for r in row["ranks"])
    assert row["comm_s"] >= 0 and row["tokens_per_s"] > 0


GLOBAL_BALANCE = """
import json, sys
import mlx.core as mx, numpy as np
from mlxmoe.losses import (expert_counts, load_balancing_loss, load_balancing_share,
                           router_z_loss, router_z_share)
world = mx.distributed.init()
rank, size = world.rank(), world.size()
rng = np.random.default_rng(0)
E, k, D, B, L = 6, 2, 16, 4, 12
W = mx.array(rng.normal(size=(E, D)).astype(np.float32))
x = [mx.array(rng.normal(size=(B, L, D)).astype(np.float32)) for _ in range(3)]  # 3 layers
mask = np.ones((B, L), np.float32)
mask[1, 7:] = mask[2, 3:] = mask[3, 10:] = 0  # padding, unevenly spread over the ranks
mask = mx.array(mask)
shard = slice(rank * B // size, (rank + 1) * B // size)

def whole(W):  # one process, the concatenated batch
    logits = [h @ W.T for h in x]
    return load_balancing_loss(logits, k, mask), router_z_loss(logits, mask)

def share(W):  # this rank's part of the batch
    logits = [h[shard] @ W.T for h in x]
    counts = mx.distributed.all_sum(expert_counts(logits, k, mask[shard]).sum(axis=0))
    tokens = mx.distributed.all_sum(mask[shard].sum())
    return (load_balancing_share(logits, k, mask[shard], counts, tokens),
            router_z_share(logits, mask[shard], tokens))

def micro(W):  # each rank's own batch, averaged over ranks
    logits = [h[shard] @ W.T for h in x]
    return load_balancing_loss(logits, k, mask[shard]) / size, router_z_loss(logits, mask[shard]) / size

report = {}
for name, fn in (("whole", whole), ("global", share), ("micro", micro)):
    for term in (0, 1):
        value, grad = mx.value_and_grad(lambda W: fn(W)[term])(W)
        if name != "whole":
            value, grad = mx.distributed.all_sum(value), mx.distributed.all_sum(grad)
        report[f"{name}_{term}"] = {"value": value.item(), "grad": np.array(grad).tolist()}
if rank == 0:
    print("REPORT " + json.dumps(report), flush=True)
"""


def test_global_balance_loss_of_two_ranks_equals_the_loss_of_the_concatenated_batch(tmp_path):
    script = tmp_path / "balance.py"
    script.write_text(GLOBAL_BALANCE)
    output = launch(str(script))
    lines = [line for line in output.splitlines() if line.startswith("REPORT ")]
    assert lines, output
    report = json.loads(lines[0][len("REPORT ") :])
    for term in (0, 1):  # 0: load balancing, 1: z
        whole, pooled = report[f"whole_{term}"], report[f"global_{term}"]
        assert pooled["value"] == pytest.approx(whole["value"], rel=1e-6)
        np.testing.assert_allclose(pooled["grad"], whole["grad"], rtol=1e-5, atol=1e-6)
    # The per-rank (micro) loss is another loss: the comparison above can tell them apart.
    assert abs(report["micro_0"]["value"] - report["whole_0"]["value"]) > 1e-3


DIE_AT_STEP = """
import os, signal, sys
from mlxmoe.train import step
from mlxmoe.train.distributed import World
real_step = step.Stepper.step
calls = {"n": 0}
def step_or_die(self, batches):
    calls["n"] += 1
    if self.world.rank == 1 and calls["n"] == int(os.environ["DIE_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, batches)
step.Stepper.step = step_or_die
from mlxmoe.cli import main
sys.argv = ["mlxmoe", *sys.argv[1:]]
main()
"""


def test_a_rank_that_dies_stops_the_run_with_a_clear_error_and_resume_finishes_it(qwen2_moe, data, tmp_path):
    settings = json.loads(json.dumps(SETTINGS))
    settings["train"].update(iters=8, grad_accum=2, save_every=4, report_every=2, val_every=0)
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(settings))
    run = [
        "train",
        "--model",
        str(qwen2_moe),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "two"),
        "--recipe",
        str(recipe_file),
    ]
    script = tmp_path / "die.py"
    script.write_text(DIE_AT_STEP)
    os.environ["DIE_AT_STEP"] = "6"  # rank 1 dies entering step 6: checkpoint 4 is complete
    try:
        output = launch(str(script), *run)
    finally:
        del os.environ["DIE_AT_STEP"]
    assert "Node with rank 1 exited with code -9" in output, output
    message = " ".join(output.split())  # rich wraps long lines
    # rank 1 finished step 5; rank 0 may be stopped just before counting its own step 5
    assert "error: rank 0 of 2" in message and re.search(r"after [45] steps", message), output
    last = tmp_path / "two" / "checkpoints" / "step-000004"
    assert f"the last checkpoint is {last}" in message
    assert "--resume" in message and "Traceback" not in output
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step-000004"
    assert not (tmp_path / "two" / "adapters.safetensors").exists()

    # The checkpoint is whole: resuming on 2 ranks ends where one uninterrupted process does.
    output = launch("-m", "mlxmoe", *run, "--resume")
    assert "training summary" in output, output
    one_process(qwen2_moe, data, tmp_path / "one", settings)
    diff = assert_same_training(tmp_path / "one", tmp_path / "two", steps=[2, 4, 6, 8])
    assert diff < 1e-4, diff


def test_balance_scope_is_global_or_micro():
    assert load_recipe(None).loss.balance_scope == "global"
    assert load_recipe(None, loss={"balance_scope": "micro"}).loss.balance_scope == "micro"
    with pytest.raises(RecipeError, match="balance_scope"):
        load_recipe(None, loss={"balance_scope": "rank"})


def test_batch_size_must_split_over_the_ranks(qwen2_moe, data, tmp_path):
    settings = json.loads(json.dumps(SETTINGS))
    settings["train"]["batch_size"] = 3
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(settings))
    output = launch(
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
    )
    assert "batch_size 3 does not split over 2 ranks" in " ".join(output.split()), output
    assert not (tmp_path / "out").exists()


EACH_RANK_ITS_OWN_DATA = """
import os, sys
from mlxmoe.errors import MlxMoeError
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train
r = load_recipe(None, train=dict(iters=2, batch_size=4, quantize=0, max_seq_len=64, val_every=0))
r.model, r.data = sys.argv[1], sys.argv[2 + int(os.environ["MLX_RANK"])]
try:
    train(r, sys.argv[4], show_progress=False)
except MlxMoeError as exc:
    print(f"error: {exc}", flush=True)
"""


def test_ranks_that_see_different_data_refuse_to_train(qwen2_moe, data, tmp_path):
    other = write_qa_data(tmp_path / "other", n_train=40)  # a stale copy on the second Mac
    script = tmp_path / "run.py"
    script.write_text(EACH_RANK_ITS_OWN_DATA)
    output = launch(str(script), str(qwen2_moe), str(data), str(other), str(tmp_path / "out"))
    assert output.count("error: the base model, data or recipe differ between rank 0 and rank(s) [1]") == 2, (
        output
    )
    assert not (tmp_path / "out" / "checkpoints").exists()
