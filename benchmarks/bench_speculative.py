"""Speculative decoding speed: our decoders vs our autoregressive baseline and vs HF assisted generation.

    HF_HUB_OFFLINE=1 python benchmarks/bench_speculative.py [--dtypes float32 bfloat16]
        [--presets deterministic balanced] [--prompts code story]
        [--decoders speculative self_speculative prompt_lookup] [--gammas 2 4 6]
        [--exit-layers 8 14 20] [--self-gamma 4] [--lookup-gammas 2 4] [--max-ngram 3]
        [--num-prompts 2] [--max-new-tokens 48] [--repeats 1] [--no-hf] [--threads N]

Target qwen2.5-coder-1.5b, draft qwen2.5-coder-0.5b, batch 1: one generate call per prompt, tok/s = new
tokens of all prompts / their wall seconds (prefill included). Every path generates exactly
--max-new-tokens (EOS ignored on both sides, see `_common`). Per (dtype, preset, prompt kind) cell every
path is warmed up once, then all run in turn, --repeats times (medians).

Paths: ``AR`` our AutoregressiveDecoder on the target; ``HF`` plain ``generate``; for each of our decoders
the matching HF feature on the same inputs: SpeculativeDecoder(γ) ↔ ``assistant_model=draft``;
SelfSpeculativeDecoder(E, γ) ↔ ``assistant_early_exit=E`` (HF re-runs the first E layers, no shared
cache); PromptLookupDecoder(n, γ) ↔ ``prompt_lookup_num_tokens=γ, max_matching_ngram_size=n``.
HF reads the draft length from the *assistant's* generation_config, not from ``generate``'s kwargs, so
``num_assistant_tokens=γ``, ``num_assistant_tokens_schedule="constant"`` and
``assistant_confidence_threshold=0`` are set there for the call (HF's default threshold 0.4 would end
drafts early): both sides draft exactly γ tokens per round.

Columns: speedup = ours / AR in tok/s; decode speedup = the same on the decoders' own decode-phase
seconds (prefill excluded, like the prediction); α acceptance rate, α̂ analytic acceptance (mean
Σ min(p, q)), τ tokens per target forward, c draft-step / target-step time, pooled over the prompts;
predicted = Leviathan et al.'s (1 − α^{γ+1}) / ((1 − α)(γc + 1)) from α, γ and c. Decode speedup below
predicted = time lost outside the forwards (sampling, cache cropping, Python); a low α or a high c is
why speculation loses. HF speedup = HF variant / HF plain. "= AR" (greedy only): our output equals our
AR output on every prompt, as lossless decoding must.

The default grid (fp32, T=0, code prompts: the issue's acceptance cell; 2 prompts × 48 tokens, 18 paths)
takes about 15-25 minutes on 2 idle cores, half of it in the self-speculative paths (ours and HF's). Each
further (preset, prompt kind) cell costs as much in fp32, and up to ~3× that in bf16 on CPUs without
fast bf16 matmuls (bench_decode.py shows which); --no-hf halves a cell.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

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
from sampling.decoding import (
    AutoregressiveDecoder,
    Decoder,
    PromptLookupDecoder,
    SelfSpeculativeDecoder,
    SpeculativeDecoder,
)

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
DECODERS = ("speculative", "self_speculative", "prompt_lookup")
PRESET_LABELS = {"deterministic": "T=0", "balanced": "balanced"}
GOAL_SPEEDUP = 1.3
NAN = float("nan")
"""The issue: ≥ 1.3× over our AR decoder in fp32 on code prompts at T=0 (and at least HF's speedup)."""


@dataclass
class Cell:
    """One (dtype, preset, prompt kind) block of the grid, on the loaded models."""

    dtype: str
    preset: str
    kind: str
    target: HFCausalLM
    draft: HFCausalLM
    prompts: list[list[int]]
    config: SamplingConfig

    @property
    def label(self) -> str:
        return f"{DTYPE_SHORT[self.dtype]} · {PRESET_LABELS[self.preset]} · {self.kind}"


@dataclass
class Variant:
    """One of our speculative settings and, if HF has one, its HF counterpart."""

    decoder: str
    setting: str
    ours: GenerationPath
    hf: GenerationPath

    @property
    def name(self) -> str:
        return f"{self.decoder} {self.setting}"


# -- paths -------------------------------------------------------------------------------------------------


def ours(cell: Cell, decoder: Decoder) -> GenerationPath:
    """``decoder`` on the target, one generate call per prompt."""

    def run(max_new_tokens: int) -> Result:
        outs = [decoder.generate(cell.target, [p], cell.config, max_new_tokens) for p in cell.prompts]
        decode_seconds = sum(o.decode_seconds for o in outs)
        return Result([o.token_ids[0] for o in outs], [o.stats for o in outs], decode_seconds)

    return run


def hf(cell: Cell, assistant: Any = None, draft_length: int = 0, **extra: Any) -> GenerationPath:
    """HF ``generate`` on the target, one call per prompt; ``assistant`` (an HF model) drafts
    ``draft_length`` tokens per round when given."""

    def run(max_new_tokens: int) -> Result:
        with fixed_draft_length(assistant, draft_length):
            rows = [
                hf_generate(cell.target, [p], cell.config, max_new_tokens, **extra)[0] for p in cell.prompts
            ]
        return Result(rows)

    return run


@contextmanager
def fixed_draft_length(assistant: Any, draft_length: int) -> Iterator[None]:
    """Make HF draft exactly ``draft_length`` tokens per round with ``assistant`` (no-op without one)."""
    if assistant is None:
        yield
        return
    config = assistant.generation_config
    fixed = {
        "num_assistant_tokens": draft_length,
        "num_assistant_tokens_schedule": "constant",
        "assistant_confidence_threshold": 0.0,
    }
    saved = {key: getattr(config, key, None) for key in fixed}
    for key, value in fixed.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(config, key, value)


def variants(cell: Cell, args: argparse.Namespace) -> list[Variant]:
    """Our speculative settings for ``cell``, each with its HF counterpart."""
    target, draft = cell.target.model, cell.draft.model
    found: list[Variant] = []
    if "speculative" in args.decoders:
        for gamma in args.gammas:
            ours_path = ours(cell, SpeculativeDecoder(cell.draft, num_draft_tokens=gamma))
            hf_path = hf(cell, draft, gamma, assistant_model=draft)
            found.append(Variant("speculative", f"γ={gamma}", ours_path, hf_path))
    if "self_speculative" in args.decoders:
        for exit_layer in args.exit_layers:
            decoder = SelfSpeculativeDecoder(exit_layer, num_draft_tokens=args.self_gamma)
            hf_path = hf(cell, target, args.self_gamma, assistant_early_exit=exit_layer)
            setting = f"E={exit_layer}/{cell.target.num_layers}, γ={args.self_gamma}"
            found.append(Variant("self_speculative", setting, ours(cell, decoder), hf_path))
    if "prompt_lookup" in args.decoders:
        for gamma in args.lookup_gammas:
            decoder = PromptLookupDecoder(max_ngram=args.max_ngram, num_draft_tokens=gamma)
            hf_path = hf(cell, prompt_lookup_num_tokens=gamma, max_matching_ngram_size=args.max_ngram)
            found.append(
                Variant("prompt_lookup", f"n={args.max_ngram}, γ={gamma}", ours(cell, decoder), hf_path)
            )
    return found


# -- measuring and reporting -------------------------------------------------------------------------------


def measure(cell: Cell, args: argparse.Namespace) -> tuple[list[list[str]], list[str], list[str]]:
    """Time every path of ``cell`` alternately; returns table rows, goal lines and errors."""
    progress(f"{cell.label}: {len(cell.prompts)} prompts × {args.max_new_tokens} tokens")
    found = variants(cell, args)
    paths: dict[str, GenerationPath] = {"AR": ours(cell, AutoregressiveDecoder())}
    if not args.no_hf:
        paths["HF"] = hf(cell)
    for v in found:
        paths[v.name] = v.ours
        if not args.no_hf:
            paths[f"HF {v.name}"] = v.hf
    timings = time_alternately(paths, args.max_new_tokens, args.repeats)
    errors = [f"{cell.label} · {name}: {t.error}" for name, t in timings.items() if t.error]
    return [row(cell, v, timings) for v in found], goals(cell, found, timings), errors


def row(cell: Cell, variant: Variant, timings: dict[str, Timing]) -> list[str]:
    ar, mine = timings["AR"], timings[variant.name]
    hf_plain, theirs = timings.get("HF", Timing()), timings.get(f"HF {variant.name}", Timing())
    stats = pooled_rates(mine.result)
    return [
        DTYPE_SHORT[cell.dtype],
        PRESET_LABELS[cell.preset],
        cell.kind,
        variant.decoder,
        variant.setting,
        fmt(ar.tokens_per_second),
        fmt(mine.tokens_per_second),
        fmt(speedup(mine, ar), suffix="×"),
        fmt(ratio(mine.decode_tokens_per_second, ar.decode_tokens_per_second), suffix="×"),
        fmt(stats.get("predicted_speedup", NAN), suffix="×"),
        fmt(stats.get("acceptance_rate", NAN)),
        fmt(stats.get("analytic_acceptance", NAN)),
        fmt(stats.get("tokens_per_target_forward", NAN)),
        fmt(stats.get("cost_ratio", NAN)),
        fmt(hf_plain.tokens_per_second),
        fmt(theirs.tokens_per_second),
        fmt(speedup(theirs, hf_plain), suffix="×"),
        same_tokens(mine, ar) if cell.config.is_greedy else "—",
    ]


def speedup(timing: Timing, baseline: Timing) -> float:
    return ratio(timing.tokens_per_second, baseline.tokens_per_second)


HEADERS = [
    "dtype", "preset", "prompts", "decoder", "setting", "AR tok/s", "ours tok/s", "speedup",
    "decode speedup", "predicted", "α", "α̂", "τ", "c", "HF tok/s", "HF variant tok/s", "HF speedup", "= AR",
]  # fmt: skip


def pooled_rates(result: Result | None) -> dict[str, float]:
    """α, α̂, τ, c and the predicted speedup over all prompts (empty if the path failed).

    Decoders that report additive counts are pooled exactly (counts summed, then `derive_rates`); decoders
    that report per-call rates (before `sampling.decoding.accounting` existed) get each rate averaged.
    """
    if result is None or not result.stats:
        return {}
    try:
        from sampling.decoding import derive_rates
    except ImportError:  # per-call rates only
        derive_rates = None
    if derive_rates is not None:
        summed = {key: sum(s.get(key, 0.0) for s in result.stats) for key in result.stats[0]}
        if rates := derive_rates(summed):
            return rates
    return {key: statistics.fmean(s[key] for s in result.stats) for key in result.stats[0]}


def goals(cell: Cell, found: list[Variant], timings: dict[str, Timing]) -> list[str]:
    """The issue's checks for this cell: ≥ 1.3× over AR (fp32, T=0, code); our speedup ≥ HF's, per variant."""
    ar, hf_plain = timings["AR"], timings.get("HF", Timing())
    ours_speedups = {v.name: speedup(timings[v.name], ar) for v in found}
    measured = {name: value for name, value in ours_speedups.items() if value == value}  # not NaN
    lines = []
    if measured and cell.dtype == "float32" and cell.config.is_greedy and cell.kind == "code":
        best = max(measured, key=measured.__getitem__)
        met = "✓" if measured[best] >= GOAL_SPEEDUP else "✗"
        lines.append(
            f"{cell.label}: best speedup over AR {measured[best]:.2f}× ({best}) {met} ≥ {GOAL_SPEEDUP}×"
        )
    compared = [v.name for v in found if f"HF {v.name}" in timings]
    if compared:
        wins = [name for name in compared if ours_speedups[name] >= speedup(timings[f"HF {name}"], hf_plain)]
        listed = ", ".join(wins) or "none"
        lines.append(f"{cell.label}: our speedup ≥ HF's on {len(wins)}/{len(compared)} variants ({listed})")
    return lines


# -- main --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPE_SHORT), default=["float32"])
    parser.add_argument("--presets", nargs="+", choices=list(PRESET_LABELS), default=["deterministic"])
    parser.add_argument("--prompts", nargs="+", choices=list(PROMPTS), default=["code"])
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6], help="speculative γ")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[8, 14, 20], help="self-speculative E")
    parser.add_argument("--self-gamma", type=int, default=4, help="self-speculative γ")
    parser.add_argument("--lookup-gammas", type=int, nargs="+", default=[2, 4], help="prompt-lookup γ")
    parser.add_argument("--max-ngram", type=int, default=3, help="prompt-lookup n-gram")
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts per kind (at most 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per path (median)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF paths (halves the time)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if not 1 <= args.num_prompts <= min(len(p) for p in PROMPTS.values()):
        parser.error(f"--num-prompts must be in [1, {min(len(p) for p in PROMPTS.values())}]")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet_transformers()
    started = time.perf_counter()
    print_header(
        f"Speculative decoding: ours vs AR vs HF assisted (target {TARGET}, draft {DRAFT})",
        f"batch 1, {args.num_prompts} prompts per kind × {args.max_new_tokens} new tokens (EOS ignored), "
        f"median of {args.repeats} alternating call(s) after a warm-up; tok/s include prefill.",
    )
    rows, goal_lines, errors = [], [], []
    for dtype in args.dtypes:
        target = without_eos(load_model(TARGET, dtype=dtype, device="cpu"))
        draft = load_model(DRAFT, dtype=dtype, device="cpu")
        for preset in args.presets:
            config = get_preset(preset, seed=0)
            for kind in args.prompts:
                prompts = encode_prompts(target, PROMPTS[kind][: args.num_prompts])
                cell = Cell(dtype, preset, kind, target, draft, prompts, config)
                cell_rows, cell_goals, cell_errors = measure(cell, args)
                rows += cell_rows
                goal_lines += cell_goals
                errors += cell_errors
        del target, draft
        clear_model_cache()
        gc.collect()

    print(markdown_table(HEADERS, rows))
    if goal_lines:
        print("\nGoals:\n" + "\n".join(f"- {line}" for line in goal_lines))
    for error in errors:
        print(f"\nERROR {error}")
    print(f"\nTotal benchmark time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
