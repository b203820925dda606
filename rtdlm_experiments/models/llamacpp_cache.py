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

import itertools
import threading
import weakref
from collections.abc import Callable

import torch


class SequencePool:
    """The sequence ids of one llama.cpp context, shared by every cache of the model: free ids are handed
    out lowest first (rows in flight keep consecutive ids, which llama.cpp batches into one micro-batch).

    Ownership never leaks: a cache frees its ids when released, closed (``with``) or garbage-collected,
    and when the pool runs short it reclaims the ids of the least recently used other caches (a finished
    batch still referenced by a loop variable, or by the traceback of a call that failed). A reclaimed
    cache raises if it is used again, so nothing ever reads another row's cells.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._free = list(range(size))
        self._lock = threading.RLock()
        self._holders: dict[int, weakref.ref[LlamaCppCache]] = {}
        self._clock = itertools.count()

    def take(self, count: int, owner: LlamaCppCache | None = None) -> list[int]:
        with self._lock:
            if count > self.size:
                raise RuntimeError(
                    f"the llama.cpp context serves at most {self.size} sequences at once and a batch of "
                    f"{count} rows was asked for (raise model.n_seq_max, or lower batch_size)"
                )
            self._reclaim(count, owner)
            self._free.sort()
            taken, self._free = self._free[:count], self._free[count:]
            if owner is not None:
                self._holders[id(owner)] = weakref.ref(owner)
            return taken

    def _reclaim(self, count: int, owner: LlamaCppCache | None) -> None:
        """Free the least recently used other caches' ids until ``count`` are free."""
        if count <= len(self._free):
            return
        self._holders = {key: ref for key, ref in self._holders.items() if ref() is not None}
        holders = [ref() for ref in self._holders.values()]
        others = [h for h in holders if h is not None and h is not owner and h.seq_ids]
        for holder in sorted(others, key=lambda h: h.last_used):
            holder.evict(f"its sequences were reclaimed for a newer batch (n_seq_max={self.size})")
            if count <= len(self._free):
                return
        raise RuntimeError(
            f"the llama.cpp context serves at most {self.size} sequences at once and "
            f"{self.size - len(self._free)} are in use by this batch; {count} more were asked for "
            f"(raise model.n_seq_max, or lower batch_size)"
        )

    def touch(self) -> int:
        """A stamp that orders uses of this pool's caches (least recently used first)."""
        return next(self._clock)

    def give_back(self, ids: list[int], owner: LlamaCppCache | None = None) -> None:
        with self._lock:
            self._free += ids
            if owner is not None and not owner.seq_ids:
                self._holders.pop(id(owner), None)


def _free_sequences(pool: SequencePool, remove: Callable[[int, int], None], seq_ids: list[int]) -> None:
    """A cache's finalizer: give its sequences back (it holds no reference to the cache itself)."""
    ids, seq_ids[:] = list(seq_ids), []
    for seq in ids:
        remove(seq, 0)
    if ids:
        pool.give_back(ids)


class LlamaCppCache:
    """One batch's rows on a llama.cpp context: ``seq_ids`` [B] (one sequence per row, allocated by the
    first forward), ``real`` [B, columns] bool, ``held`` [B] the tokens llama.cpp holds per row (its next
    position). ``remove(seq_id, start)`` drops a sequence's tokens at positions >= ``start`` (all: 0)."""

    def __init__(self, pool: SequencePool, remove: Callable[[int, int], None]) -> None:
        self._pool = pool
        self._remove = remove
        self.seq_ids: list[int] = []  # edited in place: the finalizer frees what it holds at collection
        self.real = torch.zeros(0, 0, dtype=torch.bool)
        self.held = torch.zeros(0, dtype=torch.long)
        self.last_used = pool.touch()
        self.evicted: str | None = None
        self._finalizer = weakref.finalize(self, _free_sequences, pool, remove, self.seq_ids)
        self._finalizer.atexit = False  # at interpreter exit the context goes anyway

    # -- what the model's forward needs ---------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.real.shape[1]

    def ensure_rows(self, rows: int) -> None:
        """A fresh cache takes ``rows`` sequence ids at its first forward; later forwards must match."""
        self._check_alive()
        self.last_used = self._pool.touch()
        if not self.seq_ids and self.width == 0:
            self.seq_ids[:] = self._pool.take(rows, owner=self)
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
        self._check_alive()
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
        self._check_alive()
        keep = rows.tolist()
        gone = [seq for index, seq in enumerate(self.seq_ids) if index not in set(keep)]
        self.seq_ids[:] = [self.seq_ids[index] for index in keep]
        self._free(gone)
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
        self._check_alive()
        other._check_alive()
        width = max(self.width, other.width)
        self.real = torch.cat([_pad_left(self.real, width), _pad_left(other.real, width)])
        self.held = torch.cat([self.held, other.held])
        self.seq_ids += other.seq_ids
        other.seq_ids[:] = []
        other.real, other.held = other.real[:0], other.held[:0]
        self.last_used = self._pool.touch()

    # -- lifetime -----------------------------------------------------------------------------------

    def release(self) -> None:
        """Free every row's sequence now (also done on leaving ``with``, and at garbage collection)."""
        self._free(list(self.seq_ids))
        self.seq_ids[:] = []
        self.real = self.real[:0]
        self.held = self.held[:0]

    def evict(self, reason: str) -> None:
        """Free this cache's sequences for another batch; any later use raises with ``reason``."""
        self.release()
        self.evicted = reason

    def _check_alive(self) -> None:
        if self.evicted is not None:
            raise RuntimeError(f"this llama.cpp cache cannot be used any more: {self.evicted}")

    def _free(self, seq_ids: list[int]) -> None:
        for seq in seq_ids:
            self._remove(seq, 0)
        if seq_ids:
            self._pool.give_back(list(seq_ids), owner=self)

    def __enter__(self) -> LlamaCppCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _pad_left(real: torch.Tensor, width: int) -> torch.Tensor:
    """``real`` [B, W] padded on the left with False columns to ``width``.

    >>> _pad_left(torch.tensor([[True]]), 3).tolist()
    [[False, False, True]]
    """
    return torch.nn.functional.pad(real, (width - real.shape[1], 0), value=False)
