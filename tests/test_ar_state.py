"""Sampler state in the autoregressive decoder: mirostat's μ per row, and the history-reading stages (DRY,
no-repeat-n-gram) and XTC's coin, under refill batching.

Every schedule (refill at several batch sizes, static batches, one row at a time) gives exactly the
tokens of the rule written out: a plain loop that runs the whole sequence through the model each step and
calls ``sampler.sample`` with the row's state by hand. A chi-square test checks AR + mirostat against the
exact joint distribution of short continuations, enumerated with states advanced by hand.
"""

from __future__ import annotations

import pytest
import torch

import sampling.decoding.autoregressive as autoregressive
from rtdlm_experiments.models import ByteTokenizer, HFCausalLM, build_tiny_random
from sampling import SamplingConfig, TokenSampler
from sampling.decoding import AutoregressiveDecoder, GenerateOptions, GenerationOutput
from sampling.decoding.stopping import StopStrings
from sampling.sampler import SamplerState
from tests.sampling_helpers import PromptSet, assert_same_rows, early_stop_id, joint_p_value, plain_decode

MAX_NEW = 10
PROMPTS = [
    [72, 101, 108, 108, 111],
    [7],
    [100, 101, 102, 103, 104, 105, 106, 107, 9, 10, 11, 12, 13],
    [42, 42],
    [3, 1, 4, 1, 5, 9, 2, 6],
    [200, 201, 202],
    [80],
    [9, 8, 7, 6, 5, 4],
]
SEEDS = [500 + row for row in range(len(PROMPTS))]
ROWS = PromptSet(PROMPTS, SEEDS, MAX_NEW)
MIROSTAT = SamplingConfig(mirostat=2, mirostat_tau=3.0, mirostat_eta=0.8, temperature=1.3)
CONFIGS = {
    "mirostat": MIROSTAT,
    "dry": SamplingConfig(
        temperature=1.4, dry_multiplier=2.0, dry_base=2.0, dry_allowed_length=1, dry_sequence_breakers=(10,)
    ),
    "no_repeat_ngram": SamplingConfig(temperature=1.5, no_repeat_ngram_size=2),
    "xtc": SamplingConfig(temperature=1.2, xtc_probability=0.6, xtc_threshold=0.05),
    "mirostat+dry+xtc+typical": MIROSTAT.replace(
        dry_multiplier=1.5, dry_allowed_length=1, xtc_probability=0.5, xtc_threshold=0.05, typical_p=0.9
    ),
}


@pytest.fixture(scope="module")
def tiny() -> HFCausalLM:
    return HFCausalLM(build_tiny_random(num_layers=2, vocab_size=256, seed=3), ByteTokenizer())


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tiny) -> tuple[SamplingConfig, int, GenerationOutput]:
    """A config, a stop id that ends some rows early, and one-by-one decoding, checked against the rule."""
    config = CONFIGS[request.param]
    free = ROWS.one_by_one(tiny, config, ignore_eos=True).token_ids
    stop = early_stop_id(free)
    reference = ROWS.one_by_one(tiny, config, stop_ids=[stop])
    lengths = [len(row) for row in reference.token_ids]
    assert sum(reference.finished_by_stop) >= 2 and MAX_NEW in lengths
    for prompt, seed, tokens in zip(PROMPTS, SEEDS, reference.token_ids, strict=True):
        assert tokens == plain_decode(tiny, prompt, config, seed, MAX_NEW, {stop, *tiny.eos_token_ids}).tokens
    return config, stop, reference


@pytest.mark.parametrize("max_batch_size", [1, 3, 5, None])
def test_refill_static_and_one_by_one_give_the_tokens_of_the_rule(tiny, case, max_batch_size):
    config, stop, reference = case
    refill = ROWS.generate(tiny, config, stop_ids=[stop], max_batch_size=max_batch_size)
    assert_same_rows(refill, reference)
    size = max_batch_size or len(PROMPTS)
    assert_same_rows(ROWS.static_chunks(tiny, config, size, stop_ids=[stop]), reference)


def test_stop_strings_with_state(tiny):
    """Rows ended by a stop string leave the batch with their state; the others keep theirs."""
    config = CONFIGS["mirostat+dry+xtc+typical"]
    free = ROWS.one_by_one(tiny, config, ignore_eos=True).token_ids
    row = next(r for r, tokens in enumerate(free) if all(32 <= t < 127 for t in tokens[3:5]))
    stops = StopStrings((bytes(free[row][3:5]).decode(),), ByteTokenizer().decode)
    out = ROWS.generate(tiny, config, ignore_eos=True, stop_strings=stops, max_batch_size=3)
    assert out.finished_by_stop[row] and len(out.token_ids[row]) <= 5
    assert_same_rows(out, ROWS.one_by_one(tiny, config, ignore_eos=True, stop_strings=stops))


@pytest.mark.parametrize("name", ["mirostat", "mirostat+dry+xtc+typical"])
def test_mu_evolves_per_row_and_threading_it_changes_the_tokens(tiny, name):
    """μ moves away from 2τ differently in each row, and decoding from μ₀ at every step gives other
    tokens: so the equality tests above would catch a decoder that drops the state."""
    config = CONFIGS[name]
    refs = [
        plain_decode(tiny, p, config, s, MAX_NEW, thread_state=True)
        for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    assert all(ref.mus[0] == 2 * config.mirostat_tau for ref in refs)
    assert all(len(set(ref.mus)) > 3 for ref in refs)
    assert len({tuple(ref.mus) for ref in refs}) == len(PROMPTS)
    stateless = [
        plain_decode(tiny, p, config, s, MAX_NEW, thread_state=False).tokens
        for p, s in zip(PROMPTS, SEEDS, strict=True)
    ]
    assert sum(ref.tokens != tokens for ref, tokens in zip(refs, stateless, strict=True)) >= 2
    out = ROWS.generate(tiny, config, ignore_eos=True, max_batch_size=3)
    assert out.token_ids == [ref.tokens for ref in refs]


# --- chi-square: AR + mirostat against the exact joint distribution ---------------------------------

VOCAB = 16
PROMPT = [3, 7, 3, 9]
DRAWS = 20_000
LENGTH = 3
CHI_CONFIG = SamplingConfig(mirostat=2, mirostat_tau=1.0, mirostat_eta=1.0, temperature=1.5)


@pytest.fixture(scope="module")
def small() -> HFCausalLM:
    return HFCausalLM(
        build_tiny_random(num_layers=3, vocab_size=VOCAB, hidden_size=32, seed=1), eos_token_ids=()
    )


def exact_joint(model: HFCausalLM, config: SamplingConfig, *, update_mu: bool = True) -> dict:
    """P(continuation) under AR sampling, by enumerating every prefix (no cache); each prefix carries its
    μ, advanced by hand over its last token (``update_mu=False``: μ stays 2τ, a wrong rule)."""
    sampler = TokenSampler(config)
    mu0 = 2.0 * config.mirostat_tau
    joint = {(): (1.0, mu0)}
    for _ in range(LENGTH):
        prefixes = list(joint)
        ids = torch.tensor([PROMPT + list(p) for p in prefixes])
        logits = model.forward(ids, model.new_cache())[:, -1]
        state = SamplerState(torch.tensor([joint[p][1] for p in prefixes], dtype=torch.float64))
        probs = sampler.distribution(logits, ids, state=state).double().numpy()
        grown = {}
        for i, prefix in enumerate(prefixes):
            tokens = [t for t in range(VOCAB) if probs[i, t] > 0]
            mus = sampler.advance_state(
                state.select([i] * len(tokens)), logits[[i] * len(tokens)], torch.tensor(tokens)
            ).mu.tolist()
            for token, mu in zip(tokens, mus, strict=True):
                grown[prefix + (token,)] = (joint[prefix][0] * probs[i, token], mu if update_mu else mu0)
        joint = grown
    return {cell: p for cell, (p, _) in joint.items()}


def sample_continuations(model: HFCausalLM) -> list[list[int]]:
    out = AutoregressiveDecoder().generate(
        model,
        [PROMPT] * DRAWS,
        CHI_CONFIG,
        LENGTH,
        GenerateOptions(row_seeds=range(DRAWS), max_batch_size=DRAWS // 3),
    )
    assert all(len(tokens) == LENGTH for tokens in out.token_ids)
    return out.token_ids


class _StatelessSampler(TokenSampler):
    """The broken variant: every draw from μ₀ (the state passed in is ignored)."""

    def sample(self, *args, state=None, **kwargs):
        return super().sample(*args, **kwargs)


@pytest.mark.slow
def test_mirostat_draws_follow_the_exact_joint_distribution(small):
    joint = exact_joint(small, CHI_CONFIG)
    assert sum(joint.values()) == pytest.approx(1.0)
    wrong = exact_joint(small, CHI_CONFIG, update_mu=False)
    assert joint != pytest.approx(wrong), "μ must matter for this config, or the test proves nothing"
    assert joint_p_value(sample_continuations(small), joint) > 1e-3


@pytest.mark.slow
def test_the_same_test_rejects_a_decoder_that_does_not_update_mu(small, monkeypatch):
    monkeypatch.setattr(autoregressive, "TokenSampler", _StatelessSampler)
    assert joint_p_value(sample_continuations(small), exact_joint(small, CHI_CONFIG)) < 1e-6
