"""What every decoder shares: the model protocols it drives, left padding, and the `GenerationOutput`.

The protocols are deliberately small so that any model with a KV cache can be plugged in. `CausalLM`
is what every decoder needs: a batched forward that appends to a cache, and cropping the cache back
(speculative decoding rolls back rejected drafts). `EarlyExitLM` adds an early-exit split of the layer
stack, needed only by self-speculative decoding (it drafts with the first E layers and verifies with the
rest, sharing the first E layers' cache).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from sampling.config import SamplingConfig
from sampling.decoding.accounting import derive_rates
from sampling.decoding.stopping import StopStrings

Progress = Callable[[int, int], None]
"""``progress(new_tokens, released_budget)``, called after every decoding step (or verify round): the tokens
appended across rows in that step, and the budget (max_new_tokens − generated) released by rows that ended
early in it. Over a call the two sum to rows × max_new_tokens."""


@runtime_checkable
class CausalLM(Protocol):
    """A decoder-only language model with an explicit KV cache.

    Logits are always returned as float32 ``[B, T, V]`` on the model's device, whatever its dtype.
    ``attention_mask`` (``[B, past + T]``, 1 = real token, 0 = padding) covers the cached tokens and the
    new ones; ``None`` means no padding. Position ids are derived from the mask, so left-padded rows
    get the same positions as they would alone.
    """

    num_layers: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    max_context: int | None
    device: torch.device

    def new_cache(self) -> Any:
        """An empty KV cache for a new batch."""
        ...

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor | None = None,
        last_positions: int | None = None,
    ) -> torch.Tensor:
        """Run all layers on ``input_ids`` [B, T] appended to ``cache``; returns logits [B, T, V], or
        [B, last_positions, V] for only the last positions (a prefill needs one, not T×V floats)."""
        ...

    def cache_length(self, cache: Any) -> int:
        """Number of positions held by the full (last) layer of the cache."""
        ...

    def crop_cache(self, cache: Any, length: int) -> None:
        """Drop every cached position at index >= ``length`` in every layer (in place)."""
        ...


@runtime_checkable
class EarlyExitLM(CausalLM, Protocol):
    """A `CausalLM` whose layer stack can be split at any layer, sharing one cache across the split."""

    def forward_early_exit(
        self, input_ids: torch.Tensor, cache: Any, exit_layer: int, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run layers ``[0, exit_layer)`` + final norm + LM head.

        Returns ``(logits [B, T, V], hidden [B, T, H])`` where ``hidden`` is the residual stream
        entering layer ``exit_layer``. Only the first ``exit_layer`` layers' cache grows; the mask covers
        those layers' cached positions plus the new ones.
        """
        ...

    def forward_from_layer(
        self, hidden: torch.Tensor, cache: Any, start_layer: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run layers ``[start_layer, L)`` + norm + head on ``hidden``; returns logits [B, T, V]."""
        ...


def left_pad(
    rows: Sequence[Sequence[int]], pad_value: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-aligned in one ``[B, longest]`` batch: ``(ids, attention_mask)``, padding on the left
    with ``pad_value`` (mask 0), so every row's last token sits in the last column.

    >>> ids, mask = left_pad([[5, 6, 7], [8]], pad_value=-1)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 7], [-1, -1, 8]], [[1, 1, 1], [0, 0, 1]])
    """
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long, device=device)
            mask[index, width - len(row) :] = 1
    return ids, mask


@dataclass
class GenerationOutput:
    """Everything a decoder produced for one batch of prompts.

    ``token_ids[i]`` holds the new tokens of prompt ``i`` (without the stop token unless the decoder was
    asked to keep it). The per-token lists are aligned with ``token_ids``: ``model_logprobs[i][t]`` is the
    log-softmax of the generating model's raw logits at token t, ``entropies`` and ``num_kept`` describe the
    sampling distribution it was drawn from.
    """

    token_ids: list[list[int]]
    model_logprobs: list[list[float]] = field(default_factory=list)
    entropies: list[list[float]] = field(default_factory=list)
    num_kept: list[list[int]] = field(default_factory=list)
    finished_by_stop: list[bool] = field(default_factory=list)
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    sampler_seconds: float = 0.0
    sampler_calls: int = 0
    target_forwards: int = 0
    draft_forwards: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    """Decoder-specific accounting as additive counts (drafted/accepted/verified tokens, seconds...),
    so outputs of several batches merge by addition; `accounting()` adds the derived rates."""

    @property
    def num_new_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def total_seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def accounting(self) -> dict[str, float]:
        """The counts in ``stats`` plus the rates derived from them (α, α̂, τ, c, predicted speedup)."""
        return {**self.stats, **derive_rates(self.stats)}


def merge_outputs(outputs: Sequence[GenerationOutput]) -> GenerationOutput:
    """One output for several batches: per-row lists concatenated, timings, counters and stats added."""
    stats: dict[str, float] = {}
    for output in outputs:
        for key, value in output.stats.items():
            stats[key] = stats.get(key, 0.0) + value
    return GenerationOutput(
        token_ids=[row for output in outputs for row in output.token_ids],
        model_logprobs=[row for output in outputs for row in output.model_logprobs],
        entropies=[row for output in outputs for row in output.entropies],
        num_kept=[row for output in outputs for row in output.num_kept],
        finished_by_stop=[flag for output in outputs for flag in output.finished_by_stop],
        prefill_seconds=sum(output.prefill_seconds for output in outputs),
        decode_seconds=sum(output.decode_seconds for output in outputs),
        sampler_seconds=sum(output.sampler_seconds for output in outputs),
        sampler_calls=sum(output.sampler_calls for output in outputs),
        target_forwards=sum(output.target_forwards for output in outputs),
        draft_forwards=sum(output.draft_forwards for output in outputs),
        stats=stats,
    )


@dataclass(frozen=True)
class GenerateOptions:
    """How one `Decoder.generate` call runs, besides its prompts, sampling config and length.

    ``row_seeds`` (one per prompt) key each row's randomness, so a prompt's sample does not depend on the
    batch it was put in (see `resolve_row_seeds`). A row ends at its first of ``stop_ids`` or EOS (EOS not
    with ``ignore_eos``), at the token completing one of ``stop_strings`` (kept; ``finished_by_stop``), or
    after ``max_new_tokens`` tokens. ``max_batch_size`` bounds the rows in flight at once (None: all).
    ``progress``: see `Progress`.
    """

    stop_ids: Sequence[int] = ()
    row_seeds: Sequence[int] | None = None
    stop_strings: StopStrings | None = None
    ignore_eos: bool = False
    max_batch_size: int | None = None
    progress: Progress | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size is not None and self.max_batch_size < 1:
            raise ValueError(
                f"max_batch_size={self.max_batch_size} is invalid: must be >= 1 (or None: all rows)"
            )


DEFAULT_OPTIONS = GenerateOptions()


class Decoder(Protocol):
    """The one signature every decoder shares.

    ``prompt_ids`` may hold a whole job's rows; output rows are in input order whatever the schedule.
    ``options``: seeds, stops, batching and progress (`GenerateOptions`). Decoders keep no per-call state
    on the instance: one instance may serve concurrent calls.
    """

    def generate(
        self,
        model: CausalLM,
        prompt_ids: list[list[int]],
        config: SamplingConfig,
        max_new_tokens: int,
        options: GenerateOptions = DEFAULT_OPTIONS,
    ) -> GenerationOutput: ...


def stop_set(model: CausalLM, stop_ids: Sequence[int], ignore_eos: bool = False) -> frozenset[int]:
    """Tokens that end a row: the caller's stop ids plus the model's EOS ids (unless ``ignore_eos``)."""
    eos = () if ignore_eos else model.eos_token_ids
    return frozenset(int(t) for t in stop_ids) | frozenset(eos)


def resolve_row_seeds(config: SamplingConfig, num_rows: int, row_seeds: Sequence[int] | None) -> torch.Tensor:
    """Per-row seeds: the caller's, else ``config.seed + row``, else random.

    Callers that split a prompt set into batches pass ``row_seeds`` derived from each prompt's global
    index, so a prompt's sample never depends on how the prompts were batched.
    """
    if row_seeds is not None:
        if len(row_seeds) != num_rows:
            raise ValueError(f"row_seeds has {len(row_seeds)} entries for {num_rows} prompts")
        return torch.tensor(list(row_seeds), dtype=torch.long)
    if config.seed is not None:
        return config.seed + torch.arange(num_rows, dtype=torch.long)
    return torch.randint(0, 2**62, (num_rows,), dtype=torch.long)


def fit_prompts(
    model: CausalLM, prompt_ids: list[list[int]], max_new_tokens: int, truncate: bool
) -> list[list[int]]:
    """Check prompts against the model's context; left-truncate (with a warning) or raise."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    limit = model.max_context
    if limit is None:
        return prompt_ids
    room = limit - max_new_tokens
    if room < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is invalid for this model: prompt + new tokens must fit its "
            f"context of {limit} tokens"
        )
    too_long = [i for i, p in enumerate(prompt_ids) if len(p) > room]
    if not too_long:
        return prompt_ids
    if not truncate:
        raise ValueError(
            f"prompt(s) {too_long} do not fit: prompt + max_new_tokens={max_new_tokens} exceeds the model's "
            f"context of {limit} tokens (set truncate_prompts=true to keep each prompt's last {room} tokens)"
        )
    warnings.warn(f"left-truncating prompt(s) {too_long} to their last {room} tokens", stacklevel=3)
    return [p[-room:] for p in prompt_ids]
