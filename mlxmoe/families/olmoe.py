"""OLMoE: 64 experts top-8 without renormalization, q/k RMSNorm over all heads at once,
optional clamping of q/k/v (``clip_qkv``)."""

from __future__ import annotations

from dataclasses import replace

from ..config import ConfigView, MoEArgs
from ..errors import CheckpointError, MlxMoeError
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family, require_llama_cpp_routing
from .qwen2_moe import HF_FFN_TENSORS

_L = "model.layers.{bid}"

HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "attn_q_norm": f"{_L}.self_attn.q_norm.weight",
    "attn_k_norm": f"{_L}.self_attn.k_norm.weight",
    **HF_FFN_TENSORS,
}


def args_from_config(cfg: ConfigView) -> MoEArgs:
    if cfg.get("attention_bias", default=False):
        raise CheckpointError(f"{cfg.source}: attention_bias=true is not supported for olmoe")
    args = MoEArgs(
        **MoEArgs.base_fields(cfg),
        num_experts=int(cfg.get("num_experts", "num_local_experts")),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok")),
        moe_intermediate_size=int(cfg.get("intermediate_size")),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", default=False)),
    )
    clip = cfg.get("clip_qkv", default=None)
    return replace(args, qk_norm="full", clip_qkv=None if clip is None else float(clip))


def gguf_hparams(args: MoEArgs, writer) -> None:
    # llama.cpp's olmoe graph: top-k weights not renormalized, no q/k/v clamping.
    require_llama_cpp_routing(args, "olmoe", normalized=False)
    if args.clip_qkv is not None:
        raise MlxMoeError("olmoe with clip_qkv cannot be exported: llama.cpp's olmoe graph does not clamp")


FAMILY = Family("olmoe", ("olmoe",), "olmoe", HF_TENSORS, args_from_config, gguf_hparams)
