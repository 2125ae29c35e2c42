"""gpt-oss (harmony): what `data.thinking` trains, the non-thinking prompt of eval and the demo,
and the Modelfile's TEMPLATE, each checked against gpt-oss's official chat template (llama.cpp's
copy, models/templates/openai-gpt-oss-120b.jinja) and OpenAI's reference harmony renderer
(openai-harmony on o200k, rebuilt offline from quicktok-v1's vocabulary). The texts are
compared; the tokenizer is Qwen3's with harmony's special tokens (no package ships gpt-oss's).

The one place the two references differ: the official template ends the developer message (a
conversation's system prompt) with a blank line, openai-harmony does not. Training renders the
model's own template, so the TEMPLATE follows the official one there."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
from assets import (
    HARMONY_TOKENS,
    llama_cpp_template,
    o200k_encodings_folder,
    qwen3_tokenizer_with,
)
from chat_checks import before_last_answer, example, trained
from ollama_go import CURRENT_DATE, frozen_today, ollama_chat_values

from mlxmoe.gguf.ollama import chat_formats, default_system_prompt, detect_chat_format
from mlxmoe.thinking import non_thinking_prompt

pytestmark = pytest.mark.proof("templates")

QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ANSWER = {"role": "assistant", "content": "4."}
REASONED = {**ANSWER, "reasoning_content": "Two and two make four."}
SECOND = {"role": "assistant", "content": "6.", "reasoning_content": "Three and three."}
EMPTY_ANALYSIS = "<|start|>assistant<|channel|>analysis<|message|><|end|>"


@pytest.fixture(autouse=True)
def today(monkeypatch):
    frozen_today(monkeypatch)


@pytest.fixture(scope="module")
def gpt_oss_chat_folder(tmp_path_factory):
    template = llama_cpp_template("openai-gpt-oss-120b.jinja")
    if template is None:
        pytest.skip("llama.cpp's gpt-oss chat template is not unpacked at LLAMA_CPP_SRC")
    folder = tmp_path_factory.mktemp("gpt-oss")
    qwen3_tokenizer_with(folder, template, HARMONY_TOKENS, eos_token="<|return|>")
    return folder


@pytest.fixture(scope="module")
def gpt_oss(gpt_oss_chat_folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gpt_oss_chat_folder)


@pytest.fixture(scope="module")
def harmony(tmp_path_factory):
    """render(messages, effort, empty_analysis) -> openai-harmony's completion prompt;
    answer(thinking, content) -> its training rendering of a last answer."""
    oh = pytest.importorskip("openai_harmony")
    encodings = o200k_encodings_folder(tmp_path_factory.mktemp("o200k"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TIKTOKEN_ENCODINGS_BASE", str(encodings))
        env.setenv("TIKTOKEN_RS_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken")))
        encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
    keep_analysis = oh.RenderConversationConfig(auto_drop_analysis=False)

    def assistant(text, channel):
        return oh.Message.from_role_and_content(oh.Role.ASSISTANT, text).with_channel(channel)

    def render(messages, effort="medium", empty_analysis=False):
        system = (
            oh.SystemContent.new()
            .with_conversation_start_date(CURRENT_DATE)
            .with_reasoning_effort(oh.ReasoningEffort(effort.capitalize()))
        )
        conversation = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
        if messages[0]["role"] == "system":
            instructions = oh.DeveloperContent.new().with_instructions(messages[0]["content"])
            conversation.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, instructions))
            messages = messages[1:]
        for m in messages:
            if m["role"] == "user":
                conversation.append(oh.Message.from_role_and_content(oh.Role.USER, m["content"]))
                continue
            if m.get("thinking") or m.get("reasoning_content"):
                conversation.append(assistant(m.get("thinking") or m["reasoning_content"], "analysis"))
            conversation.append(assistant(m["content"], "final"))
        # Harmony drops the analysis of answers before the last final one, as the template does.
        text = encoding.decode_utf8(
            encoding.render_conversation_for_completion(
                oh.Conversation.from_messages(conversation), oh.Role.ASSISTANT
            )
        )
        if empty_analysis:  # one more message, then the generation prompt again
            empty = encoding.decode_utf8(encoding.render(assistant("", "analysis")))
            text = text.removesuffix("<|start|>assistant") + empty + "<|start|>assistant"
        return text

    def answer(thinking, content):
        messages = [assistant(thinking, "analysis")] if thinking is not None else []
        tokens = encoding.render_conversation_for_training(
            oh.Conversation.from_messages([*messages, assistant(content, "final")]), keep_analysis
        )
        return encoding.decode_utf8(tokens)

    return render, answer


@pytest.fixture(scope="module")
def go_render_gpt_oss(go_program):
    template = chat_formats()["gpt-oss"]["template"]
    return lambda cases: go_program(template, cases)["prompts"]


def developer_blank_line(text: str) -> str:
    """openai-harmony's text with the blank line the official template ends instructions with."""
    return text.replace(SYSTEM["content"] + "<|end|>", SYSTEM["content"] + "\n\n<|end|>", 1)


# --- training: data.thinking in harmony ------------------------------------------------------

TRAINING = {
    "off": ("off", [QUESTION, ANSWER], None),
    "off, reasoning in the data dropped": ("off", [QUESTION, REASONED], None),
    "off, multi-turn, system prompt": ("off", [SYSTEM, QUESTION, REASONED, FOLLOW_UP, SECOND], None),
    "keep, reasoning_content": ("keep", [QUESTION, REASONED], "Two and two make four."),
    "keep, think block": (
        "keep",
        [QUESTION, {**ANSWER, "content": "<think>\nTwo and two make four.\n</think>\n\n4."}],
        "Two and two make four.",
    ),
    "keep, no reasoning": ("keep", [QUESTION, ANSWER], None),
    "keep, multi-turn": ("keep", [QUESTION, REASONED, FOLLOW_UP, SECOND], "Three and three."),
}


@pytest.mark.parametrize(("mode", "messages", "reasoning"), TRAINING.values(), ids=TRAINING.keys())
def test_training_renders_harmony_and_trains_the_final_answer_after_the_prompt(
    mode, messages, reasoning, tmp_path, gpt_oss, harmony
):
    """The prompt before the last answer is harmony's completion prompt for the conversation so
    far (its analysis dropped), after an empty analysis message unless reasoning is trained;
    the last answer is harmony's training rendering of it, ending with <|return|>."""
    render, answer = harmony
    ex = example(tmp_path, gpt_oss, messages, mode)
    history = messages[:-1]
    prompt = render(history, empty_analysis=reasoning is None)
    last = answer(reasoning, messages[-1]["content"].split("</think>\n\n")[-1])
    expected = prompt.removesuffix("<|start|>assistant") + last
    if history[0]["role"] == "system":
        prompt, expected = developer_blank_line(prompt), developer_blank_line(expected)
    assert gpt_oss.decode(ex.tokens) == expected
    assert gpt_oss.decode(before_last_answer(ex)) == prompt
    assert trained(gpt_oss, ex)[-1] == expected[len(prompt) :]
    # Earlier answers: the final channel as the history writes it, reasoning dropped.
    assert trained(gpt_oss, ex)[:-1] == ["<|channel|>final<|message|>4."] * (len(history) > 2)


def test_off_renders_the_empty_analysis_the_official_template_writes_for_empty_thinking(tmp_path, gpt_oss):
    ex = example(tmp_path, gpt_oss, [QUESTION, REASONED], "off")
    official = gpt_oss.apply_chat_template([QUESTION, {**ANSWER, "thinking": ""}], tokenize=False)
    assert gpt_oss.decode(ex.tokens) == official
    assert EMPTY_ANALYSIS + "<|start|>assistant<|channel|>final<|message|>4.<|return|>" in official
    assert trained(gpt_oss, ex) == ["<|channel|>final<|message|>4.<|return|>"]


# --- eval and the demo: the non-thinking prompt ---------------------------------------------


def test_the_non_thinking_prompt_ends_with_an_empty_analysis_and_the_generation_prompt(gpt_oss, harmony):
    render, _ = harmony
    prompt = non_thinking_prompt(gpt_oss, [QUESTION])
    assert prompt == render([QUESTION], empty_analysis=True)
    assert prompt.endswith(f"<|end|>{EMPTY_ANALYSIS}<|start|>assistant")


def test_the_demo_asks_llama_cpp_with_it_and_scores_the_final_channel(
    gpt_oss_chat_folder, gpt_oss, harmony, tmp_path, monkeypatch
):
    import mlxmoe.gguf.llamacpp
    from mlxmoe.demo import DemoSettings, _ask_llama_cpp

    calls = []

    class FakeLlama:
        def create_completion(self, prompt, **kwargs):
            calls.append((prompt, kwargs["stop"]))
            return {"choices": [{"text": "<|channel|>final<|message|>4."}], "usage": {"completion_tokens": 4}}

    @contextmanager
    def open_gguf(path, **kwargs):
        yield FakeLlama()

    monkeypatch.setattr(mlxmoe.gguf.llamacpp, "open_gguf", open_gguf)
    (tmp_path / "test.jsonl").write_text(
        json.dumps({"prompt": QUESTION["content"], "completion": "4."}) + "\n"
    )
    answer = _ask_llama_cpp(tmp_path / "model.gguf", gpt_oss_chat_folder, tmp_path, DemoSettings())
    assert answer["answer"] == "4." and answer["rouge_l"] == 1.0
    assert calls == [(harmony[0]([QUESTION], empty_analysis=True), ["<|return|>", "<|call|>"])]


# --- Ollama: the TEMPLATE -------------------------------------------------------------------

THINKING = {**ANSWER, "thinking": "Two and two make four."}
CONVERSATIONS = {
    "one turn": [QUESTION],
    "multi-turn, earlier reasoning dropped": [QUESTION, THINKING, FOLLOW_UP],
    "system prompt": [SYSTEM, QUESTION, THINKING, FOLLOW_UP],
    "a started answer to continue": [QUESTION, {"role": "assistant", "content": "4"}],
    "a started answer after reasoning": [QUESTION, {**THINKING, "content": "4"}],
}
THINK = [None, False, True, "low", "medium", "high"]


def test_detected_by_its_template_with_no_default_system_prompt(gpt_oss_chat_folder):
    assert detect_chat_format(gpt_oss_chat_folder) == "gpt-oss"
    assert default_system_prompt(gpt_oss_chat_folder) is None


@pytest.mark.slow
@pytest.mark.parametrize("think", THINK, ids=[f"think {t}" for t in THINK])
def test_template_renders_the_official_templates_prompt_for_each_think_value(
    think, gpt_oss, go_render_gpt_oss, harmony
):
    """Without thinking (unset or false): the official template's prompt with the empty
    analysis message mlxmoe trains answers after; with it: the official template's own, at the
    requested reasoning effort (true is medium). A started answer continues the final channel
    after its thinking, or after the empty analysis without thinking. openai-harmony renders
    the same conversations alike."""
    thinking = think not in (None, False)
    effort = "medium" if think is True or not thinking else think
    ours = go_render_gpt_oss([ollama_chat_values(c, None, think) for c in CONVERSATIONS.values()])
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        started = messages[-1]["role"] == "assistant"
        hf = [dict(m) for m in messages]
        if started and not thinking:
            hf[-1].setdefault("thinking", "")
        official = gpt_oss.apply_chat_template(
            hf,
            tokenize=False,
            add_generation_prompt=not started,
            continue_final_message=started,
            reasoning_effort=effort,
        )
        if not started and not thinking:
            official = official + "<|channel|>analysis<|message|><|end|><|start|>assistant"
        assert prompt == official, case
        if not started:
            reference = harmony[0](messages, effort, empty_analysis=not thinking)
            if messages[0]["role"] == "system":
                reference = developer_blank_line(reference)
            assert prompt == reference, case
        assert f"Reasoning: {effort}\n\n" in prompt
        assert ("Two and two" in prompt) == (case == "a started answer after reasoning"), case


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "messages", "think"),
    [
        ("off", [QUESTION, ANSWER], None),
        ("off", [QUESTION, REASONED], False),
        ("off", [SYSTEM, QUESTION, REASONED, FOLLOW_UP, SECOND], False),
        ("keep", [QUESTION, ANSWER], False),
        ("keep", [QUESTION, REASONED], True),
        ("keep", [QUESTION, REASONED, FOLLOW_UP, SECOND], "medium"),
    ],
    ids=[
        "off",
        "off, reasoning in the data",
        "off, multi-turn",
        "keep, no reasoning",
        "keep, reasoning",
        "keep, multi-turn reasoning",
    ],
)
def test_the_tokens_trained_before_a_gpt_oss_answer_are_the_modelfile_prompt(
    mode, messages, think, tmp_path, gpt_oss, go_render_gpt_oss
):
    ex = example(tmp_path, gpt_oss, messages, mode)
    history = [
        {("thinking" if k == "reasoning_content" else k): v for k, v in m.items()} for m in messages[:-1]
    ]
    (prompt,) = go_render_gpt_oss([ollama_chat_values(history, None, think)])
    assert gpt_oss.encode(prompt, add_special_tokens=False) == before_last_answer(ex)
