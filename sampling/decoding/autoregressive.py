"""Batched autoregressive decoding with a KV cache: one target forward per generated token."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sampling.config import SamplingConfig
from sampling.decoding.base import (
    CausalLM,
    GenerationOutput,
    fit_prompts,
    left_pad,
    resolve_row_seeds,
    stop_set,
)
from sampling.sampler import SampleOutput, TokenSampler

PAD = -1


@dataclass
class _Batch:
    """One `generate` call's state: ``history`` [B, W + N] holds the left-padded prompts then the kept
    new tokens (``PAD`` elsewhere); ``attention_mask`` covers what the cache holds plus the next input."""

    model: CausalLM
    sampler: TokenSampler
    history: torch.Tensor
    prompt_width: int
    attention_mask: torch.Tensor
    seeds: torch.Tensor
    stops: torch.Tensor
    cache: Any
    finished: torch.Tensor
    stopped: torch.Tensor
    steps: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    sampler_seconds: float = 0.0


class AutoregressiveDecoder:
    """Left-padded batch, KV cache, per-row stop, per-row seeds.

    Finished rows keep a slot in the batch (fed their stop token, results ignored) so the cache stays
    rectangular; the repetition penalty sees only each row's real tokens (padding is ``-1`` in history).
    The instance holds only settings; each call's state lives in its own `_Batch`.
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
        stop_ids: Sequence[int] = (),
        row_seeds: Sequence[int] | None = None,
    ) -> GenerationOutput:
        prompts = fit_prompts(model, prompt_ids, max_new_tokens, self.truncate_prompts)
        batch = self._open(model, prompts, config, max_new_tokens, stop_ids, row_seeds)
        start = time.perf_counter()
        logits = self._prefill(batch)
        prefill_seconds = time.perf_counter() - start
        for step in range(max_new_tokens):
            sampled = self._sample(batch, logits, step)
            self._record(batch, sampled, step)
            if bool(batch.finished.all()) or step == max_new_tokens - 1:
                break
            logits = self._step(batch, sampled.tokens)
        return self._finish(batch, prefill_seconds, time.perf_counter() - start - prefill_seconds)

    def _open(
        self,
        model: CausalLM,
        prompts: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        stop_ids: Sequence[int],
        row_seeds: Sequence[int] | None,
    ) -> _Batch:
        device = model.device
        padded, attention_mask = left_pad(prompts, PAD, device)
        rows, width = padded.shape
        new = torch.full((rows, max_new_tokens), PAD, dtype=torch.long, device=device)
        return _Batch(
            model=model,
            sampler=TokenSampler(config),
            history=torch.cat([padded, new], dim=1),
            prompt_width=width,
            attention_mask=attention_mask,
            seeds=resolve_row_seeds(config, rows, row_seeds).to(device),
            stops=torch.tensor(sorted(stop_set(model, stop_ids)), dtype=torch.long, device=device),
            cache=model.new_cache(),
            finished=torch.zeros(rows, dtype=torch.bool, device=device),
            stopped=torch.zeros(rows, dtype=torch.bool, device=device),
        )

    @staticmethod
    def _prefill(batch: _Batch) -> torch.Tensor:
        """The prompts through the model: the logits [B, V] of the first new token."""
        prompts = batch.history[:, : batch.prompt_width].clamp(min=0)
        return batch.model.forward(prompts, batch.cache, batch.attention_mask, last_positions=1)[:, -1]

    @staticmethod
    def _sample(batch: _Batch, logits: torch.Tensor, step: int) -> SampleOutput:
        tick = time.perf_counter()
        end = batch.prompt_width + step
        sampled = batch.sampler.sample(
            logits,
            batch.history[:, :end],
            row_seeds=batch.seeds,
            step=step,
            generated=batch.history[:, batch.prompt_width : end],
        )
        batch.sampler_seconds += time.perf_counter() - tick
        return sampled

    def _record(self, batch: _Batch, sampled: SampleOutput, step: int) -> None:
        """Keep each active row's token (a stop token only if asked) and end rows that drew a stop."""
        is_stop = torch.isin(sampled.tokens, batch.stops) & ~batch.finished
        keep = ~batch.finished & (~is_stop | self.keep_stop_token)
        batch.history[:, batch.prompt_width + step] = torch.where(keep, sampled.tokens, PAD)
        batch.steps.append((keep, sampled.model_logprobs, sampled.entropy, sampled.num_kept))
        batch.stopped |= is_stop
        batch.finished |= is_stop

    @staticmethod
    def _step(batch: _Batch, tokens: torch.Tensor) -> torch.Tensor:
        """Feed every row's last token (finished rows too: the cache stays rectangular)."""
        mask = batch.attention_mask
        batch.attention_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return batch.model.forward(tokens.unsqueeze(1), batch.cache, batch.attention_mask, last_positions=1)[
            :, -1
        ]

    @staticmethod
    def _finish(batch: _Batch, prefill_seconds: float, decode_seconds: float) -> GenerationOutput:
        return GenerationOutput(
            token_ids=[new[new >= 0].tolist() for new in batch.history[:, batch.prompt_width :]],
            **_per_token_stats(batch.steps),
            finished_by_stop=batch.stopped.tolist(),
            prefill_seconds=prefill_seconds,
            decode_seconds=decode_seconds,
            sampler_seconds=batch.sampler_seconds,
            sampler_calls=len(batch.steps),
            target_forwards=len(batch.steps),
        )


def _per_token_stats(steps: list[tuple[torch.Tensor, ...]]) -> dict[str, list[list]]:
    """Turn per-step ``(kept_mask, model_logprob, entropy, num_kept)`` tensors into per-row lists."""
    if not steps:
        return {"model_logprobs": [], "entropies": [], "num_kept": []}
    kept, model_logprobs, entropies, num_kept = (
        torch.stack(column, dim=1).cpu() for column in zip(*steps, strict=True)
    )
    rows = range(kept.shape[0])
    return {
        "model_logprobs": [model_logprobs[r][kept[r]].tolist() for r in rows],
        "entropies": [entropies[r][kept[r]].tolist() for r in rows],
        "num_kept": [num_kept[r][kept[r]].tolist() for r in rows],
    }
