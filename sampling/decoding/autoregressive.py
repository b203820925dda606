"""Batched autoregressive decoding with a KV cache: one target forward per generated token."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from sampling.config import SamplingConfig
from sampling.decoding.base import CausalLM, GenerationOutput, fit_prompts, resolve_row_seeds, stop_set
from sampling.sampler import TokenSampler

PAD = -1


class AutoregressiveDecoder:
    """Left-padded batch, KV cache, per-row stop, per-row seeds.

    Finished rows keep a slot in the batch (fed their stop token, results ignored) so the cache stays
    rectangular; the repetition penalty sees only each row's real tokens (padding is ``-1`` in history).
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
        device = model.device
        batch, width = len(prompts), max(len(p) for p in prompts)
        history = torch.full((batch, width + max_new_tokens), PAD, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            history[row, width - len(prompt) : width] = torch.tensor(prompt, device=device)
        attention_mask = (history[:, :width] != PAD).long()
        seeds = resolve_row_seeds(config, batch, row_seeds).to(device)
        stops = torch.tensor(sorted(stop_set(model, stop_ids)), dtype=torch.long, device=device)
        sampler = TokenSampler(config)
        cache = model.new_cache()

        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        steps: list[tuple[torch.Tensor, ...]] = []
        sampler_seconds = prefill_seconds = 0.0
        start = time.perf_counter()
        input_ids = history[:, :width].clamp(min=0)
        for step in range(max_new_tokens):
            logits = model.forward(input_ids, cache, attention_mask, last_positions=1)[:, -1]
            if step == 0:
                prefill_seconds = time.perf_counter() - start
            tick = time.perf_counter()
            out = sampler.sample(
                logits,
                history[:, : width + step],
                row_seeds=seeds,
                step=step,
                generated=history[:, width : width + step],
            )
            sampler_seconds += time.perf_counter() - tick
            is_stop = torch.isin(out.tokens, stops) & ~finished
            active = ~finished
            keep = active & (~is_stop | self.keep_stop_token)
            lengths += keep.long()
            history[:, width + step] = torch.where(keep, out.tokens, PAD)
            steps.append((keep, out.model_logprobs, out.entropy, out.num_kept))
            stopped |= is_stop
            finished |= is_stop
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            input_ids = out.tokens.unsqueeze(1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=1)
        total = time.perf_counter() - start

        return GenerationOutput(
            token_ids=[new[new >= 0].tolist() for new in history[:, width:]],
            **_per_token_stats(steps),
            finished_by_stop=stopped.tolist(),
            prefill_seconds=prefill_seconds,
            decode_seconds=total - prefill_seconds,
            sampler_seconds=sampler_seconds,
            sampler_calls=len(steps),
            target_forwards=len(steps),
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
