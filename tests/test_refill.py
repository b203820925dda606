"""Refill (continuous) batching in the autoregressive decoder: the same tokens as static batching and as
one-by-one decoding, whatever the schedule; a bounded cache; stop strings, ignore_eos and progress."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from rtdlm_experiments.models import ByteTokenizer, HFCausalLM, build_tiny_random
from sampling import SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder, Decoder, DraftVerifyDecoder, GenerationOutput
from sampling.decoding.stopping import StopStrings
from tests.sampling_helpers import PromptSet, assert_same_rows, early_stop_id, plain_decode

MAX_NEW = 12
PROMPTS = [
    [72, 101, 108, 108, 111],
    [7],
    [100, 101, 102, 103, 104, 105, 106, 107, 9, 10, 11, 12, 13],
    [42, 42],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [200, 201, 202],
    [80],
    [11, 22, 33, 44, 55, 66, 77, 88, 99, 111, 122, 133, 144, 155, 166, 177, 188, 199, 210],
    [65, 66],
    [9, 8, 7, 6, 5, 4],
]
"""Ten rows of varied prompt lengths (1 to 19 tokens)."""
SEEDS = [1000 + row for row in range(len(PROMPTS))]
ROWS = PromptSet(PROMPTS, SEEDS, MAX_NEW)
CONFIGS = {
    "greedy": get_preset("deterministic"),
    "sampled": SamplingConfig(
        temperature=1.1, top_k=40, top_p=0.95, repetition_penalty=1.2, presence_penalty=0.5, seed=5
    ),
}


class Recording:
    """A model whose forwards are logged: (batch rows, new positions, cache length before the forward)."""

    def __init__(self, model: HFCausalLM) -> None:
        self._model = model
        self.forwards: list[tuple[int, int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward(self, input_ids, cache, attention_mask=None, last_positions=None):
        rows, new = input_ids.shape
        self.forwards.append((rows, new, self._model.cache_length(cache)))
        return self._model.forward(input_ids, cache, attention_mask, last_positions)


class OpaqueCache:
    """A cache the decoder cannot edit row by row (not the layered layout)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner


class OpaqueCacheModel(Recording):
    def new_cache(self) -> OpaqueCache:
        return OpaqueCache(self._model.new_cache())

    def cache_length(self, cache: OpaqueCache) -> int:
        return self._model.cache_length(cache.inner)

    def forward(self, input_ids, cache, attention_mask=None, last_positions=None):
        return super().forward(input_ids, cache.inner, attention_mask, last_positions)


@pytest.fixture(scope="module")
def tiny() -> HFCausalLM:
    return HFCausalLM(build_tiny_random(num_layers=2, vocab_size=256, seed=3), ByteTokenizer())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tiny) -> tuple[SamplingConfig, int, GenerationOutput]:
    """A config, a stop id that ends some rows early for it, and one-by-one decoding as the reference."""
    config = CONFIGS[request.param]
    free = ROWS.one_by_one(tiny, config, ignore_eos=True).token_ids
    stop = early_stop_id(free)
    reference = ROWS.one_by_one(tiny, config, stop_ids=[stop])
    lengths = [len(row) for row in reference.token_ids]
    assert sum(reference.finished_by_stop) >= 2 and min(lengths) < MAX_NEW and MAX_NEW in lengths
    assert len(set(lengths)) >= 3
    for prompt, seed, tokens in zip(PROMPTS, SEEDS, reference.token_ids, strict=True):
        assert tokens == plain_decode(tiny, prompt, config, seed, MAX_NEW, {stop, *tiny.eos_token_ids}).tokens
    return config, stop, reference


@pytest.mark.parametrize("max_batch_size", [1, 3, 4, None])
def test_refill_equals_one_by_one_and_static_batches(tiny, case, max_batch_size):
    config, stop, reference = case
    model = Recording(tiny)
    refill = ROWS.generate(model, config, stop_ids=[stop], max_batch_size=max_batch_size)
    assert_same_rows(refill, reference)
    assert_same_rows(
        ROWS.static_chunks(tiny, config, max_batch_size or len(PROMPTS), stop_ids=[stop]), reference
    )
    assert refill.target_forwards == len(model.forwards)
    assert max(rows for rows, _, _ in model.forwards) <= (max_batch_size or len(PROMPTS))


def test_refill_admits_rows_while_others_are_in_flight_and_reclaims_the_cache(tiny, case):
    config, stop, reference = case
    model = Recording(tiny)
    ROWS.generate(model, config, stop_ids=[stop], max_batch_size=3)
    forwards = model.forwards
    prefills = [i for i, (_, _, cached) in enumerate(forwards) if cached == 0]
    assert sum(forwards[i][0] for i in prefills) == len(PROMPTS)
    # newcomers join rows in flight: later prefills bring fewer than 3 rows, and the batch is full again
    assert forwards[prefills[0]][0] == 3 and any(forwards[i][0] < 3 for i in prefills)
    assert all(forwards[i + 1][0] == 3 for i in prefills[:-1])
    # no forward is spent on a finished row: a row that drew n tokens is in n - 1 decoding forwards
    drawn = [
        len(ids) + stopped
        for ids, stopped in zip(reference.token_ids, reference.finished_by_stop, strict=True)
    ]
    assert sum(rows for rows, _, cached in forwards if cached > 0) == sum(n - 1 for n in drawn)
    # the cache never outgrows the longest row in flight, though the call runs far more steps than that
    widest = max(len(p) for p in PROMPTS) + MAX_NEW
    assert max(cached for _, _, cached in forwards) <= widest - 2
    assert sum(1 for _, _, cached in forwards if cached > 0) > widest


def test_a_cache_that_cannot_be_edited_falls_back_to_static_batches(tiny, case):
    config, stop, reference = case
    model = OpaqueCacheModel(tiny)
    out = ROWS.generate(model, config, stop_ids=[stop], max_batch_size=3)
    assert_same_rows(out, reference)
    prefill_rows = [rows for rows, _, cached in model.forwards if cached == 0]
    assert prefill_rows == [3, 3, 3, 1]


def test_stop_string_split_across_tokens_ends_the_row_on_the_completing_token(tiny):
    config = CONFIGS["sampled"]
    free = ROWS.one_by_one(tiny, config, ignore_eos=True).token_ids
    row, start = next(
        (r, k)
        for r, tokens in enumerate(free)
        for k in range(2, MAX_NEW - 2)
        if all(32 <= t < 127 for t in tokens[k : k + 2])
    )
    stop = bytes(free[row][start : start + 2]).decode()
    tokenizer = ByteTokenizer()
    stops = StopStrings((stop,), tokenizer.decode)
    out = ROWS.generate(tiny, config, ignore_eos=True, stop_strings=stops, max_batch_size=3)
    for r, tokens in enumerate(free):
        completing = [j for j in range(len(tokens)) if stop in tokenizer.decode(tokens[: j + 1])]
        expected = tokens[: completing[0] + 1] if completing else tokens
        assert out.token_ids[r] == expected
        assert out.finished_by_stop[r] == bool(completing)
    assert len(out.token_ids[row]) <= start + 2 and out.finished_by_stop[row]
    alone = ROWS.one_by_one(tiny, config, ignore_eos=True, stop_strings=stops)
    assert_same_rows(out, alone)


def test_ignore_eos_gives_exactly_max_new_tokens_and_stop_ids_still_stop(tiny):
    config = CONFIGS["greedy"]
    free = ROWS.one_by_one(tiny, config, ignore_eos=True).token_ids
    eos = early_stop_id(free)
    with_eos = HFCausalLM(tiny.model, tiny.tokenizer, eos_token_ids=(eos,))
    stopped = ROWS.generate(with_eos, config, max_batch_size=4)
    assert any(len(row) < MAX_NEW for row in stopped.token_ids)
    ignored = ROWS.generate(with_eos, config, ignore_eos=True, max_batch_size=4)
    assert ignored.token_ids == free
    assert all(len(row) == MAX_NEW for row in ignored.token_ids) and not any(ignored.finished_by_stop)
    explicit = ROWS.generate(with_eos, config, stop_ids=[eos], ignore_eos=True, max_batch_size=4)
    assert explicit.token_ids == stopped.token_ids


@pytest.mark.parametrize("max_batch_size", [1, 3, None])
def test_progress_counts_new_tokens_and_released_budget(tiny, case, max_batch_size):
    config, stop, reference = case
    calls: list[tuple[int, int]] = []
    out = ROWS.generate(
        tiny,
        config,
        stop_ids=[stop],
        max_batch_size=max_batch_size,
        progress=lambda new, released: calls.append((new, released)),
    )
    assert len(calls) == out.sampler_calls
    assert sum(new for new, _ in calls) == out.num_new_tokens
    assert sum(new + released for new, released in calls) == len(PROMPTS) * MAX_NEW
    assert sum(released for _, released in calls) == sum(MAX_NEW - len(r) for r in reference.token_ids)


def test_timings_and_counters_cover_refills(tiny, case):
    config, stop, _ = case
    model = Recording(tiny)
    out = ROWS.generate(model, config, stop_ids=[stop], max_batch_size=3)
    prefills = sum(1 for _, _, cached in model.forwards if cached == 0)
    assert out.target_forwards == len(model.forwards)
    decoding_forwards = len(model.forwards) - prefills
    assert decoding_forwards < out.sampler_calls <= decoding_forwards + prefills
    assert out.prefill_seconds > 0 and out.decode_seconds > 0 and out.sampler_seconds > 0


def test_invalid_max_batch_size(tiny):
    with pytest.raises(ValueError, match="max_batch_size"):
        ROWS.generate(tiny, CONFIGS["greedy"], max_batch_size=0)


@pytest.mark.parametrize("decoder", [AutoregressiveDecoder, DraftVerifyDecoder])
def test_the_decoders_have_the_protocol_signature(decoder):
    ours = inspect.signature(decoder.generate).parameters
    protocol = inspect.signature(Decoder.generate).parameters
    assert [(p.name, p.kind, p.default) for p in ours.values()] == [
        (p.name, p.kind, p.default) for p in protocol.values()
    ]
