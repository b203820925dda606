"""Stages that read the context: the repetition/frequency/presence penalties, DRY, no-repeat-n-gram, and the
(context-free) logit bias — the logit modifiers, which run on the whole vocabulary before any filter.

Histories are ``[B, L]`` token ids with negative entries for padding and holes; a row's sequence is its
non-negative ids in order (`compact_history`). Each function returns new logits; inputs are not modified.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from sampling.stages.common import NEG_INF
from sampling.stages.record import Param, Stage, bias_pairs, integer, number, token_ids, window

if TYPE_CHECKING:
    from sampling.stages.context import ChainContext


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


def compact_history(history: torch.Tensor, last_n: int | None = None) -> torch.Tensor:
    """Each row's real tokens (ids ≥ 0), in order and right-aligned, padded with -1 on the left; only the
    last ``last_n`` real tokens when given.

    >>> compact_history(torch.tensor([[5, -1, 6, 7], [-1, -1, 8, -1]]), last_n=2)
    tensor([[ 6,  7],
            [-1,  8]])
    """
    valid = history >= 0
    order = torch.argsort(valid.to(torch.int8), dim=1, stable=True)  # padding first, then tokens in order
    compact = history.gather(1, order)
    width = int(valid.sum(1).max()) if history.numel() else 0
    if last_n is not None:
        width = min(width, last_n)
    return compact[:, compact.shape[1] - width :]


def no_repeat_ngram_ban(logits: torch.Tensor, history: torch.Tensor | None, size: int) -> torch.Tensor:
    """Ban (``-inf``) every token that would complete an n-gram (n = ``size``) already in the row's
    sequence: token t is banned iff (last n−1 tokens, t) occurs in it (HF's no_repeat_ngram_size).

    >>> no_repeat_ngram_ban(torch.zeros(1, 4), torch.tensor([[1, 2, 3, 1]]), 2)
    tensor([[0., 0., -inf, 0.]])
    """
    if size <= 0 or history is None:
        return logits
    tokens = compact_history(history)
    length = tokens.shape[1]
    if length < size:
        return logits
    starts = length - size + 1  # n-grams starting at 0..starts-1; the last n-1 tokens start at `starts`
    match = tokens[:, size - 1 :] >= 0
    for k in range(size - 1):
        match = match & (tokens[:, k : k + starts] == tokens[:, starts + k : starts + k + 1])
    banned = torch.where(match, tokens[:, size - 1 :], logits.shape[1])
    mask = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.bool, device=logits.device)
    mask.scatter_(1, banned, True)
    return logits.masked_fill(mask[:, :-1], NEG_INF)


def dry_penalty(
    logits: torch.Tensor,
    history: torch.Tensor | None,
    multiplier: float,
    base: float,
    allowed_length: int,
    last_n: int | None = None,
    breakers: tuple[int, ...] = (),
) -> torch.Tensor:
    """DRY ("don't repeat yourself"): if the sequence's last L tokens also occur earlier followed by token
    t, t would extend a repeat of length L; when L ≥ ``allowed_length`` its logit −= multiplier ·
    base^(L − allowed_length), with L the longest such repeat for t.

    Only the last ``last_n`` real tokens are searched. A breaker token never belongs to a repeat (matches
    stop at it), and breakers themselves are never penalized. Deviations from llama.cpp: breakers are token
    ids, not strings; the exponent is not capped (``base`` ≥ 1 and L ≤ ``last_n`` keep it finite in
    practice).

    >>> dry_penalty(torch.zeros(1, 4), torch.tensor([[1, 2, 3, 1, 2]]), 1.0, 2.0, 2)
    tensor([[ 0.,  0.,  0., -1.]])
    """
    if multiplier <= 0.0 or history is None:
        return logits
    tokens = compact_history(history, last_n)
    length = tokens.shape[1]
    if length < 2:
        return logits
    usable = tokens >= 0
    if breakers:
        usable &= ~torch.isin(tokens, torch.tensor(breakers, device=tokens.device))
    # repeat[:, j] = length of the match between the suffix ending at j and the suffix ending at the end
    ends = length - 1
    active = usable[:, :ends] & (tokens[:, :ends] == tokens[:, -1:]) & usable[:, -1:]
    repeat = active.long()
    for k in range(1, ends):
        if not bool(active.any()):
            break
        earlier = torch.nn.functional.pad(tokens[:, : ends - k], (k, 0), value=-1)
        active = active & (earlier == tokens[:, ends - k : ends - k + 1]) & (earlier >= 0)
        active &= torch.nn.functional.pad(usable[:, : ends - k], (k, 0), value=False)
        repeat += active.long()
    follower = tokens[:, 1:]
    repeat = torch.where(usable[:, 1:], repeat, 0)
    longest = torch.zeros(logits.shape[0], logits.shape[1] + 1, dtype=torch.long, device=logits.device)
    longest.scatter_reduce_(1, torch.where(follower >= 0, follower, logits.shape[1]), repeat, "amax")
    longest = longest[:, :-1]
    penalty = multiplier * torch.pow(float(base), (longest - allowed_length).double())
    return torch.where(longest >= allowed_length, logits - penalty.to(logits.dtype), logits)


def add_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    """Add ``bias`` ((token id, value) pairs; −inf bans the token) to every row's logits.

    >>> add_logit_bias(torch.zeros(1, 3), ((0, float("-inf")), (2, 1.5)))
    tensor([[  -inf, 0.0000, 1.5000]])
    """
    if not bias:
        return logits
    ids = [token for token, _ in bias]
    if max(ids) >= logits.shape[1]:
        raise ValueError(f"logit_bias names token {max(ids)}, outside the vocabulary of {logits.shape[1]}")
    row = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device)
    row[ids] = torch.tensor([value for _, value in bias], dtype=logits.dtype, device=logits.device)
    return logits + row


# --- records ------------------------------------------------------------------------------------------


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


PENALTIES = Stage(
    name="penalties",
    kind="modifier",
    params=(
        Param(
            "repetition_penalty",
            float,
            1.0,
            number(lambda v: v > 0, "> 0 (1 = disabled)"),
            "θ: a context token's logit becomes logit/θ if > 0, else logit·θ (HF's rule).",
        ),
        Param(
            "repetition_window",
            int | None,
            None,
            window,
            "The repetition penalty reads the last this many real tokens (None: the whole context).",
        ),
        Param(
            "frequency_penalty",
            float,
            0.0,
            number(lambda v: True, "a finite number"),
            "Subtracted once per occurrence of the token in the generated tokens (OpenAI).",
        ),
        Param(
            "presence_penalty",
            float,
            0.0,
            number(lambda v: True, "a finite number"),
            "Subtracted once from every token present in the generated tokens (OpenAI).",
        ),
    ),
    enabled=lambda c: c.repetition_penalty != 1.0 or c.frequency_penalty != 0.0 or c.presence_penalty != 0.0,
    apply=_penalties,
    doc=apply_penalties.__doc__.split("\n")[0],
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


DRY = Stage(
    name="dry",
    kind="modifier",
    params=(
        Param(
            "dry_multiplier",
            float,
            0.0,
            number(lambda v: v >= 0, ">= 0 (0 = disabled)"),
            "Scale of the DRY penalty.",
        ),
        Param(
            "dry_base",
            float,
            1.75,
            number(lambda v: v >= 1, ">= 1"),
            "Growth of the DRY penalty per token of repeat beyond the allowed length.",
        ),
        Param(
            "dry_allowed_length",
            int,
            2,
            integer(lambda v: v >= 1, "an integer >= 1"),
            "Repeats up to this long are not penalized.",
        ),
        Param(
            "dry_penalty_last_n",
            int | None,
            None,
            window,
            "DRY searches the last this many real tokens (None: the whole context).",
        ),
        Param(
            "dry_sequence_breakers",
            tuple[int, ...],
            (),
            token_ids,
            "Token ids a repeat never crosses (llama.cpp uses strings).",
            schema_type=list[int] | None,
        ),
    ),
    enabled=lambda c: c.dry_multiplier > 0.0,
    apply=_dry,
    doc="DRY: penalize the token that would extend a repeat of the context's last tokens.",
)

NO_REPEAT_NGRAM = Stage(
    name="no_repeat_ngram",
    kind="modifier",
    params=(
        Param(
            "no_repeat_ngram_size",
            int,
            0,
            integer(lambda v: v >= 0, "an integer >= 0 (0 = disabled)"),
            "Ban every token that would repeat an n-gram of this size (HF).",
        ),
    ),
    enabled=lambda c: c.no_repeat_ngram_size > 0,
    apply=lambda v, ctx: no_repeat_ngram_ban(v, ctx.history, ctx.config.no_repeat_ngram_size),
    doc="Ban (-inf) every token that would complete an n-gram already in the row's sequence.",
)

LOGIT_BIAS = Stage(
    name="logit_bias",
    kind="modifier",
    params=(
        Param(
            "logit_bias",
            tuple[tuple[int, float], ...],
            (),
            bias_pairs,
            "{token_id: bias} added to the logits; -inf bans the token.",
            schema_type=Any,
        ),
    ),
    enabled=lambda c: bool(c.logit_bias),
    apply=lambda v, ctx: add_logit_bias(v, ctx.config.logit_bias),
    doc=add_logit_bias.__doc__.split("\n")[0],
)

RECORDS = (PENALTIES, DRY, NO_REPEAT_NGRAM, LOGIT_BIAS)
"""This module's stages, in `STAGE_NAMES` order."""
