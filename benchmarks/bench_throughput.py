"""Job throughput: refill batching vs static batches (ours, and HF `generate`) on rows of varied length.

    HF_HUB_OFFLINE=1 python benchmarks/bench_throughput.py [--model qwen2.5-coder-0.5b] [--dtype float32]
        [--prompt-set default|humaneval] [--preset balanced] [--prompts 16] [--samples 2]
        [--max-new-tokens 128] [--batch-sizes 4 8 16 32] [--modes eos fixed] [--repeats 3] [--threads N]

What a user waits for is a whole job: every (prompt, sample) row, each stopping at its own EOS. The job
here is a prompt set as chat turns, ``--samples`` rows per prompt (own seed each), up to
``--max-new-tokens`` new tokens: the bundled ``default`` set (open answers, ended by EOS), or the
``humaneval`` problems, whose replies also end at the code block's closing fence (the runner's stop
string for that set; HF gets it as ``stop_strings``), so their lengths vary widely, as in a code sweep.
Three paths generate it with ``B`` rows at a time:

- ``refill``: one `AutoregressiveDecoder.generate` call for all rows with ``max_batch_size=B`` (a
  finished row's slot is refilled with the next pending row);
- ``static``: our decoder called once per chunk of B rows (the next chunk waits for the chunk's longest);
- ``HF``: HF `generate` once per chunk of B rows (left-padded, stops at EOS), tokens counted up to EOS.

Mode ``eos`` stops rows at EOS and the set's stop strings (lengths vary); mode ``fixed`` is the control
where lengths do not vary (``ignore_eos``, no stop strings; HF with ``eos_token_id=None``): refill should
then not lose to static batching.
Each (mode, B) warms the paths up, then times refill, static, HF, refill, ... ``--repeats`` times.
tok/s = new tokens of the job / wall seconds (prefill included): median [min–max] over repeats; ratios
are per round (same repeat) then median [min–max]. Goal (issue 13): refill ≥ 1.3× static and ≥ 1.3× HF
at the job's default batch size when lengths vary; no loss when they do not. The default grid takes
very long on 2 cores (3 paths × 4 batch sizes × 2 modes × 4 calls of 32 rows × 128 tokens): shrink it
with --batch-sizes, --prompts, --samples, --max-new-tokens, --repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch
from _common import (
    DTYPE_SHORT,
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
    same_tokens,
    time_alternately,
)

from rtdlm_experiments.job.prompt_sets import load_prompts, stop_strings
from rtdlm_experiments.models import HFCausalLM, load_model
from sampling import PRESETS, SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder, GenerateOptions, merge_outputs
from sampling.decoding.stopping import StopStrings

GOAL = 1.3
"""Minimum refill speedup over static batching and over HF when lengths vary (issue 13)."""
MODES = {
    "eos": "lengths vary (EOS and the set's stop strings end rows)",
    "fixed": "lengths fixed (ignore EOS and stop strings)",
}


@dataclass(frozen=True)
class Job:
    """The rows of one job: prompt token ids, a seed per row, and the strings that end a row early."""

    prompts: list[list[int]]
    seeds: list[int]
    config: SamplingConfig
    stop_strings: tuple[str, ...] = ()


def build_job(
    model: HFCausalLM, prompt_set: str, prompt_count: int | None, samples: int, config: SamplingConfig
) -> Job:
    """A prompt set's first ``prompt_count`` prompts, chat-templated, each repeated ``samples`` times with
    its own seed; stop strings as the runner sets them for that set (chat mode)."""
    selection = {"name": prompt_set, "limit": prompt_count, "chat_template": True}
    encoded = encode_prompts(model, [p.text for p in load_prompts(selection)])
    prompts = [ids for ids in encoded for _ in range(samples)]
    return Job(prompts, list(range(len(prompts))), config, stop_strings(selection))


def our_stop_strings(model: HFCausalLM, job: Job, ignore_eos: bool) -> StopStrings | None:
    """The job's stop strings for our decoder (None in the fixed-length control or when the set has none)."""
    if ignore_eos or not job.stop_strings:
        return None
    return StopStrings.with_tokenizer(job.stop_strings, model.tokenizer)


def hf_stop_kwargs(model: HFCausalLM, job: Job, ignore_eos: bool) -> dict[str, object]:
    """The same stop strings for HF `generate` (which needs the tokenizer to match them)."""
    if ignore_eos or not job.stop_strings:
        return {}
    return {"stop_strings": list(job.stop_strings), "tokenizer": model.tokenizer}


def chunks(job: Job, size: int) -> list[slice]:
    return [slice(start, start + size) for start in range(0, len(job.prompts), size)]


def refill_path(model: HFCausalLM, job: Job, size: int, ignore_eos: bool) -> GenerationPath:
    decoder = AutoregressiveDecoder()
    stops = our_stop_strings(model, job, ignore_eos)

    def run(n: int) -> Result:
        out = decoder.generate(
            model,
            job.prompts,
            job.config,
            n,
            GenerateOptions(
                row_seeds=job.seeds, ignore_eos=ignore_eos, stop_strings=stops, max_batch_size=size
            ),
        )
        return Result(out.token_ids, decode_seconds=out.decode_seconds)

    return run


def static_path(model: HFCausalLM, job: Job, size: int, ignore_eos: bool) -> GenerationPath:
    decoder = AutoregressiveDecoder()
    stops = our_stop_strings(model, job, ignore_eos)

    def run(n: int) -> Result:
        outs = [
            decoder.generate(
                model,
                job.prompts[part],
                job.config,
                n,
                GenerateOptions(row_seeds=job.seeds[part], ignore_eos=ignore_eos, stop_strings=stops),
            )
            for part in chunks(job, size)
        ]
        out = merge_outputs(outs)
        return Result(out.token_ids, decode_seconds=out.decode_seconds)

    return run


def hf_path(model: HFCausalLM, job: Job, size: int, ignore_eos: bool) -> GenerationPath:
    seed = job.config.seed or 0
    stops = hf_stop_kwargs(model, job, ignore_eos)
    return lambda n: Result(
        [
            row
            for part in chunks(job, size)
            for row in hf_generate(
                model, job.prompts[part], job.config, n, seed, stop_at_eos=not ignore_eos, **stops
            )
        ]
    )


@dataclass
class Measurement:
    """One (mode, batch size): the three paths' timings."""

    mode: str
    batch: int
    timings: dict[str, Timing]


def measure(model: HFCausalLM, job: Job, mode: str, size: int, args: argparse.Namespace) -> Measurement:
    progress(f"{mode} B={size}")
    ignore_eos = mode == "fixed"
    paths = {
        "refill": refill_path(model, job, size, ignore_eos),
        "static": static_path(model, job, size, ignore_eos),
        "HF": hf_path(model, job, size, ignore_eos),
    }
    return Measurement(mode, size, time_alternately(paths, args.max_new_tokens, args.repeats))


def rates(timing: Timing) -> list[float]:
    """tok/s of each timed call."""
    return [r.num_tokens / s for r, s in zip(timing.results, timing.seconds, strict=True)]


def spread(values: list[float], digits: int = 1, suffix: str = "") -> str:
    """``median [min–max]``, or n/a."""
    if not values:
        return "n/a"
    median = statistics.median(values)
    return f"{fmt(median, digits, suffix)} [{fmt(min(values), digits)}–{fmt(max(values), digits)}]"


def per_round_ratios(numerator: Timing, denominator: Timing) -> list[float]:
    """Speed ratio of two paths in each round (their calls alternate, so each round shares the load)."""
    return [a / b for a, b in zip(rates(numerator), rates(denominator), strict=False) if b > 0]


def result_row(m: Measurement) -> list[str]:
    refill, static, hf = (m.timings[name] for name in ("refill", "static", "HF"))
    over_static, over_hf = per_round_ratios(refill, static), per_round_ratios(refill, hf)
    lengths = [len(row) for row in refill.result.token_ids] if refill.result else []
    if m.mode == "eos":
        met = all(statistics.median(r) >= GOAL for r in (over_static, over_hf) if r) and bool(over_hf)
        goal = f"{'✓' if met else '✗'} (≥ {GOAL}×)"
    else:
        met = bool(over_static) and statistics.median(over_static) >= 1.0
        goal = f"{'✓' if met else '✗'} (≥ 1.0× static)"
    return [
        m.mode,
        str(m.batch),
        f"{fmt(statistics.mean(lengths), 0) if lengths else 'n/a'} / {max(lengths, default=0)}",
        spread(rates(refill)),
        spread(rates(static)),
        spread(rates(hf)),
        spread(over_static, 2, "×"),
        spread(over_hf, 2, "×"),
        goal,
        same_tokens(refill, static),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--dtype", choices=list(DTYPE_SHORT), default="float32")
    parser.add_argument("--prompt-set", choices=["default", "humaneval"], default="default")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="balanced")
    parser.add_argument("--prompts", type=int, default=None, help="first N prompts of the set (default: all)")
    parser.add_argument("--samples", type=int, default=2, help="rows per prompt, each with its own seed")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per path (median, spread)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_transformers()
    started = time.perf_counter()
    model = load_model(args.model, dtype=args.dtype, device="cpu")
    job = build_job(model, args.prompt_set, args.prompts, args.samples, get_preset(args.preset, seed=0))
    print_header(
        f"Job throughput: refill vs static batches vs HF generate ({args.model}, {DTYPE_SHORT[args.dtype]})",
        f"{len(job.prompts)} rows ({args.prompt_set} prompts × {args.samples} seeds"
        f"{', stop strings ' + repr(job.stop_strings) if job.stop_strings else ''}), preset {args.preset}, "
        f"up to {args.max_new_tokens} new tokens; median [min–max] of {args.repeats} alternating calls "
        "after a warm-up; tok/s over the whole job, prefill included.",
    )
    measurements = [measure(model, job, mode, b, args) for mode in args.modes for b in args.batch_sizes]
    headers = ["lengths", "B", "mean / max tokens", "refill tok/s", "static tok/s", "HF tok/s"]
    headers += ["refill/static", "refill/HF", "goal", "refill = static tokens"]
    print(markdown_table(headers, [result_row(m) for m in measurements]))
    print("\nlengths: " + "; ".join(f"{k} = {v}" for k, v in MODES.items()))
    for m in measurements:
        for name, timing in m.timings.items():
            if timing.error:
                print(f"\nERROR {m.mode} B={m.batch} {name}: {timing.error}")
    print(f"\nTotal benchmark time: {(time.perf_counter() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
