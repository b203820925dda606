"""Prompt-lookup decoding: drafts copied from earlier context that follows the latest n-gram."""

from __future__ import annotations

from typing import Any

import torch

from sampling.decoding.base import CausalLM
from sampling.decoding.draft_verify import Drafts, DraftSession, DraftVerifyDecoder, RoundState


def lookup_draft(context: list[int], max_ngram: int, num_tokens: int) -> list[int]:
    """The tokens that followed the most recent earlier occurrence of the longest matching suffix n-gram
    (n from ``max_ngram`` down to 1), at most ``num_tokens`` of them; [] when nothing matches.

    >>> lookup_draft([1, 2, 3, 4, 9, 1, 2, 3], max_ngram=3, num_tokens=2)
    [4, 9]
    """
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        suffix = context[-n:]
        for start in range(len(context) - n - 1, -1, -1):
            if context[start : start + n] == suffix:
                follow = context[start + n : start + n + num_tokens]
                if follow:
                    return follow
    return []


class PromptLookupSession(DraftSession):
    """Drafts read from each row's own tokens; nothing to keep between rounds but the n-gram limit."""

    def __init__(self, target: CausalLM, max_ngram: int) -> None:
        super().__init__(target)
        self.max_ngram = max_ngram

    def propose(self, state: RoundState, gamma: int) -> Drafts:
        rows = [[t for t in row if t >= 0] for row in state.tokens.tolist()]
        found = [lookup_draft(row, self.max_ngram, gamma) for row in rows]
        drafts = torch.zeros(len(rows), max(map(len, found)), dtype=torch.long)
        for r, tokens in enumerate(found):
            drafts[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        lengths = torch.tensor([len(t) for t in found], dtype=torch.long)
        device = state.tokens.device
        return Drafts(drafts.to(device), None, lengths.to(device))


class PromptLookupDecoder(DraftVerifyDecoder):
    """Drafts are point masses (q = 1 at the copied token), so a draft x is accepted with probability
    p(x) and a rejection resamples from p with x removed: still exactly the target's distribution."""

    def __init__(self, max_ngram: int = 3, num_draft_tokens: int = 4, **options: Any) -> None:
        """``options``: the other `DraftVerifyDecoder` keywords (``policy``, ``keep_stop_token``, ...)."""
        super().__init__(num_draft_tokens, **options)
        if max_ngram < 1:
            raise ValueError(f"max_ngram={max_ngram} is invalid: must be >= 1")
        self.max_ngram = max_ngram

    def open_session(self, target: CausalLM, state: RoundState) -> PromptLookupSession:
        return PromptLookupSession(target, self.max_ngram)
