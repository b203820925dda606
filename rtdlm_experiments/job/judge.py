"""Judge likelihood: how probable another model (the judge) finds each generation's tokens, given its prompt.

A quality proxy for open-ended text (a larger model of the same family judging a smaller one's output):
``judge_nll_per_token`` is the judge's negative log-likelihood per generated token, pooled over tokens,
``judge_perplexity`` its exp. The judge reads the job model's token ids, so both must share a tokenizer
(the app checks). Pure computation: one forward of the judge per batch of generations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sampling.decoding.base import CausalLM, left_pad


def generation_nll(
    judge: CausalLM,
    prompt_ids: Sequence[Sequence[int]],
    generated_ids: Sequence[Sequence[int]],
    batch_size: int = 4,
) -> tuple[list[float], list[float]]:
    """Per generation, (Σ −log p_judge(token | prompt, earlier tokens), number of tokens).

    ``prompt_ids[i]`` is the prompt of ``generated_ids[i]``. Each batch is left-padded, so every row's
    generated tokens are its last ones and only the last ``longest + 1`` positions' logits are computed.
    """
    if len(prompt_ids) != len(generated_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(generated_ids)} generations")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: must be >= 1")
    sums: list[float] = []
    for start in range(0, len(generated_ids), batch_size):
        stop = start + batch_size
        sums += _batch_nll(judge, prompt_ids[start:stop], generated_ids[start:stop])
    return sums, [float(len(ids)) for ids in generated_ids]


def _batch_nll(
    judge: CausalLM, prompts: Sequence[Sequence[int]], generations: Sequence[Sequence[int]]
) -> list[float]:
    longest = max((len(ids) for ids in generations), default=0)
    if longest == 0:
        return [0.0] * len(generations)
    if any(not prompt for prompt in prompts):
        raise ValueError("judge scoring needs a non-empty prompt before each generation")
    ids, mask = left_pad([[*p, *g] for p, g in zip(prompts, generations, strict=True)], 0, judge.device)
    logits = judge.forward(ids, judge.new_cache(), attention_mask=mask, last_positions=longest + 1)
    sums = []
    for row, generated in enumerate(generations):
        if not generated:
            sums.append(0.0)
            continue
        # Position j's logits predict token j + 1: the row's n tokens are predicted by its last n + 1
        # positions but one.
        predicting = logits[row, -len(generated) - 1 : -1].log_softmax(dim=-1)
        targets = torch.tensor(list(generated), device=predicting.device).unsqueeze(-1)
        sums.append(-math.fsum(predicting.gather(-1, targets).squeeze(-1).double().tolist()))
    return sums
