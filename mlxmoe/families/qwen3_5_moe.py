"""Qwen3.5-MoE, its language model: Qwen3-Next's architecture (``qwen3_next.py``) with the
linear attention's input projections stored apart (``in_proj_qkv``, ``in_proj_z``,
``in_proj_b``, ``in_proj_a``), every layer sparse and the top-k weights always renormalized.

It is published as a multimodal checkpoint (``Qwen3_5MoeForConditionalGeneration``): the
config nests the language model's keys under ``text_config`` and its tensors under
``model.language_model``. That is the model we load and train; the vision tower
(``model.visual.*``) and the multi-token-prediction head (``mtp.*``) are skipped. A text-only
checkpoint (``model_type`` "qwen3_5_moe_text", tensors under ``model``) loads too. RoPE is
the multimodal one, which on text (one position for all three axes) is plain RoPE."""

from __future__ import annotations

from ..config import ConfigView, MoEArgs
from ..errors import MlxMoeError
from . import qwen3_next
from .base import Family

# Never read: the vision tower and the multi-token-prediction layer
SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")


def text_config(cfg: ConfigView) -> ConfigView:
    """The language model's keys: ``text_config``, with the top level's where it has none
    (a text-only checkpoint has no ``text_config``); the top level's ``model_type``."""
    text = cfg.raw.get("text_config")
    if not isinstance(text, dict):
        return cfg
    top = {k: v for k, v in cfg.raw.items() if k != "text_config"}
    return ConfigView({**top, **text, "model_type": cfg.raw.get("model_type")}, cfg.source)


def split_tensor(name: str, array, file) -> list[tuple[str, object]]:
    if name.startswith(SKIPPED_PREFIXES):
        return []
    return qwen3_next.split_tensor(name, array, file)


def args_from_config(cfg: ConfigView) -> MoEArgs:
    return qwen3_next.hybrid_args(text_config(cfg), fused_projections=False, family="qwen3_5_moe",
                                  norm_topk_prob=True)


def gguf_hparams(args: MoEArgs, writer) -> None:
    raise MlxMoeError("cannot export qwen3_5_moe to GGUF yet (issue #18): it loads and trains only")


FAMILY = Family("qwen3_5_moe", ("qwen3_5_moe", "qwen3_5_moe_text"), "qwen35moe",
                qwen3_next.hf_tensors(("model.language_model", "model"), False),
                args_from_config, gguf_hparams, split_tensor=split_tensor)
