"""`SamplingConfig`: every knob of the sampler, validated once, plus the named stage orders and presets."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

STAGE_NAMES: tuple[str, ...] = (
    "penalties",
    "dry",
    "no_repeat_ngram",
    "logit_bias",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "epsilon",
    "eta",
    "top_n_sigma",
    "xtc",
    "mirostat",
)
"""Every stage a chain can name; `order` lists some of them, each at most once, ``mirostat`` last."""

ORDERS: dict[str, tuple[str, ...]] = {
    "rtdlm": (
        *("penalties", "dry", "no_repeat_ngram", "logit_bias", "temperature", "top_k", "min_p", "top_p"),
        *("typical_p", "epsilon", "eta", "top_n_sigma", "xtc", "mirostat"),
    ),
    "hf": ("penalties", "temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta"),
    "vllm": ("logit_bias", "penalties", "temperature", "min_p", "top_k", "top_p"),
    "llamacpp": (
        *("penalties", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc", "temperature"),
    ),
}
"""The real default chains of each system (``rtdlm``: ours, with every stage); each stage sees the output of
the previous one."""

STAGE_ENABLED: dict[str, Callable[[SamplingConfig], bool]] = {
    "penalties": lambda c: c.has_penalties,
    "dry": lambda c: c.dry_multiplier > 0.0,
    "no_repeat_ngram": lambda c: c.no_repeat_ngram_size > 0,
    "logit_bias": lambda c: bool(c.logit_bias),
    "temperature": lambda c: c.temperature != 1.0 or c.dynatemp_range > 0.0,
    "top_k": lambda c: c.top_k > 0,
    "top_p": lambda c: c.top_p < 1.0,
    "min_p": lambda c: c.min_p > 0.0,
    "typical_p": lambda c: c.typical_p < 1.0,
    "epsilon": lambda c: c.epsilon_cutoff > 0.0,
    "eta": lambda c: c.eta_cutoff > 0.0,
    "top_n_sigma": lambda c: c.top_n_sigma > 0.0,
    "xtc": lambda c: c.xtc_probability > 0.0,
    "mirostat": lambda c: c.mirostat == 2,
}
"""When each stage runs: a stage whose parameter is "off" is skipped."""

_NUMBER_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: v >= 0, "finite and >= 0 (0 = greedy)"),
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = disabled)"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = disabled)"),
    "repetition_penalty": (lambda v: v > 0, "> 0 (1 = disabled)"),
    "frequency_penalty": (lambda v: True, "a finite number"),
    "presence_penalty": (lambda v: True, "a finite number"),
    "typical_p": (lambda v: 0 < v <= 1, "in (0, 1] (1 = disabled)"),
    "epsilon_cutoff": (lambda v: 0 <= v < 1, "in [0, 1) (0 = disabled)"),
    "eta_cutoff": (lambda v: 0 <= v < 1, "in [0, 1) (0 = disabled)"),
    "top_n_sigma": (lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "dynatemp_range": (lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "dynatemp_exponent": (lambda v: v > 0, "> 0"),
    "xtc_probability": (lambda v: 0 <= v <= 1, "in [0, 1] (0 = disabled)"),
    "xtc_threshold": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "dry_multiplier": (lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "dry_base": (lambda v: v >= 1, ">= 1"),
    "mirostat_tau": (lambda v: v >= 0, ">= 0"),
    "mirostat_eta": (lambda v: v >= 0, ">= 0"),
}
_INT_RANGES: dict[str, tuple[Callable[[int], bool], str]] = {
    "top_k": (lambda v: v >= 0, ">= 0 (0 = disabled)"),
    "dry_allowed_length": (lambda v: v >= 1, "an integer >= 1"),
    "no_repeat_ngram_size": (lambda v: v >= 0, "an integer >= 0 (0 = disabled)"),
    "mirostat": (lambda v: v in (0, 2), "0 (off) or 2 (mirostat v2)"),
}


@dataclass(frozen=True)
class SamplingConfig:
    """How one token is chosen from a row of logits.

    Semantics (see DESIGN.md): the enabled stages run in the order named by ``order`` (a key of `ORDERS`
    or a sequence of `STAGE_NAMES`), each on the distribution the previous one left. Value filters are
    thresholds, so ties share a fate and results never depend on sort order or batch composition.
    ``temperature == 0`` or ``do_sample=False`` means greedy (argmax after the logit-modifying stages).
    Sequences (``order``, ``logit_bias``, ``dry_sequence_breakers``) are stored as tuples; ``logit_bias``
    also accepts a ``{token_id: bias}`` mapping.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    repetition_window: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    typical_p: float = 1.0
    epsilon_cutoff: float = 0.0
    eta_cutoff: float = 0.0
    top_n_sigma: float = 0.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int | None = None
    dry_sequence_breakers: tuple[int, ...] = ()
    no_repeat_ngram_size: int = 0
    logit_bias: tuple[tuple[int, float], ...] = ()
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    do_sample: bool = True
    seed: int | None = None
    order: str | tuple[str, ...] = "rtdlm"

    def __post_init__(self) -> None:
        self._normalize_sequences()
        for name, (ok, allowed) in _NUMBER_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                self._fail(name, "a number")
            if not math.isfinite(value):
                self._fail(name, "a finite number")
            if not ok(value):
                self._fail(name, allowed)
        for name, (ok, allowed) in _INT_RANGES.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                self._fail(name, "an integer")
            if not ok(value):
                self._fail(name, allowed)
        for name in ("repetition_window", "dry_penalty_last_n"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                self._fail(name, "an integer >= 1, or None for the whole context")
        if not isinstance(self.do_sample, bool):
            self._fail("do_sample", "true or false")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            self._fail("seed", "an integer or None")
        self._check_order()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"sampling.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def _normalize_sequences(self) -> None:
        bias = self.logit_bias
        pairs = bias.items() if isinstance(bias, Mapping) else bias
        try:
            pairs = tuple((int(token), float(value)) for token, value in pairs)
        except (TypeError, ValueError):
            self._fail("logit_bias", "a {token_id: bias} mapping or (token_id, bias) pairs")
        if any(token < 0 or math.isnan(value) or value == math.inf for token, value in pairs):
            self._fail("logit_bias", "token ids >= 0 with biases that are finite or -inf (a ban)")
        object.__setattr__(self, "logit_bias", tuple(sorted(dict(pairs).items())))
        breakers = self.dry_sequence_breakers
        if isinstance(breakers, str) or not all(isinstance(t, int) and t >= 0 for t in breakers):
            self._fail("dry_sequence_breakers", "a sequence of token ids >= 0")
        object.__setattr__(self, "dry_sequence_breakers", tuple(breakers))
        if not isinstance(self.order, str):
            object.__setattr__(self, "order", tuple(str(stage) for stage in self.order))

    def _check_order(self) -> None:
        """A list is the whole chain (unlisted stages do not run, as in llama.cpp); a named order must
        hold every enabled stage, so that switching to it never silently drops one."""
        if isinstance(self.order, str) and self.order not in ORDERS:
            self._fail("order", f"one of {sorted(ORDERS)} or a list of stages from {list(STAGE_NAMES)}")
        if not isinstance(self.order, str):
            unknown = [s for s in self.order if s not in STAGE_NAMES]
            repeated = sorted({s for s in self.order if self.order.count(s) > 1})
            if unknown or repeated:
                problem = f"unknown stage(s) {unknown}" if unknown else f"repeated stage(s) {repeated}"
                self._fail("order", f"a list of distinct stages from {list(STAGE_NAMES)} ({problem})")
            if "mirostat" in self.order and self.order[-1] != "mirostat":
                self._fail("order", "a list with 'mirostat' last (it samples from what the others left)")
            return
        missing = [s for s in STAGE_NAMES if STAGE_ENABLED[s](self) and s not in ORDERS[self.order]]
        if missing:
            self._fail("order", f"an order holding every enabled stage ({missing} are not in it); list them")

    @property
    def chain(self) -> tuple[str, ...]:
        """Every stage of the order (enabled or not)."""
        return ORDERS[self.order] if isinstance(self.order, str) else self.order

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the modified (penalized, biased...) logits."""
        return not self.do_sample or self.temperature == 0

    @property
    def stages(self) -> tuple[str, ...]:
        """The enabled stages, in this config's order."""
        return tuple(stage for stage in self.chain if STAGE_ENABLED[stage](self))

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

    @property
    def is_stateful(self) -> bool:
        """True when draws depend on a per-row state carried between steps (mirostat's μ)."""
        return "mirostat" in self.stages and not self.is_greedy

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
    """The named preset, optionally with some fields overridden (lists become tuples).

    >>> get_preset("balanced", order=["penalties", "top_k", "temperature", "min_p"]).stages
    ('penalties', 'top_k', 'temperature')
    """
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
