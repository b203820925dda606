"""Speculative-decoding accounting: additive counts in, rates and the predicted speedup out.

Decoders store only counts (so batches merge by addition); `derive_rates` turns them into the
reported quantities: α, α̂, τ, c and the predicted speedup.
"""

from __future__ import annotations

from collections.abc import Mapping


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


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def derive_rates(counts: Mapping[str, float]) -> dict[str, float]:
    """Rates from the counts a draft-verify decoder records (empty if it recorded none).

    - ``acceptance_rate`` α = accepted / verified drafts (a draft is verified when every draft before
      it passed), the empirical per-draft acceptance probability;
    - ``analytic_acceptance`` α̂ = mean over verified positions of Σ_x min(p(x), q(x));
    - ``tokens_per_target_forward`` τ = tokens emitted per row per target forward;
    - ``cost_ratio`` c = mean draft step time / mean target (verify) step time;
    - ``predicted_speedup`` from α, the mean γ and c; ``acceptance_rate_pos{i}`` per draft position.
    """
    if "verified_tokens" not in counts:
        return {}
    counts = {key: counts.get(key, 0.0) for key in _NEEDED} | dict(counts)
    alpha = _ratio(counts["accepted_tokens"], counts["verified_tokens"])
    gamma = _ratio(counts["draft_tokens_offered"], counts["rounds"])
    cost = _ratio(
        _ratio(counts["draft_seconds"], counts["draft_steps"]),
        _ratio(counts["verify_seconds"], counts["rounds"]),
    )
    rates = {
        "acceptance_rate": alpha,
        "analytic_acceptance": _ratio(counts["overlap_sum"], counts["verified_tokens"]),
        "tokens_per_target_forward": _ratio(counts["emitted_tokens"], counts["row_rounds"]),
        "cost_ratio": cost,
        "mean_num_draft_tokens": gamma,
        "predicted_speedup": predicted_speedup(alpha, gamma, cost),
    }
    position = 1
    while f"reached_pos{position}" in counts:
        rates[f"acceptance_rate_pos{position}"] = _ratio(
            counts[f"passed_pos{position}"], counts[f"reached_pos{position}"]
        )
        position += 1
    return rates
