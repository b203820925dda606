"""The γ policies: the pure rules, the measured policy's warm-up, switch-off and probing, and the decoders
under it (a model whose forward advances a virtual clock, which the decoder reads instead of the wall clock,
makes the cost curve known exactly: no test depends on how loaded the machine is)."""

from __future__ import annotations

from typing import Any

import pytest

from rtdlm_experiments.models import HFCausalLM, build_tiny_random
from sampling import get_preset
from sampling.decoding import AutoregressiveDecoder, PromptLookupDecoder, SpeculativeDecoder
from sampling.decoding.speculation_policy import (
    ConstantPolicy,
    HeuristicPolicy,
    MeasuredPolicy,
    RoundReport,
    choose_gamma,
    expected_tokens,
    interpolated_cost,
    make_policy,
    round_speedup,
)


def test_expected_tokens_is_the_mean_of_a_truncated_geometric():
    for alpha in (0.0, 0.3, 0.9):
        for gamma in range(5):
            # P(emit ≥ i + 1 tokens) = α^i for i ≤ γ
            assert expected_tokens(alpha, gamma) == pytest.approx(sum(alpha**i for i in range(gamma + 1)))
            if alpha < 1:
                assert expected_tokens(alpha, gamma) == pytest.approx(
                    (1 - alpha ** (gamma + 1)) / (1 - alpha)
                )


def test_interpolated_cost():
    costs = {1: 1.0, 3: 2.0, 7: 4.0}
    assert [interpolated_cost(costs, k) for k in range(1, 9)] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.0]
    assert interpolated_cost({4: 2.0}, 1) == 2.0


def brute_force_best(alpha, gamma_max, draft_step, costs):
    speedups = {g: round_speedup(alpha, g, draft_step, costs) for g in range(gamma_max + 1)}
    best = max(speedups.values())
    return min(g for g, s in speedups.items() if s == best)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize(
    "costs",
    [
        {1: 1.0, 2: 1.01, 3: 1.02, 4: 1.03, 5: 1.05, 7: 1.1},  # GPU-like: nearly flat
        {1: 1.0, 2: 1.3, 3: 1.6, 4: 1.9, 5: 2.2, 7: 2.8},  # CPU-like: linear in k
        {1: 1.0, 2: 1.9, 5: 4.9, 7: 7.0},  # steep: verifying k tokens costs about k steps
    ],
)
@pytest.mark.parametrize("draft_step", [0.0, 0.05, 0.3])
def test_choose_gamma_is_the_argmax_of_the_predicted_speedup(alpha, costs, draft_step):
    chosen = choose_gamma(alpha, 6, draft_step, costs)
    assert chosen == brute_force_best(alpha, 6, draft_step, costs)
    assert chosen == 0 or round_speedup(alpha, chosen, draft_step, costs) > 1.0


def test_choose_gamma_examples():
    flat = {1: 1.0, 7: 1.1}
    assert choose_gamma(0.9, 6, 0.02, flat) == 6  # cheap verification, good drafts: draft a lot
    assert choose_gamma(0.0, 6, 0.02, flat) == 0  # drafts never accepted: never draft
    steep = {1: 1.0, 2: 2.0, 7: 7.0}
    assert choose_gamma(0.95, 6, 0.0, steep) == 0  # verifying costs as much as decoding: off
    linear = {1: 1.0, 2: 1.25, 7: 2.5}
    assert choose_gamma(0.8, 6, 0.05, linear) in range(2, 6)  # an interior optimum
    assert choose_gamma(0.3, 6, 0.05, linear, min_gain=0.5) == 0


def report(gamma: int, verify: float, overlap_per_draft: float = 0.0, draft: float = 0.0) -> RoundReport:
    verified = float(gamma)
    return RoundReport(gamma, overlap_per_draft == 1.0, overlap_per_draft * verified, verified, draft, verify)


def test_measured_policy_warms_up_then_switches_off_when_verification_is_steep():
    policy = MeasuredPolicy(gamma_max=4, probe_every=5, max_probe_every=20)
    warmup = []
    for _ in range(4):
        gamma = policy.next_gamma()
        warmup.append(gamma)
        assert policy.prediction(gamma) is None
        policy.observe(report(gamma, verify=1.0 + gamma, overlap_per_draft=0.6, draft=0.1 * gamma))
    assert warmup == [0, 4, 0, 4]
    chosen = []
    for _ in range(60):
        gamma = policy.next_gamma()
        chosen.append(gamma)
        policy.observe(report(gamma, verify=1.0 + gamma, overlap_per_draft=0.6, draft=0.1 * gamma))
    assert chosen.count(0) == 56 and all(policy.is_off(0) for _ in chosen)
    # a probe after probe_every off rounds; each that leaves speculation off doubles the wait, up to the cap
    assert [i for i, g in enumerate(chosen) if g] == [4, 14, 34, 54]


def test_measured_policy_turns_speculation_back_on_when_acceptance_rises():
    policy = MeasuredPolicy(gamma_max=4, probe_every=3)
    costs = {0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3, 4: 1.4}  # by γ: cheap verification
    for _ in range(4):
        gamma = policy.next_gamma()
        policy.observe(report(gamma, costs[gamma], overlap_per_draft=0.0, draft=0.05 * gamma))
    assert policy.next_gamma() == 0  # drafts are never accepted: off
    for _ in range(20):
        gamma = policy.next_gamma()
        policy.observe(report(gamma, costs[gamma], overlap_per_draft=1.0, draft=0.05 * gamma))
    assert policy.next_gamma() == 4 and policy.alpha > 0.9
    assert policy.probe_wait == 3  # back on: the next switch-off probes after probe_every rounds again
    prediction = policy.prediction(4)
    assert prediction is not None and prediction[0] == pytest.approx(expected_tokens(policy.alpha, 4))


def test_measured_policy_is_not_talked_out_of_speculating_by_one_lucky_plain_step():
    """Load only ever adds time, so the minimum of v(1), measured far more often than v(γ+1), drifts
    below the typical step and makes every γ ≥ 1 look slow; the median of recent rounds does not."""
    policy = MeasuredPolicy(gamma_max=4)
    for gamma in (0, 4, 0, 4):
        policy.next_gamma()
        policy.observe(report(gamma, 1.0 + 0.025 * gamma, overlap_per_draft=0.9, draft=0.05 * gamma))
    policy.observe(report(0, 0.3))  # one plain step that ran while nothing else did
    for _ in range(4):
        policy.observe(report(0, 1.0))
    assert policy.verify_costs[1] == 1.0
    assert policy.next_gamma() == 4


def test_heuristic_and_constant_policies():
    heuristic = HeuristicPolicy(3)
    heuristic.observe(report(3, 1.0, overlap_per_draft=1.0))
    assert heuristic.next_gamma() == 5
    heuristic.observe(report(5, 1.0, overlap_per_draft=0.5))
    assert heuristic.next_gamma() == 4
    constant = ConstantPolicy(3)
    constant.observe(report(3, 1.0, overlap_per_draft=1.0))
    assert constant.next_gamma() == 3 and constant.prediction(3) is None
    with pytest.raises(ValueError, match="policy='fast' is invalid"):
        make_policy("fast", 3)


class VirtualClock:
    """The decoders' round clock in these tests: it only moves when a `Timed` forward says it costs
    time, so measured costs are exactly the injected ones, whatever else the machine is running."""

    def __init__(self) -> None:
        self.now = 0.0

    def read(self, device=None) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch) -> VirtualClock:
    virtual = VirtualClock()
    monkeypatch.setattr("sampling.decoding.draft_verify._clock", virtual.read)
    return virtual


class Timed:
    """A model whose forward costs ``base + per_token · T`` virtual seconds on T input tokens, so its cost
    curve is known exactly (the tiny model's real compute time is not seen by the virtual clock)."""

    clock: VirtualClock | None = None
    """Set by the `timed` fixture to the test's clock."""

    def __init__(self, model: HFCausalLM, base: float, per_token: float) -> None:
        self._model, self._base, self._per_token = model, base, per_token

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward(self, input_ids, cache, attention_mask=None, last_positions=None):
        Timed.clock.now += self._base + self._per_token * input_ids.shape[1]
        return self._model.forward(input_ids, cache, attention_mask, last_positions)


@pytest.fixture(autouse=True)
def timed(clock: VirtualClock):
    Timed.clock = clock
    yield
    Timed.clock = None


@pytest.fixture(scope="module")
def tiny(test_device) -> HFCausalLM:
    return HFCausalLM(
        build_tiny_random(num_layers=2, vocab_size=64, seed=1).to(test_device), eos_token_ids=()
    )


PROMPTS = [[5, 6, 7, 5, 6], [1, 2, 3, 4]]


def test_measured_policy_switches_off_when_verifying_costs_as_much_as_decoding(tiny):
    target = Timed(tiny, base=0.0, per_token=0.05)  # k tokens cost k steps: speculation cannot win
    draft = Timed(tiny, base=0.02, per_token=0.0)  # the target itself: every draft accepted
    # predicted speedup of γ = 1..4 at most 0.83
    greedy = get_preset("deterministic")
    out = SpeculativeDecoder(draft, num_draft_tokens=4, policy="measured").generate(
        target, PROMPTS, greedy, 30
    )
    rates = out.accounting()
    assert rates["acceptance_rate"] == 1.0
    assert rates["speculation_off_fraction"] > 0.5
    assert rates["scoring_cost_ratio_k5"] > 3
    assert out.token_ids == AutoregressiveDecoder().generate(tiny, PROMPTS, greedy, 30).token_ids


def test_measured_policy_drafts_when_verification_is_cheap(tiny):
    target = Timed(tiny, base=0.05, per_token=0.0)  # a GPU-like flat curve
    greedy = get_preset("deterministic")
    decoder = SpeculativeDecoder(tiny, num_draft_tokens=4, policy="measured")
    out = decoder.generate(target, PROMPTS, greedy, 40)
    rates = out.accounting()
    assert rates["speculation_off_fraction"] == 0.0
    assert rates["mean_num_draft_tokens"] > 2.5
    assert rates["policy_predicted_speedup"] > 1.5 and rates["policy_measured_speedup"] > 1.5
    assert out.token_ids == AutoregressiveDecoder().generate(tiny, PROMPTS, greedy, 40).token_ids


def test_prompt_lookup_under_the_measured_policy_equals_autoregressive(tiny):
    greedy = get_preset("deterministic")
    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [9, 9, 9]]
    out = PromptLookupDecoder(max_ngram=2, num_draft_tokens=5, policy="measured").generate(
        tiny, prompts, greedy, 25
    )
    assert out.token_ids == AutoregressiveDecoder().generate(tiny, prompts, greedy, 25).token_ids
    assert out.stats["rounds"] >= 4 and out.stats["scoring_rounds_k1"] >= 2


def test_a_round_without_drafts_found_is_timed_as_a_plain_step():
    """Prompt lookup may find no draft for any row: the target then scored one token, not γ + 1."""
    policy = MeasuredPolicy(gamma_max=4)
    policy.observe(RoundReport(4, False, 0.0, 0.0, 0.001, 1.0, scored=0))
    policy.observe(RoundReport(4, False, 0.0, 0.0, 0.001, 3.0, scored=2))
    assert policy.verify_costs == {1: 1.0, 3: 3.0}


class Scripted(ConstantPolicy):
    """Offers the γ of ``script`` in turn (then its last one) and keeps every report it observes."""

    def __init__(self, script: list[int]) -> None:
        super().__init__(script[-1])
        self.script, self.reports = list(script), []

    def next_gamma(self) -> int:
        return self.script.pop(0) if len(self.script) > 1 else self.script[0]

    def observe(self, report: RoundReport) -> None:
        self.reports.append(report)


class Widths(Timed):
    """Records the width of every forward; each input token costs ``per_token`` seconds."""

    def __init__(self, model: HFCausalLM, per_token: float) -> None:
        super().__init__(model, base=0.0, per_token=per_token)
        self.widths: list[int] = []

    def forward(self, input_ids, cache, attention_mask=None, last_positions=None):
        self.widths.append(input_ids.shape[1])
        return super().forward(input_ids, cache, attention_mask, last_positions)


def test_tokens_from_plain_rounds_are_caught_up_outside_the_drafts_timing(tiny, monkeypatch):
    """After plain rounds the draft model has a backlog; charging it to the next round's drafts would
    inflate d, the per-draft cost, and keep a policy that switched speculation off from switching back."""
    policy = Scripted([0] * 8 + [3])
    monkeypatch.setattr("sampling.decoding.draft_verify.make_policy", lambda name, gamma: policy)
    draft = Widths(tiny, per_token=0.01)
    greedy = get_preset("deterministic")
    out = SpeculativeDecoder(draft, num_draft_tokens=3).generate(tiny, [PROMPTS[0]], greedy, 16)
    assert out.token_ids == AutoregressiveDecoder().generate(tiny, [PROMPTS[0]], greedy, 16).token_ids
    first = next(i for i, r in enumerate(policy.reports) if r.gamma)
    caught_up = policy.reports[first]
    catch_up, *drafting = draft.widths
    assert catch_up == len(PROMPTS[0]) - 1 + 8 and max(drafting) <= 2  # the prompt and 8 plain rounds
    assert caught_up.catch_up_seconds == pytest.approx(0.01 * catch_up)
    assert caught_up.draft_seconds == pytest.approx(0.01 * sum(drafting[:3]))  # its 3 drafts only


def test_a_call_that_never_drafts_never_runs_the_draft_model(tiny, monkeypatch):
    monkeypatch.setattr("sampling.decoding.draft_verify.make_policy", lambda name, gamma: Scripted([0]))
    draft = Widths(tiny, per_token=0.0)
    SpeculativeDecoder(draft).generate(tiny, PROMPTS, get_preset("deterministic"), 8)
    assert draft.widths == []
