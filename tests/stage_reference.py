"""Float64 references of every sampling stage, one row at a time, written from the rules in the issue."""

from __future__ import annotations

import math

import numpy as np

from sampling import SamplingConfig


def probs_of(v: np.ndarray) -> np.ndarray:
    finite = np.isfinite(v)
    p = np.zeros_like(v)
    p[finite] = np.exp(v[finite] - v[finite].max())
    return p / p.sum()


def keep_or_best(v: np.ndarray, keep: np.ndarray) -> np.ndarray:
    if not keep.any():
        keep = v == v.max()
    return np.where(keep, v, -np.inf)


def entropy_of(v: np.ndarray) -> float:
    p = probs_of(v)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mass_strictly_above(keys: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Σ_{j: key_j > key_i} p_j for every i (exact with ties: equal keys get the same mass above)."""
    order = np.argsort(-keys, kind="stable")
    cumulative = np.concatenate([[0.0], np.cumsum(p[order])])
    return cumulative[np.searchsorted(-keys[order], -keys, side="left")]


def ref_typical(v, mass):
    p = probs_of(v)
    h = entropy_of(v)
    with np.errstate(divide="ignore"):
        d = np.where(p > 0, np.abs(-np.log(p) - h), np.inf)
    keep = (mass_strictly_above(-d, p) < mass) & (p > 0)
    return np.where(keep, v, -np.inf)


def ref_epsilon(v, eps):
    return keep_or_best(v, probs_of(v) >= eps)


def ref_eta(v, eta):
    cut = min(eta, math.sqrt(eta) * math.exp(-entropy_of(v)))
    return keep_or_best(v, probs_of(v) >= cut)


def ref_top_n_sigma(v, n):
    finite = v[np.isfinite(v)]
    return np.where(v >= finite.max() - n * finite.std(), v, -np.inf)


def ref_xtc(v, threshold, active):
    p = probs_of(v)
    top = (p >= threshold) & (p > 0)
    if not active or top.sum() < 2:
        return v
    least = v[top].min()
    return np.where(top & (v > least), -np.inf, v)


def ref_mirostat(v, mu):
    p = probs_of(v)
    with np.errstate(divide="ignore"):
        surprise = -np.log2(p)
    return keep_or_best(v, surprise <= mu)


def ref_dynatemp(v, temperature, spread, exponent):
    n = np.isfinite(v).sum()
    norm = entropy_of(v) / math.log(n) if n > 1 else 0.0
    low, high = max(0.0, temperature - spread), temperature + spread
    return v / max(1e-4, low + (high - low) * min(1.0, norm) ** exponent)


def ref_dry(v, history, mult, base, allowed, last_n=None, breakers=()):
    seq = [t for t in history if t >= 0]
    if last_n is not None:
        seq = seq[-last_n:]
    n, best = len(seq), {}
    for j in range(n - 1):
        length = 0
        while j - length >= 0 and seq[j - length] == seq[n - 1 - length] and seq[j - length] not in breakers:
            length += 1
        if seq[j + 1] not in breakers:
            best[seq[j + 1]] = max(best.get(seq[j + 1], 0), length)
    out = v.copy()
    for token, length in best.items():
        if length >= allowed:
            out[token] -= mult * base ** (length - allowed)
    return out


def ref_no_repeat(v, history, size):
    seq = [t for t in history if t >= 0]
    out = v.copy()
    if len(seq) < size:
        return out
    tail = seq[len(seq) - size + 1 :]
    for j in range(len(seq) - size + 1):
        if seq[j : j + size - 1] == tail:
            out[seq[j + size - 1]] = -np.inf
    return out


def ref_penalties(v, c: SamplingConfig, history, generated):
    v = v.copy()
    context = [t for t in history if t >= 0]
    if c.repetition_window is not None:
        context = context[-c.repetition_window :]
    for t in set(context):
        v[t] = v[t] / c.repetition_penalty if v[t] > 0 else v[t] * c.repetition_penalty
    counted = [t for t in (history if generated is None else generated) if t >= 0]
    for t in set(counted):
        v[t] -= c.frequency_penalty * counted.count(t) + c.presence_penalty
    return v


def ref_chain(row, c: SamplingConfig, history=(), generated=None, mu=None, xtc_active=True) -> np.ndarray:
    """Final logits of one row under config ``c`` (non-greedy), stage by stage."""
    v = np.asarray(row, dtype=np.float64).copy()
    mu = 2 * c.mirostat_tau if mu is None else mu
    for stage in c.stages:
        if stage == "penalties":
            v = ref_penalties(v, c, history, generated)
        elif stage == "dry":
            v = ref_dry(
                v, history, c.dry_multiplier, c.dry_base, c.dry_allowed_length, c.dry_penalty_last_n,
                c.dry_sequence_breakers,
            )  # fmt: skip
        elif stage == "no_repeat_ngram":
            v = ref_no_repeat(v, history, c.no_repeat_ngram_size)
        elif stage == "logit_bias":
            for token, bias in c.logit_bias:
                v[token] += bias
        elif stage == "temperature":
            v = ref_dynatemp(v, c.temperature, c.dynatemp_range, c.dynatemp_exponent) if (
                c.dynatemp_range > 0) else v / c.temperature  # fmt: skip
        elif stage == "top_k" and c.top_k < len(v):
            v = np.where(v >= np.sort(v)[::-1][c.top_k - 1], v, -np.inf)
        elif stage == "top_p":
            p = probs_of(v)
            keep = (mass_strictly_above(v, p) < c.top_p) & (p > 0)
            v = np.where(keep, v, -np.inf)
        elif stage == "min_p":
            p = probs_of(v)
            v = np.where(p >= c.min_p * p.max(), v, -np.inf)
        elif stage == "typical_p":
            v = ref_typical(v, c.typical_p)
        elif stage == "epsilon":
            v = ref_epsilon(v, c.epsilon_cutoff)
        elif stage == "eta":
            v = ref_eta(v, c.eta_cutoff)
        elif stage == "top_n_sigma":
            v = ref_top_n_sigma(v, c.top_n_sigma)
        elif stage == "xtc":
            v = ref_xtc(v, c.xtc_threshold, xtc_active)
        elif stage == "mirostat":
            v = ref_mirostat(v, mu)
    return v


def ref_distribution(row, c: SamplingConfig, history=(), generated=None, mu=None) -> np.ndarray:
    """The exact sampling distribution: with XTC, the mixture over its coin."""
    v = np.asarray(row, dtype=np.float64)
    if np.isposinf(v).any():
        v = np.where(np.isposinf(v), 0.0, -np.inf)
    if "xtc" not in c.stages:
        return probs_of(ref_chain(v, c, history, generated, mu))
    hit = probs_of(ref_chain(v, c, history, generated, mu, True))
    miss = probs_of(ref_chain(v, c, history, generated, mu, False))
    return c.xtc_probability * hit + (1 - c.xtc_probability) * miss
