"""Starting MLX ranks on this machine (the tests and bench/distributed_scaling.py)."""

from __future__ import annotations

import socket


def free_port_pair() -> int:
    """A port p with p and p+1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports")
