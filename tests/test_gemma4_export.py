"""Gemma-4's MoE text model to GGUF: our merged file is what llama.cpp's converter writes
(conversion/gemma.py, Gemma4Model: the fused experts kept as ffn_gate_up_exps, the router's
scales as ffn_gate_inp.scale and ffn_down_exps.scale, rope_freqs for the full layers'
proportional RoPE, the sliding and full layers' head sizes and key-value heads), llama.cpp
computes from the converter's file what transformers computes, and from ours, and from base +
adapter GGUF, what our merged model computes.

A tiny Gemma-4 as published (Gemma4ForConditionalGeneration: a vision tower beside the text
model, tied embeddings) with sliding layers narrower than the full ones, attention_k_eq_v, a
sliding window shorter than the sequence and a final soft cap. Gemma's own 262k-token
vocabulary ships in no registry package: the tokenizer is one trained here in Gemma's format
(tokenizer.json, SentencePiece pieces as byte-fallback BPE, no prefix space, Gemma's special
tokens and chat markers), which is what the converter's gemma4 vocabulary reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch
from test_convert_parity import (
    CONVERTER,
    LLAMA_CPP_SRC,
    assert_same_tensors,
    loading_kv,
    run_converter,
    tensors,
)
from test_export import (
    F16_MAX_ABS,
    ROUTING_NEAR_TIE,
    Exported,
    assert_f16_gguf_computes_the_merged_model,
    assert_q8_0_gguf_agrees_on_top1,
)
from test_export import (
    test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf as assert_base_plus_adapter_is_merged,
)
from test_export import (
    test_q4_k_m_gguf_loads_and_stays_within_the_perplexity_bound as assert_q4_k_m_within_the_perplexity_bound,
)
from tiny_models import CORPUS, make_gemma4_model

from mlxmoe.config import ConfigView
from mlxmoe.errors import MlxMoeError
from mlxmoe.families import FAMILIES
from mlxmoe.gguf.export import export_gguf, write_hparams
from mlxmoe.gguf.llamacpp import logits as llama_cpp_logits
from mlxmoe.gguf.llamacpp import open_gguf
from mlxmoe.gguf.merge import export_hf
from mlxmoe.gguf.writer import GGUFWriter

# Each module fixture trains an adapter and exports it: the fast loop leaves these out.
pytestmark = pytest.mark.slow

needs_converter = pytest.mark.skipif(
    not CONVERTER.is_file(),
    reason=f"llama.cpp's converter is not unpacked at {LLAMA_CPP_SRC} (LLAMA_CPP_SRC)",
)

PUBLISHED_CONFIG = Path(__file__).parent / "fixtures" / "configs" / "gemma-4-26b-a4b.json"
# Gemma's ids for these (pad 0, eos 1, bos 2, unk 3, mask 4), then chat and channel markers
GEMMA_SPECIAL_TOKENS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<|turn>",
    "<turn|>",
    "<|channel>",
    "<channel|>",
]


def gemma_tokenizer_folder(folder: Path, vocab_size: int = 400) -> int:
    """A Gemma-format tokenizer trained on tests' corpus; returns its size."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL_TOKENS + byte_pieces, initial_alphabet=["▁"]
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
    )
    fast.save_pretrained(folder)
    return len(fast)


def make_model(folder: Path, seed: int = 0, **overrides) -> tuple[Path, torch.nn.Module]:
    vocab = gemma_tokenizer_folder(folder)
    hf = make_gemma4_model(seed=seed, vision=True, vocab_size=vocab, tie_word_embeddings=True, **overrides)
    draw = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hf.model.language_model.embed_tokens.weight.mul_(4.0)  # tied: top-1 is meaningful
        for layer in hf.model.language_model.layers:
            # scales near 1, as trained ones are; the router sees its input times
            # hidden_size ** -0.5, so that random weights alone make every choice a near tie
            for scale in (layer.router.scale, layer.router.per_expert_scale):
                scale.copy_(1.0 + 0.2 * torch.randn(scale.shape, generator=draw))
            layer.router.proj.weight.mul_(16.0)
    hf.save_pretrained(folder)
    return folder, hf


class Gemma4Exported(Exported):
    """test_export's Exported (its llama.cpp and MLX logits) over a Gemma-4."""

    def __init__(self, root: Path):
        model, self.hf = make_model(root / "model")
        super().__init__("gemma4", root, model)


@pytest.fixture(scope="module")
def gemma4_exported(tmp_path_factory) -> Gemma4Exported:
    return Gemma4Exported(tmp_path_factory.mktemp("gemma4"))


@pytest.mark.proof("converter")
@needs_converter
def test_llama_cpp_computes_transformers_logits_from_the_converters_file(gemma4_exported):
    """The reference chain itself: the converter's file of the base model, in llama.cpp, is
    transformers' Gemma-4 (sliding and full layers, k = v, soft cap, router scales)."""
    path = run_converter(gemma4_exported.model, "f16", gemma4_exported.root / "converter-base.gguf")
    tokens = gemma4_exported.tokens
    with open_gguf(path, n_ctx=128) as llm:
        theirs = llama_cpp_logits(llm, tokens)
    hf = gemma4_exported.hf
    probabilities = []  # per layer, each position's router probabilities
    hooks = [
        layer.router.register_forward_hook(lambda module, args, out: probabilities.append(out[0]))
        for layer in hf.model.language_model.layers
    ]
    with torch.no_grad():
        reference = hf(torch.tensor([tokens])).logits[0].numpy()
    for hook in hooks:
        hook.remove()
    k = hf.config.text_config.top_k_experts
    ranked = [np.sort(p.numpy(), axis=-1)[:, ::-1] for p in probabilities]
    clear = np.min([p[:, k - 1] - p[:, k] for p in ranked], axis=0) >= ROUTING_NEAR_TIE
    diff = np.abs(theirs - reference).max(-1)
    print(
        f"gemma4 converter's f16 in llama.cpp vs transformers: max-abs {diff[clear].max():.4f} at "
        f"{clear.sum()} positions with a clear expert choice ({diff.max():.4f} at all {len(diff)})"
    )
    assert clear.mean() >= 0.9
    assert (theirs.argmax(-1) == reference.argmax(-1))[clear].all()
    assert diff[clear].max() < F16_MAX_ABS  # f16 weights, llama.cpp's f16 KV cache


@pytest.mark.proof("converter")
@needs_converter
def test_f16_tensors_and_metadata_equal_the_converters(gemma4_exported):
    ours, theirs = (tensors(r) for r in gemma4_exported.converted)
    assert sorted(ours) == sorted(theirs)
    assert {n: (t.tensor_type.name, t.shape.tolist()) for n, t in ours.items()} == {
        n: (t.tensor_type.name, t.shape.tolist()) for n, t in theirs.items()
    }
    for name in ("rope_freqs.weight", "blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.scale"):
        assert name in ours
    assert "output.weight" not in ours and not any(n.startswith(("v.", "mm.")) for n in ours)
    assert [
        n for n in ours if np.asarray(ours[n].data).tobytes() != np.asarray(theirs[n].data).tobytes()
    ] == []
    ours_kv, theirs_kv = (loading_kv(r) for r in gemma4_exported.converted)
    assert ours_kv["tokenizer.ggml.model"][1] == "gemma4"
    assert ours_kv["gemma4.attention.head_count_kv"][1] == [2, 1, 1]  # sliding, full, full
    assert sorted(ours_kv) == sorted(theirs_kv)
    assert [k for k in ours_kv if ours_kv[k] != theirs_kv[k]] == []


@pytest.mark.proof("converter")
@needs_converter
def test_q8_0_tensors_equal_the_converters_byte_for_byte(gemma4_exported):
    theirs = run_converter(gemma4_exported.merged, "q8_0", gemma4_exported.root / "converter-q8_0.gguf")
    assert_same_tensors(gemma4_exported.gguf["q8_0"], theirs, "Q8_0")


def test_f16_gguf_in_llama_cpp_computes_the_merged_model(gemma4_exported):
    assert_f16_gguf_computes_the_merged_model(gemma4_exported)


def test_q8_0_gguf_in_llama_cpp_agrees_on_top1(gemma4_exported):
    assert_q8_0_gguf_agrees_on_top1(gemma4_exported)


def test_q4_k_m_gguf_loads_and_stays_within_the_perplexity_bound(gemma4_exported):
    assert_q4_k_m_within_the_perplexity_bound(gemma4_exported)


def test_base_gguf_plus_adapter_gguf_equals_the_merged_gguf(gemma4_exported):
    """The experts' LoRA is written for ffn_gate_up_exps (the gate's and up's A stacked, their
    B block-diagonal), the down experts' B times the per-expert scale, which llama.cpp
    applies to the base product only."""
    assert_base_plus_adapter_is_merged(gemma4_exported)


def test_adapter_of_the_joined_experts_is_their_deltas_stacked(gemma4_exported):
    reader = gguf.GGUFReader(gemma4_exported.adapter_gguf)
    lora = {t.name: np.asarray(t.data) for t in reader.tensors}
    base = {
        t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(gemma4_exported.base_gguf).tensors
    }
    merged = {
        t.name: np.asarray(t.data, np.float32) for t in gguf.GGUFReader(gemma4_exported.gguf["f16"]).tensors
    }
    alpha = float(reader.fields["adapter.lora.alpha"].contents())
    name = "blk.1.ffn_gate_up_exps.weight"
    a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]  # [E, 2r, in], [E, 2 ffn, 2r]
    assert "blk.1.ffn_gate_exps.weight.lora_a" not in lora
    delta = alpha / a.shape[-2] * b @ a
    np.testing.assert_allclose(base[name] + delta, merged[name], atol=2e-3)  # f16 rounding
    assert np.abs(delta).max() > 0.01


def test_export_refuses_a_rope_factor_llama_cpp_does_not_read(tmp_path):
    full = {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6, "factor": 8.0}
    rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4}, "full_attention": full}
    folder, _ = make_model(tmp_path / "model", rope_parameters=rope)
    with pytest.raises(MlxMoeError, match="rope_parameters.full_attention.factor"):
        export_gguf(folder, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def vocab_only_converter(folder: Path, out: Path) -> Path:
    """The converter's metadata, no tensors: the published config without its 50 GB."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(LLAMA_CPP_SRC / "gguf-py")}
    args = [
        sys.executable,
        str(CONVERTER),
        "--vocab-only",
        "--outtype",
        "f16",
        "--outfile",
        str(out),
        str(folder),
    ]
    proc = subprocess.run(args, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return out


def hparams_gguf(folder: Path, out: Path) -> Path:
    """The hyper-parameters export_gguf writes for the config in ``folder``, alone in a file."""
    path = folder / "config.json"
    config = ConfigView(json.loads(path.read_text()), path)
    family = FAMILIES["gemma4"]
    weights = SimpleNamespace(
        args=family.args_from_config(config),
        ckpt=SimpleNamespace(config=config, folder=folder),
        family=family,
    )
    writer = GGUFWriter(out, family.gguf_arch)
    write_hparams(writer, weights, "f16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return out


@pytest.mark.proof("converter")
@needs_converter
def test_published_configs_metadata_equals_the_converters(tmp_path):
    """google/gemma-4-26B-A4B's config.json as the hub spells it (global_head_dim,
    num_global_key_value_heads): the converter's metadata-only file (--vocab-only) holds the
    same loading keys as ours, tokenizer aside."""
    folder = tmp_path / "gemma-4-26b-a4b"
    gemma_tokenizer_folder(folder)
    (folder / "config.json").write_text(PUBLISHED_CONFIG.read_text())
    theirs = tmp_path / "converter.gguf"
    vocab_only_converter(folder, theirs)
    ours = loading_kv(gguf.GGUFReader(hparams_gguf(folder, tmp_path / "ours.gguf")))
    theirs = {k: v for k, v in loading_kv(gguf.GGUFReader(theirs)).items() if not k.startswith("tokenizer.")}
    assert ours["gemma4.attention.head_count_kv"][1] == ([8] * 5 + [2]) * 5
    assert (ours["gemma4.attention.key_length"][1], ours["gemma4.attention.key_length_swa"][1]) == (512, 256)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in ours if ours[k] != theirs[k]] == []


def test_export_refuses_global_kv_heads_transformers_ignores(tmp_path):
    """num_global_key_value_heads without attention_k_eq_v: transformers gives the full layers
    num_key_value_heads, llama.cpp (the converter writes both) the global count."""
    config = json.loads(PUBLISHED_CONFIG.read_text())
    config["text_config"]["attention_k_eq_v"] = False
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    with pytest.raises(MlxMoeError, match=r"would read \[8, 8, 8, 8, 8, 2, .* compute \[8, 8, 8, 8, 8, 8, "):
        hparams_gguf(tmp_path, tmp_path / "x.gguf")


@pytest.mark.proof("converter")
@needs_converter
def test_a_text_only_checkpoint_exports_under_its_own_names(tmp_path):
    """Gemma4ForCausalLM stores the text model under ``model.``, not
    ``model.language_model.``: export_hf writes it back so (transformers loads it and computes
    the same logits), and its f16 GGUF is the converter's, byte for byte."""
    from safetensors import safe_open

    folder = tmp_path / "model"
    vocab = gemma_tokenizer_folder(folder)
    hf = make_gemma4_model(seed=1, vocab_size=vocab, tie_word_embeddings=True)
    hf.save_pretrained(folder)
    merged = export_hf(folder, tmp_path / "merged")
    names = [n for f in merged.glob("*.safetensors") for n in safe_open(f, "np").keys()]
    assert "model.layers.0.experts.gate_up_proj" in names
    assert not any(n.startswith("model.language_model.") for n in names)
    tokens = torch.tensor([[2, 17, 40, 99, 5, 63]])
    reloaded = type(hf).from_pretrained(merged).eval()
    with torch.no_grad():
        np.testing.assert_allclose(reloaded(tokens).logits.numpy(), hf(tokens).logits.numpy(), atol=1e-5)
    ours = tmp_path / "ours.gguf"
    export_gguf(folder, ours, "f16")
    theirs = run_converter(folder, "f16", tmp_path / "converter.gguf")
    assert_same_tensors(ours, theirs, "F16")
    with open_gguf(ours, n_ctx=64) as llm:  # and llama.cpp loads it, computing transformers' top-1
        from_llama_cpp = llama_cpp_logits(llm, tokens[0].tolist())
    with torch.no_grad():
        reference = hf(tokens).logits[0].numpy()
    assert np.isfinite(from_llama_cpp).all()
    assert (from_llama_cpp.argmax(-1) == reference.argmax(-1)).mean() >= 0.8
