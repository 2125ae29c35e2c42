"""RMSNorm with its weight stored as an offset from a constant (Qwen3-Next, Qwen3.5: 1 + w)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..config import DecoderArgs


class OffsetRMSNorm(nn.Module):
    """RMSNorm scaled by ``offset + weight``, the weight zero-initialised.

    Kept as the checkpoint stores it rather than folded into ``nn.RMSNorm``'s weight: in
    bfloat16, 1 + w rounds w to a step of 1/128, and transformers adds the 1 in float32."""

    def __init__(self, dims: int, eps: float, offset: float = 1.0):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: mx.array) -> mx.array:
        scale = self.offset + self.weight.astype(mx.float32)
        return mx.fast.rms_norm(x.astype(mx.float32), scale, self.eps).astype(x.dtype)


def rms_norm(dims: int, args: DecoderArgs) -> nn.Module:
    """The RMSNorm ``args`` asks for: ``nn.RMSNorm``, or ``OffsetRMSNorm`` where
    ``norm_weight_offset`` is set."""
    if args.norm_weight_offset:
        return OffsetRMSNorm(dims, args.rms_norm_eps, args.norm_weight_offset)
    return nn.RMSNorm(dims, eps=args.rms_norm_eps)
