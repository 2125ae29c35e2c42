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

Evaluation, the demo and the Ollama Modelfile prompt with the non-thinking prompt (Ollama
switches to the thinking one when asked to think). Templates without a thinking mode ignore
``enable_thinking``, and render a think block in the data as text. A thinking family added
later brings its Ollama TEMPLATE (``export/``, detected by a probe rendered with
``NON_THINKING``) and, where its template switches thinking otherwise (gpt-oss's harmony
format takes ``reasoning_effort``), its own variables here.
"""

from __future__ import annotations

from typing import Any

from .errors import MlxMoeError

THINKING_MODES = ("off", "keep")
DEFAULT_THINKING = "off"
# The chat-template variables that ask for an answer without reasoning.
NON_THINKING = {"enable_thinking": False}
THINK_END = "</think>"


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


def has_reasoning(message: dict) -> bool:
    return bool(message.get("reasoning_content")) or THINK_END in message.get("content", "")


def for_training(messages: list[dict], mode: str) -> list[dict]:
    """The conversation as ``mode`` trains it: under ``off``, assistant turns lose their
    reasoning; under ``keep``, they are as given."""
    if check_thinking_mode(mode) == "keep":
        return messages
    return [without_reasoning(m) if m["role"] == "assistant" else m for m in messages]


def without_reasoning(message: dict) -> dict:
    kept = {k: v for k, v in message.items() if k != "reasoning_content"}
    kept["content"] = answer_text(message["content"])
    return kept


def non_thinking_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The prompt (text) that asks for the next assistant answer without reasoning: what
    evaluation, the demo's llama.cpp answer and the Modelfile's default prompt are."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False,
                                         **NON_THINKING)
