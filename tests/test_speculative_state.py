"""Sampler state under drafting: mirostat (μ per row), DRY, no-repeat-n-gram and XTC stay lossless in every
drafting decoder — chi-square of the joint distribution of short continuations against the exact joint
(enumerated, with μ carried along each prefix), each with a twin that breaks one rule and must fail."""

from __future__ import annotations

import copy

import pytest
import torch

import sampling.decoding.rounds as rounds
from rtdlm_experiments.models import HFCausalLM
from sampling import SamplingConfig, TokenSampler
from sampling.decoding import (
    GenerateOptions,
    PromptLookupDecoder,
    SelfSpeculativeDecoder,
    SpeculativeDecoder,
)
from sampling.sampler import SamplerState
from tests.sampling_helpers import joint_p_value, perturbed_draft, repeating_prompt, small_target

VOCAB = 16
DRAWS = 20_000
LENGTH = 3

CONFIGS = {
    "mirostat": SamplingConfig(mirostat=2, mirostat_tau=1.5, mirostat_eta=1.0),
    "dry": SamplingConfig(dry_multiplier=2.0, dry_base=2.0, dry_allowed_length=1),
    "no_repeat_ngram": SamplingConfig(temperature=1.2, no_repeat_ngram_size=2),
    "xtc": SamplingConfig(xtc_probability=0.5, xtc_threshold=0.1),
}
DECODERS = ["speculative", "self_speculative", "prompt_lookup"]


@pytest.fixture(scope="module")
def target(test_device) -> HFCausalLM:
    return small_target(test_device, VOCAB)


@pytest.fixture(scope="module")
def draft(target) -> HFCausalLM:
    return perturbed_draft(target)


@pytest.fixture(scope="module")
def prompt(target) -> list[int]:
    return repeating_prompt(target)


def make_decoder(name: str, draft: HFCausalLM, gamma: int = 2):
    return {
        "speculative": lambda: SpeculativeDecoder(draft, num_draft_tokens=gamma),
        "self_speculative": lambda: SelfSpeculativeDecoder(exit_layer=1, num_draft_tokens=gamma),
        "prompt_lookup": lambda: PromptLookupDecoder(max_ngram=2, num_draft_tokens=gamma),
    }[name]()


def exact_joint(model: HFCausalLM, config: SamplingConfig, length: int, prompt: list[int]) -> dict:
    """P(continuation) under autoregressive sampling, μ carried along each prefix (XTC: the mixture over
    its coin, the distribution a random row seed sees)."""
    sampler = TokenSampler(config)
    joint: dict[tuple[int, ...], tuple[float, torch.Tensor | None]] = {(): (1.0, None)}
    for _ in range(length):
        prefixes = list(joint)
        ids = torch.tensor([prompt + list(p) for p in prefixes], device=model.device)
        logits = model.forward(ids, model.new_cache())[:, -1]
        generated = ids[:, len(prompt) :]
        state = None
        if config.is_stateful:
            start = sampler.initial_state(len(prefixes), logits.device).mu
            mu = [joint[p][1] if joint[p][1] is not None else start[i] for i, p in enumerate(prefixes)]
            state = SamplerState(torch.stack(mu))
        probs = sampler.distribution(logits, ids, generated=generated, state=state).double().cpu()
        following: dict[tuple[int, ...], tuple[float, torch.Tensor | None]] = {}
        for token in range(VOCAB):
            after = None
            if state is not None:
                chosen = torch.full((len(prefixes),), token, device=logits.device)
                after = sampler.advance_state(state, logits, chosen, ids, generated).mu
            for i, p in enumerate(prefixes):
                if probs[i, token] > 0:
                    following[p + (token,)] = (
                        joint[p][0] * float(probs[i, token]),
                        None if after is None else after[i],
                    )
        joint = following
    return {continuation: mass for continuation, (mass, _) in joint.items()}


def sampled(decoder, target, prompt, config):
    out = decoder.generate(target, [prompt] * DRAWS, config, LENGTH, GenerateOptions(row_seeds=range(DRAWS)))
    assert all(len(t) == LENGTH for t in out.token_ids)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("decoder_name", DECODERS)
def test_lossless_with_sampler_state(target, draft, prompt, decoder_name, config_name):
    config = CONFIGS[config_name]
    out = sampled(make_decoder(decoder_name, draft), target, prompt, config)
    if (decoder_name, config_name) == ("prompt_lookup", "no_repeat_ngram"):
        # a copied draft always completes an n-gram already in the context: banned, p(x) = 0
        assert out.stats["drafted_tokens"] > 0 and out.stats["accepted_tokens"] == 0
    else:
        assert out.stats["accepted_tokens"] > 0, "the test must exercise acceptances"
        assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"], "and rejections"
    assert joint_p_value(out.token_ids, exact_joint(target, config, LENGTH, prompt)) > 1e-3


def commit_through_every_draft(self, logits, extra, accepted, next_token, active):
    """Wrong: μ advances through all drafts, the rejected ones included."""
    full = torch.full_like(accepted, extra.shape[1])
    return ORIGINAL_COMMIT(self, logits, extra, full, next_token, active)


def histories_without_drafts(self, extra):
    """Wrong: every position sees only the committed history (drafts before it are hidden)."""
    return ORIGINAL_HISTORIES(self, torch.full_like(extra, rounds.HOLE))


def distributions_ignoring_the_xtc_coin(self, logits, extra):
    """Wrong: verification applies XTC at every position instead of with probability P."""
    always = TokenSampler(SamplingConfig(**{**self.sampler.config.__dict__, "xtc_probability": 1.0}))
    return ORIGINAL_DISTRIBUTIONS(_with_sampler(self, always), logits, extra)


def _with_sampler(state, sampler):
    clone = copy.copy(state)
    clone.sampler = sampler
    return clone


ORIGINAL_COMMIT = rounds.RoundState.commit_state
ORIGINAL_HISTORIES = rounds.RoundState.histories
ORIGINAL_DISTRIBUTIONS = rounds.RoundState.distributions
BROKEN = {
    "mirostat": ("commit_state", commit_through_every_draft),
    "dry": ("histories", histories_without_drafts),
    "no_repeat_ngram": ("histories", histories_without_drafts),
    "xtc": ("distributions", distributions_ignoring_the_xtc_coin),
}


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(BROKEN))
def test_the_same_test_rejects_a_wrong_state_rule(target, draft, prompt, monkeypatch, config_name):
    config = CONFIGS[config_name]
    attribute, broken = BROKEN[config_name]
    monkeypatch.setattr(rounds.RoundState, attribute, broken)
    out = sampled(make_decoder("speculative", draft), target, prompt, config)
    assert rejected(out.token_ids, exact_joint(target, config, LENGTH, prompt))


def rejected(samples: list[list[int]], joint: dict) -> bool:
    """The test's verdict on a broken decoder: a continuation the exact joint gives probability 0, or a
    chi-square p-value below 1e-3."""
    return any(tuple(s) not in joint for s in samples) or joint_p_value(samples, joint) < 1e-3


def committed_mu_and_reference(target, draft, prompt, monkeypatch, decoder_name):
    """Run a mirostat call; return the committed μ of its rows and μ advanced (AR rule) through each
    row's kept tokens, read from the call's own token table (holes skipped)."""
    import sampling.decoding.draft_verify as draft_verify

    states = []
    original = draft_verify.DraftVerifyDecoder._run

    def spy(self, model, call):
        states.append(call.state)
        return original(self, model, call)

    monkeypatch.setattr(draft_verify.DraftVerifyDecoder, "_run", spy)
    config = CONFIGS["mirostat"]
    out = make_decoder(decoder_name, draft, gamma=3).generate(
        target, [prompt] * 6, config, 6, GenerateOptions(row_seeds=range(6))
    )
    assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"] > 0
    (state,) = states
    sampler = TokenSampler(config)
    reference = []
    for row in state.tokens[:, state.prompt_width - 1 :].tolist():
        tokens = [t for t in row if t >= 0][1:]  # the prompt's last token, then everything kept
        mu = sampler.initial_state(1, target.device)
        for position, token in enumerate(tokens):
            ids = torch.tensor([prompt + tokens[:position]], device=target.device)
            logits = target.forward(ids, target.new_cache())[:, -1]
            chosen = torch.tensor([token], device=target.device)
            mu = sampler.advance_state(mu, logits, chosen, ids, ids[:, len(prompt) :])
        reference.append(mu.mu[0])
    return state.sampler_state.mu, torch.stack(reference)


@pytest.mark.parametrize("decoder_name", DECODERS)
def test_committed_mu_is_mu_through_the_kept_tokens_only(target, draft, prompt, monkeypatch, decoder_name):
    committed, reference = committed_mu_and_reference(target, draft, prompt, monkeypatch, decoder_name)
    assert torch.allclose(committed, reference, atol=1e-6)


def test_committed_mu_check_rejects_advancing_through_rejected_drafts(target, draft, prompt, monkeypatch):
    monkeypatch.setattr(rounds.RoundState, "commit_state", commit_through_every_draft)
    committed, reference = committed_mu_and_reference(target, draft, prompt, monkeypatch, "speculative")
    assert not torch.allclose(committed, reference, atol=1e-6)
