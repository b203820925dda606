"""Stateful and random stages: mirostat's μ, the XTC coin, and chi-square tests of every new stage."""

from __future__ import annotations

import math

import pytest
import torch

from sampling import SamplingConfig, TokenSampler, noise
from sampling.sampler import SamplerState
from sampling.stages.select import CHUNK_STREAM, chunked_race
from tests.sampling_helpers import STAT_LOGITS, chi_square_p

STAT_HISTORY = torch.tensor([0, 1, 2, 4, 0, 1, 2, 5, 0, 1])


# ---------------------------------------------------------------------------------------------------
# Mirostat state


def test_initial_state_is_two_tau_and_stateless_configs_carry_none():
    sampler = TokenSampler(SamplingConfig(mirostat=2, mirostat_tau=3.0))
    assert sampler.initial_state(3).mu.tolist() == [6.0, 6.0, 6.0]
    assert TokenSampler(SamplingConfig(top_p=0.9)).initial_state(3).mu is None
    out = TokenSampler(SamplingConfig(top_p=0.9)).sample(torch.randn(2, 20), row_seeds=torch.arange(2))
    assert out.state is None


def test_sample_threads_mu_by_the_rule_and_advance_state_agrees():
    config = SamplingConfig(mirostat=2, mirostat_tau=2.0, mirostat_eta=0.3, temperature=0.8)
    sampler = TokenSampler(config)
    gen = torch.Generator().manual_seed(0)
    state = sampler.initial_state(4)
    for step in range(6):
        logits = torch.randn(4, 50, generator=gen) * 2
        seeds = torch.arange(4) + 10
        out = sampler.sample(logits, row_seeds=seeds, step=step, state=state)
        probs = sampler.distribution(logits, state=state).double()
        surprise = -probs.gather(1, out.tokens[:, None]).squeeze(1).log() / math.log(2)
        torch.testing.assert_close(out.state.mu, state.mu - 0.3 * (surprise - 2.0))
        torch.testing.assert_close(
            out.logprobs.double(), probs.gather(1, out.tokens[:, None]).squeeze(1).log()
        )
        assert torch.all(probs[torch.arange(4), out.tokens] > 0)
        before = state.mu.clone()
        advanced = sampler.advance_state(state, logits, out.tokens)
        assert torch.equal(state.mu, before), "advance_state must not modify its input"
        torch.testing.assert_close(advanced.mu, out.state.mu)
        state = out.state


def test_mu_cuts_by_surprise_in_bits():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    sampler = TokenSampler(SamplingConfig(mirostat=2))
    kept = [
        int((sampler.distribution(logits, state=SamplerState(torch.tensor([mu]))) > 0).sum())
        for mu in (0.5, 1.5, 2.5, 9)
    ]
    assert kept == [1, 1, 2, 4]  # μ below every surprise keeps the most likely token


def test_verifying_drafts_with_the_implied_state_leaves_no_trace():
    """What a draft-verify decoder does: position i's distribution uses the state after drafts < i; a
    rejected suffix is simply not advanced over, so the kept state equals plain autoregressive sampling."""
    config = SamplingConfig(mirostat=2, mirostat_tau=1.5, mirostat_eta=0.5)
    sampler = TokenSampler(config)
    gen = torch.Generator().manual_seed(1)
    logits = [torch.randn(1, 30, generator=gen) * 2 for _ in range(3)]
    drafts = [torch.tensor([3]), torch.tensor([7])]
    states = [sampler.initial_state(1)]
    for position, token in enumerate(drafts):
        states.append(sampler.advance_state(states[-1], logits[position], token))
    accepted_one = sampler.advance_state(states[0], logits[0], drafts[0])
    torch.testing.assert_close(states[1].mu, accepted_one.mu)
    assert states[0].mu.item() == 3.0
    ar = sampler.sample(logits[0], row_seeds=torch.tensor([0]), step=0, state=states[0])
    torch.testing.assert_close(sampler.advance_state(states[0], logits[0], ar.tokens).mu, ar.state.mu)


# ---------------------------------------------------------------------------------------------------
# XTC coin


def test_xtc_draws_are_reproducible_batch_invariant_and_follow_their_branch():
    config = SamplingConfig(xtc_probability=0.5, xtc_threshold=0.05)
    sampler = TokenSampler(config)
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(16, 40, generator=gen) * 2
    seeds = torch.arange(16) * 7
    for step in range(5):
        full = sampler.sample(logits, row_seeds=seeds, step=step)
        part = sampler.sample(logits[3:9], row_seeds=seeds[3:9], step=step)
        assert torch.equal(full.tokens[3:9], part.tokens)
        branch = sampler.distribution(logits, row_seeds=seeds, step=step)
        assert torch.all(branch[torch.arange(16), full.tokens] > 0)
    hit = TokenSampler(config.replace(xtc_probability=1.0)).distribution(logits)
    miss = TokenSampler(SamplingConfig()).distribution(logits)
    torch.testing.assert_close(sampler.distribution(logits), 0.5 * hit + 0.5 * miss)


# ---------------------------------------------------------------------------------------------------
# Chi-square: sample() follows distribution(), and the same test rejects a deliberately wrong rule.

MU = 3.0
CASES = {
    # stage: (config, wrong rule as another config or state, what the wrong rule gets wrong)
    "typical": (SamplingConfig(typical_p=0.5), SamplingConfig(top_p=0.5), "orders by probability"),
    "epsilon": (SamplingConfig(epsilon_cutoff=0.08), SamplingConfig(min_p=0.08), "relative cutoff"),
    "eta": (SamplingConfig(eta_cutoff=0.2), SamplingConfig(epsilon_cutoff=0.2), "no entropy term"),
    "top_n_sigma": (SamplingConfig(top_n_sigma=1.0), SamplingConfig(top_n_sigma=0.5), "σ doubled"),
    "dynatemp": (
        SamplingConfig(dynatemp_range=0.8, dynatemp_exponent=0.5),
        SamplingConfig(),
        "fixed temperature",
    ),
    "xtc": (
        SamplingConfig(xtc_probability=0.5, xtc_threshold=0.1),
        SamplingConfig(xtc_probability=1.0, xtc_threshold=0.1),
        "coin ignored",
    ),
    "dry": (
        SamplingConfig(dry_multiplier=0.7, dry_base=2.0, dry_allowed_length=1),
        SamplingConfig(dry_multiplier=0.7, dry_base=1.0, dry_allowed_length=1),
        "no exponential growth",
    ),
    "no_repeat_ngram": (
        SamplingConfig(no_repeat_ngram_size=3),
        SamplingConfig(no_repeat_ngram_size=1),
        "n off by one",
    ),
    "logit_bias": (
        SamplingConfig(logit_bias={5: 1.0, 0: -0.5}),
        SamplingConfig(logit_bias={5: -1.0, 0: 0.5}),
        "sign flipped",
    ),
    "mirostat": (SamplingConfig(mirostat=2), SamplingConfig(mirostat=2), "surprise in nats"),
}


def _draw(name: str, config: SamplingConfig, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    sampler = TokenSampler(config)
    history = STAT_HISTORY.expand(draws, -1)
    state = SamplerState(torch.full((draws,), MU, dtype=torch.float64)) if config.mirostat else None
    tokens = sampler.sample(
        STAT_LOGITS.expand(draws, -1), history, row_seeds=torch.arange(draws), step=3, state=state
    ).tokens
    one_state = SamplerState(torch.tensor([MU], dtype=torch.float64)) if config.mirostat else None
    return tokens, sampler.distribution(STAT_LOGITS[None], STAT_HISTORY[None], state=one_state)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_new_stage_samples_follow_distribution_and_reject_the_wrong_rule(name):
    config, wrong, _ = CASES[name]
    tokens, probs = _draw(name, config, 200_000)
    assert chi_square_p(tokens, probs) > 1e-3
    wrong_state = (
        SamplerState(torch.tensor([MU / math.log(2)], dtype=torch.float64)) if wrong.mirostat else None
    )
    wrong_probs = TokenSampler(wrong).distribution(STAT_LOGITS[None], STAT_HISTORY[None], state=wrong_state)[
        0
    ]
    assert not torch.allclose(wrong_probs, probs, atol=1e-3), "the wrong rule must differ here"
    try:
        assert chi_square_p(tokens, wrong_probs) < 1e-3
    except AssertionError as error:
        assert "zero probability" in str(error)


@pytest.mark.slow
def test_chunked_race_follows_softmax_and_rejects_uniform_chunks():
    row = torch.full((700,), float("-inf"))  # 10 full chunks of 64 and a ragged tail of 60
    ids = torch.tensor([3, 5, 70, 71, 72, 300, 301, 500, 639, 640, 690, 699])
    row[ids] = torch.linspace(1.0, -1.0, 12)
    draws = 100_000
    seeds, steps = torch.arange(draws), torch.full((draws,), 1)
    tokens = chunked_race(
        row.expand(draws, -1), noise.row_keys(seeds, steps), noise.row_keys(seeds, steps, CHUNK_STREAM)
    )
    probs = torch.softmax(row, 0)
    assert chi_square_p(tokens, probs) > 1e-3
    # the wrong rule: pick a non-empty chunk uniformly, then a token inside it by its weight
    chunks = (ids // 64).unique()
    wrong = torch.zeros_like(probs)
    for chunk in chunks:
        inside = probs * (torch.arange(700) // 64 == chunk)
        wrong += inside / inside.sum() / chunks.numel()
    assert chi_square_p(tokens, wrong) < 1e-3


def test_wide_row_draws_are_batch_invariant():
    gen = torch.Generator().manual_seed(4)
    flat = torch.randn(2, 6000, generator=gen) * 0.01  # nucleus > 4096: whole-row chain, two-level race
    narrow = torch.randn(5, 6000, generator=gen)
    narrow[:, 100:110] += 30.0  # a nucleus of 10 tokens: decided on candidates
    batch = torch.cat([flat[:1], narrow, flat[1:]])
    sampler = TokenSampler(SamplingConfig(top_p=0.999, temperature=1.5))
    seeds = torch.arange(7) + 100
    assert sampler.candidates(batch).wide.tolist() == [True, *[False] * 5, True]
    full = sampler.sample(batch, row_seeds=seeds, step=2).tokens
    for b in range(7):
        assert sampler.sample(batch[b : b + 1], row_seeds=seeds[b : b + 1], step=2).tokens.item() == full[b]
