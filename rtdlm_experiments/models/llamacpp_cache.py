"""The llama.cpp engine's KV cache handle: one llama.cpp sequence per batch row, the cells held by llama.cpp.

The decoders see a cache as columns (`sampling.decoding.slots`, `sampling.decoding.draft_verify`): a
rectangular ``[rows, columns]`` grid where the attention mask says which columns of a row are real tokens
(left padding, holes left by rejected drafts and columns left behind by other rows are not). llama.cpp
keeps only the real tokens, per sequence, at positions 0, 1, 2, ... (holes and padding do not advance a
position, exactly as the torch engine derives position ids from the mask). ``real`` mirrors the grid:
which columns of each row llama.cpp holds.

A column that a later mask marks as not real any more (a rejected draft that became a hole) is removed
from its sequence before the next forward (`LlamaCppCache.reconcile`). Such columns are always the row's
last real ones (rollback happens at the end), so removal is a crop of the sequence's tail and positions
stay contiguous; anything else raises instead of silently attending to a token the decoder dropped.

Row edits (`select_rows`, `append_rows`, `drop_leading_columns`) are the hooks `sampling.decoding.kv_rows`
calls for refill batching: they move sequence ids, never KV data.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch


class SequencePool:
    """The free sequence ids of one llama.cpp context (lowest first, so rows in flight keep consecutive
    ids, which llama.cpp batches into one micro-batch), shared by every cache of the model."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size))
        self._lock = threading.Lock()

    def take(self, count: int) -> list[int]:
        with self._lock:
            if count > len(self._free):
                raise RuntimeError(
                    f"the llama.cpp context serves at most {self.size} sequences at once and "
                    f"{self.size - len(self._free)} are in use; {count} more were asked for "
                    f"(raise model.n_seq_max, or lower batch_size)"
                )
            self._free.sort()
            taken, self._free = self._free[:count], self._free[count:]
            return taken

    def give_back(self, ids: list[int]) -> None:
        with self._lock:
            self._free += ids


class LlamaCppCache:
    """One batch's rows on a llama.cpp context: ``seq_ids`` [B] (one sequence per row, allocated by the
    first forward), ``real`` [B, columns] bool, ``held`` [B] the tokens llama.cpp holds per row (its next
    position). ``remove(seq_id, start)`` drops a sequence's tokens at positions >= ``start`` (all: 0)."""

    def __init__(self, pool: SequencePool, remove: Callable[[int, int], None]) -> None:
        self._pool = pool
        self._remove = remove
        self.seq_ids: list[int] = []
        self.real = torch.zeros(0, 0, dtype=torch.bool)
        self.held = torch.zeros(0, dtype=torch.long)

    # -- what the model's forward needs ---------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.real.shape[1]

    def ensure_rows(self, rows: int) -> None:
        """A fresh cache takes ``rows`` sequence ids at its first forward; later forwards must match."""
        if not self.seq_ids and self.width == 0:
            self.seq_ids = self._pool.take(rows)
            self.real = torch.zeros(rows, 0, dtype=torch.bool)
            self.held = torch.zeros(rows, dtype=torch.long)
        elif rows != len(self.seq_ids):
            raise ValueError(f"the cache holds {len(self.seq_ids)} rows, the input has {rows}")

    def reconcile(self, past_mask: torch.Tensor) -> None:
        """Make llama.cpp hold exactly the columns ``past_mask`` [B, width] marks real: drop the tail
        tokens that became holes. Raises if the mask claims a token never fed, or drops one mid-row."""
        if past_mask.shape != self.real.shape:
            raise ValueError(
                f"attention mask covers {past_mask.shape[1]} cached columns, the cache has {self.width}"
            )
        wanted = past_mask.bool()
        if bool((wanted & ~self.real).any()):
            raise ValueError("the attention mask marks columns real that this cache never received")
        stale = self.real & ~wanted
        if not bool(stale.any()):
            return
        for row in torch.nonzero(stale.any(dim=1)).flatten().tolist():
            kept = int(wanted[row].sum())
            last_kept = int(torch.nonzero(wanted[row]).max()) if kept else -1
            if bool(stale[row, : last_kept + 1].any()):
                raise ValueError("a cached token was dropped before the row's last one: llama.cpp positions "
                                 "are contiguous, only a row's tail can be rolled back")  # fmt: skip
            self._remove(self.seq_ids[row], kept)
            self.held[row] = kept
        self.real = wanted.clone()

    def extend(self, new_mask: torch.Tensor) -> None:
        """Record that the columns of ``new_mask`` [B, T] marked 1 were fed (at the rows' next positions)."""
        self.real = torch.cat([self.real, new_mask.bool()], dim=1)
        self.held = self.held + new_mask.long().sum(dim=1)

    def crop(self, length: int) -> None:
        """Keep columns ``[0, length)``: every row's tokens in later columns leave llama.cpp."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        if length >= self.width:
            return
        for row, kept in enumerate(self.real[:, :length].sum(dim=1).tolist()):
            if kept < int(self.held[row]):
                self._remove(self.seq_ids[row], kept)
                self.held[row] = kept
        self.real = self.real[:, :length]

    # -- row edits for refill batching (the `sampling.decoding.kv_rows` hooks) ------------------------

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only rows ``rows`` (in that order); the others' sequences are freed."""
        keep = rows.tolist()
        gone = [seq for index, seq in enumerate(self.seq_ids) if index not in set(keep)]
        self._free(gone)
        self.seq_ids = [self.seq_ids[index] for index in keep]
        self.real = self.real[rows.cpu()]
        self.held = self.held[rows.cpu()]

    def drop_leading_columns(self, count: int) -> None:
        """Forget the first ``count`` columns, which must hold no token of any row (padding only)."""
        if count <= 0:
            return
        if bool(self.real[:, :count].any()):
            raise ValueError("cannot drop leading columns that hold tokens: llama.cpp positions would shift")
        self.real = self.real[:, count:]

    def append_rows(self, other: LlamaCppCache) -> None:
        """Take over ``other``'s rows (and their sequences), right-aligned with this cache's columns."""
        if other._pool is not self._pool:
            raise ValueError("cannot join caches of two different llama.cpp contexts")
        width = max(self.width, other.width)
        self.real = torch.cat([_pad_left(self.real, width), _pad_left(other.real, width)])
        self.held = torch.cat([self.held, other.held])
        self.seq_ids += other.seq_ids
        other.seq_ids, other.real, other.held = [], other.real[:0], other.held[:0]

    # -- lifetime -----------------------------------------------------------------------------------

    def release(self) -> None:
        """Free every row's sequence (also done when the cache is garbage-collected)."""
        self._free(self.seq_ids)
        self.seq_ids = []
        self.real = self.real[:0]
        self.held = self.held[:0]

    def _free(self, seq_ids: list[int]) -> None:
        for seq in seq_ids:
            self._remove(seq, 0)
        if seq_ids:
            self._pool.give_back(list(seq_ids))

    def __del__(self) -> None:
        # No tensor work here: at interpreter exit torch may be half torn down.
        if sys.is_finalizing():
            return
        try:
            self._free(self.seq_ids)
            self.seq_ids = []
        except Exception:  # the model may be gone already
            pass


def _pad_left(real: torch.Tensor, width: int) -> torch.Tensor:
    """``real`` [B, W] padded on the left with False columns to ``width``.

    >>> _pad_left(torch.tensor([[True]]), 3).tolist()
    [[False, False, True]]
    """
    return torch.nn.functional.pad(real, (width - real.shape[1], 0), value=False)
