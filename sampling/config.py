"""`SamplingConfig`: every knob of the sampler, validated once, plus the named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

ORDERS: dict[str, tuple[str, ...]] = {
    "rtdlm": ("penalties", "temperature", "top_k", "min_p", "top_p"),
    "hf": ("penalties", "temperature", "top_k", "top_p", "min_p"),
    "vllm": ("penalties", "temperature", "min_p", "top_k", "top_p"),
    "llamacpp": ("penalties", "top_k", "top_p", "min_p", "temperature"),
}
"""Stage order per named convention; each stage sees the output of the previous one."""


@dataclass(frozen=True)
class SamplingConfig:
    """How one token is chosen from a row of logits.

    Semantics (see DESIGN.md): penalties, then temperature and the filters in the order named by
    ``order``. Every filter is a threshold on values, so ties share a fate and results never depend on
    sort order or batch composition. ``temperature == 0`` or ``do_sample=False`` means greedy.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    do_sample: bool = True
    seed: int | None = None
    order: str = "rtdlm"

    def __post_init__(self) -> None:
        def fail(name: str, allowed: str) -> None:
            raise ValueError(f"sampling.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                fail(name, "a number")
            if not math.isfinite(value):
                fail(name, "a finite number")
        for name in ("top_k",):
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                fail(name, "an integer")
        if self.temperature < 0:
            fail("temperature", "finite and >= 0 (0 = greedy)")
        if self.top_k < 0:
            fail("top_k", ">= 0 (0 = disabled)")
        if not 0 < self.top_p <= 1:
            fail("top_p", "in (0, 1] (1 = disabled)")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "in [0, 1] (0 = disabled)")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "> 0 (1 = disabled)")
        if self.repetition_window is not None and (
            isinstance(self.repetition_window, bool)
            or not isinstance(self.repetition_window, int)
            or self.repetition_window < 1
        ):
            fail("repetition_window", "an integer >= 1, or None for the whole context")
        if not isinstance(self.do_sample, bool):
            fail("do_sample", "true or false")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            fail("seed", "an integer or None")
        if self.order not in ORDERS:
            fail("order", f"one of {sorted(ORDERS)}")

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the penalized logits."""
        return not self.do_sample or self.temperature == 0

    @property
    def stages(self) -> tuple[str, ...]:
        """The enabled stages, in this config's order."""
        enabled = {
            "penalties": self.has_penalties,
            "temperature": self.temperature != 1.0,
            "top_k": self.top_k > 0,
            "top_p": self.top_p < 1.0,
            "min_p": self.min_p > 0.0,
        }
        return tuple(stage for stage in ORDERS[self.order] if enabled[stage])

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    def replace(self, **overrides: object) -> SamplingConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(overrides) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(
                f"unknown sampling field(s) {sorted(unknown)}; known: {[f.name for f in fields(self)]}"
            )
        return replace(self, **overrides)


PRESETS: dict[str, SamplingConfig] = {
    "creative": SamplingConfig(temperature=1.2, top_p=0.95, top_k=100, repetition_penalty=1.2),
    "balanced": SamplingConfig(temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.15),
    "precise": SamplingConfig(temperature=0.3, top_p=0.9, top_k=20, repetition_penalty=1.1),
    "deterministic": SamplingConfig(
        temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, do_sample=False
    ),
}
"""The guide's presets; repetition penalties from the original module."""


def get_preset(name: str, **overrides: object) -> SamplingConfig:
    """The named preset, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
