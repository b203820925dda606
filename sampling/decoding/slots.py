"""The rows in flight of a refill-batched autoregressive call, and how rows join and leave them.

A `SlotBatch` holds up to ``max_batch_size`` rows in one KV cache. ``tokens`` mirrors the cache column
by column (-1 where a row has nothing: left padding, or columns left behind by rows that have gone), so
the attention mask is ``tokens >= 0`` and every row's real tokens are contiguous and end in the last
column. Position ids come from the mask (the model's ``cumsum(mask) - 1``), so a row gets the same
positions, and the same logits, whatever else is in the batch.

Refill, step by step:
- *join*: newcomers are prefilled together in a cache of their own (left-padded), then appended as new
  rows; the narrower of the two caches is padded on the left with masked zero columns (`kv_rows`).
- *leave*: a finished row is removed from the cache (its batch row is dropped, so no forward is spent on
  it). Columns that are now masked for every remaining row — at most the left end, since real tokens
  are right-aligned — are cut off. So the cache is never wider than the longest prompt + generated
  tokens of the rows in flight (≤ longest prompt + max_new_tokens) and never holds more rows than
  ``max_batch_size``: it does not grow with the number of rows the call has served.

Editing needs the layered cache layout of `kv_rows`. With any other cache the batch is *static*: a
finished row keeps its slot (fed its last token, results ignored) and newcomers wait until every row
of the batch has finished, then start a fresh cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

from sampling.decoding import kv_rows
from sampling.decoding.base import CausalLM, left_pad
from sampling.sampler import SamplerState

PAD = -1


@dataclass
class SlotBatch:
    """Rows in flight. Per slot: ``rows`` the input row it serves, ``generated`` [S] how many tokens that
    row has drawn (its sampler step), ``state`` its sampler state (mirostat's μ), ``live`` False once it
    finished but still holds its slot (static batches only). ``tokens`` [S, W] mirrors ``cache``;
    ``editable`` whether rows can join and leave."""

    rows: list[int]
    tokens: torch.Tensor
    generated: torch.Tensor
    state: SamplerState
    live: list[bool]
    cache: Any
    editable: bool

    @property
    def attention_mask(self) -> torch.Tensor:
        return (self.tokens >= 0).long()

    @property
    def row_index(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.long, device=self.tokens.device)

    def generated_part(self) -> torch.Tensor:
        """``tokens`` with everything but each row's generated tokens (its last ``generated``) masked."""
        width = self.tokens.shape[1]
        columns = torch.arange(width, device=self.tokens.device)
        mine = columns >= width - self.generated.unsqueeze(1)
        return torch.where(mine, self.tokens, PAD)

    def has_room(self, max_batch_size: int) -> int:
        """How many newcomers may join now: free slots, or none while a static batch still runs."""
        if not self.editable:
            return 0
        return max_batch_size - len(self.rows)

    def join(self, newcomers: SlotBatch) -> None:
        """Append ``newcomers``' rows (their cache too), right-aligned with the rows in flight."""
        kv_rows.append_rows(self.cache, newcomers.cache)
        self.tokens = _cat_right_aligned(self.tokens, newcomers.tokens)
        self.generated = torch.cat([self.generated, newcomers.generated])
        self.state = _cat_states(self.state, newcomers.state)
        self.rows += newcomers.rows
        self.live += newcomers.live

    def leave(self, ended: Sequence[bool]) -> torch.Tensor | None:
        """Retire the slots whose row ``ended``; returns the index of the slots kept (None: all kept).

        Editable: the ended rows leave the cache and the all-masked leading columns are cut. Static: the
        ended rows are only marked dead; they keep their slot until the whole batch is done.
        """
        if not self.editable:
            self.live = [live and not end for live, end in zip(self.live, ended, strict=True)]
            return None
        kept = [slot for slot, end in enumerate(ended) if not end]
        if len(kept) == len(ended):
            return None
        index = torch.tensor(kept, dtype=torch.long, device=self.tokens.device)
        kv_rows.select_rows(self.cache, index)
        self.tokens = self.tokens[index]
        self.generated = self.generated[index]
        self.state = self.state.select(index)
        self.rows = [self.rows[slot] for slot in kept]
        self.live = [self.live[slot] for slot in kept]
        self._trim()
        return index

    def _trim(self) -> None:
        """Cut the leading columns no row in flight attends to."""
        used = (self.tokens >= 0).any(dim=0)
        if not bool(used.any()):
            return
        first = int(used.long().argmax())
        if first:
            kv_rows.drop_leading_columns(self.cache, first)
            self.tokens = self.tokens[:, first:]

    def advance(self, model: CausalLM, next_tokens: torch.Tensor) -> torch.Tensor:
        """Feed each slot its drawn token; returns the logits [S, V] of the next one."""
        self.tokens = torch.cat([self.tokens, next_tokens.unsqueeze(1)], dim=1)
        self.generated = self.generated + 1
        inputs = next_tokens.clamp(min=0).unsqueeze(1)
        return model.forward(inputs, self.cache, self.attention_mask, last_positions=1)[:, -1]

    @property
    def done(self) -> bool:
        return not any(self.live)


def prefill_slots(
    model: CausalLM, prompts: Sequence[Sequence[int]], rows: list[int], state: SamplerState
) -> tuple[SlotBatch, torch.Tensor]:
    """Newcomers' prompts through the model in one left-padded batch: their slots (starting from sampler
    ``state``, one entry per newcomer) and first-token logits."""
    tokens, mask = left_pad(prompts, PAD, model.device)
    cache = model.new_cache()
    logits = model.forward(tokens.clamp(min=0), cache, mask, last_positions=1)[:, -1]
    slots = SlotBatch(
        rows=list(rows),
        tokens=tokens,
        generated=torch.zeros(len(rows), dtype=torch.long, device=tokens.device),
        state=state,
        live=[True] * len(rows),
        cache=cache,
        editable=kv_rows.row_editable(cache),
    )
    return slots, logits


def _cat_states(first: SamplerState, second: SamplerState) -> SamplerState:
    """The per-row states of two slot batches, stacked (every per-row tensor field; None stays None).

    >>> joined = _cat_states(SamplerState(torch.tensor([1.0])), SamplerState(torch.tensor([2.0, 3.0])))
    >>> joined.mu.tolist(), _cat_states(SamplerState(), SamplerState()).mu
    ([1.0, 2.0, 3.0], None)
    """
    stacked = {}
    for item in fields(first):
        mine, theirs = getattr(first, item.name), getattr(second, item.name)
        stacked[item.name] = None if mine is None else torch.cat([mine, theirs.to(mine.device)])
    return replace(first, **stacked)


def _cat_right_aligned(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Token rows ``[B1, W1]`` and ``[B2, W2]`` stacked, each padded on the left with ``PAD`` to max width.

    >>> _cat_right_aligned(torch.tensor([[1, 2, 3]]), torch.tensor([[4]])).tolist()
    [[1, 2, 3], [-1, -1, 4]]
    """
    width = max(first.shape[1], second.shape[1])
    return torch.cat([_pad_left(first, width), _pad_left(second, width)])


def _pad_left(tokens: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(tokens, (width - tokens.shape[1], 0), value=PAD)
