"""Short-answer scoring against reference answers: exact match and containment after normalisation.

A reference is one string or a list of acceptable strings; a generation scores 1.0 if it matches any.
Normalisation lowercases, turns punctuation into spaces and collapses whitespace, so ``"Paris."`` and
``" paris"`` are the same answer; it keeps letters and digits of every script.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

Answer = str | Sequence[str]

_WHITESPACE = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercase, punctuation and symbols to spaces, whitespace collapsed and stripped.

    >>> normalize_answer("  The  Rayleigh-scattering, of LIGHT!\\n")
    'the rayleigh scattering of light'
    >>> normalize_answer("3.14")
    '3 14'
    """
    folded = unicodedata.normalize("NFKC", text).casefold()
    spaced = "".join(" " if unicodedata.category(char)[0] in "PSZC" else char for char in folded)
    return _WHITESPACE.sub(" ", spaced).strip()


def _references(answer: Answer) -> list[str]:
    references = [answer] if isinstance(answer, str) else list(answer)
    normalized = [normalize_answer(reference) for reference in references]
    return [reference for reference in normalized if reference]


def exact_match(generation: str, answer: Answer) -> float:
    """1.0 if the normalised generation equals a normalised reference, else 0.0.

    >>> exact_match("Paris.", "paris")
    1.0
    >>> exact_match("It is Paris.", ["Paris", "City of Light"])
    0.0
    """
    normalized = normalize_answer(generation)
    return float(any(normalized == reference for reference in _references(answer)))


def contains_answer(generation: str, answer: Answer) -> float:
    """1.0 if a normalised reference occurs in the normalised generation as whole words, else 0.0.

    >>> contains_answer("It is Paris, of course.", ["Lyon", "paris"])
    1.0
    >>> contains_answer("Comparison", "paris")
    0.0
    """
    padded = f" {normalize_answer(generation)} "
    return float(any(f" {reference} " in padded for reference in _references(answer)))


def answer_metrics(generations: Sequence[str], answers: Sequence[Answer | None]) -> dict[str, float]:
    """Mean ``exact_match`` and ``contains_answer`` over the generations whose prompt has an answer
    (``{}`` when none has).

    >>> answer_metrics(["Paris", "Lyon, I think", "a story"], ["Paris", "lyon", None])
    {'exact_match': 0.5, 'contains_answer': 1.0}
    """
    if len(generations) != len(answers):
        raise ValueError(f"{len(generations)} generations but {len(answers)} answers")
    scored = [(text, answer) for text, answer in zip(generations, answers, strict=True) if answer is not None]
    if not scored:
        return {}
    return {
        "exact_match": sum(exact_match(text, answer) for text, answer in scored) / len(scored),
        "contains_answer": sum(contains_answer(text, answer) for text, answer in scored) / len(scored),
    }
