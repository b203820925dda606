"""Metrics: hand-computed cases, empty inputs, and independent computations (nltk, brute force)."""

from __future__ import annotations

import gzip
import math
import random
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from rtdlm_experiments.metrics import (
    all_metrics,
    compression_ratio,
    distinct_n,
    ends_in_loop,
    generation_metrics,
    likelihood_metrics,
    loop_rate,
    rep_window,
    sample_hypotheses,
    self_bleu,
    seq_rep_n,
    speed_metrics,
    sufficient_references,
    zipf_coefficient,
    zipf_coefficient_from_counts,
)
from rtdlm_experiments.tasks.answers import answer_metrics, contains_answer, exact_match
from sampling.decoding.base import GenerationOutput

GENERATION_KEYS = {
    *(f"distinct_{n}" for n in range(1, 5)),
    *(f"distinct_{n}_words" for n in range(1, 5)),
    "self_bleu_4",
    "compression_ratio",
    "seq_rep_4",
    "rep_w16",
    "loop_rate",
    "zipf_coefficient",
}
LIKELIHOOD_KEYS = {"nll_per_token", "perplexity", "mean_entropy", "mean_kept"}
SPEED_KEYS = {
    "tokens_per_second",
    "ms_per_token",
    "time_to_first_token_ms",
    "sampler_us_per_step",
    "target_forwards",
}

small_seqs = st.lists(st.lists(st.integers(0, 3), max_size=12), max_size=8)


def nltk_self_bleu_scores(seqs: list[list], hypotheses: list[int]) -> list[float]:
    smoothing = SmoothingFunction().method1
    return [
        sentence_bleu(seqs[:i] + seqs[i + 1 :], seqs[i], (0.25,) * 4, smoothing_function=smoothing)
        for i in hypotheses
    ]


# --- distinct-n -------------------------------------------------------------------------------------


def test_distinct_n_hand_computed() -> None:
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    # Pooled: the same bigram in two generations counts once among two.
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5
    # N-grams never cross generation boundaries.
    assert distinct_n([[1], [2]], 2) == 0.0
    assert distinct_n([[1, 2, 3], [3, 4]], 2) == 1.0


def test_distinct_n_empty_and_one_token() -> None:
    assert distinct_n([], 1) == 0.0
    assert distinct_n([[], []], 1) == 0.0
    assert distinct_n([[7]], 1) == 1.0
    assert distinct_n([[7]], 2) == 0.0


@given(small_seqs, st.integers(1, 4))
def test_distinct_n_matches_brute_force(seqs: list[list[int]], n: int) -> None:
    grams = [tuple(seq[i : i + n]) for seq in seqs for i in range(len(seq)) if i + n <= len(seq)]
    expected = len(set(grams)) / len(grams) if grams else 0.0
    assert distinct_n(seqs, n) == pytest.approx(expected)


# --- self-BLEU --------------------------------------------------------------------------------------


def test_self_bleu_hand_computed() -> None:
    same = "the cat sat on the mat".split()
    assert self_bleu([same, same, same]) == pytest.approx(1.0)
    assert self_bleu([["a", "b", "c", "d"], ["e", "f", "g", "h"]]) == 0.0


def test_self_bleu_empty_and_degenerate() -> None:
    assert self_bleu([]) == 0.0
    assert self_bleu([["a", "b", "c", "d"]]) == 0.0
    assert self_bleu([[], []]) == 0.0
    assert self_bleu([["a"], ["a"], []]) == pytest.approx(
        sum(nltk_self_bleu_scores([["a"], ["a"], []], [0, 1, 2])) / 3
    )
    with pytest.raises(ValueError):
        self_bleu([["a"], ["b"]], max_hypotheses=0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), max_size=14), min_size=2, max_size=7))
def test_self_bleu_reference_subsets_give_nltk_scores_exactly(seqs: list[list[int]]) -> None:
    everyone = list(range(len(seqs)))
    subsets = sufficient_references(seqs, everyone, 4)
    smoothing = SmoothingFunction().method1
    for i, subset in subsets.items():
        assert i not in subset
        pruned = sentence_bleu([seqs[j] for j in subset], seqs[i], (0.25,) * 4, smoothing_function=smoothing)
        assert pruned == nltk_self_bleu_scores(seqs, [i])[0]
    assert self_bleu(seqs) == pytest.approx(float(np.mean(nltk_self_bleu_scores(seqs, everyone))), abs=1e-12)


def test_self_bleu_matches_nltk_on_words() -> None:
    rng = random.Random(3)
    vocab = "the a cat dog sat ran on in mat park and then quickly".split()
    seqs = [[rng.choice(vocab) for _ in range(rng.randint(5, 30))] for _ in range(20)]
    expected = float(np.mean(nltk_self_bleu_scores(seqs, list(range(20)))))
    assert 0.05 < expected < 0.95
    assert self_bleu(seqs) == pytest.approx(expected, abs=1e-12)


def test_self_bleu_cap_scores_a_fixed_seed_subsample() -> None:
    rng = random.Random(5)
    seqs = [[rng.randrange(6) for _ in range(rng.randint(3, 15))] for _ in range(12)]
    chosen = sample_hypotheses(12, 5, seed=0)
    assert chosen == sorted(random.Random(0).sample(range(12), 5))
    assert sample_hypotheses(12, 50) == list(range(12))
    capped = self_bleu(seqs, max_hypotheses=5, seed=0)
    assert capped == pytest.approx(float(np.mean(nltk_self_bleu_scores(seqs, chosen))), abs=1e-12)
    assert capped == self_bleu(seqs, max_hypotheses=5, seed=0)
    assert capped != pytest.approx(self_bleu(seqs), abs=1e-6)


# --- compression ratio ------------------------------------------------------------------------------


def test_compression_ratio() -> None:
    assert compression_ratio([]) == 0.0
    assert compression_ratio([""]) == 0.0
    texts = ["ab" * 300, "cd" * 200]
    data = b"ab" * 300 + b"\n" + b"cd" * 200
    assert compression_ratio(texts) == len(data) / len(gzip.compress(data))
    rng = random.Random(0)
    noise = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(1000))]
    assert compression_ratio(texts) > 10 * compression_ratio(noise)
    assert compression_ratio(["x"]) == pytest.approx(1 / 21)


# --- seq-rep-n, rep/ℓ -------------------------------------------------------------------------------


def test_seq_rep_4_hand_computed() -> None:
    assert seq_rep_n([[1, 2, 3, 4, 1, 2, 3, 4]], 4) == pytest.approx(1 - 4 / 5)
    # Sequences without a 4-gram are left out of the mean.
    assert seq_rep_n([[1, 2, 3], [7, 7, 7, 7, 7]], 4) == pytest.approx(0.5)
    assert seq_rep_n([[1, 2, 3, 4, 5], [7, 7, 7, 7, 7]], 4) == pytest.approx(0.25)
    assert seq_rep_n([], 4) == 0.0
    assert seq_rep_n([[], [1]], 4) == 0.0


def test_rep_window_hand_computed() -> None:
    assert rep_window([[1, 2, 1]], 16) == pytest.approx(1 / 3)
    assert rep_window([[1, 2, 1], [5, 5]], 16) == pytest.approx(2 / 5)
    assert rep_window([[1, *range(100, 115), 1]], 16) == pytest.approx(1 / 17)  # 16 back: inside
    assert rep_window([[1, *range(100, 116), 1]], 16) == 0.0  # 17 back: outside
    assert rep_window([], 16) == 0.0
    assert rep_window([[], [4]], 16) == 0.0


@given(small_seqs, st.integers(1, 5))
def test_rep_window_matches_brute_force(seqs: list[list[int]], window: int) -> None:
    flags = [seq[t] in seq[max(0, t - window) : t] for seq in seqs for t in range(len(seq))]
    assert rep_window(seqs, window) == pytest.approx(sum(flags) / len(flags) if flags else 0.0)


# --- loops ------------------------------------------------------------------------------------------


def brute_force_ends_in_loop(seq: list[int]) -> bool:
    for period in range(1, 21):
        phrase = seq[len(seq) - period :]
        for repeats in range(3, len(seq) // period + 1):
            if repeats * period >= 6 and seq[len(seq) - repeats * period :] == phrase * repeats:
                return True
    return False


@pytest.mark.parametrize("period", range(1, 21))
def test_constructed_loops_and_near_misses(period: int) -> None:
    phrase = list(range(100, 100 + period))
    repeats = max(3, math.ceil(6 / period))
    prefix = [1, 2, 3]
    assert ends_in_loop(prefix + phrase * repeats)
    assert ends_in_loop(prefix + phrase * (repeats + 4) + phrase[:1])  # rotated phrase, still a loop
    assert not ends_in_loop(prefix + phrase * (repeats - 1))  # one copy short
    assert not ends_in_loop(prefix + phrase * repeats + [999])  # loop, then escaped
    broken = prefix + phrase * repeats
    broken[-period] = 999  # the last copy differs in its first token
    assert not ends_in_loop(broken)


def test_loop_near_misses_on_length_and_period() -> None:
    assert ends_in_loop([9] * 6)
    assert not ends_in_loop([9] * 5)  # 5 copies cover only 5 tokens
    assert ends_in_loop([1, 2] * 3)
    assert not ends_in_loop([1, 2, 1, 2, 1])  # 2.5 copies
    assert not ends_in_loop(list(range(21)) * 3)  # period 21 > 20
    assert not ends_in_loop([1, 2, 3, 1, 2, 4, 1, 2, 3])
    assert not ends_in_loop([])
    assert not ends_in_loop([4])


@given(st.lists(st.integers(0, 2), max_size=40))
def test_ends_in_loop_matches_brute_force(seq: list[int]) -> None:
    assert ends_in_loop(seq) == brute_force_ends_in_loop(seq)


def test_loop_rate() -> None:
    assert loop_rate([[5, 1, 2] * 3, [1, 2, 3, 4], [], [1]]) == 0.25
    assert loop_rate([]) == 0.0


# --- Zipf -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.7, 1.0, 1.3])
def test_zipf_recovers_known_exponent_from_counts(exponent: float) -> None:
    ranks = np.arange(1, 3001)
    counts = np.round(1e7 * ranks**-exponent).astype(int)
    assert zipf_coefficient_from_counts(counts.tolist()) == pytest.approx(exponent, abs=0.02)


@pytest.mark.parametrize("exponent", [0.9, 1.2])
def test_zipf_recovers_known_exponent_from_generations(exponent: float) -> None:
    counts = np.round(20000 * np.arange(1, 301, dtype=float) ** -exponent).astype(int)
    tokens = [token for token, count in enumerate(counts.tolist()) for _ in range(count)]
    random.Random(0).shuffle(tokens)
    generations = [tokens[i : i + 128] for i in range(0, len(tokens), 128)]
    assert zipf_coefficient(generations) == pytest.approx(exponent, abs=0.02)


def test_zipf_hand_computed_and_top_types() -> None:
    assert zipf_coefficient_from_counts([36, 9, 4]) == pytest.approx(2.0)  # 36 / rank²
    assert zipf_coefficient([[0] * 36 + [1] * 9 + [2] * 4]) == pytest.approx(2.0)
    head = np.round(1e6 / np.arange(1, 5001)).astype(int).tolist()
    tail = [1] * 5000
    assert zipf_coefficient_from_counts(head + tail) == pytest.approx(1.0, abs=0.01)
    assert zipf_coefficient_from_counts(head + tail, top_types=10**6) > 1.2
    assert zipf_coefficient([]) == 0.0
    assert zipf_coefficient([[], [3, 3, 3]]) == 0.0
    assert zipf_coefficient_from_counts([5, 5, 5]) == pytest.approx(0.0, abs=1e-12)


# --- generation_metrics -----------------------------------------------------------------------------


def test_generation_metrics_keys_and_values() -> None:
    token_ids = [[1, 2, 3, 1, 2, 3, 1, 2, 3], [4, 5, 6, 7]]
    texts = ["one two three one two three one two three", "four five"]
    metrics = generation_metrics(token_ids, texts)
    assert set(metrics) == GENERATION_KEYS
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["distinct_1"] == pytest.approx(7 / 13)
    assert metrics["distinct_1_words"] == pytest.approx(5 / 11)
    assert metrics["distinct_2_words"] == pytest.approx(4 / 9)
    assert metrics["loop_rate"] == 0.5
    assert metrics["seq_rep_4"] == pytest.approx((1 - 3 / 6 + 0) / 2)
    assert metrics["compression_ratio"] == compression_ratio(texts)
    words = [text.split() for text in texts]
    assert metrics["self_bleu_4"] == pytest.approx(float(np.mean(nltk_self_bleu_scores(words, [0, 1]))))


@pytest.mark.parametrize(
    ("token_ids", "texts"),
    [([], []), ([[]], [""]), ([[], []], ["", ""]), ([[7]], ["hi"]), ([[7], [7]], ["a", "a"])],
)
def test_generation_metrics_empty_and_one_token(token_ids: list[list[int]], texts: list[str]) -> None:
    metrics = generation_metrics(token_ids, texts)
    assert set(metrics) == GENERATION_KEYS
    assert all(math.isfinite(v) for v in metrics.values())
    expected_distinct_1 = 1.0 if token_ids == [[7]] else (0.5 if token_ids == [[7], [7]] else 0.0)
    assert metrics["distinct_1"] == expected_distinct_1
    assert metrics["loop_rate"] == metrics["seq_rep_4"] == metrics["zipf_coefficient"] == 0.0


def test_generation_metrics_rejects_misaligned_texts() -> None:
    with pytest.raises(ValueError):
        generation_metrics([[1], [2]], ["a"])


# --- likelihood and speed ---------------------------------------------------------------------------


def make_output(**overrides: object) -> GenerationOutput:
    fields: dict[str, object] = {
        "token_ids": [[11, 12], [13]],
        "model_logprobs": [[math.log(0.5), math.log(0.25)], [math.log(0.5)]],
        "entropies": [[1.0, 2.0], [4.0]],
        "num_kept": [[1, 3], [5]],
        "finished_by_stop": [False, True],
        "prefill_seconds": 0.5,
        "decode_seconds": 2.0,
        "sampler_seconds": 0.01,
        "sampler_calls": 10,
        "target_forwards": 9,
        "draft_forwards": 4,
        "stats": {"acceptance_rate": 0.7, "predicted_speedup": 2, "ms_per_token": 99.0},
    }
    fields.update(overrides)
    return GenerationOutput(**fields)  # type: ignore[arg-type]


def test_likelihood_metrics_pool_over_tokens() -> None:
    metrics = likelihood_metrics(make_output())
    assert set(metrics) == LIKELIHOOD_KEYS
    assert metrics["nll_per_token"] == pytest.approx(4 * math.log(2) / 3)
    assert metrics["perplexity"] == pytest.approx(2 ** (4 / 3))
    assert metrics["mean_entropy"] == pytest.approx(7 / 3)  # token-weighted, not the mean of row means
    assert metrics["mean_kept"] == pytest.approx(3.0)


def test_likelihood_metrics_empty_and_overflow() -> None:
    empty = likelihood_metrics(GenerationOutput(token_ids=[]))
    assert empty == {"nll_per_token": 0.0, "perplexity": 1.0, "mean_entropy": 0.0, "mean_kept": 0.0}
    assert likelihood_metrics(make_output(model_logprobs=[[-1000.0]]))["perplexity"] == math.inf


def test_speed_metrics_hand_computed() -> None:
    metrics = speed_metrics(make_output())
    assert metrics["tokens_per_second"] == pytest.approx(3 / 2.0)
    assert metrics["ms_per_token"] == pytest.approx(2000 / 3)  # the stats key of the same name is overridden
    assert metrics["time_to_first_token_ms"] == pytest.approx(501.0)
    assert metrics["sampler_us_per_step"] == pytest.approx(1000.0)
    assert metrics["target_forwards"] == 9.0
    assert metrics["draft_forwards"] == 4.0
    assert metrics["acceptance_rate"] == 0.7
    assert metrics["predicted_speedup"] == 2.0
    assert "speedup" not in metrics
    assert speed_metrics(make_output(), baseline_seconds=5.0)["speedup"] == pytest.approx(2.0)


def test_speed_metrics_zero_time_and_no_tokens() -> None:
    metrics = speed_metrics(GenerationOutput(token_ids=[[]]), baseline_seconds=1.0)
    assert SPEED_KEYS <= set(metrics)
    assert all(v == 0.0 for v in metrics.values())


def test_all_metrics_is_flat_and_complete() -> None:
    output = make_output()
    metrics = all_metrics(output, ["a b", "c"], baseline_seconds=5.0)
    assert GENERATION_KEYS | LIKELIHOOD_KEYS | SPEED_KEYS | {"speedup", "acceptance_rate"} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["distinct_1"] == 1.0 and metrics["distinct_1_words"] == 1.0


# --- speed of the metric pass -----------------------------------------------------------------------


def test_metric_pass_over_64_generations_of_128_tokens_is_fast() -> None:
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 5001) ** 1.1
    token_ids = [rng.choice(5000, 128, p=p / p.sum()).tolist() for _ in range(64)]
    # Like BPE: about three tokens in four start a new word.
    texts = ["".join(("" if t % 4 == 0 else " ") + f"w{t}" for t in ids) for ids in token_ids]
    output = GenerationOutput(
        token_ids=token_ids,
        model_logprobs=[[-2.0] * 128] * 64,
        entropies=[[1.5] * 128] * 64,
        num_kept=[[40] * 128] * 64,
        decode_seconds=1.0,
    )
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        all_metrics(output, texts)
        timings.append(time.perf_counter() - start)
    print(f"metric pass over 64 x 128 tokens: best {min(timings):.3f} s")
    assert min(timings) < 1.0


# -- short-answer scoring (rtdlm_experiments.tasks.answers) ---------------------------------------------


@pytest.mark.parametrize(
    ("generation", "answer", "exact", "contains"),
    [
        ("Paris", "Paris", 1.0, 1.0),
        ("  PARIS!! ", "paris", 1.0, 1.0),
        ("The answer is Paris.", "Paris", 0.0, 1.0),
        ("The answer is Paris.", ["Lyon", "Paris"], 0.0, 1.0),
        ("Comparisons", "paris", 0.0, 0.0),
        ("Rayleigh-scattering", "Rayleigh scattering", 1.0, 1.0),
        ("forty two", ["42", "forty-two"], 1.0, 1.0),
        ("", "Paris", 0.0, 0.0),
        ("anything", ["", "  "], 0.0, 0.0),
    ],
)
def test_exact_match_and_contains_answer_normalise_case_space_and_punctuation(
    generation, answer, exact, contains
):
    assert exact_match(generation, answer) == exact
    assert contains_answer(generation, answer) == contains


def test_answer_metrics_average_only_prompts_with_answers():
    metrics = answer_metrics(
        ["Paris", "I think Lyon", "a story", "Berlin"], ["paris", "Lyon", None, ("Rome",)]
    )
    assert metrics == {"exact_match": pytest.approx(1 / 3), "contains_answer": pytest.approx(2 / 3)}
    assert answer_metrics(["a story"], [None]) == {}
    with pytest.raises(ValueError, match="2 generations but 1 answers"):
        answer_metrics(["a", "b"], ["a"])
