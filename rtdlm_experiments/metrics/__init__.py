"""Metrics: pure functions from generations to a flat ``dict[str, float]`` (no logging here).

Diversity and repetition come from the token ids and texts (:func:`generation_metrics`); likelihood and
speed from a decoder's `GenerationOutput`; :func:`all_metrics` merges the lot.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rtdlm_experiments.metrics.diversity import (
    SELF_BLEU_MAX_HYPOTHESES,
    compression_ratio,
    distinct_n,
    diversity_metrics,
    sample_hypotheses,
    self_bleu,
    sufficient_references,
)
from rtdlm_experiments.metrics.likelihood import likelihood_metrics
from rtdlm_experiments.metrics.repetition import (
    ends_in_loop,
    loop_rate,
    rep_window,
    repetition_metrics,
    seq_rep_n,
    zipf_coefficient,
    zipf_coefficient_from_counts,
)
from rtdlm_experiments.metrics.speed import speed_metrics

if TYPE_CHECKING:
    from sampling.decoding.base import GenerationOutput

__all__ = [
    "SELF_BLEU_MAX_HYPOTHESES",
    "all_metrics",
    "compression_ratio",
    "distinct_n",
    "diversity_metrics",
    "ends_in_loop",
    "generation_metrics",
    "likelihood_metrics",
    "loop_rate",
    "rep_window",
    "repetition_metrics",
    "sample_hypotheses",
    "self_bleu",
    "seq_rep_n",
    "speed_metrics",
    "sufficient_references",
    "zipf_coefficient",
    "zipf_coefficient_from_counts",
]


def generation_metrics(
    token_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    *,
    self_bleu_max_hypotheses: int = SELF_BLEU_MAX_HYPOTHESES,
    seed: int = 0,
) -> dict[str, float]:
    """Every diversity and repetition metric of one job's generations (``texts[i]`` decodes
    ``token_ids[i]``): ``distinct_{1..4}``, ``distinct_{1..4}_words``, ``self_bleu_4``,
    ``compression_ratio``, ``seq_rep_4``, ``rep_w16``, ``loop_rate``, ``zipf_coefficient``.
    """
    if len(token_ids) != len(texts):
        raise ValueError(f"{len(token_ids)} token id lists but {len(texts)} texts")
    return diversity_metrics(token_ids, texts, self_bleu_max_hypotheses, seed) | repetition_metrics(token_ids)


def all_metrics(
    output: GenerationOutput,
    texts: Sequence[str],
    baseline_seconds: float | None = None,
    *,
    self_bleu_max_hypotheses: int = SELF_BLEU_MAX_HYPOTHESES,
    seed: int = 0,
) -> dict[str, float]:
    """:func:`generation_metrics` on ``output.token_ids`` and ``texts``, plus :func:`likelihood_metrics` and
    :func:`speed_metrics`, in one flat dict."""
    return (
        speed_metrics(output, baseline_seconds)
        | likelihood_metrics(output)
        | generation_metrics(
            output.token_ids, texts, self_bleu_max_hypotheses=self_bleu_max_hypotheses, seed=seed
        )
    )
