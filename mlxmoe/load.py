"""``mlxmoe.load``: a checkpoint folder or hub id -> (model, tokenizer)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .checkpoint import open_checkpoint, read_weights
from .dtypes import resolve_dtype
from .errors import MlxMoeError
from .hub import resolve
from .model import CausalLM
from .nn.moe import set_dispatch
from .quantize import NO_QUANTIZATION, Quantization, quantization, quantize_model


def load_model(
    path_or_id: str | Path,
    quantize: Any = NO_QUANTIZATION,
    group_size: int = 64,
    dtype: mx.Dtype | str | None = None,
    revision: str | None = None,
) -> CausalLM:
    """``quantize``: the frozen base's scheme as ``quantize.quantization`` reads it: bits
    (``quantize.SUPPORTED_BITS``), ``NO_QUANTIZATION`` or None for float weights, a mapping
    or text that gives groups of roles their own (``{"bits": 4, "experts": 3}``,
    ``"4,experts=3"``), or a ``Quantization``. ``dtype``: a name of ``dtypes.DTYPE_CHOICES`` or an
    ``mx.Dtype``; None is ``auto``.

    Experts that arrive in MXFP4 (gpt-oss) stay in MLX's mxfp4 mode when ``quantize`` is set
    (exactly the published values, 4.25 bits a weight; the other layers are quantized as
    ``quantize`` says), and are dequantized to ``dtype``, exactly, when it is not."""
    folder = resolve(path_or_id, revision)
    ckpt = open_checkpoint(folder)
    model = ckpt.family.build(ckpt.args)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    dtype = resolve_dtype(dtype)
    scheme = quantization(quantize, group_size)
    weights, arrived_quantized = read_weights(ckpt, expected, dtype, keep_mxfp4=bool(scheme))
    prequantized = bool(arrived_quantized) and ckpt.quantization is not None  # mlx-lm's format
    if prequantized:
        scheme = _as_stored(ckpt, scheme)
    if arrived_quantized:
        nn.quantize(model, class_predicate=lambda path, _: _spec(arrived_quantized.get(path)))
    model.load_weights(list(weights.items()), strict=True)
    del weights
    if scheme and not prequantized:
        quantize_model(model, scheme)
    materialize(model)
    set_dispatch(model, "auto")
    model.source = ckpt.folder
    model.compute_dtype = dtype
    model.quantization = scheme if scheme else None
    return model


def _as_stored(ckpt, scheme: Quantization) -> Quantization:
    """A checkpoint that arrives quantized is the frozen base as it is: never re-quantized."""
    stored = ckpt.quantization
    if scheme and (scheme.bits != stored.bits or scheme.overrides):
        raise MlxMoeError(
            f"{ckpt.folder}: the checkpoint is already quantized to {stored.bits} bits (mlx-lm's "
            f"format); load it with quantize={stored.bits} (train.quantize: {stored.bits}), or "
            "use its float release for other bits"
        )
    return Quantization(stored.bits, stored.group_size)


def _spec(stored: tuple[int, int, str] | None) -> dict | bool:
    return {"bits": stored[0], "group_size": stored[1], "mode": stored[2]} if stored else False


def load_order(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that hold arrays, in the checkpoint's order: the embeddings, each layer's
    modules in turn, the rest."""
    held = [
        (path, module)
        for path, module in model.named_modules()
        if any(isinstance(v, mx.array) for v in module.values())
    ]
    return held[::-1]  # named_modules lists the last first


def materialize(model: CausalLM) -> None:
    """Evaluate the lazily loaded (and quantized) weights one module at a time. Nothing else
    holds the float weights, so each module's float tensors are freed once its quantized
    arrays exist: the peak is the quantized model plus one module's float weights (its
    experts read, stacked and cast at once), not the whole float checkpoint."""
    for _, module in load_order(model):
        mx.eval({k: v for k, v in module.items() if isinstance(v, mx.array)})
        mx.clear_cache()  # MLX would keep the freed float buffers for reuse: they are not
    mx.eval(model.parameters())


def load_tokenizer(folder: str | Path) -> Any | None:
    """mlx-lm's tokenizer wrapper (streaming detokenizer, chat template), or None if the
    folder ships no tokenizer."""
    folder = Path(folder)
    if not any((folder / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        return None
    from mlx_lm.tokenizer_utils import load as mlx_lm_load_tokenizer

    return mlx_lm_load_tokenizer(folder)


def require_tokenizer(folder: str | Path) -> Any:
    """``load_tokenizer``, or one error naming a folder that ships none."""
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise MlxMoeError(f"{folder}: the model folder ships no tokenizer")
    return tokenizer


def load(
    path_or_id: str | Path,
    quantize: Any = NO_QUANTIZATION,
    group_size: int = 64,
    dtype: mx.Dtype | str | None = None,
    revision: str | None = None,
) -> tuple[CausalLM, Any | None]:
    """Load a checkpoint of any family in ``families`` (Mixtral, Granite MoE, ...), optionally
    quantized (``quantize`` as ``load_model`` takes it). Returns (model, tokenizer); the
    tokenizer is None if the folder has none."""
    model = load_model(path_or_id, quantize, group_size, dtype, revision)
    return model, load_tokenizer(model.source)
