"""Granite: the Modelfile's TEMPLATE (export/granite.gotmpl) against IBM's chat templates as
llama.cpp keeps them (models/templates/ibm-granite-granite-3.3-2B-Instruct.jinja, -4.0 and
-4.1.jinja) and as the Granite 3.1 MoE instruct models publish theirs
(tests/fixtures/chat_templates/ibm-granite-granite-3.1-moe.jinja: Ollama's library/granite3.1-moe
GGUF's, as huggingface.js's ollama-utils records it), rendered by transformers'
apply_chat_template and by mlxmoe's own jinja settings (render_hf_template), on frozen days.

Without a system message Granite 3.3's template writes a default system prompt with today's date
(strftime_now('%B %d, %Y')) on one line, Granite 3.1's (and 3.2's) the same words on lines; each
TEMPLATE ("granite", "granite-3.1") writes its own from Ollama's currentDate, so the Modelfile
has no SYSTEM. Granite 4.0's default has no date: it becomes the Modelfile's SYSTEM. A template
that writes no system turn (4.1) or a dated default in words of no Granite release is plain
completion, with a warning. None has thinking here (3.3's "thinking" switch is not Ollama's; the
3.x MoE templates have none)."""

from __future__ import annotations

import json
import logging
from datetime import datetime

import pytest
from assets import llama_cpp_template, published_template, qwen3_tokenizer_with
from ollama_go import CURRENT_DATE, frozen_today, ollama_chat_values

from mlxmoe.gguf.ollama import (
    chat_formats,
    default_system_prompt,
    detect_chat_format,
    render_hf_template,
)

pytestmark = pytest.mark.proof("templates")

GRANITE_3_3 = "ibm-granite-granite-3.3-2B-Instruct.jinja"
GRANITE_4_0 = "ibm-granite-granite-4.0.jinja"
GRANITE_4_1 = "ibm-granite-granite-4.1.jinja"
GRANITE_3_1 = published_template("ibm-granite-granite-3.1-moe.jinja")
GRANITE_4_0_SYSTEM = (
    "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."
)

QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ANSWER = {"role": "assistant", "content": "4."}


def official(name: str) -> str:
    template = llama_cpp_template(name)
    if template is None:
        pytest.skip(f"llama.cpp's {name} is not unpacked at LLAMA_CPP_SRC")
    return template


def folder_with(tmp_path_factory, template: str):
    folder = tmp_path_factory.mktemp("granite")
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "<|end_of_text|>"})
    )
    return folder


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Qwen3's tokenizer carrying Granite 3.1's, 3.3's and 4.0's templates, by version."""
    import transformers

    loaded = {}
    for version, template in (
        ("3.1", GRANITE_3_1),
        ("3.3", official(GRANITE_3_3)),
        ("4.0", official(GRANITE_4_0)),
    ):
        folder = tmp_path_factory.mktemp(f"granite-{version}")
        qwen3_tokenizer_with(folder, template)
        loaded[version] = transformers.AutoTokenizer.from_pretrained(folder)
    return loaded


@pytest.fixture(autouse=True)
def today(monkeypatch):
    frozen_today(monkeypatch)


# --- which models get the format ------------------------------------------------------------


def test_granite_3_3_is_detected_and_its_dated_default_left_to_the_template(tmp_path_factory):
    folder = folder_with(tmp_path_factory, official(GRANITE_3_3))
    assert detect_chat_format(folder) == "granite"
    assert default_system_prompt(folder) is None


def test_granite_4_0s_undated_default_becomes_the_modelfile_system(tmp_path_factory):
    folder = folder_with(tmp_path_factory, official(GRANITE_4_0))
    assert detect_chat_format(folder) == "granite"
    assert default_system_prompt(folder) == GRANITE_4_0_SYSTEM


def test_granite_3_1_moe_writes_its_dated_default_on_lines():
    day = datetime(2026, 3, 9)
    assert render_hf_template(GRANITE_3_1, [QUESTION], {}, date=day).startswith(
        "<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\n"
        "Today's Date: March 09, 2026.\nYou are Granite, developed by IBM. You are a helpful AI assistant."
        "<|end_of_text|>\n"
    )


def test_granite_3_1_moe_is_detected_and_its_dated_default_left_to_its_template(tmp_path_factory):
    folder = folder_with(tmp_path_factory, GRANITE_3_1)
    assert detect_chat_format(folder) == "granite-3.1"
    assert default_system_prompt(folder) is None


def test_the_two_granite_templates_differ_only_in_their_default():
    """One .gotmpl, its default from granite.json's template_system."""
    formats = chat_formats()
    ours, theirs = formats["granite"]["template"], formats["granite-3.1"]["template"]
    assert ours != theirs
    assert {k: v for k, v in formats["granite"].items() if k not in ("template", "template_system")} == {
        k: v for k, v in formats["granite-3.1"].items() if k not in ("template", "template_system")
    }
    assert "print" in ours and 'Today\'s Date: " $today ". You are' in ours
    assert 'Today\'s Date: " $today ".\\nYou are' in theirs


@pytest.mark.parametrize("version", ["4.1: no system turn", "the default dated in other words"])
def test_a_granite_template_the_template_cannot_match_is_plain_completion(version, tmp_path_factory, caplog):
    if version.startswith("4.1"):
        template = official(GRANITE_4_1)
    else:  # a default no Granite release writes: its date first
        template = official(GRANITE_3_3).replace(
            "April 2024. Today's Date: \" + strftime_now('%B %d, %Y') + \". You",
            "April 2024. Today: \" + strftime_now('%B %d, %Y') + \". You",
        )
        assert "April 2024. Today: " in render_hf_template(template, [QUESTION], {})
    folder = folder_with(tmp_path_factory, template)
    with caplog.at_level(logging.WARNING, logger="mlxmoe.gguf.ollama"):
        assert detect_chat_format(folder) == "none"
    assert "no known family" in caplog.text


# --- Ollama: the TEMPLATE -------------------------------------------------------------------

CONVERSATIONS = {
    "one turn, the default system prompt": [QUESTION],
    "multi-turn": [QUESTION, ANSWER, FOLLOW_UP],
    "system prompt": [SYSTEM, QUESTION, ANSWER, FOLLOW_UP],
    "a later system message": [SYSTEM, QUESTION, ANSWER, {**SYSTEM, "content": "Now in French."}, FOLLOW_UP],
    "quotes, newlines, template syntax": [
        {"role": "user", "content": ' Quote "{{ .Prompt }}" and\n  keep\tthese spaces. '}
    ],
    "a started answer to continue": [QUESTION, {"role": "assistant", "content": "The two"}],
}


def official_prompt(tokenizer, messages: list[dict]) -> str:
    started = messages[-1]["role"] == "assistant"
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not started, continue_final_message=started
    )


@pytest.mark.parametrize(
    ("version", "chat_format", "separator"), [("3.3", "granite", " "), ("3.1", "granite-3.1", "\n")]
)
@pytest.mark.slow
def test_template_renders_what_the_granite_template_renders(
    version, chat_format, separator, tokenizers, go_program
):
    cases = [ollama_chat_values(c, None) for c in CONVERSATIONS.values()]
    ours = go_program(chat_formats()[chat_format]["template"], cases)["prompts"]
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        assert prompt == official_prompt(tokenizers[version], messages), case
    day = datetime.strptime(CURRENT_DATE, "%Y-%m-%d").strftime("%B %d, %Y")
    assert f"Today's Date: {day}.{separator}You are Granite" in ours[0]


@pytest.mark.parametrize("chat_format", ["granite", "granite-3.1"])
@pytest.mark.slow
def test_the_default_system_prompt_writes_each_month_as_strftime_does(chat_format, go_program):
    """currentDate gives YYYY-MM-DD; the TEMPLATE spells the month and keeps the day's zero."""
    template = official(GRANITE_3_3) if chat_format == "granite" else GRANITE_3_1
    days = [datetime(2026, month, 2 * month + 5) for month in range(1, 13)]
    for day in days:
        ours = go_program(
            chat_formats()[chat_format]["template"],
            [ollama_chat_values([QUESTION], None)],
            date=day.strftime("%Y-%m-%d"),
        )["prompts"]
        assert ours == [render_hf_template(template, [QUESTION], {}, date=day)], day


@pytest.mark.slow
def test_with_granite_4_0s_default_as_system_it_renders_4_0s_template(tokenizers, go_program):
    cases = [ollama_chat_values(c, GRANITE_4_0_SYSTEM) for c in CONVERSATIONS.values()]
    ours = go_program(chat_formats()["granite"]["template"], cases)["prompts"]
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        assert prompt == official_prompt(tokenizers["4.0"], messages), case


@pytest.mark.parametrize("chat_format", ["granite", "granite-3.1"])
@pytest.mark.slow
def test_ollama_finds_no_think_tags_in_it(chat_format, go_program):
    assert go_program(chat_formats()[chat_format]["template"], [])["think_tags"] == ["", ""]
