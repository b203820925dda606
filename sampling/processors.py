"""One pure function per sampling stage, batched over rows.

Each takes logits ``[B, N]`` (``N`` is the vocabulary, or a candidate subset of it) and returns new
logits with filtered tokens set to ``-inf``; inputs are never modified. Every filter is a threshold on
values, so equal logits always share a fate and the result does not depend on the order of the columns.
"""

from __future__ import annotations

import torch

from sampling.stages.common import NEG_INF, keep_at_least, logsumexp, mass_threshold
from sampling.stages.filters import (
    dynamic_temperature,
    epsilon_filter,
    eta_filter,
    mirostat_filter,
    mirostat_update,
    top_n_sigma_filter,
    typical_filter,
    xtc_filter,
)
from sampling.stages.history import add_logit_bias, dry_penalty, no_repeat_ngram_ban

__all__ = [
    "NEG_INF",
    "add_logit_bias",
    "apply_penalties",
    "apply_temperature",
    "dry_penalty",
    "dynamic_temperature",
    "epsilon_filter",
    "eta_filter",
    "logsumexp",
    "min_p_filter",
    "mirostat_filter",
    "mirostat_update",
    "no_repeat_ngram_ban",
    "top_k_filter",
    "top_n_sigma_filter",
    "top_p_filter",
    "typical_filter",
    "xtc_filter",
]


def apply_penalties(
    logits: torch.Tensor,
    history: torch.Tensor | None,
    *,
    repetition_penalty: float = 1.0,
    repetition_window: int | None = None,
    generated: torch.Tensor | None = None,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
) -> torch.Tensor:
    """Repetition penalty over the context, then frequency/presence penalties over generated tokens.

    ``history`` / ``generated``: ``[B, L]`` token ids, negative = padding. The repetition penalty θ hits
    each distinct token of the last ``repetition_window`` real tokens of ``history`` once (logit > 0 →
    logit/θ, else logit·θ). OpenAI-style penalties then subtract ``f·count + p·[count > 0]`` for the
    tokens of ``generated`` (``history`` when ``generated`` is None).

    >>> apply_penalties(torch.tensor([[2.0, -1.0, 0.5]]), torch.tensor([[0, 1, 0]]), repetition_penalty=2.0)
    tensor([[ 1.0000, -2.0000,  0.5000]])
    """
    rep_on = repetition_penalty != 1.0 and history is not None and history.numel() > 0
    counted = history if generated is None else generated
    openai_on = (
        (frequency_penalty != 0.0 or presence_penalty != 0.0) and counted is not None and counted.numel() > 0
    )
    if not (rep_on or openai_on):
        return logits
    out = logits.clone()
    if rep_on:
        ids = history.to(out.device)
        valid = ids >= 0
        if repetition_window is not None and ids.shape[1] > repetition_window:
            real_from_end = valid.flip(1).cumsum(1).flip(1)
            valid = valid & (real_from_end <= repetition_window)
        _scatter_distinct(
            out, ids, valid, lambda v: torch.where(v > 0, v / repetition_penalty, v * repetition_penalty)
        )
    if openai_on:
        ids = counted.to(out.device)
        valid = ids >= 0
        if presence_penalty != 0.0:
            _scatter_distinct(out, ids, valid, lambda v: v - presence_penalty)
        if frequency_penalty != 0.0:
            weights = valid.to(out.dtype) * -frequency_penalty
            out.scatter_add_(1, ids.clamp(min=0), weights)
    return out


def _scatter_distinct(out: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, fn) -> None:
    """Apply ``fn`` once to each distinct valid token column of each row of ``out``, in place.

    Padding entries are pointed at a real token of the same row (duplicates write identical values),
    or, in rows with no real token, write column 0 back unchanged.
    """
    first_valid = ids.gather(1, valid.to(torch.int8).argmax(1, keepdim=True))
    any_valid = valid.any(1, keepdim=True)
    safe_ids = torch.where(valid, ids, torch.where(any_valid, first_valid, 0))
    current = out.gather(1, safe_ids)
    out.scatter_(1, safe_ids, torch.where(any_valid, fn(current), current))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature`` (> 0); 1 is a no-op.

    >>> apply_temperature(torch.tensor([[2.0, 1.0]]), 0.5)
    tensor([[4., 2.]])
    """
    return logits if temperature == 1.0 else logits / temperature


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


FILTERS = {"top_k": top_k_filter, "top_p": top_p_filter, "min_p": min_p_filter}
