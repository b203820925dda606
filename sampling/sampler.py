"""`TokenSampler`: logits → exact sampling distribution → one token per row, fast.

The chain is ``config.stages``: a leading run of logit modifiers (penalties, DRY, no-repeat-n-gram, logit
bias) runs on the whole vocabulary; the rest runs on candidates when it can (`split_chain`). Every
``upper`` filter keeps an upper set of values and temperature preserves order, so if the first filter is
one of them, the final kept set is a prefix of the tokens sorted by modified logit. We then take the top-M
candidates (M = top_k + 1 when top-k is the first filter, else 64, growing ×8) and run the chain on them,
and accept a row once the first filter provably drops its smallest candidate; the first filter reads the
whole row's statistics (normalizer, entropy, σ) when it needs them. Rows that stay undecided past a few
thousand candidates, and chains that start with typical-p or XTC, run on the whole row, where top-p and
typical-p find their boundary by histogram (`mass_threshold`) instead of a sort.

Sampling is an exponential race over the candidates with counter-based noise keyed by (row seed, step,
token id), so a row's draw is reproducible and independent of the batch it is in. XTC's coin comes from
the same noise (its own stream), keyed by (row seed, step).

State (mirostat v2's μ, per row) is explicit and pure: ``initial_state(batch)`` gives μ₀ = 2τ;
``distribution(..., state=s)`` and ``sample(..., state=s)`` read it, and ``sample`` returns the state after
its draw in ``SampleOutput.state``; ``advance_state(s, logits, token, ...)`` is the state after ``token``
was chosen (μ ← μ − η(surprise − τ), the surprise under the truncated distribution). A draft-verify decoder
computes position i's distribution with the state advanced over the accepted prefix, so a rejected draft
leaves no trace. Without a state, a stateful config starts every row from μ₀. DRY and no-repeat-n-gram
read the ``history`` argument only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sampling import noise
from sampling.config import SamplingConfig
from sampling.processors import NEG_INF, mirostat_update
from sampling.stages.chain import STAGES, THRESHOLDS, ChainContext, first_threshold, run_chain, split_chain
from sampling.stages.draw import draw, model_logprobs, raw_log_total
from sampling.stages.select import CHUNK, candidates_above, greedy, top_candidates

_FIRST_CANDIDATES = 64
_GROWTH = 8
_MAX_CANDIDATES = 4096
_DENSE_BLOCK_ELEMENTS = 1 << 20
_THRESHOLD_CHUNKS = 1024
"""Rows whose first filter keeps tokens in more chunks than this take the whole-row chain instead."""
XTC_STREAM = 7
"""Noise stream of XTC's coin (the decoders use 1-3)."""


@dataclass(frozen=True)
class SamplerState:
    """Per-row state carried between steps: mirostat's μ ([B], float64), None when mirostat is off."""

    mu: torch.Tensor | None = None

    def select(self, rows: torch.Tensor | slice) -> SamplerState:
        """The state of some rows (an index tensor, bool mask or slice)."""
        return SamplerState(None if self.mu is None else self.mu[rows])


@dataclass(frozen=True)
class SampleOutput:
    """One draw per row; every tensor field is ``[B]``."""

    tokens: torch.Tensor
    """Chosen token ids (long)."""
    logprobs: torch.Tensor
    """Log-probability of the token under the sampling distribution (0 for greedy; with XTC, the
    distribution given the coin)."""
    model_logprobs: torch.Tensor
    """Log-softmax of the raw (unpenalized, untempered) logits at the token: for perplexity."""
    entropy: torch.Tensor
    """Entropy of the sampling distribution, in nats (0 for greedy)."""
    num_kept: torch.Tensor
    """Number of tokens with non-zero probability (1 for greedy)."""
    state: SamplerState | None = None
    """The state after this draw (None for stateless configs)."""


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


class TokenSampler:
    """Applies a `SamplingConfig` to batched logits.

    Seeding: the draw of row b at a call is a pure function of its logits, its row seed, its step and its
    state. Row seeds come from ``row_seeds`` (``[B]``), else ``config.seed`` for every row, else fresh
    random seeds (from ``generator`` if given). The step is the ``step`` argument (int or ``[B]``), else
    the sampler's own counter, which counts ``sample()`` calls: a decoder that calls ``sample()`` once per
    generated position gets step = position, whatever the batch. See the module docstring for the state.
    """

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.calls = 0
        self._modifiers, self._rest, self._fast = split_chain(config)
        # per-config constants, read on every call (the config's properties rebuild their tuples)
        self._greedy, self._stateful, self._xtc = config.is_greedy, config.is_stateful, "xtc" in config.stages
        if self._greedy:
            self._modifiers = tuple(s for s in config.stages if STAGES[s].kind == "modifier")

    def initial_state(self, batch: int, device: torch.device | str | None = None) -> SamplerState:
        """μ₀ = 2τ per row when mirostat is on, else an empty state."""
        if not self._stateful:
            return SamplerState()
        return SamplerState(
            torch.full((batch,), 2.0 * self.config.mirostat_tau, dtype=torch.float64, device=device)
        )

    def distribution(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        *,
        state: SamplerState | None = None,
        row_seeds: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The exact distribution ``sample()`` draws from: float32 ``[B, V]``.

        With XTC, the mixture (1−P)·π + P·π_xtc, or, given ``row_seeds`` and ``step``, the branch their
        coin picks (what ``sample`` with the same seeds and step draws from).
        """
        raw = _last_position(logits)
        modified = self._modify(raw, history, generated)
        vocab = raw.shape[1]
        if self._greedy:
            tokens = greedy(modified)
            return torch.zeros_like(modified).scatter_(1, tokens.unsqueeze(1), 1.0)
        mu = self._mu(state, raw.shape[0], raw.device)
        if not self._xtc or row_seeds is not None:
            coin = self._xtc_coin(row_seeds, step, raw.shape[0], raw.device)
            return self._candidates(modified, history, generated, mu, coin).dense(vocab)
        p = self.config.xtc_probability
        hit = self._candidates(modified, history, generated, mu, True).dense(vocab)
        if p >= 1.0:
            return hit
        miss = self._candidates(modified, history, generated, mu, False).dense(vocab)
        return (1.0 - p) * miss + p * hit

    def sample(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        row_seeds: torch.Tensor | None = None,
        *,
        generated: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
        state: SamplerState | None = None,
    ) -> SampleOutput:
        """Draw one token per row from exactly ``distribution(logits, history, generated, state=state)``.

        ``history``: ``[B, L]`` context ids (prompt + generated, negative = padding) for the repetition
        penalty, DRY and no-repeat-n-gram; ``generated``: the generated part, for frequency/presence
        penalties (default: history).
        """
        raw = _last_position(logits)
        batch, device = raw.shape[0], raw.device
        modified = self._modify(raw, history, generated)
        step = self.calls if step is None else step
        self.calls += 1
        if self._greedy:
            tokens = greedy(modified)
            zeros = torch.zeros(batch, device=device)
            ones = torch.ones(batch, dtype=torch.long, device=device)
            return SampleOutput(tokens, zeros, model_logprobs(raw, tokens), zeros.clone(), ones, state)
        seeds = self._row_seeds(batch, device, generator, row_seeds)
        steps = torch.as_tensor(step, device=device).expand(batch)
        mu = self._mu(state, batch, device)
        coin = self._xtc_coin(seeds, steps, batch, device)
        stats: dict = {}
        candidates = self._candidates(modified, history, generated, mu, coin, stats)
        final = candidates.logits
        winner, log_total, entropy, num_kept = draw(
            final, candidates.ids, candidates.wide, candidates.narrow_width, seeds, steps
        )
        token_logprobs = (final.gather(1, winner.unsqueeze(1)).squeeze(1) - log_total).to(final.dtype)
        ids = candidates.ids
        tokens = ids.gather(1, winner.clamp(max=ids.shape[1] - 1).unsqueeze(1)).squeeze(1)
        if candidates.wide is not None:  # wide rows' ids are their columns
            tokens = torch.where(candidates.wide, winner, tokens)
        new_state = self._advanced(state, mu, token_logprobs)
        return SampleOutput(
            tokens,
            token_logprobs,
            model_logprobs(raw, tokens, raw_log_total(stats) if modified is raw else None),
            entropy.to(final.dtype),
            num_kept,
            new_state,
        )

    def advance_state(
        self,
        state: SamplerState | None,
        logits: torch.Tensor,
        tokens: torch.Tensor,
        history: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        *,
        row_seeds: torch.Tensor | None = None,
        step: int | torch.Tensor | None = None,
    ) -> SamplerState | None:
        """The state after ``tokens`` ([B]) were chosen from these logits (pure; ``state`` is not changed).

        With XTC and mirostat both on, pass ``row_seeds`` and ``step``: the truncated distribution
        depends on the coin.
        """
        if not self._stateful:
            return state
        raw = _last_position(logits)
        batch, device = raw.shape[0], raw.device
        if self._xtc and row_seeds is None:
            raise ValueError("advance_state with XTC and mirostat needs row_seeds and step (the XTC coin)")
        mu = self._mu(state, batch, device)
        coin = self._xtc_coin(row_seeds, step, batch, device)
        candidates = self._candidates(self._modify(raw, history, generated), history, generated, mu, coin)
        probs = candidates.dense(raw.shape[1]).double()
        return self._advanced(state, mu, probs.gather(1, tokens.view(-1, 1).to(device)).squeeze(1).log())

    def candidates(
        self,
        logits: torch.Tensor,
        history: torch.Tensor | None = None,
        generated: torch.Tensor | None = None,
        *,
        already_penalized: bool = False,
        state: SamplerState | None = None,
        xtc_active: torch.Tensor | bool = True,
    ) -> Candidates:
        """Final logits on the smallest candidate set that provably holds every token with mass."""
        raw = _last_position(logits)
        modified = raw if already_penalized else self._modify(raw, history, generated)
        mu = self._mu(state, raw.shape[0], raw.device)
        return self._candidates(modified, history, generated, mu, xtc_active)

    # -- internals -------------------------------------------------------------------------------------

    def _candidates(self, modified, history, generated, mu, coin, stats=None) -> Candidates:
        if not self._fast:
            final = self._dense(modified, history, generated, mu, coin)
            return Candidates(_all_ids(modified), final, _wide(modified, modified.shape[0]), 0)
        rest, config = self._rest, self.config
        batch, vocab = modified.shape
        first = next(s for s in rest if STAGES[s].kind != "scale")
        width = min(vocab, config.top_k + 1 if first == "top_k" else _FIRST_CANDIDATES)
        rows, pending = modified, None  # pending: indices of rows still undecided (None = all rows)
        ids = final = None
        narrow_width = width
        stats = {} if stats is None else stats  # whole-row statistics, computed once for every row
        by_threshold = first in THRESHOLDS and vocab > _MAX_CANDIDATES
        while True:
            rows_mu = mu if pending is None or mu is None else mu[pending]
            rows_coin = coin if pending is None or isinstance(coin, bool) else coin[pending]
            if width == vocab:  # the whole rows, unsorted (indexed block by block, not copied at once)
                which = None if pending is None or pending.numel() == batch else pending
                row_final = self._dense(modified, None, None, rows_mu, rows_coin, which)
                cand_ids = _all_ids(row_final)
                decided = torch.ones(row_final.shape[0], dtype=torch.bool, device=row_final.device)
            else:
                ctx = ChainContext(
                    config,
                    full=rows,
                    sorted_desc=True,
                    mu=rows_mu,
                    xtc_active=rows_coin,
                    stats=stats,
                    rows=pending,
                )
                if by_threshold:  # the first filter's cut from row statistics: its survivors, in one pass
                    hint = ChainContext(config, full=rows, mu=rows_mu, stats=stats)
                    values, cand_ids, count, fits = candidates_above(
                        rows, first_threshold(rest, hint), _THRESHOLD_CHUNKS
                    )
                    ctx.last = (count - 1).clamp_(min=0).unsqueeze(1)
                    width = values.shape[1]
                else:
                    values, cand_ids = top_candidates(rows, width)
                row_final, decided = run_chain(values, rest, ctx)
                if by_threshold:
                    decided &= fits
            if bool(decided.all()) and decided.shape[0] == batch:  # this pass decides every row of the batch
                return Candidates(cand_ids, row_final, _wide(modified, batch) if width == vocab else None)
            next_width = _next_width(width, vocab, by_threshold)
            if (
                first == "top_p"
                and width < next_width < vocab
                and not _top_p_reachable(ctx, decided, next_width)
            ):
                next_width = vocab
            if pending is not None and not bool(decided.any()):  # nothing to merge: try the next width
                width = next_width
                continue
            if pending is None:
                ids, final = cand_ids, row_final
                pending = torch.arange(rows.shape[0], device=rows.device)
            else:
                if width < vocab or vocab <= _MAX_CANDIDATES:  # wide rows' ids are their columns: no pad
                    ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]))
                final = torch.nn.functional.pad(final, (0, width - final.shape[1]), value=NEG_INF)
                done = pending[decided]
                every = bool(decided.all())
                ids[done] = (
                    cand_ids[0, : ids.shape[1]]
                    if width == vocab
                    else cand_ids
                    if every
                    else cand_ids[decided]
                )
                final[done] = row_final if every else row_final[decided]
            narrow_width = narrow_width if width == vocab else width
            pending = pending[~decided]
            if not pending.numel():
                wide = None
                if vocab > _MAX_CANDIDATES and width == vocab:
                    wide = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
                    wide[done] = True  # the rows this pass over the whole vocabulary decided
                return Candidates(ids, final, wide, narrow_width)
            width = next_width
            if width < vocab:
                rows = modified if pending.numel() == batch else modified[pending]

    def _dense(self, rows, history, generated, mu, coin, which=None) -> torch.Tensor:
        """The chain on whole rows (those of ``rows`` at indices ``which``, default all), a few rows at a
        time: temporaries of a block stay small enough for the allocator to reuse (fresh pages for each
        40 MB temporary cost more than the arithmetic)."""
        count = rows.shape[0] if which is None else which.numel()
        block = max(1, _DENSE_BLOCK_ELEMENTS // rows.shape[1])
        finals = []
        for start in range(0, count, block):
            part = slice(start, start + block)
            history_part, generated_part, mu_part, coin_part = (
                x[part] if isinstance(x, torch.Tensor) else x for x in (history, generated, mu, coin)
            )
            ctx = ChainContext(self.config, history_part, generated_part, mu=mu_part, xtc_active=coin_part)
            values = rows[part] if which is None else rows[which[part]]
            finals.append(run_chain(values, self._rest, ctx)[0])
        return finals[0] if len(finals) == 1 else torch.cat(finals)

    def _modify(self, raw, history, generated) -> torch.Tensor:
        """The leading logit modifiers on the whole vocabulary (all modifiers for greedy), checked."""
        stages = self._modifiers
        ctx = ChainContext(self.config, history, generated)
        for name in stages:
            raw = STAGES[name].apply(raw, ctx)
        return _check_finite_mass(raw)

    def _mu(self, state: SamplerState | None, batch: int, device) -> torch.Tensor | None:
        if not self._stateful:
            return None
        mu = (state or self.initial_state(batch, device)).mu
        if mu is None or mu.shape != (batch,):
            raise ValueError(
                f"state.mu must have shape ({batch},), got {None if mu is None else tuple(mu.shape)}"
            )
        return mu.to(device)

    def _advanced(self, state, mu, token_logprobs) -> SamplerState | None:
        if mu is None:
            return state
        config = self.config
        return SamplerState(mirostat_update(mu, token_logprobs, config.mirostat_tau, config.mirostat_eta))

    def _xtc_coin(self, seeds, step, batch, device) -> torch.Tensor | bool:
        """Per row, whether XTC acts at this step: uniform(seed, step, XTC stream) < P."""
        p = self.config.xtc_probability
        if not self._xtc or p >= 1.0:
            return True
        if seeds is None or step is None:
            raise ValueError("the XTC coin needs row seeds and a step")
        seeds = torch.as_tensor(seeds, dtype=torch.long, device=device).expand(batch)
        steps = torch.as_tensor(step, device=device).expand(batch)
        return noise.uniform(noise.row_keys(seeds, steps, XTC_STREAM)) < p

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


def _next_width(width: int, vocab: int, by_threshold: bool) -> int:
    """The candidate width after ``width`` left rows undecided; a top-k over most of the row costs more
    than the whole-row chain, and a threshold pass that did not decide a row will not at any width."""
    width = vocab if by_threshold else width * _GROWTH
    return vocab if width > _MAX_CANDIDATES or width * CHUNK * 4 > vocab else width


def _top_p_reachable(ctx: ChainContext, decided: torch.Tensor, next_width: int) -> bool:
    """Whether ``next_width`` candidates can hold the nucleus of some undecided row: its mass is at most
    the mass of the current candidates plus the rest at the probability of the last one. The slack makes
    "no" certain, so a row skipped to the whole-row chain could never have been decided on candidates:
    its result (and its race) stays the same whatever rows share its batch."""
    values, log_total = ctx.first_input
    probs = (values.double() - log_total.unsqueeze(1)).exp_()
    bound = probs.sum(1) + (next_width - values.shape[1]) * probs[:, -1]
    return bool((bound[~decided] * (1 + 1e-6) + 1e-9 >= ctx.config.top_p).any())


def _wide(rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    if rows.shape[1] <= _MAX_CANDIDATES:
        return None
    return torch.ones(batch, dtype=torch.bool, device=rows.device)


def _all_ids(rows: torch.Tensor) -> torch.Tensor:
    return torch.arange(rows.shape[1], device=rows.device).expand_as(rows)


def _last_position(logits: torch.Tensor) -> torch.Tensor:
    if logits.dim() == 3:
        logits = logits[:, -1]
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V] or [B, T, V], got shape {tuple(logits.shape)}")
    # Row-strided views (e.g. ``model_logits[:, -1]``) make every reduction below several times slower.
    return logits.float().contiguous()


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
