"""What one draft-verify round works on: the batch's tokens so far, the drafts, and the per-call drafter.

Everything here is per `generate` call: a decoder instance holds only its settings and opens a fresh
`RoundState` and `DraftSession` for every call, so one instance can serve concurrent calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from sampling.decoding.base import CausalLM
from sampling.sampler import TokenSampler

HOLE = -1


def kept_prefix(
    tokens: Sequence[int], stops: frozenset[int], keep_stop_token: bool, room: int
) -> tuple[int, bool]:
    """How many of a row's new ``tokens`` to keep, and whether a stop token ended the row: tokens up to
    its first stop token (included only with ``keep_stop_token``), at most ``room`` of them.

    >>> kept_prefix([4, 2, 9], frozenset({2}), False, 5), kept_prefix([4, 2, 9], frozenset({2}), True, 5)
    ((1, True), (2, True))
    >>> kept_prefix([4, 5, 9], frozenset({2}), False, 2)
    (2, False)
    """
    for position, token in enumerate(tokens):
        if position >= room:
            return room, False
        if token in stops:
            return position + int(keep_stop_token), True
    return min(len(tokens), room), False


@dataclass
class Drafts:
    """Proposals for one round: ``tokens`` [B, γ]; ``probs`` [B, γ, V] the draft's sampling distribution
    (None: each draft is a point mass); ``lengths`` [B] how many of a row's γ columns are real drafts."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    lengths: torch.Tensor


def no_drafts(batch: int, device: torch.device) -> Drafts:
    """An empty round: the target just scores each row's pending token."""
    empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return Drafts(empty, None, torch.zeros(batch, dtype=torch.long, device=device))


@dataclass
class RoundState:
    """Everything a proposer may read about the batch: ``tokens`` [B, S] (prompt + kept tokens, -1 for
    padding and holes; column S-1 is each row's pending token, not yet in the target cache)."""

    tokens: torch.Tensor
    prompt_width: int
    emitted: torch.Tensor
    """[B] tokens emitted so far per row: the position of the next token."""
    seeds: torch.Tensor
    sampler: TokenSampler
    target_cache: Any
    draft_forwards: int = 0

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.tokens >= 0).long()

    def histories(self, extra: torch.Tensor) -> torch.Tensor:
        """Contexts for positions 0..k: row-major ``[B·(k+1), S+k]``; position i sees ``extra[:, :i]``."""
        batch, k = extra.shape
        full = torch.cat([self.tokens, extra], dim=1)
        limit = self.width + torch.arange(k + 1, device=full.device)
        visible = torch.arange(full.shape[1], device=full.device) < limit.unsqueeze(1)
        return torch.where(visible, full.unsqueeze(1), HOLE).reshape(batch * (k + 1), -1)

    def distributions(self, logits: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """Sampling distributions [B, k+1, V] for ``logits`` [B, k+1, V] scored after ``extra`` [B, k]."""
        batch, positions, vocab = logits.shape
        history = self.histories(extra)
        probs = self.sampler.distribution(
            logits.reshape(batch * positions, vocab), history, generated=history[:, self.prompt_width :]
        )
        return probs.reshape(batch, positions, vocab)

    def draft_distribution(self, logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
        """The sampling distribution [B, V] of a draft model's ``logits`` [B, V] after ``drafts`` [B, i]."""
        history = torch.cat([self.tokens, drafts], dim=1)
        return self.sampler.distribution(logits, history, generated=history[:, self.prompt_width :])


class DraftSession:
    """One `generate` call's drafter: proposes drafts, has the target score them, rolls back its caches.

    Subclasses keep whatever the drafting needs between rounds (a draft model's cache, saved hidden
    states) on the session, never on the decoder.
    """

    def __init__(self, target: CausalLM) -> None:
        self.target = target

    def propose(self, state: RoundState, gamma: int) -> Drafts:
        raise NotImplementedError

    def score(self, state: RoundState, drafts: Drafts) -> torch.Tensor:
        """Target logits [B, γ+1, V] for ``[pending, drafts]``; the target cache grows by γ+1."""
        inputs = torch.cat([state.tokens[:, -1:], drafts.tokens], dim=1).clamp(min=0)
        mask = torch.cat([state.attention_mask, torch.ones_like(drafts.tokens)], dim=1)
        return self.target.forward(inputs, state.target_cache, mask)

    def rollback(self, keep: int) -> None:
        """Crop every cache this session owns to ``keep`` positions (the target's is done already)."""
