"""ROUGE-L F1: hand-worked longest common subsequences, then rouge-score as the reference."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest

from mlxmoe.rouge import lcs_length, rouge_l, tokenize


def test_lins_paper_example_scores_the_in_order_match_higher():
    # Lin (2004), sec. 3.1: S1 is the reference. S2 shares "police the gunman" (LCS 3 of 4);
    # S3 only "the gunman" (2 of 4), so ROUGE-L ranks S2 above S3 where ROUGE-2 cannot.
    reference = "police killed the gunman"
    s2 = rouge_l(reference, "police kill the gunman")
    s3 = rouge_l(reference, "the gunman kill police")
    assert (s2.lcs, s2.precision, s2.recall, s2.f1) == (3, 0.75, 0.75, 0.75)
    assert (s3.lcs, s3.precision, s3.recall, s3.f1) == (2, 0.5, 0.5, 0.5)


def test_lcs_skips_tokens_in_between():
    # A X C Y E against A B C D E F: the LCS is A C E (3). P = 3/5, R = 3/6,
    # F1 = 2 * (3/5) * (1/2) / (3/5 + 1/2) = (3/5) / (11/10) = 6/11.
    score = rouge_l("a b c d e f", "a x c y e")
    assert score.lcs == 3
    assert score.precision == pytest.approx(3 / 5)
    assert score.recall == pytest.approx(1 / 2)
    assert score.f1 == pytest.approx(float(Fraction(6, 11)))


def test_repeated_tokens_count_once_per_position():
    # "a b a b" vs "b a b a": "b a b" (or "a b a") is common, the whole of either is not.
    score = rouge_l("a b a b", "b a b a")
    assert score.lcs == 3 and score.f1 == pytest.approx(0.75)


def test_case_and_punctuation_do_not_count():
    # Tokens: [use, reversed, items, or, items, 1] and [use, items, 1]: LCS 3,
    # P = 3/3, R = 3/6, F1 = 2 * 1 * 0.5 / 1.5 = 2/3.
    score = rouge_l("Use reversed(items) or items[::-1].", "USE items[::-1]")
    assert score.lcs == 3
    assert (score.precision, score.recall) == (1.0, 0.5)
    assert score.f1 == pytest.approx(2 / 3)


def test_identical_disjoint_and_empty_texts():
    assert rouge_l("The capital of France is Paris.", "the capital of france is paris").f1 == 1.0
    assert rouge_l("red green blue", "cat dog fox").f1 == 0.0
    assert rouge_l("red green blue", "").f1 == 0.0
    assert rouge_l("", "red").f1 == 0.0
    assert rouge_l("...", "!!!").f1 == 0.0  # no tokens at all


def test_lcs_length_textbook_example():
    # Cormen et al., "Introduction to Algorithms", sec. 15.4: LCS(ABCBDAB, BDCABA) = 4 (BCBA).
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4
    assert lcs_length(list("BDCABA"), list("ABCBDAB")) == 4
    assert lcs_length([], list("abc")) == 0


def test_tokenizer_splits_on_non_alphanumerics_and_keeps_non_ascii_letters():
    assert tokenize("x_y = f(a, b)  # 42") == ["x", "y", "f", "a", "b", "42"]
    assert tokenize("Naïve CAFÉ") == ["naïve", "café"]


def _sentences(rng: random.Random, n: int) -> list[str]:
    words = [
        "the",
        "list",
        "dict",
        "Python",
        "returns",
        "a",
        "new",
        "copy",
        "of",
        "it",
        "sort()",
        "key=len",
        "x[::-1]",
        "(fast)",
        "is",
        "not",
        "in-place",
        "3.11",
    ]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 14))) for _ in range(n)]


def test_matches_rouge_score_on_ascii_text():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    references, candidates = _sentences(rng, 300), _sentences(rng, 300)
    for reference, candidate in zip(references, candidates):
        ours = rouge_l(reference, candidate)
        theirs = scorer.score(reference, candidate)["rougeL"]
        assert ours.precision == pytest.approx(theirs.precision), (reference, candidate)
        assert ours.recall == pytest.approx(theirs.recall), (reference, candidate)
        assert ours.f1 == pytest.approx(theirs.fmeasure), (reference, candidate)
