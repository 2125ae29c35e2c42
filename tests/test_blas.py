"""A fast BLAS under MLX on Linux: chosen by MLXMOE_BLAS, preloaded by re-executing the
command, checked against numpy, and training computes the same losses with it.

The end-to-end tests need a system OpenBLAS (Debian: libopenblas0-pthread, which .ci/run
installs) and skip where there is none; under MLXMOE_REQUIRE=blas (.ci/run) they fail instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import make_trainable_checkpoint, write_qa_data

from mlxmoe import blas

SYSTEM_OPENBLAS = blas.choose_library("auto")


def needs_openblas(test):
    """Skipped without a system OpenBLAS, except under MLXMOE_REQUIRE=blas (.ci/run on Linux)."""
    skip = pytest.mark.skipif(SYSTEM_OPENBLAS is None or not sys.platform.startswith("linux"),
                              reason="no system OpenBLAS (apt-get install libopenblas0-pthread)")
    return pytest.mark.proof("blas")(skip(test))


# What a command sees after the re-exec: the BLAS mapped into it, and the matmul check.
REPORT = """
import json, sys
from mlxmoe import blas
blas.reexec_with_blas()
print(json.dumps({"blas": blas.loaded_blas(), "error": blas.check_matmul()}))
"""


def run_report(setting: str, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.PRELOADED)}
    proc = subprocess.run([sys.executable, "-c", REPORT], env={**env, blas.SETTING: setting, **extra},
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def test_bundled_means_no_library_and_auto_takes_the_first_installed_candidate(tmp_path):
    present = tmp_path / "libblas.so.3"
    present.write_bytes(b"")
    candidates = (str(tmp_path / "missing.so"), str(present))
    assert blas.choose_library("bundled", candidates) is None
    assert blas.choose_library("auto", candidates) == present
    assert blas.choose_library("auto", (str(tmp_path / "missing.so"),)) is None
    assert blas.choose_library(str(present)) == present


def test_a_library_path_that_does_not_exist_is_one_clear_error(tmp_path):
    with pytest.raises(blas.BlasError, match=r"MLXMOE_BLAS=.*nope\.so: no such library"):
        blas.choose_library(str(tmp_path / "nope.so"))


@needs_openblas
def test_auto_reexecutes_with_openblas_mapped_and_its_matmul_checked():
    report = run_report("auto")
    assert report["blas"] == str(SYSTEM_OPENBLAS)
    assert report["error"] < 1e-5


@needs_openblas
def test_bundled_runs_mlx_own_blas():
    assert run_report("bundled")["blas"] == "bundled"


@needs_openblas
def test_a_blas_the_user_preloaded_by_hand_is_recognised_and_checked():
    report = run_report("bundled", LD_PRELOAD=str(SYSTEM_OPENBLAS))
    assert report["blas"] == str(SYSTEM_OPENBLAS) and report["error"] < 1e-5


@needs_openblas
def test_training_with_openblas_and_the_dense_dispatch_gives_the_bundled_losses(tmp_path):
    model = make_trainable_checkpoint("mixtral", tmp_path / "model")
    data = write_qa_data(tmp_path / "data")
    rows, notes = {}, {}
    # the tiny model's experts are small enough for auto to gather: dense is asked for
    dense = tmp_path / "dense.yaml"
    dense.write_text(json.dumps({"train": {"moe_dispatch": "dense"}}))
    for setting, recipe in (("bundled", []), ("auto", ["--recipe", str(dense)])):
        out = tmp_path / setting
        env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.PRELOADED)}
        proc = subprocess.run(
            [sys.executable, "-m", "mlxmoe", "train", "--model", str(model), "--data", str(data),
             "--out", str(out), "--iters", "4", "--batch-size", "4", "--quantize", "none",
             "--no-plots", *recipe],
            env={**env, blas.SETTING: setting, "COLUMNS": "200"}, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        notes[setting] = " ".join((proc.stdout + proc.stderr).split())
        rows[setting] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "BLAS: MLX's bundled reference BLAS" in notes["bundled"]
    assert "MoE dispatch: gather" in notes["bundled"]
    assert f"BLAS: {SYSTEM_OPENBLAS} (preloaded" in notes["auto"]
    assert "MoE dispatch: dense" in notes["auto"]
    assert [r["step"] for r in rows["auto"]] == [r["step"] for r in rows["bundled"]]
    for fast, slow in zip(rows["auto"], rows["bundled"]):
        for key in ("loss", "ce", "aux", "z", "grad_norm"):
            assert fast[key] == pytest.approx(slow[key], rel=1e-4, abs=1e-6), (fast["step"], key)
        assert fast["experts"]["layers"][0]["load"] == pytest.approx(
            slow["experts"]["layers"][0]["load"], abs=1e-6)
    assert Path(tmp_path / "auto" / "adapters.safetensors").is_file()
