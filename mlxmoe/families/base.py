"""What a family module declares: its config mapping, its Hugging Face names, its GGUF arch."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import gguf
import numpy as np

from ..config import ConfigView, DecoderArgs, MoEArgs
from ..errors import MlxMoeError
from ..model import CausalLM, build_decoder
from ..tensor_names import GGUF_PARTS, ROLES, compile_pattern


@dataclass(frozen=True)
class GGUFPart:
    """One GGUF tensor made of one of ours: the rows (axis 0) and columns (last axis) at
    these indices, in this order (None: all, as they are), then ``value`` elementwise, then
    size-1 axes dropped if ``squeeze``, then the rows cut into ``heads`` equal blocks
    stacked on a new first axis, and those blocks' last two axes swapped if ``transposed``
    (deepseek2's attn_k_b). Picking rows and columns keeps a LoRA delta B @ A factored: its
    rows are B's, its columns A's; ``value``, ``heads`` and ``transposed`` do not, and are for
    tensors whose LoRA llama.cpp cannot take. Parts of several of ours with ``join`` set and
    one GGUF name are one tensor: their rows (axis -2) stacked in ``join`` order (Gemma-4's
    ffn_gate_up_exps: the gate's, then the up projection's)."""

    role: str
    rows: np.ndarray | None = None
    cols: np.ndarray | None = None
    value: Callable[[np.ndarray], np.ndarray] | None = None
    squeeze: bool = False
    heads: int | None = None
    transposed: bool = False
    join: int | None = None

    def shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = list(shape)
        if self.rows is not None:
            shape[0] = len(self.rows)
        if self.cols is not None:
            shape[-1] = len(self.cols)
        shape = [n for n in shape if n != 1 or not self.squeeze]
        if self.heads is not None:
            shape = [self.heads, shape[0] // self.heads, *shape[1:]]
        if self.transposed:
            shape[-2:] = shape[-1], shape[-2]
        return tuple(shape)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.rows is not None:
            x = x[self.rows]
        if self.cols is not None:
            x = x[..., self.cols]
        if self.value is not None:
            x = self.value(x)
        if self.squeeze:
            x = x.reshape([n for n in x.shape if n != 1])
        if self.heads is not None:
            x = x.reshape(self.heads, -1, *x.shape[1:])
        return x.swapaxes(-1, -2) if self.transposed else x

    def lora(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A [.., r, in] and B [.., out, r] of a delta B @ A -> those of this part's delta."""
        if self.value is not None or self.squeeze or self.heads is not None or self.transposed:
            raise MlxMoeError(
                f"cannot write a LoRA of {self.role}: its GGUF tensor is not a "
                "selection of rows and columns of ours"
            )
        if self.rows is not None:
            b = b[..., self.rows, :]
        if self.cols is not None:
            a = a[..., self.cols]
        return a, b


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    gguf_arch: str
    # role -> Hugging Face name pattern(s); the first is what we write, all are read.
    hf_tensors: dict[str, str | tuple[str, ...]]
    args_from_config: Callable[[ConfigView], DecoderArgs]
    # Writes the llama.cpp hyper-parameters only this family has (after the common ones),
    # and refuses a config llama.cpp's graph for gguf_arch cannot compute.
    gguf_hparams: Callable[[DecoderArgs, Any], None]
    permute_qk: bool = False  # llama.cpp's "llama" arch stores q/k rows interleaved per head
    # A checkpoint tensor -> the tensors hf_tensors names, for checkpoints that fuse or
    # transpose several of ours into one (gpt-oss's gate_up_proj): (name, array, file) ->
    # [(name, array)]. None: every tensor is one of ours as it is.
    split_tensor: Callable[[str, Any, Any], list[tuple[str, Any]]] | None = None
    # role -> the checkpoint tensor split_tensor derives it from, named in "missing" errors
    stored_in: dict[str, str] = field(default_factory=dict)
    # Reads quantization_config.quant_method "mxfp4" (the experts as gpt-oss publishes them)
    mxfp4_experts: bool = False
    # The inverse of split_tensor, for export_hf: (checkpoint name, {role: array}) -> the
    # tensor stored_in names, in the hub's layout (MLX arrays: lazy, so shapes cost nothing)
    join_tensor: Callable[[str, dict[str, Any]], Any] | None = None
    # role -> GGUF name, where gguf_arch names a role otherwise than tensor_names.ROLES
    gguf_names: dict[str, str] = field(default_factory=dict)
    # gguf_hparams writes (and checks) rope scaling; other families' exports refuse it
    gguf_rope_scaling: bool = False
    # role -> the GGUF tensors gguf_arch makes of it, where that is not the tensor as it is
    # (Qwen3-Next: in_proj_qkvz regrouped and split, norms + 1): (role, args) -> [GGUFPart],
    # or None for the tensor as it is
    gguf_parts: Callable[[str, DecoderArgs], list[GGUFPart] | None] | None = None
    # Hyper-parameters the converter writes from config.json's keys as they are spelled, not
    # from what they mean (Qwen3-Next: layer_types only where the config lists them):
    # (config, writer), after gguf_hparams
    gguf_config_hparams: Callable[[ConfigView, Any], None] | None = None
    # (role, MLX array) -> one of ours in the hub's layout, for export_hf, or None where that
    # is ours (Qwen3-Next's conv1d: ours [C, K, 1], torch's [C, 1, K]); lazy, so shapes cost
    # nothing
    hub_layout: Callable[[str, Any], Any] | None = None
    # The prefixes a checkpoint may store the language model's tensors under, the one
    # hf_tensors and stored_in write first (Qwen3.5, Gemma-4: "model.language_model" in the
    # multimodal checkpoint, "model" in a text-only one); export_hf writes a checkpoint's
    # names back under its own
    hf_prefixes: tuple[str, ...] = ()
    # Roles whose matrix gguf_arch's graph multiplies without LoRA: an adapter GGUF's pair for
    # one would load and never apply, so adapter export refuses it (deepseek2's MLA projections)
    gguf_no_lora: tuple[str, ...] = ()
    # GGUF tensors the converter generates from the config, of none of ours (Gemma-4's
    # rope_freqs): args -> [(GGUF name, float32 array)]
    gguf_extra_tensors: Callable[[DecoderArgs], list[tuple[str, np.ndarray]]] | None = None
    # role -> the role (one value per expert) by which gguf_arch's graph multiplies each
    # expert's product with that matrix, and not its LoRA (llama.cpp's build_lora_mm_id w_s:
    # Gemma-4's per-expert scale on ffn_down_exps): an adapter GGUF's B carries it instead
    gguf_lora_scaled_by: dict[str, str] = field(default_factory=dict)

    def build(self, args: DecoderArgs) -> CausalLM:
        return build_decoder(args, self.name)

    @cached_property
    def hf_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        out = []
        for role, names in self.hf_tensors.items():
            for name in (names,) if isinstance(names, str) else names:
                out.append((compile_pattern(name), role))
        return out

    def gguf_name(self, role: str, bid: int | None) -> str:
        name = self.gguf_names.get(role) or GGUF_PARTS.get(role) or ROLES[role].gguf
        return name.format(bid=bid)

    def gguf_tensor_parts(self, role: str, args: DecoderArgs) -> list[GGUFPart]:
        """The GGUF tensors one of ours (of ``role``) becomes: itself unless gguf_parts says."""
        parts = self.gguf_parts(role, args) if self.gguf_parts is not None else None
        return parts or [GGUFPart(role)]

    def split(self, name: str, array: Any, file: Any) -> list[tuple[str, Any]]:
        return [(name, array)] if self.split_tensor is None else self.split_tensor(name, array, file)

    def match_hf(self, name: str) -> tuple[str, int | None, int | None] | None:
        """HF tensor name -> (role, block index, expert index), or None if unknown."""
        for pattern, role in self.hf_patterns:
            m = pattern.match(name)
            if m:
                groups = {k: int(v) for k, v in m.groupdict().items() if v is not None}
                return role, groups.get("bid"), groups.get("xid")
        return None


def add_yarn_keys(rope: dict[str, Any], writer: Any, arch: str) -> None:
    """The YaRN keys the converter's TextModel.set_gguf_parameters writes from a
    ``rope_type: yarn`` config; other scalings are refused."""
    kind = rope.get("rope_type", rope.get("type"))
    if kind != "yarn" or not rope.get("factor") or "original_max_position_embeddings" not in rope:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's {arch} reads rope scaling as YaRN "
            f"with factor and original_max_position_embeddings; this config has {rope!r}"
        )
    writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    writer.add_rope_scaling_factor(rope["factor"])
    writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if "extrapolation_factor" in rope:
        writer.add_rope_scaling_yarn_ext_factor(rope["extrapolation_factor"])
    attention = rope.get("attention_factor", rope.get("attn_factor"))
    if attention is not None:
        writer.add_rope_scaling_yarn_attn_factor(attention)
    if "beta_fast" in rope:
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
    if "beta_slow" in rope:
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def require_llama_cpp_routing(args: MoEArgs, arch: str, normalized: bool) -> None:
    """llama.cpp hard-codes each arch's routing; refuse configs it would compute differently."""
    if len(args.moe_layers) != args.num_layers:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's {arch} has no dense layers inside the MoE "
            f"(this config's dense layers: {sorted(set(range(args.num_layers)) - set(args.moe_layers))})"
        )
    if args.norm_topk_prob != normalized:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's {arch} "
            f"{'renormalizes' if normalized else 'does not renormalize'} "
            f"the top-k routing weights, this config has norm_topk_prob={args.norm_topk_prob}"
        )
