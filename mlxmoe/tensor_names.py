"""The one table of tensor names.

Every weight has a *role* (llama.cpp's name for it, e.g. ``attn_q``). A role maps to
our module path (what ``model.parameters()`` calls it) and to its GGUF name. Each
family module maps its Hugging Face names onto the same roles, so loading and
exporting read one declaration. ``{bid}`` is the block (layer) index.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Role:
    ours: str
    gguf: str
    per_expert: bool = False  # HF stores one tensor per expert; we stack them


ROLES: dict[str, Role] = {
    "token_embd": Role("embed_tokens.weight", "token_embd.weight"),
    "output_norm": Role("norm.weight", "output_norm.weight"),
    "output": Role("lm_head.weight", "output.weight"),
    "attn_norm": Role("layers.{bid}.input_norm.weight", "blk.{bid}.attn_norm.weight"),
    "attn_q": Role("layers.{bid}.attn.q_proj.weight", "blk.{bid}.attn_q.weight"),
    "attn_k": Role("layers.{bid}.attn.k_proj.weight", "blk.{bid}.attn_k.weight"),
    "attn_v": Role("layers.{bid}.attn.v_proj.weight", "blk.{bid}.attn_v.weight"),
    "attn_q.bias": Role("layers.{bid}.attn.q_proj.bias", "blk.{bid}.attn_q.bias"),
    "attn_k.bias": Role("layers.{bid}.attn.k_proj.bias", "blk.{bid}.attn_k.bias"),
    "attn_v.bias": Role("layers.{bid}.attn.v_proj.bias", "blk.{bid}.attn_v.bias"),
    "attn_output": Role("layers.{bid}.attn.o_proj.weight", "blk.{bid}.attn_output.weight"),
    "attn_output.bias": Role("layers.{bid}.attn.o_proj.bias", "blk.{bid}.attn_output.bias"),
    # gpt-oss: one learned logit per head that every attention softmax also normalizes over
    "attn_sinks": Role("layers.{bid}.attn.sinks", "blk.{bid}.attn_sinks.weight"),
    "attn_q_norm": Role("layers.{bid}.attn.q_norm.weight", "blk.{bid}.attn_q_norm.weight"),
    "attn_k_norm": Role("layers.{bid}.attn.k_norm.weight", "blk.{bid}.attn_k_norm.weight"),
    # Multi-head latent attention (DeepSeek-V2; llama.cpp's deepseek2 names). Queries come
    # from attn_q, or from attn_q_a -> attn_q_a_norm -> attn_q_b; the key-value latent and the
    # shared rotary key from attn_kv_a_mqa, the latent normed by attn_kv_a_norm and expanded
    # by attn_kv_b, which llama.cpp's converter splits per head (GGUF_PARTS).
    "attn_q_a": Role("layers.{bid}.attn.q_a_proj.weight", "blk.{bid}.attn_q_a.weight"),
    "attn_q_a_norm": Role("layers.{bid}.attn.q_a_norm.weight", "blk.{bid}.attn_q_a_norm.weight"),
    "attn_q_b": Role("layers.{bid}.attn.q_b_proj.weight", "blk.{bid}.attn_q_b.weight"),
    "attn_kv_a_mqa": Role("layers.{bid}.attn.kv_a_proj_with_mqa.weight", "blk.{bid}.attn_kv_a_mqa.weight"),
    "attn_kv_a_norm": Role("layers.{bid}.attn.kv_a_norm.weight", "blk.{bid}.attn_kv_a_norm.weight"),
    "attn_kv_b": Role("layers.{bid}.attn.kv_b_proj.weight", "blk.{bid}.attn_kv_b.weight"),
    "ffn_norm": Role("layers.{bid}.post_attn_norm.weight", "blk.{bid}.ffn_norm.weight"),
    # Gated DeltaNet, the linear attention of Qwen3-Next and Qwen3.5 (llama.cpp's qwen3next and
    # qwen35moe names). Qwen3-Next fuses q, k, v and z per key head (ssm_in; llama.cpp's
    # converter regroups and splits it into attn_qkv and attn_gate) and beta with alpha (ssm_ba);
    # Qwen3.5 stores them apart. llama.cpp stores conv1d squeezed to [C, K] and ssm_a as
    # -exp(A_log).
    "ssm_in": Role("layers.{bid}.linear_attn.in_proj_qkvz.weight", "blk.{bid}.ssm_in.weight"),
    "attn_qkv": Role("layers.{bid}.linear_attn.in_proj_qkv.weight", "blk.{bid}.attn_qkv.weight"),
    "attn_gate": Role("layers.{bid}.linear_attn.in_proj_z.weight", "blk.{bid}.attn_gate.weight"),
    "ssm_ba": Role("layers.{bid}.linear_attn.in_proj_ba.weight", "blk.{bid}.ssm_ba.weight"),
    "ssm_beta": Role("layers.{bid}.linear_attn.in_proj_b.weight", "blk.{bid}.ssm_beta.weight"),
    "ssm_alpha": Role("layers.{bid}.linear_attn.in_proj_a.weight", "blk.{bid}.ssm_alpha.weight"),
    "ssm_conv1d": Role("layers.{bid}.linear_attn.conv1d.weight", "blk.{bid}.ssm_conv1d.weight"),
    "ssm_dt.bias": Role("layers.{bid}.linear_attn.dt_bias", "blk.{bid}.ssm_dt.bias"),
    "ssm_a": Role("layers.{bid}.linear_attn.A_log", "blk.{bid}.ssm_a"),
    "ssm_norm": Role("layers.{bid}.linear_attn.norm.weight", "blk.{bid}.ssm_norm.weight"),
    "ssm_out": Role("layers.{bid}.linear_attn.out_proj.weight", "blk.{bid}.ssm_out.weight"),
    # dense feed-forward
    "ffn_gate": Role("layers.{bid}.mlp.gate_proj.weight", "blk.{bid}.ffn_gate.weight"),
    "ffn_up": Role("layers.{bid}.mlp.up_proj.weight", "blk.{bid}.ffn_up.weight"),
    "ffn_down": Role("layers.{bid}.mlp.down_proj.weight", "blk.{bid}.ffn_down.weight"),
    # mixture of experts
    "ffn_gate_inp": Role("layers.{bid}.moe.router.weight", "blk.{bid}.ffn_gate_inp.weight"),
    "ffn_gate_inp.bias": Role("layers.{bid}.moe.router.bias", "blk.{bid}.ffn_gate_inp.bias"),
    "ffn_gate_exps": Role(
        "layers.{bid}.moe.experts.gate_proj.weight", "blk.{bid}.ffn_gate_exps.weight", True
    ),
    "ffn_up_exps": Role("layers.{bid}.moe.experts.up_proj.weight", "blk.{bid}.ffn_up_exps.weight", True),
    "ffn_down_exps": Role(
        "layers.{bid}.moe.experts.down_proj.weight", "blk.{bid}.ffn_down_exps.weight", True
    ),
    # gpt-oss: a bias per expert, stacked [n_experts, out]
    "ffn_gate_exps.bias": Role(
        "layers.{bid}.moe.experts.gate_proj.bias", "blk.{bid}.ffn_gate_exps.bias", True
    ),
    "ffn_up_exps.bias": Role("layers.{bid}.moe.experts.up_proj.bias", "blk.{bid}.ffn_up_exps.bias", True),
    "ffn_down_exps.bias": Role(
        "layers.{bid}.moe.experts.down_proj.bias", "blk.{bid}.ffn_down_exps.bias", True
    ),
    "ffn_gate_shexp": Role(
        "layers.{bid}.moe.shared_expert.gate_proj.weight", "blk.{bid}.ffn_gate_shexp.weight"
    ),
    "ffn_up_shexp": Role("layers.{bid}.moe.shared_expert.up_proj.weight", "blk.{bid}.ffn_up_shexp.weight"),
    "ffn_down_shexp": Role(
        "layers.{bid}.moe.shared_expert.down_proj.weight", "blk.{bid}.ffn_down_shexp.weight"
    ),
    "ffn_gate_inp_shexp": Role(
        "layers.{bid}.moe.shared_expert_gate.weight", "blk.{bid}.ffn_gate_inp_shexp.weight"
    ),
    # Gemma-4 (llama.cpp's gemma4 names): norms after attention and around the dense MLP and
    # the experts, which run side by side; the router's input scale [D] and a scale per
    # expert [E] on its top-k weights; each layer's output times layer_output_scale [1]
    "attn_post_norm": Role("layers.{bid}.attn_post_norm.weight", "blk.{bid}.post_attention_norm.weight"),
    "ffn_post_norm_1": Role("layers.{bid}.mlp_post_norm.weight", "blk.{bid}.post_ffw_norm_1.weight"),
    "ffn_pre_norm_2": Role("layers.{bid}.moe.experts_norm.weight", "blk.{bid}.pre_ffw_norm_2.weight"),
    "ffn_post_norm_2": Role("layers.{bid}.moe_post_norm.weight", "blk.{bid}.post_ffw_norm_2.weight"),
    "ffn_post_norm": Role("layers.{bid}.ffn_post_norm.weight", "blk.{bid}.post_ffw_norm.weight"),
    "ffn_gate_inp.scale": Role("layers.{bid}.moe.router_scale", "blk.{bid}.ffn_gate_inp.scale"),
    "ffn_down_exps.scale": Role("layers.{bid}.moe.per_expert_scale", "blk.{bid}.ffn_down_exps.scale"),
    "layer_output_scale": Role("layers.{bid}.layer_scalar", "blk.{bid}.layer_output_scale.weight"),
}

# GGUF tensors that llama.cpp makes of part of one of ours, or of several, with no module of
# their own: role -> GGUF name (deepseek2: attn_kv_b's key rows per head, transposed, and its
# value rows; gemma4: the gate experts' rows, then the up experts', in one tensor)
GGUF_PARTS: dict[str, str] = {
    "attn_k_b": "blk.{bid}.attn_k_b.weight",
    "attn_v_b": "blk.{bid}.attn_v_b.weight",
    "ffn_gate_up_exps": "blk.{bid}.ffn_gate_up_exps.weight",
}

# Never quantized: routing decisions are sensitive to small errors, and these are tiny. So
# are the linear attention's beta and decay projections (one output per value head), whose
# errors the recurrent state compounds token after token.
UNQUANTIZED_ROLES = frozenset(
    {
        "ffn_gate_inp",
        "ffn_gate_inp_shexp",
        "attn_norm",
        "ffn_norm",
        "output_norm",
        "attn_q_norm",
        "attn_k_norm",
        "attn_sinks",
        "ssm_ba",
        "ssm_beta",
        "ssm_alpha",
        "ssm_conv1d",
        "ssm_dt.bias",
        "ssm_a",
        "ssm_norm",
        "attn_q_a_norm",
        "attn_kv_a_norm",
        "attn_post_norm",
        "ffn_post_norm_1",
        "ffn_pre_norm_2",
        "ffn_post_norm_2",
        "ffn_post_norm",
        "ffn_gate_inp.scale",
        "ffn_down_exps.scale",
        "layer_output_scale",
    }
)

# The roles a quantization scheme may give bits of their own (quantize.Quantization); the
# other quantized roles (dense feed-forward layers) take the scheme's bits.
QUANTIZATION_GROUPS: dict[str, frozenset[str]] = {
    "experts": frozenset({"ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}),
    "shared_experts": frozenset({"ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}),
    "attention": frozenset(
        {
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "attn_q_a",
            "attn_q_b",
            "attn_kv_a_mqa",
            "attn_kv_b",
            "ssm_in",
            "attn_qkv",
            "attn_gate",
            "ssm_out",
        }
    ),
    "embeddings": frozenset({"token_embd", "output"}),
}

# Kept in float32 whatever the model's dtype: the routers (see nn.moe.Router; Gemma-4's input
# and per-expert scales too) and the linear attention's A_log, whose exp scales every decay
# (mlx-lm keeps it float32 too).
FLOAT32_ROLES = frozenset(
    {"ffn_gate_inp", "ffn_gate_inp.bias", "ssm_a", "ffn_gate_inp.scale", "ffn_down_exps.scale"}
)

# The decoder tensors every family here names the same way on the Hugging Face side.
HF_DECODER_TENSORS: dict[str, str] = {
    "token_embd": "model.embed_tokens.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": "model.layers.{bid}.input_layernorm.weight",
    "attn_q": "model.layers.{bid}.self_attn.q_proj.weight",
    "attn_k": "model.layers.{bid}.self_attn.k_proj.weight",
    "attn_v": "model.layers.{bid}.self_attn.v_proj.weight",
    "attn_output": "model.layers.{bid}.self_attn.o_proj.weight",
    "ffn_norm": "model.layers.{bid}.post_attention_layernorm.weight",
}


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``model.layers.{bid}.x.{xid}.w`` -> a regex with named integer groups."""
    escaped = re.escape(pattern)
    escaped = escaped.replace(r"\{bid\}", r"(?P<bid>\d+)").replace(r"\{xid\}", r"(?P<xid>\d+)")
    return re.compile(escaped + "$")


def role_of_path(path: str) -> tuple[str, int | None] | None:
    """Our module path -> (role, block index); None for a path no role names."""
    for role, spec in ROLES.items():
        m = compile_pattern(spec.ours).match(path)
        if m:
            bid = m.groupdict().get("bid")
            return role, (int(bid) if bid is not None else None)
    return None
