"""How many drafts to offer each round: a constant γ, HF's heuristic, or the measured-cost policy.

The measured policy ("speculation that never loses") picks, before every round, the γ in 0..γ_max that
maximises the predicted speedup over plain decoding, from costs measured on this call's own rounds:

    speedup(γ) = E[tokens](α̂, γ) · v(1) / (γ·d + v(γ + 1)),   E[tokens](α, γ) = (1 − α^{γ+1}) / (1 − α)

where v(k) is the measured seconds of a round that scores k tokens with the target (its forward plus the
round's sampling and bookkeeping: everything but drafting), v(1) is a plain autoregressive step in the same
loop, d the measured seconds per draft token (not counting a draft model's catch-up on the tokens of
plain rounds, a one-off cost of switching back on) and α̂ a running estimate of the per-draft acceptance. γ = 0
(speculation off) is a plain autoregressive round; it wins whenever no γ ≥ 1 is predicted to beat 1.

Costs come from the call's first rounds, not from extra forwards: the warm-up runs γ = 0, γ_max, 0, γ_max
(real rounds whose tokens are kept), which measures v(1), v(γ_max + 1) and d; unmeasured v(k) are linear
interpolations of the measured ones, and each γ the policy then uses is measured as it runs. Each v(k)
(and d) is the lower median of its last ``window`` measurements: robust to a cold first forward (which can
take many times a warm one) and to bursts of load from other processes, and — unlike the minimum, which
keeps falling as measurements accumulate — not biased towards the k measured most often (v(1), once
speculation is off), so a noisy machine does not talk the policy out of speculating. While
speculation is off, every ``probe_every`` rounds one round drafts anyway (the best γ ≥ 1), so that a rising
acceptance can bring speculation back. The choice of γ depends only on the past, so the output distribution
is untouched (each round is exact given its prefix); only which draws a seed produces depends on the timings.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

POLICIES = ("constant", "heuristic", "measured")


def expected_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens emitted by a round offering ``gamma`` drafts accepted i.i.d. with probability α:
    Σ_{i=0}^{γ} α^i = (1 − α^{γ+1}) / (1 − α).

    >>> expected_tokens(0.5, 2), expected_tokens(1.0, 3), expected_tokens(0.9, 0)
    (1.75, 4.0, 1.0)
    """
    return sum(alpha**i for i in range(gamma + 1))


def interpolated_cost(costs: Mapping[int, float], k: int) -> float:
    """The cost of scoring ``k`` tokens from measured ``costs`` {k: seconds}: the measured value, else a
    linear interpolation between the nearest measured k on either side, else the nearest one's value.

    >>> interpolated_cost({1: 1.0, 5: 3.0}, 3), interpolated_cost({1: 1.0, 5: 3.0}, 7)
    (2.0, 3.0)
    """
    if k in costs:
        return costs[k]
    below = [m for m in costs if m < k]
    above = [m for m in costs if m > k]
    if not below or not above:
        return costs[max(below)] if below else costs[min(above)]
    low, high = max(below), min(above)
    return costs[low] + (costs[high] - costs[low]) * (k - low) / (high - low)


def round_speedup(alpha: float, gamma: int, draft_step: float, verify_costs: Mapping[int, float]) -> float:
    """Predicted speedup over plain decoding of rounds offering ``gamma`` drafts:
    E[tokens](α, γ) · v(1) / (γ·d + v(γ + 1)); exactly 1 for γ = 0. A clock too coarse to see a round
    (all costs 0) leaves only the token count: E[tokens](α, γ).

    >>> round(round_speedup(0.5, 2, 0.1, {1: 1.0, 3: 1.2}), 4)   # 1.75 tokens for 1.4 plain steps
    1.25
    >>> round_speedup(0.5, 2, 0.0, {1: 0.0, 3: 0.0}), round_speedup(0.5, 0, 0.0, {1: 0.0})
    (1.75, 1.0)
    """
    ar_step = interpolated_cost(verify_costs, 1)
    cost = gamma * draft_step + interpolated_cost(verify_costs, gamma + 1)
    if cost <= 0:
        return expected_tokens(alpha, gamma) if ar_step <= 0 else math.inf
    return expected_tokens(alpha, gamma) * ar_step / cost


def choose_gamma(
    alpha: float,
    gamma_max: int,
    draft_step: float,
    verify_costs: Mapping[int, float],
    min_gain: float = 0.0,
) -> int:
    """The γ in 0..γ_max with the highest predicted speedup; 0 (speculation off) unless the best γ ≥ 1
    beats plain decoding by more than ``min_gain`` (ties go to the smaller γ).

    >>> flat = {1: 1.0, 5: 1.1}          # verifying 5 tokens costs little more than 1 (a GPU)
    >>> choose_gamma(0.8, 4, 0.05, flat)
    4
    >>> steep = {1: 1.0, 2: 2.0, 5: 5.0}  # cost grows with every token verified
    >>> choose_gamma(0.8, 4, 0.05, steep)
    0
    """
    best, best_speedup = 0, 1.0 + min_gain
    for gamma in range(1, gamma_max + 1):
        speedup = round_speedup(alpha, gamma, draft_step, verify_costs)
        if speedup > best_speedup:
            best, best_speedup = gamma, speedup
    return best


@dataclass
class RoundReport:
    """What a policy learns from one round: ``gamma`` offered, whether every active row accepted all its
    drafts, the overlap Σ min(p, q) summed over the ``verified`` draft positions, the round's seconds
    spent drafting and in the rest (target scoring, sampling, bookkeeping), ``scored`` the draft
    columns the target actually scored (fewer than γ when no row found γ drafts, e.g. prompt lookup), and
    ``catch_up_seconds`` the drafter spent first on tokens emitted by plain rounds (a switching cost,
    kept out of the per-draft cost d)."""

    gamma: int
    all_passed: bool
    overlap_sum: float
    verified: float
    draft_seconds: float
    verify_seconds: float
    scored: int | None = None
    catch_up_seconds: float = 0.0

    @property
    def tokens_scored(self) -> int:
        """k: the tokens the target scored (the pending token plus the draft columns)."""
        return (self.gamma if self.scored is None else self.scored) + 1


class ConstantPolicy:
    """γ every round."""

    def __init__(self, gamma: int) -> None:
        self.gamma = gamma

    def next_gamma(self) -> int:
        return self.gamma

    def observe(self, report: RoundReport) -> None:
        """Nothing to learn."""

    def prediction(self, gamma: int) -> tuple[float, float, float] | None:
        """No cost model: no prediction."""
        return None

    def is_off(self, gamma: int) -> bool:
        return False


class HeuristicPolicy(ConstantPolicy):
    """HF's schedule: γ + 2 after a round where every draft passed, else max(1, γ − 1)."""

    def observe(self, report: RoundReport) -> None:
        if report.gamma:
            self.gamma = self.gamma + 2 if report.all_passed else max(1, self.gamma - 1)


@dataclass
class MeasuredPolicy:
    """The measured-cost policy (module docstring) for one `generate` call: its cost observations and α̂.

    α̂ is the decayed mean of Σ min(p, q) over verified draft positions (``decay`` per round), starting
    from ``prior_alpha`` with the weight of ``prior_weight`` positions.
    """

    gamma_max: int
    probe_every: int = 16
    max_probe_every: int = 256
    decay: float = 0.9
    prior_alpha: float = 0.5
    prior_weight: float = 2.0
    window: int = 9
    warmup: list[int] = field(default_factory=list)
    verify_seconds: dict[int, deque[float]] = field(default_factory=dict)
    draft_step_seconds: deque[float] = field(init=False)
    """Seconds per draft token of the last ``window`` drafting rounds."""
    overlap: float = 0.0
    verified: float = 0.0
    off_streak: int = 0
    probe_wait: int = 0
    """Plain rounds before the next probe: ``probe_every``, doubled by each probe that left it off."""
    decided: bool = False
    """Whether the last γ was the policy's choice (not a warm-up round)."""

    def __post_init__(self) -> None:
        self.draft_step_seconds = deque(maxlen=self.window)
        self.probe_wait = self.probe_every
        if not self.warmup:
            self.warmup = [0, self.gamma_max, 0, self.gamma_max]

    @property
    def alpha(self) -> float:
        weight = self.prior_weight
        return (self.overlap + self.prior_alpha * weight) / (self.verified + weight)

    @property
    def draft_step(self) -> float:
        """d: seconds per draft token (lower median of the recent drafting rounds)."""
        return statistics.median_low(self.draft_step_seconds) if self.draft_step_seconds else 0.0

    @property
    def verify_costs(self) -> dict[int, float]:
        """v(k) for every measured k: the lower median of its recent rounds."""
        return {k: statistics.median_low(seconds) for k, seconds in self.verify_seconds.items()}

    @property
    def ready(self) -> bool:
        """Whether the curve has v(1) and one longer round to predict from."""
        return not self.warmup and 1 in self.verify_seconds and len(self.verify_seconds) > 1

    def next_gamma(self) -> int:
        self.decided = self.ready
        if self.warmup:
            return self.warmup.pop(0)
        if not self.ready:
            return self.gamma_max if 1 in self.verify_seconds else 0
        gamma = choose_gamma(self.alpha, self.gamma_max, self.draft_step, self.verify_costs)
        if gamma:
            self.off_streak, self.probe_wait = 0, self.probe_every
            return gamma
        self.off_streak += 1
        if self.off_streak < self.probe_wait:
            return 0
        self.off_streak, self.probe_wait = 0, min(2 * self.probe_wait, self.max_probe_every)
        speedups = {g: self.predicted_speedup(g) for g in range(1, self.gamma_max + 1)}
        return max(speedups, key=speedups.__getitem__)

    def is_off(self, gamma: int) -> bool:
        """Whether a round of ``gamma`` drafts is speculation switched off by the policy."""
        return gamma == 0 and self.decided

    def predicted_speedup(self, gamma: int) -> float:
        return round_speedup(self.alpha, gamma, self.draft_step, self.verify_costs)

    def prediction(self, gamma: int) -> tuple[float, float, float] | None:
        """(expected tokens per row, predicted round seconds, seconds of one plain step) for a round of
        ``gamma`` drafts; None for rounds the policy did not choose (warm-up)."""
        if not self.decided:
            return None
        costs = self.verify_costs
        cost = gamma * self.draft_step + interpolated_cost(costs, gamma + 1)
        return expected_tokens(self.alpha, gamma), cost, interpolated_cost(costs, 1)

    def observe(self, report: RoundReport) -> None:
        recent = self.verify_seconds.setdefault(report.tokens_scored, deque(maxlen=self.window))
        recent.append(report.verify_seconds)
        drafted = report.tokens_scored - 1  # fewer than γ when drafting stopped early
        if report.gamma and drafted:
            self.draft_step_seconds.append(report.draft_seconds / drafted)
        if report.verified:
            self.overlap = self.decay * self.overlap + report.overlap_sum
            self.verified = self.decay * self.verified + report.verified


Policy = ConstantPolicy | MeasuredPolicy


def make_policy(name: str, gamma: int) -> Policy:
    """The per-call policy called ``name`` (see `POLICIES`) with γ (γ_max for "measured")."""
    if name == "constant":
        return ConstantPolicy(gamma)
    if name == "heuristic":
        return HeuristicPolicy(gamma)
    if name == "measured":
        return MeasuredPolicy(gamma)
    raise ValueError(f"policy={name!r} is invalid: must be one of {', '.join(POLICIES)}")
