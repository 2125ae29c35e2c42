"""ROUGE-L (Lin 2004, "ROUGE: A Package for Automatic Evaluation of Summaries", sec. 3.1).

For a reference R of m tokens and a candidate C of n tokens, with LCS(R, C) the length of
their longest common subsequence (tokens in the same order, not necessarily adjacent):

    recall    = LCS / m
    precision = LCS / n
    F1        = 2 * precision * recall / (precision + recall)   (0 when LCS = 0)

Lin's F-measure has a beta; beta = 1 (the plain F1) is what Google's ``rouge-score`` package
reports as ``rougeL.fmeasure`` and what evaluation tables usually mean by ROUGE-L.

Tokenization (``tokenize``): lowercase, then every maximal run of letters and digits is a
token; punctuation, symbols and underscores separate tokens and are dropped. On ASCII text
this is exactly ``rouge-score``'s default tokenizer (no stemming); unlike it, letters outside
ASCII (``café``, ``東京``) are kept as letters rather than turned into separators. An empty
reference or candidate scores 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"[^\W_]+")  # letters and digits of any script


@dataclass(frozen=True)
class RougeL:
    precision: float
    recall: float
    f1: float
    lcs: int


def tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length by dynamic programming, O(len(a) * len(b)) time and
    O(len(b)) memory: row[j] is the LCS of the prefix of ``a`` read so far and b[:j]."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # the previous row's value at j - 1
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(reference: str, candidate: str) -> RougeL:
    ref, cand = tokenize(reference), tokenize(candidate)
    lcs = lcs_length(ref, cand)
    if lcs == 0:
        return RougeL(0.0, 0.0, 0.0, 0)
    precision, recall = lcs / len(cand), lcs / len(ref)
    return RougeL(precision, recall, 2 * precision * recall / (precision + recall), lcs)
