"""String stop sequences, checked incrementally on decoded text (like HF ``stop_strings``, vLLM ``stop``).

A stop string can span several tokens and a token can hold several stop strings, so the check runs on
text: after each accepted token (or chunk of tokens, for draft-then-verify decoders) the row's generated
tokens are decoded and the new part of the text is searched. The row ends with the token that completes
the first stop string; `truncate_at_stop` then cuts the text before it (the stop string is not output).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Detokenize = Callable[[Sequence[int]], str]


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string.

    >>> truncate_at_stop("    return x\\ndef g():", ["\\ndef ", "\\nclass "])
    '    return x'
    >>> truncate_at_stop("no stop here", ["\\ndef "])
    'no stop here'
    """
    cut = len(text)
    for stop in stop_strings:
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


@dataclass(frozen=True)
class StopStrings:
    """The stop strings of a generation call and how to turn token ids into text.

    Immutable and shareable; each `generate` call takes its own `StopStringTracker` with `start`.
    """

    strings: tuple[str, ...]
    detokenize: Detokenize

    def __post_init__(self) -> None:
        if any(not isinstance(s, str) or not s for s in self.strings):
            raise ValueError(f"stop_strings={list(self.strings)!r} is invalid: must be non-empty strings")

    @classmethod
    def with_tokenizer(cls, strings: Sequence[str], tokenizer: Any) -> StopStrings:
        """``strings`` matched on the text a tokenizer's ``decode`` gives, special tokens dropped (the text
        the user sees).

        >>> class Letters:
        ...     def decode(self, ids, skip_special_tokens=False):
        ...         return "".join("ab"[i] for i in ids)
        >>> StopStrings.with_tokenizer(["ba"], Letters()).detokenize((0, 1, 0))
        'aba'
        """
        return cls(tuple(strings), lambda ids: tokenizer.decode(list(ids), skip_special_tokens=True))

    def start(self, num_rows: int) -> StopStringTracker:
        """A fresh per-call tracker for ``num_rows`` rows."""
        return StopStringTracker(self, [[] for _ in range(num_rows)], [0] * num_rows)


@dataclass
class StopStringTracker:
    """Per-call state: each row's generated tokens and how far its text has been searched."""

    stops: StopStrings
    tokens: list[list[int]]
    searched_chars: list[int] = field(default_factory=list)

    def extend(self, row: int, new_tokens: Sequence[int]) -> int | None:
        """Append ``new_tokens`` to ``row``; if they complete a stop string, return how many of them to
        keep (the first ``k`` tokens, the k-th completing the earliest stop), else None.

        After a stop the caller drops the remaining new tokens and ends the row; the tracker keeps only
        the kept tokens.
        """
        new_tokens = [int(t) for t in new_tokens]
        if not new_tokens:
            return None
        before = self.tokens[row]
        found, text_length = self._search(row, before + new_tokens)
        if not found:
            # Re-search a margin of old text next time: a stop may begin in it, and the last characters of
            # a prefix that ends inside a multi-byte character change once the character is complete.
            self.tokens[row] = before + new_tokens
            self.searched_chars[row] = max(0, text_length - self._margin)
            return None
        for kept in range(1, len(new_tokens) + 1):
            if self._search(row, before + new_tokens[:kept])[0]:
                self.tokens[row] = before + new_tokens[:kept]
                return kept
        raise AssertionError("unreachable: the full extension contained a stop string")

    @property
    def _margin(self) -> int:
        return max((len(s) for s in self.stops.strings), default=0) + 2

    def _search(self, row: int, tokens: list[int]) -> tuple[bool, int]:
        """Whether the text of ``tokens`` holds a stop string past the searched part, and its length."""
        text = self.stops.detokenize(tokens)
        start = self.searched_chars[row]
        return any(text.find(stop, start) != -1 for stop in self.stops.strings), len(text)
