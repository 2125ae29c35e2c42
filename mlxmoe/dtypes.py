"""The model's dtype: one user-facing choice (``train.dtype``, ``--dtype``) and what it means.

``auto`` is bfloat16 on a GPU (Metal on a Mac, where every shipped recipe runs) and float32
on MLX's CPU backend. Whatever the dtype, routers and routing stay float32 (nn.moe.Router)
and LoRA parameters stay float32 (AdamW updates them); the residual stream stays in the dtype.
"""

from __future__ import annotations

import mlx.core as mx

from .errors import MlxMoeError

DTYPES: dict[str, mx.Dtype] = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
DTYPE_CHOICES = ("auto", *DTYPES)
DEFAULT_DTYPE = "auto"


def on_cpu() -> bool:
    """Whether MLX computes on its CPU backend (the default device is the CPU)."""
    return mx.default_device() == mx.cpu


def device_dtype(device: str) -> mx.Dtype:
    """What ``auto`` means on ``device`` ("gpu" or "cpu")."""
    return mx.float32 if device == "cpu" else mx.bfloat16


def resolve_dtype(setting: str | mx.Dtype | None, device: str | None = None) -> mx.Dtype:
    """A dtype setting (a name of ``DTYPE_CHOICES``, an ``mx.Dtype`` or None for ``auto``)
    -> the dtype the model runs in on ``device`` (default: the device MLX computes on)."""
    if isinstance(setting, mx.Dtype):
        if setting not in DTYPES.values():
            raise MlxMoeError(f"dtype {setting} is not a model dtype (use one of {', '.join(DTYPE_CHOICES)})")
        return setting
    if setting is None or setting == "auto":
        return device_dtype(device or ("cpu" if on_cpu() else "gpu"))
    if setting not in DTYPES:
        raise MlxMoeError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {setting!r}")
    return DTYPES[setting]


def dtype_name(dtype: mx.Dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def gather_dtype(dtype: mx.Dtype) -> mx.Dtype:
    """The dtype ``gather_mm`` computes in for a model in ``dtype``: MLX's CPU kernel is
    float32-only ("[GatherMM::eval] Currently only supports float32"); GPU kernels take
    the model's dtype, so a Mac keeps bfloat16 throughout."""
    return mx.float32 if on_cpu() else dtype
