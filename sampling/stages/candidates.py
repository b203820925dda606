"""The candidate search: the final logits of each row on the fewest tokens that provably hold all its mass.

Every ``upper`` filter keeps an upper set of values and temperature preserves order, so if the first filter
of the chain (after the logit modifiers) is one of them, the final kept set is a prefix of the tokens
sorted by modified logit. We take the top-M candidates (M = top_k + 1 when top-k is the first filter, else
64, growing ×8), run the chain on them, and accept a row once the first filter provably drops its smallest
candidate; the first filter reads the whole row's statistics (normalizer, entropy, σ) when it needs them.
A first filter with a value threshold (its record's ``threshold``) picks its survivors directly
(`candidates_above`).
Rows that stay undecided past a few thousand candidates run on the whole row, a few rows at a time.

Which pass decides a row depends on that row alone (the top-p skip-ahead bound only skips passes that
could not decide it), so a row's result, and its draw, do not depend on the batch it is in. These are
pure functions of their arguments; `TokenSampler` holds the config and calls them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sampling.config import SamplingConfig
from sampling.stages.chain import first_threshold, run_chain
from sampling.stages.common import NEG_INF
from sampling.stages.context import ChainContext
from sampling.stages.select import CHUNK, candidates_above, top_candidates

FIRST_CANDIDATES = 64
GROWTH = 8
MAX_CANDIDATES = 4096
"""Rows of more tokens than this that stay undecided run on the whole row (and are ``wide``)."""
DENSE_BLOCK_ELEMENTS = 1 << 20
THRESHOLD_CHUNKS = 1024
"""Rows whose first filter keeps tokens in more chunks than this take the whole-row chain instead."""


@dataclass(frozen=True)
class Candidates:
    """The sampling distribution of each row, restricted to the tokens that can have mass.

    ``logits[b, j]`` is the final (filtered, tempered) logit of token ``ids[b, j]``; ``-inf`` means
    dropped. Columns beyond a row's candidates are padding with ``-inf``. ``ids`` may be narrower than
    ``logits`` when some rows are wide: the columns past its width belong to wide rows only, whose ids
    are their column indices.
    """

    ids: torch.Tensor
    logits: torch.Tensor
    wide: torch.Tensor | None = None
    """[B] bools: rows computed on the whole (large) vocabulary, ``ids`` = arange; None = no such row."""
    narrow_width: int | None = None
    """Columns that hold every candidate of the other rows (None: all)."""

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)

    def dense(self, vocab: int) -> torch.Tensor:
        """Probabilities over the whole vocabulary, float32 ``[B, V]``."""
        probs = torch.zeros(self.ids.shape[0], vocab, device=self.ids.device)
        weights = self.log_probs().exp().float()
        if self.ids.shape[1] == weights.shape[1]:
            return probs.scatter_add_(1, self.ids, weights)
        narrow = ~self.wide
        probs[self.wide] = weights[self.wide]
        probs[narrow] = probs[narrow].scatter_add_(1, self.ids[narrow], weights[narrow, : self.ids.shape[1]])
        return probs


@dataclass(frozen=True)
class ChainInputs:
    """What the chain after the logit modifiers reads besides the logits, for the rows it runs on:
    ``history`` / ``generated`` ids (whole-row chains only), mirostat's ``mu`` and XTC's ``coin``."""

    config: SamplingConfig
    stages: tuple[str, ...]
    history: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    mu: torch.Tensor | None = None
    coin: torch.Tensor | bool = True

    def rows(self, index: torch.Tensor | slice | None) -> ChainInputs:
        """The inputs of some rows (None: all)."""
        if index is None:
            return self
        history, generated, mu, coin = (
            x[index] if isinstance(x, torch.Tensor) else x
            for x in (self.history, self.generated, self.mu, self.coin)
        )
        return ChainInputs(self.config, self.stages, history, generated, mu, coin)


def whole_row_candidates(inputs: ChainInputs, modified: torch.Tensor) -> Candidates:
    """The chain on every whole row: for chains that cannot start on candidates."""
    final = whole_row_chain(inputs, modified)
    return Candidates(_all_ids(modified), final, _wide(modified, modified.shape[0]), 0)


def whole_row_chain(
    inputs: ChainInputs, rows: torch.Tensor, which: torch.Tensor | None = None
) -> torch.Tensor:
    """The chain on whole rows (those of ``rows`` at indices ``which``, default all; ``inputs`` hold the
    rows the chain runs on), a few rows at a time: temporaries of a block stay small enough for the
    allocator to reuse (fresh pages for each 40 MB temporary cost more than the arithmetic)."""
    count = rows.shape[0] if which is None else which.numel()
    block = max(1, DENSE_BLOCK_ELEMENTS // rows.shape[1])
    finals = []
    for start in range(0, count, block):
        part = slice(start, start + block)
        some = inputs.rows(part)
        ctx = ChainContext(some.config, some.history, some.generated, mu=some.mu, xtc_active=some.coin)
        values = rows[part] if which is None else rows[which[part]]
        finals.append(run_chain(values, inputs.stages, ctx)[0])
    return finals[0] if len(finals) == 1 else torch.cat(finals)


@dataclass(frozen=True)
class _Search:
    """The fixed inputs of one candidate search."""

    inputs: ChainInputs
    modified: torch.Tensor
    stats: dict
    """Whole-row statistics, computed once for every row and shared by the passes."""
    first: str
    by_threshold: bool


@dataclass(frozen=True)
class _Pass:
    """One pass of the search over the pending rows: each row's candidate ``ids`` and ``final`` logits,
    which rows it ``decided``, the ``width`` it used, and its chain context (None for whole rows)."""

    ids: torch.Tensor
    final: torch.Tensor
    decided: torch.Tensor
    width: int
    ctx: ChainContext | None


def search_candidates(inputs: ChainInputs, modified: torch.Tensor, stats: dict | None = None) -> Candidates:
    """The final logits of ``inputs.stages`` (which `split_chain` found can start on candidates) on each
    row's candidates: passes at growing widths, each over the rows the previous ones left undecided.

    >>> inputs = ChainInputs(SamplingConfig(top_k=2), ("top_k",))
    >>> found = search_candidates(inputs, torch.tensor([[0.0, 3.0, 1.0, 2.0]]))
    >>> found.ids, found.logits
    (tensor([[1, 3, 2]]), tensor([[3., 2., -inf]]))
    """
    batch, vocab = modified.shape
    table = inputs.config.stage_table
    first = next(s for s in inputs.stages if table[s].kind != "scale")
    by_threshold = table[first].threshold is not None and vocab > MAX_CANDIDATES
    search = _Search(inputs, modified, {} if stats is None else stats, first, by_threshold)
    width = min(vocab, inputs.config.top_k + 1 if first == "top_k" else FIRST_CANDIDATES)
    rows, pending = modified, None  # pending: indices of rows still undecided (None = all rows)
    ids = final = done = None
    narrow_width = width
    while True:
        result = _run_pass(search, rows, pending, width)
        width, decided = result.width, result.decided
        if bool(decided.all()) and decided.shape[0] == batch:  # this pass decides every row of the batch
            return Candidates(result.ids, result.final, _wide(modified, batch) if width == vocab else None)
        next_width = _width_after(search, width, result.ctx, decided)
        if pending is not None and not bool(decided.any()):  # nothing to merge: try the next width
            width = next_width
            continue
        if pending is None:
            ids, final = result.ids, result.final
            pending = torch.arange(rows.shape[0], device=rows.device)
        else:
            done = pending[decided]
            ids, final = _merge(ids, final, done, result, vocab)
        narrow_width = narrow_width if width == vocab else width
        pending = pending[~decided]
        if not pending.numel():
            wide = None
            if vocab > MAX_CANDIDATES and width == vocab:
                wide = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
                wide[done] = True  # the rows this pass over the whole vocabulary decided
            return Candidates(ids, final, wide, narrow_width)
        width = next_width
        if width < vocab:
            rows = modified if pending.numel() == batch else modified[pending]


def _run_pass(search: _Search, rows: torch.Tensor, pending: torch.Tensor | None, width: int) -> _Pass:
    """The chain on ``width`` candidates of ``rows`` (the pending rows; all when ``pending`` is None), or
    on the whole rows when ``width`` is the vocabulary."""
    modified, inputs = search.modified, search.inputs.rows(pending)
    if width == modified.shape[1]:  # the whole rows, unsorted (indexed block by block, not copied at once)
        which = None if pending is None or pending.numel() == modified.shape[0] else pending
        row_final = whole_row_chain(inputs, modified, which)
        decided = torch.ones(row_final.shape[0], dtype=torch.bool, device=row_final.device)
        return _Pass(_all_ids(row_final), row_final, decided, width, None)
    config = inputs.config
    ctx = ChainContext(
        config,
        full=rows,
        sorted_desc=True,
        mu=inputs.mu,
        xtc_active=inputs.coin,
        stats=search.stats,
        rows=pending,
    )
    if search.by_threshold:  # the first filter's cut from row statistics: its survivors, in one pass
        hint = ChainContext(config, full=rows, mu=inputs.mu, stats=search.stats)
        values, cand_ids, count, fits = candidates_above(
            rows, first_threshold(inputs.stages, hint), THRESHOLD_CHUNKS
        )
        ctx.last = (count - 1).clamp_(min=0).unsqueeze(1)
        width = values.shape[1]
    else:
        values, cand_ids = top_candidates(rows, width)
    row_final, decided = run_chain(values, inputs.stages, ctx)
    if search.by_threshold:
        decided &= fits
    return _Pass(cand_ids, row_final, decided, width, ctx)


def _width_after(search: _Search, width: int, ctx: ChainContext | None, decided: torch.Tensor) -> int:
    """The width of the next pass; top-p jumps to the whole row when no undecided row's nucleus can fit."""
    vocab = search.modified.shape[1]
    next_width = next_width_after(width, vocab, search.by_threshold)
    if (
        search.first == "top_p"
        and width < next_width < vocab
        and not top_p_reachable(ctx, decided, next_width)
    ):
        return vocab
    return next_width


def _merge(
    ids: torch.Tensor, final: torch.Tensor, done: torch.Tensor, result: _Pass, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ids`` and ``final`` with the rows ``done`` (batch indices of the rows ``result`` decided) set to
    this pass's result, both widened to its width (padding: id 0, ``-inf``)."""
    width, decided = result.width, result.decided
    if ids.shape[1] > width:  # a threshold pass keeps vocab + 1 columns: the last one is padding
        ids, final = ids[:, :width], final[:, :width]
    if width < vocab or vocab <= MAX_CANDIDATES:  # wide rows' ids are their columns: no pad
        ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
    final = torch.nn.functional.pad(final, (0, width - final.shape[1]), value=NEG_INF)
    every = bool(decided.all())
    cand_ids = result.ids
    ids[done] = cand_ids[0, : ids.shape[1]] if width == vocab else cand_ids if every else cand_ids[decided]
    final[done] = result.final if every else result.final[decided]
    return ids, final


def next_width_after(width: int, vocab: int, by_threshold: bool) -> int:
    """The candidate width after ``width`` left rows undecided; a top-k over most of the row costs more
    than the whole-row chain, and a threshold pass that did not decide a row will not at any width.

    >>> next_width_after(64, 200_000, False), next_width_after(64, 40_000, False)
    (512, 40000)
    """
    width = vocab if by_threshold else width * GROWTH
    return vocab if width > MAX_CANDIDATES or width * CHUNK * 4 > vocab else width


def top_p_reachable(ctx: ChainContext, decided: torch.Tensor, next_width: int) -> bool:
    """Whether ``next_width`` candidates can hold the nucleus of some undecided row: its mass is at most
    the mass of the current candidates plus the rest at the probability of the last one. The slack makes
    "no" certain, so a row skipped to the whole-row chain could never have been decided on candidates:
    its result (and its race) stays the same whatever rows share its batch."""
    values, log_total = ctx.first_input
    probs = (values.double() - log_total.unsqueeze(1)).exp_()
    bound = probs.sum(1) + (next_width - values.shape[1]) * probs[:, -1]
    return bool((bound[~decided] * (1 + 1e-6) + 1e-9 >= ctx.config.top_p).any())


def _wide(rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    if rows.shape[1] <= MAX_CANDIDATES:
        return None
    return torch.ones(batch, dtype=torch.bool, device=rows.device)


def _all_ids(rows: torch.Tensor) -> torch.Tensor:
    return torch.arange(rows.shape[1], device=rows.device).expand_as(rows)
