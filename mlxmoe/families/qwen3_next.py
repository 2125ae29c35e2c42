"""Qwen3-Next: Gated DeltaNet (linear attention) layers with a gated full-attention layer
every ``full_attention_interval`` (or where ``layer_types`` says), per-head q/k norms and
RoPE on a quarter of each head, routed experts plus a shared expert behind a sigmoid gate,
RMSNorms scaled by (1 + weight). The linear attention fuses its input projections per key
head (``in_proj_qkvz``, ``in_proj_ba``).

What Qwen3.5-MoE shares with it (``qwen3_5_moe.py``) is here: the tensor names under a
prefix, the arguments, and the layouts a checkpoint may store (experts per expert as
``save_pretrained`` writes them, or fused ``gate_up_proj`` / ``down_proj`` as some hub
releases do; conv1d as torch's [C, 1, K])."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError, MlxMoeError
from ..nn.gated_deltanet import DeltaNetArgs
from .base import Family, GGUFPart, require_llama_cpp_routing

LAYER_TYPES = ("linear_attention", "full_attention")
DEFAULT_INTERVAL = 4  # transformers' full_attention_interval when config.json has neither key
DEFAULT_PARTIAL_ROTARY = 0.25  # transformers' partial_rotary_factor when config.json has none

# The linear attention's tensors, by role; Qwen3-Next's fused projections or Qwen3.5's apart
FUSED_PROJECTIONS = {"ssm_in": "in_proj_qkvz", "ssm_ba": "in_proj_ba"}
SEPARATE_PROJECTIONS = {
    "attn_qkv": "in_proj_qkv",
    "attn_gate": "in_proj_z",
    "ssm_beta": "in_proj_b",
    "ssm_alpha": "in_proj_a",
}
DELTANET_TENSORS = {
    "ssm_conv1d": "conv1d.weight",
    "ssm_dt.bias": "dt_bias",
    "ssm_a": "A_log",
    "ssm_norm": "norm.weight",
    "ssm_out": "out_proj.weight",
}


def hf_tensors(prefixes: tuple[str, ...], fused_projections: bool) -> dict[str, tuple[str, ...]]:
    """role -> the checkpoint's names under each model prefix ("model", or Qwen3.5's
    "model.language_model"); the first prefix is what we write."""
    projections = FUSED_PROJECTIONS if fused_projections else SEPARATE_PROJECTIONS
    linear = {role: f"linear_attn.{name}.weight" for role, name in projections.items()}
    linear.update({role: f"linear_attn.{name}" for role, name in DELTANET_TENSORS.items()})
    per_layer = {
        "attn_norm": "input_layernorm.weight",
        "attn_q": "self_attn.q_proj.weight",
        "attn_k": "self_attn.k_proj.weight",
        "attn_v": "self_attn.v_proj.weight",
        "attn_output": "self_attn.o_proj.weight",
        "attn_q_norm": "self_attn.q_norm.weight",
        "attn_k_norm": "self_attn.k_norm.weight",
        **linear,
        "ffn_norm": "post_attention_layernorm.weight",
        "ffn_gate": "mlp.gate_proj.weight",
        "ffn_up": "mlp.up_proj.weight",
        "ffn_down": "mlp.down_proj.weight",
        "ffn_gate_inp": "mlp.gate.weight",
        # per expert as save_pretrained writes them; stacked as split_tensor leaves fused ones
        "ffn_gate_exps": ("mlp.experts.{xid}.gate_proj.weight", "mlp.switch_mlp.gate_proj.weight"),
        "ffn_up_exps": ("mlp.experts.{xid}.up_proj.weight", "mlp.switch_mlp.up_proj.weight"),
        "ffn_down_exps": ("mlp.experts.{xid}.down_proj.weight", "mlp.switch_mlp.down_proj.weight"),
        "ffn_gate_shexp": "mlp.shared_expert.gate_proj.weight",
        "ffn_up_shexp": "mlp.shared_expert.up_proj.weight",
        "ffn_down_shexp": "mlp.shared_expert.down_proj.weight",
        "ffn_gate_inp_shexp": "mlp.shared_expert_gate.weight",
    }
    out = {
        "token_embd": tuple(f"{p}.embed_tokens.weight" for p in prefixes),
        "output_norm": tuple(f"{p}.norm.weight" for p in prefixes),
        "output": ("lm_head.weight",),
    }
    for role, names in per_layer.items():
        names = (names,) if isinstance(names, str) else names
        out[role] = tuple(f"{p}.layers.{{bid}}.{n}" for n in names for p in prefixes)
    return out


def split_tensor(name: str, array, file) -> list[tuple[str, object]]:
    """Fused experts -> the stacked tensors hf_tensors names (``gate_up_proj`` [E, 2 * ffn,
    hidden]: the gate's rows, then the up projection's; ``down_proj`` [E, hidden, ffn]);
    conv1d from torch's [C, 1, K] to ``nn.Conv1d``'s [C, K, 1]. mlx-lm's conversions (conv1d
    already [C, K, 1], norms stored 1 + w) are refused, not misread."""
    stem, _, last = name.rpartition(".")
    if stem.endswith("mlp.experts") and last in ("gate_up_proj", "down_proj"):
        stacked = f"{stem.removesuffix('.experts')}.switch_mlp"
        if array.ndim != 3:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}; fused "
                "experts are stored [experts, out, in]"
            )
        if last == "down_proj":
            return [(f"{stacked}.down_proj.weight", array)]
        ffn = array.shape[1] // 2
        return [
            (f"{stacked}.gate_proj.weight", array[:, :ffn]),
            (f"{stacked}.up_proj.weight", array[:, ffn:]),
        ]
    if name.endswith("linear_attn.conv1d.weight") and array.ndim == 3:
        if array.shape[1] != 1:  # [C, K, 1]: mlx-lm's sanitized layout, its norms 1 + w too
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}, the layout mlx-lm "
                "saves, which also stores this family's RMSNorm weights as 1 + w: mlxmoe reads "
                "the Hugging Face release ([C, 1, K], norms zero-centred)"
            )
        return [(name, array.swapaxes(1, 2))]
    return [(name, array)]


def layer_types(cfg: ConfigView, layers: int) -> list[str]:
    """``layer_types``, else every ``full_attention_interval``-th layer full attention."""
    if cfg.get("layer_types", default=None) is None:
        interval = int(cfg.get("full_attention_interval", default=DEFAULT_INTERVAL))
        return [LAYER_TYPES[(i + 1) % interval == 0] for i in range(layers)]
    types = list(cfg.get("layer_types"))
    if len(types) != layers or not set(types) <= set(LAYER_TYPES):
        raise CheckpointError(
            f"{cfg.source}: layer_types must name {layers} layers, each one of {LAYER_TYPES}; got {types}"
        )
    return types


def partial_rotary_factor(cfg: ConfigView) -> float:
    params = cfg.raw.get("rope_parameters")
    if isinstance(params, dict) and params.get("partial_rotary_factor") is not None:
        return float(params["partial_rotary_factor"])
    return float(cfg.get("partial_rotary_factor", default=DEFAULT_PARTIAL_ROTARY))


def hybrid_args(cfg: ConfigView, *, fused_projections: bool, family: str, **moe) -> MoEArgs:
    """What both families' configs say the same way; ``moe``: the MoE fields they differ in."""
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, default=False):
            raise CheckpointError(f"{cfg.source}: {key}=true is not supported for {family}")
    base = MoEArgs.base_fields(cfg)
    args = MoEArgs(
        **base,
        num_experts=int(cfg.get("num_experts", "num_local_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size")),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size")),
        **moe,
    )
    return replace(
        args,
        qk_norm="head",
        attn_output_gate=True,
        partial_rotary_factor=partial_rotary_factor(cfg),
        norm_weight_offset=1.0,
        layer_types=layer_types(cfg, base["num_layers"]),
        linear_attention=DeltaNetArgs.from_config(cfg, fused_projections=fused_projections),
    )


def args_from_config(cfg: ConfigView) -> MoEArgs:
    return hybrid_args(
        cfg,
        fused_projections=True,
        family="qwen3_next",
        norm_topk_prob=bool(cfg.get("norm_topk_prob", default=True)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", default=1)),
        mlp_only_layers=list(cfg.get("mlp_only_layers", default=[])),
    )


# --- GGUF: what llama.cpp's converter (Qwen3NextModel; Qwen3.5: Qwen3_5MoeTextModel) writes --

# llama.cpp scales these RMSNorms by w, transformers (and we) by 1 + w; the linear attention's
# gated norm is w in both
OFFSET_NORMS = ("attn_norm", "ffn_norm", "output_norm", "attn_q_norm", "attn_k_norm")
# llama.cpp's qwen3next and qwen35moe name the norm before the feed-forward so
GGUF_NAMES = {"ffn_norm": "blk.{bid}.post_attention_norm.weight"}
# The linear attention's tensors whose rows (ssm_out: columns) are value heads
VALUE_HEAD_ROLES = (
    "attn_qkv",
    "attn_gate",
    "ssm_beta",
    "ssm_alpha",
    "ssm_a",
    "ssm_dt.bias",
    "ssm_conv1d",
    "ssm_out",
)


def plus_one(weight: np.ndarray) -> np.ndarray:
    return weight + np.float32(1)


def decay_rate(a_log: np.ndarray) -> np.ndarray:
    """llama.cpp's ssm_a, -exp(A_log), correctly rounded to float32 (the converter's torch.exp
    is within one ulp of it)."""
    return (-np.exp(a_log.astype(np.float64))).astype(np.float32)


def regrouped_rows(d: DeltaNetArgs) -> tuple[np.ndarray, np.ndarray]:
    """in_proj_qkvz's rows ([q k v z] per key head) in the order of llama.cpp's attn_qkv (every
    head's q, then every k, then every v) and attn_gate (every z)."""
    per_value = d.values_per_key * d.value_head_dim
    widths = (d.key_head_dim, d.key_head_dim, per_value, per_value)
    rows = np.arange(d.num_key_heads * sum(widths)).reshape(d.num_key_heads, sum(widths))
    q, k, v, z = np.split(rows, np.cumsum(widths)[:-1], axis=1)
    return np.concatenate([q.ravel(), k.ravel(), v.ravel()]), z.ravel()


def tiled_value_heads(d: DeltaNetArgs, width: int) -> np.ndarray:
    """Value heads (``width`` rows each) from the hub's order, grouped by key head (key head
    0's value heads, then key head 1's), to llama.cpp's qwen35moe order, tiled (every key
    head's first value head, then every key head's second): ggml broadcasts that way."""
    heads = np.arange(d.num_value_heads * width).reshape(d.num_key_heads, d.values_per_key, width)
    return heads.swapaxes(0, 1).ravel()


def gguf_parts(role: str, args: MoEArgs, tiled: bool = False) -> list[GGUFPart] | None:
    """``tiled``: value heads reordered as llama.cpp's qwen35moe wants them (Qwen3.5)."""
    d = args.linear_attention
    if role in OFFSET_NORMS:
        return [GGUFPart(role, value=plus_one)]
    if role == "ssm_in":
        qkv, z = regrouped_rows(d)
        return [GGUFPart("attn_qkv", rows=qkv), GGUFPart("attn_gate", rows=z)]
    part = GGUFPart(role, value=decay_rate if role == "ssm_a" else None, squeeze=role == "ssm_conv1d")
    if tiled and d.num_key_heads != d.num_value_heads and role in VALUE_HEAD_ROLES:
        width = 1 if role in ("ssm_beta", "ssm_alpha", "ssm_a", "ssm_dt.bias") else d.value_head_dim
        heads = tiled_value_heads(d, width)
        if role == "ssm_out":
            return [replace(part, cols=heads)]
        if role in ("attn_qkv", "ssm_conv1d"):  # q and k channels first, as they are
            heads = np.concatenate([np.arange(2 * d.key_dim), 2 * d.key_dim + heads])
        return [replace(part, rows=heads)]
    return [part] if part != GGUFPart(role) else None


def gguf_hparams(args: MoEArgs, writer) -> None:
    # llama.cpp's qwen3next / qwen35moe graphs: every layer sparse, top-k renormalized
    require_llama_cpp_routing(args, "qwen3next / qwen35moe", normalized=True)
    d = args.linear_attention
    if d.key_head_dim != d.value_head_dim:  # llama.cpp reads one size for both: ssm.state_size
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's qwen3next / qwen35moe take the linear attention's "
            f"value heads as wide as its key heads; this config has linear_key_head_dim="
            f"{d.key_head_dim}, linear_value_head_dim={d.value_head_dim}"
        )
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)
    writer.add_expert_shared_feed_forward_length(args.shared_expert_intermediate_size)
    writer.add_ssm_conv_kernel(d.conv_kernel_size)
    writer.add_ssm_state_size(d.key_head_dim)
    writer.add_ssm_group_count(d.num_key_heads)
    writer.add_ssm_time_step_rank(d.num_value_heads)
    writer.add_ssm_inner_size(d.value_dim)
    writer.add_rope_dimension_count(int(args.head_dim * args.partial_rotary_factor))


def gguf_config_hparams(cfg: ConfigView, writer) -> None:
    """As the converter writes them: the layer types where config.json lists them, and the
    interval it says (4 where it says none, even beside a list)."""
    if cfg.get("layer_types", default=None) is not None:
        # the key gguf-py's add_recurrent_layers writes (newer than the gguf-py we install)
        writer.add_array(
            f"{writer.arch}.attention.recurrent_layers",
            [t == "linear_attention" for t in cfg.get("layer_types")],
        )
    writer.add_full_attention_interval(int(cfg.get("full_attention_interval", default=DEFAULT_INTERVAL)))


def hub_layout(role: str, array):
    """conv1d back to torch's [C, 1, K] (ours: nn.Conv1d's [C, K, 1])."""
    return array.swapaxes(1, 2) if role == "ssm_conv1d" else None


FAMILY = Family(
    "qwen3_next",
    ("qwen3_next",),
    "qwen3next",
    hf_tensors(("model",), True),
    args_from_config,
    gguf_hparams,
    split_tensor=split_tensor,
    gguf_parts=gguf_parts,
    gguf_config_hparams=gguf_config_hparams,
    hub_layout=hub_layout,
    gguf_names=GGUF_NAMES,
)
