"""Likelihood and uncertainty of the generated tokens, from the per-step sampler stats (no forward pass)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING

from rtdlm_experiments.metrics._ngrams import ratio

if TYPE_CHECKING:
    from sampling.decoding.base import GenerationOutput


def _pooled_mean(rows: Sequence[Sequence[float]]) -> float:
    """Mean over every value of every row (token-weighted); 0.0 when there are none."""
    values = list(chain.from_iterable(rows))
    return ratio(math.fsum(values), len(values))


def likelihood_metrics(output: GenerationOutput) -> dict[str, float]:
    """Token-weighted means pooled over the whole batch:

    - ``nll_per_token`` = −mean of ``model_logprobs`` (log-softmax of the generating model's raw logits at
      each generated token, before any sampling transform); 0.0 when there are none.
    - ``perplexity`` = exp(``nll_per_token``), so 1.0 when there are no tokens; inf on overflow.
    - ``mean_entropy`` = mean of ``entropies`` (nats, of the distribution each token was sampled from).
    - ``mean_kept`` = mean of ``num_kept`` (tokens with nonzero probability after the filters).

    Each mean is 0.0 when its list is empty (e.g. a decoder that did not record it).
    """
    nll = -_pooled_mean(output.model_logprobs)
    try:
        perplexity = math.exp(nll)
    except OverflowError:
        perplexity = math.inf
    return {
        "nll_per_token": nll,
        "perplexity": perplexity,
        "mean_entropy": _pooled_mean(output.entropies),
        "mean_kept": _pooled_mean(output.num_kept),
    }
