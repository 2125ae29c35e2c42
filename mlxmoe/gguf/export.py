"""Merged-model GGUF: tensors read, merged, quantized and written one at a time.

Names, metadata keys and per-tensor types follow llama.cpp's own converter
(convert_hf_to_gguf.py) so that llama.cpp loads the file as if it had written it.
"""

from __future__ import annotations

import logging
import mmap
import struct
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..atomic import atomic_file
from ..config import MoEArgs
from ..errors import MlxMoeError
from ..families.base import GGUFPart
from .blocks import cast, mxfp4_from_hub, quantize_legacy
from .kquants import QUANTIZERS, q4_k_m_type
from .merge import MergedWeights, all_finite
from .vocab import add_tokenizer
from .writer import GGUFWriter

Q = gguf.GGMLQuantizationType
log = logging.getLogger(__name__)
GRID_WARNING = (
    "{folder} arrived quantized, so the adapters are merged into its dequantized grid and the "
    "GGUF carries that rounding; pass its full-precision release as base weights "
    "(--base-weights) to merge into the original weights"
)
FILE_TYPES: dict[str, tuple[gguf.LlamaFileType, Q | None]] = {
    "f32": (gguf.LlamaFileType.ALL_F32, Q.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, Q.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, Q.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0),
    "q4_k_m": (gguf.LlamaFileType.MOSTLY_Q4_K_M, None),  # per tensor, as llama-quantize picks
    # experts in MXFP4, the rest f16: what the converter writes from gpt-oss as published
    "mxfp4": (gguf.LlamaFileType.MOSTLY_MXFP4_MOE, Q.F16),
}
MXFP4_ROLES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# routers, and the recurrent layers' convolutions, as the converter keeps them for every arch
ALWAYS_F32_ROLES = ("ffn_gate_inp", "ffn_gate_inp_shexp", "ssm_conv1d")


class ExportError(MlxMoeError):
    pass


@dataclass
class TensorPlan:
    ours: str
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    part: GGUFPart | None = None  # how the family makes it of ours, where not as it is
    # where several of ours make it (GGUFPart.join): each (ours, part), in row order
    joined: tuple[tuple[str, GGUFPart], ...] = ()
    generated: np.ndarray | None = None  # the family's gguf_extra_tensors: of none of ours


@dataclass
class ExportReport:
    path: Path
    file_type: str
    bytes: int
    seconds: float
    tensors: int
    types: Counter = field(default_factory=Counter)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's "llama" arch wants each head's rotary halves interleaved (the converter's
    LlamaModel.permute): rows [h, 2, d/2] -> [h, d/2, 2]."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def tensor_type(
    gguf_name: str,
    role: str,
    shape: tuple[int, ...],
    file_type: str,
    n_layers: int,
    n_experts: int,
    tied_embeddings: bool = False,
) -> Q:
    if (
        len(shape) <= 1
        or gguf_name.endswith("_norm.weight")
        or role in ALWAYS_F32_ROLES
        or not gguf_name.endswith(".weight")
    ):
        return Q.F32
    if file_type == "q4_k_m":  # llama-quantize's own per-tensor choices and fallbacks
        return q4_k_m_type(
            gguf_name, n_layers, n_experts or None, row_length=shape[-1], tied_embeddings=tied_embeddings
        )
    qtype = Q.MXFP4 if file_type == "mxfp4" and role in MXFP4_ROLES else FILE_TYPES[file_type][1]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return Q.F16  # the converter's fallback when a row does not split into blocks
    return qtype


def encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return cast(data, np.dtype(np.float16))
    if qtype in QUANTIZERS:  # K-quants: gguf-py cannot encode them
        return QUANTIZERS[qtype](data.astype(np.float32, copy=False))
    return quantize_legacy(data, qtype)


def encoded_info(plan: TensorPlan) -> tuple[tuple[int, ...], np.dtype]:
    if plan.qtype == Q.F32:
        return plan.shape, np.dtype(np.float32)
    if plan.qtype == Q.F16:
        return plan.shape, np.dtype(np.float16)
    return gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype), np.dtype(np.uint8)


def write_hparams(writer: gguf.GGUFWriter, weights: MergedWeights, file_type: str) -> None:
    """The keys the converter's TextModel.set_gguf_parameters writes, then the family's own."""
    args, raw = weights.args, weights.ckpt.config.raw
    if args.rope_scaling is not None and not weights.family.gguf_rope_scaling:
        raise ExportError(f"cannot export rope scaling {args.rope_scaling!r} to GGUF yet")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(weights.ckpt.folder.name)
    writer.add_block_count(args.num_layers)
    writer.add_context_length(args.max_position_embeddings)
    writer.add_embedding_length(args.hidden_size)
    if args.intermediate_size:
        writer.add_feed_forward_length(args.intermediate_size)
    writer.add_head_count(args.num_heads)
    writer.add_head_count_kv(args.num_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.rms_norm_eps)
    if isinstance(args, MoEArgs):
        writer.add_expert_count(args.num_experts)
        writer.add_expert_used_count(args.num_experts_per_tok)
    # the converter reads a multimodal config's text_config as if at the top level
    if {**raw, **(raw.get("text_config") or {})}.get("head_dim") is not None:
        writer.add_key_length(args.head_dim)
        writer.add_value_length(args.head_dim)
    writer.add_file_type(FILE_TYPES[file_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    weights.family.gguf_hparams(args, writer)
    if weights.family.gguf_config_hparams is not None:
        weights.family.gguf_config_hparams(weights.ckpt.config, writer)


def plan_tensors(weights: MergedWeights, file_type: str) -> list[TensorPlan]:
    args = weights.args
    n_experts = getattr(args, "num_experts", 0)

    def plan(ours: str, name: str, role: str, shape: tuple[int, ...], **kw) -> TensorPlan:
        qtype = tensor_type(
            name, role, shape, file_type, args.num_layers, n_experts, args.tie_word_embeddings
        )
        return TensorPlan(ours, name, shape, qtype, **kw)

    extra = weights.family.gguf_extra_tensors
    plans = [plan("", name, "", data.shape, generated=data) for name, data in (extra(args) if extra else [])]
    joined: dict[str, list[tuple[str, GGUFPart]]] = {}
    for ours, bid, part in gguf_parts_of(weights):
        name = weights.family.gguf_name(part.role, bid)
        if part.join is not None:
            if name not in joined:
                plans.append(plan(ours, name, part.role, (), part=part))  # shape and type below
            joined.setdefault(name, []).append((ours, part))
            continue
        plans.append(plan(ours, name, part.role, part.shape(weights.shapes[ours]), part=part))
    for i, p in enumerate(plans):
        if p.gguf_name in joined:
            members = tuple(sorted(joined[p.gguf_name], key=lambda m: m[1].join))
            shapes = [m[1].shape(weights.shapes[m[0]]) for m in members]
            shape = (*shapes[0][:-2], sum(s[-2] for s in shapes), shapes[0][-1])
            plans[i] = plan(p.ours, p.gguf_name, p.part.role, shape, part=p.part, joined=members)
    return plans


def gguf_parts_of(weights: MergedWeights) -> list[tuple[str, int | None, GGUFPart]]:
    """(ours, block, part) for every GGUF part of every tensor of ours."""
    out = []
    for ours in weights.names():
        role, bid = weights.role(ours)
        out += [(ours, bid, part) for part in weights.family.gguf_tensor_parts(role, weights.args)]
    return out


def produce(weights: MergedWeights, plan: TensorPlan) -> np.ndarray:
    if plan.qtype == Q.MXFP4 and (published := weights.mxfp4_parts(plan.ours)) is not None:
        return mxfp4_from_hub(*published)  # as published: moved, not rounded again
    if plan.generated is not None:
        data = plan.generated
    elif plan.joined:
        data = np.concatenate([part.apply(weights.tensor(ours)) for ours, part in plan.joined], axis=-2)
    else:
        data = weights.tensor(plan.ours)
    if plan.part is not None and not plan.joined:
        data = plan.part.apply(data)
    args = weights.args
    if weights.family.permute_qk:
        if plan.ours.endswith("attn.q_proj.weight"):
            data = permute_qk(data, args.num_heads)
        elif plan.ours.endswith("attn.k_proj.weight"):
            data = permute_qk(data, args.num_kv_heads)
    try:
        encoded = encode(data, plan.qtype)
    except ValueError as exc:  # a block type's refusal: rows that do not split, scale overflow
        raise ExportError(f"tensor {plan.gguf_name}: {exc}") from exc
    if plan.qtype == Q.F16 and not all_finite(encoded):
        raise ExportError(
            f"tensor {plan.gguf_name}: values up to {float(np.abs(data).max()):.4g} overflow float16 "
            "(largest 65504) and would be written as infinity: export bf16 or f32"
        )
    return encoded


def export_gguf(
    model: str | Path,
    out: str | Path,
    file_type: str = "f16",
    adapter: str | Path | None = None,
    force: bool = False,
    on_tensor: Callable[[int, int, str], None] | None = None,
    base_weights: str | Path | None = None,
) -> ExportReport:
    """Merge ``adapter`` (if any) into ``model`` and write a GGUF of ``file_type`` to ``out``.
    ``base_weights``: the full-precision release of a ``model`` that arrived quantized
    (see ``merge.MergedWeights``); without it such a model's grid is merged, with a warning.

    The file is written under a temporary name, its tensor table read back, then renamed:
    an interrupted export leaves nothing at ``out``."""
    if file_type not in FILE_TYPES:
        raise ExportError(f"GGUF type {file_type!r} is unknown (choose from: {', '.join(FILE_TYPES)})")
    started = time.perf_counter()
    weights = MergedWeights(model, adapter, force, base_weights)
    if file_type == "mxfp4" and not weights.family.mxfp4_experts:
        # proven in llama.cpp for gpt-oss's graph only (tests/test_gpt_oss_export.py)
        raise ExportError(
            f"GGUF type mxfp4 is for gpt-oss's experts; {weights.family.name} is "
            "exported as f16, q8_0 or q4_k_m"
        )
    if weights.from_grid:
        log.warning(GRID_WARNING.format(folder=weights.ckpt.folder))
    plans = plan_tensors(weights, file_type)
    writer = GGUFWriter(None, weights.family.gguf_arch)
    write_hparams(writer, weights, file_type)
    add_tokenizer(writer, weights.ckpt.folder)
    for plan in plans:
        shape, dtype = encoded_info(plan)
        writer.add_tensor_info(
            plan.gguf_name, shape, dtype, int(np.prod(shape)) * dtype.itemsize, raw_dtype=plan.qtype
        )
    out = Path(out)
    with atomic_file(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        # One tensor is written while the next is read, merged and encoded: the disk and
        # the cores overlap, and at most two encoded tensors are alive.
        with ThreadPoolExecutor(1) as disk:
            pending = None
            for i, plan in enumerate(plans):
                data = produce(weights, plan)
                if pending is not None:
                    pending.result()
                pending = disk.submit(writer.write_tensor_data, data)
                if on_tensor:
                    on_tensor(i + 1, len(plans), plan.gguf_name)
            pending.result()
        writer.close()
        validate(tmp, plans)
    return ExportReport(
        out,
        file_type,
        out.stat().st_size,
        time.perf_counter() - started,
        len(plans),
        Counter(p.qtype.name for p in plans),
    )


def tensor_table(path: Path) -> tuple[dict[str, tuple[Q, tuple[int, ...], int]], int, int]:
    """A GGUF's tensor infos (name -> type, shape in our order, data offset), where its data
    begins, and the file's size. The metadata is walked, not decoded: gguf-py's GGUFReader
    makes a numpy view per string and takes ~15 s over Qwen's 152k-token vocabulary, as long
    as the export itself."""
    V = gguf.GGUFValueType
    sizes = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:

        def string(off: int) -> tuple[int, bytes]:
            (n,) = struct.unpack_from("<Q", buf, off)
            return off + 8 + n, bytes(buf[off + 8 : off + 8 + n])

        magic, version, n_tensors, n_kv = struct.unpack_from("<IIQQ", buf, 0)
        if magic != gguf.GGUF_MAGIC or version != gguf.GGUF_VERSION:
            raise ValueError(f"not a GGUF v{gguf.GGUF_VERSION} file")
        off, alignment = 24, gguf.GGUF_DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            off, key = string(off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            off += 4
            if key == gguf.Keys.General.ALIGNMENT.encode():
                (alignment,) = struct.unpack_from("<I", buf, off)
            if vtype == V.STRING:
                off, _ = string(off)
            elif vtype == V.ARRAY:
                itype, count = struct.unpack_from("<IQ", buf, off)
                off += 12
                if itype == V.STRING:
                    for _ in range(count):
                        off += 8 + struct.unpack_from("<Q", buf, off)[0]
                else:
                    off += count * sizes[V(itype)]
            else:
                off += sizes[V(vtype)]
        table = {}
        for _ in range(n_tensors):
            off, name = string(off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            table[name.decode()] = (Q(qtype), tuple(reversed(dims)), offset)
        return table, off + (-off % alignment), len(buf)


def validate(path: Path, plans: list[TensorPlan]) -> None:
    """Read the file back: every planned tensor is there with its type and shape, its data
    inside the file."""
    try:
        table, data_start, size = tensor_table(path)
    except (ValueError, KeyError, struct.error) as exc:
        raise ExportError(f"{path}: the written GGUF does not read back ({exc})") from exc
    if len(table) != len(plans):
        raise ExportError(f"{path}: {len(table)} tensors read back, {len(plans)} written")
    for plan in plans:
        qtype, shape, offset = table.get(plan.gguf_name, (None, None, 0))
        byte_shape, dtype = encoded_info(plan)
        end = data_start + offset + int(np.prod(byte_shape)) * dtype.itemsize
        if qtype != plan.qtype or shape != plan.shape or end > size:
            raise ExportError(f"{path}: tensor {plan.gguf_name} did not read back as written")
