"""Where each metric belongs: the one mapping from a metric's plain name (``distinct_2``, as the metric
functions and ``results.json`` spell it) to its namespaced name in MLflow (``diversity/distinct_2``).

MLflow groups charts by the part before the ``/``, so a run's metrics open as a few named sections
instead of one flat list. Tracking logs the namespaced names; drift tolerances, ``report --sort-by`` and
runs read back from the store accept either spelling (`plain_name`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

NAMESPACES = ("diversity", "repetition", "quality", "likelihood", "speed", "spec", "other")
"""``other`` holds what no rule below knows (a new metric shows up rather than being dropped)."""

SPEC_NAMESPACE = "spec"
"""Counters and rates of draft-then-verify decoders: undefined for an autoregressive job."""

_CI_SUFFIXES = ("_ci_low", "_ci_high")

_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    # spec first: ``predicted_speedup`` and ``verify_seconds`` are decoder accounting, not speed.
    (SPEC_NAMESPACE, re.compile(
        r"draft|accept|verif|rounds|overlap_sum|emitted_tokens|tokens_per_target_forward|cost_ratio"
        r"|predicted_|measured_|policy_|speculation_|scoring_|reached_pos|passed_pos"
    )),
    ("diversity", re.compile(r"^(distinct_|self_bleu|compression_ratio|zipf_)")),
    ("repetition", re.compile(r"^(seq_rep_|rep_w|loop_rate)")),
    ("likelihood", re.compile(r"^(nll_|perplexity|mean_entropy|mean_kept|mean_logprob)")),
    ("speed", re.compile(
        r"^(tokens_per_second|ms_per_token|time_to_first_token|sampler_us|target_forwards|new_tokens"
        r"|speedup)|_seconds$"
    )),
    ("quality", re.compile(r"^(pass_at_|exact_match|contains_answer|judge_|accuracy|score)")),
)  # fmt: skip


def base_metric(name: str) -> str:
    """The metric a confidence bound belongs to.

    >>> base_metric("pass_at_1_ci_low"), base_metric("distinct_2")
    ('pass_at_1', 'distinct_2')
    """
    for suffix in _CI_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def namespace_of(name: str) -> str:
    """The namespace of a plain metric name; ``<m>_ci_low``/``<m>_ci_high`` go with ``<m>``.

    >>> [namespace_of(m) for m in ("distinct_2", "seq_rep_4", "perplexity", "tokens_per_second")]
    ['diversity', 'repetition', 'likelihood', 'speed']
    >>> [namespace_of(m) for m in ("predicted_speedup", "acceptance_rate_pos1", "pass_at_1_ci_high")]
    ['spec', 'spec', 'quality']
    >>> namespace_of("time_to_first_token_ms"), namespace_of("draft_seconds"), namespace_of("load_seconds")
    ('speed', 'spec', 'speed')
    >>> namespace_of("something_new")
    'other'
    """
    base = base_metric(name)
    for namespace, pattern in _RULES:
        if pattern.search(base):
            return namespace
    return "other"


def namespaced(name: str) -> str:
    """The name MLflow stores; an already namespaced name is kept.

    >>> namespaced("distinct_2"), namespaced("diversity/distinct_2")
    ('diversity/distinct_2', 'diversity/distinct_2')
    """
    return name if "/" in name else f"{namespace_of(name)}/{name}"


def plain_name(name: str) -> str:
    """The name ``results.json`` uses, whichever spelling is given.

    >>> plain_name("diversity/distinct_2"), plain_name("distinct_2")
    ('distinct_2', 'distinct_2')
    """
    prefix, _, rest = name.partition("/")
    return rest if rest and prefix in NAMESPACES else name


def plain_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """A run's metrics keyed by plain names (runs logged before namespaces read the same).

    >>> plain_metrics({"speed/speedup": 1.5, "distinct_2": 0.5})
    {'speedup': 1.5, 'distinct_2': 0.5}
    """
    return {plain_name(key): value for key, value in metrics.items()}


def is_defined(value: object) -> bool:
    """A value worth logging: a finite number (NaN/inf stand for "undefined here").

    >>> is_defined(0.0), is_defined(float("nan")), is_defined(None), is_defined(float("inf"))
    (True, False, False, False)
    """
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def metrics_to_log(metrics: Mapping[str, float], speculative: bool) -> dict[str, float]:
    """The metrics of a job as logged: namespaced, undefined values left out, and the ``spec/`` ones only
    for a draft-then-verify decoder (an autoregressive job has no drafts, so 0 would be a false value).

    >>> metrics_to_log({"distinct_2": 0.5, "acceptance_rate": 0.0, "perplexity": float("nan")}, False)
    {'diversity/distinct_2': 0.5}
    >>> metrics_to_log({"acceptance_rate": 0.75}, True)
    {'spec/acceptance_rate': 0.75}
    """
    return {
        namespaced(name): float(value)
        for name, value in metrics.items()
        if is_defined(value) and (speculative or namespace_of(name) != SPEC_NAMESPACE)
    }


def resolve_metric(name: str, available: Iterable[str]) -> str | None:
    """The column among ``available`` that ``name`` (plain or namespaced) refers to, if any.

    >>> resolve_metric("speed/speedup", ["run", "speedup"]), resolve_metric("x", ["run"])
    ('speedup', None)
    """
    columns = list(available)
    for candidate in (name, plain_name(name), namespaced(name)):
        if candidate in columns:
            return candidate
    return None


_FRACTIONS = re.compile(
    r"^(distinct_|self_bleu|seq_rep_|rep_w|loop_rate|acceptance_rate|analytic_acceptance|pass_at_|exact_match"
    r"|contains_answer|accuracy)"
)
_SIGNED = re.compile(r"^(zipf_|mean_logprob)|change")


def value_range(name: str) -> tuple[float | None, float | None]:
    """The values a metric can take, for plot axes: fractions lie in [0, 1], most other metrics are
    non-negative, a few are signed (None = unbounded).

    >>> value_range("distinct_2"), value_range("speed/speedup"), value_range("zipf_coefficient")
    ((0.0, 1.0), (0.0, None), (None, None))
    """
    base = base_metric(plain_name(name))
    if _FRACTIONS.search(base):
        return 0.0, 1.0
    if _SIGNED.search(base):
        return None, None
    return 0.0, None
