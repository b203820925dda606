"""Speculative decoders are lossless: exact-distribution tests against enumerated AR probabilities."""

from __future__ import annotations

import itertools

import pytest
import torch

import sampling.decoding.draft_verify as draft_verify
from rtdlm_experiments.models import HFCausalLM, build_tiny_random
from sampling import SamplingConfig, TokenSampler, get_preset
from sampling.decoding import (
    AutoregressiveDecoder,
    GenerateOptions,
    PromptLookupDecoder,
    SelfSpeculativeDecoder,
    SpeculativeDecoder,
    verify_drafts,
)
from sampling.decoding.accounting import derive_rates, predicted_speedup
from sampling.decoding.draft_verify import Drafts
from sampling.decoding.prompt_lookup import lookup_draft
from sampling.decoding.speculation_policy import HeuristicPolicy
from sampling.decoding.stopping import StopStrings
from tests.sampling_helpers import joint_p_value, perturbed_draft, repeating_prompt, small_target

VOCAB = 16
PROMPT = [3, 7, 3, 9]
DRAWS = 20_000
LENGTH = 3


@pytest.fixture(scope="module")
def target(test_device) -> HFCausalLM:
    return small_target(test_device, VOCAB)


@pytest.fixture(scope="module")
def draft(target) -> HFCausalLM:
    return perturbed_draft(target)


@pytest.fixture(scope="module")
def prompt(target) -> list[int]:
    return repeating_prompt(target)


def exact_joint(
    model: HFCausalLM, config: SamplingConfig, length: int, prompt: list[int] = PROMPT
) -> dict[tuple[int, ...], float]:
    """P(continuation) under autoregressive sampling, by enumerating every prefix (no cache)."""
    sampler = TokenSampler(config)
    joint = {(): 1.0}
    for _ in range(length):
        prefixes = list(joint)
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        logits = model.forward(ids, model.new_cache())[:, -1]
        ids = ids.to(logits.device)
        generated = ids[:, len(prompt) :]
        probs = sampler.distribution(logits, ids, generated=generated).double().cpu().numpy()
        joint = {
            p + (t,): joint[p] * probs[i, t]
            for i, p in enumerate(prefixes)
            for t in range(VOCAB)
            if probs[i, t] > 0
        }
    return joint


CONFIGS = {
    "plain": SamplingConfig(),
    "top-k/top-p": SamplingConfig(temperature=0.8, top_k=6, top_p=0.85),
    "repetition": SamplingConfig(temperature=1.1, repetition_penalty=1.8, presence_penalty=0.3),
}


def decoders(draft: HFCausalLM, gamma: int = 2, policy: str = "constant") -> dict[str, object]:
    return {
        "speculative": SpeculativeDecoder(draft, num_draft_tokens=gamma, policy=policy),
        "self_speculative": SelfSpeculativeDecoder(exit_layer=1, num_draft_tokens=gamma, policy=policy),
        "prompt_lookup": PromptLookupDecoder(max_ngram=2, num_draft_tokens=gamma, policy=policy),
    }


@pytest.mark.slow
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_lossless_joint_distribution(target, draft, prompt, decoder_name, config_name):
    config = CONFIGS[config_name]
    decoder = decoders(draft)[decoder_name]
    out = decoder.generate(target, [prompt] * DRAWS, config, LENGTH, GenerateOptions(row_seeds=range(DRAWS)))
    assert all(len(t) == LENGTH for t in out.token_ids)
    assert out.stats["accepted_tokens"] > 0, "the test must exercise acceptances"
    assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"], "and rejections"
    assert joint_p_value(out.token_ids, exact_joint(target, config, LENGTH, prompt)) > 1e-3


@pytest.mark.slow
def test_lossless_when_unsure_drafts_end_the_round(target, draft, prompt):
    """Rows stop drafting at different positions, chosen from the draft's side only: still exact."""
    config = CONFIGS["top-k/top-p"]
    decoder = SpeculativeDecoder(draft, num_draft_tokens=3, min_confidence=0.35)
    out = decoder.generate(
        target, [prompt] * DRAWS, config, LENGTH + 1, GenerateOptions(row_seeds=range(DRAWS))
    )
    offered_in_full = 3 * out.stats["row_rounds"]
    assert 0.2 * offered_in_full < out.stats["drafted_tokens"] < 0.9 * offered_in_full
    assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"] > 0
    assert joint_p_value(out.token_ids, exact_joint(target, config, LENGTH + 1, prompt)) > 1e-3


def resample_from_target_on_rejection(target_probs, drafts, seeds, first_step):
    """The original module's rule: on rejection draw from p instead of norm(max(0, p − q))."""
    verdict = verify_drafts(target_probs, drafts, seeds, first_step)
    rows = torch.arange(len(seeds))
    p_next = target_probs[rows, verdict.accepted]
    rejected = verdict.accepted < drafts.lengths
    keys = draft_verify.noise.row_keys(seeds, first_step + verdict.accepted + 1000, 9)
    from_p = draft_verify.noise.race_argmax(torch.log(p_next), keys)
    return draft_verify.Verdict(
        verdict.accepted, torch.where(rejected, from_p, verdict.next_token), verdict.overlap
    )


@pytest.mark.slow
@pytest.mark.parametrize("decoder_name", ["speculative", "prompt_lookup"])
def test_the_same_test_rejects_resampling_from_the_target(target, draft, prompt, monkeypatch, decoder_name):
    config = CONFIGS["plain"]
    monkeypatch.setattr(draft_verify, "verify_drafts", resample_from_target_on_rejection)
    out = decoders(draft)[decoder_name].generate(
        target, [prompt] * DRAWS, config, LENGTH, GenerateOptions(row_seeds=range(DRAWS))
    )
    assert joint_p_value(out.token_ids, exact_joint(target, config, LENGTH, prompt)) < 1e-3


@pytest.mark.slow
def test_first_token_frequencies_on_the_guide_example():
    """Target [0.1, 0.2, 0.7], draft uniform: the broken rule gave [0.17, 0.29, 0.54]; ours gives p."""
    n = 200_000
    p = torch.tensor([0.1, 0.2, 0.7]).expand(n, 1, 3).contiguous()
    p = torch.cat([p, p], dim=1)
    q = torch.full((n, 1, 3), 1 / 3)
    seeds = torch.arange(n)
    tokens = draft_verify.sample_from_probs(q[:, 0], seeds, torch.zeros(n, dtype=torch.long))
    verdict = verify_drafts(
        p,
        Drafts(tokens.unsqueeze(1), q, torch.ones(n, dtype=torch.long)),
        seeds,
        torch.zeros(n, dtype=torch.long),
    )
    first = torch.where(verdict.accepted > 0, tokens, verdict.next_token)
    freq = torch.bincount(first, minlength=3).double() / n
    assert torch.allclose(freq, torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64), atol=0.004)
    assert verdict.overlap[:, 0].mean().item() == pytest.approx(0.1 + 0.2 + 1 / 3)


@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_greedy_equals_greedy_autoregressive(decoder_name, test_device):
    target = HFCausalLM(build_tiny_random(num_layers=3, vocab_size=64, seed=1).to(test_device))
    draft = HFCausalLM(build_tiny_random(num_layers=1, vocab_size=64, seed=2).to(test_device))
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9]]
    greedy = get_preset("deterministic", repetition_penalty=1.3)
    for gamma in (1, 3, 5):
        heuristic = SpeculativeDecoder(draft, gamma, policy="heuristic")
        measured = decoders(draft, gamma, policy="measured")
        for decoder in (
            {**decoders(draft, gamma), "speculative": heuristic}[decoder_name],
            measured[decoder_name],
        ):
            check_greedy_equals_autoregressive(decoder, target, prompts, greedy)


def test_greedy_with_confident_drafts_only_equals_greedy_autoregressive(test_device):
    target = HFCausalLM(build_tiny_random(num_layers=3, vocab_size=64, seed=1).to(test_device))
    draft = HFCausalLM(build_tiny_random(num_layers=1, vocab_size=64, seed=2).to(test_device))
    prompts = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9]]
    greedy = get_preset("deterministic", repetition_penalty=1.3)
    for policy in ("constant", "measured"):
        decoder = SpeculativeDecoder(draft, 5, min_confidence=0.05, policy=policy)
        check_greedy_equals_autoregressive(decoder, target, prompts, greedy)
        out = decoder.generate(target, prompts, greedy, 20)
        assert 0 < out.stats["drafted_tokens"] < 5 * out.stats["row_rounds"], "some drafts must be cut"


def test_rounds_cut_short_report_the_drafts_made_not_the_gamma_chosen(target, draft, prompt):
    """A draft this unsure of itself (vocab 16) is never 99% sure: each round drafts one column (the
    last round none: one token of room left)."""
    decoder = SpeculativeDecoder(draft, num_draft_tokens=3, min_confidence=0.99)
    out = decoder.generate(target, [prompt], get_preset("balanced"), 12, GenerateOptions(row_seeds=[7]))
    assert out.stats["draft_tokens_offered"] == out.stats["drafted_tokens"] == out.draft_forwards
    assert 0 < derive_rates(out.stats)["mean_num_draft_tokens"] <= 1


def check_greedy_equals_autoregressive(decoder, target, prompts, greedy):
    for max_new in (1, 7, 20):
        want = AutoregressiveDecoder().generate(target, prompts, greedy, max_new)
        stop = want.token_ids[1][min(4, len(want.token_ids[1]) - 1)]
        want_stopped = AutoregressiveDecoder().generate(
            target, prompts, greedy, max_new, GenerateOptions(stop_ids=[stop])
        )
        got = decoder.generate(target, prompts, greedy, max_new)
        assert got.token_ids == want.token_ids
        got_stopped = decoder.generate(target, prompts, greedy, max_new, GenerateOptions(stop_ids=[stop]))
        assert got_stopped.token_ids == want_stopped.token_ids
        assert got_stopped.finished_by_stop == want_stopped.finished_by_stop
        for row, tokens in enumerate(got.token_ids):
            assert got.model_logprobs[row] == pytest.approx(want.model_logprobs[row], abs=1e-4)
            assert len(got.entropies[row]) == len(tokens)


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def letters(ids) -> str:
    """A detokenizer for the tests: token t is one letter (several tokens share a letter)."""
    return "".join(LETTERS[t % 26] for t in ids)


def cut_at_stop_string(tokens: list[int], stops: StopStrings) -> tuple[list[int], bool]:
    """The reference: feed an autoregressive output one token at a time, end at the completing token."""
    tracker = stops.start(1)
    for position, token in enumerate(tokens):
        if tracker.extend(0, [token]) is not None:
            return tokens[: position + 1], True
    return tokens, False


@pytest.fixture(scope="module")
def models64(test_device) -> tuple[HFCausalLM, HFCausalLM]:
    target = HFCausalLM(
        build_tiny_random(num_layers=3, vocab_size=64, seed=1).to(test_device), eos_token_ids=()
    )
    draft = HFCausalLM(
        build_tiny_random(num_layers=1, vocab_size=64, seed=2).to(test_device), eos_token_ids=()
    )
    return target, draft


PROMPTS64 = [[5, 6, 7, 5, 6], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9]]
GREEDY = get_preset("deterministic", repetition_penalty=1.3)


@pytest.mark.parametrize("policy", ["constant", "measured"])
@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_stop_strings_keep_what_autoregressive_keeps_up_to_the_stop(models64, decoder_name, policy):
    target, draft = models64
    want = AutoregressiveDecoder().generate(target, PROMPTS64, GREEDY, 20).token_ids
    # a two-token stop string from row 1's output, and one that never occurs
    stops = StopStrings((letters(want[1][3:5]), "zzzzzzzz"), letters)
    expected = [cut_at_stop_string(row, stops) for row in want]
    assert expected[1][1] and len(expected[1][0]) <= 5
    decoder = decoders(draft, 4, policy)[decoder_name]
    got = decoder.generate(target, PROMPTS64, GREEDY, 20, GenerateOptions(stop_strings=stops))
    assert got.token_ids == [tokens for tokens, _ in expected]
    assert got.finished_by_stop == [stopped for _, stopped in expected]
    assert [len(x) for x in got.model_logprobs] == [len(t) for t in got.token_ids]


@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_ignore_eos(models64, decoder_name):
    target, draft = models64
    plain = AutoregressiveDecoder().generate(target, PROMPTS64, GREEDY, 12).token_ids
    eos = plain[0][3]
    with_eos = HFCausalLM(target.model, eos_token_ids=(eos,))
    decoder = decoders(draft, 3)[decoder_name]
    ignored = decoder.generate(with_eos, PROMPTS64, GREEDY, 12, GenerateOptions(ignore_eos=True))
    assert ignored.token_ids == plain and not any(ignored.finished_by_stop)
    honoured = decoder.generate(with_eos, PROMPTS64, GREEDY, 12)
    assert honoured.token_ids[0] == plain[0][:3] and honoured.finished_by_stop[0]
    explicit = decoder.generate(
        with_eos, PROMPTS64, GREEDY, 12, GenerateOptions(stop_ids=[eos], ignore_eos=True)
    )
    assert explicit.token_ids[0] == plain[0][:3], "explicit stop ids still end rows"


@pytest.mark.parametrize("policy", ["constant", "measured"])
def test_progress_accounts_for_every_token_and_released_budget(models64, policy):
    target, draft = models64
    want = AutoregressiveDecoder().generate(target, PROMPTS64, GREEDY, 15).token_ids
    calls: list[tuple[int, int]] = []
    out = SpeculativeDecoder(draft, 3, policy=policy).generate(
        target,
        PROMPTS64,
        GREEDY,
        15,
        GenerateOptions(stop_ids=[want[1][2]], progress=lambda n, r: calls.append((n, r))),
    )
    new, released = sum(n for n, _ in calls), sum(r for _, r in calls)
    assert new == out.num_new_tokens and released > 0
    assert new + released == len(PROMPTS64) * 15
    assert len(calls) == out.stats["rounds"]


@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_max_batch_size_keeps_input_order_and_outputs(models64, decoder_name):
    target, draft = models64
    prompts = PROMPTS64 + [[4, 4, 4, 4], [7, 1]]
    want = AutoregressiveDecoder().generate(target, prompts, GREEDY, 10, GenerateOptions(stop_ids=[3]))
    decoder = decoders(draft, 3)[decoder_name]
    for size in (1, 2, 4, 5, 9):
        got = decoder.generate(
            target, prompts, GREEDY, 10, GenerateOptions(stop_ids=[3], max_batch_size=size)
        )
        assert got.token_ids == want.token_ids
        assert got.finished_by_stop == want.finished_by_stop
    with pytest.raises(ValueError, match="max_batch_size=0 is invalid"):
        decoder.generate(target, prompts, GREEDY, 10, GenerateOptions(max_batch_size=0))


def test_sampled_rows_do_not_depend_on_max_batch_size_without_stops(models64):
    """Same row seeds and the same γ every round (no stops, one budget): identical draws in any batching."""
    target, draft = models64
    config = SamplingConfig(temperature=1.0, top_k=20)
    decoder = SpeculativeDecoder(draft, 3)
    whole = decoder.generate(target, PROMPTS64, config, 9, GenerateOptions(row_seeds=[11, 12, 13]))
    split = decoder.generate(
        target, PROMPTS64, config, 9, GenerateOptions(row_seeds=[11, 12, 13], max_batch_size=2)
    )
    assert split.token_ids == whole.token_ids


class PastDependentPolicy(HeuristicPolicy):
    """γ ∈ {0, 1, 2, 3} chosen from the last round's outcome: adaptive, hence a test of losslessness
    under γ changes (including speculation switched off) that does not depend on timings."""

    def observe(self, report) -> None:
        self.gamma = int(report.overlap_sum * 7 + report.gamma) % 4


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["measured", "past-dependent"])
@pytest.mark.parametrize("decoder_name", ["speculative", "self_speculative", "prompt_lookup"])
def test_lossless_when_gamma_changes_between_rounds(target, draft, prompt, monkeypatch, decoder_name, policy):
    config = CONFIGS["top-k/top-p"]
    if policy == "past-dependent":
        monkeypatch.setattr(draft_verify, "make_policy", lambda name, gamma: PastDependentPolicy(2))
    decoder = decoders(draft, 3, "measured")[decoder_name]
    out = decoder.generate(
        target,
        [prompt] * DRAWS,
        config,
        LENGTH + 1,
        GenerateOptions(row_seeds=range(DRAWS), max_batch_size=DRAWS // 4),
    )
    assert out.stats["accepted_tokens"] > 0
    assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"]
    if policy == "past-dependent":
        assert out.stats.get("scoring_rounds_k1", 0) > 0 and out.stats.get("scoring_rounds_k3", 0) > 0
    assert joint_p_value(out.token_ids, exact_joint(target, config, LENGTH + 1, prompt)) > 1e-3


def test_cache_rollback_matches_a_fresh_forward(target):
    cache = target.new_cache()
    prefix = torch.tensor([PROMPT + [1, 2]])
    target.forward(prefix, cache)
    target.forward(torch.tensor([[5, 6, 7]]), cache)  # drafts, then rejected
    target.crop_cache(cache, prefix.shape[1])
    after_rollback = target.forward(torch.tensor([[8]]), cache)[0, -1]
    fresh = target.forward(torch.cat([prefix, torch.tensor([[8]])], dim=1), target.new_cache())[0, -1]
    assert torch.allclose(after_rollback, fresh, atol=1e-5)


def test_accounting_is_consistent(target, draft):
    out = SpeculativeDecoder(draft, num_draft_tokens=3).generate(
        target, [PROMPT] * 4, get_preset("balanced", seed=1), 16
    )
    stats = out.accounting()
    assert 0 <= stats["acceptance_rate"] <= 1 and 0 <= stats["analytic_acceptance"] <= 1
    assert stats["accepted_tokens"] <= stats["drafted_tokens"]
    assert 1 <= stats["tokens_per_target_forward"] <= 4
    assert stats["cost_ratio"] > 0 and out.draft_forwards > 0
    assert stats["acceptance_rate_pos1"] >= 0
    assert sum(map(len, out.token_ids)) == 64


def test_predicted_speedup_formula():
    assert predicted_speedup(0.0, 4, 0.0) == pytest.approx(1.0)
    assert predicted_speedup(1.0, 4, 0.0) == pytest.approx(5.0)
    assert predicted_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8**5) / (0.2 * 1.4))


def test_lookup_draft():
    assert lookup_draft([1, 2, 3, 4, 9, 1, 2, 3], 3, 2) == [4, 9]
    assert lookup_draft([1, 2, 3], 3, 2) == []
    assert lookup_draft([5, 1, 7, 1], 2, 3) == [7, 1]
    assert lookup_draft([4], 3, 2) == []


def test_self_speculative_rejects_bad_exit_layer(target):
    with pytest.raises(ValueError, match="exit_layer=3 is invalid for a 3-layer model"):
        SelfSpeculativeDecoder(exit_layer=3).generate(target, [PROMPT], SamplingConfig(), 4)


def test_draft_with_another_vocabulary_is_refused(target):
    other = HFCausalLM(build_tiny_random(num_layers=1, vocab_size=VOCAB + 1, seed=3).to(target.device))
    with pytest.raises(ValueError, match="target's tokenizer"):
        SpeculativeDecoder(other).generate(target, [PROMPT], SamplingConfig(), 4)


@pytest.mark.slow
def test_enumeration_matches_autoregressive_sampling(target):
    """Sanity check of the reference itself: AR draws follow the enumerated joint."""
    config = CONFIGS["top-k/top-p"]
    out = AutoregressiveDecoder().generate(
        target, [PROMPT] * DRAWS, config, LENGTH, GenerateOptions(row_seeds=range(DRAWS))
    )
    joint = exact_joint(target, config, LENGTH)
    assert sum(joint.values()) == pytest.approx(1.0)
    assert joint_p_value(out.token_ids, joint) > 1e-3
    assert len(list(itertools.islice(joint, 3))) == 3


def test_sparse_race_draws_the_same_token_as_the_dense_race():
    probs = torch.softmax(torch.randn(64, 5000, generator=torch.Generator().manual_seed(0)) * 3, dim=1)
    probs[probs < 1e-3] = 0.0
    probs /= probs.sum(1, keepdim=True)
    seeds, steps = torch.arange(64), torch.full((64,), 5)
    dense = draft_verify.noise.race_argmax(torch.log(probs), draft_verify.noise.row_keys(seeds, steps, 1))
    assert torch.equal(draft_verify.sample_from_probs(probs, seeds, steps, stream=1), dense)
