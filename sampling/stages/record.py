"""The record that defines a sampling stage: its parameters, when it runs, its rule, its kind and its doc.

A stage is one pure rule function (in the stage's module) plus one `Stage` record beside it;
`sampling.stages.registry` collects the records, and everything else is derived from them: the stage
names, the `SamplingConfig` fields with their defaults and checks (`sampling.config.config_class`), when
each stage is enabled, the chain table that `TokenSampler` runs, and the Hydra schema of the app.

Kinds tell `TokenSampler` what it may assume about a stage:

- ``modifier``: changes logits token by token and may read the ids (history): runs on the whole vocabulary;
- ``scale``: a per-row positive scale (temperature), order-preserving;
- ``upper``: a filter keeping an upper set of values — the candidate search can run it first; with a
  ``threshold`` (its cut as a value from whole-row statistics) it picks its survivors in one pass;
- ``other``: a filter that needs the whole distribution it receives (typical, XTC).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

    from sampling.stages.context import ChainContext

Kind = Literal["modifier", "scale", "upper", "other"]
KINDS: tuple[str, ...] = ("modifier", "scale", "upper", "other")


class Invalid(ValueError):
    """A parameter value outside its range; the message is what the value must be."""


@dataclass(frozen=True)
class Param:
    """One `SamplingConfig` field: its name, annotation, default, and check.

    ``check`` returns the value to store (sequences become tuples) or raises `Invalid` saying what the
    value must be. ``schema_type`` is the type of the field in the app's Hydra schema, where every field is
    optional (``None`` keeps the preset's value); by default ``type | None``.
    """

    name: str
    type: Any
    default: Any
    check: Callable[[Any], Any]
    doc: str
    schema_type: Any = None


@dataclass(frozen=True)
class Stage:
    """One sampling stage. ``apply(values, ctx)`` runs the rule on ``values`` ([B, N] logits: whole rows or
    candidates) reading the config and the row statistics from ``ctx``; ``enabled(config)`` says whether
    the stage runs (a stage whose parameters are "off" is skipped); ``threshold(ctx, row)`` ([B], float64),
    for ``upper`` filters only: the smallest value the filter keeps, from the whole rows ``row``."""

    name: str
    kind: Kind
    params: tuple[Param, ...]
    enabled: Callable[[Any], bool]
    apply: Callable[[torch.Tensor, ChainContext], torch.Tensor]
    doc: str
    threshold: Callable[[ChainContext, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.threshold is not None and self.kind != "upper":
            raise ValueError(f"stage {self.name!r}: only an 'upper' filter can have a threshold")


def stage_table(stages: tuple[Stage, ...]) -> Mapping[str, Stage]:
    """The stages by name, in order; a name or a field given twice is an error."""
    table: dict[str, Stage] = {}
    seen: set[str] = set()
    for stage in stages:
        names = {param.name for param in stage.params}
        if stage.name in table or names & seen:
            raise ValueError(f"stage {stage.name!r} repeats a stage name or a field of another stage")
        table[stage.name] = stage
        seen |= names
    return table


# --- checks: each returns the value to store or raises Invalid(what it must be) --------------------------


def number(ok: Callable[[float], bool], allowed: str) -> Callable[[Any], Any]:
    """A finite int or float (not a bool) with ``ok(value)``.

    >>> number(lambda v: v > 0, "> 0")(2.5)
    2.5
    """

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Invalid("a number")
        if not math.isfinite(value):
            raise Invalid("a finite number")
        if not ok(value):
            raise Invalid(allowed)
        return value

    return check


def integer(ok: Callable[[int], bool], allowed: str) -> Callable[[Any], Any]:
    """An int (not a bool) with ``ok(value)``."""

    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid("an integer")
        if not ok(value):
            raise Invalid(allowed)
        return value

    return check


def window(value: Any) -> Any:
    """How many of the last tokens a stage reads: an int >= 1, or None for the whole context."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise Invalid("an integer >= 1, or None for the whole context")
    return value


def token_ids(value: Any) -> tuple[int, ...]:
    """A sequence of token ids >= 0, stored as a tuple."""
    if isinstance(value, str) or not all(isinstance(t, int) and t >= 0 for t in value):
        raise Invalid("a sequence of token ids >= 0")
    return tuple(value)


def bias_pairs(value: Any) -> tuple[tuple[int, float], ...]:
    """A ``{token_id: bias}`` mapping or ``(token_id, bias)`` pairs, stored as sorted pairs.

    >>> bias_pairs({5: -1, 2: float("-inf")})
    ((2, -inf), (5, -1.0))
    """
    pairs = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple((int(token), float(bias)) for token, bias in pairs)
    except (TypeError, ValueError):
        raise Invalid("a {token_id: bias} mapping or (token_id, bias) pairs") from None
    if any(token < 0 or math.isnan(bias) or bias == math.inf for token, bias in pairs):
        raise Invalid("token ids >= 0 with biases that are finite or -inf (a ban)")
    return tuple(sorted(dict(pairs).items()))
