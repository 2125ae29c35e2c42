"""A real domain dataset: Python questions and answers, built from documentation on this machine.

Two sources, no hub:

- ``debian``: the Python FAQ as Debian's ``python3.X-doc`` installs it
  (``/usr/share/doc/python3.X/html/_sources/faq/*.rst.txt``). Every section heading that ends
  in ``?`` is a question; its answer is the section's text up to the next heading of any level.
- ``pydoc``: needs nothing installed. (a) Every section of ``pydoc_data.topics`` (the language
  reference topics behind ``help("for")``): a title ``The "X" statement`` becomes *What does
  the "X" statement do in Python?*, any other title *What does the Python documentation say
  about <title>?* (with the enclosing section's title after "in" for subsections); (b) the
  docstrings of the built-in functions, of the methods of the built-in types and of the
  functions of a few standard modules (``DOCSTRING_MODULES``): *What does math.gcd() do in
  Python?* -> the docstring. The questions are templates; the answers are CPython's own text.

Answers are plain text: inline reST markup is rendered the way Sphinx shows it (roles to
their text, ``func()`` parentheses, link targets dropped), directives and tables are left out,
code blocks are kept dedented. An answer is the section's leading blocks, whole, up to
``max_chars`` (at least one; a first paragraph that is too long is cut at a sentence end), and
never ends on a paragraph that introduces a left-out block (``...like this:``). Questions are
deduplicated (case and spacing ignored; the first wins, sources read in sorted order). The
split is a pure function of the question: the first 8 bytes of its SHA-256 modulo 100 give
train (< 80), valid (< 90) or test, so a question keeps its split when the sources change.
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
import json
import re
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..atomic import write_text_atomic
from ..errors import MlxMoeError

DEBIAN_DOCS = Path("/usr/share/doc")
MAX_ANSWER_CHARS = 500
MIN_ANSWER_CHARS = 25  # "See the next question." is not an answer
SPLITS = (("train", 80), ("valid", 90), ("test", 100))  # cumulative percent
SOURCES = ("auto", "debian", "pydoc")
BUILTIN_TYPES = (str, bytes, list, dict, set, int, float, tuple)
DOCSTRING_MODULES = (
    "bisect",
    "collections",
    "copy",
    "functools",
    "heapq",
    "itertools",
    "json",
    "math",
    "os",
    "os.path",
    "random",
    "re",
    "shutil",
    "statistics",
    "string",
    "textwrap",
)
CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode"}
_UNDERLINE = re.compile(r"([=\-~^\"'`#*+:.])\1{2,}\s*")
_BULLET = re.compile(r"(?:[*+-]|#\.|\d+\.)\s+")
_TABLE = re.compile(r"[+|]|=+(?: +=+)+\s*$")
_SIGNATURE = re.compile(r"(?:async )?[\w.]+\(.*\)\s*(?:-+>.*)?")  # "max(iterable) -> value"
_SENTENCE_END = re.compile(r"[.!?](?=\s)")
_ENDS_SENTENCE = re.compile(r"""[.!?]['")]*$""")
_DIRECTIVE = re.compile(r"\.\.(?:\s|$)")  # also comments and labels; "..." is text


class FaqError(MlxMoeError):
    pass


@dataclass(frozen=True)
class QAPair:
    question: str
    answer: str
    source: str  # file and line, topic or object the pair was cut from


# --- reST to plain text ---------------------------------------------------------------------

_INLINE = re.compile(
    r"(?P<role>:(?:[\w-]+:)*[\w-]+:`(?P<role_text>[^`]+)`)"
    r"|``(?P<literal>.+?)``"
    r"|\\(?P<escaped>.)"
    r"|`(?P<link>[^`<]+?)\s*<[^`>]*>`__?"
    r"|`(?P<ref>[^`]+)`__?"
    r"|`(?P<interpreted>[^`]+)`"
    r"|(?<![\w*\\])\*\*(?P<strong>\S(?:.*?\S)?)\*\*(?![\w*])"
    r"|(?<![\w*\\])\*(?P<emph>[^\s*](?:[^*]*?[^\s*\\])?)\*(?![\w*])"
    r"|\s*\[(?:#\w*|\d+)\]_"  # footnote references
)


def _role(match: re.Match) -> str:
    role = match.group("role").split("`", 1)[0].strip(":").split(":")[-1]
    text = match.group("role_text").strip()
    titled = re.fullmatch(r"(.+?)\s*<([^<>]+)>", text, re.S)
    if titled:
        return titled.group(1)
    text = text.lstrip("!")
    if role in ("pep", "rfc"):
        return f"{role.upper()} {text}"
    if role in ("ref", "doc"):  # a label: Sphinx would show the target's title, not at hand
        return text.rsplit("/", 1)[-1].replace("-", " ").replace("_", " ")
    if role == "menuselection":
        return text.replace("-->", ">")
    if text.startswith("~"):
        text = text[1:].rsplit(".", 1)[-1]
    if role in ("func", "meth") and not text.endswith(")"):
        text += "()"
    return text


def _inline(match: re.Match) -> str:
    if match.group("role"):
        return _role(match)
    for name in ("literal", "link", "ref", "interpreted", "strong", "emph"):
        if match.group(name) is not None:
            return match.group(name)
    escaped = match.group("escaped")
    return "" if escaped in (None, " ") else escaped  # a footnote reference, "\ " or "\x"


def rst_inline(text: str) -> str:
    """One line or paragraph of reST inline markup as the plain text Sphinx would render."""
    return re.sub(r"\s+", " ", _INLINE.sub(_inline, text)).strip()


def rendered_inline(text: str) -> str:
    """For text Sphinx already rendered (pydoc topics): only ``*word*``, ``**word**`` and
    footnote markers `` [4]`` go."""
    text = _INLINE.sub(lambda m: m.group("strong") or m.group("emph") or m.group(0), text)
    text = re.sub(r" \[\d+\](?!\w)", "", text)
    return re.sub(r"\s+", " ", text).strip()


# --- blocks and answers -----------------------------------------------------------------------


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _blocks(lines: list[str]) -> Iterator[tuple[str, list[str]]]:
    """(kind, lines) for each block of a section body: kind is "prose", "list", "code" or
    "skip" (a table, a definition list, a directive that is not code)."""
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        if not line.strip() or _UNDERLINE.fullmatch(line):
            i += 1
            continue
        j = i + 1
        if _indent(line) > 0 or _DIRECTIVE.match(line):  # an indented block or a directive
            while j < n and (not lines[j].strip() or _indent(lines[j]) > 0):
                j += 1
            body = lines[i:j]
            if _indent(line) > 0:
                yield "code", body
            else:
                directive = re.match(r"\.\.\s+([\w-]+)::", line)
                if directive and directive.group(1) in CODE_DIRECTIVES:
                    content = [x for x in body[1:] if not re.match(r"\s+:[\w-]+:", x)]
                    yield "code", content
                else:
                    yield "skip", body
            i = j
            continue
        while j < n and lines[j].strip() and not _DIRECTIVE.match(lines[j]):
            j += 1
        body = lines[i:j]
        i = j
        if line.startswith(">>>"):
            yield "code", body
        elif _TABLE.match(line):
            yield "skip", body
        elif _BULLET.match(line):
            yield "list", body
        elif len(body) > 1 and _indent(body[1]) > 0:  # a definition list: term, then its text
            yield "skip", body
        else:
            yield "prose", body


def _render(kind: str, lines: list[str], inline) -> str:
    if kind == "code":
        return textwrap.dedent("\n".join(lines)).strip("\n")
    if kind == "list":
        items: list[list[str]] = []
        for line in lines:
            if _BULLET.match(line):
                items.append([_BULLET.sub("", line, count=1)])
            else:
                items[-1].append(line)
        return "\n".join("- " + _paragraph(item, inline) for item in items)
    return _paragraph(lines, inline)


def _paragraph(lines: list[str], inline) -> str:
    text = inline(" ".join(lines))
    if text == "::" or text.endswith(" ::"):  # Sphinx shows "text ::" as "text"
        return text[:-3]
    return text[:-1] if text.endswith("::") else text  # and "text::" as "text:"


def _cut_at_sentence(text: str, max_chars: int) -> str:
    ends = [m.end() for m in _SENTENCE_END.finditer(text + " ") if m.end() <= max_chars]
    return text[: ends[-1]] if ends else ""


def make_answer(
    lines: list[str], inline=rst_inline, max_chars: int = MAX_ANSWER_CHARS, keep_code: bool = True
) -> str:
    """The plain-text answer a section body gives (see the module docstring). Without
    ``keep_code`` the answer stops at the first code block; grammar rules (``::=``) are
    always left out."""
    parts: list[tuple[str, str]] = []  # (kind, text)
    size = 0
    for kind, block in _blocks(lines):
        if kind == "code" and any("::=" in line for line in block):
            if parts and parts[-1][1].endswith(":"):  # "...is used for conditional execution:"
                parts[-1] = ("prose", parts[-1][1][:-1] + ".")
            continue
        if kind != "prose" and parts and parts[-1][0] == "prose" and not _ENDS_SENTENCE.search(parts[-1][1]):
            parts[-1] = ("intro", parts[-1][1])  # "In C++ you'd write" + code
        if kind == "skip" or (kind == "code" and not keep_code):
            if parts:
                break
            continue
        text = _render(kind, block, inline)
        if not text:
            continue
        if size + len(text) > max_chars:
            if not parts and kind == "prose":
                parts.append((kind, _cut_at_sentence(text, max_chars)))
            break
        if kind in ("prose", "list") and block[-1].rstrip().endswith(":"):
            kind = "intro"  # it introduces the block after it
        parts.append((kind, text))
        size += len(text) + 2
    # End on prose: not on code, nor on the paragraph that introduced what was left out.
    kept = list(parts)
    while kept and kept[-1][0] in ("code", "intro"):
        kept.pop()
    if not kept and parts and parts[-1][0] == "code":  # an answer that is only code (and its intro)
        kept = parts
    return "\n\n".join(text for _, text in kept if text)


# --- sections -------------------------------------------------------------------------------


def sections(text: str) -> Iterator[tuple[int, str, int, list[str]]]:
    """(line number, title, level, body lines) of each section of a reST (or pydoc-rendered)
    text; the level is the order in which its underline style first appeared."""
    lines = text.splitlines()
    styles: list[str] = []
    heads = []
    for i in range(len(lines) - 1):
        title, under = lines[i], lines[i + 1]
        if (
            title.strip()
            and _indent(title) == 0
            and not _UNDERLINE.fullmatch(title)
            and _UNDERLINE.fullmatch(under)
            and len(under.rstrip()) >= len(title.rstrip())
        ):
            overlined = i > 0 and lines[i - 1].rstrip() == under.rstrip()
            style = ("over" if overlined else "") + under[0]
            if style not in styles:
                styles.append(style)
            heads.append((i, title.strip(), styles.index(style)))
    for k, (i, title, level) in enumerate(heads):
        end = heads[k + 1][0] if k + 1 < len(heads) else len(lines)
        yield i + 1, title, level, lines[i + 2 : end]


def parse_faq(text: str, source: str = "", max_chars: int = MAX_ANSWER_CHARS) -> list[QAPair]:
    """Question/answer pairs of one FAQ file: every heading that ends in '?'."""
    pairs = []
    for line, title, _, body in sections(text):
        question = rst_inline(title)
        if not question.endswith("?"):
            continue
        answer = make_answer(body, rst_inline, max_chars)
        if len(answer) >= MIN_ANSWER_CHARS:
            pairs.append(QAPair(question, answer, f"{source}:{line}"))
    return pairs


def find_debian_faq() -> Path | None:
    """The FAQ sources of the newest python3.X-doc installed, or None."""
    found = sorted(
        DEBIAN_DOCS.glob("python3.*/html/_sources/faq"),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parts[-4])],
    )
    return found[-1] if found else None


def faq_pairs(faq_dir: str | Path, max_chars: int = MAX_ANSWER_CHARS) -> list[QAPair]:
    faq_dir = Path(faq_dir)
    files = sorted(faq_dir.glob("*.rst.txt")) or sorted(faq_dir.glob("*.rst"))
    if not files:
        raise FaqError(f"{faq_dir}: no FAQ sources (*.rst.txt) there")
    pairs = []
    for file in files:
        pairs += parse_faq(file.read_text(encoding="utf-8"), file.name, max_chars)
    return pairs


# --- the pydoc fallback ---------------------------------------------------------------------


def _lower_first(title: str) -> str:
    return title[0].lower() + title[1:] if len(title) > 1 and title[1].islower() else title


def topic_question(title: str, parent: str | None) -> str:
    statement = re.fullmatch(r'The (".+") statement', title)
    if statement:
        return f"What does the {statement.group(1)} statement do in Python?"
    where = f" in {_lower_first(rendered_inline(parent))}" if parent else ""
    return f"What does the Python documentation say about {_lower_first(rendered_inline(title))}{where}?"


def topic_pairs(max_chars: int = MAX_ANSWER_CHARS) -> list[QAPair]:
    """Pairs from every section of ``pydoc_data.topics`` (rendered text, not reST)."""
    from pydoc_data.topics import topics

    pairs = []
    for name in sorted(topics):
        # Sphinx's text writer wrapped lines after hyphens: "pseudo-\n   compiled".
        text = re.sub(r"(?<=[A-Za-z]-)\n[ \t]*(?=[a-z])", "", topics[name])
        parents: dict[int, str] = {}
        for line, title, level, body in sections(text):
            parents[level] = title
            parent = parents.get(level - 1) if level > 0 else None
            answer = make_answer(body, rendered_inline, max_chars, keep_code=False)
            if len(answer) >= MIN_ANSWER_CHARS:
                pairs.append(
                    QAPair(topic_question(title, parent), answer, f"pydoc_data.topics[{name!r}]:{line}")
                )
    return pairs


def _documented_objects() -> Iterator[tuple[str, str, object]]:
    """(question, source, object) for the built-ins, their methods and DOCSTRING_MODULES."""
    for name in sorted(dir(builtins)):
        obj = getattr(builtins, name)
        if not name.startswith("_") and inspect.isbuiltin(obj):
            yield f"What does the built-in function {name}() do in Python?", f"builtins.{name}", obj
    for cls in BUILTIN_TYPES:
        for name in sorted(vars(cls)):
            obj = vars(cls)[name]
            if not name.startswith("_") and callable(obj):
                yield (
                    f"What does the {cls.__name__}.{name}() method do in Python?",
                    f"{cls.__name__}.{name}",
                    obj,
                )
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        public = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
        for name in sorted(public):
            obj = getattr(module, name, None)
            if inspect.isroutine(obj) and getattr(obj, "__module__", None) in (
                module.__name__,
                module_name,
                "_" + module_name.split(".")[-1],
            ):
                yield f"What does {module_name}.{name}() do in Python?", f"{module_name}.{name}", obj


def docstring_pairs(max_chars: int = MAX_ANSWER_CHARS) -> list[QAPair]:
    """Pairs from docstrings, less the signature lines some start with."""
    pairs = []
    for question, source, obj in _documented_objects():
        lines = (inspect.getdoc(obj) or "").splitlines()
        while lines and (_SIGNATURE.fullmatch(lines[0].strip()) or lines[0].strip() in ("", "--")):
            lines.pop(0)
        answer = make_answer(lines, lambda s: " ".join(s.split()), max_chars, keep_code=False)
        if len(answer) >= MIN_ANSWER_CHARS:
            pairs.append(QAPair(question, answer, source))
    return pairs


def pydoc_pairs(max_chars: int = MAX_ANSWER_CHARS) -> list[QAPair]:
    return topic_pairs(max_chars) + docstring_pairs(max_chars)


# --- the dataset ------------------------------------------------------------------------------


def split_of(question: str) -> str:
    """train, valid or test: fixed by the question's SHA-256 (80/10/10)."""
    bucket = int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:8], "big") % 100
    return next(name for name, upper in SPLITS if bucket < upper)


def deduplicate(pairs: Iterable[QAPair]) -> list[QAPair]:
    """The first pair of each question, case and spacing ignored."""
    kept: dict[str, QAPair] = {}
    for pair in pairs:
        kept.setdefault(" ".join(pair.question.lower().split()), pair)
    return list(kept.values())


@dataclass
class FaqDataset:
    out_dir: Path
    source: str  # "debian" or "pydoc"
    origin: str  # the folder or modules read
    counts: dict[str, int]  # samples per split


def collect_pairs(
    source: str = "auto", faq_dir: str | Path | None = None, max_chars: int = MAX_ANSWER_CHARS
) -> tuple[str, str, list[QAPair]]:
    """(source used, where it was read, deduplicated pairs). ``auto`` reads the Debian FAQ
    when it is installed (or ``faq_dir`` is given) and pydoc otherwise."""
    if source not in SOURCES:
        raise FaqError(f"source {source!r} is unknown (choose from: {', '.join(SOURCES)})")
    if source in ("auto", "debian"):
        folder = Path(faq_dir) if faq_dir else find_debian_faq()
        if folder is not None:
            return "debian", str(folder), deduplicate(faq_pairs(folder, max_chars))
        if source == "debian":
            raise FaqError(
                f"no Python FAQ sources under {DEBIAN_DOCS}/python3.*/html/_sources/faq: "
                "install python3.X-doc (apt-get install python3.11-doc), pass --faq-dir, "
                "or use --source pydoc"
            )
    return "pydoc", "pydoc_data.topics and docstrings", deduplicate(pydoc_pairs(max_chars))


def build_dataset(
    out_dir: str | Path,
    source: str = "auto",
    faq_dir: str | Path | None = None,
    max_chars: int = MAX_ANSWER_CHARS,
) -> FaqDataset:
    """Write train/valid/test.jsonl (``{"prompt", "completion"}`` per line) and info.json."""
    used, origin, pairs = collect_pairs(source, faq_dir, max_chars)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[QAPair]] = {name: [] for name, _ in SPLITS}
    for pair in pairs:
        splits[split_of(pair.question)].append(pair)
    for name, split in splits.items():
        records = ({"prompt": p.question, "completion": p.answer} for p in split)
        write_text_atomic(
            out / f"{name}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        )
    counts = {name: len(split) for name, split in splits.items()}
    info = {
        "source": used,
        "origin": origin,
        "max_answer_chars": max_chars,
        "counts": counts,
        "lines_from": {name: [p.source for p in split] for name, split in splits.items()},
    }
    write_text_atomic(out / "info.json", json.dumps(info, indent=1) + "\n")
    return FaqDataset(out, used, origin, counts)
