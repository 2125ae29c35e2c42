"""Dense Llama (SmolLM2 and friends): the base that upcycling turns into an MoE."""

from __future__ import annotations

from ..config import ConfigView, DecoderArgs
from ..errors import CheckpointError
from ..tensor_names import HF_DECODER_TENSORS
from .base import Family

HF_TENSORS = {
    **HF_DECODER_TENSORS,
    "ffn_gate": "model.layers.{bid}.mlp.gate_proj.weight",
    "ffn_up": "model.layers.{bid}.mlp.up_proj.weight",
    "ffn_down": "model.layers.{bid}.mlp.down_proj.weight",
}


def args_from_config(cfg: ConfigView) -> DecoderArgs:
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, default=False):
            raise CheckpointError(f"{cfg.source}: {key}=true is not supported for llama")
    return DecoderArgs(**DecoderArgs.base_fields(cfg))


def gguf_hparams(args: DecoderArgs, writer) -> None:
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.head_dim)


FAMILY = Family("llama", ("llama",), "llama", HF_TENSORS, args_from_config, gguf_hparams, permute_qk=True)
