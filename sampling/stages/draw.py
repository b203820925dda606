"""The end of a step: the draw from the final logits, its entropy, and the model's log-probabilities.

Narrow rows (candidate subsets) race over their candidates with noise keyed by token id; wide rows (the
whole vocabulary) race in two levels. Which applies depends on the row alone, so draws are
batch-invariant.
"""

from __future__ import annotations

import torch

from sampling import noise
from sampling.stages.common import (
    BLOCK_ELEMENTS,
    NEG_INF,
    SORT_UP_TO,
    by_row_blocks,
    shifted_weights,
    softmax_summary,
    summary_of_weights,
)
from sampling.stages.select import CHUNK_STREAM, chunked_race


def draw(
    logits: torch.Tensor,
    ids: torch.Tensor,
    wide: torch.Tensor | None,
    narrow_width: int | None,
    seeds: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: the winning column, the log-normalizer and entropy of the final logits, and the number of
    kept tokens. Narrow rows race over their candidates (noise keyed by token id); wide rows race in two
    levels (`chunked_race`: the same distribution, a tenth of the hashing), a few rows at a time. Which
    applies depends on the row alone, so draws stay batch-invariant."""
    keys = noise.row_keys(seeds, steps)
    if wide is None or not bool(wide.any()):
        return (noise.race_argmax(logits, keys, ids), *_summary_and_count(logits))
    chunk_keys = noise.row_keys(seeds, steps, CHUNK_STREAM)
    if bool(wide.all()):
        return by_row_blocks(_wide_draw, logits, keys, chunk_keys)
    narrow = ~wide
    width = narrow_width or ids.shape[1]
    narrow_logits = logits[narrow, :width]
    narrow_winner = noise.race_argmax(narrow_logits, keys[narrow], ids[narrow, :width])
    parts = (
        (narrow, (narrow_winner, *_summary_and_count(narrow_logits))),
        (wide, by_row_blocks(_wide_draw, logits[wide], keys[wide], chunk_keys[wide])),
    )
    merged = [torch.empty(keys.shape[0], dtype=x.dtype, device=keys.device) for x in parts[0][1]]
    for rows, values in parts:
        for out, value in zip(merged, values, strict=True):
            out[rows] = value
    return tuple(merged)


def _summary_and_count(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-normalizer, entropy and kept count of candidate rows (narrow: float64 costs nothing here)."""
    if logits.shape[1] > SORT_UP_TO:
        return (*softmax_summary(logits), (logits > NEG_INF).sum(1))
    values = logits.double()
    log_total = torch.logsumexp(values, 1)
    log_probs = values - log_total.unsqueeze(1)
    entropy = -(log_probs.exp() * log_probs).nansum(1)  # dropped: 0 · -inf = NaN, left out
    return log_total, entropy, (values > NEG_INF).sum(1)


def _wide_draw(
    logits: torch.Tensor, keys: torch.Tensor, chunk_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`draw` for whole rows: one exp pass serves the race and the summary."""
    top, shifted, weights = shifted_weights(logits)
    winner = chunked_race(logits, keys, chunk_keys, weights=weights)
    return (winner, *summary_of_weights(top, shifted, weights), (logits > NEG_INF).sum(1))


def raw_log_total(stats: dict) -> torch.Tensor | None:
    """The log-normalizer of the unscaled rows if the candidate search computed it (float64), else None."""
    if ("summary", 0) in stats:
        return stats["summary", 0][..., 0]
    return stats.get(("log_total", 0))


def model_logprobs(
    raw: torch.Tensor, tokens: torch.Tensor, log_total: torch.Tensor | None = None
) -> torch.Tensor:
    if log_total is not None:  # known already: no pass over the rows
        return (raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - log_total).to(raw.dtype)
    # torch's fused log-softmax kernel (half the cost of a separate logsumexp), a few rows at a time: an
    # output the size of the batch would cost more in fresh pages than the kernel itself
    block = max(1, BLOCK_ELEMENTS // raw.shape[1])
    picked = [
        torch.log_softmax(raw[start : start + block], dim=1).gather(1, tokens[start : start + block, None])
        for start in range(0, raw.shape[0], block)
    ]
    return (picked[0] if len(picked) == 1 else torch.cat(picked)).squeeze(1)
