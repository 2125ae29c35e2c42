"""Training data: JSONL samples -> token ids with a loss mask -> padded, length-bucketed batches.

Two sides, two modules: ``samples`` reads, validates and tokenizes (where a tokenizer is
loaded: the tokenizing child and evaluation), ``batches`` batches the result for the trainer.
Their public names are importable from here too.
"""

from __future__ import annotations

from .batches import BUCKET_BATCHES, Batch, BatchSchedule, padding_waste
from .samples import (
    FORMATS,
    MERGE_SLACK,
    SAMPLE_KINDS,
    DataError,
    Dataset,
    EncodedSample,
    Example,
    SampleEncoder,
    encode_sample,
    load_dataset,
    read_samples,
)

__all__ = [
    "BUCKET_BATCHES",
    "FORMATS",
    "MERGE_SLACK",
    "SAMPLE_KINDS",
    "Batch",
    "BatchSchedule",
    "DataError",
    "Dataset",
    "EncodedSample",
    "Example",
    "SampleEncoder",
    "encode_sample",
    "load_dataset",
    "padding_waste",
    "read_samples",
]
