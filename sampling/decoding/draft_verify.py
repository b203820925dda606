"""The draft-then-verify loop shared by every speculative decoder, and its acceptance rule.

Rows progress independently in one batch. Each round every row gets up to γ drafts; the target scores
``[pending token, drafts]`` in one forward; row b keeps its first ``n_b`` accepted drafts plus one token
drawn from the residual (or, if all passed, from the target). The cache is cropped back to the longest
kept prefix; a row that kept fewer drafts than that leaves *holes*: positions with attention mask 0 and
history id -1, which no later token attends to and which do not advance position ids. With one row
this is plain crop-based rollback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sampling import noise
from sampling.config import SamplingConfig
from sampling.decoding.base import CausalLM, GenerationOutput, fit_prompts, resolve_row_seeds, stop_set
from sampling.sampler import TokenSampler

HOLE = -1
DRAFT_STREAM, ACCEPT_STREAM, TARGET_STREAM = 1, 2, 3


@dataclass
class Drafts:
    """Proposals for one round: ``tokens`` [B, γ]; ``probs`` [B, γ, V] the draft's sampling distribution
    (None: each draft is a point mass); ``lengths`` [B] how many of a row's γ columns are real drafts."""

    tokens: torch.Tensor
    probs: torch.Tensor | None
    lengths: torch.Tensor


@dataclass
class Verdict:
    """Outcome of verifying one round: ``accepted`` [B] leading drafts kept, ``next_token`` [B] the token
    drawn after them, ``overlap`` [B, γ] Σ_x min(p, q) at each draft position (analytic acceptance)."""

    accepted: torch.Tensor
    next_token: torch.Tensor
    overlap: torch.Tensor


def verify_drafts(
    target_probs: torch.Tensor,
    drafts: Drafts,
    seeds: torch.Tensor,
    first_step: torch.Tensor,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023), batched.

    ``target_probs`` [B, γ+1, V]: the target's sampling distribution p at each draft position and after
    the last one. Draft i is accepted with probability min(1, p(x)/q(x)); at the first rejection the
    next token is drawn from norm(max(0, p − q)); when every real draft passes it is drawn from p. The
    emitted tokens are then distributed exactly as autoregressive sampling from p. Randomness is keyed
    by (row seed, position of the token): ``first_step`` [B] is the position of the first draft.
    """
    batch, gamma = drafts.tokens.shape
    rows = torch.arange(batch, device=target_probs.device)
    columns = torch.arange(gamma, device=target_probs.device)
    steps = first_step.unsqueeze(1) + columns
    p_draft = target_probs[:, :gamma].gather(2, drafts.tokens.unsqueeze(2)).squeeze(2)
    if drafts.probs is None:
        q_draft = torch.ones_like(p_draft)
        overlap = p_draft
    else:
        q_draft = drafts.probs.gather(2, drafts.tokens.unsqueeze(2)).squeeze(2)
        overlap = torch.minimum(target_probs[:, :gamma], drafts.probs).sum(2)
    uniforms = noise.uniform(noise.row_keys(seeds.unsqueeze(1).expand(-1, gamma), steps, ACCEPT_STREAM))
    passed = (uniforms * q_draft < p_draft) & (columns < drafts.lengths.unsqueeze(1))
    accepted = passed.long().cumprod(1).sum(1)

    p_next = target_probs[rows, accepted]
    rejected = accepted < drafts.lengths
    if drafts.probs is None:
        at = accepted.clamp(max=max(gamma - 1, 0)).unsqueeze(1)
        q_next = torch.zeros_like(p_next)
        if gamma:
            q_next.scatter_(1, drafts.tokens.gather(1, at), 1.0)
    else:
        q_next = drafts.probs[rows, accepted.clamp(max=gamma - 1)]
    residual = (p_next - q_next).clamp(min=0)
    # A rejection with an all-zero residual has probability 0 (p = q); float noise can still get there.
    use_residual = rejected & (residual.sum(1) > 0)
    final = torch.where(use_residual.unsqueeze(1), residual, p_next)
    next_token = sample_from_probs(final, seeds, first_step + accepted, TARGET_STREAM)
    return Verdict(accepted, next_token, overlap)


def sample_from_probs(
    probs: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor, stream: int = DRAFT_STREAM
) -> torch.Tensor:
    """One token per row from dense probabilities [B, V], keyed by (seed, position, stream).

    The race runs over the support only (a top-k as wide as the largest support), not the vocabulary:
    the same winner, since noise is keyed by token id and zero-probability tokens never win.
    """
    keys = noise.row_keys(seeds, steps, stream)
    support = int((probs > 0).sum(dim=1).max())
    if support * 4 > probs.shape[1]:
        return noise.race_argmax(torch.log(probs), keys)
    values, ids = torch.topk(probs, support, dim=1)
    return ids.gather(1, noise.race_argmax(torch.log(values), keys, ids).unsqueeze(1)).squeeze(1)


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


class DraftVerifyDecoder:
    """Base of the speculative decoders: subclasses say how to draft (and, if special, how to verify)."""

    def __init__(
        self,
        num_draft_tokens: int = 4,
        adaptive: bool = False,
        keep_stop_token: bool = False,
        truncate_prompts: bool = False,
    ) -> None:
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens={num_draft_tokens} is invalid: must be >= 1")
        self.num_draft_tokens = num_draft_tokens
        self.adaptive = adaptive
        self.keep_stop_token = keep_stop_token
        self.truncate_prompts = truncate_prompts

    # -- hooks ---------------------------------------------------------------------------------------

    def start(self, target: CausalLM, state: RoundState) -> None:
        """Called after the target prefilled all but the pending token."""

    def propose(self, target: CausalLM, state: RoundState, gamma: int) -> Drafts:
        raise NotImplementedError

    def score(self, target: CausalLM, state: RoundState, drafts: Drafts) -> torch.Tensor:
        """Target logits [B, γ+1, V] for ``[pending, drafts]``; the target cache grows by γ+1."""
        inputs = torch.cat([state.tokens[:, -1:], drafts.tokens], dim=1).clamp(min=0)
        mask = torch.cat([state.attention_mask, torch.ones_like(drafts.tokens)], dim=1)
        return target.forward(inputs, state.target_cache, mask)

    def rollback(self, target: CausalLM, state: RoundState, keep: int) -> None:
        """Crop every cache this decoder owns to ``keep`` positions (the target's is done already)."""

    # -- the loop ------------------------------------------------------------------------------------

    def generate(
        self,
        model: CausalLM,
        prompt_ids: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        stop_ids: Sequence[int] = (),
        row_seeds: Sequence[int] | None = None,
    ) -> GenerationOutput:
        prompts = fit_prompts(
            model, prompt_ids, max_new_tokens + self.num_draft_tokens + 1, self.truncate_prompts
        )
        device = model.device
        batch, width = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((batch, width), HOLE, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, width - len(prompt) :] = torch.tensor(prompt, device=device)
        state = RoundState(
            tokens=tokens,
            prompt_width=width,
            emitted=torch.zeros(batch, dtype=torch.long, device=device),
            seeds=resolve_row_seeds(config, batch, row_seeds).to(device),
            sampler=TokenSampler(config),
            target_cache=model.new_cache(),
        )
        stops = stop_set(model, stop_ids)
        out = GenerationOutput(
            token_ids=[[] for _ in range(batch)],
            model_logprobs=[[] for _ in range(batch)],
            entropies=[[] for _ in range(batch)],
            num_kept=[[] for _ in range(batch)],
            finished_by_stop=[False] * batch,
        )
        finished = [False] * batch
        tally = _Tally()

        start = time.perf_counter()
        if width > 1:
            model.forward(
                tokens[:, :-1].clamp(min=0),
                state.target_cache,
                state.attention_mask[:, :-1],
                last_positions=1,
            )
            out.target_forwards += 1
        self.start(model, state)
        out.prefill_seconds = time.perf_counter() - start

        gamma = self.num_draft_tokens
        while not all(finished):
            room = max(max_new_tokens - len(out.token_ids[r]) for r in range(batch) if not finished[r])
            round_gamma = max(1, min(gamma, room - 1)) if room > 1 else 0
            tick = time.perf_counter()
            drafts = self.propose(model, state, round_gamma) if round_gamma else _no_drafts(batch, device)
            tally.add("draft_seconds", time.perf_counter() - tick)
            tick = time.perf_counter()
            logits = self.score(model, state, drafts)
            tally.add("verify_seconds", time.perf_counter() - tick)
            out.target_forwards += 1
            tick = time.perf_counter()
            probs = state.distributions(logits, drafts.tokens)
            verdict = verify_drafts(probs, drafts, state.seeds, state.emitted)
            out.sampler_seconds += time.perf_counter() - tick
            out.sampler_calls += 1

            active = torch.tensor([not f for f in finished], device=device)
            accepted = torch.where(active, verdict.accepted, 0)
            tally.record(drafts, verdict, active, round_gamma)
            self._emit(out, finished, stops, max_new_tokens, drafts, verdict, logits, probs, state)

            kept = int(accepted.max())
            columns = torch.arange(kept, device=device)
            new_tokens = torch.where(columns < accepted.unsqueeze(1), drafts.tokens[:, :kept], HOLE)
            pending = torch.where(active, verdict.next_token, HOLE).unsqueeze(1)
            keep = state.width + kept
            model.crop_cache(state.target_cache, keep)
            self.rollback(model, state, keep)
            state.tokens = torch.cat([state.tokens, new_tokens, pending], dim=1)
            state.emitted = state.emitted + accepted + 1
            if self.adaptive and round_gamma:
                all_passed = bool((verdict.accepted[active] >= drafts.lengths[active]).all())
                gamma = gamma + 2 if all_passed else max(1, gamma - 1)
        out.decode_seconds = time.perf_counter() - start - out.prefill_seconds
        out.draft_forwards = state.draft_forwards
        tally.add("draft_steps", state.draft_forwards)
        out.stats = tally.counts
        return out

    def _emit(
        self,
        out: GenerationOutput,
        finished: list[bool],
        stops: frozenset[int],
        max_new_tokens: int,
        drafts: Drafts,
        verdict: Verdict,
        logits: torch.Tensor,
        probs: torch.Tensor,
        state: RoundState,
    ) -> None:
        """Append each active row's accepted drafts and next token, honouring stops and the budget."""
        accepted = verdict.accepted
        produced = torch.cat([drafts.tokens, torch.zeros_like(accepted).unsqueeze(1)], dim=1)
        produced.scatter_(1, accepted.unsqueeze(1), verdict.next_token.unsqueeze(1))
        model_logprobs = torch.log_softmax(logits, dim=-1).gather(2, produced.unsqueeze(2)).squeeze(2)
        entropy = -torch.where(probs > 0, probs * torch.log(probs), 0.0).sum(-1)
        columns = [produced, model_logprobs, entropy, (probs > 0).sum(-1), accepted + 1]
        produced, model_logprobs, entropy, num_kept, counts = (c.tolist() for c in columns)
        for row in range(len(finished)):
            if finished[row]:
                continue
            for position in range(counts[row]):
                token = produced[row][position]
                if token in stops:
                    out.finished_by_stop[row] = True
                    finished[row] = True
                    if not self.keep_stop_token:
                        break
                out.token_ids[row].append(token)
                out.model_logprobs[row].append(model_logprobs[row][position])
                out.entropies[row].append(entropy[row][position])
                out.num_kept[row].append(num_kept[row][position])
                if finished[row] or len(out.token_ids[row]) >= max_new_tokens:
                    finished[row] = True
                    break


def _no_drafts(batch: int, device: torch.device) -> Drafts:
    empty = torch.zeros(batch, 0, dtype=torch.long, device=device)
    return Drafts(empty, None, torch.zeros(batch, dtype=torch.long, device=device))


@dataclass
class _Tally:
    """Additive accounting across rounds (active rows only); rates come from `derive_rates`."""

    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_COUNT_KEYS, 0.0))

    def add(self, key: str, value: float | torch.Tensor) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + float(value)

    def record(self, drafts: Drafts, verdict: Verdict, active: torch.Tensor, gamma: int) -> None:
        lengths = torch.where(active, drafts.lengths, 0)
        accepted = torch.where(active, verdict.accepted, 0)
        verified = torch.minimum(accepted + 1, lengths)
        columns = torch.arange(drafts.tokens.shape[1], device=lengths.device)
        reached = columns < verified.unsqueeze(1)
        self.add("rounds", 1)
        self.add("draft_tokens_offered", gamma)
        self.add("drafted_tokens", lengths.sum())
        self.add("accepted_tokens", accepted.sum())
        self.add("verified_tokens", verified.sum())
        self.add("overlap_sum", verdict.overlap[reached].sum())
        self.add("row_rounds", active.sum())
        self.add("emitted_tokens", (accepted + 1)[active].sum())
        for i in range(drafts.tokens.shape[1]):
            self.add(f"reached_pos{i + 1}", reached[:, i].sum())
            self.add(f"passed_pos{i + 1}", (reached[:, i] & (accepted > i)).sum())


_COUNT_KEYS = (
    "rounds",
    "draft_tokens_offered",
    "drafted_tokens",
    "accepted_tokens",
    "verified_tokens",
    "overlap_sum",
    "row_rounds",
    "emitted_tokens",
    "draft_steps",
    "draft_seconds",
    "verify_seconds",
)
