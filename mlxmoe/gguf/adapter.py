"""Adapter-only GGUF: the LoRA tensors llama.cpp applies on top of a base GGUF at load time
(``llama-cli -m base.gguf --lora adapter.gguf``, Ollama's ``ADAPTER``).

Layout as llama.cpp's convert_lora_to_gguf.py writes it: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and for each adapted weight ``W`` the pair
``W.lora_a`` [r, in] and ``W.lora_b`` [out, r] (stacked experts: [E, r, in], [E, out, r]);
llama.cpp scales each pair by alpha / r, r read from the tensor.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from ..atomic import atomic_file
from ..tensor_names import ROLES
from .export import ExportError, ExportReport, TensorPlan, gguf_parts_of, permute_qk, validate
from .merge import MergedWeights


def adapter_tensors(weights: MergedWeights) -> list[tuple[str, np.ndarray]]:
    adapter = weights.adapter
    args = weights.args
    alpha = float(adapter.config["alpha"])
    out: list[tuple[str, np.ndarray]] = []
    joined: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for module, (a, b) in adapter.pairs.items():
        ours = f"{module}.weight"
        role, bid = weights.role(ours)
        if role in weights.family.gguf_no_lora:
            raise ExportError(
                f"cannot write the adapter of {module} as GGUF: llama.cpp's {weights.family.gguf_arch} "
                f"multiplies {role} without LoRA (it would load and never apply); export the merged "
                "model, or train with explicit LoRA targets that leave it out"
            )
        if role in weights.family.gguf_lora_scaled_by:
            scale = weights.tensor(ROLES[weights.family.gguf_lora_scaled_by[role]].ours.format(bid=bid))
            b = b * scale.reshape(-1, *[1] * (b.ndim - 1))
        if weights.family.permute_qk and role in ("attn_q", "attn_k"):
            # delta = B A: permuting the delta's rows is permuting B's rows
            b = permute_qk(b, args.num_heads if role == "attn_q" else args.num_kv_heads)
        # the family's GGUF tensors of this one (Qwen3-Next's in_proj_qkvz: attn_qkv and
        # attn_gate, rows regrouped): B's rows and A's columns picked as the weight's
        for part in weights.family.gguf_tensor_parts(role, args):
            part_a, part_b = part.lora(a, b)
            name = weights.family.gguf_name(part.role, bid)
            if part.join is not None:
                joined.setdefault(name, {})[part.join] = (part_a, part_b)
                continue
            # our scale is alpha / our rank, llama.cpp's alpha / (rows of A): the same rank
            out.append((f"{name}.lora_a", part_a))
            out.append((f"{name}.lora_b", part_b))
    out += joined_pairs(weights, joined)
    for ours, trained in adapter.replacements.items():
        # A router trained in full is the exact rank-E update: B = I, A = delta * E / alpha.
        role, bid = weights.role(ours)
        name = weights.family.gguf_name(role, bid)
        delta = trained - weights.base(ours)
        rank = delta.shape[0]
        out.append((f"{name}.lora_a", delta * (rank / alpha)))
        out.append((f"{name}.lora_b", np.eye(rank, dtype=np.float32)))
    return out


def joined_pairs(
    weights: MergedWeights, joined: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]]
) -> list[tuple[str, np.ndarray]]:
    """One pair per GGUF tensor made of several of ours (GGUFPart.join): the members' deltas
    B_i A_i stacked by rows are B' A' with A' their A_i stacked (rank: the sum of theirs) and
    B' block-diagonal, zero rows for a member without LoRA. llama.cpp scales by alpha / rank
    of the pair, ours by alpha / r_i: each B_i is multiplied by rank / r_i."""
    if not joined:
        return []
    rows = {}  # GGUF name -> {join: rows of that member}
    for ours, bid, part in gguf_parts_of(weights):
        if part.join is not None:
            name = weights.family.gguf_name(part.role, bid)
            rows.setdefault(name, {})[part.join] = part.shape(weights.shapes[ours])[-2]
    out = []
    for name, pairs in joined.items():
        order = sorted(rows[name])
        a = np.concatenate([pairs[j][0] for j in order if j in pairs], axis=-2)
        rank = a.shape[-2]
        b = np.zeros((*a.shape[:-2], sum(rows[name].values()), rank), np.float32)
        row = col = 0
        for j in order:
            if j in pairs:
                part_b = pairs[j][1]
                b[..., row : row + part_b.shape[-2], col : col + part_b.shape[-1]] = part_b * (
                    rank / part_b.shape[-1]
                )
                col += part_b.shape[-1]
            row += rows[name][j]
        out += [(f"{name}.lora_a", a), (f"{name}.lora_b", b)]
    return out


def export_adapter_gguf(
    model: str | Path, adapter: str | Path, out: str | Path, force: bool = False
) -> ExportReport:
    started = time.perf_counter()
    weights = MergedWeights(model, adapter, force)
    tensors = adapter_tensors(weights)
    if not tensors:
        raise ExportError(f"{adapter}: the adapter holds no trained tensors")
    writer = gguf.GGUFWriter(None, weights.family.gguf_arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(weights.adapter.config["alpha"]))
    writer.add_name(f"{weights.ckpt.folder.name} LoRA")
    plans = []
    for name, data in tensors:
        data = np.ascontiguousarray(data, dtype=np.float32)
        writer.add_tensor_info(
            name, data.shape, data.dtype, data.nbytes, raw_dtype=gguf.GGMLQuantizationType.F32
        )
        plans.append(TensorPlan(name, name, data.shape, gguf.GGMLQuantizationType.F32))
    out = Path(out)
    with atomic_file(out) as tmp:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data in tensors:
            writer.write_tensor_data(np.ascontiguousarray(data, dtype=np.float32))
        writer.close()
        validate(tmp, plans)
    return ExportReport(
        out,
        "lora-f32",
        out.stat().st_size,
        time.perf_counter() - started,
        len(plans),
        Counter({"F32": len(plans)}),
    )
