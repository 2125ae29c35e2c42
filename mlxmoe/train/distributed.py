"""Data-parallel training on MLX's distributed engine (``mx.distributed``), started by
``mlx.launch`` (ring backend over TCP or Thunderbolt, or MPI). We add no transport.

Every rank holds the whole model and its own copy of the adapters and optimizer, reads its
contiguous shard of every global batch (``BatchSchedule.batch(index, rank, size)``), and
adds its gradients to the other ranks' with ``all_sum``. Each rank's loss is its *share* of
the global objective (cross-entropy weighted by its share of the step's answer tokens, the
router losses as in ``losses.load_balancing_share``), so the summed gradient is the gradient
of the one-process loss on the whole batch, and every rank applies the same update. Only
rank 0 reads and writes the run folder; it sends its adapters, optimizer and run state to
the others at the start, so a second machine needs the model and data but not the run.

Run alone (no launcher), ``World.init()`` is one rank and nothing here communicates.
"""

from __future__ import annotations

import hashlib
import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import MlxMoeError
from .state import RunState, set_path

# How MLX's backends start the message of a failed collective (e.g. "[ring] connection to a
# peer was lost").
BACKEND_TAGS = ("[ring]", "[mpi]", "[jaccl]", "[nccl]")


class RankLostError(MlxMoeError):
    """Another rank of a distributed run died, failed or was stopped."""


class _Terminated(Exception):
    pass


@dataclass
class World:
    group: Any = None  # mx.distributed.Group; None when running alone
    rank: int = 0
    size: int = 1

    @classmethod
    def init(cls) -> World:
        """The ranks ``mlx.launch`` started (one when there is no launcher)."""
        if not mx.distributed.is_available():
            return cls()
        group = mx.distributed.init()
        return cls(group, group.rank(), group.size()) if group.size() > 1 else cls()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: mx.array) -> mx.array:
        return x if self.size == 1 else mx.distributed.all_sum(x, group=self.group)

    def sum_tree(self, tree: Any) -> Any:
        """Every array of ``tree`` summed over the ranks, in one all_sum per dtype (few large
        messages rather than one per adapter: latency, not bandwidth, dominates on TCP)."""
        if self.size == 1:
            return tree
        flat = tree_flatten(tree)
        summed: dict[str, mx.array] = {}
        for dtype in dict.fromkeys(v.dtype for _, v in flat):  # the same order on every rank
            items = [(k, v) for k, v in flat if v.dtype == dtype]
            total = self.all_sum(mx.concatenate([v.reshape(-1) for _, v in items]))
            offsets = np.cumsum([v.size for _, v in items])[:-1].tolist()
            for (k, v), part in zip(items, mx.split(total, offsets)):
                summed[k] = part.reshape(v.shape)
        return tree_unflatten([(k, summed[k]) for k, _ in flat])

    def broadcast_tree(self, tree: Any) -> Any:
        """Rank 0's values of ``tree`` on every rank (zeros elsewhere, then summed: exact)."""
        if self.size == 1:
            return tree
        return self.sum_tree(tree if self.is_main else tree_map(mx.zeros_like, tree))

    def broadcast_json(self, value: Any) -> Any:
        """Rank 0's JSON-serialisable ``value`` on every rank."""
        if self.size == 1:
            return value
        data = json.dumps(value).encode() if self.is_main else b""
        n = int(self.all_sum(mx.array(len(data), mx.int32)).item())
        buffer = np.zeros(n, np.uint8)
        buffer[: len(data)] = np.frombuffer(data, np.uint8)
        return json.loads(bytes(np.array(self.all_sum(mx.array(buffer)))).decode())

    def gather(self, values: list[float]) -> np.ndarray:
        """[size, len(values)]: row r holds rank r's ``values``."""
        row = mx.array([values], mx.float32)
        if self.size == 1:
            return np.array(row)
        return np.array(mx.distributed.all_gather(row, group=self.group))

    def check_same(self, what: str, *parts: Any) -> None:
        """Raises unless every rank holds the same ``parts`` (``fingerprint`` compared). Ranks
        that disagree on the data or recipe would pair mismatched collectives, and replicas
        that drift apart are no longer one model."""
        if self.size == 1:
            return
        digest = fingerprint(*parts)
        rows = self.gather(np.frombuffer(digest[:16], np.uint16).astype(np.float32).tolist())
        differ = [r for r in range(self.size) if not (rows[r] == rows[0]).all()]
        if differ:
            raise MlxMoeError(f"{what} differ between rank 0 and rank(s) {differ}")

    @contextmanager
    def stop_together(self, where: Callable[[], str]) -> Iterator[None]:
        """Turns the two ways a lost rank shows up into one ``RankLostError``: the backend's
        failed collective ("connection to a peer was lost"), and SIGTERM, which ``mlx.launch``
        sends the other ranks when one exits with an error. ``where()`` says what the user
        needs to know (the step, the last checkpoint)."""
        if self.size == 1:
            yield
            return

        def terminated(signum, frame):
            raise _Terminated()

        handles_signal = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, terminated) if handles_signal else None
        try:
            yield
        except _Terminated as exc:
            raise RankLostError(
                f"rank {self.rank} of {self.size} was stopped (SIGTERM: mlx.launch stops every "
                f"rank when one fails; its [WARN] lines say which) {where()}"
            ) from exc
        except RuntimeError as exc:
            if not str(exc).startswith(BACKEND_TAGS):
                raise
            raise RankLostError(
                f"rank {self.rank} of {self.size} lost contact with the other ranks ({exc}) {where()}"
            ) from exc
        finally:
            if handles_signal:
                signal.signal(signal.SIGTERM, previous)


def fingerprint(*parts: Any) -> bytes:
    """sha256 of strings, bytes, numpy or MLX arrays, and (nested) lists, tuples and dicts."""
    digest = hashlib.sha256()

    def add(part: Any) -> None:
        if isinstance(part, dict):
            for key in sorted(part):
                digest.update(str(key).encode())
                add(part[key])
        elif isinstance(part, (list, tuple)):
            for item in part:
                add(item)
        elif isinstance(part, (mx.array, np.ndarray)):
            if isinstance(part, mx.array) and part.dtype == mx.bfloat16:  # numpy has none
                part = part.view(mx.uint16)
            array = np.asarray(part)
            digest.update(f"{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
        else:
            digest.update(part if isinstance(part, bytes) else str(part).encode())

    for part in parts:
        add(part)
    return digest.digest()


def share_run(world: World, model, optimizer, state: RunState) -> RunState:
    """Rank 0's adapters, optimizer state and run state, on every rank. A fresh run starts
    from identical replicas whatever each machine's RNG did; a resumed one from rank 0's
    checkpoint, which the other machines need not see."""
    if world.size == 1:
        return state
    model.update(world.broadcast_tree(model.trainable_parameters()))
    for path, value in tree_flatten(world.broadcast_tree(optimizer.state)):
        set_path(optimizer.state, path, value)
    mx.eval(model.parameters(), optimizer.state)
    return RunState(**world.broadcast_json(state.__dict__))
