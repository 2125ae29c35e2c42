"""What a family module declares: its config mapping, its Hugging Face names, its GGUF arch."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from ..config import ConfigView, DecoderArgs, MoEArgs
from ..errors import MlxMoeError
from ..model import CausalLM, build_decoder
from ..tensor_names import compile_pattern


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

    def build(self, args: DecoderArgs) -> CausalLM:
        return build_decoder(args, self.name)

    @cached_property
    def hf_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        out = []
        for role, names in self.hf_tensors.items():
            for name in (names,) if isinstance(names, str) else names:
                out.append((compile_pattern(name), role))
        return out

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


def require_llama_cpp_routing(args: MoEArgs, arch: str, normalized: bool) -> None:
    """llama.cpp hard-codes each arch's routing; refuse configs it would compute differently."""
    if len(args.moe_layers) != args.num_layers:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's {arch} has no dense layers inside the MoE "
            f"(this config's dense layers: {sorted(set(range(args.num_layers)) - set(args.moe_layers))})"
        )
    if args.norm_topk_prob != normalized:
        raise MlxMoeError(
            f"cannot export to GGUF: llama.cpp's {arch} {'renormalizes' if normalized else 'does not renormalize'} "
            f"the top-k routing weights, this config has norm_topk_prob={args.norm_topk_prob}"
        )
