"""The classic stages: temperature (with llama.cpp's dynamic temperature), top-k, top-p and min-p.

Each rule takes logits ``[B, N]`` (``N`` is the vocabulary, or a candidate subset of it) and returns new
logits with filtered tokens set to ``-inf``; inputs are never modified. Every filter is a threshold on
values, so equal logits always share a fate and the result does not depend on the order of the columns.
The `Stage` records at the end bind each rule to its config fields.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sampling.stages.common import NEG_INF, entropy, keep_at_least, mass_threshold
from sampling.stages.record import Param, Stage, integer, number

if TYPE_CHECKING:
    from sampling.stages.context import ChainContext


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0); 1 is a no-op.

    >>> apply_temperature(torch.tensor([[2.0, 1.0]]), 0.5)
    tensor([[4., 2.]])
    """
    return logits if temperature == 1.0 else logits / temperature


def dynamic_temperature(
    logits: torch.Tensor,
    temperature: float,
    spread: float,
    exponent: float,
    row_entropy: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row temperature T' = T_min + (T_max − T_min)·(H/log N)^exponent with T_min = max(0, T − spread),
    T_max = T + spread, H the entropy (nats) and N the number of finite logits of the row (llama.cpp's
    dynamic temperature; H/log N = 0 when N = 1). Returns T' ([B], float64, floored at 1e-4: a T' of 0
    would be greedy, which a row-wise scale cannot express).

    >>> dynamic_temperature(torch.tensor([[0.0, 0.0], [9.0, float("-inf")]]), 1.0, 0.5, 1.0)
    tensor([1.5000, 0.5000], dtype=torch.float64)
    """
    row_entropy = entropy(logits) if row_entropy is None else row_entropy.double()
    count = torch.isfinite(logits).sum(-1) if count is None else count
    max_entropy = count.double().clamp(min=1).log()
    normalized = torch.where(max_entropy > 0, row_entropy / max_entropy.clamp(min=1e-300), 0.0).clamp(0, 1)
    low, high = max(0.0, temperature - spread), temperature + spread
    return (low + (high - low) * normalized.pow(exponent)).clamp(min=1e-4)


def top_k_filter(logits: torch.Tensor, k: int, sorted_desc: bool = False) -> torch.Tensor:
    """Keep every token whose logit ≥ the k-th largest logit of its row (boundary ties are kept).

    ``sorted_desc`` promises each row is already sorted descending (candidate sets are), saving a top-k.

    >>> top_k_filter(torch.tensor([[3.0, 1.0, 2.0, 2.0]]), 2)
    tensor([[3., -inf, 2., 2.]])
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits[..., k - 1 : k] if sorted_desc else torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep token i iff π_i ≥ min_p · max_j π_j, with π = softmax(logits) (no normalizer needed).

    >>> min_p_filter(torch.tensor([[0.0, -0.5, -3.0]]), 0.2)
    tensor([[ 0.0000, -0.5000,    -inf]])
    """
    if min_p <= 0.0:
        return logits
    top = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(torch.exp(logits - top) < min_p, NEG_INF)


def top_p_filter(
    logits: torch.Tensor, top_p: float, log_total: torch.Tensor | None = None, sorted_desc: bool = False
) -> torch.Tensor:
    """Keep token i iff the probability mass strictly above it is < ``top_p`` (nucleus sampling).

    The token that crosses ``top_p`` is kept and equal-probability tokens share a fate, so at least one
    token always survives. ``log_total`` ([B]) is the log-normalizer of the full distribution when
    ``logits`` hold only a candidate subset of it; by default it is ``logsumexp(logits)``.
    The mass is accumulated in float64 so the boundary agrees with an exact computation.
    ``sorted_desc`` promises rows already sorted descending, saving the sort; wide unsorted rows find the
    boundary by histogram instead of a sort (`mass_threshold`).

    >>> top_p_filter(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), 0.6).exp()
    tensor([[0.5000, 0.3000, 0.0000]])
    """
    if top_p >= 1.0:
        return logits
    if not sorted_desc and log_total is None:
        return keep_at_least(logits, mass_threshold(logits, logits, top_p))
    values = logits.double()
    if not sorted_desc:
        values = torch.sort(values, dim=-1, descending=True).values
    if log_total is None:  # the fused softmax kernel: one op instead of a logsumexp and an exp
        mass = torch.softmax(values, dim=-1).cumsum(dim=-1)
    else:
        mass = torch.exp(values - log_total.double().unsqueeze(-1)).cumsum(dim=-1)
    mass_above = torch.nn.functional.pad(mass[..., :-1], (1, 0))  # exclusive: exactly non-decreasing
    # The last token whose mass above is < p sets the threshold; a tie group's first member is its
    # earliest (smallest mass above), so ties at the boundary are kept together by `logits >= threshold`.
    last_kept = (mass_above < top_p).sum(dim=-1, keepdim=True).clamp(min=1) - 1
    threshold = values.gather(-1, last_kept).to(logits.dtype)
    return logits.masked_fill(logits < threshold, NEG_INF)


# --- records ------------------------------------------------------------------------------------------


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


TEMPERATURE = Stage(
    name="temperature",
    kind="scale",
    params=(
        Param(
            "temperature",
            float,
            1.0,
            number(lambda v: v >= 0, "finite and >= 0 (0 = greedy)"),
            "Divides the logits; 0 = greedy (argmax after the logit modifiers).",
        ),
        Param(
            "dynatemp_range",
            float,
            0.0,
            number(lambda v: v >= 0, ">= 0 (0 = disabled)"),
            "llama.cpp's dynamic temperature: T ± range by the row's normalized entropy.",
        ),
        Param(
            "dynatemp_exponent",
            float,
            1.0,
            number(lambda v: v > 0, "> 0"),
            "Exponent of the normalized entropy in the dynamic temperature.",
        ),
    ),
    enabled=lambda c: c.temperature != 1.0 or c.dynatemp_range > 0.0,
    apply=_temperature,
    doc="Scale each row by 1/T (a per-row T' with dynamic temperature): order-preserving.",
)

TOP_K = Stage(
    name="top_k",
    kind="upper",
    params=(
        Param(
            "top_k",
            int,
            0,
            integer(lambda v: v >= 0, ">= 0 (0 = disabled)"),
            "Keep the k most likely tokens (ties at the boundary kept).",
        ),
    ),
    enabled=lambda c: c.top_k > 0,
    apply=lambda v, ctx: top_k_filter(v, ctx.config.top_k, ctx.sorted_desc),
    doc=top_k_filter.__doc__.split("\n")[0],
)

TOP_P = Stage(
    name="top_p",
    kind="upper",
    params=(
        Param(
            "top_p",
            float,
            1.0,
            number(lambda v: 0 < v <= 1, "in (0, 1] (1 = disabled)"),
            "Nucleus: keep the smallest top set with mass >= top_p.",
        ),
    ),
    enabled=lambda c: c.top_p < 1.0,
    apply=lambda v, ctx: top_p_filter(v, ctx.config.top_p, ctx.log_total(v), ctx.sorted_desc),
    doc=top_p_filter.__doc__.split("\n")[0],
)

MIN_P = Stage(
    name="min_p",
    kind="upper",
    params=(
        Param(
            "min_p",
            float,
            0.0,
            number(lambda v: 0 <= v <= 1, "in [0, 1] (0 = disabled)"),
            "Keep tokens at least min_p times as likely as the most likely one.",
        ),
    ),
    enabled=lambda c: c.min_p > 0.0,
    apply=lambda v, ctx: min_p_filter(v, ctx.config.min_p),
    doc=min_p_filter.__doc__.split("\n")[0],
    threshold=lambda ctx, row: ctx.top(row) + math.log(ctx.config.min_p),
)

RECORDS = (TEMPERATURE, TOP_K, TOP_P, MIN_P)
"""This module's stages, in `STAGE_NAMES` order."""
