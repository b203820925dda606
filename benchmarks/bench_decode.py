"""Decode speed: our AutoregressiveDecoder vs HF `model.generate`, same model, dtype, prompts and settings.

    HF_HUB_OFFLINE=1 python benchmarks/bench_decode.py [--model qwen2.5-coder-0.5b]
        [--dtypes float32 bfloat16] [--presets deterministic balanced] [--batches 1 8]
        [--max-new-tokens 32] [--repeats 2] [--threads N]

Each row warms both paths up, then times ours, HF, ours, HF, ... and reports medians. tok/s = new tokens
of all rows / wall seconds of the whole call (prefill included). Both produce exactly --max-new-tokens per
row: HF with ``eos_token_id=None``, ours through a copy of the adapter whose ``eos_token_ids`` is ``()``
(`_common.without_eos`). ``deterministic`` is greedy (HF ``do_sample=False``); ``balanced`` is T=0.7,
top-k 50, top-p 0.9, repetition penalty 1.15 on both sides. Prompts: chat-templated code and story
requests, left-padded for batches. Goal (issue): ours/HF ≥ 1.00× greedy, ≥ 1.15× balanced.

The roofline table relates batch-1 speed to memory bandwidth: every forward reads all weights once
(the input embedding table excepted unless it is the tied LM head), so bytes/token × tok/s is the weight
traffic, against a 1 GB ``b.copy_(a)`` (read + written bytes, best of 10, STREAM convention); roofline
tok/s = that bandwidth / weight bytes.

The default grid (2 dtypes × 2 presets × batch 1 and 8, 32 tokens, 2 repeats) takes about 5-10 minutes
on 2 idle cores (progress on stderr).
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch
from _common import (
    DTYPE_SHORT,
    PROMPTS,
    GenerationPath,
    Result,
    Timing,
    encode_prompts,
    fmt,
    hf_generate,
    markdown_table,
    print_header,
    progress,
    quiet_transformers,
    ratio,
    same_tokens,
    time_alternately,
    without_eos,
)

from rtdlm_experiments.models import HFCausalLM, clear_model_cache, load_model
from sampling import SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder

GOALS = {"deterministic": 1.0, "balanced": 1.15}
"""Minimum ours/HF speed ratio per preset, from the issue."""


def batch_prompts(batch: int) -> list[str]:
    """Code and story requests interleaved (code first), cycled to ``batch``."""
    mixed = [text for pair in zip(PROMPTS["code"], PROMPTS["story"], strict=True) for text in pair]
    return [mixed[i % len(mixed)] for i in range(batch)]


def ours(model: HFCausalLM, prompts: list[list[int]], config: SamplingConfig) -> GenerationPath:
    decoder = AutoregressiveDecoder()
    return lambda n: Result(decoder.generate(model, prompts, config, n).token_ids)


def hf(model: HFCausalLM, prompts: list[list[int]], config: SamplingConfig) -> GenerationPath:
    return lambda n: Result(hf_generate(model, prompts, config, n, seed=config.seed or 0))


def weight_bytes_per_forward(model: HFCausalLM) -> int:
    """Bytes of weights one forward reads: every parameter once (tied ones are one tensor), except an
    untied input embedding table, of which a lookup reads only a few rows."""
    total = sum(p.numel() * p.element_size() for p in model.model.parameters())
    embedding = model.model.get_input_embeddings().weight
    if embedding is not model.model.get_output_embeddings().weight:
        total -= embedding.numel() * embedding.element_size()
    return total


def copy_bandwidth(gigabytes: float = 1.0, repeats: int = 10) -> float:
    """GB/s of ``b.copy_(a)`` on ``gigabytes`` of float32, bytes read + written, best of ``repeats``
    (a ceiling, like STREAM: slower copies only measure interference)."""
    a = torch.ones(int(gigabytes * 1e9) // 4)
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


@dataclass
class Measurement:
    """One row: both paths' timings for a (dtype, preset, batch)."""

    dtype: str
    preset: str
    batch: int
    greedy: bool
    ours: Timing
    hf: Timing

    @property
    def speedup(self) -> float:
        return ratio(self.ours.tokens_per_second, self.hf.tokens_per_second)

    def errors(self) -> list[str]:
        label = f"{DTYPE_SHORT[self.dtype]} {self.preset} B={self.batch}"
        return [f"{label} {name}: {t.error}" for name, t in (("ours", self.ours), ("HF", self.hf)) if t.error]


def measure(args: argparse.Namespace, model: HFCausalLM, dtype: str, preset: str, batch: int) -> Measurement:
    progress(f"{DTYPE_SHORT[dtype]} {preset} B={batch}")
    config = get_preset(preset, seed=0)
    prompts = encode_prompts(model, batch_prompts(batch))
    paths = {"ours": ours(model, prompts, config), "hf": hf(model, prompts, config)}
    timings = time_alternately(paths, args.max_new_tokens, args.repeats)
    return Measurement(dtype, preset, batch, config.is_greedy, timings["ours"], timings["hf"])


def result_row(m: Measurement) -> list[str]:
    goal = GOALS[m.preset]
    met = "n/a" if m.speedup != m.speedup else ("✓" if m.speedup >= goal else "✗")
    return [
        DTYPE_SHORT[m.dtype],
        m.preset,
        str(m.batch),
        fmt(m.ours.tokens_per_second),
        fmt(m.hf.tokens_per_second),
        fmt(m.speedup, suffix="×"),
        f"{met} (≥ {goal:.2f}×)",
        same_tokens(m.ours, m.hf) if m.greedy else "—",
    ]


def roofline_row(dtype: str, weight_bytes: int, m: Measurement | None, bandwidth: float) -> list[str]:
    """Weight traffic implied by the batch-1 greedy speeds ``m`` (n/a without such a row)."""
    gb = weight_bytes / 1e9
    cells = [DTYPE_SHORT[dtype], f"{gb:.2f}", fmt(bandwidth / gb)]
    for timing in (m.ours, m.hf) if m else (Timing(), Timing()):
        tps = timing.tokens_per_second
        cells += [fmt(tps), fmt(tps * gb, 1), fmt(100 * tps * gb / bandwidth, 0, "%")]
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPE_SHORT), default=list(DTYPE_SHORT))
    parser.add_argument("--presets", nargs="+", choices=list(GOALS), default=list(GOALS))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per path (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet_transformers()
    started = time.perf_counter()
    print_header(
        f"Decode speed: ours vs HF generate ({args.model})",
        f"{args.max_new_tokens} new tokens per row (EOS ignored), median of {args.repeats} alternating "
        "calls after a warm-up; tok/s over all rows, prefill included.",
    )
    bandwidth = copy_bandwidth()
    measurements: list[Measurement] = []
    roofline: list[list[str]] = []
    for dtype in args.dtypes:
        model = without_eos(load_model(args.model, dtype=dtype, device="cpu"))
        rows = [measure(args, model, dtype, p, b) for p in args.presets for b in args.batches]
        batch1_greedy = next((m for m in rows if m.batch == 1 and m.greedy), None)
        roofline.append(roofline_row(dtype, weight_bytes_per_forward(model), batch1_greedy, bandwidth))
        measurements += rows
        del model
        clear_model_cache()
        gc.collect()

    headers = ["dtype", "preset", "B", "ours tok/s", "HF tok/s", "ours/HF", "goal", "greedy identical"]
    print("\n" + markdown_table(headers, [result_row(m) for m in measurements]))
    print(f"\nCopy bandwidth: {bandwidth:.1f} GB/s (1 GB float32 `b.copy_(a)`, read + write, best of 10).")
    print("Batch-1 greedy weight traffic (GB/s = weight GB per forward × tok/s; tok/s includes prefill):\n")
    roofline_headers = ["dtype", "weights GB/fwd", "roofline tok/s", "ours tok/s", "ours GB/s", "ours % BW"]
    print(markdown_table(roofline_headers + ["HF tok/s", "HF GB/s", "HF % BW"], roofline))
    for error in (e for m in measurements for e in m.errors()):
        print(f"\nERROR {error}")
    print(f"\nTotal benchmark time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
