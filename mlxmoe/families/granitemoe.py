"""Granite MoE (IBM Granite 3.x MoE, PowerMoE): Mixtral's layout with four multipliers (the
embeddings', the attention scale, the residual branches', the logits' divisor), every layer
sparse, the top-k router logits softmaxed among themselves. The hub stores each layer's
experts fused: ``input_linear`` [E, 2 * ffn, hidden] (the gate's rows, then the up
projection's), ``output_linear`` [E, hidden, ffn]; the router is ``router.layer``."""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError, MlxMoeError
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, require_llama_cpp_routing
from .llama import gguf_hparams as llama_hparams

_M = "model.layers.{bid}.block_sparse_moe"

# The experts under mlx-lm's names (stacked [E, out, in]), which split_tensor makes of the
# hub's fused tensors; mlx-lm's own Granite MoE conversions load as they are.
HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "ffn_gate_inp": f"{_M}.router.layer.weight",
    "ffn_gate_exps": f"{_M}.switch_mlp.gate_proj.weight",
    "ffn_up_exps": f"{_M}.switch_mlp.up_proj.weight",
    "ffn_down_exps": f"{_M}.switch_mlp.down_proj.weight",
}
STORED_IN = {
    "ffn_gate_exps": f"{_M}.input_linear.weight",
    "ffn_up_exps": f"{_M}.input_linear.weight",
    "ffn_down_exps": f"{_M}.output_linear.weight",
}


def split_tensor(name: str, array, file) -> list[tuple[str, object]]:
    stem = name.removesuffix(".weight")
    if stem.endswith("block_sparse_moe.input_linear"):
        if array.ndim != 3 or array.shape[1] % 2:
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(array.shape)}; Granite "
                "stores it [experts, 2 * ffn, hidden]"
            )
        ffn, moe = array.shape[1] // 2, stem.removesuffix(".input_linear")
        return [
            (f"{moe}.switch_mlp.gate_proj.weight", array[:, :ffn]),
            (f"{moe}.switch_mlp.up_proj.weight", array[:, ffn:]),
        ]
    if stem.endswith("block_sparse_moe.output_linear"):
        return [(f"{stem.removesuffix('.output_linear')}.switch_mlp.down_proj.weight", array)]
    return [(name, array)]


def join_tensor(name: str, parts: dict[str, mx.array]) -> mx.array:
    """split_tensor's inverse, for export_hf."""
    if name.endswith("input_linear.weight"):
        return mx.concatenate([parts["ffn_gate_exps"], parts["ffn_up_exps"]], axis=1)
    return parts["ffn_down_exps"]


def args_from_config(cfg: ConfigView) -> MoEArgs:
    if cfg.get("attention_bias", default=False):
        raise CheckpointError(f"{cfg.source}: attention_bias=true is not supported for granitemoe")
    base = MoEArgs.base_fields(cfg)
    args = MoEArgs(
        **base,
        num_experts=int(cfg.get("num_local_experts", "num_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=base["intermediate_size"],
        norm_topk_prob=True,
    )
    # transformers' GraniteMoeConfig defaults: 1.0 each
    return replace(
        args,
        router_softmax="top_k",
        embedding_multiplier=float(cfg.get("embedding_multiplier", default=1.0)),
        attention_multiplier=float(cfg.get("attention_multiplier", default=1.0)),
        residual_multiplier=float(cfg.get("residual_multiplier", default=1.0)),
        logits_scaling=float(cfg.get("logits_scaling", default=1.0)),
    )


def gguf_hparams(args: MoEArgs, writer) -> None:
    """What the converter's GraniteMoeModel adds to llama's keys: the four multipliers, which
    llama.cpp's granitemoe requires (the converter skips a missing or zero one, and llama.cpp
    then refuses the file; we write transformers' default, 1.0). llama.cpp takes every head
    as hidden_size / num_heads wide (the converter drops head_dim) and renormalizes the
    top-k softmax, which is what the top-k logits softmaxed among themselves are."""
    require_llama_cpp_routing(args, "granitemoe", normalized=True)
    if args.head_dim * args.num_heads != args.hidden_size:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's granitemoe takes heads of hidden_size "
            f"/ num_heads = {args.hidden_size // args.num_heads}, this config has "
            f"head_dim={args.head_dim}"
        )
    llama_hparams(args, writer)
    writer.add_attention_scale(args.attention_multiplier)
    writer.add_embedding_scale(args.embedding_multiplier)
    writer.add_residual_scale(args.residual_multiplier)
    writer.add_logit_scale(args.logits_scaling)


FAMILY = Family(
    "granitemoe",
    ("granitemoe",),
    "granitemoe",
    HF_TENSORS,
    args_from_config,
    gguf_hparams,
    permute_qk=True,
    split_tensor=split_tensor,
    stored_in=STORED_IN,
    join_tensor=join_tensor,
)
