"""Stages that read the context: DRY, no-repeat-n-gram, and the (context-free) logit bias.

Histories are ``[B, L]`` token ids with negative entries for padding and holes; a row's sequence is its
non-negative ids in order (`compact_history`). Each function returns new logits; inputs are not modified.
"""

from __future__ import annotations

import torch

from sampling.stages.common import NEG_INF


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
