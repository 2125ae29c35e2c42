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
from .base import Family, GGUFPart

# The multimodal checkpoint's, then a text-only one's
PREFIXES = ("model.language_model", "model")
# Never read: the vision tower and the multi-token-prediction layer
SKIPPED_PREFIXES = ("model.visual.", "mtp.", "model.mtp.")
# The multimodal RoPE's sections llama.cpp's qwen35moe requires, where config.json has none
# (the converter's default, transformers' too)
DEFAULT_MROPE_SECTION = (11, 11, 10)


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
    return qwen3_next.hybrid_args(
        text_config(cfg), fused_projections=False, family="qwen3_5_moe", norm_topk_prob=True
    )


def gguf_parts(role: str, args: MoEArgs) -> list[GGUFPart] | None:
    return qwen3_next.gguf_parts(role, args, tiled=True)


def gguf_config_hparams(cfg: ConfigView, writer) -> None:
    """Qwen3-Next's, from ``text_config``, and the multimodal RoPE's sections (four, padded
    with 0): on text all three position axes are the token's, so any sections give plain RoPE."""
    text = text_config(cfg)
    qwen3_next.gguf_config_hparams(text, writer)
    rope = text.raw.get("rope_parameters", text.raw.get("rope_scaling")) or {}
    sections = list(rope.get("mrope_section", DEFAULT_MROPE_SECTION))[:4]
    head_dim = int(text.get("head_dim", default=0)) or int(text.get("hidden_size")) // int(
        text.get("num_attention_heads")
    )
    rotary_pairs = int(head_dim * qwen3_next.partial_rotary_factor(text)) // 2
    if sum(sections) > rotary_pairs:  # ggml's rope asserts it, and the process aborts
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's qwen35moe needs the multimodal RoPE sections "
            f"{sections} to cover at most the {rotary_pairs} rotary pairs of a head "
            "(rope_parameters.mrope_section)"
        )
    writer.add_rope_dimension_sections(sections + [0] * (4 - len(sections)))


FAMILY = Family(
    "qwen3_5_moe",
    ("qwen3_5_moe", "qwen3_5_moe_text"),
    "qwen35moe",
    qwen3_next.hf_tensors(PREFIXES, False),
    args_from_config,
    qwen3_next.gguf_hparams,
    split_tensor=split_tensor,
    gguf_parts=gguf_parts,
    gguf_config_hparams=gguf_config_hparams,
    hub_layout=qwen3_next.hub_layout,
    gguf_names=qwen3_next.GGUF_NAMES,
    hf_prefixes=PREFIXES,
)
