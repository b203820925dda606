"""Helpers the sampling and decoding tests share: chi-square verdicts, the refill tests' decoding of a prompt
set (batched, one by one, in static chunks, and the rule written out without a cache), and the speculative
tests' small target, perturbed draft and self-repeating prompt."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from rtdlm_experiments.models import HFCausalLM, build_tiny_random
from sampling import SamplingConfig, TokenSampler, get_preset
from sampling.decoding import (
    AutoregressiveDecoder,
    CausalLM,
    GenerateOptions,
    GenerationOutput,
    merge_outputs,
)

STAT_LOGITS = torch.tensor([1.6, 1.2, 1.0, 1.0, 0.7, 0.2, -0.5, -1.0, -2.0, float("-inf")])
"""A row with ties and a -inf for the token-level chi-square tests."""


def chi_square_p(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of drawn ``tokens`` against ``probs`` ([V]); a token of probability 0 fails at once."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double().numpy()
    expected = probs.double().numpy() * counts.sum()
    support = expected > 0
    assert counts[~support].sum() == 0, "drew a token with zero probability"
    expected = expected[support] * counts.sum() / expected[support].sum()
    return float(chisquare(counts[support], expected).pvalue)


def joint_p_value(samples: list[list[int]], joint: dict[tuple[int, ...], float]) -> float:
    """p-value of sampled continuations against their exact joint distribution (rare cells pooled); 0 when
    a continuation of probability 0 was produced."""
    counts = Counter(tuple(s) for s in samples)
    if not set(counts) <= set(joint):
        return 0.0
    cells = sorted(joint, key=joint.get, reverse=True)
    expected = np.array([joint[c] for c in cells]) * len(samples)
    observed = np.array([counts.get(c, 0) for c in cells], dtype=float)
    big = expected >= 5  # pool rare cells so the chi-square approximation holds
    if not big.all():
        expected = np.append(expected[big], expected[~big].sum())
        observed = np.append(observed[big], observed[~big].sum())
    expected *= observed.sum() / expected.sum()
    return float(chisquare(observed, expected).pvalue)


@dataclass(frozen=True)
class PromptSet:
    """The rows a refill test decodes: prompts, one seed each, and the token budget."""

    prompts: list[list[int]]
    seeds: list[int]
    max_new: int

    def generate(
        self, model: CausalLM, config: SamplingConfig, rows=slice(None), **options
    ) -> GenerationOutput:
        """Rows ``rows`` in one autoregressive call (``options``: `GenerateOptions` fields)."""
        return AutoregressiveDecoder().generate(
            model,
            self.prompts[rows],
            config,
            self.max_new,
            GenerateOptions(row_seeds=self.seeds[rows], **options),
        )

    def one_by_one(self, model: CausalLM, config: SamplingConfig, **options) -> GenerationOutput:
        rows = range(len(self.prompts))
        return merge_outputs([self.generate(model, config, slice(r, r + 1), **options) for r in rows])

    def static_chunks(
        self, model: CausalLM, config: SamplingConfig, size: int, **options
    ) -> GenerationOutput:
        starts = range(0, len(self.prompts), size)
        return merge_outputs([self.generate(model, config, slice(s, s + size), **options) for s in starts])


@dataclass
class Reference:
    tokens: list[int]
    mus: list[float]
    """μ before each draw (empty without mirostat)."""


def plain_decode(
    model: CausalLM,
    prompt: list[int],
    config: SamplingConfig,
    seed: int,
    max_new: int,
    stops: frozenset[int] | set[int] = frozenset(),
    *,
    thread_state: bool = True,
) -> Reference:
    """The rule written out: the whole sequence through the model each step (no cache), one draw keyed by
    (seed, tokens drawn so far), penalties over the prompt + drawn tokens / the drawn tokens, from the
    row's state, which is the state ``sample`` returned last time (``thread_state=False``: every draw
    from the initial state, the bug a decoder must not have)."""
    sampler, drawn, mus = TokenSampler(config), [], []
    state = sampler.initial_state(1)
    while len(drawn) < max_new:
        sequence = torch.tensor([prompt + drawn])
        logits = model.forward(sequence, model.new_cache())[:, -1]
        if state.mu is not None:
            mus.append(float(state.mu[0]))
        out = sampler.sample(
            logits,
            sequence,
            row_seeds=torch.tensor([seed]),
            step=len(drawn),
            generated=torch.tensor([drawn], dtype=torch.long),
            state=state,
        )
        state = out.state if thread_state else sampler.initial_state(1)
        token = int(out.tokens[0])
        if token in stops:
            break
        drawn.append(token)
    return Reference(drawn, mus)


def early_stop_id(free: Sequence[list[int]]) -> int:
    """A token the model emits in some rows but not all, at varied positions: a stop id that ends some rows
    early and leaves others to run to their budget."""
    rows_with = Counter(token for row in free for token in set(row[1:]))
    candidates = [t for t, n in rows_with.most_common() if 2 <= n <= len(free) - 2]
    assert candidates, "the tiny model's free run has no token to stop some rows early"
    return candidates[0]


def assert_same_rows(got: GenerationOutput, want: GenerationOutput) -> None:
    assert got.token_ids == want.token_ids
    assert got.finished_by_stop == want.finished_by_stop
    for field in ("model_logprobs", "entropies"):
        for got_row, want_row, ids in zip(
            getattr(got, field), getattr(want, field), got.token_ids, strict=True
        ):
            assert len(got_row) == len(ids)
            assert got_row == pytest.approx(want_row, abs=1e-4)
    assert got.num_kept == want.num_kept


def small_target(device: torch.device | str, vocab: int) -> HFCausalLM:
    """The speculative tests' target: a seeded tiny model small enough to enumerate its joint."""
    model = build_tiny_random(num_layers=3, vocab_size=vocab, hidden_size=32, seed=1).to(device)
    return HFCausalLM(model, eos_token_ids=())


def perturbed_draft(target: HFCausalLM) -> HFCausalLM:
    """The target with a perturbed LM head: close enough to accept often, different enough to reject."""
    model = copy.deepcopy(target.model)
    weight = model.lm_head.weight
    with torch.no_grad():
        weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)).to(weight.device))
    return HFCausalLM(model, eos_token_ids=())


def repeating_prompt(target: HFCausalLM) -> list[int]:
    """A prompt that repeats itself after the target's greedy continuation, so DRY and n-gram bans act and
    n-gram lookup drafts tokens the target likes (a prompt-lookup test that never accepts proves nothing)."""
    base = [3, 7]
    greedy = AutoregressiveDecoder().generate(target, [base], get_preset("deterministic"), 4).token_ids[0]
    return base + greedy + base
