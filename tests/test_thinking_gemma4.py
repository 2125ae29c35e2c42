"""Gemma-4: what `data.thinking: off` trains, the non-thinking prompt of eval and the demo, and
the Modelfile's TEMPLATE (export/gemma4.gotmpl), against Gemma-4's official chat template:
llama.cpp's copy of Google's (models/templates/google-gemma-4-31B-it.jinja, one template for the
Gemma-4 instruct models, 26B-A4B among them), rendered by transformers' apply_chat_template with
enable_thinking. llama.cpp's own variant for interleaved thinking (-interleaved.jinja) differs
from it only with tools, which these chats have none of: it is checked to render them the same.

Its thinking switch is global: enable_thinking opens the conversation with a system turn that
starts with <|think|>, and leaves the generation prompt at <|turn>model; without it the prompt
ends with an empty thought channel. Answers in the history never carry their reasoning (the
template writes it only beside tool calls). The tokenizer is Qwen3's with Gemma-4's turn and
channel tokens; the texts are compared."""

from __future__ import annotations

import pytest
from assets import llama_cpp_template, qwen3_tokenizer_with
from chat_checks import before_last_answer, example, trained
from ollama_go import ollama_chat_values

from mlxmoe.data import DataError
from mlxmoe.gguf.ollama import chat_formats, default_system_prompt, detect_chat_format
from mlxmoe.thinking import non_thinking_prompt

pytestmark = pytest.mark.proof("templates")

OFFICIAL = "google-gemma-4-31B-it.jinja"
INTERLEAVED = "google-gemma-4-31B-it-interleaved.jinja"
GEMMA4_TOKENS = ("<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>")
EMPTY_THOUGHT = "<|channel>thought\n<channel|>"

QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ANSWER = {"role": "assistant", "content": "4."}
THINKING = {**ANSWER, "thinking": "Two and two make four."}


def tokenizer_with(tmp_path_factory, name: str):
    import transformers

    template = llama_cpp_template(name)
    if template is None:
        pytest.skip(f"llama.cpp's {name} is not unpacked at LLAMA_CPP_SRC")
    folder = tmp_path_factory.mktemp("gemma4")
    qwen3_tokenizer_with(folder, template, GEMMA4_TOKENS, eos_token="<turn|>")
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return tokenizer_with(tmp_path_factory, OFFICIAL)


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    return tokenizer_with(tmp_path_factory, INTERLEAVED)[1]


def test_detected_with_no_default_system_prompt(official):
    folder, _ = official
    assert detect_chat_format(folder) == "gemma4"
    assert default_system_prompt(folder) is None


# --- training and evaluation ----------------------------------------------------------------

REASONED = {**ANSWER, "reasoning_content": "Two and two make four."}
SECOND = {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."}
TRAINING = {
    "one answer, its reasoning dropped": ([QUESTION, REASONED], ["4.<turn|>"]),
    "multi-turn, system prompt": (
        [SYSTEM, QUESTION, REASONED, FOLLOW_UP, SECOND],
        ["4.<turn|>", "6.<turn|>"],
    ),
    "a think block in the content": (
        [QUESTION, {**ANSWER, "content": "<think>\nTwo and two.\n</think>\n\n4."}],
        ["4.<turn|>"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize(("messages", "expected"), TRAINING.values(), ids=TRAINING.keys())
def test_off_trains_the_last_answer_after_the_non_thinking_prompt_ollama_gives(
    messages, expected, tmp_path, official, go_program
):
    """The last answer follows the official non-thinking prompt for the conversation before it
    (earlier answers as its history writes them), which is the TEMPLATE's prompt with think
    false; earlier answers are trained after <|turn>model as the history writes them."""
    _, tokenizer = official
    ex = example(tmp_path, tokenizer, messages, "off")
    prompt = official_prompt(tokenizer, messages[:-1], False)
    assert tokenizer.decode(ex.tokens) == prompt + messages[-1]["content"].split("\n\n")[-1] + "<turn|>\n"
    assert trained(tokenizer, ex) == expected
    history = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages[:-1]]
    (ours,) = go_program(chat_formats()["gemma4"]["template"], [ollama_chat_values(history, None, False)])[
        "prompts"
    ]
    assert ours == prompt
    assert before_last_answer(ex) == tokenizer.encode(ours, add_special_tokens=False)


def test_keep_is_refused_with_one_clear_error(tmp_path, official):
    with pytest.raises(DataError, match="data.thinking keep is not supported for Gemma-4"):
        example(tmp_path, official[1], [QUESTION, REASONED], "keep")


def test_eval_and_the_demo_prompt_with_the_empty_thought_channel(official):
    _, tokenizer = official
    assert non_thinking_prompt(tokenizer, [QUESTION]) == official_prompt(tokenizer, [QUESTION], False)
    assert non_thinking_prompt(tokenizer, [QUESTION]).endswith(f"<|turn>model\n{EMPTY_THOUGHT}")


# --- Ollama: the TEMPLATE -------------------------------------------------------------------

CONVERSATIONS = {
    "one turn": [QUESTION],
    "multi-turn, earlier reasoning dropped": [QUESTION, THINKING, FOLLOW_UP],
    "system prompt": [SYSTEM, QUESTION, THINKING, FOLLOW_UP],
    "a later system message": [SYSTEM, QUESTION, ANSWER, {**SYSTEM, "content": "Now in French."}, FOLLOW_UP],
    # Inner whitespace only: the template trims a message's, text/template cannot.
    "quotes, newlines, template syntax": [
        {"role": "user", "content": 'Quote "{{ .Prompt }}" and\n  keep\tthese spaces.'}
    ],
    "a started answer to continue": [QUESTION, {"role": "assistant", "content": "The two"}],
    "a started answer after reasoning": [QUESTION, {**THINKING, "content": "The two"}],
}


def official_prompt(tokenizer, messages: list[dict], think) -> str:
    """apply_chat_template's prompt: Ollama's ``thinking`` is the template's reasoning_content;
    think unset leaves enable_thinking undefined, as a plain apply_chat_template does."""
    hf = [{("reasoning_content" if k == "thinking" else k): v for k, v in m.items()} for m in messages]
    started = messages[-1]["role"] == "assistant"
    switch = {} if think is None else {"enable_thinking": think}
    return tokenizer.apply_chat_template(
        hf, tokenize=False, add_generation_prompt=not started, continue_final_message=started, **switch
    )


@pytest.mark.slow
@pytest.mark.parametrize("think", [None, False, True], ids=["think unset", "think false", "think true"])
def test_template_renders_what_gemma4s_template_renders(think, official, interleaved, go_program):
    _, tokenizer = official
    cases = [ollama_chat_values(c, None, think) for c in CONVERSATIONS.values()]
    ours = go_program(chat_formats()["gemma4"]["template"], cases)["prompts"]
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        expected = official_prompt(tokenizer, messages, think)
        assert prompt == expected, case
        assert official_prompt(interleaved, messages, think) == expected, case
    if think:
        assert (
            ours[0] == "<|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n"
        )
    else:
        assert ours[0] == f"<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n{EMPTY_THOUGHT}"


@pytest.mark.slow
def test_a_modelfile_system_prompt_opens_the_system_turn(official, go_program):
    _, tokenizer = official
    cases = [ollama_chat_values([QUESTION], SYSTEM["content"], think) for think in (False, True)]
    ours = go_program(chat_formats()["gemma4"]["template"], cases)["prompts"]
    assert ours == [official_prompt(tokenizer, [SYSTEM, QUESTION], think) for think in (False, True)]
    assert ours[1].startswith("<|turn>system\n<|think|>\nAnswer in one word.<turn|>\n")


@pytest.mark.slow
def test_ollama_finds_gemma4s_thought_channel_as_its_think_tags(go_program):
    """Ollama lets the model think only with think tags inferred from the TEMPLATE, and parses
    the reply between them (<|channel>thought ... <channel|>, what Gemma-4 writes) as thinking."""
    tags = go_program(chat_formats()["gemma4"]["template"], [])["think_tags"]
    assert tags == ["<|channel>thought", "<channel|>"]
