"""DeepSeek-V2 and V2-Lite: multi-head latent attention (``nn/mla.py``) in every layer, a
dense SwiGLU in the first ``first_k_dense_replace`` layers and experts after them: a softmax
router whose top k (from the best ``topk_group`` of ``n_group`` groups, with
``group_limited_greedy``) are weighted by ``routed_scaling_factor``, plus ``n_shared_experts``
experts' worth of shared expert, ungated.

transformers 5.25 (the reference) never renormalizes the top-k weights: it reads
``norm_topk_prob`` but does not use it (DeepSeek's own modeling code renormalizes when it is
true; every DeepSeek-V2 release sets it false). Configs where the two disagree in other ways
(``moe_layer_freq`` other than 1, a scoring function other than softmax) are refused."""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError, MlxMoeError
from ..nn.mla import MLAArgs
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, GGUFPart, add_yarn_keys

_A = "model.layers.{bid}.self_attn"
_L = "model.layers.{bid}.mlp"
TOPK_METHODS = ("greedy", "group_limited_greedy")

HF_TENSORS = {
    **{role: name for role, name in HF_DECODER_TENSORS.items() if role not in ("attn_k", "attn_v")},
    "attn_q_a": f"{_A}.q_a_proj.weight",
    "attn_q_a_norm": f"{_A}.q_a_layernorm.weight",
    "attn_q_b": f"{_A}.q_b_proj.weight",
    "attn_kv_a_mqa": f"{_A}.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm": f"{_A}.kv_a_layernorm.weight",
    "attn_kv_b": f"{_A}.kv_b_proj.weight",
    "ffn_gate": f"{_L}.gate_proj.weight",
    "ffn_up": f"{_L}.up_proj.weight",
    "ffn_down": f"{_L}.down_proj.weight",
    "ffn_gate_inp": f"{_L}.gate.weight",
    # per expert as the hub and save_pretrained store them; stacked as mlx-lm saves them
    "ffn_gate_exps": (f"{_L}.experts.{{xid}}.gate_proj.weight", f"{_L}.switch_mlp.gate_proj.weight"),
    "ffn_up_exps": (f"{_L}.experts.{{xid}}.up_proj.weight", f"{_L}.switch_mlp.up_proj.weight"),
    "ffn_down_exps": (f"{_L}.experts.{{xid}}.down_proj.weight", f"{_L}.switch_mlp.down_proj.weight"),
    "ffn_gate_shexp": f"{_L}.shared_experts.gate_proj.weight",
    "ffn_up_shexp": f"{_L}.shared_experts.up_proj.weight",
    "ffn_down_shexp": f"{_L}.shared_experts.down_proj.weight",
}


def args_from_config(cfg: ConfigView) -> MoEArgs:
    refuse = [f"{key}=true" for key in ("attention_bias", "mlp_bias") if cfg.get(key, default=False)]
    method = cfg.get("topk_method", default="greedy")
    if method not in TOPK_METHODS:
        refuse.append(f"topk_method {method!r} (DeepSeek-V2 routes with {' or '.join(TOPK_METHODS)})")
    if int(cfg.get("moe_layer_freq", default=1)) != 1:
        refuse.append(
            f"moe_layer_freq {cfg.get('moe_layer_freq')} (transformers places experts "
            "in every layer after first_k_dense_replace)"
        )
    if cfg.get("scoring_func", default="softmax") != "softmax":
        refuse.append(f"scoring_func {cfg.get('scoring_func')!r}")
    if cfg.get("hidden_act", default="silu") != "silu":
        refuse.append(f"hidden_act {cfg.get('hidden_act')!r}")
    heads = int(cfg.get("num_attention_heads"))
    if int(cfg.get("num_key_value_heads", default=heads)) != heads:
        refuse.append(
            "num_key_value_heads other than num_attention_heads (latent attention "
            "expands keys and values for every head)"
        )
    if refuse:
        raise CheckpointError(f"{cfg.source}: not supported for deepseek_v2: {'; '.join(refuse)}")
    mla = MLAArgs.from_config(cfg)
    base = MoEArgs.base_fields(cfg)
    experts = int(cfg.get("n_routed_experts", "num_local_experts"))
    top_k = int(cfg.get("num_experts_per_tok"))
    groups, used = 1, 1
    if method == "group_limited_greedy":
        groups, used = int(cfg.get("n_group")), int(cfg.get("topk_group"))
        if experts % groups or not 0 < used <= groups or top_k > used * (experts // groups):
            raise CheckpointError(
                f"{cfg.source}: {experts} experts in n_group={groups} groups, "
                f"top {top_k} of the best topk_group={used}: not a valid routing"
            )
    shared = int(cfg.get("n_shared_experts", default=0))
    args = MoEArgs(
        **{**base, "head_dim": mla.qk_head_dim, "qkv_bias": False},
        num_experts=experts,
        num_experts_per_tok=top_k,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size")),
        norm_topk_prob=False,
        shared_expert_intermediate_size=shared * int(cfg.get("moe_intermediate_size")),
        mlp_only_layers=list(range(int(cfg.get("first_k_dense_replace", default=0)))),
    )
    return replace(
        args,
        mla=mla,
        shared_expert_gate=False,
        expert_groups=groups,
        expert_groups_used=used,
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", default=1.0)),
    )


# --- GGUF: what llama.cpp's converter (conversion/deepseek.py, DeepseekV2Model) writes ---

# llama.cpp 0.3.36's deepseek2 tells DeepSeek-V2-Lite (queries from attn_q, no q_lora_rank
# key) from the others by its layer count: 26 or 27 layers (or 48 with a 128,256-token
# vocabulary), and reads q_lora_rank for any other
LITE_LAYER_COUNTS = (26, 27)
LITE_VOCAB_48 = 128256
# The matrices llama.cpp's deepseek2 graph multiplies with ggml_mul_mat, not build_lora_mm: an
# adapter GGUF's LoRA on them would load and never be applied
NO_LORA_ROLES = ("attn_q", "attn_q_a", "attn_q_b", "attn_kv_a_mqa", "attn_kv_b")


def kv_b_parts(args: MoEArgs) -> list[GGUFPart]:
    """kv_b_proj's rows ([nope keys, values] per head) -> attn_k_b [heads, latent, nope]
    (each head's key rows, transposed) and attn_v_b [heads, v, latent]."""
    m = args.mla
    rows = np.arange(args.num_heads * (m.qk_nope_head_dim + m.v_head_dim)).reshape(args.num_heads, -1)
    return [
        GGUFPart(
            "attn_k_b", rows=rows[:, : m.qk_nope_head_dim].ravel(), heads=args.num_heads, transposed=True
        ),
        GGUFPart("attn_v_b", rows=rows[:, m.qk_nope_head_dim :].ravel(), heads=args.num_heads),
    ]


def gguf_parts(role: str, args: MoEArgs) -> list[GGUFPart] | None:
    return kv_b_parts(args) if role == "attn_kv_b" else None


def is_lite(args: MoEArgs) -> bool:
    layers = args.num_layers
    return layers in LITE_LAYER_COUNTS or (layers == 48 and args.vocab_size == LITE_VOCAB_48)


def gguf_hparams(args: MoEArgs, writer) -> None:
    """The converter's deepseek2 keys; refuses what llama.cpp 0.3.36 would load otherwise."""
    m = args.mla
    if (m.q_lora_rank is None) != is_lite(args):
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's deepseek2 takes queries without q_lora_rank (as "
            f"DeepSeek-V2-Lite's) exactly when a model has {' or '.join(map(str, LITE_LAYER_COUNTS))} "
            f"layers (or 48 and a {LITE_VOCAB_48}-token vocabulary); this one has {args.num_layers} "
            f"layers and q_lora_rank={m.q_lora_rank}"
        )
    rope = args.rope_scaling
    if rope is not None and (
        rope.get("truncate", True) is False
        or rope.get("attention_factor") is not None
        or not rope.get("mscale_all_dim")
        or rope.get("mscale") != rope["mscale_all_dim"]
    ):
        raise MlxMoeError(
            "cannot export to GGUF: llama.cpp's deepseek2 computes YaRN as DeepSeek ships it (mscale "
            "equal to mscale_all_dim, no attention_factor, the correction range truncated); this "
            f"config has {rope!r}"
        )
    # the converter's: latent attention runs as one KV head of the latent's width in llama.cpp
    for key in (
        gguf.Keys.Attention.HEAD_COUNT_KV,
        gguf.Keys.Attention.KEY_LENGTH,
        gguf.Keys.Attention.VALUE_LENGTH,
    ):
        for kv in writer.kv_data:  # written by the common keys; replaced, as the converter does
            kv.pop(key.format(arch=writer.arch), None)
    writer.add_head_count_kv(1)
    writer.add_leading_dense_block_count(len(args.mlp_only_layers))
    writer.add_vocab_size(args.vocab_size)
    if m.q_lora_rank is not None:
        writer.add_q_lora_rank(m.q_lora_rank)
    writer.add_kv_lora_rank(m.kv_lora_rank)
    writer.add_key_length(m.kv_lora_rank + m.qk_rope_head_dim)
    writer.add_value_length(m.kv_lora_rank)
    writer.add_key_length_mla(m.qk_head_dim)
    writer.add_value_length_mla(m.v_head_dim)
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)
    writer.add_expert_shared_count(args.shared_expert_intermediate_size // args.moe_intermediate_size)
    writer.add_rope_dimension_count(m.qk_rope_head_dim)
    if args.rope_scaling is not None:
        add_yarn_keys(args.rope_scaling, writer, "deepseek2")


def gguf_config_hparams(cfg: ConfigView, writer) -> None:
    """The keys the converter writes from config.json's keys as they are spelled."""
    if cfg.get("norm_topk_prob", default=False):
        raise MlxMoeError(
            "cannot export to GGUF: llama.cpp's deepseek2 renormalizes the top-k "
            "weights where norm_topk_prob is true; transformers (and mlxmoe) does not"
        )
    if int(cfg.get("n_group", default=1)) > 1:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's deepseek2 keeps the expert groups whose two best "
            f"experts sum highest (DeepSeek-V3's rule); DeepSeek-V2's group_limited_greedy ranks a "
            f"group by its best expert, and greedy ignores groups; this config has n_group="
            f"{cfg.get('n_group')}, topk_method {cfg.get('topk_method', default='greedy')!r}"
        )
    for key, add in (
        ("n_group", writer.add_expert_group_count),
        ("topk_group", writer.add_expert_group_used_count),
        ("routed_scaling_factor", writer.add_expert_weights_scale),
    ):
        if cfg.get(key, default=None) is not None:
            add(cfg.get(key))
    if cfg.get("scoring_func", default=None) is not None:  # "softmax": args_from_config refuses others
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SOFTMAX)
    scaling = cfg.rope()[1] or {}
    if scaling.get("mscale_all_dim") is not None:
        # llama.cpp divides it by 0.1 again (its TAG_DEEPSEEK2_YARN_LOG_MUL_FIX)
        writer.add_rope_scaling_yarn_log_mul(0.1 * scaling["mscale_all_dim"])


FAMILY = Family(
    "deepseek_v2",
    ("deepseek_v2",),
    "deepseek2",
    HF_TENSORS,
    args_from_config,
    gguf_hparams,
    gguf_parts=gguf_parts,
    gguf_config_hparams=gguf_config_hparams,
    gguf_rope_scaling=True,
    gguf_no_lora=NO_LORA_ROLES,
)
