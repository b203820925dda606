"""Speed and decoder accounting, from the timings and counters of a `GenerationOutput`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rtdlm_experiments.metrics._ngrams import ratio

if TYPE_CHECKING:
    from sampling.decoding.base import GenerationOutput


def speed_metrics(output: GenerationOutput, baseline_seconds: float | None = None) -> dict[str, float]:
    """Batch-level speed; N = ``output.num_new_tokens`` summed over the batch. Every ratio with a zero
    denominator is 0.0.

    - ``tokens_per_second`` = N / decode_seconds and ``ms_per_token`` = 1000 · decode_seconds / N
      (decode only: prefill excluded; batch throughput, not per sequence).
    - ``time_to_first_token_ms`` ≈ 1000 · (prefill_seconds + sampler_seconds / sampler_calls): the prefill
      plus one average sampler call; it ignores the per-step bookkeeping around that call.
    - ``sampler_us_per_step`` = 10⁶ · sampler_seconds / sampler_calls.
    - ``target_forwards``, ``draft_forwards``, ``new_tokens``, ``prefill_seconds``, ``decode_seconds``,
      ``total_seconds``: the raw counters and timings.
    - ``speedup`` = baseline_seconds / total_seconds (prefill + decode), only when ``baseline_seconds``
      (the AR decoder's total time on the same prompts, config and seed) is given.
    - every key of ``output.accounting()`` (decoder counts and the rates derived from them, such as
      ``acceptance_rate``, ``analytic_acceptance``, ``tokens_per_target_forward``, ``cost_ratio``,
      ``predicted_speedup``), as floats; a key that collides with one above is overridden by it.
    """
    new_tokens = output.num_new_tokens
    sampler_seconds_per_call = ratio(output.sampler_seconds, output.sampler_calls)
    metrics = {key: float(value) for key, value in output.accounting().items()}
    metrics.update(
        {
            "tokens_per_second": ratio(new_tokens, output.decode_seconds),
            "ms_per_token": 1e3 * ratio(output.decode_seconds, new_tokens),
            "time_to_first_token_ms": 1e3 * (output.prefill_seconds + sampler_seconds_per_call),
            "sampler_us_per_step": 1e6 * sampler_seconds_per_call,
            "target_forwards": float(output.target_forwards),
            "draft_forwards": float(output.draft_forwards),
            "new_tokens": float(new_tokens),
            "prefill_seconds": float(output.prefill_seconds),
            "decode_seconds": float(output.decode_seconds),
            "total_seconds": float(output.total_seconds),
        }
    )
    if baseline_seconds is not None:
        metrics["speedup"] = ratio(baseline_seconds, output.total_seconds)
    return metrics
