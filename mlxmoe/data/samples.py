"""Training data, the tokenizing side: JSONL samples -> token ids with a loss mask.

What runs where a tokenizer is loaded: the tokenizing child (``tokenize_worker``) and
evaluation. The trainer's side, examples -> padded batches, is ``batches``.

One JSON object per line, in one of three formats:

- ``{"text": ...}``: every token is trained.
- ``{"prompt": ..., "completion": ...}``: with a chat template, a user turn and an assistant
  turn; without one, plain concatenation.
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (optional ``"tools"``): rendered by
  the tokenizer's chat template.

Where the answer starts and ends is found on token ids, never on decoded text: the whole
sample is rendered and tokenized once, then each prefix the template can produce on its own
(the conversation up to an assistant message plus the generation prompt; the conversation
through that message) is rendered and tokenized too, and the boundary is the length of the
longest common prefix of the two id sequences. A BPE merge across a boundary therefore moves
the boundary left by a token (that token is trained), never into the answer. An assistant turn
is trained through the first end-of-turn token after its start (EOS, or the special token the
template closes assistant turns with, e.g. ``<|im_end|>``), so the model learns to stop;
whatever the template writes after that (a newline) is not. Some templates render the last
assistant turn differently from earlier ones (Qwen3 adds an empty ``<think>`` block); the
end-of-turn token, not the prefix, then bounds the earlier turns.

Reasoning (``thinking``): an answer without reasoning is located with the non-thinking
generation prompt where the template renders it so (Qwen3's empty think block is then prompt,
not answer), else with the plain one; an answer with reasoning (kept by ``thinking="keep"``,
dropped by ``"off"``) with the plain one, so its think block is trained (``mlxmoe.thinking``;
gpt-oss's harmony format: ``mlxmoe.harmony``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MlxMoeError
from ..harmony import is_harmony
from ..thinking import (
    DEFAULT_THINKING,
    check_thinking_mode,
    for_training,
    has_reasoning,
    render_chat,
)

SAMPLE_KINDS = {
    "text": ("text",),
    "prompt/completion": ("prompt", "completion"),
    "messages": ("messages",),
}
FORMATS = '"text", "prompt" and "completion", or "messages"'
# Prompt tokens a BPE merge across the prompt/answer boundary may re-tokenize.
MERGE_SLACK = 2


class DataError(MlxMoeError):
    """A training file that cannot be used as it is (named with its line)."""


@dataclass(frozen=True, eq=False)
class Example:
    tokens: np.ndarray  # int32 [n], after truncation
    loss_mask: np.ndarray  # bool [n]: True where the token is one the model must predict


@dataclass(eq=False)
class Dataset:
    examples: list[Example]
    source: Path
    truncated: int  # kept samples cut to max_seq_len
    dropped: int  # samples with no trainable token (after truncation), left out

    @property
    def num_tokens(self) -> int:
        return sum(len(e.tokens) for e in self.examples)

    @property
    def num_target_tokens(self) -> int:
        return sum(int(e.loss_mask[1:].sum()) for e in self.examples)


@dataclass(frozen=True, eq=False)
class EncodedSample:
    """One sample rendered whole, and its example: the first ``max_seq_len`` tokens."""

    tokens: np.ndarray  # int64 [n], the whole rendering
    loss_mask: np.ndarray  # bool [n]
    example: Example

    @property
    def truncated(self) -> bool:
        return len(self.tokens) > len(self.example.tokens)

    @property
    def target_tokens(self) -> int:
        """Tokens the example trains (0: the sample is dropped); position 0 is never a target."""
        return int(self.example.loss_mask[1:].sum())


def encode_sample(
    encoder: SampleEncoder, sample: dict, where: str, max_seq_len: int, mask_prompt: bool = True
) -> EncodedSample:
    """One validated sample (``read_samples``) as training and evaluation see it;
    ``mask_prompt`` False trains every token."""
    tokens, mask = encoder.encode(sample, where)
    if not mask_prompt:
        mask = np.ones_like(mask)
    example = Example(tokens[:max_seq_len].astype(np.int32), mask[:max_seq_len])
    return EncodedSample(tokens, mask, example)


def load_dataset(
    path: str | Path,
    tokenizer: Any,
    max_seq_len: int,
    mask_prompt: bool = True,
    thinking: str = DEFAULT_THINKING,
) -> Dataset:
    """Tokenize a JSONL file. ``tokenizer`` is mlx-lm's TokenizerWrapper or a Hugging Face
    tokenizer; ``thinking`` is ``data.thinking`` (``mlxmoe.thinking.THINKING_MODES``). Raises
    DataError naming the file and line of the first bad sample."""
    if max_seq_len < 2:
        raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
    path = Path(path)
    encoder = SampleEncoder(tokenizer, thinking)
    examples, truncated, dropped, seen = [], 0, 0, 0
    for where, sample in read_samples(path):
        seen += 1
        encoded = encode_sample(encoder, sample, where, max_seq_len, mask_prompt)
        if not encoded.target_tokens:
            dropped += 1
            continue
        truncated += int(encoded.truncated)
        examples.append(encoded.example)
    if seen == 0:
        raise DataError(f"{path}: no samples (the file is empty)")
    if not examples:
        raise DataError(
            f"{path}: all {seen} samples were dropped: none has a trainable token "
            f"within max_seq_len={max_seq_len}"
        )
    return Dataset(examples, path, truncated, dropped)


def read_samples(path: Path) -> Iterator[tuple[str, dict]]:
    """(``file:line``, validated sample) for each non-blank line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from exc
    for lineno, line in enumerate(raw.splitlines(), 1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            at = exc.start + len(line) - len(exc.object)  # utf-8-sig decodes past a BOM
            raise DataError(
                f"{where}: not UTF-8 text (byte 0x{line[at]:02x}, byte {at + 1} of "
                "the line); save the file as UTF-8"
            ) from exc
        if not text.strip():
            continue
        try:
            sample = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno})") from exc
        yield where, _validate(sample, where)


def _validate(sample: Any, where: str) -> dict:
    if not isinstance(sample, dict):
        raise DataError(f"{where}: expected a JSON object, got {_json_type(sample)}")
    kinds = [kind for kind, keys in SAMPLE_KINDS.items() if any(key in sample for key in keys)]
    if not kinds:
        found = ", ".join(f'"{k}"' for k in sample) or "none"
        raise DataError(f"{where}: expected {FORMATS} (keys found: {found})")
    if len(kinds) > 1:
        raise DataError(f"{where}: mixes formats ({' and '.join(kinds)}); use one per line")
    if kinds[0] == "text":
        _expect_str(sample, "text", where)
    elif kinds[0] == "prompt/completion":
        for key in ("prompt", "completion"):
            if key not in sample:
                raise DataError(f'{where}: missing "{key}"')
            _expect_str(sample, key, where)
    else:
        messages = sample["messages"]
        if not isinstance(messages, list):
            raise DataError(f'{where}: "messages" must be an array, got {_json_type(messages)}')
        if not messages:
            raise DataError(f'{where}: "messages" is empty')
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise DataError(f"{where}: messages[{i}] must be an object, got {_json_type(message)}")
            for key in ("role", "content"):
                if key not in message:
                    raise DataError(f'{where}: messages[{i}] has no "{key}"')
                _expect_str(message, key, f"{where}: messages[{i}]", sep="")
            if message.get("reasoning_content") is not None:
                _expect_str(message, "reasoning_content", f"{where}: messages[{i}]", sep="")
        if "tools" in sample and not isinstance(sample["tools"], list):
            raise DataError(f'{where}: "tools" must be an array, got {_json_type(sample["tools"])}')
    return sample


def _expect_str(obj: dict, key: str, where: str, sep: str = ":") -> None:
    if not isinstance(obj[key], str):
        raise DataError(f'{where}{sep} "{key}" must be a string, got {_json_type(obj[key])}')


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    return "null" if value is None else names.get(type(value), "a number")


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class SampleEncoder:
    """Turns one validated sample into (token ids, loss mask) with one tokenizer; built once
    per file (it probes the chat template)."""

    def __init__(self, tokenizer: Any, thinking: str = DEFAULT_THINKING):
        self.thinking = check_thinking_mode(thinking, DataError)
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id
        probe = list(tokenizer.encode("a"))
        self.adds_bos = self.bos is not None and bool(probe) and probe[0] == self.bos
        has = getattr(tokenizer, "has_chat_template", None)  # TokenizerWrapper's flag
        self.has_template = bool(has) if has is not None else tokenizer.chat_template is not None
        eos_ids = getattr(tokenizer, "eos_token_ids", None)  # a set in mlx-lm, an int in HF
        eos_ids = [eos_ids] if isinstance(eos_ids, int) else list(eos_ids or ())
        self.turn_end = {int(i) for i in [*eos_ids, self.eos] if i is not None}
        self.generation_prompt = np.zeros(0, np.int64)
        self.harmony = self.has_template and is_harmony(tokenizer)
        if self.has_template:
            self._probe_template()

    def encode(self, sample: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
        if "text" in sample:
            tokens = self._with_eos(self._ids(sample["text"], special=True))
            return tokens, np.ones(len(tokens), bool)
        if "messages" in sample:
            return self._encode_chat(sample["messages"], sample.get("tools"), where)
        prompt, completion = sample["prompt"], sample["completion"]
        if self.has_template:
            turns = [
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": completion},
            ]
            return self._encode_chat(turns, None, where)
        tokens = self._with_eos(self._ids(prompt + completion, special=True))
        mask = np.zeros(len(tokens), bool)
        mask[_common_prefix(tokens, self._ids(prompt, special=True)) :] = True
        return tokens, mask

    def _encode_chat(self, messages: list[dict], tools, where: str):
        if not self.has_template:
            raise DataError(f'{where}: "messages" needs a tokenizer with a chat template')
        messages = for_training(messages, self.thinking, self.harmony)
        tokens = self._render(messages, tools, False, where)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = self._answer_start(tokens, messages, i, tools, where)
            end = self._turn_end(tokens, start, messages, i, tools, where)
            spans.append((start, end))
        if spans and messages[-1]["role"] == "assistant" and spans[-1][1] == len(tokens):
            if self.eos is not None and tokens[-1] not in self.turn_end:
                tokens = np.append(tokens, self.eos)
                spans[-1] = (spans[-1][0], len(tokens))
        mask = np.zeros(len(tokens), bool)
        for start, end in spans:
            mask[start:end] = True
        return tokens, mask

    def _answer_start(self, tokens, messages, i: int, tools, where: str) -> int:
        """Where assistant messages[i] starts: after the generation prompt (non-thinking for an
        answer without reasoning, where the template renders the answer so) that the whole
        conversation's rendering continues."""
        if i == 0:  # an opening answer: best effort
            return _common_prefix(tokens, self._opening(tools))
        for allow_thinking in [True] if has_reasoning(messages[i]) else [False, True]:
            prefix = self._render(messages[:i], tools, True, where, allow_thinking)
            start = _common_prefix(tokens, prefix)
            if len(prefix) - start <= MERGE_SLACK:
                return start
        raise DataError(
            f"{where}: the chat template renders the conversation before messages[{i}] "
            "differently from the whole conversation, so its answer cannot be located; "
            "use mask_prompt=False or fix the template"
        )

    def _turn_end(self, tokens, start: int, messages, i: int, tools, where: str) -> int:
        """One past the token that closes assistant messages[i], which starts at ``start``."""
        if i == len(messages) - 1:
            through, consistent = len(tokens), True
        else:
            rendered = self._render(messages[: i + 1], tools, False, where)
            through = _common_prefix(tokens, rendered)
            consistent = len(rendered) - through <= MERGE_SLACK
        closers = start + np.flatnonzero(np.isin(tokens[start:], list(self.turn_end)))
        if consistent:  # the conversation through messages[i] renders as a prefix of the whole
            return int(closers[0]) + 1 if len(closers) and closers[0] < through else through
        if len(closers):  # e.g. Qwen3 renders a final assistant turn with a <think> block
            return int(closers[0]) + 1
        raise DataError(f"{where}: cannot find where messages[{i}] ends in the chat template's output")

    def _render(
        self, messages, tools, generation_prompt: bool, where: str, allow_thinking: bool | None = None
    ) -> np.ndarray:
        """The conversation's ids; ``allow_thinking`` False renders the non-thinking generation
        prompt, None the ``thinking`` mode's rendering (non-thinking under ``off``)."""
        if allow_thinking is None:
            allow_thinking = self.thinking == "keep"
        extra = {"tools": tools} if tools is not None else {}
        try:
            text = render_chat(self.tok, messages, generation_prompt, allow_thinking, self.harmony, **extra)
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            raise DataError(f"{where}: the chat template refused this conversation: {exc}") from exc
        ids = self._ids(text, special=False)
        if self.adds_bos and (len(ids) == 0 or ids[0] != self.bos):
            ids = np.insert(ids, 0, self.bos)  # templates that do not write BOS themselves
        return ids

    def _ids(self, text: str, special: bool) -> np.ndarray:
        ids = np.asarray(self.tok.encode(text, add_special_tokens=special), dtype=np.int64)
        if special and self.adds_bos and len(ids) > 1 and ids[0] == ids[1] == self.bos:
            ids = ids[1:]  # the text began with the BOS string itself
        return ids

    def _opening(self, tools) -> np.ndarray:
        """What precedes an assistant message that opens the conversation."""
        try:
            return self._render([], tools, True, "")
        except DataError:  # templates that index messages[0]
            bos = [self.bos] if self.adds_bos else []
            return np.concatenate([np.asarray(bos, np.int64), self.generation_prompt])

    def _with_eos(self, ids: np.ndarray) -> np.ndarray:
        if self.eos is not None and (len(ids) == 0 or ids[-1] != self.eos):
            ids = np.append(ids, self.eos)
        return ids

    def _probe_template(self) -> None:
        """Learn from a two-turn conversation what the template writes around an answer: the
        generation prompt, and the last special token after the answer (``<|im_end|>``,
        ``</s>``, ``<|eot_id|>``), which ends a turn even where it is not the tokenizer's EOS."""
        user = [{"role": "user", "content": "Hi"}]
        try:
            asked = self._render(user, None, False, "")
            prompted = self._render(user, None, True, "")
            whole = self._render([*user, {"role": "assistant", "content": "Hello"}], None, False, "")
        except DataError:
            return
        self.generation_prompt = prompted[_common_prefix(prompted, asked) :]
        decoder = getattr(self.tok, "added_tokens_decoder", None) or {}
        special = {i for i, t in decoder.items() if getattr(t, "special", False)}
        special |= set(getattr(self.tok, "all_special_ids", None) or ())
        closers = [int(t) for t in whole[_common_prefix(whole, prompted) :] if int(t) in special]
        self.turn_end |= set(closers[-1:])
