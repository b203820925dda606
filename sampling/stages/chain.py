"""The stage registry and the chain runner: which stages exist, how each is applied, and which kind it is.

Adding a stage = one pure function (in this package) + one `STAGES` entry + its fields in `SamplingConfig`
(and its `STAGE_ENABLED` rule). Kinds tell `TokenSampler` what it may assume:

- ``modifier``: changes logits token by token (needs ids and the history): run on the whole vocabulary;
- ``scale``: a per-row positive scale (temperature), order-preserving;
- ``upper``: a threshold filter keeping an upper set of values — the candidate fast path can run it first;
- ``other``: a filter that needs the whole distribution it receives (typical, XTC).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sampling.config import SamplingConfig
from sampling.processors import (
    add_logit_bias,
    apply_penalties,
    dry_penalty,
    dynamic_temperature,
    epsilon_filter,
    eta_filter,
    min_p_filter,
    mirostat_filter,
    no_repeat_ngram_ban,
    top_k_filter,
    top_n_sigma_filter,
    top_p_filter,
    typical_filter,
    xtc_filter,
)
from sampling.stages.common import by_row_blocks, shifted_weights, softmax_summary, sum64
from sampling.stages.filters import finite_std


@dataclass
class ChainContext:
    """What a stage may read besides the logits it receives.

    ``full`` holds the whole rows while the chain runs on candidate columns and no filter has run yet
    (the row statistics then come from ``full`` scaled by ``scale``, the product of the temperatures so
    far); once a filter ran, the candidates hold every surviving token and ``full`` is None.
    """

    config: SamplingConfig
    history: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    full: torch.Tensor | None = None
    scale: torch.Tensor | float = 1.0
    sorted_desc: bool = False
    mu: torch.Tensor | None = None
    xtc_active: torch.Tensor | bool = True
    stats: dict[tuple[str, int], torch.Tensor] | None = None
    """Whole-row statistics of every row, shared by the passes of one candidate search (rows ``rows``)."""
    rows: torch.Tensor | None = None
    first_input: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """(the candidate values the first filter received, the rows' log-normalizer) after a candidate run."""
    last: torch.Tensor | None = None
    """[B, 1] column of each row's last real candidate when rows are padded (None: the last column)."""
    _scaled: torch.Tensor | None = field(default=None, repr=False)
    _rescales: int = 0

    def _row(self) -> torch.Tensor:
        if self._scaled is None:  # float32: a float64 copy of a batch costs more than its sums
            scale = self.scale.float() if isinstance(self.scale, torch.Tensor) else self.scale
            self._scaled = self.full if isinstance(scale, float) and scale == 1.0 else self.full * scale
        return self._scaled

    def _stat(self, name: str, values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]):
        if self.full is None:
            return compute(values)
        key = (name, self._rescales)
        if self.stats is None or (key not in self.stats and self.rows is not None):
            return compute(self._row())
        if key not in self.stats:
            self.stats[key] = compute(self._row())
        return self.stats[key] if self.rows is None else self.stats[key][self.rows]

    def log_total(self, values: torch.Tensor) -> torch.Tensor | None:
        if self.full is None:
            return None
        if self.stats is not None and ("summary", self._rescales) in self.stats:
            return self._stat("summary", values, _summary)[..., 0]
        return self._stat("log_total", values, _log_total)

    def top(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("max", values, lambda row: row.amax(-1).double())

    def entropy(self, values: torch.Tensor) -> torch.Tensor:
        if self.full is None:
            return softmax_summary(values)[1]
        return self._stat("summary", values, _summary)[..., 1]

    def count(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("count", values, lambda row: torch.isfinite(row).sum(-1))

    def sigma(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("sigma", values, finite_std)

    def rescale(self, temperature: torch.Tensor | float) -> None:
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.view(-1, 1)
        self.scale = self.scale / temperature
        self._scaled = None
        self._rescales += 1


def _summary(row: torch.Tensor) -> torch.Tensor:
    return torch.stack(softmax_summary(row), -1)


def _log_total(row: torch.Tensor) -> torch.Tensor:
    """The log-normalizer alone (float64): `softmax_summary` without the entropy's extra pass."""

    def block(rows: torch.Tensor) -> torch.Tensor:
        top, _, weights = shifted_weights(rows)
        return top.squeeze(-1).double() + sum64(weights).log()

    return by_row_blocks(block, row)


def _temperature(values: torch.Tensor, ctx: ChainContext) -> torch.Tensor:
    c = ctx.config
    if c.dynatemp_range <= 0.0:
        ctx.rescale(c.temperature)
        return values / c.temperature
    temps = dynamic_temperature(
        values, c.temperature, c.dynatemp_range, c.dynatemp_exponent, ctx.entropy(values), ctx.count(values)
    )
    ctx.rescale(temps)
    return (values.double() / temps.view(-1, 1)).to(values.dtype)


def _penalties(values: torch.Tensor, ctx: ChainContext) -> torch.Tensor:
    c = ctx.config
    return apply_penalties(
        values,
        ctx.history,
        repetition_penalty=c.repetition_penalty,
        repetition_window=c.repetition_window,
        generated=ctx.generated,
        frequency_penalty=c.frequency_penalty,
        presence_penalty=c.presence_penalty,
    )


def _dry(values: torch.Tensor, ctx: ChainContext) -> torch.Tensor:
    c = ctx.config
    return dry_penalty(
        values,
        ctx.history,
        c.dry_multiplier,
        c.dry_base,
        c.dry_allowed_length,
        c.dry_penalty_last_n,
        c.dry_sequence_breakers,
    )


@dataclass(frozen=True)
class Stage:
    apply: Callable[[torch.Tensor, ChainContext], torch.Tensor]
    kind: str


STAGES: dict[str, Stage] = {
    "penalties": Stage(_penalties, "modifier"),
    "dry": Stage(_dry, "modifier"),
    "no_repeat_ngram": Stage(
        lambda v, ctx: no_repeat_ngram_ban(v, ctx.history, ctx.config.no_repeat_ngram_size), "modifier"
    ),
    "logit_bias": Stage(lambda v, ctx: add_logit_bias(v, ctx.config.logit_bias), "modifier"),
    "temperature": Stage(_temperature, "scale"),
    "top_k": Stage(lambda v, ctx: top_k_filter(v, ctx.config.top_k, ctx.sorted_desc), "upper"),
    "top_p": Stage(
        lambda v, ctx: top_p_filter(v, ctx.config.top_p, ctx.log_total(v), ctx.sorted_desc), "upper"
    ),
    "min_p": Stage(lambda v, ctx: min_p_filter(v, ctx.config.min_p), "upper"),
    "typical_p": Stage(lambda v, ctx: typical_filter(v, ctx.config.typical_p), "other"),
    "epsilon": Stage(lambda v, ctx: epsilon_filter(v, ctx.config.epsilon_cutoff, ctx.log_total(v)), "upper"),
    "eta": Stage(
        lambda v, ctx: eta_filter(v, ctx.config.eta_cutoff, ctx.log_total(v), ctx.entropy(v)), "upper"
    ),
    "top_n_sigma": Stage(lambda v, ctx: top_n_sigma_filter(v, ctx.config.top_n_sigma, ctx.sigma(v)), "upper"),
    "xtc": Stage(
        lambda v, ctx: xtc_filter(v, ctx.config.xtc_threshold, ctx.xtc_active, ctx.log_total(v)), "other"
    ),
    "mirostat": Stage(lambda v, ctx: mirostat_filter(v, ctx.mu, ctx.log_total(v)), "upper"),
}
"""Every stage by name (the same names as `sampling.config.STAGE_NAMES`)."""


def split_chain(config: SamplingConfig) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(modifiers to run on the whole vocabulary first, the rest of the chain, whether the rest can run on
    a candidate prefix: no modifier in it, and its first non-scale stage is an upper-set filter)."""
    stages = config.stages
    head = 0
    while head < len(stages) and STAGES[stages[head]].kind == "modifier":
        head += 1
    rest = stages[head:]
    kinds = [STAGES[s].kind for s in rest]
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
        stage = STAGES[name]
        if stage.kind != "scale" and ctx.full is not None:
            ctx.first_input = (values, ctx.log_total(values) if name == "top_p" else None)
        values = stage.apply(values, ctx)
        if stage.kind != "scale" and ctx.full is not None:
            last = values[:, -1] if ctx.last is None else values.gather(1, ctx.last).squeeze(1)
            decided = torch.isinf(last)
            ctx.full = None
    return values, decided


def _eta_cut(ctx: ChainContext, row: torch.Tensor) -> torch.Tensor:
    eta = ctx.config.eta_cutoff
    cutoff = torch.clamp(math.sqrt(eta) * torch.exp(-ctx.entropy(row)), max=eta)
    return ctx.log_total(row) + cutoff.log()


THRESHOLDS: dict[str, Callable[[ChainContext, torch.Tensor], torch.Tensor]] = {
    "min_p": lambda ctx, row: ctx.top(row) + math.log(ctx.config.min_p),
    "epsilon": lambda ctx, row: ctx.log_total(row) + math.log(ctx.config.epsilon_cutoff),
    "eta": _eta_cut,
    "mirostat": lambda ctx, row: ctx.log_total(row) - ctx.mu.double() * math.log(2.0),
    "top_n_sigma": lambda ctx, row: ctx.top(row) - ctx.config.top_n_sigma * ctx.sigma(row),
}
"""Upper-set filters whose cut is a value threshold from whole-row statistics: t with kept ⇔ value ≥ t."""
_MARGIN = 1e-5
"""Relative slack of `first_threshold`: the filter itself decides; the hint only has to hold its kept set."""


def first_threshold(stages: tuple[str, ...], ctx: ChainContext) -> torch.Tensor | None:
    """A float32 [B] lower bound on the values of ``ctx.full`` (the unscaled whole rows) that the first
    filter of ``stages`` keeps, or None when the first filter is not in `THRESHOLDS`. The filter's cut is
    found on the rows scaled by the leading scale stages (which this applies to ``ctx``) and mapped back
    through the (positive, order-preserving) scale; the bound has a little slack for rounding."""
    for name in stages:
        if STAGES[name].kind != "scale":
            break
        STAGES[name].apply(ctx.full[:, :1], ctx)
    else:
        return None
    if name not in THRESHOLDS:
        return None
    row = ctx._row()
    cut = torch.minimum(THRESHOLDS[name](ctx, row), ctx.top(row))
    scale = ctx.scale.double().view(-1) if isinstance(ctx.scale, torch.Tensor) else ctx.scale
    cut = cut / scale  # the unscaled rows are what the candidates are picked from
    return (cut - _MARGIN * (1.0 + cut.abs())).float()
