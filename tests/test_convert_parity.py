"""Our merged f16 and q8_0 GGUFs equal what llama.cpp's own converter writes from the same
model.

For each family a tiny model with a real tokenizer and a trained adapter is merged two ways:
``export_gguf`` (base + adapter straight to GGUF) and ``export_hf`` (an HF folder) read by
``convert_hf_to_gguf.py --outtype f16|q8_0`` from the llama-cpp-python 0.3.36 sdist, run with
its own gguf-py (LLAMA_CPP_SRC: the unpacked tree, which .ci/run fetches; skipped without it,
failed without it under MLXMOE_REQUIRE=converter, as .ci/run sets). Equal bytes mean llama.cpp
computes our q8_0 file exactly as its own: whatever top-1 it reaches against the float model
is the format's, not the exporter's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from test_export import FAMILIES, make_model
from tiny_models import strategy_recipe, write_qa_data

from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.merge import export_hf
from mlxmoe.train import train

LLAMA_CPP_SRC = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/src/llama_cpp_python-0.3.36/vendor/llama.cpp"))
CONVERTER = LLAMA_CPP_SRC / "convert_hf_to_gguf.py"
# slow: the fixture trains an adapter and runs llama.cpp's converter
pytestmark = [
    pytest.mark.slow,
    pytest.mark.proof("converter"),
    pytest.mark.skipif(
        not CONVERTER.is_file(),
        reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
    ),
]

# The general.* keys llama.cpp's loader reads; the others (name, size label, ...) only
# describe the model, and the converter derives them from the folder it was given.
LOADING_GENERAL_KEYS = {
    "general.architecture",
    "general.type",
    "general.alignment",
    "general.file_type",
    "general.quantization_version",
}


class Converted:
    def __init__(self, family: str, root: Path):
        self.family = family
        model = make_model(family, root / "model")
        r = strategy_recipe(model, write_qa_data(root / "data", n_train=8, n_valid=4), "all", iters=1)
        train(r, root / "adapter", show_progress=False)
        merged = export_hf(model, root / "merged", root / "adapter")
        assert not list(merged.glob("*.py")) and "auto_map" not in json.loads(
            (merged / "config.json").read_text()
        )  # the converter runs no code from the folder
        self.theirs = root / "converter-f16.gguf"
        self.ours = export_gguf(model, root / "mlxmoe-f16.gguf", "f16", root / "adapter").path
        run_converter(merged, "f16", self.theirs)
        self.q8_ours = export_gguf(model, root / "mlxmoe-q8_0.gguf", "q8_0", root / "adapter").path
        self.q8_theirs = run_converter(merged, "q8_0", root / "converter-q8_0.gguf")
        self.adapted = [
            name
            for name, base in safetensors(model).items()
            if not np.array_equal(base, safetensors(merged)[name])
        ]
        # gguf-py's reader takes seconds over a 152k-token vocabulary: each file is read once
        self.readers = {
            side: gguf.GGUFReader(path) for side, path in (("ours", self.ours), ("theirs", self.theirs))
        }


def run_converter(folder: Path, outtype: str, out: Path) -> Path:
    proc = subprocess.run(
        [sys.executable, str(CONVERTER), "--outtype", outtype, "--outfile", str(out), str(folder)],
        cwd=out.parent,
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(LLAMA_CPP_SRC / "gguf-py"), os.environ.get("PYTHONPATH")) if p
            ),
        },
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def converted(request, tmp_path_factory) -> Converted:
    return Converted(request.param, tmp_path_factory.mktemp(request.param))


def safetensors(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(folder / "model.safetensors")


def tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def assert_same_tensors(ours: Path, theirs: Path, gguf_type: str) -> None:
    """Every tensor of two GGUF files has the same name, type, shape and bytes, and some are
    ``gguf_type`` (gguf-py's reader decodes a large vocabulary slowly: tensors only)."""
    ours, theirs = (tensors(gguf.GGUFReader(p)) for p in (ours, theirs))
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    assert gguf_type in {t.tensor_type.name for t in ours.values()}
    assert [
        n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()
    ] == []


def loading_kv(reader: gguf.GGUFReader) -> dict[str, tuple[list, object]]:
    """Every key llama.cpp reads for loading: value types and values."""
    return {
        k: (f.types, f.contents())
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.") and (not k.startswith("general.") or k in LOADING_GENERAL_KEYS)
    }


def test_tensor_names_shapes_and_types_equal_the_converters(converted):
    ours, theirs = tensors(converted.readers["ours"]), tensors(converted.readers["theirs"])
    assert sorted(ours) == sorted(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    types = {t.tensor_type.name for t in ours.values()}
    assert types == {"F16", "F32"}  # matrices f16; norms and routers f32, as the converter keeps them


def test_tensor_values_equal_the_converters_bit_for_bit(converted):
    # Both round the same float32 merge to f16 once (the converter reads export_hf's float32
    # folder), and the q/k permutation is a reordering: no tolerance is needed.
    ours, theirs = tensors(converted.readers["ours"]), tensors(converted.readers["theirs"])
    differ = [n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()]
    assert differ == []
    # the adapter really changed the merged model both files were made from
    assert any(".q_proj." in n for n in converted.adapted)
    assert any(".experts." in n for n in converted.adapted)


def test_loading_metadata_equals_the_converters(converted):
    ours, theirs = loading_kv(converted.readers["ours"]), loading_kv(converted.readers["theirs"])
    arch = ours["general.architecture"][1]
    assert any(k.startswith(f"{arch}.expert_") for k in ours)
    assert any(k.startswith("tokenizer.ggml.") for k in ours)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_llama_cpp_runs_our_file_exactly_as_the_converters(converted):
    from mlxmoe.gguf.llamacpp import logits, open_gguf

    tokens = [1, 17, 42, 99, 7, 256, 3]
    with open_gguf(converted.ours) as llm:
        ours = logits(llm, tokens)
    with open_gguf(converted.theirs) as llm:
        theirs = logits(llm, tokens)
    assert np.isfinite(ours).all() and ours.std() > 0
    np.testing.assert_array_equal(ours, theirs)


def test_q8_0_tensors_equal_the_converters_byte_for_byte(converted):
    assert_same_tensors(converted.q8_ours, converted.q8_theirs, "Q8_0")
