"""The sampler against a slow float64 reference written straight from DESIGN.md's contract."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampling import ORDERS, PRESETS, SamplingConfig, TokenSampler, get_preset, noise
from sampling.sampler import top_candidates
from sampling.stages.classic import top_p_filter
from sampling.stages.history import apply_penalties
from tests.sampling_helpers import STAT_LOGITS, chi_square_p

# ---------------------------------------------------------------------------------------------------
# Reference: one row at a time, float64, per-token definitions, no sorting tricks.


def reference_distribution(logits, config: SamplingConfig, history=(), generated=None) -> np.ndarray:
    values = np.asarray(logits, dtype=np.float64).copy()
    context = [t for t in history if t >= 0]
    if config.repetition_window is not None:
        context = context[-config.repetition_window :]
    for token in set(context):
        v = values[token]
        values[token] = v / config.repetition_penalty if v > 0 else v * config.repetition_penalty
    counted = [t for t in (history if generated is None else generated) if t >= 0]
    for token in set(counted):
        values[token] -= config.frequency_penalty * counted.count(token) + config.presence_penalty
    if np.isposinf(values).any():
        values = np.where(np.isposinf(values), 0.0, -np.inf)
    if config.is_greedy:
        out = np.zeros_like(values)
        out[int(np.argmax(values))] = 1.0
        return out

    def current_probs(v):
        finite = np.isfinite(v)
        p = np.zeros_like(v)
        p[finite] = np.exp(v[finite] - v[finite].max())
        return p / p.sum()

    for stage in ORDERS[config.order]:
        if stage == "temperature":
            values = values / config.temperature
        elif stage == "top_k" and 0 < config.top_k < len(values):
            kth = np.sort(values)[::-1][config.top_k - 1]
            values = np.where(values >= kth, values, -np.inf)
        elif stage == "top_p" and config.top_p < 1:
            p = current_probs(values)
            keep = np.array([p[p > p[i]].sum() < config.top_p for i in range(len(p))]) & (p > 0)
            values = np.where(keep, values, -np.inf)
        elif stage == "min_p" and config.min_p > 0:
            p = current_probs(values)
            values = np.where(p >= config.min_p * p.max(), values, -np.inf)
    return current_probs(values)


def dropping_crossing_token_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """The original module's bug: keep tokens while the *inclusive* cumulative mass is < p."""
    probs = torch.softmax(logits.double(), -1)
    sorted_probs, order = torch.sort(probs, descending=True)
    keep_sorted = torch.cumsum(sorted_probs, -1) < top_p
    keep_sorted[..., 0] = True
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return logits.masked_fill(~keep, float("-inf"))


# ---------------------------------------------------------------------------------------------------
# Exact distribution


def adversarial_rows() -> list[list[float]]:
    return [
        [2.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -3.0],  # ties at the top-k / top-p boundaries
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # all equal
        [30.0, 0.0, 0.0, -1.0, -2.0, -2.0, -5.0, -9.0],  # one dominant token
        [1.0, float("-inf"), 0.5, float("-inf"), 0.5, 0.0, float("-inf"), -0.5],  # masked entries
        [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4],  # flat
        [1.0, float("inf"), 0.0, float("inf"), -1.0, 2.0, 0.0, 0.0],  # +inf tokens share the mass
    ]


CLASSIC_ORDERS = sorted(name for name, order in ORDERS.items() if {"top_k", "top_p", "min_p"} <= set(order))
"""The named orders that hold the classic filters (llama.cpp's mirostat chain holds none of them)."""

CONFIGS = [
    SamplingConfig(),
    SamplingConfig(temperature=0.7, top_k=3),
    SamplingConfig(top_p=0.5),
    SamplingConfig(top_p=0.9, temperature=1.3),
    SamplingConfig(min_p=0.3),
    SamplingConfig(temperature=0.6, top_k=5, top_p=0.8, min_p=0.1),
    SamplingConfig(temperature=1.5, top_k=2, top_p=0.3, min_p=0.5, repetition_penalty=1.3),
    SamplingConfig(top_p=0.7, repetition_penalty=0.8, frequency_penalty=0.4, presence_penalty=0.3),
    SamplingConfig(temperature=0.9, top_p=0.6, repetition_penalty=1.5, repetition_window=2),
    SamplingConfig(temperature=0.0, repetition_penalty=2.0),
    SamplingConfig(do_sample=False, top_k=1),
]


@pytest.mark.parametrize("order", CLASSIC_ORDERS)
@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"T{c.temperature}-k{c.top_k}-p{c.top_p}-m{c.min_p}"
)
def test_distribution_matches_reference_on_adversarial_rows(config, order):
    config = config.replace(order=order)
    rows = adversarial_rows()
    history = torch.tensor([[0, 2, 2, -1, 5]] * len(rows))
    probs = TokenSampler(config).distribution(torch.tensor(rows), history)
    for row, got in zip(rows, probs, strict=True):
        want = reference_distribution(row, config, [0, 2, 2, -1, 5])
        np.testing.assert_allclose(got.numpy(), want, atol=1e-6)


@pytest.mark.parametrize("order", CLASSIC_ORDERS)
@pytest.mark.parametrize("vocab", [3, 50, 5000])
def test_distribution_matches_reference_on_random_logits(order, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen) * torch.tensor([[0.5], [1.0], [2.0], [4.0], [8.0], [0.1]])
    logits[:, : vocab // 3] = logits[:, : vocab // 3].round()  # plenty of exact ties
    history = torch.randint(0, vocab, (6, 12), generator=gen)
    for config in [*PRESETS.values(), SamplingConfig(top_p=0.95), SamplingConfig(min_p=0.05, top_p=0.99)]:
        config = config.replace(order=order)
        probs = TokenSampler(config).distribution(logits, history)
        for b in range(logits.shape[0]):
            want = reference_distribution(logits[b].tolist(), config, history[b].tolist())
            np.testing.assert_allclose(probs[b].numpy(), want, atol=2e-6)


def test_large_vocab_fallback_paths_are_exact():
    """Flat rows force the candidate set to grow (64 → 512 → ... → V); the answer must not change."""
    gen = torch.Generator().manual_seed(1)
    vocab = 40_000
    logits = torch.randn(3, vocab, generator=gen) * torch.tensor([[0.01], [0.3], [3.0]])
    for config in [
        SamplingConfig(top_p=0.9),
        SamplingConfig(min_p=0.5),
        SamplingConfig(top_k=3000, top_p=0.99),
    ]:
        probs = TokenSampler(config).distribution(logits)
        for b in range(3):
            np.testing.assert_allclose(probs[b].numpy(), _dense_reference_fast(logits[b], config), atol=1e-6)


def _dense_reference_fast(row: torch.Tensor, config: SamplingConfig) -> np.ndarray:
    """Vectorized form of the reference for large vocabularies (no ties in these rows)."""
    values = row.double().numpy().copy()
    for stage in ORDERS[config.order]:
        if stage == "temperature":
            values = values / config.temperature
        elif stage == "top_k" and config.top_k > 0:
            values = np.where(values >= np.sort(values)[::-1][config.top_k - 1], values, -np.inf)
        elif stage in ("top_p", "min_p"):
            p = np.exp(values - values.max())
            p /= p.sum()
            if stage == "min_p" and config.min_p > 0:
                values = np.where(p >= config.min_p * p.max(), values, -np.inf)
            if stage == "top_p" and config.top_p < 1:
                order = np.argsort(-p, kind="stable")
                above = np.empty_like(p)
                above[order] = np.cumsum(p[order]) - p[order]
                values = np.where(above < config.top_p, values, -np.inf)
    p = np.exp(values - values.max())
    return p / p.sum()


def test_greedy_is_argmax_with_ties_to_lowest_id_and_ignores_filters():
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 5.0, 2.0]])
    for config in [SamplingConfig(temperature=0.0, top_k=1, top_p=0.1), SamplingConfig(do_sample=False)]:
        out = TokenSampler(config).sample(logits)
        assert out.tokens.tolist() == [1, 0]
        assert out.num_kept.tolist() == [1, 1]
        assert out.logprobs.tolist() == [0.0, 0.0]


def test_nan_logits_raise_naming_rows():
    logits = torch.zeros(3, 5)
    logits[1, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN in row\(s\) \[1\]"):
        TokenSampler(SamplingConfig()).sample(logits)
    with pytest.raises(ValueError, match="NaN"):
        TokenSampler(SamplingConfig(do_sample=False)).distribution(logits)


def test_all_masked_row_raises():
    logits = torch.zeros(2, 4)
    logits[0] = float("-inf")
    with pytest.raises(ValueError, match=r"all -inf in row\(s\) \[0\]"):
        TokenSampler(SamplingConfig(top_p=0.9)).sample(logits)


def test_sample_output_fields():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]]))
    out = TokenSampler(SamplingConfig(seed=3)).sample(logits)
    token = out.tokens.item()
    assert out.logprobs.item() == pytest.approx(math.log([0.5, 0.25, 0.125, 0.125][token]), abs=1e-6)
    assert out.model_logprobs.item() == pytest.approx(out.logprobs.item(), abs=1e-6)
    assert out.entropy.item() == pytest.approx(1.2130076, abs=1e-5)
    assert out.num_kept.item() == 4
    filtered = TokenSampler(SamplingConfig(top_k=1, temperature=2.0, seed=3)).sample(logits)
    assert filtered.tokens.item() == 0 and filtered.num_kept.item() == 1
    assert filtered.model_logprobs.item() == pytest.approx(math.log(0.5), abs=1e-6)


def test_three_dimensional_logits_use_the_last_position():
    logits = torch.randn(2, 3, 10)
    sampler = TokenSampler(SamplingConfig(top_k=4))
    assert torch.equal(sampler.distribution(logits), sampler.distribution(logits[:, -1]))


# ---------------------------------------------------------------------------------------------------
# Statistical: draws follow distribution(), and the test has the power to reject a wrong sampler.


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(),
        SamplingConfig(top_p=0.8),
        get_preset("balanced"),
        get_preset("creative", order="vllm"),
        SamplingConfig(temperature=0.5, min_p=0.2, top_p=0.9, order="llamacpp"),
    ],
)
def test_samples_follow_distribution_chi_square(config):
    draws = 200_000
    sampler = TokenSampler(config)
    logits = STAT_LOGITS.expand(draws, -1)
    tokens = sampler.sample(logits, row_seeds=torch.arange(draws), step=7).tokens
    assert chi_square_p(tokens, sampler.distribution(STAT_LOGITS[None])[0]) > 1e-3


def test_chi_square_rejects_top_p_that_drops_the_crossing_token():
    """Same test, wrong sampler: the original module's top-p must be caught."""
    config = SamplingConfig(top_p=0.8)
    broken = torch.softmax(dropping_crossing_token_top_p(STAT_LOGITS[None], 0.8), -1)
    draws = 200_000
    broken_tokens = torch.multinomial(
        broken.expand(draws, -1), 1, replacement=True, generator=torch.Generator().manual_seed(0)
    ).squeeze(1)
    right = TokenSampler(config).distribution(STAT_LOGITS[None])[0]
    assert (
        chi_square_p(broken_tokens, torch.softmax(dropping_crossing_token_top_p(STAT_LOGITS, 0.8), -1)) > 1e-3
    )
    with pytest.raises(AssertionError, match="zero probability"):
        chi_square_p(torch.multinomial(right.expand(draws, -1), 1, replacement=True).squeeze(1), broken[0])
    # and on the right support, the wrong sampler's frequencies are rejected outright
    assert chi_square_p(broken_tokens, right) < 1e-3


def test_fast_top_p_differs_from_the_broken_rule():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert torch.isfinite(top_p_filter(logits, 0.6)).sum() == 2  # 0.5 < 0.6, so the crossing 0.3 stays
    assert torch.isfinite(dropping_crossing_token_top_p(logits, 0.6)).sum() == 1


# ---------------------------------------------------------------------------------------------------
# Seeds


def test_seeded_draws_are_reproducible():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    config = get_preset("creative", seed=11)
    first = [TokenSampler(config).sample(logits).tokens for _ in range(2)]
    assert torch.equal(first[0], first[1])
    sampler_a, sampler_b = TokenSampler(config), TokenSampler(config)
    runs = [[s.sample(logits).tokens for _ in range(5)] for s in (sampler_a, sampler_b)]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert len({tuple(t.tolist()) for t in runs[0]}) > 1, "steps must advance the noise"


def test_draws_are_batch_invariant():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(16, 2000, generator=gen) * 2
    history = torch.randint(-1, 2000, (16, 20), generator=gen)
    seeds = torch.arange(100, 116)
    sampler = TokenSampler(get_preset("balanced", top_p=0.99))
    for step in range(20):
        full = sampler.sample(logits, history, row_seeds=seeds, step=step)
        perm = torch.randperm(16, generator=gen)[:5]
        part = sampler.sample(logits[perm], history[perm], row_seeds=seeds[perm], step=step)
        assert torch.equal(full.tokens[perm], part.tokens)
        assert torch.allclose(full.logprobs[perm], part.logprobs)
        alone = sampler.sample(logits[perm[:1]], history[perm[:1]], row_seeds=seeds[perm[:1]], step=step)
        assert alone.tokens.item() == full.tokens[perm[0]].item()


def test_row_seed_shape_is_checked():
    with pytest.raises(ValueError, match="row_seeds"):
        TokenSampler(SamplingConfig()).sample(torch.zeros(2, 5), row_seeds=torch.arange(3))


# ---------------------------------------------------------------------------------------------------
# Penalties


def test_penalties_follow_the_contract():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    out = apply_penalties(
        logits,
        torch.tensor([[0, 1, 0, -1, 3]]),
        repetition_penalty=2.0,
        repetition_window=3,
        generated=torch.tensor([[3, 3, -5, 2]]),
        frequency_penalty=0.5,
        presence_penalty=0.25,
    )
    # window of 3 real tokens = [1, 0, 3]; counts over generated: {3: 2, 2: 1}
    assert out.tolist() == [[1.0, -2.0, 0.5 - 0.5 - 0.25, 1.5 - 1.0 - 0.25, 0.0]]
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0, 0.0]], "input must not be modified"


def test_penalty_padding_does_not_touch_token_zero():
    logits = torch.tensor([[2.0, 4.0], [2.0, 4.0]])
    out = apply_penalties(logits, torch.tensor([[-1, 1], [-1, -1]]), repetition_penalty=2.0)
    assert out.tolist() == [[2.0, 2.0], [2.0, 4.0]]


# ---------------------------------------------------------------------------------------------------
# Config, presets, validation


def test_presets_have_the_guide_values():
    expected = {
        "creative": (1.2, 0.95, 100, 1.2, True),
        "balanced": (0.7, 0.9, 50, 1.15, True),
        "precise": (0.3, 0.9, 20, 1.1, True),
        "deterministic": (0.0, 1.0, 0, 1.0, False),
    }
    got = {
        n: (c.temperature, c.top_p, c.top_k, c.repetition_penalty, c.do_sample) for n, c in PRESETS.items()
    }
    assert got == expected
    assert PRESETS["deterministic"].is_greedy and not PRESETS["precise"].is_greedy
    assert get_preset("balanced", seed=3).seed == 3


def test_unknown_preset_lists_names():
    with pytest.raises(ValueError, match=r"balanced.*creative.*deterministic.*precise"):
        get_preset("wild")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -0.1, ">= 0"),
        ("temperature", float("nan"), "finite"),
        ("temperature", float("inf"), "finite"),
        ("top_k", -1, ">= 0"),
        ("top_k", 1.5, "integer"),
        ("top_p", 0.0, r"\(0, 1\]"),
        ("top_p", 1.5, r"\(0, 1\]"),
        ("min_p", -0.1, r"\[0, 1\]"),
        ("min_p", 1.1, r"\[0, 1\]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("repetition_window", 0, ">= 1"),
        ("order", "torch", "one of"),
        ("do_sample", "yes", "true or false"),
        ("seed", 1.5, "integer"),
        ("frequency_penalty", "x", "number"),
    ],
)
def test_validation_names_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=rf"sampling\.{field}=.*{message}"):
        SamplingConfig(**{field: value})


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingConfig().replace(topk=3)


# ---------------------------------------------------------------------------------------------------
# Properties

logit_rows = st.lists(st.floats(-20, 20, allow_nan=False).map(lambda x: round(x, 1)), min_size=2, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    logit_rows,
    st.floats(0.1, 2.0),
    st.integers(0, 10),
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.9),
    st.sampled_from(CLASSIC_ORDERS),
)
def test_probs_sum_to_one_and_match_reference(row, temperature, top_k, top_p, min_p, order):
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=order)
    probs = TokenSampler(config).distribution(torch.tensor([row]))[0]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(probs.numpy(), reference_distribution(row, config), atol=1e-5)


@settings(max_examples=100, deadline=None)
@given(logit_rows, st.integers(1, 10), st.floats(0.1, 1.0), st.floats(0.0, 0.9))
def test_kept_set_shrinks_when_a_filter_tightens(row, top_k, top_p, min_p):
    logits = torch.tensor([row])
    base = SamplingConfig(top_k=top_k, top_p=top_p, min_p=min_p)

    def kept(config):
        return set(torch.nonzero(TokenSampler(config).distribution(logits)[0]).flatten().tolist())

    loose = kept(base)
    assert kept(base.replace(top_k=max(1, top_k - 1))) <= loose
    assert kept(base.replace(top_p=top_p / 2)) <= loose
    assert kept(base.replace(min_p=min(1.0, min_p + 0.1))) <= loose


@settings(max_examples=100, deadline=None)
@given(logit_rows, st.floats(0.5, 3.0))
def test_greedy_equals_argmax(row, penalty):
    logits = torch.tensor([row])
    history = torch.tensor([[0, 1]])
    config = SamplingConfig(do_sample=False, repetition_penalty=penalty)
    token = TokenSampler(config).sample(logits, history).tokens.item()
    penalized = apply_penalties(logits, history, repetition_penalty=penalty)[0]
    assert token == int(np.argmax(penalized.numpy()))


@pytest.mark.parametrize("vocab", [1000, 5003, 151_936])
def test_chunked_top_candidates_equal_topk_even_with_ties(vocab):
    logits = (torch.randn(3, vocab, generator=torch.Generator().manual_seed(vocab)) * 3).round()
    for width in (1, 7, 64, 300):
        values, ids = top_candidates(logits, width)
        assert torch.equal(values, torch.topk(logits, width).values)
        assert torch.equal(logits.gather(1, ids), values)
        assert all(len(set(row.tolist())) == width for row in ids)


@pytest.mark.parametrize("vocab", [130, 5003, 151_936])
def test_chunked_greedy_matches_argmax_with_ties(vocab):
    logits = (torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab)) * 2).round()
    logits[0, -1] = 99.0  # maximum in the ragged tail
    logits[1, [70, 7, vocab - 2]] = 50.0  # tied maxima across chunks: the lowest id wins
    logits[2] = float("-inf")
    logits[2, [vocab // 2, vocab - 1]] = float("inf")
    tokens = TokenSampler(SamplingConfig(do_sample=False)).sample(logits).tokens
    assert torch.equal(tokens, torch.argmax(logits, dim=1))
    assert tokens[1].item() == 7


def test_row_keys_python_and_tensor_paths_agree():
    """Small batches hash with Python ints, large ones with tensor ops: the bits must be identical."""
    seeds = torch.randint(-(2**62), 2**62, (200,), generator=torch.Generator().manual_seed(0))
    steps = torch.arange(200) * 7919
    large = noise.row_keys(seeds, steps, salt=3)
    small = torch.cat([noise.row_keys(seeds[i : i + 8], steps[i : i + 8], salt=3) for i in range(0, 200, 8)])
    assert torch.equal(large, small)
    assert len(set(large.tolist())) == 200
