"""Speculative-decoding accounting: additive counts in, rates and the predicted speedup out.

Decoders store only counts (so batches merge by addition); `derive_rates` turns them into the
reported quantities: α, α̂, τ, c and the predicted speedup.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from sampling._numeric import ratio
from sampling.decoding.speculation_policy import RoundReport


def predicted_speedup(alpha: float, gamma: float, cost_ratio: float) -> float:
    """Leviathan et al.'s expected walltime improvement (1 − α^{γ+1}) / ((1 − α)(γc + 1))."""
    if gamma <= 0:
        return 1.0
    tokens_per_round = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return tokens_per_round / (gamma * cost_ratio + 1)


_NEEDED = (
    "accepted_tokens",
    "verified_tokens",
    "draft_tokens_offered",
    "rounds",
    "draft_seconds",
    "draft_steps",
    "verify_seconds",
    "overlap_sum",
    "emitted_tokens",
    "row_rounds",
)


def derive_rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Rates from the counts a draft-verify decoder records (empty if it recorded none).

    - ``acceptance_rate`` α = accepted / verified drafts (a draft is verified when every draft before
      it passed), the empirical per-draft acceptance probability;
    - ``analytic_acceptance`` α̂ = mean over verified positions of Σ_x min(p(x), q(x));
    - ``tokens_per_target_forward`` τ = tokens emitted per row per target forward;
    - ``cost_ratio`` c = mean draft step time / mean target (verify) step time;
    - ``predicted_speedup`` from α, the mean γ and c; ``acceptance_rate_pos{i}`` per draft position;
    - the measured cost curve and the γ policy's record (`policy_rates`).

    A rate with nothing to count is NaN (`ratio`): no verified draft gives no α. One exception: a drafter
    that runs no model (prompt lookup) has c = 0, since drafting costs no model step.

    >>> rates = derive_rates({"verified_tokens": 0, "rounds": 2, "verify_seconds": 1.0})
    >>> rates["acceptance_rate"], rates["cost_ratio"], rates["predicted_speedup"]
    (nan, 0.0, 1.0)
    """
    if "verified_tokens" not in counts:
        return {}
    counts = {key: counts.get(key, 0.0) for key in _NEEDED} | dict(counts)
    alpha = ratio(counts["accepted_tokens"], counts["verified_tokens"])
    gamma = ratio(counts["draft_tokens_offered"], counts["rounds"])
    cost = ratio(
        ratio(counts["draft_seconds"], counts["draft_steps"], undefined=0.0),
        ratio(counts["verify_seconds"], counts["rounds"]),
    )
    rates = {
        "acceptance_rate": alpha,
        "analytic_acceptance": ratio(counts["overlap_sum"], counts["verified_tokens"]),
        "tokens_per_target_forward": ratio(counts["emitted_tokens"], counts["row_rounds"]),
        "cost_ratio": cost,
        "mean_num_draft_tokens": gamma,
        "predicted_speedup": predicted_speedup(alpha, gamma, cost),
    }
    position = 1
    while f"reached_pos{position}" in counts:
        rates[f"acceptance_rate_pos{position}"] = ratio(
            counts[f"passed_pos{position}"], counts[f"reached_pos{position}"]
        )
        position += 1
    return rates | policy_rates(counts)


def policy_rates(counts: Mapping[str, float]) -> dict[str, float]:
    """The measured cost curve and how the γ policy did, from `RoundTally.record_policy`'s counts.

    - ``scoring_cost_k{k}``: mean seconds of a round scoring k tokens (target forward, sampling and
      bookkeeping: everything but drafting); ``scoring_cost_ratio_k{k}`` = that / the k = 1 cost (a plain
      autoregressive step in the same loop);
    - ``draft_step_seconds``: drafting seconds per draft offered;
    - ``speculation_off_fraction``: the fraction of rounds the measured policy ran without drafts because
      no γ ≥ 1 was predicted to beat plain decoding;
    - ``policy_predicted_speedup`` / ``policy_measured_speedup``: over the rounds the policy decided, the
      plain-decoding seconds of the predicted / emitted tokens (at the measured k = 1 cost) per predicted
      / measured round second.

    >>> rates = policy_rates({"rounds": 4, "speculation_off_rounds": 1, "scoring_seconds_k1": 2.0,
    ...     "scoring_rounds_k1": 2, "scoring_seconds_k3": 3.0, "scoring_rounds_k3": 2})
    >>> rates["scoring_cost_ratio_k3"], rates["speculation_off_fraction"]
    (1.5, 0.25)
    """

    def rate(numerator: str, denominator: str) -> float:
        return ratio(counts.get(numerator, 0.0), counts.get(denominator, 0.0))

    rates = {
        "speculation_off_fraction": rate("speculation_off_rounds", "rounds"),
        "draft_step_seconds": rate("draft_seconds", "draft_tokens_offered"),
        "policy_predicted_speedup": rate("predicted_ar_seconds", "predicted_round_seconds"),
        "policy_measured_speedup": rate("measured_ar_seconds", "measured_round_seconds"),
    }
    ar_step = rate("scoring_seconds_k1", "scoring_rounds_k1")
    for key in sorted(k for k in counts if k.startswith("scoring_rounds_k")):
        k = key.removeprefix("scoring_rounds_k")
        cost = ratio(counts[f"scoring_seconds_k{k}"], counts[key])
        rates[f"scoring_cost_k{k}"] = cost
        rates[f"scoring_cost_ratio_k{k}"] = ratio(cost, ar_step)
    return rates


COUNT_KEYS = (
    "rounds",
    "draft_tokens_offered",
    "drafted_tokens",
    "accepted_tokens",
    "verified_tokens",
    "overlap_sum",
    "row_rounds",
    "emitted_tokens",
    "draft_steps",
    "draft_seconds",
    "catch_up_seconds",
    "verify_seconds",
    "speculation_off_rounds",
)


@dataclass
class RoundTally:
    """Additive accounting across the rounds of one `generate` call (active rows only)."""

    counts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0.0))

    def add(self, key: str, value: float | torch.Tensor) -> None:
        self.counts[key] = self.counts.get(key, 0.0) + float(value)

    def record(
        self,
        draft_lengths: torch.Tensor,
        accepted: torch.Tensor,
        overlap: torch.Tensor,
        active: torch.Tensor,
    ) -> tuple[float, float]:
        """One round: ``draft_lengths``, ``accepted``, ``active`` [B]; ``overlap`` [B, γ] with γ the columns
        drafted (fewer than the policy chose when every row's draft was unsure before the end).
        Returns (verified draft positions, Σ overlap over them)."""
        lengths = torch.where(active, draft_lengths, 0)
        accepted = torch.where(active, accepted, 0)
        verified = torch.minimum(accepted + 1, lengths)
        columns = torch.arange(overlap.shape[1], device=lengths.device)
        reached = columns < verified.unsqueeze(1)
        self.add("rounds", 1)
        self.add("draft_tokens_offered", overlap.shape[1])
        self.add("drafted_tokens", lengths.sum())
        self.add("accepted_tokens", accepted.sum())
        self.add("verified_tokens", verified.sum())
        overlap_sum = float(overlap[reached].sum())
        self.add("overlap_sum", overlap_sum)
        self.add("row_rounds", active.sum())
        self.add("emitted_tokens", (accepted + 1)[active].sum())
        for i in range(overlap.shape[1]):
            self.add(f"reached_pos{i + 1}", reached[:, i].sum())
            self.add(f"passed_pos{i + 1}", (reached[:, i] & (accepted > i)).sum())
        return float(verified.sum()), overlap_sum

    def record_policy(
        self,
        report: RoundReport,
        off: bool,
        prediction: tuple[float, float, float] | None,
        emitted_per_row: float,
    ) -> None:
        """One round's cost by tokens scored (k = γ + 1 unless fewer drafts were found), whether the policy
        had switched speculation off, and, when the policy predicted (tokens per row, round seconds, plain
        step seconds), the predicted and the measured plain-decoding seconds saved."""
        k = report.tokens_scored
        self.add(f"scoring_seconds_k{k}", report.verify_seconds)
        self.add(f"scoring_rounds_k{k}", 1)
        self.add("speculation_off_rounds", off)
        if prediction is None:
            return
        tokens, seconds, ar_step = prediction
        self.add("policy_rounds", 1)
        self.add("predicted_ar_seconds", tokens * ar_step)
        self.add("predicted_round_seconds", seconds)
        self.add("measured_ar_seconds", emitted_per_row * ar_step)
        round_seconds = report.catch_up_seconds + report.draft_seconds + report.verify_seconds
        self.add("measured_round_seconds", round_seconds)
