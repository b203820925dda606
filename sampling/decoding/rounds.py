"""What one draft-verify round works on: the batch's tokens so far, the drafts, and the per-call drafter.

Everything here is per `generate` call: a decoder instance holds only its settings and opens a fresh
`RoundState` and `DraftSession` for every call, so one instance can serve concurrent calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sampling.decoding.base import CausalLM
from sampling.sampler import SamplerState, TokenSampler

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
    padding and holes; column S-1 is each row's pending token, not yet in the target cache).

    Sampler state (mirostat's μ per row) is ``sampler_state``: the state after every *kept* token. Within
    a round, position i's target distribution uses it advanced through drafts 1..i−1 with the target's
    logits (`distributions`); after verification `commit_state` advances it through the accepted drafts
    and the drawn token only, so a rejected draft leaves no trace. A draft model's proposals start from
    the same committed state and advance it with the draft's own logits (`draft_distribution`,
    `advance_draft_state`). XTC's coin is keyed by (row seed, position), on both sides.
    """

    tokens: torch.Tensor
    prompt_width: int
    emitted: torch.Tensor
    """[B] tokens emitted so far per row: the position of the next token."""
    seeds: torch.Tensor
    sampler: TokenSampler
    target_cache: Any
    active: torch.Tensor
    """[B] bool: rows still decoding (a finished row's drafts are scored with the batch but ignored)."""
    draft_forwards: int = 0
    sampler_state: SamplerState | None = None
    position_states: list[SamplerState | None] = field(default_factory=list)
    """This round's target states at positions 0..k (before each position's token), from `distributions`."""

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.tokens >= 0).long()

    @property
    def stateful(self) -> bool:
        return self.sampler.config.is_stateful

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
        steps = self.emitted.unsqueeze(1) + torch.arange(positions, device=logits.device)
        if not self.stateful:
            probs = self.sampler.distribution(
                logits.reshape(batch * positions, vocab),
                history,
                generated=history[:, self.prompt_width :],
                row_seeds=self.seeds.repeat_interleave(positions),
                step=steps.reshape(-1),
            )
            return probs.reshape(batch, positions, vocab)
        history = history.reshape(batch, positions, -1)
        state, self.position_states, probs = self.sampler_state, [], []
        for i in range(positions):
            self.position_states.append(state)
            context = (history[:, i], history[:, i, self.prompt_width :])
            probs.append(
                self.sampler.distribution(
                    logits[:, i], *context, state=state, row_seeds=self.seeds, step=steps[:, i]
                )
            )
            if i < positions - 1:
                state = self.sampler.advance_state(
                    state, logits[:, i], extra[:, i], *context, row_seeds=self.seeds, step=steps[:, i]
                )
        return torch.stack(probs, dim=1)

    def commit_state(
        self,
        logits: torch.Tensor,
        extra: torch.Tensor,
        accepted: torch.Tensor,
        next_token: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """Advance each active row's sampler state through its accepted drafts and its drawn token (call
        after `distributions` on the same round, before the tokens are appended)."""
        if not self.stateful:
            return
        rows = torch.arange(len(accepted), device=accepted.device)
        mu = torch.stack([s.mu for s in self.position_states], dim=1)[rows, accepted]
        history = self.histories(extra).reshape(len(rows), extra.shape[1] + 1, -1)[rows, accepted]
        after = self.sampler.advance_state(
            SamplerState(mu),
            logits[rows, accepted],
            next_token,
            history,
            history[:, self.prompt_width :],
            row_seeds=self.seeds,
            step=self.emitted + accepted,
        )
        self.sampler_state = SamplerState(torch.where(active, after.mu, self.sampler_state.mu))

    def draft_distribution(
        self, logits: torch.Tensor, drafts: torch.Tensor, state: SamplerState | None = None
    ) -> torch.Tensor:
        """The sampling distribution [B, V] of a draft model's ``logits`` [B, V] after ``drafts`` [B, i],
        in sampler state ``state`` (the draft's own, see `advance_draft_state`)."""
        history = torch.cat([self.tokens, drafts], dim=1)
        return self.sampler.distribution(
            logits,
            history,
            generated=history[:, self.prompt_width :],
            state=state,
            row_seeds=self.seeds,
            step=self.emitted + drafts.shape[1],
        )

    def advance_draft_state(
        self, state: SamplerState | None, logits: torch.Tensor, drafts: torch.Tensor
    ) -> SamplerState | None:
        """The draft's state after its last draft ``drafts[:, -1]`` was drawn from ``logits`` [B, V]."""
        if not self.stateful:
            return state
        history = torch.cat([self.tokens, drafts[:, :-1]], dim=1)
        return self.sampler.advance_state(
            state,
            logits,
            drafts[:, -1],
            history,
            history[:, self.prompt_width :],
            row_seeds=self.seeds,
            step=self.emitted + drafts.shape[1] - 1,
        )


class DraftSession:
    """One `generate` call's drafter: proposes drafts, has the target score them, rolls back its caches.

    Subclasses keep whatever the drafting needs between rounds (a draft model's cache, saved hidden
    states) on the session, never on the decoder.
    """

    def __init__(self, target: CausalLM) -> None:
        self.target = target

    def catch_up(self, state: RoundState) -> None:
        """Before a drafting round: bring the drafter's own state up to date with the prompt (first time)
        and the tokens emitted by plain (γ = 0) rounds since it last drafted; a one-off cost of switching
        speculation (back) on, which `propose` would otherwise charge to the round's drafts. Nothing to
        do when the drafter shares the target's cache."""

    def propose(self, state: RoundState, gamma: int) -> Drafts:
        raise NotImplementedError

    def score(self, state: RoundState, drafts: Drafts) -> torch.Tensor:
        """Target logits [B, γ+1, V] for ``[pending, drafts]``; the target cache grows by γ+1."""
        inputs = torch.cat([state.tokens[:, -1:], drafts.tokens], dim=1).clamp(min=0)
        mask = torch.cat([state.attention_mask, torch.ones_like(drafts.tokens)], dim=1)
        return self.target.forward(inputs, state.target_cache, mask)

    def rollback(self, keep: int) -> None:
        """Crop every cache this session owns to ``keep`` positions (the target's is done already)."""
