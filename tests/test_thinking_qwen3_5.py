"""Qwen3.5-MoE: `data.thinking`, the non-thinking prompt and the Modelfile's TEMPLATE against
Qwen3.5's real chat template (llama.cpp's copy, models/templates/Qwen3.5-4B.jinja: one template
for the Qwen3.5 family) rendered by transformers' apply_chat_template with enable_thinking.
It renders like Qwen3's but for its thinking prompt, which opens the think block
(``<|im_start|>assistant\\n<think>\\n``), and a think block, empty without reasoning, on every
answer after the last user message; so it has a TEMPLATE of its own (export/qwen3_5.gotmpl).
The tokenizer is Qwen3's, which has every token the template writes."""

from __future__ import annotations

import pytest
from assets import llama_cpp_template, qwen3_tokenizer_with
from chat_checks import before_last_answer, example, trained
from ollama_go import ollama_chat_values

from mlxmoe.gguf.ollama import chat_formats, default_system_prompt, detect_chat_format
from mlxmoe.thinking import non_thinking_prompt

pytestmark = pytest.mark.proof("templates")

QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ANSWER = {"role": "assistant", "content": "4."}
REASONED = {**ANSWER, "reasoning_content": "Two and two make four."}
SECOND = {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."}


@pytest.fixture(scope="module")
def qwen3_5_chat_folder(tmp_path_factory):
    template = llama_cpp_template("Qwen3.5-4B.jinja")
    if template is None:
        pytest.skip("llama.cpp's Qwen3.5 chat template is not unpacked at LLAMA_CPP_SRC")
    folder = tmp_path_factory.mktemp("qwen3_5")
    qwen3_tokenizer_with(folder, template)
    return folder


@pytest.fixture(scope="module")
def qwen3_5(qwen3_5_chat_folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(qwen3_5_chat_folder)


@pytest.fixture(scope="module")
def go_render_qwen3_5(go_program):
    template = chat_formats()["qwen3_5"]["template"]
    return lambda cases: go_program(template, cases)["prompts"]


def test_detected_apart_from_qwen3_by_its_thinking_prompt(qwen3_5_chat_folder):
    assert detect_chat_format(qwen3_5_chat_folder) == "qwen3_5"
    assert default_system_prompt(qwen3_5_chat_folder) is None


# --- training -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "messages", "expected"),
    [
        ("off", [QUESTION, REASONED], ["4.<|im_end|>"]),
        ("off", [SYSTEM, QUESTION, REASONED, FOLLOW_UP, SECOND], ["4.<|im_end|>", "6.<|im_end|>"]),
        ("keep", [QUESTION, ANSWER], ["4.<|im_end|>"]),
        # The thinking prompt opens the think block: the reasoning is trained from its first line.
        ("keep", [QUESTION, REASONED], ["Two and two make four.\n</think>\n\n4.<|im_end|>"]),
        (
            "keep",
            [QUESTION, REASONED, FOLLOW_UP, SECOND],
            ["4.<|im_end|>", "Three and three.\n</think>\n\n6.<|im_end|>"],
        ),
    ],
    ids=[
        "off",
        "off, multi-turn, system prompt",
        "keep, no reasoning",
        "keep, reasoning",
        "keep, multi-turn",
    ],
)
def test_training_renders_qwen3_5s_template_and_trains_after_its_prompts(
    mode, messages, expected, tmp_path, qwen3_5
):
    ex = example(tmp_path, qwen3_5, messages, mode)
    kept = [
        m if mode == "keep" else {k: v for k, v in m.items() if k != "reasoning_content"} for m in messages
    ]
    assert qwen3_5.decode(ex.tokens) == qwen3_5.apply_chat_template(kept, tokenize=False)
    assert trained(qwen3_5, ex) == expected
    reasoned = mode == "keep" and "reasoning_content" in messages[-1]
    prompt = qwen3_5.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=reasoned
    )
    assert before_last_answer(ex) == qwen3_5.encode(prompt, add_special_tokens=False)


def test_eval_and_the_demo_prompt_with_the_empty_think_block(qwen3_5):
    assert non_thinking_prompt(qwen3_5, [QUESTION]).endswith(
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


# --- Ollama: the TEMPLATE -------------------------------------------------------------------

THINKING = {**ANSWER, "thinking": "Two and two make four."}
CONVERSATIONS = {
    "one turn": [QUESTION],
    "multi-turn, earlier reasoning": [QUESTION, THINKING, FOLLOW_UP],
    "system prompt": [SYSTEM, QUESTION, THINKING, FOLLOW_UP],
    # Inner whitespace only: the template trims a message's, text/template cannot.
    "quotes, newlines, template syntax": [
        {"role": "user", "content": 'Quote "{{ .Prompt }}" and\n  keep\tthese spaces.'}
    ],
    "a started answer to continue": [QUESTION, {"role": "assistant", "content": "The two"}],
    "a started answer after reasoning": [QUESTION, {**THINKING, "content": "The two"}],
}


@pytest.mark.slow
@pytest.mark.parametrize("think", [None, False, True], ids=["think unset", "think false", "think true"])
def test_template_renders_what_qwen3_5s_template_renders_with_enable_thinking(
    think, qwen3_5, go_render_qwen3_5
):
    ours = go_render_qwen3_5([ollama_chat_values(c, None, think) for c in CONVERSATIONS.values()])
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        started = messages[-1]["role"] == "assistant"
        hf = [{("reasoning_content" if k == "thinking" else k): v for k, v in m.items()} for m in messages]
        expected = qwen3_5.apply_chat_template(
            hf,
            tokenize=False,
            add_generation_prompt=not started,
            continue_final_message=started,
            enable_thinking=think is True,
        )
        assert prompt == expected, case
    # Ollama's parser starts in the reply's thinking when the prompt ends with the opening tag.
    opened = "<|im_start|>assistant\n<think>\n"
    assert ours[0].endswith(opened + ("" if think else "\n</think>\n\n"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "messages", "think"),
    [
        ("off", [QUESTION, REASONED], None),
        ("off", [SYSTEM, QUESTION, REASONED, FOLLOW_UP, SECOND], False),
        ("keep", [QUESTION, REASONED], True),
        ("keep", [QUESTION, REASONED, FOLLOW_UP, SECOND], True),
    ],
    ids=["off", "off, multi-turn", "keep, reasoning", "keep, multi-turn reasoning"],
)
def test_the_tokens_trained_before_a_qwen3_5_answer_are_the_modelfile_prompt(
    mode, messages, think, tmp_path, qwen3_5, go_render_qwen3_5
):
    ex = example(tmp_path, qwen3_5, messages, mode)
    history = [
        {("thinking" if k == "reasoning_content" else k): v for k, v in m.items()} for m in messages[:-1]
    ]
    (prompt,) = go_render_qwen3_5([ollama_chat_values(history, None, think)])
    assert qwen3_5.encode(prompt, add_special_tokens=False) == before_last_answer(ex)
