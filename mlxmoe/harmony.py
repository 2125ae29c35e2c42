"""gpt-oss's harmony format: what ``data.thinking`` and the non-thinking prompt mean for it.

gpt-oss's chat template writes every message as ``<|start|>ROLE<|message|>...<|end|>`` after a
system message of its own (model identity, knowledge cutoff, today's date, ``Reasoning:
medium`` unless ``reasoning_effort`` says otherwise); a conversation's system message becomes
the developer message (``# Instructions``). An assistant answers in channels: its reasoning in
``<|start|>assistant<|channel|>analysis<|message|>...<|end|>``, then its answer in
``<|start|>assistant<|channel|>final<|message|>...``, closed by ``<|return|>`` where training
renders the last answer and by ``<|end|>`` in the history. The template reads reasoning from a
message's ``thinking`` and writes it only for a final assistant message rendered for training;
history turns drop it.

The model always chooses its channel after the generation prompt, ``<|start|>assistant``, so
the template has no non-thinking prompt of its own. mlxmoe's is the generation prompt after an
empty analysis message, ``<|start|>assistant<|channel|>analysis<|message|><|end|>``: what the
template writes for a last answer whose ``thinking`` is empty, the harmony counterpart of
Qwen3's empty think block. It still ends with ``<|start|>assistant``, which Ollama's harmony
parser expects before a reply (it parses the channel header the model writes). So, by
``data.thinking``:

- ``off``: the last answer is trained after the empty analysis message (prompt, never trained):
  ``<|channel|>final<|message|>4.<|return|>``.
- ``keep``: a last answer given with reasoning is trained after the plain generation prompt,
  ``<|channel|>analysis<|message|>...<|end|>`` then
  ``<|start|>assistant<|channel|>final<|message|>4.<|return|>``; one without reasoning as under
  ``off``.

Earlier answers are trained as the template writes them: ``<|channel|>final<|message|>...``
without reasoning. The prompt's ``Reasoning:`` line is the template's default (medium) in both.
"""

from __future__ import annotations

from typing import Any

# What the template writes after the generation prompt for an answer without reasoning, up to
# the next generation prompt: the empty analysis message.
EMPTY_ANALYSIS = "<|channel|>analysis<|message|><|end|><|start|>assistant"
GENERATION_PROMPT = "<|start|>assistant"
FINAL_HEADER = "<|channel|>final<|message|>"
PROBE_USER = "<|start|>user<|message|>ping<|end|>"


def is_harmony(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes harmony (gpt-oss), seen in what it renders
    for one user message."""
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "ping"}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # jinja2 errors, raise_exception() in templates, no template at all
        return False
    return isinstance(text, str) and PROBE_USER in text and text.endswith(GENERATION_PROMPT)


def for_training(messages: list[dict], keep: bool, reasoning_of, answer_of) -> list[dict]:
    """The conversation for the template: earlier answers without reasoning (the template
    drops it; kept, it would make the conversation up to them render unlike the whole), the
    last answer with its reasoning as ``thinking`` under ``keep``, else with an empty one."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            out.append(message)
            continue
        kept = {k: v for k, v in message.items() if k not in ("reasoning_content", "thinking")}
        kept["content"] = answer_of(message["content"])
        if i == last and i == len(messages) - 1:
            kept["thinking"] = reasoning_of(message) if keep else ""
        out.append(kept)
    return out


def non_thinking(prompt: str) -> str:
    """The template's generation prompt turned into the one for an answer without reasoning."""
    if not prompt.endswith(GENERATION_PROMPT):
        raise ValueError(f"not a harmony generation prompt: ...{prompt[-40:]!r}")
    return prompt + EMPTY_ANALYSIS


def final_text(reply: str) -> str:
    """The answer in a harmony reply: the text of its final channel, without the channel header
    the model writes (the reply itself when it has none)."""
    if FINAL_HEADER in reply:
        reply = reply.rsplit(FINAL_HEADER, 1)[1]
    for end in ("<|return|>", "<|end|>"):
        reply = reply.split(end, 1)[0]
    return reply
