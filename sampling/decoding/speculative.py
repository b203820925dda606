"""Speculative sampling with a separate, smaller draft model sharing the target's tokenizer."""

from __future__ import annotations

from typing import Any

import torch

from sampling.decoding.base import CausalLM
from sampling.decoding.draft_verify import (
    Drafts,
    DraftSession,
    DraftVerifyDecoder,
    RoundState,
    sample_from_probs,
)


def draft_confidence(logits: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """The draft model's own probability of each drafted token: softmax(logits)[x], from the raw logits
    (a greedy q is a point mass, so q(x) would always be 1).

    >>> draft_confidence(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([1, 0])).tolist()
    [0.5, 0.8807970285415649]
    """
    return torch.softmax(logits.float(), dim=-1).gather(1, drafts.unsqueeze(1)).squeeze(1)


def end_unsure_drafts(
    lengths: torch.Tensor,
    confidence: torch.Tensor,
    min_confidence: float,
    position: int,
    active: torch.Tensor,
) -> bool:
    """Rows still drafting whose draft at ``position`` had ``confidence`` < ``min_confidence`` keep it and
    stop there (``lengths`` set to position + 1, in place). True when no *active* row drafts on: a row
    that already finished must not keep a round's drafting going.

    >>> lengths = torch.tensor([3, 3, 3])
    >>> end_unsure_drafts(lengths, torch.tensor([0.9, 0.1, 0.9]), 0.5, 0, torch.tensor([True, True, False]))
    False
    >>> lengths.tolist()
    [3, 1, 3]
    >>> end_unsure_drafts(lengths, torch.tensor([0.1, 0.1, 0.9]), 0.5, 1, torch.tensor([True, True, False]))
    True
    >>> lengths.tolist()
    [2, 1, 3]
    """
    unsure = (confidence < min_confidence) & (lengths > position + 1)
    lengths[unsure] = position + 1
    return bool((lengths[active] <= position + 1).all())


class DraftModelSession(DraftSession):
    """One call's draft model cache, and how many of the batch's positions it holds.

    With ``min_confidence`` > 0 a row stops drafting after a draft its model gave less than that
    probability (HF's ``assistant_confidence_threshold``), and the round stops once every row has: long
    drafts where the draft is sure, short ones where it is not. The cut depends only on the draft's side
    (its logits and its draws), so each emitted token is still distributed as the target's (lossless).
    """

    def __init__(self, target: CausalLM, draft_model: CausalLM, min_confidence: float = 0.0) -> None:
        super().__init__(target)
        self.draft_model = draft_model
        self.min_confidence = min_confidence
        self.cache: Any = draft_model.new_cache()
        self.cached = 0  # the prompt is prefilled by the first catch_up: never, if the policy never drafts

    def _forward(self, inputs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = self.draft_model.forward(inputs.clamp(min=0), self.cache, mask, last_positions=1)
        self.cached = mask.shape[1]
        return logits[:, -1]

    def catch_up(self, state: RoundState) -> None:
        # A drafting round leaves at most two tokens unseen (its last draft, if kept, and the pending
        # token), which propose's first forward takes; a longer backlog is the prompt or plain rounds.
        if state.width - self.cached > 2:
            self._forward(state.tokens[:, self.cached : -1], state.attention_mask[:, :-1])

    def propose(self, state: RoundState, gamma: int) -> Drafts:
        batch = state.tokens.shape[0]
        mask = state.attention_mask
        logits = self._forward(state.tokens[:, self.cached :], mask)
        state.draft_forwards += 1
        drafts = torch.zeros(batch, gamma, dtype=torch.long, device=state.tokens.device)
        lengths = torch.full((batch,), gamma, dtype=torch.long, device=drafts.device)
        probs, sampler_state = [], state.sampler_state
        for i in range(gamma):
            q = state.draft_distribution(logits, drafts[:, :i], sampler_state)
            drafts[:, i] = sample_from_probs(q, state.seeds, state.emitted + i)
            probs.append(q)
            if self.min_confidence > 0 and end_unsure_drafts(
                lengths, draft_confidence(logits, drafts[:, i]), self.min_confidence, i, state.active
            ):
                return Drafts(drafts[:, : i + 1], torch.stack(probs, dim=1), lengths)
            sampler_state = state.advance_draft_state(sampler_state, logits, drafts[:, : i + 1])
            if i + 1 < gamma:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                logits = self._forward(drafts[:, i : i + 1], mask)
                state.draft_forwards += 1
        return Drafts(drafts, torch.stack(probs, dim=1), lengths)

    def rollback(self, keep: int) -> None:
        if self.cached > keep:
            self.draft_model.crop_cache(self.cache, keep)
            self.cached = keep


class SpeculativeDecoder(DraftVerifyDecoder):
    """Drafts γ tokens from ``draft_model``'s sampling distribution q (same config, same history as
    the target), verified against the target's p. Lossless: the output is distributed as autoregressive
    sampling from the target. ``policy`` picks γ per round (see `DraftVerifyDecoder`; with
    ``policy="heuristic"`` γ grows by 2 after a round where every draft passed and shrinks by 1 otherwise,
    HF's heuristic). ``min_confidence`` > 0 also ends a row's drafts early after one the
    draft model was unsure of (`DraftModelSession`)."""

    def __init__(
        self, draft_model: CausalLM, num_draft_tokens: int = 4, min_confidence: float = 0.0, **options: Any
    ) -> None:
        """``options``: the other `DraftVerifyDecoder` keywords (``policy``, ``keep_stop_token``, ...)."""
        if not 0.0 <= min_confidence < 1.0:
            raise ValueError(f"min_confidence={min_confidence} is invalid: must be in [0, 1) (0: off)")
        super().__init__(num_draft_tokens, **options)
        self.draft_model = draft_model
        self.min_confidence = min_confidence

    def open_session(self, target: CausalLM, state: RoundState) -> DraftModelSession:
        if self.draft_model.vocab_size != target.vocab_size:
            raise ValueError(
                f"draft vocab ({self.draft_model.vocab_size}) differs from the target's "
                f"({target.vocab_size}): speculative decoding needs a draft with the target's tokenizer"
            )
        return DraftModelSession(target, self.draft_model, self.min_confidence)
