"""Faults: `kill -9` at chosen points of training and export, then carry on as a user would.

A seeded generator draws the points from those that leave different states behind: between
steps (before the first checkpoint, and after), inside a checkpoint's safetensors writes,
between a checkpoint's folder and its ``latest`` pointer, inside the final adapters' write,
inside a GGUF's metadata or tensor data, and just before its rename. The process stops itself
at its point (SIGSTOP) and the test kills it with SIGKILL: the point is exact, the kill real.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml
from assets import mixtral_tokenizer_folder
from local_ranks import LAUNCH, launch
from test_distributed import SETTINGS as RANK_SETTINGS
from test_distributed import assert_same_training, one_process
from tiny_models import make_hf_model, save

from mlxmoe.atomic import temp_file_pattern
from mlxmoe.gguf.export import export_gguf
from mlxmoe.train.state import latest_checkpoint

SEED = 21  # of the fault points; another seed draws other points, each must pass

# What every faulty child runs first: MLXMOE_FAULT says where it stops for the test to kill it.
STOP = """
import os, signal, sys
fault = os.environ.get("MLXMOE_FAULT", "").split()
def stop():
    print("FAULT " + " ".join(fault), flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # the test sends SIGKILL
"""

TRAIN_WITH_A_FAULT = (
    STOP
    + """
import mlx.core as mx
from mlxmoe.train import loop, state
if fault[:1] == ["step"]:  # after step N, before step N+1 (after checkpoint N, if any)
    real_seed = loop.step_seed
    def step_seed(seed, step, rank=0):
        if step == int(fault[1]):
            stop()
        return real_seed(seed, step, rank)
    loop.step_seed = step_seed
elif fault[:1] in (["write"], ["final"]):  # a safetensors file cut at a fraction of its bytes
    real_save = mx.save_safetensors
    def save(file, arrays, *args, **kwargs):  # mlxmoe saves through an open file
        real_save(file, arrays, *args, **kwargs)
        name, folder = os.path.basename(file.name), os.path.basename(os.path.dirname(file.name))
        if (fault[0] == "final" and name.startswith(".adapters.tmp-")) or (
                fault[0] == "write" and folder.startswith(f".step-{int(fault[1]):06d}.")
                and name == fault[2]):
            file.flush()
            file.truncate(int(file.tell() * float(fault[-1])))
            stop()
    mx.save_safetensors = save
elif fault[:1] == ["latest"]:  # checkpoint N's folder complete, `latest` still the one before
    real_write = state.write_text_atomic
    def write_text_atomic(target, text):
        if text.strip() == f"step-{int(fault[1]):06d}":
            stop()
        return real_write(target, text)
    state.write_text_atomic = write_text_atomic
from mlxmoe.cli import run
sys.argv = ["mlxmoe", *sys.argv[1:]]
run()
"""
)

EXPORT_WITH_A_FAULT = (
    STOP
    + """
import gguf
if fault[:1] == ["metadata"]:  # the header written, the key-value metadata cut at a fraction
    def write_kv_data_to_file(self):
        kv = b"".join(self._pack_val(key, gguf.GGUFValueType.STRING, add_vtype=False)
                      + self._pack_val(v.value, v.type, add_vtype=True, sub_type=v.sub_type)
                      for key, v in self.kv_data[0].items())
        self.fout[0].write(kv[:int(len(kv) * float(fault[1]))])
        self.fout[0].flush()
        stop()
    gguf.GGUFWriter.write_kv_data_to_file = write_kv_data_to_file
elif fault[:1] == ["tensor"]:  # tensors before N written, N's data cut at a fraction
    real_write = gguf.GGUFWriter.write_tensor_data
    written = {"n": 0}
    def write_tensor_data(self, tensor, *args, **kwargs):
        if written["n"] == int(fault[1]):
            data = tensor.tobytes()
            self.fout[0].write(data[:int(len(data) * float(fault[2]))])
            self.fout[0].flush()
            stop()
        written["n"] += 1
        return real_write(self, tensor, *args, **kwargs)
    gguf.GGUFWriter.write_tensor_data = write_tensor_data
elif fault[:1] == ["rename"]:  # the whole file written, fsynced and checked, not renamed
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".gguf"):
            stop()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
from mlxmoe.cli import run
sys.argv = ["mlxmoe", *sys.argv[1:]]
run()
"""
)


def run_to_fault(argv: list[str], fault: str, log: Path, timeout: float = 180) -> tuple[int, str]:
    """Runs ``argv``; when it stops at ``fault``, kills it with SIGKILL. Returns its exit
    status (negative: the signal that ended it) and what it printed."""
    # bundled BLAS: no re-exec, and every run of a test multiplies on the same library
    env = {**os.environ, "MLXMOE_BLAS": "bundled", "MLXMOE_FAULT": fault, "COLUMNS": "200"}
    with log.open("w") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG | os.WUNTRACED)
        if pid and os.WIFSTOPPED(status):
            os.kill(proc.pid, signal.SIGKILL)
            _, status = os.waitpid(proc.pid, 0)
        if pid:
            break
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            raise AssertionError(f"{argv} still running after {timeout} s: {log.read_text()}")
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return proc.returncode, log.read_text()


def hidden_entries(folder: Path) -> list[Path]:
    """What an interrupted atomic write leaves: hidden temporaries, anywhere below."""
    return sorted(folder.rglob(".*"))


# --- training -----------------------------------------------------------------------------

ITERS, SAVE_EVERY, REPORT_EVERY = 12, 4, 2
TRAIN = {
    "train": {
        "iters": ITERS,
        "batch_size": 4,
        "learning_rate": 2e-3,
        "warmup": 0,
        "quantize": 0,
        "dtype": "float32",
        "report_every": REPORT_EVERY,
        "val_every": 0,
        "save_every": SAVE_EVERY,
        "max_seq_len": 64,
    },
    "lora": {"dropout": 0.1},
}  # dropout: the resumed steps must draw the same masks


def training_faults(rng: random.Random) -> list[str]:
    """Four kills in the order an uninterrupted run would reach them."""
    # before the first checkpoint, after a report: metrics.jsonl holds a row already
    first = f"step {rng.randrange(REPORT_EVERY, SAVE_EVERY)}"
    at = rng.randrange(SAVE_EVERY, ITERS, SAVE_EVERY)
    part = rng.choice(["adapters.safetensors", "optimizer.safetensors"])
    write = f"write {at} {part} {rng.uniform(0.1, 0.9):.2f}"
    later = rng.choice(
        [f"step {s}" for s in range(at, ITERS)] + [f"latest {c}" for c in range(at, ITERS + 1, SAVE_EVERY)]
    )
    return [first, write, later, f"final {rng.uniform(0.1, 0.9):.2f}"]


def assert_left_behind(out: Path, fault: str) -> None:
    """The kill interrupted what ``fault`` names: the state a resume must cope with."""
    kind, *args = fault.split()
    checkpoints = out / "checkpoints"
    latest = latest_checkpoint(out)
    if kind == "step" and int(args[0]) < SAVE_EVERY:
        assert latest is None and (out / "metrics.jsonl").read_text().strip(), fault
    elif kind == "step":
        assert latest.name == f"step-{int(args[0]) // SAVE_EVERY * SAVE_EVERY:06d}", fault
    elif kind == "write":
        assert latest.name == f"step-{int(args[0]) - SAVE_EVERY:06d}", fault
        temp = list(checkpoints.glob(f".step-{int(args[0]):06d}.*.tmp"))
        assert len(temp) == 1 and (temp[0] / args[1]).is_file(), fault
    elif kind == "latest":
        assert latest.name == f"step-{int(args[0]) - SAVE_EVERY:06d}", fault
        assert (checkpoints / f"step-{int(args[0]):06d}" / "state.json").is_file(), fault
    else:
        assert latest.name == f"step-{ITERS:06d}" and not (out / "adapters.safetensors").exists()
        assert len(list(out.glob(".adapters.tmp-*.safetensors"))) == 1, fault


def loss_rows(out: Path) -> list[tuple]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["ce"], r["aux"], r["z"], r["grad_norm"]) for r in rows]


@pytest.mark.slow
def test_training_killed_at_random_points_resumes_to_the_uninterrupted_adapters_bit_for_bit(
    qwen2_moe, data, tmp_path
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TRAIN))
    script = tmp_path / "train_with_a_fault.py"
    script.write_text(TRAIN_WITH_A_FAULT)

    def mlxmoe_train(out: Path, *flags: str, fault: str = "") -> tuple[int, str]:
        return run_to_fault(
            [
                sys.executable,
                str(script),
                "train",
                "--model",
                str(qwen2_moe),
                "--data",
                str(data),
                "--out",
                str(out),
                "--recipe",
                str(recipe),
                "--no-plots",
                *flags,
            ],
            fault,
            tmp_path / "log",
        )

    code, output = mlxmoe_train(tmp_path / "whole")
    assert code == 0, output

    out = tmp_path / "killed"
    faults = training_faults(random.Random(SEED))
    print(f"kills (seed {SEED}): {faults}")
    for i, fault in enumerate([*faults, ""]):
        flags = ["--resume"] if i else []
        if i and latest_checkpoint(out) is None:  # killed before its first checkpoint
            code, output = mlxmoe_train(out, "--resume")
            assert code == 2 and "nothing to resume" in output, output
            assert "without --resume" in " ".join(output.split()), output
            flags = []
        code, output = mlxmoe_train(out, *flags, fault=fault)
        if fault:
            assert code == -signal.SIGKILL and f"FAULT {fault}" in output, (fault, output)
            assert_left_behind(out, fault)
        else:
            assert code == 0 and "training summary" in output, output

    whole = mx.load(str(tmp_path / "whole" / "adapters.safetensors"))
    resumed = mx.load(str(out / "adapters.safetensors"))
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert mx.array_equal(whole[name], resumed[name]).item(), name
    assert loss_rows(out) == loss_rows(tmp_path / "whole")  # each report once, the same bits
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        "step-000004",
        "step-000008",
        "step-000012",
    ]
    assert hidden_entries(out) == []


# --- export -------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_killed_at_random_points_never_leaves_a_half_gguf_and_the_next_one_succeeds(tmp_path):
    # a family and tokenizer llama.cpp reads (tests/test_export.py)
    model = save(
        make_hf_model("mixtral", vocab_size=mixtral_tokenizer_folder(tmp_path / "model")), tmp_path / "model"
    )
    whole = {t: export_gguf(model, tmp_path / f"whole-{t}.gguf", t) for t in ("f16", "q8_0")}
    expected = {t: report.path.read_bytes() for t, report in whole.items()}
    assert expected["f16"] != expected["q8_0"]
    rng = random.Random(SEED)
    tensors = rng.sample(range(whole["f16"].tensors), 2)
    faults = [
        f"metadata {rng.uniform(0.1, 0.9):.2f}",
        "rename",
        *(f"tensor {k} {rng.uniform(0.1, 0.9):.2f}" for k in tensors),
    ]
    rng.shuffle(faults)
    print(f"kills (seed {SEED}): {faults}")
    script = tmp_path / "export_with_a_fault.py"
    script.write_text(EXPORT_WITH_A_FAULT)
    target = tmp_path / "out" / "model.gguf"
    temp = temp_file_pattern(target)

    def mlxmoe_export(file_type: str, fault: str = "") -> tuple[int, str]:
        return run_to_fault(
            [
                sys.executable,
                str(script),
                "export",
                "--model",
                str(model),
                "--gguf",
                str(target),
                "--type",
                file_type,
            ],
            fault,
            tmp_path / "log",
        )

    # Two kills with no file at the target, then an export; two over that file, then another.
    for file_type, kills in (("f16", faults[:2]), ("q8_0", faults[2:])):
        before = target.read_bytes() if target.exists() else None
        for fault in kills:
            code, output = mlxmoe_export(file_type, fault)
            assert code == -signal.SIGKILL and f"FAULT {fault}" in output, (fault, output)
            left = [p for p in target.parent.iterdir() if temp.fullmatch(p.name)]
            assert len(left) == 1 and left[0].stat().st_size > 0, (fault, left)  # one kill's
            if before is None:
                assert not target.exists(), fault
            else:
                assert target.read_bytes() == before, fault
        code, output = mlxmoe_export(file_type)
        assert code == 0, output
        assert target.read_bytes() == expected[file_type]
        assert [p.name for p in target.parent.iterdir()] == [target.name]


# --- data-parallel ------------------------------------------------------------------------

# Rank 1 dies inside step DIE_AT_STEP: its micro-batches' forward and backward done, its
# gradients not yet sent (rank 0 waits for them in the all_sum).
DIE_MID_STEP = """
import os, signal, sys
from mlxmoe.train import step
from mlxmoe.train.distributed import World
real_step, real_sum = step.Stepper.step, World.sum_tree
steps = {"n": 0, "dying": False}
def counted_step(self, batches):
    steps["n"] += 1
    steps["dying"] = self.world.rank == 1 and steps["n"] == int(os.environ["DIE_AT_STEP"])
    return real_step(self, batches)
def sum_or_die(self, tree):
    if steps["dying"]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real_sum(self, tree)
step.Stepper.step, World.sum_tree = counted_step, sum_or_die
from mlxmoe.cli import main
sys.argv = ["mlxmoe", *sys.argv[1:]]
main()
"""

RANKS = json.loads(json.dumps(RANK_SETTINGS))  # experts+router, no dropout: ranks draw alike
RANKS["train"].update(iters=6, grad_accum=2, save_every=2, report_every=1, val_every=0)


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH.is_file(), reason="mlx.launch is not installed")
def test_a_run_killed_mid_step_resumes_on_another_number_of_ranks(qwen2_moe, data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLXMOE_BLAS", "bundled")  # every rank and process: no re-exec
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RANKS))
    out = tmp_path / "run"
    run = [
        "train",
        "--model",
        str(qwen2_moe),
        "--data",
        str(data),
        "--out",
        str(out),
        "--recipe",
        str(recipe),
        "--no-plots",
    ]
    checkpoints = out / "checkpoints"

    # 2 ranks; rank 1 dies inside step 4.
    script = tmp_path / "die.py"
    script.write_text(DIE_MID_STEP)
    monkeypatch.setenv("DIE_AT_STEP", "4")
    output = launch(str(script), *run)
    monkeypatch.delenv("DIE_AT_STEP")
    assert "Node with rank 1 exited with code -9" in output, output
    assert (checkpoints / "latest").read_text().strip() == "step-000002"

    # 2 -> 1: one process resumes from step 2; killed after step 5.
    train_script = tmp_path / "train_with_a_fault.py"
    train_script.write_text(TRAIN_WITH_A_FAULT)
    code, output = run_to_fault(
        [sys.executable, str(train_script), *run, "--resume"], "step 5", tmp_path / "log"
    )
    assert code == -signal.SIGKILL and "FAULT step 5" in output, output
    assert "data-parallel" not in output
    assert (checkpoints / "latest").read_text().strip() == "step-000004"

    # 1 -> 2: two ranks resume from step 4 and finish.
    output = launch("-m", "mlxmoe", *run, "--resume")
    assert "data-parallel on 2 ranks" in " ".join(output.split()), output
    assert "training summary" in output and "error:" not in output, output

    # The global batch is the recipe's on any number of ranks: the same training as one
    # process never stopped (steps 1-2 on 2 ranks, 3-4 on one, 5-6 on 2 again).
    one_process(qwen2_moe, data, tmp_path / "one", RANKS)
    diff = assert_same_training(tmp_path / "one", out, steps=[1, 2, 3, 4, 5, 6])
    print(f"2 -> 1 -> 2 ranks, killed twice: adapters max-abs {diff:.1e} vs one process")
    assert diff < 1e-4, diff
    assert hidden_entries(out) == []
