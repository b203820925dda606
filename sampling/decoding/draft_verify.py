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
from dataclasses import dataclass

import torch

from sampling import noise
from sampling.config import SamplingConfig
from sampling.decoding.accounting import RoundTally
from sampling.decoding.base import (
    DEFAULT_OPTIONS,
    CausalLM,
    GenerateOptions,
    GenerationOutput,
    Progress,
    fit_prompts,
    left_pad,
    merge_outputs,
    resolve_row_seeds,
    stop_set,
)
from sampling.decoding.rounds import HOLE, Drafts, DraftSession, RoundState, kept_prefix, no_drafts
from sampling.decoding.speculation_policy import POLICIES, Policy, RoundReport, make_policy
from sampling.decoding.stopping import StopStringTracker
from sampling.sampler import TokenSampler

__all__ = [
    "HOLE",
    "DraftSession",
    "DraftVerifyDecoder",
    "Drafts",
    "RoundState",
    "Verdict",
    "sample_from_probs",
    "verify_drafts",
]

DRAFT_STREAM, ACCEPT_STREAM, TARGET_STREAM = 1, 2, 3


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
class _Call:
    """One batch's loop state: rows, drafting session, γ policy, stop rules and the output being filled."""

    state: RoundState
    session: DraftSession
    out: GenerationOutput
    stops: frozenset[int]
    max_new_tokens: int
    finished: list[bool]
    tally: RoundTally
    policy: Policy
    tracker: StopStringTracker | None
    progress: Progress | None

    def room(self) -> int:
        """The most tokens an unfinished row may still emit."""
        rows = range(len(self.finished))
        return max(self.max_new_tokens - len(self.out.token_ids[r]) for r in rows if not self.finished[r])


def _clock(device: torch.device) -> float:
    """Wall time after the device's queued work (CUDA runs asynchronously; CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class DraftVerifyDecoder:
    """Base of the speculative decoders: subclasses say how to draft by opening a `DraftSession` per call.

    ``policy`` chooses the drafts offered per round (`speculation_policy`): "constant" γ =
    ``num_draft_tokens``; "heuristic" HF's +2/−1 schedule from γ; "measured" the γ in 0..``num_draft_tokens``
    with the best predicted speedup from this call's measured costs (0 = a plain autoregressive round).

    The instance holds only settings; everything a call changes lives in that call's `RoundState`,
    `DraftSession`, policy and loop state, so one instance can serve concurrent calls.
    """

    def __init__(
        self,
        num_draft_tokens: int = 4,
        keep_stop_token: bool = False,
        truncate_prompts: bool = False,
        policy: str = "constant",
    ) -> None:
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens={num_draft_tokens} is invalid: must be >= 1")
        if policy not in POLICIES:
            raise ValueError(f"policy={policy!r} is invalid: must be one of {', '.join(POLICIES)}")
        self.num_draft_tokens = num_draft_tokens
        self.policy = policy
        self.keep_stop_token = keep_stop_token
        self.truncate_prompts = truncate_prompts

    def open_session(self, target: CausalLM, state: RoundState) -> DraftSession:
        """A fresh drafter for one call, opened after the target prefilled all but the pending token."""
        raise NotImplementedError

    # -- the loop ------------------------------------------------------------------------------------

    def generate(
        self,
        model: CausalLM,
        prompt_ids: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        options: GenerateOptions = DEFAULT_OPTIONS,
    ) -> GenerationOutput:
        """Rows run in static batches of at most ``options.max_batch_size`` (all at once by default), in
        input order; one γ policy serves the whole call, so later batches reuse the costs measured earlier."""
        prompts = fit_prompts(
            model, prompt_ids, max_new_tokens + self.num_draft_tokens + 1, self.truncate_prompts
        )
        seeds = resolve_row_seeds(config, len(prompts), options.row_seeds)
        stops = stop_set(model, options.stop_ids, options.ignore_eos)
        policy = make_policy(self.policy, self.num_draft_tokens)
        size = options.max_batch_size or len(prompts)
        stop_strings = options.stop_strings
        outputs = []
        for first in range(0, len(prompts), size):
            rows = slice(first, first + size)
            tracker = stop_strings.start(len(prompts[rows])) if stop_strings is not None else None
            call = self._prefill(model, prompts[rows], config, max_new_tokens, stops, seeds[rows], policy)
            call.tracker, call.progress = tracker, options.progress
            outputs.append(self._run(model, call))
        return outputs[0] if len(outputs) == 1 else merge_outputs(outputs)

    def _run(self, model: CausalLM, call: _Call) -> GenerationOutput:
        start = time.perf_counter()
        while not all(call.finished):
            self._round(model, call)
        call.out.decode_seconds = time.perf_counter() - start
        call.out.draft_forwards = call.state.draft_forwards
        call.tally.add("draft_steps", call.state.draft_forwards)
        call.out.stats = call.tally.counts
        return call.out

    def _prefill(
        self,
        model: CausalLM,
        prompts: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        stops: frozenset[int],
        seeds: torch.Tensor,
        policy: Policy,
    ) -> _Call:
        """Left-pad the prompts, run the target on all but each row's last token, open the drafter."""
        start = time.perf_counter()
        device = model.device
        tokens, _ = left_pad(prompts, HOLE, device)
        batch, width = tokens.shape
        state = RoundState(
            tokens=tokens,
            prompt_width=width,
            emitted=torch.zeros(batch, dtype=torch.long, device=device),
            seeds=seeds.to(device),
            sampler=TokenSampler(config),
            target_cache=model.new_cache(),
            active=torch.ones(batch, dtype=torch.bool, device=device),
        )
        state.sampler_state = state.sampler.initial_state(batch, device)
        out = GenerationOutput(
            token_ids=[[] for _ in range(batch)],
            model_logprobs=[[] for _ in range(batch)],
            entropies=[[] for _ in range(batch)],
            num_kept=[[] for _ in range(batch)],
            finished_by_stop=[False] * batch,
        )
        if width > 1:
            inputs, mask = tokens[:, :-1].clamp(min=0), state.attention_mask[:, :-1]
            model.forward(inputs, state.target_cache, mask, last_positions=1)
            out.target_forwards += 1
        session = self.open_session(model, state)
        out.prefill_seconds = time.perf_counter() - start
        return _Call(
            state=state,
            session=session,
            out=out,
            stops=stops,
            max_new_tokens=max_new_tokens,
            finished=[False] * batch,
            tally=RoundTally(),
            policy=policy,
            tracker=None,
            progress=None,
        )

    def _round(self, model: CausalLM, call: _Call) -> None:
        """Draft, score, verify, emit, then roll the caches back to what was kept."""
        state, out, tally, device = call.state, call.out, call.tally, model.device
        active = state.active = torch.tensor([not f for f in call.finished], device=device)
        room = call.room()
        gamma = min(call.policy.next_gamma(), room - 1) if room > 1 else 0
        prediction = call.policy.prediction(gamma)
        drafts, catch_up_seconds, draft_seconds = self._draft(call, gamma, device)
        drafted = _clock(device)
        logits = call.session.score(state, drafts)
        tally.add("verify_seconds", _clock(device) - drafted)
        out.target_forwards += 1
        tick = time.perf_counter()
        probs = state.distributions(logits, drafts.tokens)
        verdict = verify_drafts(probs, drafts, state.seeds, state.emitted)
        state.commit_state(logits, drafts.tokens, verdict.accepted, verdict.next_token, active)
        out.sampler_seconds += time.perf_counter() - tick
        out.sampler_calls += 1

        verified, overlap = tally.record(drafts.lengths, verdict.accepted, verdict.overlap, active)
        new_tokens, released = self._emit(call, drafts, verdict, logits, probs)
        self._advance(model, call, drafts, verdict, active)
        done = _clock(device)
        all_passed = bool((verdict.accepted[active] >= drafts.lengths[active]).all())
        scored = drafts.tokens.shape[1]
        report = RoundReport(
            gamma,
            all_passed,
            overlap,
            verified,
            draft_seconds,
            done - drafted,
            scored=scored,
            catch_up_seconds=catch_up_seconds,
        )
        call.policy.observe(report)
        emitted_per_row = float((verdict.accepted + 1)[active].float().mean())
        tally.add("draft_seconds", report.draft_seconds)
        tally.add("catch_up_seconds", report.catch_up_seconds)
        tally.record_policy(report, call.policy.is_off(gamma), prediction, emitted_per_row)
        if call.progress is not None:
            call.progress(new_tokens, released)

    @staticmethod
    def _draft(call: _Call, gamma: int, device: torch.device) -> tuple[Drafts, float, float]:
        """The round's drafts, and the seconds spent catching the drafter up and then drafting."""
        if not gamma:
            return no_drafts(len(call.finished), device), 0.0, 0.0
        start = _clock(device)
        call.session.catch_up(call.state)
        caught_up = _clock(device)
        drafts = call.session.propose(call.state, gamma)
        return drafts, caught_up - start, _clock(device) - caught_up

    @staticmethod
    def _advance(
        model: CausalLM, call: _Call, drafts: Drafts, verdict: Verdict, active: torch.Tensor
    ) -> None:
        """Append kept drafts (holes where a row kept fewer) and each row's pending token; crop caches."""
        state = call.state
        accepted = torch.where(active, verdict.accepted, 0)
        kept = int(accepted.max())
        columns = torch.arange(kept, device=accepted.device)
        new_tokens = torch.where(columns < accepted.unsqueeze(1), drafts.tokens[:, :kept], HOLE)
        pending = torch.where(active, verdict.next_token, HOLE).unsqueeze(1)
        keep = state.width + kept
        model.crop_cache(state.target_cache, keep)
        call.session.rollback(keep)
        state.tokens = torch.cat([state.tokens, new_tokens, pending], dim=1)
        state.emitted = state.emitted + accepted + 1

    def _emit(
        self, call: _Call, drafts: Drafts, verdict: Verdict, logits: torch.Tensor, probs: torch.Tensor
    ) -> tuple[int, int]:
        """Append each active row's accepted drafts and next token up to its stop (id or string) or budget;
        returns (tokens appended, budget released by rows that ended early)."""
        out, finished = call.out, call.finished
        accepted = verdict.accepted
        produced = torch.cat([drafts.tokens, torch.zeros_like(accepted).unsqueeze(1)], dim=1)
        produced.scatter_(1, accepted.unsqueeze(1), verdict.next_token.unsqueeze(1))
        model_logprobs = torch.log_softmax(logits, dim=-1).gather(2, produced.unsqueeze(2)).squeeze(2)
        entropy = -torch.where(probs > 0, probs * torch.log(probs), 0.0).sum(-1)
        columns = [produced, model_logprobs, entropy, (probs > 0).sum(-1), accepted + 1]
        produced, model_logprobs, entropy, num_kept, counts = (c.tolist() for c in columns)
        appended = released = 0
        for row in range(len(finished)):
            if finished[row]:
                continue
            have = len(out.token_ids[row])
            chunk = produced[row][: counts[row]]
            keep, stopped = kept_prefix(chunk, call.stops, self.keep_stop_token, call.max_new_tokens - have)
            if call.tracker is not None and keep:
                cut = call.tracker.extend(row, chunk[:keep])
                keep, stopped = (keep, stopped) if cut is None else (cut, True)
            out.token_ids[row] += chunk[:keep]
            out.model_logprobs[row] += model_logprobs[row][:keep]
            out.entropies[row] += entropy[row][:keep]
            out.num_kept[row] += num_kept[row][:keep]
            appended += keep
            if stopped or have + keep >= call.max_new_tokens:
                out.finished_by_stop[row] = stopped
                finished[row] = True
                released += call.max_new_tokens - have - keep
        return appended, released
