"""`TokenSampler`: logits → exact sampling distribution → one token per row, fast.

The chain is ``config.stages``: a leading run of logit modifiers (penalties, DRY, no-repeat-n-gram, logit
bias) runs on the whole vocabulary; the rest runs on candidates when it can (`split_chain`), found by
`sampling.stages.candidates.search_candidates` (the smallest set that provably holds every token with
mass), else on the whole rows, where top-p and typical-p find their boundary by histogram
(`mass_threshold`) instead of a sort.

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
from sampling.stages.candidates import Candidates, ChainInputs, search_candidates, whole_row_candidates
from sampling.stages.chain import split_chain
from sampling.stages.common import NEG_INF
from sampling.stages.context import ChainContext
from sampling.stages.draw import draw, model_logprobs, raw_log_total
from sampling.stages.filters import mirostat_update
from sampling.stages.select import greedy, top_candidates

# `Candidates` and `top_candidates` live in `sampling.stages`; re-exported: callers import them from here
__all__ = ["XTC_STREAM", "Candidates", "SampleOutput", "SamplerState", "TokenSampler", "top_candidates"]

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
            self._modifiers = tuple(s for s in config.stages if config.stage_table[s].kind == "modifier")

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
            inputs = ChainInputs(self.config, self._rest, history, generated, mu, coin)
            return whole_row_candidates(inputs, modified)
        return search_candidates(ChainInputs(self.config, self._rest, mu=mu, coin=coin), modified, stats)

    def _modify(self, raw, history, generated) -> torch.Tensor:
        """The leading logit modifiers on the whole vocabulary (all modifiers for greedy), checked."""
        stages = self._modifiers
        ctx = ChainContext(self.config, history, generated)
        for name in stages:
            raw = self.config.stage_table[name].apply(raw, ctx)
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
