"""Starting MLX ranks on this machine (the tests and bench/distributed_scaling.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

LAUNCH = Path(sys.executable).with_name("mlx.launch")


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


def launch(*command: str, ranks: int = 2, timeout: int = 120) -> str:
    """Runs ``python COMMAND`` on ``ranks`` ranks; returns everything they printed. (mlx.launch
    0.32 exits 0 even when a rank fails: callers check what the ranks wrote.)"""
    proc = subprocess.run(
        [
            str(LAUNCH),
            "--backend",
            "ring",
            "-n",
            str(ranks),
            "-p",
            str(free_port_pair()),
            "--python",
            sys.executable,
            "--",
            *command,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
    )
    return proc.stdout + proc.stderr


# A training run on every rank that also saves each rank's adapters at every checkpoint
# (rank 0 alone writes the run folder), so tests can check the ranks hold the same ones.
TRAIN_KEEPING_EACH_RANKS_ADAPTERS = """
import json, sys
import mlx.core as mx
from mlxmoe.recipe import load_recipe
from mlxmoe.train import train
from mlxmoe.train.distributed import World

model, data, out, settings = sys.argv[1:5]
real_check = World.check_same
def keep(self, what, *parts):  # every rank passes its adapters here at each checkpoint
    if what.startswith("adapters"):
        mx.save_safetensors(f"{out}.rank{self.rank}.safetensors", dict(parts[0]))
    return real_check(self, what, *parts)
World.check_same = keep
r = load_recipe(None, **json.loads(settings))
r.model, r.data = model, data
result = train(r, out, show_progress=False)
print(f"rank {result.rank} of {result.world_size} finished {result.steps} steps", flush=True)
"""
