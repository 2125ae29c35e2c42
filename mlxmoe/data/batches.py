"""Training data, the trainer's side: examples (``samples``) -> padded, length-bucketed batches.

The trainer never loads a tokenizer (``tokenize_worker``): it batches the token ids and loss
masks that ``samples.load_dataset`` made in a child process.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from .samples import DataError, Dataset

# Samples sorted together by length: this many batches' worth.
BUCKET_BATCHES = 16


@dataclass(frozen=True, eq=False)
class Batch:
    inputs: mx.array  # int32 [B, L], padded with 0
    targets: mx.array  # int32 [B, L]
    loss_mask: mx.array  # float32 [B, L]: target positions that count for cross-entropy
    token_mask: mx.array  # float32 [B, L]: real (non-padding) input positions
    num_target_tokens: int
    num_tokens: int


class BatchSchedule:
    """Batch ``index`` of a training run as a pure function of (dataset, batch_size, seed, index).

    Each epoch (``index // batches_per_epoch``) draws a permutation seeded by (seed, epoch),
    keeps ``batches_per_epoch * batch_size`` samples (the rest wait for another epoch), sorts
    each run of ``bucket_batches`` batches' worth by length, cuts it into batches and shuffles
    the batch order with the same generator. Resuming at step N is ``batch(N)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        pad_multiple: int = 32,
        bucket_batches: int = BUCKET_BATCHES,
    ):
        if batch_size < 1 or pad_multiple < 1 or bucket_batches < 1:
            raise DataError("batch_size, pad_multiple and bucket_batches must be positive")
        if seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed}")
        if len(dataset.examples) < batch_size:
            raise DataError(
                f"{dataset.source}: {len(dataset.examples)} samples, fewer than batch_size={batch_size}"
            )
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.pad_multiple, self.bucket_batches = pad_multiple, bucket_batches
        self.lengths = np.array([len(e.tokens) for e in dataset.examples])
        self._epoch_cache = lru_cache(maxsize=2)(self._epoch_order)

    def batches_per_epoch(self) -> int:
        return len(self.dataset.examples) // self.batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices, [batches_per_epoch, batch_size], each batch sorted by length."""
        rng = np.random.default_rng([self.seed, epoch])
        n_batches = self.batches_per_epoch()
        order = rng.permutation(len(self.lengths))[: n_batches * self.batch_size]
        chunk = self.bucket_batches * self.batch_size
        for at in range(0, len(order), chunk):
            part = order[at : at + chunk]
            order[at : at + chunk] = part[np.argsort(self.lengths[part], kind="stable")]
        batches = order.reshape(n_batches, self.batch_size)
        return batches[rng.permutation(n_batches)]

    def samples(self, index: int) -> tuple[np.ndarray, int]:
        """The global batch's sample indices and its padded input length L."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        epoch, within = divmod(index, self.batches_per_epoch())
        rows = self._epoch_cache(epoch)[within]
        longest_input = int(self.lengths[rows].max()) - 1
        return rows, -(-longest_input // self.pad_multiple) * self.pad_multiple

    def batch(self, index: int, rank: int = 0, world: int = 1) -> Batch:
        """Rank ``rank``'s contiguous shard of global batch ``index``. Every shard is padded to
        the global batch's L, so the shards stacked in rank order are the world=1 batch."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} of {world} ranks")
        if self.batch_size % world:
            raise DataError(f"batch_size={self.batch_size} is not divisible by {world} ranks")
        rows, length = self.samples(index)
        shard = self.batch_size // world
        rows = rows[rank * shard : (rank + 1) * shard]
        inputs = np.zeros((shard, length), np.int32)
        targets = np.zeros((shard, length), np.int32)
        loss_mask = np.zeros((shard, length), np.float32)
        token_mask = np.zeros((shard, length), np.float32)
        for row, i in enumerate(rows):
            example = self.dataset.examples[i]
            n = len(example.tokens) - 1
            inputs[row, :n] = example.tokens[:-1]
            targets[row, :n] = example.tokens[1:]
            loss_mask[row, :n] = example.loss_mask[1:]
            token_mask[row, :n] = 1.0
        return Batch(
            mx.array(inputs),
            mx.array(targets),
            mx.array(loss_mask),
            mx.array(token_mask),
            num_target_tokens=int(loss_mask.sum()),
            num_tokens=int(token_mask.sum()),
        )


def padding_waste(schedule: BatchSchedule, n_batches: int) -> float:
    """Fraction of the input positions in batches 0..n_batches-1 that are padding."""
    real = total = 0
    for index in range(n_batches):
        rows, length = schedule.samples(index)
        real += int((schedule.lengths[rows] - 1).sum())
        total += len(rows) * length
    return 1.0 - real / total if total else 0.0
