"""gpt-oss: sliding-window and full attention alternating, attention sinks, biases on q/k/v/o,
on the router and on the experts, top-k of the router logits softmaxed among themselves,
gpt-oss's clamped SwiGLU, YaRN RoPE. The hub stores the experts fused and transposed
(``gate_up_proj`` [E, hidden, 2 * ffn], gate and up columns interleaved; ``down_proj``
[E, ffn, hidden]), as published in MXFP4 (``*_blocks``, ``*_scales``, rows = outputs)."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError, MlxMoeError
from ..nn.rope import yarn_frequencies, yarn_mscale
from ..prequantized import mxfp4_scales, mxfp4_weight
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, add_yarn_keys, require_llama_cpp_routing

_L = "model.layers.{bid}"
_X = f"{_L}.mlp.experts"

# The experts under mlx-lm's names and in its layout ([E, out, in]), which split_tensor
# turns the hub's fused tensors into; mlx-lm's own gpt-oss checkpoints load as they are.
HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "attn_q.bias": f"{_L}.self_attn.q_proj.bias",
    "attn_k.bias": f"{_L}.self_attn.k_proj.bias",
    "attn_v.bias": f"{_L}.self_attn.v_proj.bias",
    "attn_output.bias": f"{_L}.self_attn.o_proj.bias",
    "attn_sinks": f"{_L}.self_attn.sinks",
    "ffn_gate_inp": f"{_L}.mlp.router.weight",
    "ffn_gate_inp.bias": f"{_L}.mlp.router.bias",
    "ffn_gate_exps": f"{_X}.gate_proj.weight",
    "ffn_up_exps": f"{_X}.up_proj.weight",
    "ffn_down_exps": f"{_X}.down_proj.weight",
    "ffn_gate_exps.bias": f"{_X}.gate_proj.bias",
    "ffn_up_exps.bias": f"{_X}.up_proj.bias",
    "ffn_down_exps.bias": f"{_X}.down_proj.bias",
}

# Where the hub's layout keeps each of those (fused; MXFP4 adds _blocks / _scales)
STORED_IN = {
    "ffn_gate_exps": f"{_X}.gate_up_proj",
    "ffn_up_exps": f"{_X}.gate_up_proj",
    "ffn_down_exps": f"{_X}.down_proj",
    "ffn_gate_exps.bias": f"{_X}.gate_up_proj_bias",
    "ffn_up_exps.bias": f"{_X}.gate_up_proj_bias",
    "ffn_down_exps.bias": f"{_X}.down_proj_bias",
}

# What transformers' GptOssConfig assumes when config.json leaves these out.
DEFAULT_ROPE_THETA = 150000.0
DEFAULT_YARN = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}
DEFAULT_SWIGLU_ALPHA = 1.702  # hub configs (transformers 4) carry only swiglu_limit
LAYER_TYPES = ("sliding_attention", "full_attention")
LLAMA_CPP_SWIGLU = (1.702, 7.0)  # llama-graph.cpp, LLM_FFN_SWIGLU_OAI_MOE: (alpha, limit)

# llama.cpp's gpt-oss names the norm before the experts ATTN_POST_NORM
GGUF_NAMES = {"ffn_norm": "blk.{bid}.post_attention_norm.weight"}


def split_tensor(name: str, array, file) -> list[tuple[str, object]]:
    """The hub's fused expert tensors -> one tensor per projection, [E, out, in]: gate from
    the even outputs of gate_up_proj, up from the odd ones (float tensors are [E, in, out],
    MXFP4 blocks and scales already out-major)."""
    stem, _, last = name.rpartition(".")
    if not stem.endswith("mlp.experts") or "proj" not in last:
        return [(name, array)]
    gate, up, down = f"{stem}.gate_proj", f"{stem}.up_proj", f"{stem}.down_proj"
    if last in ("gate_up_proj", "down_proj"):
        if array.ndim != 3:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}; gpt-oss "
                "stores it [experts, in, out]"
            )
        weight = array.swapaxes(-1, -2)
        if last == "down_proj":
            return [(f"{down}.weight", weight)]
        return [(f"{gate}.weight", weight[..., 0::2, :]), (f"{up}.weight", weight[..., 1::2, :])]
    if last == "gate_up_proj_bias":
        return [(f"{gate}.bias", array[..., 0::2]), (f"{up}.bias", array[..., 1::2])]
    if last == "down_proj_bias":
        return [(f"{down}.bias", array)]
    if last == "gate_up_proj_blocks":
        packed = mxfp4_weight(array, name, file)
        return [(f"{gate}.weight", packed[..., 0::2, :]), (f"{up}.weight", packed[..., 1::2, :])]
    if last == "gate_up_proj_scales":
        scales = mxfp4_scales(array, name, file)
        return [(f"{gate}.scales", scales[..., 0::2, :]), (f"{up}.scales", scales[..., 1::2, :])]
    if last == "down_proj_blocks":
        return [(f"{down}.weight", mxfp4_weight(array, name, file))]
    if last == "down_proj_scales":
        return [(f"{down}.scales", mxfp4_scales(array, name, file))]
    return [(name, array)]


def args_from_config(cfg: ConfigView) -> MoEArgs:
    base = MoEArgs.base_fields(cfg, qkv_bias_default=True)  # attention_bias: q, k, v and o
    if "rope_parameters" not in cfg.raw and "rope_scaling" not in cfg.raw:
        base.update(
            rope_theta=float(cfg.get("rope_theta", default=DEFAULT_ROPE_THETA)),
            rope_scaling=dict(DEFAULT_YARN),
        )
    layers = base["num_layers"]
    layer_types = list(cfg.get("layer_types", default=[LAYER_TYPES[i % 2] for i in range(layers)]))
    if len(layer_types) != layers or not set(layer_types) <= set(LAYER_TYPES):
        raise CheckpointError(
            f"{cfg.source}: layer_types must name {layers} layers, each one of "
            f"{LAYER_TYPES}; got {layer_types}"
        )
    window = cfg.get("sliding_window", default=None)
    args = MoEArgs(
        **base,
        num_experts=int(cfg.get("num_local_experts", "num_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", "experts_per_token")),
        moe_intermediate_size=int(cfg.get("intermediate_size")),
        norm_topk_prob=True,
    )
    return replace(
        args,
        o_bias=args.qkv_bias,
        attn_sinks=True,
        layer_types=layer_types,
        sliding_window=None if window is None else int(window),
        router_bias=True,
        router_softmax="top_k",
        expert_bias=True,
        swiglu_alpha=float(cfg.get("swiglu_alpha", default=DEFAULT_SWIGLU_ALPHA)),
        swiglu_limit=float(cfg.get("swiglu_limit", default=7.0)),
    )


def join_tensor(name: str, parts: dict[str, mx.array]) -> mx.array:
    """split_tensor's inverse, for export_hf: ours ([E, out, in], biases [E, out]) -> the
    hub's fused tensor ``name`` ([E, in, out], gate and up interleaved)."""
    if name.endswith("gate_up_proj_bias"):
        gate, up = parts["ffn_gate_exps.bias"], parts["ffn_up_exps.bias"]
        return mx.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)
    if name.endswith("gate_up_proj"):
        gate, up = parts["ffn_gate_exps"], parts["ffn_up_exps"]
        return mx.stack([gate, up], axis=-2).reshape(gate.shape[0], -1, gate.shape[-1]).swapaxes(-1, -2)
    if name.endswith("down_proj_bias"):
        return parts["ffn_down_exps.bias"]
    return parts["ffn_down_exps"].swapaxes(-1, -2)


def gguf_hparams(args: MoEArgs, writer) -> None:
    """What the converter's GptOssModel adds; refuses what llama.cpp's gpt-oss graph
    (src/models/openai-moe.cpp) would compute otherwise: it hard-codes the SwiGLU's alpha and
    limit, takes layer i as sliding exactly when i is even, and reads YaRN's factor and
    original context alone (beta_fast 32, beta_slow 1, attention factor 0.1 ln(factor) + 1).
    It always rounds YaRN's correction range to whole dimensions, as transformers does only
    with ``truncate``: gpt-oss ships ``truncate: false``, which llama.cpp, like every
    published gpt-oss GGUF, computes rounded (tests/test_gpt_oss_export.py measures it)."""
    require_llama_cpp_routing(args, "gpt-oss", normalized=True)
    refuse = []
    if (args.swiglu_alpha, args.swiglu_limit) != LLAMA_CPP_SWIGLU:
        refuse.append(
            f"SwiGLU alpha {args.swiglu_alpha} and limit {args.swiglu_limit} (llama.cpp "
            f"computes {LLAMA_CPP_SWIGLU[0]} and {LLAMA_CPP_SWIGLU[1]})"
        )
    alternating = [LAYER_TYPES[i % 2] for i in range(args.num_layers)]
    if args.sliding_window is None or list(args.layer_types) != alternating:
        refuse.append(
            f"layer_types {list(args.layer_types)} with sliding_window {args.sliding_window} "
            "(llama.cpp slides a window over the even layers, full attention on the odd ones)"
        )
    rope = args.rope_scaling
    if rope is not None:
        refuse += _yarn_refusals(args)
    if refuse:
        raise MlxMoeError(
            "cannot export gpt_oss to GGUF: llama.cpp's gpt-oss computes other "
            "values for " + "; ".join(refuse)
        )
    if rope is not None:
        add_yarn_keys(rope, writer, "gpt-oss")
    writer.add_sliding_window(args.sliding_window)
    writer.add_expert_feed_forward_length(args.moe_intermediate_size)


def _yarn_refusals(args: MoEArgs) -> list[str]:
    rope = args.rope_scaling
    kind = rope.get("rope_type", rope.get("type"))
    if kind != "yarn" or not rope.get("factor") or "original_max_position_embeddings" not in rope:
        return [
            f"rope scaling {rope!r} (it reads rope_type yarn with factor and "
            "original_max_position_embeddings)"
        ]
    _, attention = yarn_frequencies(args.head_dim, args.rope_theta, rope, args.max_position_embeddings)
    ours = {
        "beta_fast": rope.get("beta_fast") or 32.0,
        "beta_slow": rope.get("beta_slow") or 1.0,
        "extrapolation_factor": rope.get("extrapolation_factor", 1.0),
        "attention factor": attention,
    }
    theirs = {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "extrapolation_factor": 1.0,
        "attention factor": yarn_mscale(rope["factor"]),
    }
    return [
        f"YaRN {k} {ours[k]} (llama.cpp: {theirs[k]})"
        for k in ours
        if abs(ours[k] - theirs[k]) > 1e-6 * abs(theirs[k])
    ]


FAMILY = Family(
    "gpt_oss",
    ("gpt_oss",),
    "gpt-oss",
    HF_TENSORS,
    args_from_config,
    gguf_hparams,
    split_tensor=split_tensor,
    stored_in=STORED_IN,
    mxfp4_experts=True,
    join_tensor=join_tensor,
    gguf_names=GGUF_NAMES,
    gguf_rope_scaling=True,
)
