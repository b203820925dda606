"""Speculative decoding speed: our decoders vs our autoregressive baseline and vs HF assisted generation.

    HF_HUB_OFFLINE=1 python benchmarks/bench_speculative.py [--dtypes float32 bfloat16]
        [--presets deterministic balanced] [--prompts code story]
        [--decoders speculative self_speculative prompt_lookup] [--gammas 2 4 6]
        [--exit-layers 8 14 20] [--self-gamma 4] [--lookup-gammas 2 4] [--max-ngram 3]
        [--policies constant measured] [--min-confidences 0.4] [--num-prompts 2] [--max-new-tokens 48]
        [--repeats 3] [--no-hf] [--threads N] [--device cpu|cuda] [--target NAME] [--draft NAME]
        [--engine torch|llamacpp]

``--prompts humaneval`` takes the first --num-prompts of HumanEval's seeded shuffle as chat requests (the
reply copies the signature and docstring: prompt lookup's case). ``--engine llamacpp`` runs our decoders
on the GGUF weights through llama.cpp (`LlamaCppCausalLM`, --threads llama.cpp threads); it needs --no-hf
and has no self-speculative decoder (no intermediate layers); --dtypes does not apply (Q4_K_M).

Target qwen2.5-coder-1.5b, draft qwen2.5-coder-0.5b, batch 1: ours run the prompts in one generate call
one row at a time (``max_batch_size=1``, as a job does, so the measured policy's costs carry from one
prompt to the next), HF one call per prompt (only HF's "heuristic" schedule carries its draft length from
call to call; its default dynamic one starts each call afresh); tok/s = new tokens of all prompts / their
wall seconds (prefill included). Every path generates exactly --max-new-tokens (EOS ignored on both sides,
see `_common`). Per (dtype, preset, prompt kind) cell every path is warmed up once, then all run in turn,
--repeats times (≥ 3): tok/s and speedups are medians, with the min–max over the repeats beside them (a
speedup is paired per repeat: ours in repeat i over AR in repeat i, which ran moments apart).

Policies (``--policies``): ``constant`` offers γ drafts every round (one row per γ); ``measured`` chooses
γ in 0..γ_max per round from this call's measured cost curve and acceptance (`speculation_policy`), with
γ_max = the largest γ of the decoder's list, and decodes plainly when no γ ≥ 1 is predicted to win; its HF
anchor is HF assisted generation with HF's own dynamic schedule (its defaults). ``--min-confidences c``
adds a measured row whose rows also stop drafting after a draft the draft model gave < c probability
(``min_confidence``, like HF's ``assistant_confidence_threshold``). "off" is the fraction of
rounds it ran with speculation off; "policy pred./meas." its predicted and measured speedup over plain
rounds in the same loop (`accounting.policy_rates`).

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

The default grid (fp32, T=0, code prompts; 2 prompts × 48 tokens; 3 repeats; both policies: 28 paths)
is an estimate of 45-75 minutes on 2 idle cores (not timed), half of it in the self-speculative paths
(ours and HF's); `--exit-layers 14` alone cuts that by a third. Each further (preset, prompt kind) cell
costs as much in fp32, and up to ~3× that in bf16 on CPUs without fast bf16 matmuls (bench_decode.py
shows which); --no-hf halves a cell.
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

from rtdlm_experiments.job.prompt_sets import load_prompts
from rtdlm_experiments.models import HFCausalLM, clear_model_cache, load_model
from rtdlm_experiments.models.engines import llamacpp_settings
from sampling import SamplingConfig, get_preset
from sampling.decoding import (
    AutoregressiveDecoder,
    Decoder,
    GenerateOptions,
    PromptLookupDecoder,
    SelfSpeculativeDecoder,
    SpeculativeDecoder,
    derive_rates,
)

TARGET, DRAFT = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"
DECODERS = ("speculative", "self_speculative", "prompt_lookup")
PRESET_LABELS = {"deterministic": "T=0", "balanced": "balanced"}
PROMPT_KINDS = (*PROMPTS, "humaneval")
NAN = float("nan")


@dataclass
class Cell:
    """One (dtype, preset, prompt kind) block of the grid, on the loaded models."""

    dtype: str
    preset: str
    kind: str
    target: Any  # HFCausalLM, or LlamaCppCausalLM with --engine llamacpp
    draft: Any
    prompts: list[list[int]]
    config: SamplingConfig

    @property
    def label(self) -> str:
        return f"{self.weights} · {PRESET_LABELS[self.preset]} · {self.kind}"

    @property
    def weights(self) -> str:
        return "Q4_K_M" if getattr(self.target, "engine", "torch") == "llamacpp" else DTYPE_SHORT[self.dtype]


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
    """``decoder`` on the target: one generate call for the cell's prompts, one row at a time, as a job
    with ``batch_size=1`` runs them (the measured policy's costs then carry from one prompt to the next).
    EOS is ignored, as on HF's side, so every row generates exactly ``max_new_tokens``."""

    def run(max_new_tokens: int) -> Result:
        out = decoder.generate(
            cell.target,
            cell.prompts,
            cell.config,
            max_new_tokens,
            GenerateOptions(max_batch_size=1, ignore_eos=True),
        )
        return Result(out.token_ids, [out.stats], out.decode_seconds)

    return run


def encode(model: HFCausalLM, texts: list[str]) -> list[list[int]]:
    """Chat-templated prompts; plain encoding for tokenizers without a chat template (the tiny test model)."""
    if hasattr(model.tokenizer, "apply_chat_template"):
        return encode_prompts(model, texts)
    return [model.tokenizer.encode(text) for text in texts]


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
    """Our speculative settings for ``cell``, each with its HF counterpart: per decoder, one row per γ under
    the constant policy and one row under the measured policy (γ_max = the largest γ)."""
    found: list[Variant] = []
    if "speculative" in args.decoders:
        found += speculative_variants(cell, args)
    if "self_speculative" in args.decoders:
        found += self_speculative_variants(cell, args)
    if "prompt_lookup" in args.decoders:
        found += prompt_lookup_variants(cell, args)
    return found


def speculative_variants(cell: Cell, args: argparse.Namespace) -> list[Variant]:
    draft = getattr(cell.draft, "model", None)  # HF's assistant; none on the llama.cpp engine (no HF paths)
    found = []
    if "constant" in args.policies:
        for gamma in args.gammas:
            ours_path = ours(cell, SpeculativeDecoder(cell.draft, num_draft_tokens=gamma))
            hf_path = hf(cell, draft, gamma, assistant_model=draft)
            found.append(Variant("speculative", f"γ={gamma}", ours_path, hf_path))
    if "measured" in args.policies:
        gamma_max = max(args.gammas)
        for confidence in [0.0, *args.min_confidences]:
            decoder = SpeculativeDecoder(
                cell.draft, num_draft_tokens=gamma_max, policy="measured", min_confidence=confidence
            )
            hf_path = hf(cell, assistant_model=draft)  # HF's own dynamic draft length
            setting = f"measured γ≤{gamma_max}" + (f", conf≥{confidence:g}" if confidence else "")
            found.append(Variant("speculative", setting, ours(cell, decoder), hf_path))
    return found


def self_speculative_variants(cell: Cell, args: argparse.Namespace) -> list[Variant]:
    found = []
    target = cell.target.model
    layers = cell.target.num_layers
    for exit_layer in [e for e in args.exit_layers if 1 <= e < layers]:
        for policy in args.policies:
            decoder = SelfSpeculativeDecoder(exit_layer, num_draft_tokens=args.self_gamma, policy=policy)
            if policy == "constant":
                hf_path = hf(cell, target, args.self_gamma, assistant_early_exit=exit_layer)
                setting = f"E={exit_layer}/{layers}, γ={args.self_gamma}"
            else:
                hf_path = hf(cell, assistant_early_exit=exit_layer)
                setting = f"E={exit_layer}/{layers}, measured γ≤{args.self_gamma}"
            found.append(Variant("self_speculative", setting, ours(cell, decoder), hf_path))
    return found


def prompt_lookup_variants(cell: Cell, args: argparse.Namespace) -> list[Variant]:
    found = []
    n = args.max_ngram
    settings = [("constant", g) for g in args.lookup_gammas if "constant" in args.policies]
    if "measured" in args.policies:
        settings.append(("measured", max(args.lookup_gammas)))
    for policy, gamma in settings:
        decoder = PromptLookupDecoder(max_ngram=n, num_draft_tokens=gamma, policy=policy)
        hf_path = hf(cell, prompt_lookup_num_tokens=gamma, max_matching_ngram_size=n)
        label = f"n={n}, γ={gamma}" if policy == "constant" else f"n={n}, measured γ≤{gamma}"
        found.append(Variant("prompt_lookup", label, ours(cell, decoder), hf_path))
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
    stats = pooled_rates(mine)
    return [
        cell.weights,
        PRESET_LABELS[cell.preset],
        cell.kind,
        variant.decoder,
        variant.setting,
        spread(tokens_per_second(ar)),
        spread(tokens_per_second(mine)),
        spread(paired_speedups(mine, ar), "×"),
        fmt(ratio(mine.decode_tokens_per_second, ar.decode_tokens_per_second), suffix="×"),
        fmt(stats.get("predicted_speedup", NAN), suffix="×"),
        fmt(stats.get("policy_predicted_speedup", NAN), suffix="×"),
        fmt(stats.get("policy_measured_speedup", NAN), suffix="×"),
        fmt(stats.get("speculation_off_fraction", NAN)),
        fmt(stats.get("mean_num_draft_tokens", NAN), digits=1),
        fmt(stats.get("acceptance_rate", NAN)),
        fmt(stats.get("analytic_acceptance", NAN)),
        fmt(stats.get("tokens_per_target_forward", NAN)),
        cost_curve(stats),
        spread(tokens_per_second(hf_plain)),
        spread(tokens_per_second(theirs)),
        spread(paired_speedups(theirs, hf_plain), "×"),
        same_tokens(mine, ar) if cell.config.is_greedy else "—",
    ]


def tokens_per_second(timing: Timing) -> list[float]:
    """tok/s of each timed repeat (empty if the path failed)."""
    if timing.error or not timing.results:
        return []
    return [r.num_tokens / s for r, s in zip(timing.results, timing.seconds, strict=True)]


def paired_speedups(timing: Timing, baseline: Timing) -> list[float]:
    """Repeat i of ``timing`` over repeat i of ``baseline`` in tok/s (they ran moments apart)."""
    return [a / b for a, b in zip(tokens_per_second(timing), tokens_per_second(baseline), strict=False)]


def spread(values: list[float], suffix: str = "") -> str:
    """``median (min–max)`` of the repeats, or n/a."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):.2f}{suffix} ({min(values):.2f}–{max(values):.2f})"


def cost_curve(stats: dict[str, float]) -> str:
    """The measured cost of a round scoring k tokens relative to k = 1, e.g. ``1:1.00 3:1.41 5:1.83``."""
    points = sorted(
        (int(key.removeprefix("scoring_cost_ratio_k")), value)
        for key, value in stats.items()
        if key.startswith("scoring_cost_ratio_k") and value == value
    )
    return " ".join(f"{k}:{value:.2f}" for k, value in points) or "n/a"


def speedup(timing: Timing, baseline: Timing) -> float:
    return ratio(timing.tokens_per_second, baseline.tokens_per_second)


HEADERS = [
    "dtype", "preset", "prompts", "decoder", "setting", "AR tok/s", "ours tok/s", "speedup",
    "decode speedup", "predicted", "policy pred.", "policy meas.", "off", "mean γ", "α", "α̂", "τ",
    "cost v(k)/v(1)", "HF tok/s", "HF variant tok/s", "HF speedup", "= AR",
]  # fmt: skip


def pooled_rates(timing: Timing) -> dict[str, float]:
    """α, α̂, τ, c, the predicted speedups and the cost curve over all prompts and repeats (empty if the
    path failed): the additive counts are summed, then `derive_rates`."""
    stats = [s for result in timing.results for s in result.stats]
    if timing.error or not stats:
        return {}
    keys = {key for s in stats for key in s}
    return derive_rates({key: sum(s.get(key, 0.0) for s in stats) for key in keys})


def goals(cell: Cell, found: list[Variant], timings: dict[str, Timing]) -> list[str]:
    """The issue's checks for this cell (fp32 cells): code T=0 best ≥ 1.6× our AR and ≥ HF assisted's best
    ratio; story T=0 and balanced code best ≥ 1.0×; every measured-policy row ≥ 1.0× (never loses)."""
    ar, hf_plain = timings["AR"], timings.get("HF", Timing())
    ours_speedups = {v.name: median_or_nan(paired_speedups(timings[v.name], ar)) for v in found}
    measured = {name: value for name, value in ours_speedups.items() if value == value}  # not NaN
    lines = []
    policy_rows = {name: value for name, value in measured.items() if "measured" in name}
    if policy_rows:
        never_lose = [name for name, value in policy_rows.items() if value >= 1.0]
        lines.append(f"{cell.label}: measured-policy rows ≥ 1.0× AR on {len(never_lose)}/{len(policy_rows)}")
    if not measured or cell.dtype != "float32":
        return lines
    best = max(measured, key=measured.__getitem__)
    goal = {("T=0", "code"): 1.6, ("T=0", "story"): 1.0, ("balanced", "code"): 1.0}.get(
        (PRESET_LABELS[cell.preset], cell.kind)
    )
    if goal is not None:
        met = "✓" if measured[best] >= goal else "✗"
        lines.append(f"{cell.label}: best speedup over AR {measured[best]:.2f}× ({best}) {met} ≥ {goal}×")
    hf_ratios = {
        v.name: median_or_nan(paired_speedups(timings.get(f"HF {v.name}", Timing()), hf_plain)) for v in found
    }
    hf_ratios = {name: value for name, value in hf_ratios.items() if value == value}
    if hf_ratios:
        hf_best = max(hf_ratios, key=hf_ratios.__getitem__)
        met = "✓" if measured[best] >= hf_ratios[hf_best] else "✗"
        lines.append(
            f"{cell.label}: ours {measured[best]:.2f}× vs HF's best ratio {hf_ratios[hf_best]:.2f}× "
            f"(HF {hf_best}) {met}"
        )
    return lines


def median_or_nan(values: list[float]) -> float:
    return statistics.median(values) if values else NAN


# -- main --------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPE_SHORT), default=["float32"])
    parser.add_argument("--presets", nargs="+", choices=list(PRESET_LABELS), default=["deterministic"])
    parser.add_argument("--prompts", nargs="+", choices=PROMPT_KINDS, default=["code"])
    parser.add_argument("--decoders", nargs="+", choices=DECODERS, default=list(DECODERS))
    parser.add_argument("--gammas", type=int, nargs="+", default=[2, 4, 6], help="speculative γ")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[8, 14, 20], help="self-speculative E")
    parser.add_argument(
        "--min-confidences",
        type=float,
        nargs="*",
        default=[],
        help="extra measured-policy speculative rows whose rows stop drafting below this draft probability",
    )
    parser.add_argument("--self-gamma", type=int, default=4, help="self-speculative γ")
    parser.add_argument("--lookup-gammas", type=int, nargs="+", default=[2, 4], help="prompt-lookup γ")
    parser.add_argument("--max-ngram", type=int, default=3, help="prompt-lookup n-gram")
    parser.add_argument(
        "--num-prompts", type=int, default=2, help="prompts per kind (at most 4; humaneval: 164)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--policies", nargs="+", choices=["constant", "measured"], default=["constant", "measured"]
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (median, ≥ 3)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--target", default=TARGET, help="target model (a config name of the model group)")
    parser.add_argument("--draft", default=DRAFT, help="draft model, same tokenizer as the target")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF paths (halves the time)")
    parser.add_argument("--threads", type=int, default=None, help="torch / llama.cpp threads")
    parser.add_argument("--engine", choices=["torch", "llamacpp"], default="torch")
    args = parser.parse_args()
    if args.repeats < 3:
        parser.error("--repeats must be >= 3 (a median and a spread)")
    most = 164 if args.prompts == ["humaneval"] else min(len(p) for p in PROMPTS.values())
    if not 1 <= args.num_prompts <= most:
        parser.error(f"--num-prompts must be in [1, {most}] for --prompts {' '.join(args.prompts)}")
    if args.engine == "llamacpp" and not args.no_hf:
        parser.error("--engine llamacpp needs --no-hf (HF generate runs only on the torch engine)")
    if args.engine == "llamacpp" and "self_speculative" in args.decoders:
        parser.error("--engine llamacpp has no self_speculative decoder (it needs intermediate layers)")
    return args


def load(name: str, dtype: str, args: argparse.Namespace) -> Any:
    """A model on the chosen engine; on torch without EOS, so HF's paths generate every token too."""
    if args.engine == "llamacpp":
        return load_model(name, engine="llamacpp", llamacpp=llamacpp_settings({"n_threads": args.threads}))
    return without_eos(load_model(name, dtype=dtype, device=args.device))


def prompt_texts(kind: str, count: int) -> list[str]:
    """The first ``count`` user messages of a prompt kind (HumanEval: its chat requests, seeded order)."""
    if kind == "humaneval":
        task = {"_target_": "rtdlm_experiments.tasks.code_tasks.HumanEvalTask", "name": "humaneval"}
        return [p.text for p in load_prompts({**task, "limit": count, "chat_template": True})]
    return PROMPTS[kind][:count]


def engine_label(args: argparse.Namespace) -> str:
    if args.engine == "llamacpp":
        return f"llama.cpp engine, {llamacpp_settings({'n_threads': args.threads}).n_threads} threads"
    return f"torch engine on {args.device}"


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quiet_transformers()
    started = time.perf_counter()
    print_header(
        f"Speculative decoding: ours vs AR vs HF assisted (target {args.target}, draft {args.draft})",
        f"{engine_label(args)}, batch 1, {args.num_prompts} prompts per kind × {args.max_new_tokens} new "
        f"tokens (EOS ignored), median (min–max) of {args.repeats} alternating calls after a warm-up; "
        "tok/s include prefill.",
    )
    rows, goal_lines, errors = [], [], []
    for dtype in args.dtypes:
        target, draft = (load(name, dtype, args) for name in (args.target, args.draft))
        for preset in args.presets:
            config = get_preset(preset, seed=0)
            for kind in args.prompts:
                prompts = encode(target, prompt_texts(kind, args.num_prompts))
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
