"""The Python FAQ data set: the reST parser on excerpts of the real Debian files, the pydoc
fallback, the fixed split and `mlxmoe data python-faq`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from mlxmoe.data import faq
from mlxmoe.data.faq import QAPair, deduplicate, parse_faq, rst_inline, split_of

FIXTURES = Path(__file__).parent / "fixtures" / "faq"


def parsed(name: str, **kwargs) -> dict[str, str]:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return {p.question: p.answer for p in parse_faq(text, name, **kwargs)}


def test_every_heading_ending_in_a_question_mark_is_a_question():
    assert list(parsed("programming.rst.txt")) == [
        "Is there a source code level debugger with breakpoints, single-stepping, etc.?",
        "Are there tools to help find bugs or perform static analysis?",
        "How can I create a stand-alone binary from a Python script?",
        "Are there coding standards or a style guide for Python programs?",
        "Why am I getting an UnboundLocalError when the variable has a value?",
        "What are the rules for local and global variables in Python?",
    ]  # not "Programming FAQ", "General Questions" nor "Core Language"


def test_an_answer_ends_at_the_next_heading_of_any_level():
    # The section is followed by a top-level heading (Core Language) and a label before it.
    answers = parsed("programming.rst.txt")
    assert answers["Are there coding standards or a style guide for Python programs?"] == (
        "Yes. The coding style required for standard library modules is documented as PEP 8."
    )
    library = parsed("library.rst.txt")  # an excerpt that ends with "Common tasks\n====="
    assert library["Is there an equivalent to C's onexit() in Python?"] == (
        "The atexit module provides a register function that is similar to C's onexit()."
    )


def test_inline_markup_becomes_the_text_sphinx_shows():
    assert (
        rst_inline("the built-in function :func:`breakpoint` allows")
        == "the built-in function breakpoint() allows"
    )
    assert rst_inline("`Pylint <https://pylint.pycqa.org/en/latest/index.html>`_ and") == "Pylint and"
    assert rst_inline("documented as :pep:`8`.") == "documented as PEP 8."
    assert (
        rst_inline(":mod:`documented in the Library Reference Manual <pdb>`")
        == "documented in the Library Reference Manual"
    )
    assert (
        rst_inline("an :exc:`!UnboundLocalError`: use :meth:`~str.join`")
        == "an UnboundLocalError: use join()"
    )
    assert rst_inline("*typing* or **bold**, but not 2*3*4") == "typing or bold, but not 2*3*4"
    assert (
        rst_inline(r'``S.rstrip("\r\n")`` keeps its backslashes, \*this\* does not')
        == r'S.rstrip("\r\n") keeps its backslashes, *this* does not'
    )
    assert rst_inline("a footnote [#]_ and :kbd:`Ctrl-Z`") == "a footnote and Ctrl-Z"


def test_answers_carry_no_rst_markup():
    for name in ("programming.rst.txt", "design.rst.txt", "extending.rst.txt", "library.rst.txt"):
        for question, answer in parsed(name).items():
            for markup in ("``", ":func:", ":ref:", "`_", "<https", "\n.. ", "::\n"):
                assert markup not in question + answer, (name, question, markup)
            assert not answer.startswith(".. ")


def test_a_literal_may_span_lines():
    answer = parsed("extending.rst.txt")["Can I create my own functions in C++?"]
    assert answer.startswith(
        'Yes, using the C compatibility features found in C++. Place extern "C" { ... } around '
        'the Python include files and put extern "C" before each function'
    )


def test_code_is_kept_dedented_and_answers_end_on_prose():
    design = parsed("design.rst.txt")
    assert design["Why are floating-point calculations so inaccurate?"] == (
        "Users are often surprised by results like this:\n\n"
        ">>> 1.2 - 1.0\n0.19999999999999996\n\n"
        "and think it is a bug in Python. It's not. This has little to do with Python, and much "
        "more to do with how the underlying platform handles floating-point numbers."
    )
    # Cut by the length cap after "...code like this::" + a C fragment: both left out.
    assert design["Why does Python use indentation for grouping of statements?"] == (
        "Guido van Rossum believes that using indentation for grouping is extremely elegant and "
        "contributes a lot to the clarity of the average Python program. Most people learn to "
        "love this feature after a while."
    )


def test_directives_comments_and_labels_are_left_out():
    answer = parsed("extending.rst.txt")["Can I create my own functions in C?"]
    assert answer == (
        "Yes, you can create built-in modules containing functions, variables, exceptions and "
        "even new types in C. This is explained in the document extending index.\n\n"
        "Most intermediate or advanced Python books will also cover this topic."
    )


def test_long_answers_keep_whole_paragraphs_or_the_first_sentences():
    answers = parsed("programming.rst.txt", max_chars=200)
    assert answers["Is there a source code level debugger with breakpoints, single-stepping, etc.?"] == (
        "Yes.\n\nSeveral debuggers for Python are described below, and the built-in function "
        "breakpoint() allows you to drop into any of them."
    )
    # A first paragraph longer than the cap is cut after its last whole sentence that fits.
    assert answers["How can I create a stand-alone binary from a Python script?"] == (
        "You don't need the ability to compile Python to C code if all you want is a stand-alone "
        "program that users can download and run without having to install the Python "
        "distribution first."
    )
    assert all(len(a) <= 200 for a in answers.values())


@pytest.mark.proof("faq")
def test_the_fixture_parses_as_the_installed_package_does():
    installed = faq.find_debian_faq()
    if installed is None or not (installed / "programming.rst.txt").is_file():
        pytest.skip("python3.X-doc is not installed")
    for name in ("programming.rst.txt", "design.rst.txt", "extending.rst.txt", "library.rst.txt"):
        whole = {p.question: p.answer for p in parse_faq((installed / name).read_text(), name)}
        for question, answer in parsed(name).items():
            assert whole.get(question) == answer, (name, question)


def test_questions_are_deduplicated_ignoring_case_and_spacing():
    pairs = [
        QAPair("What is Python?", "first", "a"),
        QAPair("what is  python?", "second", "b"),
        QAPair("What is a class?", "third", "c"),
    ]
    assert [p.answer for p in deduplicate(pairs)] == ["first", "third"]


def test_the_split_is_fixed_by_the_question_hash():
    for question in parsed("programming.rst.txt"):
        bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % 100
        expected = "train" if bucket < 80 else "valid" if bucket < 90 else "test"
        assert split_of(question) == expected
    questions = [f"What does x{i} do?" for i in range(2000)]
    shares = {name: sum(split_of(q) == name for q in questions) / 2000 for name in ("train", "valid", "test")}
    assert shares["train"] == pytest.approx(0.8, abs=0.03)
    assert shares["valid"] == pytest.approx(0.1, abs=0.02)
    assert shares["test"] == pytest.approx(0.1, abs=0.02)


def test_pydoc_fallback_turns_topics_and_docstrings_into_plain_answers():
    pairs = {p.question: p for p in faq.pydoc_pairs()}
    assert len(pairs) > 300
    loop = pairs['What does the "for" statement do in Python?']
    assert loop.answer.startswith(
        'The "for" statement is used to iterate over the elements of a '
        "sequence (such as a string, tuple or list) or other iterable object."
    )
    assert loop.source.startswith("pydoc_data.topics[")
    assert (
        pairs["What does the built-in function abs() do in Python?"].answer
        == "Return the absolute value of the argument."
    )
    assert "What does the str.split() method do in Python?" in pairs
    for pair in pairs.values():
        assert "::=" not in pair.answer  # grammar rules are left out
        assert len(pair.answer) <= faq.MAX_ANSWER_CHARS


def test_auto_falls_back_to_pydoc_and_debian_explains_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(faq, "DEBIAN_DOCS", tmp_path)
    used, _, pairs = faq.collect_pairs("auto")
    assert used == "pydoc" and pairs
    with pytest.raises(faq.FaqError, match="python3.11-doc"):
        faq.collect_pairs("debian")
    used, origin, pairs = faq.collect_pairs("auto", faq_dir=FIXTURES)
    assert used == "debian" and origin == str(FIXTURES) and len(pairs) == 19


def test_cli_writes_splits_that_training_can_read(tmp_path):
    from click.testing import CliRunner
    from tiny_models import make_tokenizer

    from mlxmoe.cli import main
    from mlxmoe.data import load_dataset

    out = tmp_path / "faq"
    result = CliRunner().invoke(
        main, ["data", "python-faq", str(out), "--source", "debian", "--faq-dir", str(FIXTURES)]
    )
    assert result.exit_code == 0, result.output
    rows = {}
    for name in ("train", "valid", "test"):
        lines = (out / f"{name}.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines]
        assert all(set(r) == {"prompt", "completion"} for r in rows[name])
        assert all(split_of(r["prompt"]) == name for r in rows[name])
    assert sum(len(r) for r in rows.values()) == 19
    info = json.loads((out / "info.json").read_text())
    assert info["source"] == "debian" and info["counts"]["train"] == len(rows["train"])
    tokenizer = make_tokenizer(tmp_path / "tok")
    dataset = load_dataset(out / "train.jsonl", tokenizer, max_seq_len=512)
    assert len(dataset.examples) == len(rows["train"])
