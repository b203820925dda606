"""The chain runner: the enabled stages of a config, in its order, each applied by its record.

Which stages exist, and what each one's kind lets `TokenSampler` assume, is in the records
(`sampling.stages.record`, collected by `sampling.stages.registry`); a config class carries its table
(``config.stage_table``), so the runner never names a stage's rule.
"""

from __future__ import annotations

from typing import Any

import torch

from sampling.stages.context import ChainContext


def split_chain(config: Any) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(modifiers to run on the whole vocabulary first, the rest of the chain, whether the rest can run on
    a candidate prefix: no modifier in it, and its first non-scale stage is an upper-set filter)."""
    stages, table = config.stages, config.stage_table
    head = 0
    while head < len(stages) and table[stages[head]].kind == "modifier":
        head += 1
    rest = stages[head:]
    kinds = [table[s].kind for s in rest]
    first_filter = next((k for k in kinds if k != "scale"), None)
    return stages[:head], rest, first_filter == "upper" and "modifier" not in kinds


def run_chain(
    values: torch.Tensor, stages: tuple[str, ...], ctx: ChainContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply ``stages`` in order. Also returns, per row, whether the result is exact: always in dense mode
    (``ctx.full`` None); on candidates, iff the first filter dropped the last (smallest) candidate, so
    that every token outside the candidates is provably dropped too."""
    decided = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
    for name in stages:
        stage = ctx.config.stage_table[name]
        if stage.kind != "scale" and ctx.full is not None:
            ctx.first_input = (values, ctx.log_total(values) if name == "top_p" else None)
        values = stage.apply(values, ctx)
        if stage.kind != "scale" and ctx.full is not None:
            last = values[:, -1] if ctx.last is None else values.gather(1, ctx.last).squeeze(1)
            decided = torch.isinf(last)
            ctx.full = None
    return values, decided


_MARGIN = 1e-5
"""Relative slack of `first_threshold`: the filter itself decides; the hint only has to hold its kept set."""


def first_threshold(stages: tuple[str, ...], ctx: ChainContext) -> torch.Tensor | None:
    """A float32 [B] lower bound on the values of ``ctx.full`` (the unscaled whole rows) that the first
    filter of ``stages`` keeps, or None when the first filter has no ``threshold``. The filter's cut is
    found on the rows scaled by the leading scale stages (which this applies to ``ctx``) and mapped back
    through the (positive, order-preserving) scale; the bound has a little slack for rounding."""
    table = ctx.config.stage_table
    for name in stages:
        if table[name].kind != "scale":
            break
        table[name].apply(ctx.full[:, :1], ctx)
    else:
        return None
    threshold = table[name].threshold
    if threshold is None:
        return None
    row = ctx._row()
    cut = torch.minimum(threshold(ctx, row), ctx.top(row))
    scale = ctx.scale.double().view(-1) if isinstance(ctx.scale, torch.Tensor) else ctx.scale
    cut = cut / scale  # the unscaled rows are what the candidates are picked from
    return (cut - _MARGIN * (1.0 + cut.abs())).float()
