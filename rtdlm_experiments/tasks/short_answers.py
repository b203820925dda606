"""Answer extraction and comparison for short-answer tasks: GSM8K's final number and SQuAD-style text
answers (TriviaQA, NQ-open).

Numbers: the reply's answer is the number of its last fixed-form statement (``The final answer is 18``,
``#### 18``, ``\\boxed{18}``, ``the answer is 18``), else its last number; both sides are normalised
(``$``, thousands commas, trailing zeros of decimals) before comparison.

Text: SQuAD's normalisation (lowercase, punctuation and the articles a/an/the removed, whitespace
collapsed); ``exact_match`` is 1 when the normalised answer equals any normalised alias, ``token_f1`` the
best bag-of-tokens F1 over the aliases (Rajpurkar et al. 2016).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal

_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_FIXED_FORM = re.compile(
    rf"(?:final answer is|the answer is|answer:|####)\s*[:=]?\s*\**\s*({_NUMBER})|\\boxed\{{\s*({_NUMBER})",
    re.IGNORECASE,
)
_ANY_NUMBER = re.compile(_NUMBER)


def normalize_number(text: str) -> str:
    """A number's canonical text: no ``$``, spaces or thousands commas, no trailing zeros or point.

    >>> [normalize_number(t) for t in ["$1,000.00", "18", "-3.50", "7.", "0.0", "1e3"]]
    ['1000', '18', '-3.5', '7', '0', '1e3']
    """
    cleaned = text.strip().replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", cleaned):
        return cleaned
    value = Decimal(cleaned)
    canonical = format(value.normalize(), "f") if value != value.to_integral() else str(int(value))
    return "0" if canonical in ("-0", "") else canonical


def final_number(reply: str) -> str | None:
    """The reply's answer: the number of its last fixed-form statement, else its last number (None if it
    has none), normalised.

    >>> final_number("3 + 4 = 7 apples, 2 left. The final answer is $1,000.00. Check: 1000 / 10 = 100")
    '1000'
    >>> final_number("She has 5 - 2 = 3 pens and 10 pencils")
    '10'
    >>> final_number("So the answer is 18.\\n\\nQuestion: 2 + 2 = 4")
    '18'
    >>> final_number("\\\\boxed{42}"), final_number("no digits")
    ('42', None)
    """
    fixed = list(_FIXED_FORM.finditer(reply))
    if fixed:
        last = fixed[-1]
        return normalize_number(last.group(1) or last.group(2))
    numbers = _ANY_NUMBER.findall(reply)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(reply: str, reference: str) -> tuple[float, str]:
    """``(1.0 or 0.0, extracted)``: whether the reply's final number equals the reference number.

    >>> numbers_equal("The final answer is 1,000", "1000")
    (1.0, '1000')
    """
    extracted = final_number(reply)
    return float(extracted is not None and extracted == normalize_number(reference)), extracted or ""


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def squad_normalize(text: str) -> str:
    """SQuAD's answer normalisation: lowercase, punctuation removed, articles removed, whitespace collapsed.

    >>> squad_normalize("The  Beatles!"), squad_normalize("Sunset Blvd."), squad_normalize("an Apple a day")
    ('beatles', 'sunset blvd', 'apple day')
    """
    lowered = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", lowered).split())


def short_answer(reply: str) -> str:
    """The answer part of a short-answer reply: its first non-empty line, without an ``Answer:`` label.

    >>> short_answer("\\nAnswer: The Beatles\\nThey were a band.")
    'The Beatles'
    """
    for line in reply.splitlines():
        if line.strip():
            return re.sub(r"^\s*(?:final\s+)?answer\s*:\s*", "", line.strip(), flags=re.IGNORECASE).strip()
    return ""


def exact_match(answer: str, aliases: Sequence[str]) -> float:
    """1.0 if the SQuAD-normalised answer equals a normalised alias.

    >>> exact_match("the Beatles.", ["Beatles", "The Fab Four"]), exact_match("Beatles band", ["Beatles"])
    (1.0, 0.0)
    """
    normalized = squad_normalize(answer)
    return float(any(normalized == squad_normalize(alias) for alias in aliases))


def token_f1(answer: str, aliases: Sequence[str]) -> float:
    """The best token F1 of the answer against any alias (SQuAD's bag-of-tokens F1).

    >>> round(token_f1("Sunset Boulevard musical", ["Sunset Boulevard", "Sunset Blvd"]), 4)
    0.8
    >>> token_f1("", ["x"])
    0.0
    """
    predicted = squad_normalize(answer).split()
    return max((_f1(predicted, squad_normalize(alias).split()) for alias in aliases), default=0.0)


def _f1(predicted: list[str], reference: list[str]) -> float:
    common = sum((Counter(predicted) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def regex_match(reply: str, patterns: Sequence[str]) -> tuple[float, str]:
    """``(1.0 or 0.0, matched text)``: whether any pattern matches somewhere in the reply.

    >>> regex_match("It is 42 degrees", [r"\\b4[12]\\b"])
    (1.0, '42')
    """
    for pattern in patterns:
        if match := re.search(pattern, reply):
            return 1.0, match.group(0)
    return 0.0, ""
