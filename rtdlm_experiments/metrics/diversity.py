"""Diversity across the generations of one job: distinct-n, self-BLEU, gzip compression ratio."""

from __future__ import annotations

import gzip
import random
from collections import Counter
from collections.abc import Hashable, Sequence

from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

from rtdlm_experiments.metrics._ngrams import ngrams, ratio

SELF_BLEU_MAX_HYPOTHESES = 200
"""Default cap on the number of self-BLEU hypotheses (the cost is hypotheses × generations × length)."""


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
    """Corpus-level distinct-n: |unique n-grams| / |n-grams|, pooled over all sequences.

    N-grams never cross sequence boundaries; duplicates are counted across sequences (Li et al. 2016,
    "A Diversity-Promoting Objective Function for Neural Conversation Models", corpus level; this is the
    unique-over-total-n-grams variant, not unique-over-total-tokens nor the per-sequence average).
    0.0 when no sequence has ``n`` items.
    """
    unique: set[tuple[Hashable, ...]] = set()
    total = 0
    for seq in sequences:
        if len(seq) >= n:
            unique.update(ngrams(seq, n))
            total += len(seq) - n + 1
    return ratio(len(unique), total)


def sample_hypotheses(num_sequences: int, max_hypotheses: int, seed: int = 0) -> list[int]:
    """Indices used as self-BLEU hypotheses: all of them, or ``sorted(random.Random(seed).sample(...))``."""
    if num_sequences <= max_hypotheses:
        return list(range(num_sequences))
    return sorted(random.Random(seed).sample(range(num_sequences), max_hypotheses))


def sufficient_references(
    sequences: Sequence[Sequence[Hashable]], hypotheses: Sequence[int], n: int
) -> dict[int, list[int]]:
    """For each hypothesis index i, a subset of the other indices on which nltk's BLEU-n of ``sequences[i]``
    is identical to its BLEU-n against all the other sequences.

    BLEU sees its references only through (a) each hypothesis n-gram's count clipped at its largest count
    in any reference and (b) the reference length closest to the hypothesis length (ties: the shorter).
    The subset keeps one reference of that closest length and, for every n-gram g of orders 1..n in the
    hypothesis with ``c = min(count of g in it, max count of g in the others) > 0``, one reference holding
    g at least c times (reusing an already chosen one when possible); clipped counts and closest length,
    hence the score, are then the same. This only shrinks nltk's input: nltk still computes every score.
    """
    counts = [[Counter(ngrams(seq, k)) for k in range(1, n + 1)] for seq in sequences]
    holders_by_order: list[dict[tuple[Hashable, ...], dict[int, int]]] = [{} for _ in range(n)]
    for j, per_order in enumerate(counts):
        for holders, counter in zip(holders_by_order, per_order, strict=True):
            for gram, count in counter.items():
                holders.setdefault(gram, {})[j] = count
    lengths = [len(seq) for seq in sequences]
    subsets: dict[int, list[int]] = {}
    for i in hypotheses:
        needs: list[list[int]] = []
        for holders, counter in zip(holders_by_order, counts[i], strict=True):
            for gram, own in counter.items():
                others = {j: c for j, c in holders[gram].items() if j != i}
                target = min(own, max(others.values(), default=0))
                if target:
                    needs.append([j for j, c in others.items() if c >= target])
        closest = min(
            (j for j in range(len(sequences)) if j != i),
            key=lambda j: (abs(lengths[j] - lengths[i]), lengths[j]),
        )
        chosen = {closest}
        for candidates in sorted(needs, key=len):
            if chosen.isdisjoint(candidates):
                chosen.add(candidates[0])
        subsets[i] = sorted(chosen)
    return subsets


def self_bleu(
    sequences: Sequence[Sequence[Hashable]],
    n: int = 4,
    max_hypotheses: int = SELF_BLEU_MAX_HYPOTHESES,
    seed: int = 0,
) -> float:
    """Self-BLEU-n (Zhu et al. 2018, Texygen; Holtzman et al. 2020): mean over hypotheses h of
    ``nltk.sentence_bleu(all other sequences, h, weights=(1/n,)*n, smoothing=SmoothingFunction().method1)``.

    Quadratic, so when there are more than ``max_hypotheses`` sequences only the hypotheses chosen by
    :func:`sample_hypotheses` (fixed seed) are scored; every other sequence still serves as a reference.
    Each call gets the references of :func:`sufficient_references`, which give the identical score faster.
    0.0 with fewer than two sequences (no references).
    """
    if max_hypotheses < 1:
        raise ValueError(f"max_hypotheses must be >= 1, got {max_hypotheses}")
    if len(sequences) < 2:
        return 0.0
    weights = (1.0 / n,) * n
    smoothing = SmoothingFunction().method1
    subsets = sufficient_references(sequences, sample_hypotheses(len(sequences), max_hypotheses, seed), n)
    total = 0.0
    for i, subset in subsets.items():
        references = [sequences[j] for j in subset]
        total += float(sentence_bleu(references, sequences[i], weights=weights, smoothing_function=smoothing))
    return total / len(subsets)


def compression_ratio(texts: Sequence[str]) -> float:
    """len(b) / len(gzip(b)) with ``b = "\\n".join(texts).encode("utf-8")`` (gzip level 9, mtime 0).

    Higher means more redundant text. 0.0 when ``b`` is empty (rather than 0 / the gzip header size).
    """
    data = "\n".join(texts).encode("utf-8")
    if not data:
        return 0.0
    return len(data) / len(gzip.compress(data, compresslevel=9, mtime=0))


def diversity_metrics(
    token_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    self_bleu_max_hypotheses: int = SELF_BLEU_MAX_HYPOTHESES,
    seed: int = 0,
) -> dict[str, float]:
    """``distinct_{1..4}`` on model tokens, ``distinct_{1..4}_words`` and ``self_bleu_4`` on whitespace
    words (``str.split()``, tokenizer-independent so models compare), ``compression_ratio`` on the texts.
    """
    words = [text.split() for text in texts]
    metrics: dict[str, float] = {}
    for n in range(1, 5):
        metrics[f"distinct_{n}"] = distinct_n(token_ids, n)
    for n in range(1, 5):
        metrics[f"distinct_{n}_words"] = distinct_n(words, n)
    metrics["self_bleu_4"] = self_bleu(words, 4, self_bleu_max_hypotheses, seed)
    metrics["compression_ratio"] = compression_ratio(texts)
    return metrics
