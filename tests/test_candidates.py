"""The candidate search's fast paths against the float64 reference: threshold filters that pick their
candidates directly (`candidates_above`), and top-p's skip-ahead to the whole row (`top_p_reachable`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sampling import SamplingConfig, TokenSampler
from sampling.stages import candidates
from sampling.stages.candidates import THRESHOLD_CHUNKS, next_width_after, top_p_reachable
from sampling.stages.chain import first_threshold, split_chain
from sampling.stages.context import ChainContext
from sampling.stages.select import candidates_above, top_candidates
from tests.stage_reference import ref_chain, ref_distribution

VOCAB = 40_000
THRESHOLD_CONFIGS = {
    "min_p": SamplingConfig(min_p=0.02),
    "epsilon": SamplingConfig(epsilon_cutoff=3e-4),
    "eta": SamplingConfig(eta_cutoff=2e-3),
    "top_n_sigma": SamplingConfig(top_n_sigma=2.0),
    "mirostat": SamplingConfig(mirostat=2, mirostat_tau=6.0),
}


def _tied_rows(vocab: int, seed: int) -> torch.Tensor:
    """Rows from peaked to flat, rounded so that many values tie (at every boundary)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([[0.02], [0.5], [1.5], [3.0], [6.0]])
    return (torch.randn(5, vocab, generator=gen) * scales).round(decimals=1)


@pytest.mark.parametrize("name", sorted(THRESHOLD_CONFIGS))
def test_threshold_candidates_hold_every_token_the_reference_keeps(name):
    config = THRESHOLD_CONFIGS[name]
    logits = _tied_rows(VOCAB, 11)
    _, rest, fast = split_chain(config)
    assert fast
    mu = torch.full((logits.shape[0],), 2.0 * config.mirostat_tau, dtype=torch.float64)
    hint = ChainContext(config, full=logits, mu=mu if config.mirostat else None, stats={})
    values, ids, count, fits = candidates_above(logits, first_threshold(rest, hint), THRESHOLD_CHUNKS)
    partial = 0
    for b in range(logits.shape[0]):
        kept = np.flatnonzero(np.isfinite(ref_chain(logits[b].tolist(), config)))
        if not fits[b]:
            continue
        picked = ids[b, : count[b]]
        real = values[b, : count[b]] > float("-inf")
        assert set(kept.tolist()) <= set(picked[real].tolist())
        assert torch.equal(values[b, : count[b]][real], logits[b, picked[real]])
        assert len(set(picked[real].tolist())) == int(real.sum())
        partial += len(kept) < VOCAB
    assert partial >= 2  # the rows exercise real cuts, not only "keep everything"


@pytest.mark.parametrize("name", sorted(THRESHOLD_CONFIGS))
def test_threshold_first_distribution_equals_reference_alone_and_batched(name):
    config = THRESHOLD_CONFIGS[name]
    logits = _tied_rows(VOCAB, 12)
    sampler = TokenSampler(config)
    probs = sampler.distribution(logits)
    seeds, step = torch.arange(5) * 31 + 3, 4
    together = sampler.sample(logits, row_seeds=seeds, step=step)
    for b in range(logits.shape[0]):
        np.testing.assert_allclose(probs[b].numpy(), ref_distribution(logits[b].tolist(), config), atol=2e-6)
        alone = sampler.sample(logits[b : b + 1], row_seeds=seeds[b : b + 1], step=step)
        assert alone.tokens.item() == together.tokens[b].item()
        assert alone.num_kept.item() == together.num_kept[b].item()


def _nucleus_row(vocab: int, nucleus: int, top_p: float, gen: torch.Generator) -> torch.Tensor:
    """A shuffled row whose top-p nucleus holds about ``nucleus`` tokens, the boundary token tied with
    its neighbours (so the tie decides the nucleus edge)."""
    slope = -np.log(1.0 - top_p) / nucleus
    values = -slope * torch.arange(vocab, dtype=torch.float64)
    values[nucleus - 3 : nucleus + 3] = values[nucleus]
    return values.float()[torch.randperm(vocab, generator=gen)]


def _straddling_tie_row(vocab: int, gen: torch.Generator) -> torch.Tensor:
    """A tie group straddling column 64: the first 64 candidates hold over 0.9 of the mass, yet the whole
    group (70 tokens) is kept, so 64 candidates cannot decide the row, while 512 can."""
    values = torch.full((vocab,), -30.0, dtype=torch.float64)
    values[:10] = 2.0
    values[10:70] = 1.0
    return values.float()[torch.randperm(vocab, generator=gen)]


def _top_p_rows(vocab: int, top_p: float) -> torch.Tensor:
    gen = torch.Generator().manual_seed(vocab)
    rows = [_nucleus_row(vocab, n, top_p, gen) for n in (30, 100, 1000, 20_000)]
    return torch.stack([*rows, _straddling_tie_row(vocab, gen)])


def _assert_top_p_rows_exact_and_batch_invariant(vocab: int, top_p: float = 0.9):
    config = SamplingConfig(top_p=top_p)
    logits = _top_p_rows(vocab, top_p)
    sampler = TokenSampler(config)
    probs = sampler.distribution(logits)
    for b in range(logits.shape[0]):
        want = ref_distribution(logits[b].tolist(), config)
        np.testing.assert_allclose(probs[b].numpy(), want, atol=2e-6)
    seeds = torch.arange(logits.shape[0]) * 17 + 5
    batches = [[0, 1], [0, 3], [1, 3], [2, 4], [3, 4], [1, 4], [0, 1, 2, 3, 4]]
    for step in range(6):
        alone = [sampler.sample(logits[b : b + 1], row_seeds=seeds[b : b + 1], step=step) for b in range(5)]
        for batch in batches:
            together = sampler.sample(logits[batch], row_seeds=seeds[batch], step=step)
            for position, b in enumerate(batch):
                assert together.tokens[position].item() == alone[b].tokens.item(), (batch, b, step)
                assert together.num_kept[position].item() == alone[b].num_kept.item()
                assert together.logprobs[position].item() == pytest.approx(alone[b].logprobs.item(), abs=1e-6)


def test_top_p_narrow_and_wide_rows_are_exact_and_batch_invariant():
    """Nuclei of ~30 (decided on 64 candidates), ~100, ~1000, ~20000 tokens and a tie straddling the
    first candidate width, in a 40k vocabulary: 64 candidates, then the whole row."""
    assert next_width_after(64, VOCAB, False) == VOCAB
    _assert_top_p_rows_exact_and_batch_invariant(VOCAB)


def test_top_p_skip_ahead_keeps_results_exact_and_batch_invariant():
    """In a 152k vocabulary a pass of 512 candidates comes between 64 and the whole row; a row whose
    nucleus cannot fit in 512 skips it, unless a row in its batch might fit. Skipping must change no
    row's result: the ~20000 row skips alone and, batched with the straddling row, takes the 512 pass."""
    vocab = 152_064
    assert next_width_after(64, vocab, False) == 512
    _assert_top_p_rows_exact_and_batch_invariant(vocab)


@pytest.mark.parametrize("nucleus", [100, 300, 1000, 5000, 20_000])
def test_top_p_reachable_never_says_no_to_a_nucleus_that_fits(nucleus):
    """The bound behind the skip: "unreachable" must mean the nucleus needs more than 512 candidates."""
    vocab, top_p = 152_064, 0.9
    row = _nucleus_row(vocab, nucleus, top_p, torch.Generator().manual_seed(nucleus)).unsqueeze(0)
    values, _ = top_candidates(row, 64)
    ctx = ChainContext(SamplingConfig(top_p=top_p))
    ctx.first_input = (values, torch.logsumexp(row.double(), 1))
    reachable = top_p_reachable(ctx, torch.zeros(1, dtype=torch.bool), 512)
    kept = int(np.isfinite(ref_chain(row[0].tolist(), ctx.config)).sum())
    assert reachable or kept > 512
    assert reachable == (nucleus <= 1000)  # the bound is tight enough to skip the flat rows


def test_threshold_pass_keeping_everything_batched_with_an_undecided_row():
    """One row keeps its whole (5000-token) row (candidate width 5001 with the padding column) while
    another is left undecided by the threshold pass (temperature ≠ 1) and takes the whole-row pass."""
    gen = torch.Generator().manual_seed(5000)
    logits = (torch.randn(2, 5000, generator=gen) * torch.tensor([[0.01], [3.0]])).round(decimals=2)
    config = SamplingConfig(min_p=0.001, temperature=2.0)
    probs = TokenSampler(config).distribution(logits)
    for b in range(2):
        np.testing.assert_allclose(probs[b].numpy(), ref_distribution(logits[b].tolist(), config), atol=2e-6)


def test_a_row_left_undecided_next_to_one_keeping_everything_merges(monkeypatch: pytest.MonkeyPatch):
    """A threshold pass keeps vocab + 1 columns for a row that keeps every token; a row it leaves
    undecided (forced here by raising its bound) then takes the whole-row pass, and both must merge."""
    gen = torch.Generator().manual_seed(5000)
    logits = (torch.randn(2, 5000, generator=gen) * torch.tensor([[0.01], [3.0]])).round(decimals=2)
    config = SamplingConfig(min_p=0.001, temperature=2.0)
    bound = candidates.first_threshold
    monkeypatch.setattr(
        candidates, "first_threshold", lambda stages, ctx: bound(stages, ctx) + torch.tensor([0.0, 5.0])
    )
    probs = TokenSampler(config).distribution(logits)
    for b in range(2):
        np.testing.assert_allclose(probs[b].numpy(), ref_distribution(logits[b].tolist(), config), atol=2e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 3.0])
def test_threshold_bound_is_on_the_unscaled_logits_at_any_temperature(temperature: float):
    """The bound the candidates are picked with lies on the unscaled logits: at most the smallest kept
    logit (nothing kept is missed) and above the largest dropped one (no row is left undecided)."""
    config = SamplingConfig(min_p=0.05, temperature=temperature)
    logits = _tied_rows(VOCAB, 3)
    _, rest, fast = split_chain(config)
    assert fast
    bound = first_threshold(rest, ChainContext(config, full=logits, stats={}))
    for b in range(logits.shape[0]):
        kept = torch.from_numpy(np.isfinite(ref_chain(logits[b].tolist(), config)))
        assert bound[b] <= logits[b][kept].min()
        if not kept.all():
            assert bound[b] > logits[b][~kept].max()
