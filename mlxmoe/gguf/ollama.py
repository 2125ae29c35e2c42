"""Ollama: a Modelfile for an exported GGUF, and ``ollama create``.

Each chat format is a pair of files in the repository's ``export/`` folder (installed as
``mlxmoe/templates``, see pyproject.toml): ``<format>.gotmpl`` is its TEMPLATE in Ollama's Go
text/template syntax, and ``<format>.json`` holds its stop strings, default parameters and
``probe``: what a Hugging Face chat template of that family renders for PROBE (with
``system_turn``, how it writes a default system prompt of its own). A model's format is found by
rendering PROBE with the model's own template, so that a template that merely looks like a
family's (Llama-2's ``[INST] <<SYS>>``, say) is not taken for it. PROBE is rendered asking for an
answer without reasoning (``thinking.NON_THINKING``), as training and evaluation prompt, so a
thinking model's template (Qwen3's empty think block) tells its format from plain ChatML; a
format whose sidecar has ``thinking_probe`` must also render that with thinking allowed (Qwen3's
thinking prompt is ``<|im_start|>assistant\n``, Qwen3.5's opens the think block). Templates that
write today's date (gpt-oss's) render the probe on PROBE_DATE. A sidecar's ``template_system``
names the default system prompts its TEMPLATE can write itself where a conversation has none,
dated the day Ollama prompts (``{date:%B %d, %Y}``): each name is a format of its own, whose
TEMPLATE is the .gotmpl with that text where it says ``template_system`` (Granite 3.3's default
on one line, "granite"; Granite 3.1's on lines, "granite-3.1"). Such a format is a model's only
where the model's template writes a default too, either that one (no SYSTEM then) or one without
a date, which becomes SYSTEM (Granite 4.0's); a dated one in other words needs a name of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from ..checkpoint import read_json
from ..errors import CheckpointError, MlxMoeError
from ..thinking import NON_THINKING

log = logging.getLogger(__name__)

PLAIN = "none"
# Ollama reserves the KV cache for num_ctx tokens when it loads a model: Mixtral's 32k
# context would not fit beside its weights on the 32 GB Macs this tool is made for.
MAX_NUM_CTX = 4096
PROBE = (
    {"role": "user", "content": "ping"},
    {"role": "assistant", "content": "pong"},
    {"role": "user", "content": "again"},
)
# Where transformers looks for a chat template, in the order gguf-py and mlxmoe.gguf.vocab
# read them (so the format matches the template the GGUF carries).
TEMPLATE_SOURCES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
BOS_MARK = "\ue000"  # a private-use character
PROBE_DATE = datetime(2024, 6, 1)
OTHER_DATE = datetime(2025, 11, 23)  # another day, month and year: tells a dated default apart
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# How a sidecar's template_system writes the day Ollama prompts (strftime_now('%B %d, %Y') in
# the Hugging Face templates), the .gotmpl variable that spells currentDate so, and the comment
# the default system prompt replaces.
TODAY = "{date:%B %d, %Y}"
GO_TODAY = "$today"
DEFAULT_SYSTEM_MARK = "{{- /* template_system */ -}}"
# What Ollama's Modelfile parser accepts as a PARAMETER name (parser/parser.go).
PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+")


def templates_dir() -> Path:
    """The installed package's templates, or export/ itself in a source checkout."""
    installed = Path(__file__).parents[1] / "templates"
    return installed if installed.is_dir() else Path(__file__).resolve().parents[2] / "export"


@cache
def chat_formats() -> dict[str, dict[str, Any]]:
    """Every format: its sidecar JSON plus ``template``, the .gotmpl text. A sidecar's
    ``template_system`` gives one format per name it holds, each with its dated default written
    into the TEMPLATE (and as its own ``template_system``)."""
    formats = {}
    for path in sorted(templates_dir().glob("*.gotmpl")):
        spec = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        # A text file ends with a newline; text/template would print it after the last action.
        template = path.read_text(encoding="utf-8").removesuffix("\n")
        defaults = spec.get("template_system")
        if defaults is None:
            formats[path.stem] = {**spec, "template": template}
            continue
        for name, system in defaults.items():
            filled = with_default_system(template, system, path)
            formats[name] = {**spec, "template_system": system, "template": filled}
    return formats


def with_default_system(template: str, system: str, path: Path) -> str:
    """``template`` writing ``system`` at DEFAULT_SYSTEM_MARK, TODAY spelled from the TEMPLATE's
    $today. A JSON string is a Go string literal, and print joins strings without spaces."""
    pieces = system.split(TODAY)
    if template.count(DEFAULT_SYSTEM_MARK) != 1 or any("{" in p or "}" in p for p in pieces):
        raise MlxMoeError(f"{path}: a template_system needs one {DEFAULT_SYSTEM_MARK} and dates as {TODAY}")
    literals = f" {GO_TODAY} ".join(json.dumps(p, ensure_ascii=False) for p in pieces)
    return template.replace(DEFAULT_SYSTEM_MARK, f"{{{{- print {literals} -}}}}")


# --- which format a model uses ------------------------------------------------------------


def detect_chat_format(model_dir: str | Path) -> str:
    """The model's chat format: "mistral", "chatml", "qwen3" or "qwen3_5" (ChatML with think
    blocks), "gpt-oss" (harmony), "gemma4", "granite" or "granite-3.1", "deepseek2", or "none"
    (plain completion) for a model without a chat template. A template of no known family is
    "none", with a warning."""
    name, _, problem = probe_chat_template(Path(model_dir))
    if problem:
        log.warning("%s; the Modelfile uses plain completion", problem)
    return name


def default_system_prompt(model_dir: str | Path) -> str | None:
    """The system prompt the model's template adds when a conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."): Ollama adds a Modelfile's SYSTEM then."""
    return probe_chat_template(Path(model_dir))[1]


def model_parameters(model_dir: str | Path) -> dict[str, Any]:
    """Ollama parameters that come from the model: num_ctx, its context length up to MAX_NUM_CTX."""
    config = Path(model_dir) / "config.json"
    length = read_model_json(config).get("max_position_embeddings") if config.is_file() else None
    return {"num_ctx": min(int(length), MAX_NUM_CTX)} if length else {}


def probe_chat_template(model_dir: Path) -> tuple[str, str | None, str | None]:
    """(format, default system prompt, why it is plain completion despite a template)."""
    found = read_chat_template(model_dir)
    if found is None:
        return PLAIN, None, None  # a base model, trained on plain text
    template, tokens, source = found
    # BOS is rendered as a mark no text contains, so that a BOS the template writes is told
    # apart from the same text written as the template's own (SmolLM2's BOS is <|im_start|>).
    tokens = {**tokens, "bos_token": BOS_MARK}
    try:
        rendered = render_hf_template(template, list(PROBE), tokens)
        thinking = render_hf_template(template, list(PROBE), tokens, thinking=True)
    except Exception as exc:  # jinja2 errors and raise_exception() in templates
        return PLAIN, None, f"{source}: its chat template fails on a plain conversation ({exc})"
    rendered = rendered.removeprefix(BOS_MARK)  # llama.cpp adds BOS itself
    for name, spec in chat_formats().items():
        probe = spec.get("probe")
        if probe is None or not rendered.endswith(probe):
            continue
        if not thinking.endswith(spec.get("thinking_probe", "")):
            continue
        head = rendered[: len(rendered) - len(probe)]
        system = filled_in(spec.get("system_turn"), head) if head else None
        if head and system is None:
            continue
        own = spec.get("template_system")
        if own is None:
            return name, system, None
        # The TEMPLATE writes a system turn of its own where the conversation has none.
        if system == own.format(date=PROBE_DATE):
            return name, None, None
        if system is not None and undated(system, template, tokens):
            return name, system, None
    known = ", ".join(n for n, s in chat_formats().items() if "probe" in s)
    return PLAIN, None, f"{source}: chat template of no known family ({known})"


def undated(system: str, template: str, tokens: dict[str, str]) -> bool:
    """Whether the template writes its default system prompt the same on another day."""
    return system in render_hf_template(template, list(PROBE), tokens, date=OTHER_DATE)


def filled_in(pattern: str | None, text: str) -> str | None:
    """The ``system`` that makes ``pattern.format(system=...)`` equal ``text``, if any."""
    if pattern is None or "{system}" not in pattern:
        return None
    before, _, after = pattern.partition("{system}")
    fits = len(text) >= len(before) + len(after)
    if not (fits and text.startswith(before) and text.endswith(after)):
        return None
    return text[len(before) : len(text) - len(after)]


def read_chat_template(model_dir: Path) -> tuple[str, dict[str, str], Path] | None:
    """(template, special token texts, file it came from), or None when there is none."""
    config_path = model_dir / "tokenizer_config.json"
    config = read_model_json(config_path) if config_path.is_file() else {}
    tokens = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value  # AddedToken form
        if isinstance(value, str):
            tokens[key] = value
    for name in TEMPLATE_SOURCES:
        path = model_dir / name
        if not path.is_file():
            continue
        if name.endswith(".jinja"):
            try:
                return path.read_text(encoding="utf-8"), tokens, path
            except (OSError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{path}: cannot read it ({exc})") from exc
        template = (config if path == config_path else read_model_json(path)).get("chat_template")
        if isinstance(template, list):  # named templates: transformers uses "default"
            template = next(
                (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                None,
            )
        if isinstance(template, str):
            return template, tokens, path
    return None


def read_model_json(path: Path) -> dict:
    try:
        return read_json(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc})") from exc


def render_hf_template(
    template: str,
    messages: list[dict],
    tokens: dict[str, str],
    thinking: bool = False,
    date: datetime = PROBE_DATE,
) -> str:
    """The template rendered with the jinja2 settings transformers' apply_chat_template uses,
    on ``date``, with the generation prompt for an answer without reasoning (or, with
    ``thinking``, with reasoning allowed)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals.update(raise_exception=raise_exception, strftime_now=date.strftime)
    variables = {} if thinking else NON_THINKING
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, **variables, **tokens
    )


# --- the Modelfile --------------------------------------------------------------------------


def write_modelfile(
    folder: str | Path,
    gguf: str | Path,
    chat_format: str,
    *,
    adapter: str | Path | None = None,
    params: dict[str, Any] | None = None,
    system: str | None = None,
) -> Path:
    """Write ``folder/Modelfile`` (atomically) for ``gguf`` and return its path.

    ``adapter``: a LoRA GGUF (``mlxmoe export --adapter-only``) applied over ``gguf``, which is
    then the base model's GGUF. ``params`` override the format's defaults (a list value, like
    ``stop``, writes one PARAMETER line per item); ``system`` becomes SYSTEM.
    """
    formats = chat_formats()
    if chat_format not in formats:
        raise MlxMoeError(f"unknown chat format {chat_format!r}; known: {', '.join(formats)}")
    spec, folder = formats[chat_format], Path(folder)
    lines = [
        "# Written by mlxmoe export. Add it to Ollama: ollama create NAME -f Modelfile",
        f"FROM {path_argument(gguf, folder)}",
    ]
    if adapter is not None:
        lines.append(f"ADAPTER {path_argument(adapter, folder)}")
    lines.append(f"TEMPLATE {quote(spec['template'], triple=True)}")
    if system:
        lines.append(f"SYSTEM {quote(system, triple=True)}")
    parameters = {"stop": spec["stop"], **spec["parameters"], **(params or {})}
    for name, value in parameters.items():
        if not PARAMETER_NAME.fullmatch(name):
            raise MlxMoeError(f"{name!r} is not an Ollama parameter name")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            lines.append(f"PARAMETER {name} {parameter_value(item)}")
    target = folder / "Modelfile"
    with atomic_file(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def path_argument(path: str | Path, folder: Path) -> str:
    """A file as FROM/ADAPTER name it: relative to the Modelfile's folder when inside it (the
    two can move together), else absolute. Ollama takes a path it cannot find for the name
    of a model in its registry, so a missing file is refused here."""
    path = Path(path)
    if not path.is_file():
        raise MlxMoeError(f"{path}: no such GGUF file")
    absolute, base = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    text = f"./{absolute.relative_to(base).as_posix()}" if absolute.is_relative_to(base) else str(absolute)
    return text if text == text.strip() and not text.startswith('"') else quote(text)


def quote(text: str, triple: bool = False) -> str:
    """A Modelfile argument in quotes. Ollama's parser ends a quoted argument at the first line
    end where it closes, and drops characters that are not printable (strconv.IsPrint)."""
    if '"""' in text:
        raise MlxMoeError(f'a Modelfile argument cannot contain """: {text[:60]!r}')
    if any(not (c.isprintable() or c in "\n\t") for c in text):
        raise MlxMoeError(f"a Modelfile argument cannot contain control characters: {text[:60]!r}")
    if triple or "\n" in text or '"' in text:
        return f'"""{text}"""'
    return f'"{text}"'


def parameter_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return quote(str(value))


# --- ollama create --------------------------------------------------------------------------


def create_model(modelfile: str | Path, name: str) -> str:
    """Run ``ollama create NAME -f MODELFILE`` when ollama is on PATH and say how it went;
    otherwise return the command line to run."""
    modelfile = Path(os.path.abspath(modelfile))
    executable = shutil.which("ollama")
    command = ["ollama", "create", name, "-f", str(modelfile)]
    if executable is None:
        return f"ollama is not on PATH; to add the model to Ollama, run: {shlex.join(command)}"
    proc = subprocess.run(
        [executable, *command[1:]], check=False, capture_output=True, text=True, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        why = proc.stderr.strip() or proc.stdout.strip() or "no output"
        raise MlxMoeError(f"{shlex.join(command)} failed (exit {proc.returncode}): {why}")
    return f"created Ollama model {name}; try: ollama run {shlex.quote(name)}"
