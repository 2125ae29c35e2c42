"""Peak memory of this process, in bytes on every platform."""

from __future__ import annotations

import resource
import sys

import mlx.core as mx


def maxrss_bytes(ru_maxrss: int) -> int:
    """``getrusage``'s ``ru_maxrss`` in bytes: macOS reports bytes, Linux KiB."""
    return ru_maxrss if sys.platform == "darwin" else ru_maxrss * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size."""
    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory_gb() -> float:
    """The larger of MLX's peak allocation and the process's peak RSS, in GB (1e9 bytes)."""
    return max(mx.get_peak_memory(), peak_rss_bytes()) / 1e9
