"""Picking tokens from a row without sorting it: the top candidates, the argmax, and a two-level race."""

from __future__ import annotations

import torch

from sampling import noise
from sampling.stages.common import NEG_INF, shifted_weights

CHUNK = 64
CHUNK_STREAM = 8
"""Noise stream of `chunked_race`'s first level (the decoders use 1-3, XTC 7)."""


def top_candidates(logits: torch.Tensor, width: int, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(logits, width)`` (values sorted descending, ids) without a top-k over the vocabulary.

    The row is cut into chunks of ``chunk`` tokens; only the ``width`` chunks with the largest maxima
    can hold the top ``width`` tokens (each of them holds a token at least as large as the
    ``width``-th chunk maximum, and every other chunk lies wholly below it). One ``amax`` pass plus a
    top-k over a few thousand gathered values replaces a top-k over the whole row.
    """
    batch, vocab = logits.shape
    num_chunks = vocab // chunk
    if width * chunk * 4 > vocab:
        return torch.topk(logits, width, dim=1)
    chunked = logits[:, : num_chunks * chunk].view(batch, num_chunks, chunk)
    best_chunks = torch.topk(chunked.amax(dim=2), width, dim=1).indices
    gathered = chunked.gather(1, best_chunks.unsqueeze(2).expand(-1, -1, chunk)).reshape(batch, -1)
    offsets = torch.arange(chunk, device=logits.device)
    ids = (best_chunks.unsqueeze(2) * chunk + offsets).reshape(batch, -1)
    if vocab > num_chunks * chunk:  # the ragged tail is always a candidate
        gathered = torch.cat([gathered, logits[:, num_chunks * chunk :]], dim=1)
        tail_ids = torch.arange(num_chunks * chunk, vocab, device=logits.device).expand(batch, -1)
        ids = torch.cat([ids, tail_ids], dim=1)
    values, positions = torch.topk(gathered, width, dim=1)
    return values, ids.gather(1, positions)


def greedy(penalized: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Argmax with ties to the lowest token id.

    torch's argmax is a slow scalar loop on CPU while ``amax`` is vectorized, so we take chunk maxima,
    pick the first chunk holding the row maximum, and search only inside it.
    """
    batch, vocab = penalized.shape
    num_chunks = vocab // chunk
    if num_chunks < 2:
        return torch.argmax(penalized, dim=1)
    chunked = penalized[:, : num_chunks * chunk].view(batch, num_chunks, chunk)
    chunk_max = chunked.amax(dim=2)
    if vocab > num_chunks * chunk:  # ragged tail as one more chunk
        chunk_max = torch.cat(
            [chunk_max, penalized[:, num_chunks * chunk :].amax(dim=1, keepdim=True)], dim=1
        )
    best = chunk_max.amax(dim=1, keepdim=True)
    first_chunk = (chunk_max == best).to(torch.uint8).argmax(dim=1)
    starts = first_chunk * chunk
    window = penalized.gather(
        1, (starts.unsqueeze(1) + torch.arange(chunk, device=penalized.device)).clamp(max=vocab - 1)
    )
    return starts + (window == best).to(torch.uint8).argmax(dim=1)


def chunked_race(
    logits: torch.Tensor,
    keys: torch.Tensor,
    chunk_keys: torch.Tensor,
    chunk: int = CHUNK,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """A token per row with probability softmax(logits): a race among chunks of ``chunk`` consecutive ids
    weighted by their mass (noise keyed by chunk index), then a race inside the winning chunk (keyed by
    token id). P(i) = P(chunk of i)·P(i | chunk) = π_i; one exp pass instead of hashing every token."""
    batch, vocab = logits.shape
    full = vocab // chunk
    if weights is None:  # floored (`shifted_weights`): an all-dropped chunk is masked out below
        weights = shifted_weights(logits)[2]
    masses = weights[:, : full * chunk].view(batch, full, chunk).sum(-1).double()  # float32 is exact to 1e-7
    chunk_max = logits[:, : full * chunk].view(batch, full, chunk).amax(-1)
    if vocab > full * chunk:
        masses = torch.cat([masses, weights[:, full * chunk :].sum(-1, keepdim=True, dtype=torch.float64)], 1)
        chunk_max = torch.cat([chunk_max, logits[:, full * chunk :].amax(-1, keepdim=True)], 1)
    log_masses = masses.log_().masked_fill_(chunk_max == NEG_INF, NEG_INF)
    starts = noise.race_argmax(log_masses, chunk_keys) * chunk
    columns = starts.unsqueeze(1) + torch.arange(chunk, device=logits.device)
    inside = columns < vocab
    columns = columns.clamp(max=vocab - 1)
    window = logits.gather(1, columns).masked_fill(~inside, NEG_INF)
    return columns.gather(1, noise.race_argmax(window, keys, columns).unsqueeze(1)).squeeze(1)


def candidates_above(
    logits: torch.Tensor, threshold: torch.Tensor, max_chunks: int | None = None, chunk: int = CHUNK
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's tokens with logit ≥ ``threshold`` ([B]) and the largest logit below it (with its ties),
    sorted descending: (values [B, W], ids [B, W], count [B], fits [B]); columns past a row's count are
    padding (``-inf``, id 0). When nothing finite lies below the threshold, the count includes one padding
    column, which stands for the (dropped) rest of the row. Rows with more than ``max_chunks`` chunks
    reaching the threshold do not fit: they get their maximum only and ``fits`` False.

    Only the chunks whose maximum reaches the threshold, and the best one below it, can hold those
    tokens: one ``amax`` pass and a top-k over those chunks replace a top-k over the row.

    >>> candidates_above(torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0]]), torch.tensor([2.5]), chunk=2)
    (tensor([[3., 2., -inf]]), tensor([[1, 3, 0]]), tensor([2]), tensor([True]))
    """
    batch, vocab = logits.shape
    ragged = -vocab % chunk
    padded = torch.nn.functional.pad(logits, (0, ragged), value=NEG_INF) if ragged else logits
    chunked = padded.view(batch, -1, chunk)
    chunk_max = chunked.amax(dim=2)
    threshold = threshold.view(-1, 1)
    reaching = (chunk_max >= threshold).sum(1)
    fits = torch.ones_like(reaching, dtype=torch.bool) if max_chunks is None else reaching <= max_chunks
    if not bool(fits.all()):
        threshold = torch.where(fits.view(-1, 1), threshold, float("inf"))
        reaching = (chunk_max >= threshold).sum(1)
    num_chunks = min(int(reaching.max()) + 1, chunk_max.shape[1])
    best = torch.topk(chunk_max, num_chunks, dim=1).indices
    gathered = chunked.gather(1, best.unsqueeze(2).expand(-1, -1, chunk)).reshape(batch, -1)
    reached = gathered >= threshold
    # the largest value below the threshold, with arithmetic instead of a (slow) masked fill
    below = (gathered - reached.to(gathered.dtype) * _PUSH_DOWN).amax(1, keepdim=True)
    low = torch.where(below > _PUSH_DOWN / -2, torch.minimum(below, threshold), threshold)
    values, columns = _compact(gathered, gathered >= low)
    order = torch.sort(values, dim=1, descending=True)
    columns = columns.gather(1, order.indices)
    ids = best.gather(1, columns // chunk) * chunk + columns % chunk
    # no finite value below the threshold: a -inf padding column stands for the dropped rest
    count = (order.values > NEG_INF).sum(1) + (below <= _PUSH_DOWN / -2).view(-1)
    return order.values, ids.clamp_(max=vocab - 1), count, fits


_PUSH_DOWN = 3e38
"""Subtracted from values to exclude them from a maximum: any logit minus it is ≈ −3e38, below every
finite logit a model produces."""


def _compact(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept entries moved to the front, and their columns ([B, max kept + 1]; padding
    ``-inf`` at column 0)."""
    rows, cols = keep.nonzero(as_tuple=True)
    counts = torch.bincount(rows, minlength=values.shape[0])
    slot = torch.arange(rows.numel(), device=values.device) - (counts.cumsum(0) - counts)[rows]
    width = int(counts.max()) + 1
    packed = torch.full((values.shape[0], width), NEG_INF, dtype=values.dtype, device=values.device)
    columns = torch.zeros(values.shape[0], width, dtype=torch.long, device=values.device)
    packed[rows, slot] = values[rows, cols]
    columns[rows, slot] = cols
    return packed, columns
