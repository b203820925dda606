"""The new stages against float64 references written from their rules, HF's processors, and properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sampling import SamplingConfig, TokenSampler
from sampling.config import STAGE_NAMES
from sampling.stages.classic import top_p_filter
from sampling.stages.filters import epsilon_filter, eta_filter, typical_filter
from sampling.stages.history import dry_penalty, no_repeat_ngram_ban
from tests.stage_reference import ref_distribution, ref_dry, ref_no_repeat

ROWS = [
    [2.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -3.0],  # ties
    [5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # all equal
    [30.0, 0.0, 0.0, -1.0, -2.0, -2.0, -5.0, -9.0],  # one dominant token
    [1.0, float("-inf"), 0.5, float("-inf"), 0.5, 0.0, float("-inf"), -0.5],  # masked entries
    [0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4],  # flat
    [3.0, 2.9, 0.0, -0.1, 1.5, 1.5, 2.9, -4.0],  # two near the top
]
HISTORY = [1, 2, 3, -1, 1, 2, 5, 1, 2]

NEW_STAGE_CONFIGS = {
    "typical": SamplingConfig(typical_p=0.5),
    "typical-tight": SamplingConfig(typical_p=0.05, temperature=0.8),
    "epsilon": SamplingConfig(epsilon_cutoff=0.1),
    "epsilon-all": SamplingConfig(epsilon_cutoff=0.9),
    "eta": SamplingConfig(eta_cutoff=0.05),
    "eta-big": SamplingConfig(eta_cutoff=0.5, temperature=1.3),
    "top_n_sigma": SamplingConfig(top_n_sigma=1.0),
    "top_n_sigma+T": SamplingConfig(top_n_sigma=0.5, temperature=2.0, top_k=6),
    "dynatemp": SamplingConfig(temperature=1.0, dynatemp_range=0.5, dynatemp_exponent=1.5),
    "xtc": SamplingConfig(xtc_probability=0.5, xtc_threshold=0.1),
    "xtc-always": SamplingConfig(xtc_probability=1.0, xtc_threshold=0.05, min_p=0.01),
    "dry": SamplingConfig(dry_multiplier=0.8, dry_base=2.0, dry_allowed_length=1),
    "dry-breakers": SamplingConfig(dry_multiplier=1.5, dry_allowed_length=1, dry_sequence_breakers=(5,)),
    "dry-window": SamplingConfig(dry_multiplier=1.0, dry_allowed_length=2, dry_penalty_last_n=4),
    "no_repeat": SamplingConfig(no_repeat_ngram_size=2),
    "no_repeat-1": SamplingConfig(no_repeat_ngram_size=1, top_p=0.9),
    "logit_bias": SamplingConfig(logit_bias={0: -2.0, 3: float("-inf"), 4: 1.0}),
    "mirostat": SamplingConfig(mirostat=2, mirostat_tau=1.5),
    "mirostat+top_k": SamplingConfig(mirostat=2, mirostat_tau=0.5, top_k=4, temperature=0.7),
    "everything": SamplingConfig(
        temperature=0.9,
        top_k=7,
        top_p=0.95,
        min_p=0.01,
        typical_p=0.95,
        epsilon_cutoff=0.01,
        eta_cutoff=0.01,
        top_n_sigma=3.0,
        xtc_probability=0.3,
        xtc_threshold=0.2,
        dry_multiplier=0.5,
        no_repeat_ngram_size=3,
        logit_bias={1: 0.5},
        mirostat=2,
        mirostat_tau=3.0,
        repetition_penalty=1.2,
    ),
}

ORDERINGS = [
    None,
    ("penalties", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc", "temperature"),
    ("logit_bias", "xtc", "temperature", "epsilon", "top_p", "dry", "eta", "no_repeat_ngram", "mirostat"),
    ("typical_p", "temperature", "eta", "top_k", "epsilon", "min_p", "top_n_sigma"),
]


def _with_order(config: SamplingConfig, order) -> SamplingConfig:
    if order is None:
        return config
    order = tuple(s for s in order if s != "mirostat") + (("mirostat",) if config.mirostat else ())
    return config.replace(order=order)


@pytest.mark.parametrize("order", ORDERINGS, ids=["rtdlm", "llamacpp-like", "mixed", "typical-first"])
@pytest.mark.parametrize("name", sorted(NEW_STAGE_CONFIGS))
def test_distribution_matches_reference(name, order):
    config = _with_order(NEW_STAGE_CONFIGS[name], order)
    history = torch.tensor([HISTORY] * len(ROWS))
    probs = TokenSampler(config).distribution(torch.tensor(ROWS), history)
    for row, got in zip(ROWS, probs, strict=True):
        np.testing.assert_allclose(got.numpy(), ref_distribution(row, config, HISTORY), atol=1e-6)


@pytest.mark.parametrize("vocab", [50, 5000, 40_000])
@pytest.mark.parametrize("name", ["typical", "epsilon", "eta", "top_n_sigma", "mirostat", "dynatemp", "xtc"])
def test_wide_rows_take_the_fast_paths_exactly(name, vocab):
    """Candidate growth, the dense fallback and the histogram boundary must not change the answer."""
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen) * torch.tensor([[0.05], [0.5], [1.5], [4.0]])
    config = NEW_STAGE_CONFIGS[name].replace(top_p=0.9, order=("temperature", "top_p", *STAGE_NAMES[7:]))
    if name in ("typical", "xtc"):  # stages that need the whole row first
        config = NEW_STAGE_CONFIGS[name].replace(temperature=1.5)
    probs = TokenSampler(config).distribution(logits)
    for b in range(4):
        want = ref_distribution(logits[b].tolist(), config)
        np.testing.assert_allclose(probs[b].numpy(), want, atol=2e-6)


def test_histogram_top_p_equals_sorted_top_p_with_ties():
    gen = torch.Generator().manual_seed(3)
    logits = (
        torch.randn(5, 60_000, generator=gen) * torch.tensor([[0.01], [0.3], [1.0], [2.0], [6.0]])
    ).round(decimals=2)
    logits[1, :1000] = float("-inf")
    for p in (0.05, 0.5, 0.9, 0.999):
        fast = top_p_filter(logits, p)  # unsorted and wide: histogram
        exact = top_p_filter(logits, p, sorted_desc=False, log_total=torch.logsumexp(logits.double(), -1))
        assert torch.equal(torch.isfinite(fast), torch.isfinite(exact))


# ---------------------------------------------------------------------------------------------------
# Against HF's processors, on random untied logits


def _hf_kept(processor, logits, history=None) -> torch.Tensor:
    ids = history if history is not None else torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.isfinite(processor(ids, logits.clone()))


@pytest.mark.parametrize("seed", range(4))
def test_equal_to_hf_processors(seed):
    transformers = pytest.importorskip("transformers")
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 3000, generator=gen) * torch.tensor([[0.3], [1.0], [2.0], [3.0], [5.0], [8.0]])
    for mass in (0.2, 0.9, 0.99):
        hf = _hf_kept(transformers.TypicalLogitsWarper(mass), logits)
        assert torch.equal(torch.isfinite(typical_filter(logits, mass)), hf)
    for eps in (1e-4, 3e-3, 0.05):
        hf = _hf_kept(transformers.EpsilonLogitsWarper(eps), logits)
        assert torch.equal(torch.isfinite(epsilon_filter(logits, eps)), hf)
        assert torch.equal(TokenSampler(SamplingConfig(epsilon_cutoff=eps)).distribution(logits) > 0, hf)
    for eta in (1e-4, 3e-3, 0.05):
        hf = _hf_kept(transformers.EtaLogitsWarper(eta), logits)
        assert torch.equal(torch.isfinite(eta_filter(logits, eta)), hf)
        assert torch.equal(TokenSampler(SamplingConfig(eta_cutoff=eta)).distribution(logits) > 0, hf)
    history = torch.randint(0, 20, (6, 40), generator=gen)
    for size in (1, 2, 3):
        hf = _hf_kept(transformers.NoRepeatNGramLogitsProcessor(size), logits, history)
        assert torch.equal(torch.isfinite(no_repeat_ngram_ban(logits, history, size)), hf)


# ---------------------------------------------------------------------------------------------------
# History stages: padding and holes, longest repeat


def test_dry_and_ngram_match_reference_with_padding_and_holes():
    gen = torch.Generator().manual_seed(0)
    history = torch.randint(0, 4, (30, 25), generator=gen)
    history[torch.rand(30, 25, generator=gen) < 0.2] = -1
    logits = torch.zeros(30, 6)
    for args in [(1.0, 1.75, 2, None, ()), (0.5, 2.0, 1, 8, (3,)), (2.0, 1.1, 3, None, (0, 2))]:
        got = dry_penalty(logits, history, *args)
        for b in range(30):
            np.testing.assert_allclose(
                got[b].numpy(), ref_dry(np.zeros(6), history[b].tolist(), *args), rtol=1e-6
            )
    for size in (1, 2, 3, 4):
        got = no_repeat_ngram_ban(logits, history, size)
        for b in range(30):
            assert got[b].tolist() == ref_no_repeat(np.zeros(6), history[b].tolist(), size).tolist()


def test_dry_penalizes_the_longest_repeat():
    # "7 1 2 3 ... 1 2 3" then 4 would extend a repeat of length 3; "2 3" then 9 one of length 2
    history = torch.tensor([[2, 3, 9, 7, 1, 2, 3, 4, 5, 1, 2, 3]])
    out = dry_penalty(torch.zeros(1, 10), history, 1.0, 2.0, 2)
    assert out[0, 4].item() == -2.0 and out[0, 9].item() == -1.0
    assert (out[0, [0, 1, 2, 3, 5, 6, 7, 8]] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Orders (each named order against its system: tests/test_stage_orders.py)


def test_order_lists_become_tuples_and_run_in_their_order():
    config = SamplingConfig(top_k=2, temperature=0.5, min_p=0.3, order=["penalties", "top_k", "temperature"])
    assert config.order == ("penalties", "top_k", "temperature") and hash(config)
    assert config.stages == ("top_k", "temperature")  # a list is the whole chain: min_p is not in it
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert torch.allclose(
        TokenSampler(config).distribution(logits), torch.softmax(torch.tensor([[4.0, 2.0, -99]]), -1)
    )


@pytest.mark.parametrize(
    ("order", "message"),
    [
        (["top_k", "topp"], r"unknown stage\(s\) \['topp'\]"),
        (["top_k", "top_k"], r"repeated stage\(s\) \['top_k'\]"),
        (["mirostat", "top_k"], "'mirostat' last"),
        ("torch", "one of"),
    ],
)
def test_bad_orders_fail_in_one_line_listing_the_stages(order, message):
    with pytest.raises(ValueError, match=message) as error:
        SamplingConfig(order=order)
    assert "\n" not in str(error.value)
    if order != ["mirostat", "top_k"]:
        assert "typical_p" in str(error.value)


def test_named_order_missing_an_enabled_stage_is_refused():
    with pytest.raises(ValueError, match=r"sampling\.order='hf'.*\['dry'\]"):
        SamplingConfig(dry_multiplier=1.0, order="hf")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("typical_p", 0.0, r"\(0, 1\]"),
        ("epsilon_cutoff", 1.0, r"\[0, 1\)"),
        ("eta_cutoff", -0.1, r"\[0, 1\)"),
        ("top_n_sigma", -1.0, ">= 0"),
        ("dynatemp_range", -1.0, ">= 0"),
        ("dynatemp_exponent", 0.0, "> 0"),
        ("xtc_probability", 1.5, r"\[0, 1\]"),
        ("xtc_threshold", -0.5, r"\[0, 1\]"),
        ("dry_multiplier", -1.0, ">= 0"),
        ("dry_base", 0.5, ">= 1"),
        ("dry_allowed_length", 0, ">= 1"),
        ("dry_penalty_last_n", 0, ">= 1"),
        ("dry_sequence_breakers", ("a",), "token ids"),
        ("no_repeat_ngram_size", -1, ">= 0"),
        ("logit_bias", {-1: 1.0}, "token ids"),
        ("logit_bias", {1: float("inf")}, "-inf"),
        ("mirostat", 1, "0 .off. or 2"),
        ("mirostat_tau", -1.0, ">= 0"),
        ("mirostat_eta", float("nan"), "finite"),
    ],
)
def test_new_fields_validate_naming_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=rf"sampling\.{field}=.*{message}"):
        SamplingConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------
# Properties

rows = st.lists(st.floats(-20, 20, allow_nan=False).map(lambda x: round(x, 1)), min_size=2, max_size=30)


@settings(max_examples=150, deadline=None)
@given(
    rows,
    st.floats(0.05, 1.0),
    st.floats(0.0, 0.3),
    st.floats(0.0, 0.3),
    st.floats(0.0, 3.0),
    st.floats(0.0, 1.0),
    st.permutations(["temperature", "typical_p", "epsilon", "eta", "top_n_sigma", "xtc", "top_p"]),
)
def test_new_stages_match_reference_and_sum_to_one(row, typical, eps, eta, sigma, xtc, order):
    config = SamplingConfig(
        temperature=0.7, top_p=0.9, typical_p=typical, epsilon_cutoff=eps, eta_cutoff=eta, top_n_sigma=sigma,
        xtc_probability=xtc, order=order,
    )  # fmt: skip
    probs = TokenSampler(config).distribution(torch.tensor([row]))[0]
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(probs.numpy(), ref_distribution(row, config), atol=1e-5)


@settings(max_examples=80, deadline=None)
@given(
    rows, st.floats(0.05, 0.9), st.floats(0.0, 0.2), st.floats(0.5, 3.0), st.randoms(use_true_random=False)
)
def test_kept_sets_nest_and_columns_can_be_permuted(row, typical, eps, sigma, rng):
    logits = torch.tensor([row])
    base = SamplingConfig(typical_p=typical, epsilon_cutoff=eps, top_n_sigma=sigma)

    def kept(config, x=logits):
        return TokenSampler(config).distribution(x)[0] > 0

    for field, loose, tight in [
        ("typical_p", typical, typical / 2),
        ("epsilon_cutoff", eps, eps + 0.05),
        ("eta_cutoff", eps, eps + 0.05),
        ("top_n_sigma", sigma, sigma / 2),
    ]:  # each filter alone: in a chain, a tighter filter changes what the next one sees
        assert not (kept(SamplingConfig(**{field: tight})) & ~kept(SamplingConfig(**{field: loose}))).any()
    perm = list(range(len(row)))
    rng.shuffle(perm)
    permuted = TokenSampler(base).distribution(logits[:, perm])[0]
    assert torch.allclose(permuted, TokenSampler(base).distribution(logits)[0][perm])
