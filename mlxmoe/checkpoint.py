"""A Hugging Face checkpoint folder: its config, its weight files, and its tensors by our names.

Only safetensors are read. Pickle-based weights (``*.bin``, ``*.pt``) can run code when
loaded and are refused, never opened; so is custom modeling code (``auto_map``).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import mlx.core as mx

from .config import ConfigView, DecoderArgs
from .errors import CheckpointError
from .families import Family, family_for
from .prequantized import (
    COMPONENTS,
    MXFP4,
    CheckpointQuantization,
    checkpoint_quantization,
    component,
    dequantized,
    dtype_str,
    mxfp4_checkpoint,
    quantized_shape,
    refuse_foreign_tensor,
)
from .tensor_names import FLOAT32_ROLES, ROLES, UNQUANTIZED_ROLES, role_of_path

# Files that make up a tokenizer (and its chat template), copied along with weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
# Buffers some exporters save that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MXFP4_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")  # gpt-oss's experts, as published


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    config: ConfigView
    family: Family
    weight_files: tuple[Path, ...]
    quantization: CheckpointQuantization | None = None  # arrives quantized (mlx-lm's format)
    mxfp4: bool = False  # its experts arrive in MXFP4 (gpt-oss as published)

    @property
    def args(self) -> DecoderArgs:
        return self.family.args_from_config(self.config)

    @cached_property
    def hf_prefix(self) -> str | None:
        """Which of the family's ``hf_prefixes`` this checkpoint stores its layers under
        (None: the family has one spelling)."""
        from .safetensors_io import safetensors_header

        prefixes = self.family.hf_prefixes
        if not prefixes:
            return None
        names = [t.name for file in self.weight_files for t in safetensors_header(file)]
        return next((p for p in prefixes if any(n.startswith(f"{p}.layers.") for n in names)), prefixes[0])

    def own_spelling(self, name: str) -> str:
        """A name the family writes under its first prefix -> under this checkpoint's."""
        first, own = (self.family.hf_prefixes or (None,))[0], self.hf_prefix
        if own is None or own == first or not name.startswith(f"{first}."):
            return name
        return own + name[len(first) :]

    def hf_name(self, ours: str, expert: int | None = None) -> str:
        """The Hugging Face name this family writes for one of our tensors."""
        found = role_of_path(ours)
        if found is None:
            return ours
        role, bid = found
        names = self.family.hf_tensors.get(role, ours)
        name = names if isinstance(names, str) else names[0]
        return self.own_spelling(name.format(bid=bid, xid="N" if expert is None else expert))

    def stored_in(self, role: str) -> str:
        """The pattern (``{bid}``) of the fused checkpoint tensor ``role`` is split from."""
        return self.own_spelling(self.family.stored_in[role])

    def stored_name(self, ours: str) -> str:
        """The checkpoint tensor that holds one of ours, for messages: its HF name, or the
        fused tensor the family splits it from (gpt-oss's gate_up_proj)."""
        found = role_of_path(ours)
        if found is not None and found[0] in self.family.stored_in:
            return self.stored_in(found[0]).format(bid=found[1])
        return self.hf_name(ours)

    def tensors(self) -> Iterator[tuple[str, mx.array, Path]]:
        """(HF name, lazily loaded array, file) for every tensor in every weight file."""
        for file in self.weight_files:
            try:
                arrays = mx.load(str(file))
            except Exception as exc:  # MLX raises a bare RuntimeError/ValueError
                raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from exc
            for name, array in arrays.items():
                yield name, array, file


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def open_checkpoint(folder: str | Path) -> Checkpoint:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    raw = read_json(config_path)
    if "auto_map" in raw:
        raise CheckpointError(
            f"{config_path}: declares auto_map {raw['auto_map']!r}, i.e. custom modeling code "
            "inside the model folder; mlxmoe never runs code from a model folder"
        )
    config = ConfigView(raw, config_path)
    family = family_for(raw.get("model_type"), str(config_path))
    quantization = checkpoint_quantization(raw, str(config_path), family.mxfp4_experts)
    mxfp4 = mxfp4_checkpoint(raw)
    if mxfp4 and not family.mxfp4_experts:
        raise CheckpointError(
            f"{config_path}: quantization_config.quant_method 'mxfp4' is read for gpt-oss's experts, "
            f"not for {family.name}: use the model's float release"
        )
    return Checkpoint(folder, config, family, _weight_files(folder), quantization, mxfp4)


def _weight_files(folder: Path) -> tuple[Path, ...]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: missing key 'weight_map'")
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: lists {file.name}, which is not in {folder}")
        return files
    files = tuple(sorted(folder.glob("*.safetensors")))
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: only pickle weights ({', '.join(pickles)}); mlxmoe never unpickles "
            "weights (loading a pickle can run arbitrary code). Convert them to safetensors."
        )
    raise CheckpointError(f"{folder}: no *.safetensors weight files")


def read_weights(
    ckpt: Checkpoint, expected: dict[str, tuple[int, ...]], dtype: mx.Dtype, keep_mxfp4: bool = False
) -> tuple[dict[str, mx.array], dict[str, tuple[int, int, str]]]:
    """Checkpoint tensors renamed to our module paths, experts stacked, shapes checked; and
    the modules that arrive quantized: module path -> (bits, group size, mode). MXFP4 experts
    are dequantized (exactly), or with ``keep_mxfp4`` kept in MLX's mxfp4 mode."""
    found: dict[str, mx.array] = {}
    experts: dict[str, dict[int, mx.array]] = defaultdict(dict)
    packed: dict[str, dict[str, mx.array]] = defaultdict(dict)  # quantized: weight, scales, biases
    origin: dict[str, tuple[str, Path]] = {}  # "<ours>:<part>" -> the checkpoint's tensor, file
    tied = ckpt.args.tie_word_embeddings
    quantized = ckpt.quantization is not None or ckpt.mxfp4
    for source, stored, file in ckpt.tensors():
        refuse_foreign_tensor(source, file)
        for name, array in ckpt.family.split(source, stored, file):
            if not quantized and array.dtype in (mx.uint8, mx.uint32):
                raise CheckpointError(
                    f"{file}: tensor {source!r} is packed ({dtype_str(stored)}), "
                    "but config.json declares no quantization"
                )
            hf_name, part = component(name) if quantized else (name, "weight")
            match = ckpt.family.match_hf(hf_name)
            if match is None:
                if source.endswith(IGNORED_SUFFIXES):
                    continue
                raise CheckpointError(f"{file}: unexpected tensor {source!r} for {ckpt.family.name}")
            role, bid, xid = match
            ours = ROLES[role].ours.format(bid=bid)
            if role == "output" and tied:
                continue  # some exporters store the tied head too
            if ours not in expected:
                raise CheckpointError(f"{file}: tensor {source!r} does not fit config.json ({ours})")
            if quantized and (part != "weight" or array.dtype == mx.uint32):
                if xid is not None:
                    raise CheckpointError(f"{file}: tensor {source!r}: quantized experts must be stacked")
                packed[ours][part] = array
                origin[f"{ours}:{part}"] = (source, file)
                continue
            want = expected[ours][1:] if xid is not None else expected[ours]
            if tuple(array.shape) != tuple(want):
                part_of = "" if name == source else f" (its part {name!r}: {tuple(array.shape)})"
                raise CheckpointError(
                    f"{file}: tensor {source!r} has shape {tuple(stored.shape)}{part_of}, "
                    f"config.json implies {tuple(want)}"
                )
            if xid is not None:
                if xid >= expected[ours][0]:
                    raise CheckpointError(f"{file}: tensor {source!r}: expert {xid} out of range")
                experts[ours][xid] = array
            else:
                found[ours] = array
    for ours, parts in experts.items():
        missing = [x for x in range(expected[ours][0]) if x not in parts]
        if missing:
            raise CheckpointError(f"{ckpt.folder}: missing tensor {ckpt.hf_name(ours, missing[0])!r}")
        found[ours] = mx.stack([parts[x] for x in range(len(parts))])
    specs = _quantized_modules(ckpt, packed, expected, found, origin, keep_mxfp4, dtype)
    absent = [ours for ours in expected if ours not in found]
    if absent:
        stored = list(dict.fromkeys(map(ckpt.stored_name, absent)))
        names = ", ".join(repr(n) for n in stored[:3])
        more = f" and {len(stored) - 3} more" if len(stored) > 3 else ""
        raise CheckpointError(f"{ckpt.folder}: missing tensor {names}{more}")
    # Routers stay float32: routing is the decision we must not perturb (see nn.moe.Router).
    return {
        k: v if v.dtype in (mx.uint32, mx.uint8) else v.astype(mx.float32 if stays_float32(k) else dtype)
        for k, v in found.items()
    }, specs


def _quantized_modules(
    ckpt: Checkpoint,
    packed: dict[str, dict[str, mx.array]],
    expected: dict[str, tuple[int, ...]],
    found: dict[str, mx.array],
    origin: dict[str, tuple[str, Path]],
    keep_mxfp4: bool,
    dtype: mx.Dtype,
) -> dict[str, tuple[int, int, str]]:
    """Adds the quantized tensors to ``found`` (routers and the other never-quantized roles
    dequantized, MXFP4 experts too unless ``keep_mxfp4`` or the rest arrives quantized too, as
    in mlx-lm's gpt-oss); returns module path -> (bits, group size, mode) of those kept
    quantized. MXFP4 is told apart by its uint8 exponents (affine scales are floats)."""
    keep_mxfp4 = keep_mxfp4 or ckpt.quantization is not None
    specs = {}
    for ours, parts in packed.items():
        scales = parts.get("scales")
        mlx_lm_affine = ckpt.quantization is not None and (scales is None or scales.dtype != mx.uint8)
        mode = MXFP4 if ckpt.mxfp4 and not mlx_lm_affine else "affine"
        role = role_of_path(ours)
        if mode == MXFP4 and (role is None or role[0] not in MXFP4_ROLES):
            name, file = origin[f"{ours}:{next(iter(parts))}"]
            raise CheckpointError(
                f"{file}: tensor {name!r} is MXFP4; mlxmoe reads MXFP4 for "
                "gpt-oss's experts only (mlx_lm.convert -q quantizes the rest affine)"
            )
        if mode == MXFP4:
            bits, group = _mxfp4_shape(ours, parts, expected[ours], origin)
        else:
            missing = [p for p in ("weight", *COMPONENTS) if p not in parts]
            if missing:
                raise CheckpointError(
                    f"{ckpt.folder}: quantized tensor {ckpt.hf_name(ours)!r} has no "
                    f"{missing[0]!r} ({ours.rsplit('.', 1)[0]}.{missing[0]})"
                )
            bits, group = quantized_shape(
                ours,
                tuple(parts["weight"].shape),
                tuple(parts["scales"].shape),
                expected[ours],
                str(ckpt.folder),
            )
        if (role is not None and role[0] in UNQUANTIZED_ROLES) or (mode == MXFP4 and not keep_mxfp4):
            found[ours] = dequantized(parts, bits, group, mode, dtype)
            continue
        module = ours[: -len(".weight")]
        found[ours], found[f"{module}.scales"] = parts["weight"], parts["scales"]
        if mode == "affine":
            found[f"{module}.biases"] = parts["biases"]
        specs[module] = (bits, group, mode)
    return specs


def _mxfp4_shape(
    ours: str, parts: dict[str, mx.array], want: tuple[int, ...], origin: dict[str, tuple[str, Path]]
) -> tuple[int, int]:
    """(4, 32) for blocks and scales that hold a ``want`` weight; else an error naming the
    checkpoint's tensor and file."""
    present = next(iter(parts))
    name, file = origin[f"{ours}:{present}"]
    for part, other in (("weight", "scales"), ("scales", "weight")):
        if part in parts and other not in parts:
            name, file = origin[f"{ours}:{part}"]
            raise CheckpointError(
                f"{file}: MXFP4 tensor {name!r} has no "
                f"{'scales' if other == 'scales' else 'blocks'} beside it"
            )
    if sorted(parts) != ["scales", "weight"]:
        raise CheckpointError(
            f"{file}: tensor {name!r}: MXFP4 has blocks and scales only, found {sorted(parts)}"
        )
    name, file = origin[f"{ours}:weight"]
    where = f"{file}: tensor {name!r}"
    bits, group = quantized_shape(
        ours, tuple(parts["weight"].shape), tuple(parts["scales"].shape), want, where
    )
    if (bits, group) != (4, 32):
        raise CheckpointError(
            f"{where}: MXFP4 stores 4-bit values in groups of 32; its shapes "
            f"say {bits} bits in groups of {group} for {ours} {want}"
        )
    return bits, group


def stays_float32(ours: str) -> bool:
    found = role_of_path(ours)
    return found is not None and found[0] in FLOAT32_ROLES


def role_is_router(ours: str) -> bool:
    found = role_of_path(ours)
    return found is not None and found[0] in ("ffn_gate_inp", "ffn_gate_inp.bias")
