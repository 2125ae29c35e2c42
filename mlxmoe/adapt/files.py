"""Adapter files: ``adapters.safetensors`` (the trained tensors, by our module paths) and
``adapter_config.json`` (what they were trained on and how to re-attach them)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from ..atomic import atomic_file, write_text_atomic
from ..checkpoint import open_checkpoint
from ..dtypes import dtype_name
from ..errors import MlxMoeError
from ..model import CausalLM
from ..quantize import NO_QUANTIZATION, Quantization, quantization
from ..safetensors_io import save_arrays
from . import AdapterSpec, apply_adapters

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT = "mlxmoe-lora"
_SAMPLES_PER_FILE = 64
_SAMPLE_BYTES = 4096


class AdapterError(MlxMoeError):
    pass


REQUIRED_KEYS = ("family", "base_fingerprint", "rank", "alpha", "lora")
SPEC_KEYS = frozenset(f.name for f in dataclasses.fields(AdapterSpec))


def weights_fingerprint(model_folder: str | Path) -> str:
    """A cheap content hash of a checkpoint's weights: each file's safetensors header (names,
    shapes, dtypes) plus 64 evenly spaced 4 KiB samples of its data. Two fine-tunes of one
    architecture share headers, so the samples are what tells them apart."""
    ckpt = open_checkpoint(model_folder)
    digest = hashlib.sha256()
    for file in ckpt.weight_files:
        size = file.stat().st_size
        with file.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            digest.update(f.read(header_len))
            data_start = 8 + header_len
            span = max(size - data_start - _SAMPLE_BYTES, 0)
            for i in range(_SAMPLES_PER_FILE):
                f.seek(data_start + span * i // max(_SAMPLES_PER_FILE - 1, 1))
                digest.update(f.read(_SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def adapter_tensors(model: CausalLM) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def adapter_config(model: CausalLM, spec: AdapterSpec, adapted: list[str], base: str) -> dict[str, Any]:
    quant = model.quantization
    return {
        "format": FORMAT,
        "version": 1,
        "base_model": base,
        "base_fingerprint": weights_fingerprint(model.source),
        "family": model.family,
        "strategy": spec.strategy,
        "rank": spec.rank,
        "alpha": spec.alpha,
        "router_mode": spec.router_mode,
        "targets": adapted,
        "quantization": quant.to_dict() if quant else None,
        "dtype": dtype_name(model.compute_dtype),
        "lora": dataclasses.asdict(spec),
    }


def save_adapters(model: CausalLM, folder: str | Path, config: dict[str, Any]) -> None:
    folder = Path(folder)
    with atomic_file(folder / ADAPTER_FILE) as tmp:
        save_arrays(tmp, adapter_tensors(model), metadata={"format": FORMAT})
    write_text_atomic(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def read_adapter_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_CONFIG} (is this an mlxmoe adapter folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise AdapterError(f"{path}: not an mlxmoe adapter (format {found!r})")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise AdapterError(f"{path}: missing key {missing[0]!r}")
    if not isinstance(config["lora"], dict) or set(config["lora"]) - SPEC_KEYS:
        raise AdapterError(f"{path}: 'lora' is not a LoRA spec (known keys: {', '.join(sorted(SPEC_KEYS))})")
    return config


def trained_quantization(folder: str | Path) -> Quantization:
    """The scheme the adapter's base was quantized to in training (float weights: falsy)."""
    trained = read_adapter_config(folder).get("quantization")
    if not trained:
        return Quantization(NO_QUANTIZATION)
    where = f"{Path(folder) / ADAPTER_CONFIG}: quantization"
    if not isinstance(trained, dict) or not isinstance(trained.get("group_size"), int):
        raise AdapterError(f"{where} is not bits and a group size")
    scheme = {k: v for k, v in trained.items() if k != "group_size"}
    return quantization(scheme, trained["group_size"], where, AdapterError)


def read_adapter_tensors(folder: str | Path) -> dict[str, mx.array]:
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise AdapterError(f"{folder}: no {ADAPTER_FILE} (the adapter folder is incomplete)")
    try:
        return mx.load(str(path))
    except (RuntimeError, ValueError) as exc:  # MLX's errors for a truncated or corrupt file
        raise AdapterError(f"{path}: cannot read safetensors ({exc})") from exc


def check_adapter_base(folder: str | Path, model_folder: str | Path) -> None:
    """Refuses an adapter trained on other base weights than ``model_folder``'s."""
    trained_on = read_adapter_config(folder)["base_fingerprint"]
    here = weights_fingerprint(model_folder)
    if trained_on != here:
        raise AdapterError(
            f"{folder}: adapter was trained on different base weights than {model_folder} "
            f"(fingerprint {trained_on} vs {here}); use the base it was trained on, or force "
            "it (--force)"
        )


def load_adapters(model: CausalLM, folder: str | Path, check_base: bool = True) -> dict[str, Any]:
    """Attach the adapters saved in ``folder`` to ``model`` (as trained). Refuses an adapter
    trained on other base weights unless ``check_base`` is False."""
    config = read_adapter_config(folder)
    if config["family"] != model.family:
        raise AdapterError(f"{folder}: adapter is for {config['family']}, model is {model.family}")
    if check_base:
        check_adapter_base(folder, model.source)
    spec = AdapterSpec(**config["lora"])
    apply_adapters(model, spec)
    weights = read_adapter_tensors(folder)
    expected = adapter_tensors(model)
    unknown = sorted(set(weights) - set(expected))
    if unknown:
        raise AdapterError(f"{folder}/{ADAPTER_FILE}: tensor {unknown[0]!r} fits no adapter")
    absent = sorted(set(expected) - set(weights))
    if absent:
        raise AdapterError(
            f"{folder}/{ADAPTER_FILE}: no tensor {absent[0]!r} "
            f"({len(absent)} of the {len(expected)} its config implies are missing)"
        )
    for name, value in weights.items():
        if value.shape != expected[name].shape:
            raise AdapterError(
                f"{folder}/{ADAPTER_FILE}: tensor {name!r} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    model.load_weights(list(weights.items()), strict=False)
    return config
