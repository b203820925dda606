"""Engines: torch (dequantized fp32 weights) vs llama.cpp (the GGUF's Q4_K_M weights), same decoder + sampler.

    HF_HUB_OFFLINE=1 python benchmarks/bench_engines.py [--models qwen2.5-coder-0.5b qwen2.5-coder-1.5b]
        [--batch-sizes 1 4 16 32] [--presets deterministic balanced] [--new-tokens 64] [--repeats 3]
        [--threads N] [--agreement-tokens 32]

Per (model, B, preset), B chat prompts (code and story, cycled), exactly ``--new-tokens`` new tokens per
row (EOS ignored), one static batch. Paths, timed alternately in each repeat:

- ``torch``: our `AutoregressiveDecoder` on the torch engine;
- ``llamacpp``: the same decoder on the llama.cpp engine (`LlamaCppCausalLM`), our `TokenSampler`;
- ``anchor``: llama.cpp's own sampler chain (greedy, or penalties → temp → top-k → top-p → dist for
  balanced) through the same binding, on the same batch and context: what llama.cpp alone reaches.

decode tok/s = rows × new tokens / decode seconds (each step: one forward + one draw); prefill tok/s =
prompt tokens / prefill seconds; sampler share = sampler seconds / decode seconds. Each is the median
[min–max] over repeats; ratios are taken per repeat (same round) and summarized the same way. Goals
(issue 23): llama.cpp ≥ 5× torch at B = 1 and ≥ 3× at the default batch (16); ours within 20% of the
anchor; sampler ≤ 5% of a step at the default batch for every preset.

``--agreement-tokens`` > 0 also measures greedy agreement of the two engines on the bundled ``default``
prompts: per prompt the first position where the greedy tokens differ, and the fraction of positions
that agree, reported (not asserted: Q4_K_M kernels vs dequantized fp32 differ by design).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from _common import PROMPTS, encode_prompts, markdown_table, print_header, progress

from rtdlm_experiments.job.prompt_sets import load_prompts
from rtdlm_experiments.models import load_model
from rtdlm_experiments.models.engines import LlamaCppSettings
from sampling import SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder, GenerateOptions

DEFAULT_BATCH = 16


@dataclass
class Runs:
    """Per repeat: decode tok/s, prefill tok/s, sampler share of the decode time."""

    decode: list[float] = field(default_factory=list)
    prefill: list[float] = field(default_factory=list)
    share: list[float] = field(default_factory=list)


def spread(values: Sequence[float], digits: int = 1) -> str:
    """``median [min–max]``.

    >>> spread([1.0, 3.0, 2.0])
    '2.0 [1.0–3.0]'
    """
    if not values:
        return "n/a"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def ours(model, prompts: list[list[int]], config: SamplingConfig, new_tokens: int, runs: Runs) -> None:
    out = AutoregressiveDecoder().generate(
        model, prompts, config, new_tokens, GenerateOptions(row_seeds=range(len(prompts)), ignore_eos=True)
    )
    runs.decode.append(out.num_new_tokens / out.decode_seconds)
    runs.prefill.append(sum(map(len, prompts)) / out.prefill_seconds)
    runs.share.append(out.sampler_seconds / out.decode_seconds)


def _chain(lib, config: SamplingConfig, seed: int, model_vocab: int):
    params = lib.llama_sampler_chain_default_params()
    chain = lib.llama_sampler_chain_init(params)
    if config.is_greedy:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain
    if config.repetition_penalty != 1.0:
        penalties = lib.llama_sampler_init_penalties(model_vocab, -1, config.repetition_penalty, 0.0, 0.0)
        lib.llama_sampler_chain_add(chain, penalties)
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(config.temperature))
    if config.top_k:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_k(config.top_k))
    if config.top_p < 1.0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(config.top_p, 1))
    lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
    return chain


def anchor(model, prompts: list[list[int]], config: SamplingConfig, new_tokens: int, runs: Runs) -> None:
    """llama.cpp alone: prefill all rows, then per step its sampler chain per row and one batched decode."""
    lib, rows = model._lib, len(prompts)
    cache = model.new_cache()
    cache.ensure_rows(rows)  # takes the sequence ids (ascending with the rows); freed with the cache
    seqs = np.asarray(cache.seq_ids, dtype=np.int32)
    chains = [_chain(lib, config, seed, model.vocab_size) for seed in range(rows)]
    try:
        start = time.perf_counter()
        drawn = _prefill_and_draw(model, prompts, seqs, chains)
        prefilled = time.perf_counter()
        lengths = np.asarray([len(p) for p in prompts], dtype=np.int32)
        for step in range(1, new_tokens):
            model._batch.fill(drawn, lengths + step - 1, seqs, np.ones(rows, dtype=np.int8))
            if lib.llama_decode(model._ctx, model._batch.struct) != 0:
                raise RuntimeError("llama_decode failed")
            drawn = np.asarray([lib.llama_sampler_sample(chains[r], model._ctx, r) for r in range(rows)])
            drawn = drawn.astype(np.int32)
        done = time.perf_counter()
    finally:
        for chain in chains:
            lib.llama_sampler_free(chain)
        cache.release()
    runs.decode.append(rows * (new_tokens - 1) / (done - prefilled))
    runs.prefill.append(sum(map(len, prompts)) / (prefilled - start))
    runs.share.append(float("nan"))


def _prefill_and_draw(model, prompts: list[list[int]], seqs: np.ndarray, chains: list) -> np.ndarray:
    """Every prompt through llama.cpp in batches of n_batch tokens; each row's first token drawn by its
    chain right after the batch holding the row's last prompt token."""
    lib, chunk = model._lib, model._batch.capacity
    tokens = np.concatenate([np.asarray(p, dtype=np.int32) for p in prompts])
    positions = np.concatenate([np.arange(len(p), dtype=np.int32) for p in prompts])
    owners = np.concatenate([np.full(len(p), r, dtype=np.int32) for r, p in enumerate(prompts)])
    outputs = np.zeros(len(tokens), dtype=np.int8)
    outputs[np.cumsum([len(p) for p in prompts]) - 1] = 1
    drawn = np.zeros(len(prompts), dtype=np.int32)
    for start in range(0, len(tokens), chunk):
        part = slice(start, start + chunk)
        model._batch.fill(tokens[part], positions[part], seqs[owners[part]], outputs[part])
        if lib.llama_decode(model._ctx, model._batch.struct) != 0:
            raise RuntimeError("llama_decode failed")
        for index in np.flatnonzero(outputs[part]).tolist():
            row = int(owners[start + index])
            drawn[row] = lib.llama_sampler_sample(chains[row], model._ctx, index)
    return drawn


def run_cell(paths: dict[str, Callable[[Runs], None]], repeats: int) -> dict[str, Runs]:
    """Warm every path once, then run them alternately ``repeats`` times."""
    results = {name: Runs() for name in paths}
    for path in paths.values():
        path(Runs())
    for _ in range(repeats):
        for name, path in paths.items():
            path(results[name])
    return results


def ratios(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(top, bottom, strict=True) if b > 0]


def greedy_agreement(torch_model, llama_model, tokens: int) -> list[list[str]]:
    """Per bundled default prompt: first differing position and fraction identical, greedy, EOS ignored."""
    texts = [prompt.text for prompt in load_prompts({"name": "default"})]
    prompts = encode_prompts(torch_model, texts)
    config, decoder = get_preset("deterministic"), AutoregressiveDecoder()
    rows = []
    outs = [
        decoder.generate(
            m, prompts, config, tokens, GenerateOptions(ignore_eos=True, max_batch_size=8)
        ).token_ids
        for m in (torch_model, llama_model)
    ]
    for text, a, b in zip(texts, *outs, strict=True):
        differ = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        same = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
        rows.append([text[:40], "none" if differ is None else str(differ), f"{same:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4, 16, 32])
    parser.add_argument("--presets", nargs="+", default=["deterministic", "balanced"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--agreement-tokens", type=int, default=0)
    parser.add_argument("--note", default="", help="conditions to print in the header (e.g. under load)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = args.threads or torch.get_num_threads()
    settings = LlamaCppSettings(n_threads=threads, n_ctx=1024, n_seq_max=max(args.batch_sizes))
    print_header(
        "Engines: torch vs llama.cpp (bench_engines.py)",
        f"{args.new_tokens} new tokens per row, EOS ignored, static batch of B chat prompts · "
        f"{args.repeats} repeats after a warm-up · llama.cpp {threads} threads · {args.note}",
    )
    for name in args.models:
        torch_model = load_model(name, dtype="float32", device="cpu", engine="torch")
        llama_model = load_model(name, engine="llamacpp", llamacpp=settings)
        table = []
        for preset in args.presets:
            config = get_preset(preset, seed=0)
            for batch in args.batch_sizes:
                texts = [(PROMPTS["code"] + PROMPTS["story"])[i % 8] for i in range(batch)]
                prompts = encode_prompts(torch_model, texts)
                progress(f"{name} {preset} B={batch}")
                job = (prompts, config, args.new_tokens)
                cell = run_cell(
                    {
                        "torch": lambda r, m=torch_model, j=job: ours(m, *j, r),
                        "llamacpp": lambda r, m=llama_model, j=job: ours(m, *j, r),
                        "anchor": lambda r, m=llama_model, j=job: anchor(m, *j, r),
                    },
                    args.repeats,
                )
                t, ll, an = cell["torch"], cell["llamacpp"], cell["anchor"]
                table.append([
                    preset, str(batch), spread(t.decode), spread(ll.decode), spread(an.decode),
                    spread(ratios(ll.decode, t.decode), 2), spread(ratios(ll.decode, an.decode), 2),
                    spread(t.prefill, 0), spread(ll.prefill, 0),
                    spread([100 * s for s in t.share]), spread([100 * s for s in ll.share]),
                ])  # fmt: skip
                progress(" | ".join(table[-1]))  # each row as soon as it is measured
        print(f"## {name}\n")
        print(markdown_table(
            ["preset", "B", "torch decode tok/s", "llama.cpp (ours) tok/s", "llama.cpp anchor tok/s",
             "llama.cpp / torch", "ours / anchor", "torch prefill tok/s", "llama.cpp prefill tok/s",
             "sampler % torch", "sampler % llama.cpp"],
            table,
        ))  # fmt: skip
        if args.agreement_tokens:
            print(f"\n### Greedy agreement, {name}, {args.agreement_tokens} tokens\n")
            rows = greedy_agreement(torch_model, llama_model, args.agreement_tokens)
            print(markdown_table(["prompt", "first divergence", "fraction identical"], rows))
        print()


if __name__ == "__main__":
    main()
