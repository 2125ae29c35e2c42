"""What a family module declares: its config mapping, its Hugging Face names, its GGUF arch."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from ..config import ConfigView, DecoderArgs
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

    def build(self, args: DecoderArgs) -> CausalLM:
        return build_decoder(args, self.name)

    @cached_property
    def hf_patterns(self) -> list[tuple[re.Pattern[str], str]]:
        out = []
        for role, names in self.hf_tensors.items():
            for name in (names,) if isinstance(names, str) else names:
                out.append((compile_pattern(name), role))
        return out

    def match_hf(self, name: str) -> tuple[str, int | None, int | None] | None:
        """HF tensor name -> (role, block index, expert index), or None if unknown."""
        for pattern, role in self.hf_patterns:
            m = pattern.match(name)
            if m:
                groups = {k: int(v) for k, v in m.groupdict().items() if v is not None}
                return role, groups.get("bid"), groups.get("xid")
        return None
