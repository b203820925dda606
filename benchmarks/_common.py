"""Helpers shared by the decode benchmarks: header, prompts, HF `generate` with our sampling settings, and
alternating wall-clock timing of several generation paths on the same inputs."""

from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rtdlm_experiments.analysis.markdown import (
    markdown_table as markdown_table,  # re-exported for the bench scripts
)
from rtdlm_experiments.models import HFCausalLM
from sampling import ORDERS, SamplingConfig
from sampling._numeric import ratio as ratio  # re-exported: the bench scripts import it from here
from sampling.decoding.base import left_pad

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models load from the local cache only; never the hub

PROMPTS: dict[str, list[str]] = {
    # Predictable continuations: short, idiomatic functions, and an edit of given code (prompt lookup's case).
    "code": [
        "Write a Python function that checks whether a number is prime.",
        "Add type hints and a docstring to this function, and keep its logic:\n\n```python\n"
        "def mean(values):\n    total = 0\n    for value in values:\n        total += value\n"
        "    return total / len(values)\n```",
        "Write a Python function that returns the n-th Fibonacci number using iteration.",
        "Write a Python function that performs binary search on a sorted list.",
    ],
    "story": [
        "Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "Tell a bedtime story about a robot who is afraid of the dark.",
        "Write the opening paragraph of a science-fiction story set on a generation ship.",
        "Write a short story about two friends lost in a snowy forest.",
    ],
}
"""User messages, wrapped in the model's chat template by `encode_prompts`."""

DTYPE_SHORT = {"float32": "fp32", "bfloat16": "bf16"}


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else whatever `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_header(title: str, details: str) -> None:
    """``# title`` then one line: date, CPU, threads, torch/transformers versions; then ``details``."""
    import transformers

    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    print(f"# {title}\n")
    print(
        f"{now} · {cpu_model()} ({os.cpu_count()} logical CPUs) · {torch.get_num_threads()} torch threads · "
        f"torch {torch.__version__} · transformers {transformers.__version__}  "
    )
    print(f"{details}\n")


def quiet_transformers() -> None:
    """Silence transformers' per-call warnings (eos unset, generation flags) that would flood the tables."""
    import transformers

    transformers.logging.set_verbosity_error()


def encode_prompts(model: HFCausalLM, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each user message wrapped in the tokenizer's chat template (assistant turn opened)."""
    tokenizer = model.tokenizer
    encoded = []
    for text in texts:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        encoded.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    return encoded


def without_eos(model: HFCausalLM) -> HFCausalLM:
    """A shallow copy of the adapter (same weights) that never stops on EOS, so every row of our decoders
    generates exactly ``max_new_tokens`` tokens, like HF `generate` with ``eos_token_id=None``."""
    clone = copy.copy(model)
    clone.eos_token_ids = ()
    return clone


# -- HF generate with our settings -------------------------------------------------------------------------


def hf_sampling_kwargs(config: SamplingConfig) -> dict[str, Any]:
    """HF `generate` arguments equivalent to ``config`` (HF's stage order; penalties only by repetition)."""
    if config.frequency_penalty or config.presence_penalty or config.repetition_window is not None:
        raise ValueError("HF generate has no frequency/presence penalty or repetition window")
    if config.stages != tuple(stage for stage in ORDERS["hf"] if stage in config.stages):
        raise ValueError(f"stages {config.stages} are not in HF's order {ORDERS['hf']}: use order='hf'")
    kwargs: dict[str, Any] = {"repetition_penalty": config.repetition_penalty}
    if config.is_greedy:
        return {**kwargs, "do_sample": False}
    return {
        **kwargs,
        "do_sample": True,
        "temperature": config.temperature,
        "top_k": config.top_k,
        "top_p": config.top_p,
        "min_p": config.min_p or None,
    }


def hf_generate(
    model: HFCausalLM,
    prompt_ids: list[list[int]],
    config: SamplingConfig,
    max_new_tokens: int,
    seed: int = 0,
    stop_at_eos: bool = False,
    **extra: Any,
) -> list[list[int]]:
    """HF `model.generate` on a left-padded batch: exactly ``max_new_tokens`` new tokens per row, or with
    ``stop_at_eos`` rows that end at the model's EOS (each cut before it).

    ``extra`` goes to `generate` as is (``assistant_model=``, ``prompt_lookup_num_tokens=``, ...).
    """
    tokenizer = model.tokenizer
    eos = list(model.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    input_ids, attention_mask = left_pad(prompt_ids, pad)
    width = input_ids.shape[1]
    exact = {"eos_token_id": None, "min_new_tokens": max_new_tokens}
    length = {"eos_token_id": eos} if stop_at_eos else exact
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **length,
            **hf_sampling_kwargs(config),
            **extra,
        )
    new = out[:, width:].tolist()
    if stop_at_eos:
        # A row that ended (EOS, or a stop string in ``extra``) is padded until the whole batch has ended.
        return [until_stop(row, {*eos, pad}) for row in new]
    if any(len(row) != max_new_tokens for row in new):
        raise RuntimeError(f"HF generated {[len(r) for r in new]} tokens, expected {max_new_tokens} per row")
    return new


def until_stop(row: list[int], stops: set[int]) -> list[int]:
    """``row`` up to (not including) its first stop token.

    >>> until_stop([5, 6, 0, 0], {0})
    [5, 6]
    """
    for index, token in enumerate(row):
        if token in stops:
            return row[:index]
    return row


# -- alternating timing ------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one call of a path produced: new tokens per prompt, decoder stats per generate call, and the
    decoders' own decode-phase seconds (prefill excluded; None for HF, which does not report them)."""

    token_ids: list[list[int]]
    stats: list[dict[str, float]] = field(default_factory=list)
    decode_seconds: float | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(row) for row in self.token_ids)


GenerationPath = Callable[[int], Result]
"""One way to generate for a fixed set of prompts (ours, HF, ...), given ``max_new_tokens``."""


@dataclass
class Timing:
    """Wall-clock seconds and result of each timed call of one path, or the error it raised."""

    seconds: list[float] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    error: str | None = None

    @property
    def result(self) -> Result | None:
        """The last call's result (all calls generate the same tokens: seeded)."""
        return self.results[-1] if self.results else None

    @property
    def tokens_per_second(self) -> float:
        """New tokens / median wall seconds, prefill included."""
        if self.error or not self.results:
            return float("nan")
        return self.results[-1].num_tokens / statistics.median(self.seconds)

    @property
    def decode_tokens_per_second(self) -> float:
        """New tokens / median decode-phase seconds (NaN if the path does not report them)."""
        decode = [r.decode_seconds for r in self.results if r.decode_seconds is not None]
        if self.error or not decode:
            return float("nan")
        return self.results[-1].num_tokens / statistics.median(decode)


def time_alternately(
    paths: dict[str, GenerationPath], max_new_tokens: int, repeats: int, warmup_tokens: int = 4
) -> dict[str, Timing]:
    """Warm each path up once (``warmup_tokens`` new tokens), then time ``repeats`` rounds of every path in
    turn (a, b, c, a, b, c, ...) so drift in machine load hits all of them alike. Progress goes to stderr.

    A path that raises is reported (``Timing.error``) and skipped from then on; the others still run.
    """
    timings = {name: Timing() for name in paths}
    for name, path in paths.items():
        if _guarded(timings[name], path, min(warmup_tokens, max_new_tokens)) is None:
            progress(f"  {name} (warm-up): {timings[name].error}")
    for _ in range(repeats):
        for name, path in paths.items():
            timing = timings[name]
            if timing.error is not None:
                continue
            start = time.perf_counter()
            result = _guarded(timing, path, max_new_tokens)
            if result is None:
                progress(f"  {name}: {timing.error}")
                continue
            timing.seconds.append(time.perf_counter() - start)
            timing.results.append(result)
            progress(f"  {name}: {timing.seconds[-1]:.1f} s")
    return timings


def progress(message: str) -> None:
    """A progress line on stderr (stdout holds only the report)."""
    print(message, file=sys.stderr, flush=True)


def _guarded(timing: Timing, path: GenerationPath, max_new_tokens: int) -> Result | None:
    try:
        return path(max_new_tokens)
    except Exception as error:  # a broken decoder must not sink a long benchmark run
        frame = traceback.extract_tb(error.__traceback__)[-1]
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}"
        timing.error = f"{type(error).__name__} at {where}: {error}"
        return None


def same_tokens(timing: Timing, reference: Timing) -> str:
    """`yes` if both paths produced the same tokens for every prompt, else `no (k/n)` counting the prompts
    that match; `n/a` if either failed."""
    if timing.result is None or reference.result is None:
        return "n/a"
    pairs = list(zip(timing.result.token_ids, reference.result.token_ids, strict=True))
    same = sum(a == b for a, b in pairs)
    return "yes" if same == len(pairs) else f"no ({same}/{len(pairs)})"


# -- formatting --------------------------------------------------------------------------------------------


def fmt(value: float, digits: int = 2, suffix: str = "") -> str:
    """``value`` rounded, or ``n/a`` for NaN."""
    return "n/a" if value != value else f"{value:.{digits}f}{suffix}"
