"""Sampler speed: ours vs HF transformers' LogitsProcessorList on identical inputs, side by side.

    python benchmarks/bench_sampler.py [--logits real|synthetic] [--repeats 30]

Both run the same stages in the same order (``hf``: penalties → temperature → top-k → top-p → min-p →
typical → ε → η; no-repeat-n-gram first) over a 256-token history, then draw one token per row (HF:
softmax + multinomial). The floor is a single argmax pass over the same logits. Ours, HF and the floor are
timed in alternating rounds; a time is the median over rounds of each round's median, and the spread is
the range of the per-round HF/ours ratios. µs per step.

``real`` logits (default) are next-token logits of Qwen2.5-Coder-0.5B (vocab 151,936) at the end of
the bundled prompts and a few positions before it; ``synthetic`` ones are a Gaussian background with
a decaying head of likely tokens, of any ``--vocab``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch
from transformers import (
    EpsilonLogitsWarper,
    EtaLogitsWarper,
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from benchmarks._common import markdown_table, ratio
from sampling import SamplingConfig, TokenSampler, get_preset

CONFIGS = {
    "balanced": get_preset("balanced", order="hf"),
    "creative": get_preset("creative", order="hf"),
    "balanced+min_p": get_preset("balanced", min_p=0.05, order="hf"),
    "top-p only, T=1": SamplingConfig(top_p=0.9, order="hf"),
    "top-p only, T=1.5": SamplingConfig(top_p=0.9, temperature=1.5, order="hf"),
    "typical 0.9": SamplingConfig(typical_p=0.9, order="hf"),
    "epsilon 3e-4": SamplingConfig(epsilon_cutoff=3e-4, order="hf"),
    "eta 1e-3": SamplingConfig(eta_cutoff=1e-3, order="hf"),
    "no-repeat-3gram + top-p": SamplingConfig(no_repeat_ngram_size=3, top_p=0.9, order="hf"),
}


def llm_like_logits(batch: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian background plus a decaying head of a few hundred likely tokens, like a real LM step."""
    logits = torch.randn(batch, vocab, generator=generator) * 1.5
    head = torch.randint(0, vocab, (batch, 300), generator=generator)
    boost = 12.0 * torch.exp(-torch.arange(300, dtype=torch.float32) / 40.0)
    return logits.scatter_add_(1, head, boost.expand(batch, -1))


def real_logits(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` rows of Qwen2.5-Coder-0.5B next-token logits and the token ids before each (padded -1)."""
    from rtdlm_experiments.job.prompt_sets import load_prompts
    from rtdlm_experiments.models import load_model

    model = load_model("qwen2.5-coder-0.5b", dtype="float32", device="cpu")
    texts = [prompt.text for prompt in load_prompts({"name": "default"})]
    rows = [model.tokenizer.encode(text) for text in texts]
    rows = [row[: len(row) - cut] for cut in range(0, 12, 3) for row in rows if len(row) > cut + 1][:batch]
    width = max(map(len, rows))
    history = torch.full((len(rows), width), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        history[i, width - len(row) :] = torch.tensor(row)
    logits = model.forward(history.clamp(min=0), model.new_cache(), (history >= 0).long(), last_positions=1)
    return logits[:, -1].contiguous(), history


def hf_processors(config: SamplingConfig) -> LogitsProcessorList:
    stages = LogitsProcessorList()  # in `_get_logits_processor`'s order (tests/test_stage_orders.py)
    if config.repetition_penalty != 1.0:
        stages.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        stages.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.temperature != 1.0:
        stages.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        stages.append(TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        stages.append(TopPLogitsWarper(config.top_p))
    if config.min_p:
        stages.append(MinPLogitsWarper(config.min_p))
    if config.typical_p < 1.0:
        stages.append(TypicalLogitsWarper(config.typical_p))
    if config.epsilon_cutoff:
        stages.append(EpsilonLogitsWarper(config.epsilon_cutoff))
    if config.eta_cutoff:
        stages.append(EtaLogitsWarper(config.eta_cutoff))
    return stages


ROUNDS = 3
HEADERS = ("config", "B", "ours µs", "HF µs", "HF/ours (spread)", "argmax floor µs", "ours/floor (spread)")


def median_us(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def time_row(
    name: str, config: SamplingConfig, logits: torch.Tensor, history: torch.Tensor, repeats: int
) -> list[str]:
    """One table row: ours, HF and the argmax floor on the same logits, measured alternately."""
    sampler, processors = TokenSampler(config), hf_processors(config)
    hf_history = history.clamp(min=0)  # HF has no padding notion in its processors

    def ours() -> torch.Tensor:
        return sampler.sample(logits, history).tokens

    def hf() -> torch.Tensor:
        return torch.multinomial(torch.softmax(processors(hf_history, logits.clone()), dim=-1), 1)

    def floor() -> torch.Tensor:
        return torch.argmax(logits, dim=-1)

    paths = (ours, hf, floor)
    for fn in paths:  # warm-up
        fn()
    rounds = [[median_us(fn, max(1, repeats // ROUNDS)) for fn in paths] for _ in range(ROUNDS)]
    t_ours, t_hf, t_floor = (statistics.median(times) for times in zip(*rounds, strict=True))
    hf_ratios = [ratio(r[1], r[0]) for r in rounds]
    floor_ratios = [ratio(r[0], r[2]) for r in rounds]
    return [
        name,
        str(logits.shape[0]),
        f"{t_ours:,.0f}",
        f"{t_hf:,.0f}",
        f"{ratio(t_hf, t_ours):.1f}× ({min(hf_ratios):.1f}–{max(hf_ratios):.1f})",
        f"{t_floor:,.0f}",
        f"{ratio(t_ours, t_floor):.1f}× ({min(floor_ratios):.1f}–{max(floor_ratios):.1f})",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logits", choices=["real", "synthetic"], default="real")
    parser.add_argument("--vocab", type=int, default=151_936, help="synthetic logits only")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    if args.logits == "real":
        all_logits, all_history = real_logits(max(args.batches))
        all_history = torch.cat(
            [
                all_history,
                torch.randint(0, all_logits.shape[1], (len(all_history), 256), generator=generator),
            ],
            dim=1,
        )[:, -256:]
    else:
        all_logits = llm_like_logits(max(args.batches), args.vocab, generator)
        all_history = torch.randint(0, args.vocab, (max(args.batches), 256), generator=generator)
    print(
        f"# Sampler, {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(
        f"# {args.logits} logits, vocab {all_logits.shape[1]:,}, history 256 tokens, "
        f"µs per step ({args.repeats} repeats in {ROUNDS} alternating rounds)\n"
    )
    rows = []
    for batch in args.batches:
        for name, config in CONFIGS.items():
            rows.append(time_row(name, config, all_logits[:batch], all_history[:batch], args.repeats))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print(markdown_table(HEADERS, rows))


if __name__ == "__main__":
    main()
