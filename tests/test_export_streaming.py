"""GGUF export streams: tensors are read, merged, encoded and written one at a time, so its
peak memory follows the largest tensor, not the checkpoint file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from assets import mixtral_tokenizer_folder
from tiny_models import make_hf_model, save

# Each test measures or inspects an export in a child process: the fast loop leaves these out.
pytestmark = pytest.mark.slow

# The same embedding (the largest tensor) and tokenizer, 4 or 64 layers of small experts.
SMALL, LARGE = 4, 64
EXPERTS, FFN = 16, 256
MEASURE = """
import json, sys
from mlxmoe.gguf.export import export_gguf
import gguf.quants, mlxmoe.gguf.vocab  # imported before the baseline

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak RSS, to the current RSS
export_gguf(sys.argv[1], sys.argv[2], sys.argv[3])
print(json.dumps({"growth": status("VmHWM") - before}))
"""


def make_model(folder: Path, layers: int) -> tuple[Path, int]:
    """A Mixtral whose largest tensor, the embedding, does not depend on ``layers``."""
    vocab = mixtral_tokenizer_folder(folder)
    hf = make_hf_model(
        "mixtral",
        vocab_size=vocab,
        num_hidden_layers=layers,
        num_local_experts=EXPERTS,
        intermediate_size=FFN,
    )
    largest = max(p.numel() for p in hf.parameters()) * 4  # float32 bytes: the embedding
    save(hf, folder)
    return folder, largest


def export_growth(folder: Path, out: Path, file_type: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(out), file_type],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.splitlines()[-1])["growth"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path, int]:
    root = tmp_path_factory.mktemp("streaming")
    (small, largest), (large, same_largest) = (
        make_model(root / "small", SMALL),
        make_model(root / "large", LARGE),
    )
    assert largest == same_largest
    return small, large, largest


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(),
    reason="measuring a peak from a baseline needs Linux's /proc/self/clear_refs",
)
@pytest.mark.parametrize("file_type", ["f16", "q8_0"])
def test_export_peak_memory_follows_the_largest_tensor_not_the_file(models, tmp_path, file_type):
    small, large, largest = models
    extra_file = (large / "model.safetensors").stat().st_size - (small / "model.safetensors").stat().st_size
    assert extra_file > 20 * largest
    # the peak's baseline (tokenizer, planning, writer) is the same for both models: what
    # the 60 extra layers add must be well under what they weigh
    extra_peak = export_growth(large, tmp_path / "large.gguf", file_type) - export_growth(
        small, tmp_path / "small.gguf", file_type
    )
    print(
        f"{file_type}: {extra_file / 2**20:.0f} MiB more file, {extra_peak / 2**20:.1f} MiB "
        f"more peak RSS (largest tensor {largest / 2**20:.1f} MiB)"
    )
    assert extra_peak < 2 * largest < extra_file / 10
    from mlxmoe.gguf.llamacpp import logits, open_gguf

    for gguf_file in (tmp_path / "small.gguf", tmp_path / "large.gguf"):  # streamed, still whole
        with open_gguf(gguf_file) as llm:
            assert np.isfinite(logits(llm, [1, 5, 9, 300])).all()


HEAVY_IMPORTS = ("mlx_lm", "transformers", "torch")
IMPORTS_AFTER_EXPORT = """
import json, sys
from mlxmoe.cli import run
sys.argv = ["mlxmoe", "export", "--model", sys.argv[1], "--gguf", sys.argv[2], "--type", "q8_0"]
try:
    run()
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (HEAVY_IMPORTS,)


def test_export_never_imports_mlx_lm_transformers_or_torch(models, tmp_path):
    # importing mlx-lm pulls in transformers, and transformers torch where it is installed:
    # ~250 MiB of resident memory before the first tensor, the whole budget of a small export
    small, _, _ = models
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER_EXPORT, str(small), str(tmp_path / "out.gguf")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (tmp_path / "out.gguf").stat().st_size > 0
    assert json.loads(proc.stdout.splitlines()[-1]) == []
