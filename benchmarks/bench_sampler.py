"""Sampler speed: ours vs HF transformers' LogitsProcessorList on identical inputs, side by side.

    python benchmarks/bench_sampler.py [--vocab 151936] [--repeats 30]

Both run the same stages in the same order (``hf``: penalties → temperature → top-k → top-p → min-p)
over a 256-token history, then draw one token per row (HF: softmax + multinomial). The floor is a
single argmax pass over the same logits. Times are medians of alternating repeats, µs per step.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sampling import SamplingConfig, TokenSampler, get_preset

CONFIGS = {
    "balanced": get_preset("balanced", order="hf"),
    "creative": get_preset("creative", order="hf"),
    "balanced+min_p": get_preset("balanced", min_p=0.05, order="hf"),
    "top-p only": SamplingConfig(top_p=0.9, order="hf"),
}


def llm_like_logits(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian background plus a decaying head of a few hundred likely tokens, like a real LM step."""
    logits = torch.randn(batch, vocab, generator=generator) * 1.5
    head = torch.randint(0, vocab, (batch, 300), generator=generator)
    boost = 12.0 * torch.exp(-torch.arange(300, dtype=torch.float32) / 40.0)
    return logits.scatter_add_(1, head, boost.expand(batch, -1))


def hf_processors(config: SamplingConfig) -> LogitsProcessorList:
    stages = LogitsProcessorList()
    if config.repetition_penalty != 1.0:
        stages.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.temperature != 1.0:
        stages.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        stages.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        stages.append(TopPLogitsWarper(config.top_p))
    if config.min_p:
        stages.append(MinPLogitsWarper(config.min_p))
    return stages


def median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# vocab {args.vocab}, history 256 tokens, µs per step (median of {args.repeats})\n")
    print("| config | B | ours µs | HF µs | HF/ours | argmax floor µs | ours/floor |")
    print("|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batches:
        logits = llm_like_logits(batch, args.vocab, generator)
        history = torch.randint(0, args.vocab, (batch, 256), generator=generator)
        for name, config in CONFIGS.items():
            sampler = TokenSampler(config)
            processors = hf_processors(config)

            def ours(sampler=sampler) -> torch.Tensor:
                return sampler.sample(logits, history).tokens

            def hf(processors=processors) -> torch.Tensor:
                scores = processors(history, logits.clone())
                return torch.multinomial(torch.softmax(scores, dim=-1), 1)

            def floor() -> torch.Tensor:
                return torch.argmax(logits, dim=-1)

            for fn in (ours, hf, floor):  # warm-up
                fn()
            ours_times, hf_times, floor_times = [], [], []
            for _ in range(3):  # alternate so drift hits both equally
                ours_times.append(median_us(ours, args.repeats // 3 or 1))
                hf_times.append(median_us(hf, args.repeats // 3 or 1))
                floor_times.append(median_us(floor, args.repeats // 3 or 1))
            t_ours, t_hf, t_floor = (statistics.median(t) for t in (ours_times, hf_times, floor_times))
            print(f"| {name} | {batch} | {t_ours:,.0f} | {t_hf:,.0f} | {t_hf / t_ours:.1f}× | {t_floor:,.0f} | "
                  f"{t_ours / t_floor:.1f}× |")


if __name__ == "__main__":
    main()
