"""A stage is one rule and one record: a made-up stage, defined here and nowhere else, runs through the
sampler (whole rows, candidates, the threshold pass), validates its field, and reaches the schema's fields."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampling import TokenSampler
from sampling.config import STAGES, config_class, sampling_params
from sampling.stages import candidates
from sampling.stages.common import NEG_INF
from sampling.stages.record import Param, Stage, number


def logit_window_filter(logits: torch.Tensor, width: float) -> torch.Tensor:
    """Keep token i iff logit_i ≥ max_j logit_j − ``width`` (the one function of the made-up stage).

    >>> logit_window_filter(torch.tensor([[3.0, 2.0, 0.5]]), 1.0)
    tensor([[3., 2., -inf]])
    """
    top = logits.amax(-1, keepdim=True)
    return logits.masked_fill(logits < top - width, NEG_INF)


LOGIT_WINDOW = Stage(  # ... and its one record
    name="logit_window",
    kind="upper",
    params=(
        Param(
            "window_width",
            float,
            0.0,
            number(lambda v: v >= 0, ">= 0 (0 = disabled)"),
            "Keep logits within this of the row's maximum.",
        ),
    ),
    enabled=lambda c: c.window_width > 0.0,
    apply=lambda v, ctx: logit_window_filter(v, ctx.config.window_width),
    doc="Keep the logits within a window below the row's maximum.",
    threshold=lambda ctx, row: ctx.top(row) - ctx.config.window_width,
)

WindowConfig = config_class((*STAGES, LOGIT_WINDOW), name="WindowConfig")


def reference(row: np.ndarray, top_k: int, temperature: float, width: float) -> np.ndarray:
    values = row.astype(np.float64)
    if top_k:
        values = np.where(values >= np.sort(values)[::-1][top_k - 1], values, -np.inf)
    values = values / temperature
    values = np.where(values >= values.max() - width, values, -np.inf)
    probs = np.exp(values - values.max())
    return probs / probs.sum()


@pytest.mark.parametrize("vocab", [50, 40_000])
@pytest.mark.parametrize("top_k", [0, 1000])  # 0: the new stage is the first filter (threshold pass if wide)
def test_a_made_up_stage_runs_through_the_sampler_exactly(vocab: int, top_k: int, monkeypatch):
    threshold_passes = []
    above = candidates.candidates_above
    monkeypatch.setattr(candidates, "candidates_above", lambda *a: threshold_passes.append(1) or above(*a))
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen) * torch.tensor([[0.3], [1.0], [3.0], [8.0]])
    config = WindowConfig(
        top_k=top_k, temperature=0.7, window_width=1.5, order=("top_k", "temperature", "logit_window")
    )
    probs = TokenSampler(config).distribution(logits)
    for b in range(4):
        want = reference(logits[b].numpy(), min(top_k, vocab), 0.7, 1.5)
        np.testing.assert_allclose(probs[b].numpy(), want, atol=2e-6)
    assert bool(threshold_passes) == (vocab > candidates.MAX_CANDIDATES and not top_k)
    drawn = TokenSampler(config).sample(logits, row_seeds=torch.arange(4)).tokens
    assert (probs.gather(1, drawn.view(-1, 1)) > 0).all()


def test_a_made_up_stage_validates_its_field_and_joins_the_fields():
    with pytest.raises(ValueError, match=r"^sampling\.window_width=-1\.0 is invalid: must be >= 0"):
        WindowConfig(window_width=-1.0, order=("logit_window",))
    with pytest.raises(ValueError, match=r"\['logit_window'\] are not in it"):
        WindowConfig(window_width=1.0)  # the named orders do not hold it: it must be listed
    assert "window_width" in {param.name for param in sampling_params((*STAGES, LOGIT_WINDOW))}
    assert "window_width" not in {param.name for param in sampling_params()}


def test_a_record_repeating_a_name_or_a_field_is_refused():
    with pytest.raises(ValueError, match="repeats"):
        config_class((*STAGES, STAGES[0]))
    with pytest.raises(ValueError, match="only an 'upper' filter"):
        Stage("bad", "scale", (), lambda c: True, lambda v, ctx: v, "", threshold=lambda ctx, row: row)
