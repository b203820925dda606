"""`TokenSampler`: logits → exact sampling distribution → one token per row, fast.

The fast path never sorts the vocabulary. Every stage keeps an *upper set* of values (a threshold),
and temperature preserves order, so the final kept set is always a prefix of the tokens sorted by
penalized logit. We therefore take the top-M candidates (M = top_k + 1 when top-k is the first filter,
else 64, growing ×8 up to the whole vocabulary), run the stages on the candidates alone, and accept the
result for a row once the first filter provably drops the smallest candidate: every token outside the
candidates is then dropped too, and everything the later stages compute depends on candidates only.
The first filter sees the full vocabulary's log-normalizer (one ``logsumexp`` pass) when it needs it.

Sampling is an exponential race over the candidates with counter-based noise keyed by (row seed,
step, token id), so a row's draw is reproducible and independent of the batch it is in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sampling import noise
from sampling.config import SamplingConfig
from sampling.processors import (
    FILTERS,
    NEG_INF,
    apply_penalties,
    logsumexp,
    min_p_filter,
    top_k_filter,
    top_p_filter,
)

_FIRST_CANDIDATES = 64
_GROWTH = 16
_CHUNK = 64


@dataclass(frozen=True)
class SampleOutput:
    """One draw per row; every field is ``[B]``."""

    tokens: torch.Tensor
    """Chosen token ids (long)."""
    logprobs: torch.Tensor
    """Log-probability of the token under the sampling distribution (0 for greedy)."""
    model_logprobs: torch.Tensor
    """Log-softmax of the raw (unpenalized, untempered) logits at the token: for perplexity."""
    entropy: torch.Tensor
    """Entropy of the sampling distribution, in nats (0 for greedy)."""
    num_kept: torch.Tensor
    """Number of tokens with non-zero probability (1 for greedy)."""


@dataclass(frozen=True)
class Candidates:
    """The sampling distribution of each row, restricted to the tokens that can have mass.

    ``logits[b, j]`` is the final (filtered, tempered) logit of token ``ids[b, j]``; ``-inf`` means
    dropped. Columns beyond a row's candidates are padding with ``-inf``.
    """

    ids: torch.Tensor
    logits: torch.Tensor

    def log_probs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits, dim=-1)


class TokenSampler:
    """Applies a `SamplingConfig` to batched logits.

    Seeding: the draw of row b at a call is a pure function of its logits, its row seed and its step.
    Row seeds come from ``row_seeds`` (``[B]``), else ``config.seed`` for every row, else fresh random
    seeds (from ``generator`` if given). The step is the ``step`` argument (int or ``[B]``), else the
    sampler's own counter, which counts ``sample()`` calls: a decoder that calls ``sample()`` once per
    generated position gets step = position, whatever the batch.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.calls = 0

    def distribution(
        self, logits: torch.Tensor, history: torch.Tensor | None = None, generated: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The exact distribution ``sample()`` draws from: float32 ``[B, V]``."""
        raw = _last_position(logits)
        penalized = self._penalize(raw, history, generated)
        if self.config.is_greedy:
            tokens = _greedy(penalized)
            return torch.zeros_like(penalized).scatter_(1, tokens.unsqueeze(1), 1.0)
        candidates = self.candidates(penalized, already_penalized=True)
        probs = torch.zeros_like(penalized)
        return probs.scatter_add_(1, candidates.ids, candidates.log_probs().exp())

    def sample(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        row_seeds: torch.Tensor | None = None,
        *,
        generated: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
    ) -> SampleOutput:
        """Draw one token per row from exactly ``distribution(logits, history, generated)``.

        ``history``: ``[B, L]`` context ids (prompt + generated, negative = padding) for the repetition
        penalty; ``generated``: the generated part, for frequency/presence penalties (default: history).
        """
        raw = _last_position(logits)
        batch = raw.shape[0]
        penalized = self._penalize(raw, history, generated)
        step = self.calls if step is None else step
        self.calls += 1
        if self.config.is_greedy:
            tokens = _greedy(penalized)
            zeros = torch.zeros(batch, device=raw.device)
            return SampleOutput(
                tokens,
                zeros,
                _model_logprobs(raw, tokens),
                zeros.clone(),
                torch.ones(batch, dtype=torch.long, device=raw.device),
            )
        candidates = self.candidates(penalized, already_penalized=True)
        keys = noise.row_keys(
            self._row_seeds(batch, raw.device, generator, row_seeds),
            torch.as_tensor(step, device=raw.device).expand(batch),
        )
        winner = noise.race_argmax(candidates.logits, keys, candidates.ids).unsqueeze(1)
        tokens = candidates.ids.gather(1, winner).squeeze(1)
        log_probs = candidates.log_probs()
        kept = torch.isfinite(candidates.logits)
        entropy = -torch.where(kept, log_probs.exp() * log_probs, 0.0).sum(1)
        return SampleOutput(
            tokens, log_probs.gather(1, winner).squeeze(1), _model_logprobs(raw, tokens), entropy, kept.sum(1)
        )

    def candidates(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        *,
        already_penalized: bool = False,
    ) -> Candidates:
        """Final logits on the smallest candidate set that provably holds every token with mass."""
        penalized = (
            logits if already_penalized else self._penalize(_last_position(logits), history, generated)
        )
        config = self.config
        filters = [stage for stage in config.stages if stage in FILTERS]
        vocab = penalized.shape[1]
        if not filters:
            ids = torch.arange(vocab, device=penalized.device).expand_as(penalized)
            return Candidates(ids, self._run_stages(penalized, None)[0])
        first = filters[0]
        width = min(vocab, config.top_k + 1 if first == "top_k" else _FIRST_CANDIDATES)
        log_total = self._first_filter_log_total(penalized) if first == "top_p" else None
        rows, pending = penalized, None  # pending: indices of rows still undecided (None = all rows)
        ids = final = None
        while True:
            values, cand_ids = top_candidates(rows, width)
            row_log_total = log_total if pending is None or log_total is None else log_total[pending]
            row_final, decided = self._run_stages(values, row_log_total)
            if width == vocab:
                decided[:] = True
            if pending is None and bool(decided.all()):  # the common case: one pass decides every row
                return Candidates(cand_ids, row_final)
            if pending is None:
                ids, final = cand_ids, row_final
                pending = torch.arange(rows.shape[0], device=rows.device)
            else:
                ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
                final = torch.nn.functional.pad(final, (0, width - final.shape[1]), value=NEG_INF)
                done = pending[decided]
                ids[done] = cand_ids[decided]
                final[done] = row_final[decided]
            pending = pending[~decided]
            if not pending.numel():
                return Candidates(ids, final)
            rows = penalized[pending]
            width = width * _GROWTH
            width = vocab if width * 4 > vocab else width  # a huge top-k costs as much as a sort

    def _run_stages(
        self, values: torch.Tensor, log_total: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temperature and filters in the config's order on sorted candidate values.

        ``log_total`` (the full vocabulary's log-normalizer) feeds the first filter if it is top-p.
        Also returns, per row, whether the first filter dropped the last (smallest) candidate: only then
        is everything outside the candidates provably dropped and the result exact.
        """
        config = self.config
        first_filter_done = False
        decided = torch.ones(values.shape[0], dtype=torch.bool, device=values.device)
        for stage in config.stages:
            if stage == "temperature":
                values = values / config.temperature
            elif stage == "top_k":
                values = top_k_filter(values, config.top_k, sorted_desc=True)
            elif stage == "min_p":
                values = min_p_filter(values, config.min_p)
            elif stage == "top_p":
                values = top_p_filter(
                    values, config.top_p, None if first_filter_done else log_total, sorted_desc=True
                )
            if stage in FILTERS and not first_filter_done:
                first_filter_done = True
                decided = torch.isinf(values[:, -1])
        return values, decided

    def _first_filter_log_total(self, penalized: torch.Tensor) -> torch.Tensor:
        """Log-normalizer of the full vocabulary as the first filter sees it (tempered if T came first)."""
        stages = self.config.stages
        tempered = "temperature" in stages and stages.index("temperature") < stages.index("top_p")
        scaled = penalized / self.config.temperature if tempered else penalized
        return logsumexp(scaled).double()

    def _penalize(
        self, raw: torch.Tensor, history: torch.Tensor | None, generated: torch.Tensor | None
    ) -> torch.Tensor:
        config = self.config
        penalized = apply_penalties(
            raw,
            history,
            repetition_penalty=config.repetition_penalty,
            repetition_window=config.repetition_window,
            generated=generated,
            frequency_penalty=config.frequency_penalty,
            presence_penalty=config.presence_penalty,
        )
        return _check_finite_mass(penalized)

    def _row_seeds(
        self,
        batch: int,
        device: torch.device,
        generator: torch.Generator | None,
        row_seeds: torch.Tensor | None,
    ) -> torch.Tensor:
        if row_seeds is not None:
            seeds = torch.as_tensor(row_seeds, dtype=torch.long, device=device)
            if seeds.shape != (batch,):
                raise ValueError(f"row_seeds must have shape ({batch},), got {tuple(seeds.shape)}")
            return seeds
        if self.config.seed is not None:
            return torch.full((batch,), self.config.seed, dtype=torch.long, device=device)
        return torch.randint(0, 2**62, (batch,), generator=generator).to(device)


def top_candidates(
    logits: torch.Tensor, width: int, chunk: int = _CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
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


def _last_position(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 3:
        logits = logits[:, -1]
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V] or [B, T, V], got shape {tuple(logits.shape)}")
    # Row-strided views (e.g. ``model_logits[:, -1]``) make every reduction below several times slower.
    return logits.float().contiguous()


def _greedy(penalized: torch.Tensor, chunk: int = _CHUNK) -> torch.Tensor:
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


def _check_finite_mass(penalized: torch.Tensor) -> torch.Tensor:
    """Reject NaN rows and all ``-inf`` rows; rows with ``+inf`` logits put all their mass, equally, on
    their ``+inf`` tokens (one ``amax`` pass; NaN propagates through it)."""
    top = penalized.amax(dim=1)
    if not math.isfinite(top.sum().item()):
        nan_rows = torch.isnan(top).nonzero().flatten().tolist()
        if nan_rows:
            raise ValueError(f"logits contain NaN in row(s) {nan_rows}")
        empty = (top == NEG_INF).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"logits are all -inf in row(s) {empty}: nothing can be sampled")
        rows = top == float("inf")
        penalized = penalized.clone()
        penalized[rows] = torch.where(penalized[rows] == float("inf"), 0.0, NEG_INF)
    return penalized


def _model_logprobs(raw: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return raw.gather(1, tokens.unsqueeze(1)).squeeze(1) - logsumexp(raw)
