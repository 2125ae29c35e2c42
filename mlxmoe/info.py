"""What a checkpoint is, from its config alone: family, experts, parameters, weight memory.

The model is built lazily (MLX allocates nothing until evaluated) and quantized lazily
with our own quantizer, so the memory figures are the sizes of the very arrays training
would hold, for any model size, without reading a weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .checkpoint import read_json, role_is_router
from .config import ConfigView, MoEArgs
from .errors import CheckpointError
from .families import family_for
from .hub import is_hub_id, resolve
from .model import CausalLM
from .prequantized import MXFP4, mxfp4_checkpoint
from .quantize import Quantization, quantization, quantize_model
from .tensor_names import role_of_path


@dataclass(frozen=True)
class ModelInfo:
    family: str
    model_type: str
    layers: int
    moe_layers: int
    experts: int
    experts_per_token: int
    shared_expert: bool
    total_params: int
    active_params: int
    weight_bytes: dict[int, int]  # bits (16, 8, 4) -> bytes of weights at that precision
    scheme: Quantization | None = None  # a scheme asked for (``model_info``'s ``quantize``)
    scheme_bytes: int | None = None  # the weights' bytes quantized to it


def read_config(path_or_id: str | Path) -> ConfigView:
    """config.json from a folder, a config file, or a hub id (only the config is fetched)."""
    path = Path(path_or_id)
    if path.is_file():
        return ConfigView(read_json(path), path)
    if not path.exists() and is_hub_id(str(path_or_id)):
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(str(path_or_id), "config.json")).parent
        except Exception as exc:  # offline, not cached, or unknown id
            raise CheckpointError(f"{path_or_id}: cannot fetch config.json ({exc})") from exc
    if not path.exists():
        raise CheckpointError(f"{path_or_id}: no such file or folder")
    folder = resolve(path)
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    return ConfigView(read_json(config_path), config_path)


def lazy_model(cfg: ConfigView) -> CausalLM:
    family = family_for(cfg.raw.get("model_type"), cfg.source)
    model = family.build(family.args_from_config(cfg))
    model.mxfp4 = family.mxfp4_experts and mxfp4_checkpoint(cfg.raw)
    return model


def weight_bytes(model: CausalLM, scheme: Any, group_size: int = 64) -> int:
    """Bytes of every parameter: 16-bit floats (float32 routers), quantized as ``scheme``
    says (anything ``quantize.quantization`` reads; None or 0: none)."""
    model.update(
        tree_unflatten(
            [
                (k, v.astype(mx.float32 if role_is_router(k) else mx.bfloat16))
                for k, v in tree_flatten(model.parameters())
            ]
        )
    )
    quantize_as_loaded(model, scheme, group_size)
    return sum(prod(v.shape) * v.dtype.size for _, v in tree_flatten(model.parameters()))


# The experts gpt-oss publishes in MXFP4: load_model keeps them so whenever it quantizes.
MXFP4_EXPERTS = {"bits": 4, "group_size": 32, "mode": MXFP4}
MXFP4_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")


def quantize_as_loaded(model: CausalLM, scheme: Any, group_size: int = 64) -> None:
    """Quantize as ``load_model`` does: experts that arrive in MXFP4 (``model.mxfp4``, set by
    ``lazy_model`` from config.json) stay MXFP4, 4.25 bits a weight, whatever ``scheme``
    says of them; the other layers are quantized as it says."""
    q = quantization(scheme, group_size)
    if not q:
        return
    if getattr(model, "mxfp4", False):

        def is_mxfp4(path: str, _module) -> dict | bool:
            role = role_of_path(f"{path}.weight")
            return MXFP4_EXPERTS if role is not None and role[0] in MXFP4_ROLES else False

        nn.quantize(model, class_predicate=is_mxfp4)
    quantize_model(model, q)


def model_info(path_or_id: str | Path, group_size: int = 64, quantize: Any = None) -> ModelInfo:
    """``quantize``: a scheme (``quantize.quantization``) whose weight memory to add."""
    cfg = read_config(path_or_id)
    model = lazy_model(cfg)
    args = model.args
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    moe_layers = model.moe_layers
    experts = args.num_experts if isinstance(args, MoEArgs) else 0
    top_k = args.num_experts_per_tok if isinstance(args, MoEArgs) else 0
    inactive = 0
    if moe_layers:
        per_expert = 3 * args.hidden_size * args.moe_intermediate_size
        inactive = len(moe_layers) * (experts - top_k) * per_expert
    memory = {bits: weight_bytes(lazy_model(cfg), bits % 16, group_size) for bits in (16, 8, 4)}
    scheme = quantization(quantize, group_size) if quantize is not None else None
    return ModelInfo(
        family=model.family,
        model_type=args.model_type,
        layers=args.num_layers,
        moe_layers=len(moe_layers),
        experts=experts,
        experts_per_token=top_k,
        shared_expert=bool(getattr(args, "shared_expert_intermediate_size", 0)),
        total_params=total,
        active_params=total - inactive,
        weight_bytes=memory,
        scheme=scheme,
        scheme_bytes=weight_bytes(lazy_model(cfg), scheme) if scheme is not None else None,
    )
