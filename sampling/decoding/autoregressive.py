"""Batched autoregressive decoding with a KV cache and refill (continuous) batching.

One target forward per step draws one token for every row in flight. At most ``max_batch_size`` rows
are in flight; when a row ends (stop id, EOS, stop string, or its ``max_new_tokens``) it leaves the batch
and the next pending row is prefilled and takes its place (`slots` says how the cache is edited). A
row's draws depend only on its logits, its seed, its own step (the number of tokens it has drawn) and
its own sampler state (mirostat's μ: a newcomer starts from the initial state, a leaving row's state
leaves with it), and penalties, DRY and no-repeat-n-gram see only its own tokens, so every row gets
exactly the tokens it would get alone.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from sampling.config import SamplingConfig
from sampling.decoding.base import (
    DEFAULT_OPTIONS,
    CausalLM,
    GenerateOptions,
    GenerationOutput,
    Progress,
    fit_prompts,
    resolve_row_seeds,
    stop_set,
)
from sampling.decoding.slots import SlotBatch, prefill_slots
from sampling.decoding.stopping import StopStringTracker
from sampling.sampler import SampleOutput, TokenSampler


@dataclass
class _Call:
    """One `generate` call's state: the queue of rows not started yet, and the output being filled."""

    model: CausalLM
    prompts: list[list[int]]
    sampler: TokenSampler
    seeds: torch.Tensor
    stops: frozenset[int]
    stop_strings: StopStringTracker | None
    max_new_tokens: int
    max_batch_size: int
    keep_stop_token: bool
    progress: Progress | None
    out: GenerationOutput
    pending: deque[int] = field(default_factory=deque)

    def admit(
        self, slots: SlotBatch | None, logits: torch.Tensor | None
    ) -> tuple[SlotBatch | None, torch.Tensor | None]:
        """Prefill as many pending rows as there is room for and add them (and their logits) to the batch."""
        if slots is not None and slots.done:
            slots = logits = None
        room = self.max_batch_size if slots is None else slots.has_room(self.max_batch_size)
        newcomers = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
        if not newcomers:
            return slots, logits
        tick = time.perf_counter()
        state = self.sampler.initial_state(len(newcomers), self.model.device)
        prompts = [self.prompts[r] for r in newcomers]
        fresh, fresh_logits = prefill_slots(self.model, prompts, newcomers, state)
        self.out.prefill_seconds += time.perf_counter() - tick
        self.out.target_forwards += 1
        if slots is None:
            return fresh, fresh_logits
        slots.join(fresh)
        return slots, torch.cat([logits, fresh_logits])

    def sample(self, slots: SlotBatch, logits: torch.Tensor) -> SampleOutput:
        """One draw per slot, keyed by its row's seed and its own step (tokens it has drawn so far), from
        its own state; the slots keep the state after the draw."""
        tick = time.perf_counter()
        sampled = self.sampler.sample(
            logits,
            slots.tokens,
            row_seeds=self.seeds[slots.row_index],
            step=slots.generated,
            generated=slots.generated_part(),
            state=slots.state,
        )
        if sampled.state is not None:
            slots.state = sampled.state
        self.out.sampler_seconds += time.perf_counter() - tick
        self.out.sampler_calls += 1
        return sampled

    def record(self, slots: SlotBatch, sampled: SampleOutput) -> list[bool]:
        """Append each live slot's token to its row; returns which slots ended (dead ones included) and
        reports the step's new tokens and released budget to ``progress``."""
        columns = (sampled.tokens, sampled.model_logprobs, sampled.entropy, sampled.num_kept)
        tokens, logprobs, entropies, num_kept = (column.tolist() for column in columns)
        ended, appended, released = [], 0, 0
        for slot, row in enumerate(slots.rows):
            if not slots.live[slot]:
                ended.append(True)
                continue
            before = len(self.out.token_ids[row])
            end = self._take(row, tokens[slot], (logprobs[slot], entropies[slot], num_kept[slot]))
            after = len(self.out.token_ids[row])
            appended += after - before
            released += self.max_new_tokens - after if end else 0
            ended.append(end)
        if self.progress is not None:
            self.progress(appended, released)
        return ended

    def _take(self, row: int, token: int, stats: tuple[float, float, int]) -> bool:
        """Keep ``token`` for ``row`` (a stop id only if asked); True if the row ends with it."""
        out = self.out
        is_stop = token in self.stops
        if not is_stop or self.keep_stop_token:
            out.token_ids[row].append(token)
            out.model_logprobs[row].append(stats[0])
            out.entropies[row].append(stats[1])
            out.num_kept[row].append(stats[2])
        if not is_stop and self.stop_strings is not None:
            is_stop = self.stop_strings.extend(row, [token]) is not None
        out.finished_by_stop[row] = is_stop
        return is_stop or len(out.token_ids[row]) >= self.max_new_tokens

    def step(self, slots: SlotBatch, sampled: SampleOutput, ended: list[bool]) -> torch.Tensor | None:
        """Retire the ended rows and feed the others their token: the next logits (None: nothing left)."""
        kept = slots.leave(ended)
        if slots.done or not slots.rows:
            return None
        tokens = sampled.tokens if kept is None else sampled.tokens[kept]
        self.out.target_forwards += 1
        return slots.advance(self.model, tokens)


class AutoregressiveDecoder:
    """Refill-batched autoregressive decoding: KV cache, per-row stops, seeds and steps.

    The instance holds only settings; each call's state lives in its own `_Call` and `SlotBatch`.
    """

    def __init__(self, keep_stop_token: bool = False, truncate_prompts: bool = False) -> None:
        self.keep_stop_token = keep_stop_token
        self.truncate_prompts = truncate_prompts

    def generate(
        self,
        model: CausalLM,
        prompt_ids: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        options: GenerateOptions = DEFAULT_OPTIONS,
    ) -> GenerationOutput:
        prompts = fit_prompts(model, prompt_ids, max_new_tokens, self.truncate_prompts)
        rows = len(prompts)
        call = _Call(
            model=model,
            prompts=prompts,
            sampler=TokenSampler(config),
            seeds=resolve_row_seeds(config, rows, options.row_seeds).to(model.device),
            stops=stop_set(model, options.stop_ids, options.ignore_eos),
            stop_strings=options.stop_strings.start(rows) if options.stop_strings is not None else None,
            max_new_tokens=max_new_tokens,
            max_batch_size=options.max_batch_size or rows,
            keep_stop_token=self.keep_stop_token,
            progress=options.progress,
            out=_empty_output(rows),
            pending=deque(range(rows)),
        )
        start = time.perf_counter()
        _run(call)
        call.out.decode_seconds = time.perf_counter() - start - call.out.prefill_seconds
        return call.out


def _run(call: _Call) -> None:
    """Admit, draw, record, retire, feed — until no row is pending or in flight."""
    slots, logits = call.admit(None, None)
    while slots is not None:
        sampled = call.sample(slots, logits)
        ended = call.record(slots, sampled)
        logits = call.step(slots, sampled, ended)
        if logits is None and not call.pending:
            return
        slots, logits = call.admit(slots if logits is not None else None, logits)


def _empty_output(rows: int) -> GenerationOutput:
    return GenerationOutput(
        token_ids=[[] for _ in range(rows)],
        model_logprobs=[[] for _ in range(rows)],
        entropies=[[] for _ in range(rows)],
        num_kept=[[] for _ in range(rows)],
        finished_by_stop=[False] * rows,
    )
