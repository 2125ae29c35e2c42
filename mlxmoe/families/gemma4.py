"""Gemma-4's MoE text model (google/gemma-4-26B-A4B): the layers of ``nn/gemma4_block.py``.

It is published multimodal (``Gemma4ForConditionalGeneration``, model_type "gemma4"): the
language model's keys under ``text_config``, its tensors under ``model.language_model``, a
vision tower (and, in other sizes, an audio tower) beside it. We load and train the language
model; the towers and their embedders are never read. A text-only checkpoint
(``Gemma4ForCausalLM``, model_type "gemma4_text", tensors under ``model``) loads too. The
experts are stored fused: ``experts.gate_up_proj`` [E, 2 * ffn, hidden] (gate rows, then
up), ``experts.down_proj`` [E, hidden, ffn].

Full layers' head size and key-value heads are read as transformers 5 writes them
(``per_layer_config``) or as the hub's config.json spells them (``global_head_dim``, default
512, and ``num_global_key_value_heads``, used only with ``attention_k_eq_v``). What the
small dense Gemma-4 models add is refused by name: per-layer inputs
(``hidden_size_per_layer_input``), KV sharing (``num_kv_shared_layers``), no MoE block.

LoRA (adapt/strategies.py): ``attention`` is q, k, o and, on sliding layers, v; ``experts``
the routed experts; the router is ``moe.router`` (its projection: the logits the router
losses read); the dense MLP beside the experts is the ``dense_mlp`` group, which ``all`` or
explicit targets adapt (recipes/gemma-4-26b-a4b.yaml: attention, experts, dense_mlp). There
is no shared expert: ``shared`` is refused."""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

from ..config import ConfigView
from ..errors import CheckpointError
from ..nn.gemma4_block import FULL, SLIDING, Gemma4Args, Gemma4CausalLM
from . import gemma4_gguf
from .base import Family
from .qwen3_5_moe import text_config

PREFIXES = ("model.language_model", "model")
# Never read: the multimodal towers and what projects their outputs into the text model
SKIPPED_PREFIXES = ("model.vision_tower.", "model.embed_vision.", "model.audio_tower.", "model.embed_audio.")
ROPE_TYPES = ("default", "proportional")
DEFAULT_ROPE = {  # Gemma4TextConfig's, where config.json has no rope_parameters
    SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1_000_000.0},
}
DEFAULT_GLOBAL_HEAD_DIM = 512
SLIDING_PATTERN = 6  # transformers' default layer_types: every sixth layer full

PER_LAYER = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "attn_q_norm": "self_attn.q_norm.weight",
    "attn_k_norm": "self_attn.k_norm.weight",
    "attn_post_norm": "post_attention_layernorm.weight",
    "ffn_norm": "pre_feedforward_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
    "ffn_post_norm_1": "post_feedforward_layernorm_1.weight",
    "ffn_gate_inp": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_pre_norm_2": "pre_feedforward_layernorm_2.weight",
    # split_tensor's names for the fused experts' parts
    "ffn_gate_exps": "experts.gate_proj.weight",
    "ffn_up_exps": "experts.up_proj.weight",
    "ffn_down_exps": "experts.down_proj.weight",
    "ffn_post_norm_2": "post_feedforward_layernorm_2.weight",
    "ffn_post_norm": "post_feedforward_layernorm.weight",
    "layer_output_scale": "layer_scalar",
}
HF_TENSORS: dict[str, tuple[str, ...]] = {
    "token_embd": tuple(f"{p}.embed_tokens.weight" for p in PREFIXES),
    "output_norm": tuple(f"{p}.norm.weight" for p in PREFIXES),
    "output": ("lm_head.weight",),
    **{role: tuple(f"{p}.layers.{{bid}}.{name}" for p in PREFIXES) for role, name in PER_LAYER.items()},
}
_X = f"{PREFIXES[0]}.layers.{{bid}}.experts"
STORED_IN = {
    "ffn_gate_exps": f"{_X}.gate_up_proj",
    "ffn_up_exps": f"{_X}.gate_up_proj",
    "ffn_down_exps": f"{_X}.down_proj",
}


def split_tensor(name: str, array, file) -> list[tuple[str, Any]]:
    """The towers' tensors -> nothing; the fused experts -> gate, up and down [E, out, in]."""
    if name.startswith(SKIPPED_PREFIXES):
        return []
    stem, _, last = name.rpartition(".")
    if not stem.endswith(".experts"):
        return [(name, array)]
    if last == "gate_up_proj":
        if array.ndim != 3 or array.shape[1] % 2:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}; Gemma-4 stores it "
                "[experts, 2 * moe_intermediate_size, hidden_size]"
            )
        ffn = array.shape[1] // 2
        return [(f"{stem}.gate_proj.weight", array[:, :ffn]), (f"{stem}.up_proj.weight", array[:, ffn:])]
    if last == "down_proj":
        return [(f"{stem}.down_proj.weight", array)]
    return [(name, array)]


def join_tensor(name: str, parts: dict[str, mx.array]) -> mx.array:
    """split_tensor's inverse, for export_hf."""
    if name.endswith("gate_up_proj"):
        return mx.concatenate([parts["ffn_gate_exps"], parts["ffn_up_exps"]], axis=1)
    return parts["ffn_down_exps"]


def args_from_config(cfg: ConfigView) -> Gemma4Args:
    text = text_config(cfg)
    _refuse_what_we_cannot_compute(text)
    base = Gemma4Args.base_fields(text)
    layers = base["num_layers"]
    layer_types = _layer_types(text, layers)
    rope = _rope(text)
    head_dim, kv_heads = _full_attention_shape(text, layer_types, base["head_dim"], base["num_kv_heads"])
    window = text.get("sliding_window", default=512)
    base.update(
        rope_theta=float(rope[SLIDING].get("rope_theta", 10_000.0)),
        rope_scaling=None,
        tie_word_embeddings=bool(text.get("tie_word_embeddings", default=True)),
        max_position_embeddings=int(text.get("max_position_embeddings", default=131_072)),
    )
    full = rope[FULL]
    return Gemma4Args(
        **base,
        layer_types=layer_types,
        sliding_window=int(window),
        num_experts=int(text.get("num_experts")),
        num_experts_per_tok=int(text.get("top_k_experts")),
        moe_intermediate_size=int(text.get("moe_intermediate_size")),
        norm_topk_prob=True,
        embedding_multiplier=math.sqrt(base["hidden_size"]),
        global_head_dim=head_dim,
        num_global_kv_heads=kv_heads,
        attention_k_eq_v=bool(text.get("attention_k_eq_v", default=False)),
        full_rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        full_partial_rotary_factor=float(full.get("partial_rotary_factor", 1.0))
        if full.get("rope_type") == "proportional"
        else 1.0,
        full_rope_factor=float(full.get("factor", 1.0)) if full.get("rope_type") == "proportional" else 1.0,
        final_logit_softcapping=_softcap(text),
    )


def _refuse_what_we_cannot_compute(text: ConfigView) -> None:
    refuse = []
    if not text.get("enable_moe_block", default=False):
        refuse.append("enable_moe_block false (a dense Gemma-4: mlxmoe trains its MoE model)")
    if int(text.get("hidden_size_per_layer_input", default=256) or 0):
        refuse.append(
            f"hidden_size_per_layer_input {text.get('hidden_size_per_layer_input', default=256)} "
            "(per-layer inputs, as in the small dense E2B/E4B models)"
        )
    if int(text.get("num_kv_shared_layers", default=0) or 0):
        refuse.append(f"num_kv_shared_layers {text.get('num_kv_shared_layers')} (KV sharing)")
    if text.get("attention_bias", default=False):
        refuse.append("attention_bias true")
    if text.get("hidden_activation", default="gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        refuse.append(f"hidden_activation {text.get('hidden_activation')!r} (Gemma-4 uses gelu_pytorch_tanh)")
    if text.get("use_bidirectional_attention", default=None) == "all":
        refuse.append("use_bidirectional_attention 'all' (not a causal language model)")
    if refuse:
        raise CheckpointError(f"{text.source}: not supported for gemma4: {'; '.join(refuse)}")


def _layer_types(text: ConfigView, layers: int) -> list[str]:
    """config.json's, or transformers' default; the last layer is full, as
    Gemma4TextConfig forces it."""
    types = text.get("layer_types", default=None)
    if types is None:
        types = [SLIDING if (i + 1) % SLIDING_PATTERN else FULL for i in range(layers)]
    types = list(types)
    if len(types) != layers or not set(types) <= {SLIDING, FULL}:
        raise CheckpointError(
            f"{text.source}: layer_types must name {layers} layers, each {SLIDING!r} or {FULL!r}; got {types}"
        )
    types[-1] = FULL
    return types


def _rope(text: ConfigView) -> dict[str, dict]:
    params = text.raw.get("rope_parameters") or DEFAULT_ROPE
    if not isinstance(params, dict) or not {SLIDING, FULL} <= set(params):
        raise CheckpointError(
            f"{text.source}: rope_parameters must hold {SLIDING!r} and {FULL!r}, got {params!r}"
        )
    for kind in (SLIDING, FULL):
        rope_type = params[kind].get("rope_type", "default")
        if rope_type not in ROPE_TYPES:
            raise CheckpointError(
                f"{text.source}: rope_parameters.{kind}.rope_type {rope_type!r} is not supported "
                f"for gemma4 (supported: {', '.join(ROPE_TYPES)})"
            )
    sliding = params[SLIDING]
    if sliding.get("rope_type") == "proportional" and (
        sliding.get("partial_rotary_factor", 1.0) != 1.0 or sliding.get("factor", 1.0) != 1.0
    ):
        raise CheckpointError(
            f"{text.source}: proportional RoPE on the sliding layers is not supported for gemma4 "
            f"(rope_parameters.{SLIDING} {sliding!r})"
        )
    return params


def _full_attention_shape(text: ConfigView, layer_types: list[str], head_dim: int, kv_heads: int):
    """(head size, key-value heads) of the full layers: per_layer_config's, alike for every
    full layer and naming no sliding one, or what Gemma4TextConfig derives from
    global_head_dim and num_global_key_value_heads."""
    per_layer = text.raw.get("per_layer_config")
    if per_layer is None:
        global_kv = text.get("num_global_key_value_heads", default=None)
        use_global = global_kv is not None and text.get("attention_k_eq_v", default=False)
        return (
            int(text.get("global_head_dim", default=DEFAULT_GLOBAL_HEAD_DIM)),
            int(global_kv) if use_global else kv_heads,
        )
    overrides = {int(i): spec for i, spec in per_layer.items()}
    full = [i for i, t in enumerate(layer_types) if t == FULL]
    shapes = set()
    for i in full:
        spec = overrides.get(i, {})
        shapes.add((int(spec.get("head_dim", head_dim)), int(spec.get("num_key_value_heads", kv_heads))))
    known = {"head_dim", "num_key_value_heads"}
    odd = set(overrides) - set(full) or {i for i, spec in overrides.items() if set(spec) - known}
    if len(shapes) != 1 or odd:
        raise CheckpointError(
            f"{text.source}: per_layer_config {per_layer!r} is not supported for gemma4: mlxmoe "
            "reads one head_dim and num_key_value_heads for every full_attention layer"
        )
    return shapes.pop()


def _softcap(text: ConfigView) -> float | None:
    cap = text.get("final_logit_softcapping", default=None)
    return float(cap) if cap else None


class Gemma4Family(Family):
    """Builds Gemma-4's own decoder (``nn/gemma4_block.py``), not ``model.build_decoder``'s."""

    def build(self, args: Gemma4Args) -> Gemma4CausalLM:
        return Gemma4CausalLM(args, self.name)


FAMILY = Gemma4Family(
    "gemma4",
    ("gemma4", "gemma4_text"),
    "gemma4",
    HF_TENSORS,
    args_from_config,
    gemma4_gguf.gguf_hparams,
    split_tensor=split_tensor,
    stored_in=STORED_IN,
    hf_prefixes=PREFIXES,
    join_tensor=join_tensor,
    gguf_parts=gemma4_gguf.gguf_parts,
    gguf_config_hparams=gemma4_gguf.gguf_config_hparams,
    gguf_extra_tensors=gemma4_gguf.gguf_extra_tensors,
    gguf_lora_scaled_by=gemma4_gguf.LORA_SCALED_BY,
)
