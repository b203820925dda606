"""Helpers every stage shares: the row normalizer and entropy, the keep-the-best rule, and a threshold on a
key by cumulative mass that needs no full sort on large rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

NEG_INF = float("-inf")
BUCKETS = 2048
"""Histogram resolution of `mass_threshold` on large rows; only one bucket per row is then sorted."""
SORT_UP_TO = 4096
"""Rows up to this width are simply sorted by `mass_threshold`."""


def shifted_weights(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row maximum [B, 1], d = logit − maximum floored at `exp_floor`, e^d): unnormalized weights.

    The floor keeps every e^d a normal float: exp is several times slower on results that underflow
    (``-inf`` logits, or tokens ~90 nats below the top in float32). A floored token weighs
    ≤ e^-87 ≈ 1.6e-38 instead of less: below float64 rounding of any sum that includes the top (≥ 1),
    and 22 orders of magnitude below the resolution of the race's uniforms, so no draw can tell.

    >>> shifted_weights(torch.tensor([[0.0, float("-inf")]]))[2]
    tensor([[1.0000e+00, 1.6458e-38]])
    """
    top = logits.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(logits.dtype).min)
    shifted = (logits - top).clamp_(min=exp_floor(logits.dtype))
    return top, shifted, shifted.exp()


BLOCK_ELEMENTS = 1 << 20
"""Whole-row passes run on blocks of rows this large: temporaries the size of a batch would cost more in
fresh pages (page faults) than the arithmetic; a block's temporaries are recycled by the allocator."""


def by_row_blocks(fn: Callable[..., Any], *rows: torch.Tensor) -> Any:
    """``fn(*rows)`` computed on blocks of rows of `BLOCK_ELEMENTS` and concatenated along dim 0 (``fn``
    returns a tensor or a tuple of tensors).

    >>> by_row_blocks(lambda x: x.sum(-1), torch.ones(3, 2))
    tensor([2., 2., 2.])
    """
    block = max(1, BLOCK_ELEMENTS // max(1, rows[0].shape[-1]))
    if rows[0].shape[0] <= block:
        return fn(*rows)
    parts = [fn(*(r[start : start + block] for r in rows)) for start in range(0, rows[0].shape[0], block)]
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(column) for column in zip(*parts, strict=True))
    return torch.cat(parts)


def sum64(values: torch.Tensor) -> torch.Tensor:
    """Float64 sums over the last dim without a float64 copy of ``values`` (which, for a batch of rows,
    costs page faults worth many passes): float32 partial sums of 64 neighbours, then float64.

    >>> sum64(torch.ones(2, 130))
    tensor([130., 130.], dtype=torch.float64)
    """
    if values.dtype == torch.float64 or values.shape[-1] <= SORT_UP_TO:  # a small copy is cheaper
        return values.sum(-1, dtype=torch.float64)
    full = values.shape[-1] // 64 * 64
    total = values[..., :full].unflatten(-1, (-1, 64)).sum(-1).sum(-1, dtype=torch.float64)
    if full < values.shape[-1]:
        total += values[..., full:].sum(-1, dtype=torch.float64)
    return total


def exp_floor(dtype: torch.dtype) -> float:
    """The most negative d whose e^d is still a normal number of ``dtype`` (whole nats)."""
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``log Σ exp`` over the last dim; rows that are all ``-inf`` give ``-inf``.

    Same result as `torch.logsumexp` for rows without ``+inf`` (see `shifted_weights` for the floor).

    >>> logsumexp(torch.tensor([[0.0, 0.0], [float("-inf"), 1.0], [float("-inf"), float("-inf")]]))
    tensor([0.6931, 1.0000,   -inf])
    """
    top, _, weights = shifted_weights(logits)
    top = top.squeeze(-1)
    return torch.where(top > torch.finfo(logits.dtype).min, weights.sum(dim=-1).log_() + top, NEG_INF)


def entropy(logits: torch.Tensor, log_total: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy in nats of ``softmax(logits)`` per row (float64); ``log_total`` is accepted for symmetry
    with the filters and not needed (`softmax_summary` finds the normalizer in the same pass).

    >>> entropy(torch.tensor([[0.0, 0.0, float("-inf")]]))
    tensor([0.6931], dtype=torch.float64)
    """
    return softmax_summary(logits)[1]


def softmax_summary(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-normalizer, entropy in nats) of ``softmax(logits)`` per row, both float64 ``[B]``.

    One exp pass in the logits' dtype; the sums run in float64. With d = logit − max and Z = Σ e^d:
    log-normalizer = max + log Z, H = log Z − Σ e^d·d / Z (dropped tokens have e^d = 0).

    >>> softmax_summary(torch.tensor([[0.0, 0.0, float("-inf")]]))
    (tensor([0.6931], dtype=torch.float64), tensor([0.6931], dtype=torch.float64))
    """
    return by_row_blocks(lambda rows: summary_of_weights(*shifted_weights(rows)), logits)


def summary_of_weights(
    top: torch.Tensor, shifted: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax_summary` from `shifted_weights`' output (``weights`` is overwritten)."""
    total = sum64(weights)
    weighted = sum64(weights.mul_(shifted))
    log_z = total.log()
    return top.squeeze(-1).double() + log_z, log_z - weighted / total


def keep_at_least(logits: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``logits`` where ≥ ``threshold`` ([B, 1], same dtype), else ``-inf``.

    One vectorized ``threshold`` pass per row: a boolean mask and ``masked_fill`` cost many times more.

    >>> keep_at_least(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0]]))
    tensor([[-inf, 2., 3.]])
    """
    below = torch.nextafter(threshold, torch.tensor(NEG_INF, dtype=threshold.dtype)).tolist()
    rows = zip(logits, below, strict=True)
    return torch.stack([torch.nn.functional.threshold(row, cut[0], NEG_INF) for row, cut in rows])


def keep_or_most_likely(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``logits`` where ``keep``, else ``-inf``; rows where nothing is kept keep their maximum (ties too).

    >>> keep_or_most_likely(torch.tensor([[1.0, 3.0, 3.0]]), torch.tensor([[False, False, False]]))
    tensor([[-inf, 3., 3.]])
    """
    empty = ~keep.any(dim=-1, keepdim=True)
    keep = keep | (empty & (logits == logits.amax(dim=-1, keepdim=True)))
    return logits.masked_fill(~keep, NEG_INF)


def mass_threshold(keys: torch.Tensor, log_weights: torch.Tensor, mass: float) -> torch.Tensor:
    """Per row the threshold t ([B, 1], keys' dtype) with: key_i ≥ t ⇔ Σ_{j: key_j > key_i} π_j < ``mass``.

    π = softmax(``log_weights``) (float64). This is top-p with the order given by ``keys``: the token that
    crosses ``mass`` is kept and equal keys share a fate. Rows wider than `SORT_UP_TO` are not sorted: a
    histogram of the keys in `BUCKETS` equal-width buckets gives the mass above each bucket, and only the
    boundary bucket is sorted (bucket indices are monotone in the key, so ties share a bucket).

    >>> mass_threshold(torch.tensor([[3.0, 1.0, 2.0]]), torch.log(torch.tensor([[0.5, 0.2, 0.3]])), 0.6)
    tensor([[2.]])
    """
    if keys.shape[-1] <= SORT_UP_TO:
        log_probs = log_weights.double() - logsumexp(log_weights.double()).unsqueeze(-1)
        return _sorted_threshold(keys, log_probs.exp(), mass, torch.zeros_like(log_probs[:, 0]))
    # wide rows: exp in the logits' dtype (a float64 exp of a whole row costs ten float32 ones) of values
    # relative to the row maximum (each weight to an ulp), normalized in float64
    weights = shifted_weights(log_weights)[2].double()
    return _bucketed_threshold(keys, weights.div_(weights.sum(-1, keepdim=True)), mass)


def _sorted_threshold(
    keys: torch.Tensor, probs: torch.Tensor, mass: float, mass_before: torch.Tensor
) -> torch.Tensor:
    """`mass_threshold` by a sort; ``mass_before`` [B] is the mass of tokens above every column."""
    sorted_keys, order = torch.sort(keys, dim=-1, descending=True)
    sorted_probs = probs.gather(-1, order)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs + mass_before.unsqueeze(-1)
    # a tie group's first member has the smallest mass above, so ties at the boundary stay together
    last_kept = ((mass_above < mass) & (sorted_keys > NEG_INF)).sum(-1, keepdim=True).clamp(min=1) - 1
    return sorted_keys.gather(-1, last_kept)


def _bucketed_threshold(keys: torch.Tensor, probs: torch.Tensor, mass: float) -> torch.Tensor:
    batch = keys.shape[0]
    top = keys.amax(-1, keepdim=True)
    bottom = keys.nan_to_num(neginf=float("inf")).amin(-1, keepdim=True).clamp_(max=top)
    scale = (BUCKETS - 1) / (top - bottom).clamp(min=1e-30)
    # -inf keys land in an extra last bucket (index BUCKETS), which no boundary search reaches
    bucket = (top - keys).mul_(scale).clamp_(0, BUCKETS).long()
    bucket_mass = torch.zeros(batch, BUCKETS + 1, dtype=probs.dtype, device=keys.device).scatter_add_(
        1, bucket, probs
    )[:, :BUCKETS]
    above = bucket_mass.cumsum(-1) - bucket_mass
    boundary = ((above < mass).sum(-1, keepdim=True) - 1).clamp(min=0)
    rows, cols = (bucket == boundary).nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=batch)
    width = max(int(counts.max()), 1)
    slot = torch.arange(rows.numel(), device=keys.device) - (counts.cumsum(0) - counts)[rows]
    member_keys = torch.full((batch, width), NEG_INF, dtype=keys.dtype, device=keys.device)
    member_probs = torch.zeros(batch, width, dtype=probs.dtype, device=keys.device)
    member_keys[rows, slot] = keys[rows, cols]
    member_probs[rows, slot] = probs[rows, cols]
    threshold = _sorted_threshold(member_keys, member_probs, mass, above.gather(-1, boundary).squeeze(-1))
    return torch.where(counts.unsqueeze(-1) > 0, threshold, bottom)


def finite_std(logits: torch.Tensor) -> torch.Tensor:
    """Population standard deviation of each row's finite logits (float64, [B])."""
    values = logits.double()
    finite = torch.isfinite(values)
    count = finite.sum(-1).clamp(min=1)
    clean = torch.where(finite, values, 0.0)
    mean = clean.sum(-1) / count
    return (torch.where(finite, clean - mean.unsqueeze(-1), 0.0).square().sum(-1) / count).sqrt()
