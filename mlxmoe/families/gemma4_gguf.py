"""Gemma-4 as llama.cpp's converter writes it (``conversion/gemma.py``, Gemma4Model) and as its
``gemma4`` graph (``src/models/gemma4.cpp``) reads it.

Every tensor is ours as it is (Gemma-4's RMSNorms scale by w, llama.cpp's too), except the
experts: the converter keeps the hub's fused ``gate_up_proj`` as ``ffn_gate_up_exps`` (the
gate's rows, then the up projection's), so our two are joined again; the router's input scale
and per-expert scale become ``ffn_gate_inp.scale`` and ``ffn_down_exps.scale``, the layer
scalar ``layer_output_scale`` (tensor_names.ROLES). The converter adds ``rope_freqs``: the
full layers' proportional RoPE, which llama.cpp computes over the whole head with the
unrotated pairs' frequencies divided by 1e30.

The metadata overrides several common keys: the full layers' head size and RoPE base are the
main ones (``key_length``, ``rope.freq_base``), the sliding layers' have ``_swa`` keys, and the
key-value heads are a per-layer array where the config names the full layers' own."""

from __future__ import annotations

import gguf
import numpy as np

from ..config import ConfigView
from ..errors import MlxMoeError
from ..nn.gemma4_block import FULL, SLIDING, Gemma4Args
from .base import GGUFPart, require_llama_cpp_routing
from .qwen3_5_moe import text_config

# ffn_gate_up_exps: the gate experts' rows first, as the hub's gate_up_proj
JOINED_EXPERTS = {"ffn_gate_exps": 0, "ffn_up_exps": 1}
# llama.cpp multiplies each expert's down projection by its scale, but not that product's
# LoRA (build_lora_mm_id): Gemma-4 scales the expert's whole output, adapter included
LORA_SCALED_BY = {"ffn_down_exps": "ffn_down_exps.scale"}
# llama.cpp leaves a pair unrotated by dividing its frequency by this (the converter's value)
UNROTATED = np.float32(1e30)
K = gguf.Keys


def gguf_parts(role: str, args: Gemma4Args) -> list[GGUFPart] | None:
    if role in JOINED_EXPERTS:
        return [GGUFPart("ffn_gate_up_exps", join=JOINED_EXPERTS[role])]
    return None


def gguf_extra_tensors(args: Gemma4Args) -> list[tuple[str, np.ndarray]]:
    """rope_freqs [global_head_dim / 2]: 1 for the pairs proportional RoPE turns, 1e30 for
    the rest (Gemma4Model.generate_extra_tensors)."""
    rotated = int(args.global_head_dim * args.full_partial_rotary_factor / 2)
    factors = np.full(args.global_head_dim // 2, UNROTATED, np.float32)
    factors[:rotated] = 1.0
    return [("rope_freqs.weight", factors)]


def drop(writer, *keys: str) -> None:
    """Remove keys the common hyper-parameters wrote, which the converter writes again."""
    for key in keys:
        for kv in writer.kv_data:
            kv.pop(key.format(arch=writer.arch), None)


def gguf_hparams(args: Gemma4Args, writer) -> None:
    """Gemma3Model's and Gemma4Model's keys over the common ones; refuses what llama.cpp's
    gemma4 computes otherwise."""
    # llama.cpp's gemma4 runs the experts in every layer whose GGUF has a router, and always
    # renormalizes the top-k softmax weights (transformers' Gemma4TextRouter does too)
    require_llama_cpp_routing(args, "gemma4", normalized=True)
    if args.full_rope_factor != 1.0:
        raise MlxMoeError(
            "cannot export to GGUF: llama.cpp's gemma4 reads no factor for the full layers' "
            f"proportional RoPE; this config divides its frequencies by {args.full_rope_factor} "
            "(rope_parameters.full_attention.factor)"
        )
    drop(
        writer, K.Attention.KEY_LENGTH, K.Attention.VALUE_LENGTH, K.Rope.FREQ_BASE, K.Attention.HEAD_COUNT_KV
    )
    # per layer; gguf_config_hparams writes one number where the converter does
    writer.add_head_count_kv([args.layer_kv_heads(i) for i in range(args.num_layers)])
    writer.add_rope_freq_base(args.full_rope_theta)
    writer.add_rope_freq_base_swa(args.rope_theta)
    if args.final_logit_softcapping:
        writer.add_final_logit_softcapping(args.final_logit_softcapping)
    writer.add_sliding_window(args.sliding_window)
    writer.add_shared_kv_layers(0)  # KV sharing and per-layer inputs: gemma4.py refuses them
    writer.add_embedding_length_per_layer_input(0)
    writer.add_sliding_window_pattern([t == SLIDING for t in args.layer_types])
    writer.add_key_length(args.global_head_dim)
    writer.add_value_length(args.global_head_dim)
    writer.add_key_length_swa(args.head_dim)
    writer.add_value_length_swa(args.head_dim)
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)
    # full layers: rope_freqs marks the unrotated pairs; sliding layers rotate whole heads
    writer.add_rope_dimension_count(args.global_head_dim)
    writer.add_rope_dimension_count_swa(args.head_dim)


def full_layer_kv_heads(text: ConfigView) -> int | None:
    """The full layers' key-value heads where config.json names them, as the converter looks
    for them: num_global_key_value_heads, else the first full layer's in per_layer_config."""
    heads = text.get("num_global_key_value_heads", default=None)
    if heads is not None:
        return int(heads)
    types = list(text.get("layer_types", default=[]))
    for layer, spec in (text.raw.get("per_layer_config") or {}).items():
        if int(layer) < len(types) and types[int(layer)] == FULL and "num_key_value_heads" in spec:
            return int(spec["num_key_value_heads"])
    return None


def gguf_config_hparams(cfg: ConfigView, writer) -> None:
    """The keys the converter writes as config.json spells them: the key-value heads as one
    number, or per layer where the config names the full layers' own; the dense MLP's width
    as an array under use_double_wide_mlp."""
    text = text_config(cfg)
    full_kv = full_layer_kv_heads(text)
    sliding_kv = int(text.get("num_key_value_heads"))
    key = K.Attention.HEAD_COUNT_KV.format(arch=writer.arch)
    ours = writer.kv_data[0][key].value  # gguf_hparams': what transformers computes
    theirs = [sliding_kv if t == SLIDING else full_kv or sliding_kv for t in text.get("layer_types")]
    if ours != theirs:
        # transformers reads num_global_key_value_heads only with attention_k_eq_v
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's gemma4 would read {theirs} key-value heads per "
            f"layer from {text.source} (num_key_value_heads, num_global_key_value_heads or "
            f"per_layer_config), transformers and mlxmoe compute {ours}"
        )
    if full_kv is None:
        drop(writer, K.Attention.HEAD_COUNT_KV)
        writer.add_head_count_kv(sliding_kv)
    if text.get("use_double_wide_mlp", default=False):
        drop(writer, K.LLM.FEED_FORWARD_LENGTH)
        writer.add_feed_forward_length(
            [int(text.get("intermediate_size"))] * int(text.get("num_hidden_layers"))
        )
