"""DeepSeek-V2: the Modelfile's TEMPLATE (export/deepseek2.gotmpl) against two independent
renderings of DeepSeek-V2-Lite-Chat's chat template (tests/fixtures/chat_templates/
deepseek-ai-DeepSeek-V2-Lite-Chat.jinja, its tokenizer_config.json's): transformers'
apply_chat_template, and llama.cpp's built-in "deepseek2" format (src/llama-chat.cpp), which
llama.cpp picks for that template by its text, through llama-cpp-python's
llama_chat_apply_template (no model needed).

BOS: the template writes bos_token first; llama.cpp and Ollama add BOS themselves when they
tokenize, so neither the TEMPLATE nor llama.cpp's format writes it. A started answer:
transformers leaves it open (continue_final_message), as the TEMPLATE does; llama.cpp's format
cannot (without the generation prompt it still ends every answer with the end of sentence)."""

from __future__ import annotations

import ctypes
import json

import pytest
from assets import published_template, qwen3_tokenizer_with
from ollama_go import ollama_chat_values

from mlxmoe.gguf.ollama import PROBE, chat_formats, default_system_prompt, detect_chat_format, write_modelfile

pytestmark = pytest.mark.proof("templates")

TEMPLATE = published_template("deepseek-ai-DeepSeek-V2-Lite-Chat.jinja")
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

QUESTION = {"role": "user", "content": "What is 2+2?"}
FOLLOW_UP = {"role": "user", "content": "And 3+3?"}
SYSTEM = {"role": "system", "content": "Answer in one word."}
ANSWER = {"role": "assistant", "content": "4."}
STARTED = [QUESTION, {"role": "assistant", "content": "The two"}]
CONVERSATIONS = {
    "one turn": [QUESTION],
    "multi-turn": [QUESTION, ANSWER, FOLLOW_UP],
    "system prompt": [SYSTEM, QUESTION, ANSWER, FOLLOW_UP],
    "a later system message": [SYSTEM, QUESTION, ANSWER, {**SYSTEM, "content": "Now in French."}, FOLLOW_UP],
    "quotes, newlines, template syntax": [
        {"role": "user", "content": ' Quote "{{ .Prompt }}" and\n  keep\tthese spaces. '}
    ],
}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    """tokenizer_config.json as DeepSeek-V2-Lite-Chat's writes its template and special tokens
    (BOS and EOS as AddedToken objects)."""
    folder = tmp_path_factory.mktemp("deepseek-v2-lite-chat")
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False}
    config = {
        "chat_template": TEMPLATE,
        "bos_token": {**token, "content": BOS, "single_word": False},
        "eos_token": {**token, "content": EOS, "single_word": False},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """Qwen3's tokenizer carrying DeepSeek-V2's template, BOS and EOS."""
    loaded = qwen3_tokenizer_with(tmp_path_factory.mktemp("deepseek"), TEMPLATE, (BOS, EOS), eos_token=EOS)
    loaded.bos_token = BOS
    return loaded


def transformers_prompt(tokenizer, messages: list[dict]) -> str:
    started = messages[-1]["role"] == "assistant"
    prompt = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=not started, continue_final_message=started
    )
    assert prompt.startswith(BOS)
    return prompt.removeprefix(BOS)  # llama.cpp and Ollama add BOS as a token


def llama_cpp_prompt(template: str, messages: list[dict], add_ass: bool = True) -> str:
    """llama.cpp's llama_chat_apply_template: ``template`` a built-in format's name or a
    template's text, which llama.cpp maps to a built-in format by what it contains."""
    import llama_cpp

    chat = (llama_cpp.llama_chat_message * len(messages))(
        *(
            llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode())
            for m in messages
        )
    )

    def apply(buffer, length: int) -> int:
        return llama_cpp.llama_chat_apply_template(
            template.encode(), chat, len(messages), add_ass, buffer, length
        )

    size = apply(None, 0)  # the length it needs
    assert size >= 0, f"llama.cpp knows no format for {template[:60]!r}"
    buffer = ctypes.create_string_buffer(size + 1)
    assert apply(buffer, size + 1) == size
    return buffer.raw[:size].decode()


# --- which models get the format ------------------------------------------------------------


def test_deepseek_v2_chat_is_detected_with_no_default_system_prompt(model_folder):
    assert detect_chat_format(model_folder) == "deepseek2"
    assert default_system_prompt(model_folder) is None


def test_the_modelfile_stops_at_the_end_of_sentence_and_a_new_user_turn(model_folder, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    text = write_modelfile(tmp_path, gguf, "deepseek2").read_text(encoding="utf-8")
    assert f'TEMPLATE """{chat_formats()["deepseek2"]["template"]}"""\n' in text
    assert f'PARAMETER stop "{EOS}"\nPARAMETER stop "User:"\n' in text
    assert "SYSTEM" not in text


# --- Ollama: the TEMPLATE -------------------------------------------------------------------


@pytest.mark.slow
def test_llama_cpp_renders_the_template_as_its_deepseek2_format():
    for case, messages in CONVERSATIONS.items():
        assert llama_cpp_prompt(TEMPLATE, messages) == llama_cpp_prompt("deepseek2", messages), case


@pytest.mark.slow
def test_template_renders_what_transformers_renders(tokenizer, go_program):
    conversations = {**CONVERSATIONS, "a started answer to continue": STARTED}
    cases = [ollama_chat_values(c, None) for c in conversations.values()]
    ours = go_program(chat_formats()["deepseek2"]["template"], cases)["prompts"]
    for (case, messages), prompt in zip(conversations.items(), ours):
        assert prompt == transformers_prompt(tokenizer, messages), case
    assert ours[0] == "User: What is 2+2?\n\nAssistant:"


@pytest.mark.slow
def test_template_renders_what_llama_cpp_renders(go_program):
    cases = [ollama_chat_values(c, None) for c in [*CONVERSATIONS.values(), STARTED]]
    *ours, started = go_program(chat_formats()["deepseek2"]["template"], cases)["prompts"]
    for (case, messages), prompt in zip(CONVERSATIONS.items(), ours):
        assert prompt == llama_cpp_prompt(TEMPLATE, messages), case
    # llama.cpp cannot leave an answer open: it ends it as an earlier one.
    assert llama_cpp_prompt(TEMPLATE, STARTED, add_ass=False) == started + EOS


@pytest.mark.slow
def test_template_renders_the_probe_its_sidecar_detects_it_by(go_program):
    spec = chat_formats()["deepseek2"]
    assert go_program(spec["template"], [ollama_chat_values(list(PROBE), None)])["prompts"] == [spec["probe"]]


@pytest.mark.slow
def test_ollama_finds_no_think_tags_in_it(go_program):
    assert go_program(chat_formats()["deepseek2"]["template"], [])["think_tags"] == ["", ""]
