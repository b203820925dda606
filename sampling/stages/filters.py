"""Filters beyond the classic ones: typical, ε, η, top-nσ, XTC and mirostat v2's surprise cut.

Each takes logits ``[B, N]`` (the distribution the stage receives; ``-inf`` = already dropped) and returns
new logits with dropped tokens at ``-inf``. Statistics of the whole row (``log_total``, ``entropy``,
``sigma``) can be passed in when ``logits`` hold only a candidate subset of it. A filter that would drop
every token keeps the most likely one(s) instead.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sampling.stages.common import (
    NEG_INF,
    SORT_UP_TO,
    entropy,
    finite_std,
    keep_at_least,
    keep_or_most_likely,
    logsumexp,
    mass_threshold,
    softmax_summary,
)
from sampling.stages.record import Param, Stage, integer, number

if TYPE_CHECKING:
    from sampling.stages.context import ChainContext


def _log_probs(logits: torch.Tensor, log_total: torch.Tensor | None) -> torch.Tensor:
    log_total = logsumexp(logits.double()) if log_total is None else log_total.double()
    return logits.double() - log_total.unsqueeze(-1)


def epsilon_filter(
    logits: torch.Tensor, epsilon: float, log_total: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep token i iff π_i ≥ ε (Hewitt et al. 2022's ε-sampling).

    >>> epsilon_filter(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 0.2).exp()
    tensor([[0.6000, 0.3000, 0.0000]])
    """
    if epsilon <= 0.0:
        return logits
    return keep_or_most_likely(logits, _log_probs(logits, log_total) >= math.log(epsilon))


def eta_filter(
    logits: torch.Tensor,
    eta: float,
    log_total: torch.Tensor | None = None,
    row_entropy: torch.Tensor | None = None,
) -> torch.Tensor:
    """Keep token i iff π_i ≥ min(η, √η · exp(−H(π))), H in nats (Hewitt et al. 2022's η-sampling).

    >>> eta_filter(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 0.2).exp()
    tensor([[0.6000, 0.3000, 0.0000]])
    """
    if eta <= 0.0:
        return logits
    log_probs = _log_probs(logits, log_total)
    if row_entropy is None:
        row_entropy = entropy(logits, log_total)
    cutoff = torch.minimum(torch.full_like(row_entropy, eta), math.sqrt(eta) * torch.exp(-row_entropy))
    return keep_or_most_likely(logits, log_probs >= cutoff.log().unsqueeze(-1))


def top_n_sigma_filter(logits: torch.Tensor, n: float, sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Keep token i iff logit_i ≥ max − n·σ, σ the population std of the row's finite logits (Tang et
    al. 2024). ``sigma`` ([B]) is the whole row's σ when ``logits`` hold candidates only.

    >>> top_n_sigma_filter(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), 1.0)
    tensor([[3., 2., -inf, -inf]])
    """
    if n <= 0.0:
        return logits
    sigma = finite_std(logits) if sigma is None else sigma
    cutoff = logits.amax(-1, keepdim=True).double() - n * sigma.unsqueeze(-1)
    return logits.masked_fill(logits.double() < cutoff, NEG_INF)


def typical_filter(logits: torch.Tensor, typical_p: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2022): order tokens by d_i = |−log π_i − H(π)| and keep
    the smallest prefix of that order whose mass is ≥ ``typical_p`` (equal d share a fate).

    Needs the whole row. Wide rows find the boundary by histogram (`mass_threshold`), not a sort.

    >>> typical_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.25).exp()
    tensor([[0.0000, 0.3000, 0.0000]])
    """
    if typical_p >= 1.0:
        return logits
    log_total, row_entropy = softmax_summary(logits)
    # |−log π_i − H| = |logit_i − c| with c = log-normalizer − H; wide rows stay in float32 (monotone
    # rounding: equal logits keep equal keys), narrow ones are cheap enough in float64
    wide = logits.shape[-1] > SORT_UP_TO
    values = logits if wide else logits.double()
    keys = -(values - (log_total - row_entropy).to(values.dtype).unsqueeze(-1)).abs()  # -inf logit: -inf
    threshold = mass_threshold(keys, values, typical_p)
    if not wide:
        return logits.masked_fill(keys < threshold, NEG_INF)
    # logits + (0 where kept, -inf where dropped) with vectorized passes; -inf logits give NaN → -inf
    shift = keep_at_least(keys, threshold) - keys
    return torch.nan_to_num_(logits + shift, nan=NEG_INF, posinf=math.inf, neginf=NEG_INF)


def xtc_filter(
    logits: torch.Tensor,
    threshold: float,
    active: torch.Tensor | bool = True,
    log_total: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exclude Top Choices: in ``active`` rows ([B] bools: where the stage's coin came up), if at least two
    tokens have π_i ≥ ``threshold``, drop all of them except the least likely (its ties kept too).

    >>> xtc_filter(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), 0.2).exp()
    tensor([[0.0000, 0.3000, 0.1500, 0.0500]])
    """
    log_probs = _log_probs(logits, log_total)
    top_choices = log_probs >= math.log(threshold) if threshold > 0 else torch.isfinite(log_probs)
    least_top = torch.where(top_choices, logits, float("inf")).amin(-1, keepdim=True)
    drop = top_choices & (logits > least_top) & (top_choices.sum(-1, keepdim=True) >= 2)
    if not isinstance(active, bool):
        drop &= active.view(-1, 1)
    elif not active:
        return logits
    return logits.masked_fill(drop, NEG_INF)


def mirostat_filter(
    logits: torch.Tensor, mu: torch.Tensor, log_total: torch.Tensor | None = None
) -> torch.Tensor:
    """Mirostat v2's cut (Basu et al. 2021): keep token i iff its surprise −log₂ π_i ≤ μ (``mu``: [B]).

    >>> mirostat_filter(torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]])), torch.tensor([2.5])).exp()
    tensor([[0.5000, 0.2500, 0.0000, 0.0000]])
    """
    surprise = _log_probs(logits, log_total) / -math.log(2.0)
    return keep_or_most_likely(logits, surprise <= mu.double().view(-1, 1))


def mirostat_update(mu: torch.Tensor, token_logprob: torch.Tensor, tau: float, eta: float) -> torch.Tensor:
    """μ ← μ − η·(s − τ), s = −log₂ π(token) under the truncated distribution (``token_logprob`` in nats).

    >>> mirostat_update(torch.tensor([10.0]), torch.tensor([math.log(0.25)]), tau=5.0, eta=0.5)
    tensor([11.5000], dtype=torch.float64)
    """
    surprise = token_logprob.double() / -math.log(2.0)
    return mu.double() - eta * (surprise - tau)


# --- records ------------------------------------------------------------------------------------------


def _eta_cut(ctx: ChainContext, row: torch.Tensor) -> torch.Tensor:
    eta = ctx.config.eta_cutoff
    cutoff = torch.clamp(math.sqrt(eta) * torch.exp(-ctx.entropy(row)), max=eta)
    return ctx.log_total(row) + cutoff.log()


TYPICAL_P = Stage(
    name="typical_p",
    kind="other",
    params=(
        Param(
            "typical_p",
            float,
            1.0,
            number(lambda v: 0 < v <= 1, "in (0, 1] (1 = disabled)"),
            "Locally typical sampling: the mass kept, closest to the entropy first.",
        ),
    ),
    enabled=lambda c: c.typical_p < 1.0,
    apply=lambda v, ctx: typical_filter(v, ctx.config.typical_p),
    doc="Locally typical sampling (Meister et al. 2022); needs the whole distribution it receives.",
)

EPSILON = Stage(
    name="epsilon",
    kind="upper",
    params=(
        Param(
            "epsilon_cutoff",
            float,
            0.0,
            number(lambda v: 0 <= v < 1, "in [0, 1) (0 = disabled)"),
            "Keep tokens of probability >= ε.",
        ),
    ),
    enabled=lambda c: c.epsilon_cutoff > 0.0,
    apply=lambda v, ctx: epsilon_filter(v, ctx.config.epsilon_cutoff, ctx.log_total(v)),
    doc=epsilon_filter.__doc__.split("\n")[0],
    threshold=lambda ctx, row: ctx.log_total(row) + math.log(ctx.config.epsilon_cutoff),
)

ETA = Stage(
    name="eta",
    kind="upper",
    params=(
        Param(
            "eta_cutoff",
            float,
            0.0,
            number(lambda v: 0 <= v < 1, "in [0, 1) (0 = disabled)"),
            "Keep tokens of probability >= min(η, √η·exp(−H)).",
        ),
    ),
    enabled=lambda c: c.eta_cutoff > 0.0,
    apply=lambda v, ctx: eta_filter(v, ctx.config.eta_cutoff, ctx.log_total(v), ctx.entropy(v)),
    doc=eta_filter.__doc__.split("\n")[0],
    threshold=_eta_cut,
)

TOP_N_SIGMA = Stage(
    name="top_n_sigma",
    kind="upper",
    params=(
        Param(
            "top_n_sigma",
            float,
            0.0,
            number(lambda v: v >= 0, ">= 0 (0 = disabled)"),
            "Keep logits >= max − n·σ of the row's finite logits.",
        ),
    ),
    enabled=lambda c: c.top_n_sigma > 0.0,
    apply=lambda v, ctx: top_n_sigma_filter(v, ctx.config.top_n_sigma, ctx.sigma(v)),
    doc="Keep logits within n standard deviations of the row's maximum (Tang et al. 2024).",
    threshold=lambda ctx, row: ctx.top(row) - ctx.config.top_n_sigma * ctx.sigma(row),
)

XTC = Stage(
    name="xtc",
    kind="other",
    params=(
        Param(
            "xtc_probability",
            float,
            0.0,
            number(lambda v: 0 <= v <= 1, "in [0, 1] (0 = disabled)"),
            "Chance, per row and step, that XTC acts (its coin comes from the row's noise).",
        ),
        Param(
            "xtc_threshold",
            float,
            0.1,
            number(lambda v: 0 <= v <= 1, "in [0, 1]"),
            "Tokens at least this likely are the top choices XTC excludes (all but the least likely).",
        ),
    ),
    enabled=lambda c: c.xtc_probability > 0.0,
    apply=lambda v, ctx: xtc_filter(v, ctx.config.xtc_threshold, ctx.xtc_active, ctx.log_total(v)),
    doc="Exclude Top Choices: when the coin comes up, drop all top choices but the least likely.",
)

MIROSTAT = Stage(
    name="mirostat",
    kind="upper",
    params=(
        Param(
            "mirostat",
            int,
            0,
            integer(lambda v: v in (0, 2), "0 (off) or 2 (mirostat v2)"),
            "2: mirostat v2 (a per-row μ carried between steps); 0: off.",
        ),
        Param(
            "mirostat_tau",
            float,
            5.0,
            number(lambda v: v >= 0, ">= 0"),
            "Target surprise τ in bits; μ starts at 2τ.",
        ),
        Param("mirostat_eta", float, 0.1, number(lambda v: v >= 0, ">= 0"), "Learning rate η of μ."),
    ),
    enabled=lambda c: c.mirostat == 2,
    apply=lambda v, ctx: mirostat_filter(v, ctx.mu, ctx.log_total(v)),
    doc="Mirostat v2's cut: keep tokens whose surprise is at most the row's μ (last in a chain).",
    threshold=lambda ctx, row: ctx.log_total(row) - ctx.mu.double() * math.log(2.0),
)

RECORDS = (TYPICAL_P, EPSILON, ETA, TOP_N_SIGMA, XTC, MIROSTAT)
"""This module's stages, in `STAGE_NAMES` order."""
