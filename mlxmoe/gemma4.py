"""Gemma-4's chat format: what ``data.thinking`` and the non-thinking prompt mean for it.

Gemma-4's chat template writes turns as ``<|turn>ROLE\\n...<turn|>\\n`` (``model`` for the
assistant). Its thinking switch, ``enable_thinking``, is one for the whole conversation: on, a
system turn opening with ``<|think|>`` comes first and the generation prompt is
``<|turn>model\\n``, after which the model writes its reasoning in a thought channel,
``<|channel>thought\\n...<channel|>``, then its answer; off (the default), the generation prompt
ends with an empty thought channel, ``<|turn>model\\n<|channel>thought\\n<channel|>``: the
non-thinking prompt. Answers in the history never carry a thought channel (the template writes
reasoning only beside tool calls, and cuts a thought channel out of an answer's content).

So the template never writes an answer after the non-thinking prompt: a conversation that ends
with an answer renders it right after ``<|turn>model\\n``. Training under ``data.thinking: off``
puts the empty thought channel there (``training_text``), so that the last answer is trained
after the prompt that evaluation, the demo and Ollama (``export/gemma4.gotmpl``) give it; earlier
answers are trained as the history writes them, after ``<|turn>model\\n`` (``plain_prompt``).
``keep`` would render the whole conversation with ``<|think|>`` and is not supported yet.
"""

from __future__ import annotations

from typing import Any

from .errors import MlxMoeError

MODEL_TURN = "<|turn>model\n"
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"
PROBE_USER = "<|turn>user\nping<turn|>\n"
# Whether a chat template is Gemma-4's, by template text: a tokenizer is asked once per template.
_known: dict[str, bool] = {}


def is_gemma4(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes Gemma-4's turns and non-thinking prompt, seen
    in what it renders for one user message."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    if template not in _known:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "ping"}],
                tokenize=False,
                add_generation_prompt=True,
                enable_thinking=False,
            )
        except Exception:  # jinja2 errors, raise_exception() in templates
            text = None
        _known[template] = (
            isinstance(text, str) and PROBE_USER in text and text.endswith(MODEL_TURN + EMPTY_THOUGHT)
        )
    return _known[template]


def training_text(text: str) -> str:
    """The template's text of a conversation that ends with an answer, that answer after the
    empty thought channel: the non-thinking prompt followed by the answer."""
    head, turn, answer = text.rpartition(MODEL_TURN)
    if not turn:
        raise ValueError(f"no Gemma-4 model turn in ...{text[-60:]!r}")
    return head + MODEL_TURN + EMPTY_THOUGHT + answer


def plain_prompt(prompt: str) -> str:
    """The non-thinking generation prompt without its empty thought channel: what an earlier
    answer in the history follows."""
    if not prompt.endswith(MODEL_TURN + EMPTY_THOUGHT):
        raise ValueError(f"not Gemma-4's non-thinking prompt: ...{prompt[-60:]!r}")
    return prompt.removesuffix(EMPTY_THOUGHT)


def render(tokenizer: Any, messages: list[dict], generation_prompt: bool, thinking: bool, **variables) -> str:
    """``thinking.render_chat`` for Gemma-4 under ``data.thinking: off``: the non-thinking prompt,
    or with ``thinking`` the plain one earlier answers follow; a conversation that ends with an
    answer has it after the empty thought channel."""
    if thinking and not generation_prompt:
        raise MlxMoeError(
            "data.thinking keep is not supported for Gemma-4: its thinking switch is one for the "
            "whole conversation (use data.thinking: off)"
        )
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, enable_thinking=False, **variables
    )
    if generation_prompt:
        return plain_prompt(text) if thinking else text
    return training_text(text) if messages and messages[-1]["role"] == "assistant" else text
