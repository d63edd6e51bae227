"""Plain-Python metrics on predictions (no torch): usable as non-differentiable objectives.

SQuAD normalization and token F1 follow the official SQuAD evaluation script (lower-case,
strip punctuation, drop the articles a/an/the, collapse whitespace); F1 and EM take the
maximum over the gold answers. If either side normalizes to no tokens, F1 is 1 when both do
and 0 otherwise (the SQuAD v2 rule).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Collection, Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD answer normalization."""
    text = str(text).lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _golds(gold_answers: str | Iterable[str]) -> list[str]:
    golds = [gold_answers] if isinstance(gold_answers, str) else [str(g) for g in gold_answers]
    if not golds:
        raise ValueError("no gold answers given")
    return golds


def _f1_single(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def squad_f1(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """Token F1 of one prediction, maximum over its gold answers (0..1)."""
    return max(_f1_single(prediction, g) for g in _golds(gold_answers))


def exact_match(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """1.0 if the normalized prediction equals a normalized gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(gold_answers)))


def mean_squad_f1(predictions: Sequence[str], gold_answers: Sequence[Iterable[str]]) -> float:
    """Mean of :func:`squad_f1` over examples."""
    _check_lengths(predictions, gold_answers)
    return sum(squad_f1(p, g) for p, g in zip(predictions, gold_answers)) / len(predictions)


def mean_exact_match(predictions: Sequence[str], gold_answers: Sequence[Iterable[str]]) -> float:
    """Mean of :func:`exact_match` over examples."""
    _check_lengths(predictions, gold_answers)
    return sum(exact_match(p, g) for p, g in zip(predictions, gold_answers)) / len(predictions)


def accuracy(predictions: Sequence[int], golds: Sequence[int | Collection[int]]) -> float:
    """Fraction of predicted candidate indices equal to the gold index (or in the gold set)."""
    _check_lengths(predictions, golds)
    hits = 0
    for p, g in zip(predictions, golds):
        hits += int(p in g) if isinstance(g, Collection) else int(p == g)
    return hits / len(predictions)


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} gold entries")
    if not a:
        raise ValueError("no predictions to score")


__all__ = ["normalize_answer", "squad_f1", "exact_match", "mean_squad_f1", "mean_exact_match", "accuracy"]
