"""YaRN rotary embeddings (Peng et al. 2023), with the frequencies transformers computes.

mlx-lm's YaRN always rounds the correction range to whole dimensions and reads ``mscale``
alone; transformers rounds only when ``truncate`` (default true) says so, honours
``attention_factor``, and uses ``mscale`` only beside ``mscale_all_dim``. gpt-oss ships
``truncate: false``, where the two disagree, and transformers is the reference.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature, eq. 21 of the paper: 0.1 * mscale * ln(factor) + 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_frequencies(
    dims: int, base: float, scaling: dict[str, Any], max_position_embeddings: int
) -> tuple[np.ndarray, float]:
    """(inverse frequencies [dims / 2], attention factor) for a ``rope_type: yarn`` config:
    each dimension pair interpolates (divides its frequency by ``factor``) or extrapolates
    (keeps it) by how many turns it makes over the original context, ramping linearly
    between ``beta_fast`` and ``beta_slow`` turns."""
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else yarn_mscale(factor)
        )

    def dimension_of(turns: float) -> float:  # the dimension that turns this often over `original`
        return dims * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(base))

    low = dimension_of(scaling.get("beta_fast") or 32)
    high = dimension_of(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    if low == high:
        high += 0.001  # as transformers does, to avoid dividing by zero
    ramp = np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolated = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1.0 - ramp)
    return inv_freq, float(attention_factor)


class YarnRoPE(nn.Module):
    """Rotate-half RoPE (``traditional``: adjacent pairs) over all ``dims`` with YaRN
    frequencies; q and k are scaled by the attention factor (transformers scales cos and sin
    by it: the same product)."""

    def __init__(
        self,
        dims: int,
        base: float,
        scaling: dict[str, Any],
        max_position_embeddings: int,
        traditional: bool = False,
    ):
        super().__init__()
        inv_freq, self.attention_factor = yarn_frequencies(dims, base, scaling, max_position_embeddings)
        self.dims = dims
        self.traditional = traditional
        self._freqs = mx.array(1.0 / inv_freq, dtype=mx.float32)  # mx.fast.rope takes periods

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.attention_factor != 1.0:
            x = x * self.attention_factor
        return mx.fast.rope(
            x, self.dims, traditional=self.traditional, base=None, scale=1.0, offset=offset, freqs=self._freqs
        )
