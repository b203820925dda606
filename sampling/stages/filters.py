"""Value filters beyond top-k/top-p/min-p: typical, ε, η, top-nσ, XTC and mirostat v2's surprise cut.

Each takes logits ``[B, N]`` (the distribution the stage receives; ``-inf`` = already dropped) and returns
new logits with dropped tokens at ``-inf``. Statistics of the whole row (``log_total``, ``entropy``,
``sigma``) can be passed in when ``logits`` hold only a candidate subset of it. A filter that would drop
every token keeps the most likely one(s) instead.
"""

from __future__ import annotations

import math

import torch

from sampling.stages.common import (
    NEG_INF,
    SORT_UP_TO,
    entropy,
    keep_at_least,
    keep_or_most_likely,
    logsumexp,
    mass_threshold,
    softmax_summary,
)


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


def finite_std(logits: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row's finite logits (float64, [B])."""
    values = logits.double()
    finite = torch.isfinite(values)
    count = finite.sum(-1).clamp(min=1)
    clean = torch.where(finite, values, 0.0)
    mean = clean.sum(-1) / count
    return (torch.where(finite, clean - mean.unsqueeze(-1), 0.0).square().sum(-1) / count).sqrt()


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
