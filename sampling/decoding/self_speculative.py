"""Self-speculative decoding: the target's own first E layers draft, the full stack verifies."""

from __future__ import annotations

from typing import Any

import torch

from sampling.decoding.base import CausalLM, EarlyExitLM
from sampling.decoding.draft_verify import (
    Drafts,
    DraftSession,
    DraftVerifyDecoder,
    RoundState,
    sample_from_probs,
)


class EarlyExitSession(DraftSession):
    """One call's early-exit drafter: keeps the layer-E hidden states of the round's drafted positions,
    so verification resumes from them instead of recomputing the first E layers."""

    def __init__(self, target: EarlyExitLM, exit_layer: int) -> None:
        super().__init__(target)
        self.early_exit_target = target
        self.exit_layer = exit_layer
        self.hidden: list[torch.Tensor] = []

    def propose(self, state: RoundState, gamma: int) -> Drafts:
        batch = state.tokens.shape[0]
        mask = state.attention_mask
        inputs = state.tokens[:, -1:]
        drafts = torch.zeros(batch, gamma, dtype=torch.long, device=state.tokens.device)
        probs, self.hidden, sampler_state = [], [], state.sampler_state
        for i in range(gamma):
            logits, hidden = self.early_exit_target.forward_early_exit(
                inputs.clamp(min=0), state.target_cache, self.exit_layer, mask
            )
            state.draft_forwards += 1
            self.hidden.append(hidden)
            q = state.draft_distribution(logits[:, -1], drafts[:, :i], sampler_state)
            drafts[:, i] = sample_from_probs(q, state.seeds, state.emitted + i)
            probs.append(q)
            sampler_state = state.advance_draft_state(sampler_state, logits[:, -1], drafts[:, : i + 1])
            inputs = drafts[:, i : i + 1]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        lengths = torch.full((batch,), gamma, dtype=torch.long, device=drafts.device)
        return Drafts(drafts, torch.stack(probs, dim=1), lengths)

    def score(self, state: RoundState, drafts: Drafts) -> torch.Tensor:
        if drafts.tokens.shape[1] == 0:
            return super().score(state, drafts)
        target = self.early_exit_target
        mask = torch.cat([state.attention_mask, torch.ones_like(drafts.tokens)], dim=1)
        _, last_hidden = target.forward_early_exit(
            drafts.tokens[:, -1:], state.target_cache, self.exit_layer, mask
        )
        hidden = torch.cat([*self.hidden, last_hidden], dim=1)
        return target.forward_from_layer(hidden, state.target_cache, self.exit_layer, mask)


class SelfSpeculativeDecoder(DraftVerifyDecoder):
    """Early-exit drafting (LayerSkip-style) with a shared KV cache; the target must be an `EarlyExitLM`.

    Drafting runs layers [0, E) + final norm + LM head and fills those layers' cache; verification
    finishes the drafted positions from their saved layer-E hidden states through layers [E, L), so the
    first E layers are never recomputed. The acceptance rule is the usual one, so output is lossless.
    """

    def __init__(self, exit_layer: int, num_draft_tokens: int = 4, **options: Any) -> None:
        """``options``: the other `DraftVerifyDecoder` keywords (``policy``, ``keep_stop_token``, ...)."""
        super().__init__(num_draft_tokens, **options)
        if exit_layer < 1:
            raise ValueError(f"exit_layer={exit_layer} is invalid: must be >= 1")
        self.exit_layer = exit_layer

    def open_session(self, target: CausalLM, state: RoundState) -> EarlyExitSession:
        if not isinstance(target, EarlyExitLM):
            raise TypeError(f"self-speculative decoding needs an EarlyExitLM; {type(target).__name__} is not")
        if self.exit_layer >= target.num_layers:
            raise ValueError(
                f"exit_layer={self.exit_layer} is invalid for a {target.num_layers}-layer model: "
                f"must be in [1, {target.num_layers - 1}]"
            )
        return EarlyExitSession(target, self.exit_layer)
