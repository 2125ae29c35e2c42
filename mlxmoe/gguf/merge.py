"""Base weights with adapters merged in, one tensor at a time.

Merging happens in float32 on the checkpoint's own full-precision weights, never on the
4-bit grid a QLoRA run trained over: re-quantizing a small LoRA delta onto that grid can
round it away entirely.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..adapt.files import (
    ADAPTER_FILE,
    AdapterError,
    read_adapter_config,
    read_adapter_tensors,
    weights_fingerprint,
)
from ..atomic import atomic_dir
from ..checkpoint import TOKENIZER_FILES, Checkpoint, open_checkpoint
from ..errors import CheckpointError
from ..hub import resolve
from ..prequantized import COMPONENTS, MXFP4, component, dequantized, quantized_shape
from ..safetensors_io import (
    TensorIn,
    TensorOut,
    from_float32,
    safetensors_header,
    safetensors_index,
    write_safetensors,
)
from ..tensor_names import ROLES, compile_pattern, role_of_path


@dataclass(frozen=True)
class Adapter:
    scale: float
    tensors: dict[str, np.ndarray]  # our adapter names: "<module>.lora_a", "<module>.lora_b", or full weights
    config: dict

    @classmethod
    def read(cls, folder: str | Path) -> Adapter:
        config = read_adapter_config(folder)
        arrays = read_adapter_tensors(folder)
        tensors = {k: np.array(v.astype(mx.float32)) for k, v in arrays.items()}
        for name, value in tensors.items():
            if not all_finite(value):
                raise AdapterError(
                    f"{Path(folder) / ADAPTER_FILE}: tensor {name!r} holds NaN or "
                    f"infinity (at {first_non_finite(value)}); refusing to merge it"
                )
        return cls(config["alpha"] / config["rank"], tensors, config)

    @cached_property
    def pairs(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """module path -> (A, B) for every LoRA in the adapter."""
        return {
            name[: -len(".lora_a")]: (a, self.tensors[name[: -len(".lora_a")] + ".lora_b"])
            for name, a in self.tensors.items()
            if name.endswith(".lora_a")
        }

    @cached_property
    def replacements(self) -> dict[str, np.ndarray]:
        """Weights trained in full (a router with router_mode "full"), by our parameter name."""
        return {k: v for k, v in self.tensors.items() if not k.endswith((".lora_a", ".lora_b"))}


class MergedWeights:
    """Our tensor names -> float32 numpy arrays: the checkpoint's weights (experts stacked)
    plus each adapter's scale * B @ A.

    A base that arrived quantized (mlx-lm's format) has no full-precision weights to merge
    into: ``base_weights`` names its float release, which is read instead once it is shown
    to quantize to the stored grid; without it the grid is dequantized and merged
    (``from_grid``: the GGUF then carries the 4-bit rounding)."""

    def __init__(
        self,
        model: str | Path,
        adapter: str | Path | None = None,
        force: bool = False,
        base_weights: str | Path | None = None,
    ):
        self.ckpt: Checkpoint = open_checkpoint(resolve(model))
        self.args = self.ckpt.args
        self.family = self.ckpt.family
        self.adapter = Adapter.read(adapter) if adapter else None
        if self.adapter is not None:
            self._check_adapter(force)
        lazy = self.family.build(self.args)
        self.shapes = {k: tuple(v.shape) for k, v in tree_flatten(lazy.parameters())}
        self._sources, self._parts = self._index(self.ckpt)
        self._stored = self._index_stored(self.ckpt)
        self._split_cache: tuple[tuple[str, ...], dict[str, dict[str, mx.array]]] = ((), {})
        self.from_grid = self.ckpt.quantization is not None and base_weights is None
        self.weights_folder = self.ckpt.folder  # where the merged weights are read
        if base_weights is not None:
            self._use_base_weights(open_checkpoint(resolve(base_weights)))

    def _check_adapter(self, force: bool) -> None:
        config = self.adapter.config
        if config["family"] != self.family.name:
            raise AdapterError(f"adapter is for {config['family']}, the model is {self.family.name}")
        if not force and config["base_fingerprint"] != weights_fingerprint(self.ckpt.folder):
            raise AdapterError(
                f"the adapter was trained on other base weights than {self.ckpt.folder} "
                f"(fingerprint {config['base_fingerprint']} vs {weights_fingerprint(self.ckpt.folder)}); "
                "pass the base it was trained on, or force it (--force)"
            )

    def _index(
        self, ckpt: Checkpoint
    ) -> tuple[dict[tuple[str, int | None], TensorIn], dict[str, dict[str, TensorIn]]]:
        """Where each tensor lies; for a quantized checkpoint also each packed weight's
        scales and biases."""
        sources, parts = {}, {}
        for file in ckpt.weight_files:
            for source in safetensors_header(file):
                name, part = component(source.name) if ckpt.quantization else (source.name, "weight")
                match = self.family.match_hf(name)
                if match is None:
                    continue
                role, bid, xid = match
                ours = ROLES[role].ours.format(bid=bid)
                if xid is not None and ours in self.shapes and xid >= self.shapes[ours][0]:
                    raise CheckpointError(
                        f"{source.file}: tensor {source.name!r}: expert {xid} out "
                        f"of range (config.json has {self.shapes[ours][0]})"
                    )
                if part == "weight":
                    sources[(ours, xid)] = source
                else:
                    parts.setdefault(ours, {})[part] = source
        return sources, parts

    def _index_stored(self, ckpt: Checkpoint) -> dict[str, list[TensorIn]]:
        """Ours -> the checkpoint tensors the family splits it from (family.stored_in:
        gpt-oss's fused gate_up_proj, or its MXFP4 blocks and scales)."""
        patterns = [(compile_pattern(ckpt.stored_in(role)), role) for role in self.family.stored_in]
        stored: dict[str, list[TensorIn]] = {}
        for file in ckpt.weight_files if patterns else ():
            for source in safetensors_header(file):
                fused = source.name.removesuffix("_blocks").removesuffix("_scales")
                for pattern, role in patterns:
                    m = pattern.match(fused)
                    if m:
                        stored.setdefault(ROLES[role].ours.format(bid=m["bid"]), []).append(source)
        return stored

    def _split(self, ours: str) -> np.ndarray:
        """One of ours out of the fused tensor(s) holding it, as float32 (MXFP4 dequantized,
        exactly)."""
        p = self._split_parts(ours)
        return np.array(dequantized(p, 4, 32, MXFP4) if "scales" in p else p["weight"].astype(mx.float32))

    def mxfp4_parts(self, ours: str) -> tuple[np.ndarray, np.ndarray] | None:
        """The checkpoint's MXFP4 blocks [..., out, in / 32, 16] and scales [..., out, in / 32]
        of ``ours``, when it arrived in MXFP4 and the adapter leaves it as it is; else None."""
        if ours not in self._stored or self.from_grid:
            return None
        if self.adapter is not None and (
            ours in self.adapter.replacements or ours.rsplit(".", 1)[0] in self.adapter.pairs
        ):
            return None
        p = self._split_parts(ours)
        if "scales" not in p:
            return None
        blocks = np.array(p["weight"]).view(np.uint8)
        return blocks.reshape(*blocks.shape[:-1], -1, 16), np.array(p["scales"])

    def _split_parts(self, ours: str) -> dict[str, mx.array]:
        """The family's split of the fused tensor(s) holding ``ours``, kept for the next call
        (gate, then up, come from one gate_up_proj)."""
        sources = self._stored[ours]
        key = tuple(s.name for s in sources)
        if self._split_cache[0] != key:
            parts: dict[str, dict[str, mx.array]] = {}
            for source in sources:
                stored = (
                    mx.array(np.frombuffer(source.read(), np.uint8).reshape(source.shape))
                    if source.dtype == "U8"
                    else mx.array(source.float32())
                )
                for name, array in self.family.split(source.name, stored, source.file):
                    hf_name, part = component(name)
                    match = self.family.match_hf(hf_name)
                    if match is not None:
                        parts.setdefault(ROLES[match[0]].ours.format(bid=match[1]), {})[part] = array
            self._split_cache = key, parts
        return self._split_cache[1][ours]

    def _use_base_weights(self, full: Checkpoint) -> None:
        if full.quantization is not None:
            raise CheckpointError(
                f"{full.folder}: the base weights are quantized too; pass the "
                "full-precision checkpoint the quantized one was made from"
            )
        if self.ckpt.quantization is None:
            raise CheckpointError(f"{self.ckpt.folder} is not quantized: export it without base weights")
        if full.family.name != self.family.name or full.args != self.args:
            raise CheckpointError(f"{full.folder}: another model than {self.ckpt.folder} (config differs)")
        sources, _ = self._index(full)
        for ours in list(self._parts)[:4]:  # a few tensors tell another fine-tune apart
            if (ours, None) not in sources and (ours, 0) not in sources:
                raise CheckpointError(f"{full.folder}: missing tensor {full.hf_name(ours)!r}")
            grid = self.base(ours)
            step = self._scales_per_value(ours)
            saved = self._sources, self._parts
            self._sources, self._parts, self.weights_folder = sources, {}, full.folder
            try:
                weight = self.base(ours)
            finally:
                self._sources, self._parts = saved
            off_grid = float(np.mean(np.abs(weight - grid) > 0.51 * step + 1e-6))
            if off_grid > 0.01:
                raise CheckpointError(
                    f"{full.folder}: {full.hf_name(ours, 0)!r} does not quantize to the grid stored "
                    f"in {self.ckpt.folder} ({off_grid:.0%} of its values lie off it): these are not "
                    "the weights the quantized checkpoint was made from"
                )
        self._sources, self._parts, self.weights_folder = sources, {}, full.folder

    def _scales_per_value(self, ours: str) -> np.ndarray:
        """Each value's quantization step, broadcast to the weight's shape."""
        scales = np.abs(self._parts[ours]["scales"].float32())
        return np.repeat(scales, self.shapes[ours][-1] // scales.shape[-1], axis=-1)

    def names(self) -> list[str]:
        return list(self.shapes)

    def _read(self, source: TensorIn) -> np.ndarray:
        # One tensor at a time, nothing kept: peak memory follows the largest tensor, not
        # the safetensors file.
        return source.float32()

    def _dequantized(self, ours: str) -> np.ndarray:
        parts = self._parts[ours]
        missing = [p for p in COMPONENTS if p not in parts]
        if missing:
            raise CheckpointError(
                f"{self.ckpt.folder}: quantized tensor {self.ckpt.hf_name(ours)!r} has no {missing[0]!r}"
            )
        packed = self._sources[(ours, None)]
        weight = np.frombuffer(packed.read(), np.uint32).reshape(packed.shape)
        scales, biases = parts["scales"].float32(), parts["biases"].float32()
        bits, group = quantized_shape(
            ours, packed.shape, scales.shape, self.shapes[ours], str(self.ckpt.folder)
        )
        return np.array(mx.dequantize(mx.array(weight), mx.array(scales), mx.array(biases), group, bits))

    def base(self, ours: str) -> np.ndarray:
        shape = self.shapes[ours]
        if ours in self._parts:
            return self._dequantized(ours)
        if ours in self._stored:
            return self._split(ours)
        if (ours, None) in self._sources:
            return self._read(self._sources[(ours, None)])
        if (ours, 0) in self._sources:  # per-expert tensors, stacked like our module holds them
            stacked = np.empty(shape, np.float32)
            for x in range(shape[0]):
                if (ours, x) not in self._sources:
                    raise CheckpointError(
                        f"{self.ckpt.folder}: missing tensor {self.ckpt.hf_name(ours, x)!r}"
                    )
                stacked[x] = self._read(self._sources[(ours, x)])
            return stacked
        if ours == "lm_head.weight" and self.args.tie_word_embeddings:
            return self.base("embed_tokens.weight")
        raise CheckpointError(f"{self.ckpt.folder}: missing tensor {self.ckpt.hf_name(ours)!r}")

    def tensor(self, ours: str) -> np.ndarray:
        """The merged tensor; an error if it holds NaN or infinity: an exported model would
        compute NaN from it, and llama.cpp loads a float GGUF without looking."""
        weight = self.base(ours)
        if not all_finite(weight):
            raise CheckpointError(
                f"{self.weights_folder}: tensor {self._non_finite(ours, weight)} "
                "holds NaN or infinity; refusing to export it"
            )
        if self.adapter is None:
            return weight
        if ours in self.adapter.replacements:
            return self.adapter.replacements[ours]
        module = ours.rsplit(".", 1)[0]
        pair = self.adapter.pairs.get(module)
        if pair is not None and ours.endswith(".weight"):
            a, b = pair
            with np.errstate(over="ignore"):  # an overflow is refused just below
                delta = b @ a
                delta *= self.adapter.scale
                weight += delta  # in place: one extra copy of the tensor, not two
            if not all_finite(weight):
                raise AdapterError(
                    f"merging the adapter into {self._non_finite(ours, weight)} "
                    "overflows to infinity; refusing to export it"
                )
        return weight

    def _non_finite(self, ours: str, weight: np.ndarray) -> str:
        """The checkpoint's tensor holding the first non-finite value, and where in it."""
        role, _ = self.role(ours)
        at = first_non_finite(weight)
        if ROLES[role].per_expert:
            return f"{self.ckpt.hf_name(ours, at[0])!r} (at {at[1:]})"
        return f"{self.ckpt.hf_name(ours)!r} (at {at})"

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.tensor(name)

    def role(self, ours: str) -> tuple[str, int | None]:
        found = role_of_path(ours)
        if found is None:
            raise CheckpointError(f"no GGUF name for tensor {ours!r}")
        return found


def all_finite(x: np.ndarray) -> bool:
    """Whether no value is NaN or infinite, without a temporary of the tensor's size: a
    float64 sum of float32 or float16 values is finite exactly when every value is."""
    return bool(np.isfinite(x.sum(dtype=np.float64)))


def first_non_finite(x: np.ndarray) -> list[int]:
    return [int(i) for i in np.argwhere(~np.isfinite(x))[0]]


def export_hf(
    model: str | Path,
    out_dir: str | Path,
    adapter: str | Path | None = None,
    force: bool = False,
    dtype: str | None = None,
    base_weights: str | Path | None = None,
) -> Path:
    """The merged model as a Hugging Face checkpoint (transformers, vLLM, llama.cpp's own
    converter can read it): the family's HF names, per-expert tensors, the source's dtype
    unless ``dtype`` ("F32", "F16", "BF16") says otherwise."""
    weights = MergedWeights(model, adapter, force, base_weights)
    floats = [t.dtype for t in safetensors_index(weights.weights_folder) if t.dtype in ("F32", "F16", "BF16")]
    dtype = dtype or ("F32" if weights.from_grid or not floats else floats[0])
    cache: dict[str, np.ndarray] = {}

    def merged(ours: str) -> np.ndarray:
        if ours not in cache:
            cache.clear()  # experts of one tensor are written in a row: keep only that tensor
            cache[ours] = weights.tensor(ours)
        return cache[ours]

    tensors = []
    joined: dict[str, dict[str, str]] = {}  # a fused hub tensor -> {role: ours} it joins
    for ours in weights.names():
        role, bid = weights.role(ours)
        shape = weights.shapes[ours]
        if role in weights.family.stored_in and weights.family.join_tensor is not None:
            stored = weights.ckpt.stored_in(role).format(bid=bid)
            if stored not in joined:
                joined[stored] = {}
                tensors.append(stored)  # replaced below, once all its parts are known
            joined[stored][role] = ours
        elif ROLES[role].per_expert:
            for x in range(shape[0]):
                tensors.append(
                    TensorOut(
                        weights.ckpt.hf_name(ours, x),
                        dtype,
                        shape[1:],
                        lambda o=ours, x=x: from_float32(merged(o)[x], dtype),
                    )
                )
        elif (layout := weights.family.hub_layout) is not None and (
            hub := layout(role, mx.zeros(shape))
        ) is not None:  # lazy: the shape only
            tensors.append(
                TensorOut(
                    weights.ckpt.hf_name(ours),
                    dtype,
                    tuple(hub.shape),
                    lambda o=ours, r=role: from_float32(np.array(layout(r, mx.array(merged(o)))), dtype),
                )
            )
        else:
            tensors.append(
                TensorOut(
                    weights.ckpt.hf_name(ours), dtype, shape, lambda o=ours: from_float32(merged(o), dtype)
                )
            )
    tensors = [_joined_tensor(weights, t, joined[t], dtype) if isinstance(t, str) else t for t in tensors]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors)
        for name in ("config.json", *TOKENIZER_FILES):
            if (weights.ckpt.folder / name).is_file():
                shutil.copy2(weights.ckpt.folder / name, tmp / name)
        if weights.ckpt.mxfp4:  # the experts are written in float now
            config = dict(weights.ckpt.config.raw)
            config.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def _joined_tensor(weights: MergedWeights, stored: str, parts: dict[str, str], dtype: str) -> TensorOut:
    """The hub's fused tensor ``stored`` from our merged ``parts`` (role -> ours)."""
    join = weights.family.join_tensor
    shape = join(stored, {role: mx.zeros(weights.shapes[o]) for role, o in parts.items()}).shape  # lazy

    def produce() -> bytes:
        merged = {role: mx.array(weights.tensor(o)) for role, o in parts.items()}
        return from_float32(np.array(join(stored, merged)), dtype)

    return TensorOut(stored, dtype, tuple(shape), produce)
