"""A real GGUF (SmolLM2-135M-Instruct, Q4_1) imported as a Hugging Face checkpoint computes
what llama.cpp computes from the GGUF itself, and tokenizes as llama.cpp does.

llama.cpp multiplies Q4_1 weights by activations it quantizes to 8 bits on the fly; the
checkpoint holds the same weights dequantized, run with float32 activations. So the logits
differ a little; measured here: max-abs 1.58, mean-abs 0.18 on logits spanning -31..37, and
36 of 37 top-1 tokens equal (the other is a near tie, 0.04 apart in llama.cpp).
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

import mlxmoe
from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.importer import gguf_to_hf, unpermute_rope_rows

TEXT = (
    "The quick brown fox jumps over the lazy dog. Mixture-of-experts models route each token "
    "to a few experts, which keeps inference cheap while the total parameter count grows."
)
# Bounds with margin over the measured differences (see the module docstring).
MIN_TOP1_AGREEMENT = 0.9
MAX_ABS_DIFF = 3.0
MAX_MEAN_ABS_DIFF = 0.5
# Where the top-1 tokens differ, ours must score within this of llama.cpp's best.
NEAR_TIE = 1.0

TOKENIZER_SAMPLES = {
    "english": "It's a truth universally acknowledged; we'll see, they'd say. I'M LOUD!",
    "digits": "Prices rose 12345 to 3.14159 (½ and ²) on 2024-11-22.",
    "whitespace": "  two leading,\n\n\nthree newlines,\ttab, trailing   ",
    "code": "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "c": 'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // loop',
    "cjk": "混合专家模型把每个词元送到少数几个专家。日本語のテキスト。한국어 문장.",
    "emoji_accents": "Emoji 🤗🚀 and accents: café naïve Ångström",
    "chat_special_tokens": "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "glued_special_tokens": "<|endoftext|><repo_name>mlx<file_sep>x.py a<|im_end|>b",
}


@pytest.fixture(scope="module")
def llama(smollm2_gguf):
    import llama_cpp

    original = llama_cpp.llama_cpp.llama_model_default_params

    def without_extra_buffers():
        # On this machine's VM llama.cpp's AMX matmul (an "extra buffer type") faults on
        # `ldtilecfg` and kills the process; the plain CPU kernels are the reference anyway.
        params = original()
        params.use_extra_bufts = False
        return params

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", without_extra_buffers)
        model = llama_cpp.Llama(
            model_path=str(smollm2_gguf), logits_all=True, n_ctx=128, n_threads=2, verbose=False
        )
    yield model
    model.close()


@pytest.fixture(scope="module")
def token_ids(llama) -> list[int]:
    ids = llama.tokenize(TEXT.encode(), add_bos=False, special=True)
    assert 30 <= len(ids) <= 60
    return ids


@pytest.fixture(scope="module")
def llama_cpp_logits(llama, token_ids) -> np.ndarray:
    llama.reset()
    llama.eval(token_ids)
    return np.array(llama.scores[: len(token_ids)], dtype=np.float32)


@pytest.fixture(scope="module")
def transformers_logits(smollm2_hf, token_ids) -> np.ndarray:
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


@pytest.fixture(scope="module")
def mlxmoe_loaded(smollm2_hf):
    return mlxmoe.load(smollm2_hf, dtype=mx.float32)


@pytest.fixture(scope="module")
def mlxmoe_logits(mlxmoe_loaded, token_ids) -> np.ndarray:
    model, _ = mlxmoe_loaded
    return np.array(model(mx.array([token_ids]))[0])


def assert_matches_llama_cpp(logits: np.ndarray, reference: np.ndarray) -> None:
    assert logits.shape == reference.shape
    ours, theirs = logits.argmax(-1), reference.argmax(-1)
    assert (ours == theirs).mean() >= MIN_TOP1_AGREEMENT
    for position in np.nonzero(ours != theirs)[0]:
        best = reference[position].max()
        assert reference[position, ours[position]] >= best - NEAR_TIE, position
    diff = np.abs(logits - reference)
    assert diff.max() < MAX_ABS_DIFF
    assert diff.mean() < MAX_MEAN_ABS_DIFF


@pytest.mark.slow
def test_converted_checkpoint_in_transformers_matches_llama_cpp(transformers_logits, llama_cpp_logits):
    assert_matches_llama_cpp(transformers_logits, llama_cpp_logits)


@pytest.mark.slow
def test_converted_checkpoint_in_mlxmoe_matches_llama_cpp(mlxmoe_logits, llama_cpp_logits):
    assert_matches_llama_cpp(mlxmoe_logits, llama_cpp_logits)


@pytest.mark.slow
def test_mlxmoe_and_transformers_agree_on_the_real_weights(mlxmoe_logits, transformers_logits):
    # Same float32 weights on both sides: only summation order differs (logits up to ~40).
    assert np.abs(mlxmoe_logits - transformers_logits).max() < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("text", TOKENIZER_SAMPLES.values(), ids=TOKENIZER_SAMPLES.keys())
def test_converted_tokenizer_splits_text_like_llama_cpp(smollm2_hf, llama, text):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf)
    expected = llama.tokenize(text.encode(), add_bos=False, special=True)
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text


@pytest.mark.slow
def test_tokenizer_from_mlxmoe_load_splits_text_like_llama_cpp(mlxmoe_loaded, llama):
    _, tokenizer = mlxmoe_loaded
    for text in TOKENIZER_SAMPLES.values():
        assert tokenizer.encode(text) == llama.tokenize(text.encode(), add_bos=False, special=True)


@pytest.mark.slow
def test_config_tokenizer_config_and_tensors_follow_hugging_face_conventions(smollm2_hf):
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rms_norm_eps"] == 1e-5  # not the float32 reading 9.99999974738e-06
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    tokenizer_config = json.loads((smollm2_hf / "tokenizer_config.json").read_text())
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>assistant" in tokenizer_config["chat_template"]
    with safe_open(smollm2_hf / "model.safetensors", framework="numpy") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert "lm_head.weight" not in names  # tied
    assert len(names) == 2 + 30 * 9


def test_undoing_the_rope_row_permutation_restores_the_original_rows():
    # llama.cpp's LlamaModel.permute, rewritten from its definition in convert_hf_to_gguf.py.
    def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    assert not np.array_equal(llama_cpp_permute(w, 3), w)
    np.testing.assert_array_equal(unpermute_rope_rows(llama_cpp_permute(w, 3), 3), w)


def test_a_missing_gguf_is_refused(tmp_path):
    with pytest.raises(MlxMoeError, match="no such GGUF file"):
        gguf_to_hf(tmp_path / "absent.gguf", tmp_path / "out")


def test_a_non_llama_gguf_is_refused_with_its_architecture_named(tmp_path):
    import gguf

    path = tmp_path / "qwen2.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(MlxMoeError, match="'qwen2'"):
        gguf_to_hf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_existing_output_folder_is_left_alone_without_overwrite(smollm2_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(MlxMoeError, match="already exists"):
        gguf_to_hf(smollm2_gguf, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


@pytest.mark.slow
def test_a_failed_conversion_leaves_nothing_behind(smollm2_gguf, tmp_path, monkeypatch):
    import gguf

    def broken(*_):
        raise RuntimeError("disk full")

    monkeypatch.setattr(gguf.quants, "dequantize", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        gguf_to_hf(smollm2_gguf, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


# Measured on this 38-token sample: top-1 1.000, KL 0.0024.
@pytest.mark.slow
def test_8_bit_real_weights_stay_close_to_float(smollm2_hf, mlxmoe_logits, token_ids):
    model, _ = mlxmoe.load(smollm2_hf, quantize=8, group_size=32, dtype=mx.float32)
    quant = np.array(model(mx.array([token_ids]))[0])
    top1 = (quant.argmax(-1) == mlxmoe_logits.argmax(-1)).mean()
    p = np.exp(log_softmax(mlxmoe_logits))
    kl = (p * (log_softmax(mlxmoe_logits) - log_softmax(quant))).sum(-1).mean()
    print(f"SmolLM2 8-bit vs float: top-1 {top1:.3f}, KL {kl:.4f}")
    assert top1 >= 0.97
    assert kl < 0.01


@pytest.mark.slow
def test_4_bit_real_weights_compute_what_mlx_lm_convert_computes(smollm2_hf, token_ids, tmp_path):
    """No bound on the distance to float proves 4 bits on this model: its weights are
    already Q4_1, which MLX's affine grid rounds again (measured: top-1 0.54, KL 0.70 against
    float). mlx-lm's converter runs the same quantizer, so the logits are equal (measured:
    bitwise; every family on tiny checkpoints: tests/test_quantized_reference.py)."""
    import mlx_lm
    from mlx_lm.convert import convert

    # groups of 32, the Q4_1 block size; a Llama has no router, so mlx-lm's default policy
    # (everything it can quantize) is ours
    convert(str(smollm2_hf), str(tmp_path / "mlx"), quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    reference, _ = mlx_lm.load(str(tmp_path / "mlx"))
    model, _ = mlxmoe.load(smollm2_hf, quantize=4, group_size=32, dtype=mx.float32)
    quantized = [sum("scales" in module for _, module in m.named_modules()) for m in (model, reference)]
    assert quantized[0] == quantized[1] > 0
    logits = np.array(model(mx.array([token_ids])))
    ref_logits = np.array(reference(mx.array([token_ids])))
    diff = np.abs(logits - ref_logits).max()
    print(f"SmolLM2 4-bit vs mlx-lm: max-abs {diff:.2e}, logits to {np.abs(ref_logits).max():.0f}")
    # logits up to ~40: float rounding is ~1e-5
    assert diff < 1e-4
