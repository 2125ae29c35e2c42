"""Thinking models: answers with and without reasoning, as their chat templates render them.

Qwen3's chat template has two generation prompts. ``<|im_start|>assistant\\n`` lets the model
think: it writes ``<think>\\n...\\n</think>\\n\\n`` before its answer. With ``enable_thinking``
false the template adds an empty think block, ``<think>\\n\\n</think>\\n\\n``, which marks an
answer without reasoning; a final assistant message without reasoning renders the same way.
Reasoning comes in a message's ``reasoning_content`` or as a think block that opens its
content (the template reads both); it is written only for assistant turns after the last
user message, so a conversation's earlier reasoning is dropped.

``data.thinking`` (``THINKING_MODES``) chooses what training makes of that:

- ``off``: reasoning in the data is dropped. Every answer is trained after the non-thinking
  prompt, which ends with the empty block: the block is prompt (never trained), the answer and
  its end-of-turn token are trained.
- ``keep``: an answer given with reasoning is trained after the thinking prompt, think block
  included; an answer without reasoning is trained as under ``off``.

Qwen3.5's template works the same way with the same variable; its thinking prompt opens the
think block itself (``<|im_start|>assistant\n<think>\n``), so a kept reasoning is trained from
its first line. gpt-oss's harmony template has no such variable: ``mlxmoe.harmony`` says how its
non-thinking prompt and ``data.thinking`` are made. Gemma-4's switch is one for the whole
conversation and its template never writes an answer after its non-thinking prompt:
``mlxmoe.gemma4`` says how training puts it there (``off``; ``keep`` is refused).

Evaluation, the demo and the Ollama Modelfile prompt with the non-thinking prompt (Ollama
switches to the thinking one when asked to think). Templates without a thinking mode ignore
``enable_thinking``, and render a think block in the data as text. Each thinking family brings
its Ollama TEMPLATE (``export/``, detected by probes rendered with and without ``NON_THINKING``).
"""

from __future__ import annotations

from typing import Any

from . import gemma4, harmony
from .errors import MlxMoeError

THINKING_MODES = ("off", "keep")
DEFAULT_THINKING = "off"
# The chat-template variables that ask for an answer without reasoning.
NON_THINKING = {"enable_thinking": False}
THINK_START, THINK_END = "<think>", "</think>"


def check_thinking_mode(mode: Any, error: type[Exception] = MlxMoeError) -> str:
    if mode not in THINKING_MODES:
        raise error(f"data.thinking must be one of {', '.join(THINKING_MODES)}, got {mode!r}")
    return mode


def answer_text(content: str) -> str:
    """``content`` without a think block that opens it (what follows the last ``</think>``,
    leading newlines removed, as Qwen3's template splits it)."""
    if THINK_END not in content:
        return content
    return content.split(THINK_END)[-1].lstrip("\n")


def reasoning_text(message: dict) -> str:
    """A message's reasoning: ``reasoning_content``, ``thinking`` (gpt-oss's and Ollama's name),
    or the think block opening its content, without the newlines around it."""
    for key in ("reasoning_content", "thinking"):
        if message.get(key):
            return message[key]
    content = message.get("content", "")
    if THINK_END not in content:
        return ""
    return content.split(THINK_END)[0].split(THINK_START)[-1].strip("\n")


def has_reasoning(message: dict) -> bool:
    return bool(reasoning_text(message))


def for_training(messages: list[dict], mode: str, harmony_format: bool = False) -> list[dict]:
    """The conversation as ``mode`` trains it: under ``off``, assistant turns lose their
    reasoning; under ``keep``, they are as given. In harmony (gpt-oss) the last answer carries
    its reasoning, or an empty one, as ``thinking`` (``harmony.for_training``)."""
    keep = check_thinking_mode(mode) == "keep"
    if harmony_format:
        return harmony.for_training(messages, keep, reasoning_text, answer_text)
    if keep:
        return messages
    return [without_reasoning(m) if m["role"] == "assistant" else m for m in messages]


def without_reasoning(message: dict) -> dict:
    kept = {k: v for k, v in message.items() if k != "reasoning_content"}
    kept["content"] = answer_text(message["content"])
    return kept


def render_chat(
    tokenizer: Any,
    messages: list[dict],
    generation_prompt: bool,
    thinking: bool,
    harmony_format: bool | None = None,
    **variables,
) -> str:
    """The chat template's text for ``messages``; with ``generation_prompt``, the prompt for an
    answer with reasoning allowed (``thinking``) or without it (``NON_THINKING``, or in harmony
    the empty analysis message). ``harmony_format`` None finds out (``harmony.is_harmony``)."""
    if harmony_format is None:
        harmony_format = harmony.is_harmony(tokenizer)
    if not harmony_format and gemma4.is_gemma4(tokenizer):
        return gemma4.render(tokenizer, messages, generation_prompt, thinking, **variables)
    if not thinking and not harmony_format:
        variables = {**variables, **NON_THINKING}
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **variables
    )
    if generation_prompt and not thinking and harmony_format:
        text = harmony.non_thinking(text)
    return text


def non_thinking_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt (text) that asks for the next assistant answer without reasoning: what
    evaluation, the demo's llama.cpp answer and the Modelfile's default prompt are."""
    return render_chat(tokenizer, messages, True, False)


def reply_answer(reply: str) -> str:
    """The answer in a reply to the non-thinking prompt: a harmony reply's final channel
    without its header (gpt-oss writes the header itself), any other reply as it is."""
    return harmony.final_text(reply) if harmony.FINAL_HEADER in reply else reply
