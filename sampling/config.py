"""`SamplingConfig`: every knob of the sampler, validated once, plus the named stage orders and presets.

The fields are not written here: each comes from the `Param` of the stage record that uses it
(`sampling.stages.registry.STAGES`), plus the three of `GENERAL_PARAMS`. `config_class` builds the class
for a tuple of stage records, so a new stage is one rule and one record.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import field, fields, make_dataclass, replace
from typing import Any, ClassVar

from sampling.stages.record import Invalid, Param, Stage, stage_table
from sampling.stages.registry import STAGE_NAMES, STAGES

__all__ = [
    "GENERAL_PARAMS",
    "ORDERS",
    "PRESETS",
    "STAGES",
    "STAGE_NAMES",
    "SamplingConfig",
    "config_class",
    "get_preset",
    "sampling_params",
]

ORDERS: dict[str, tuple[str, ...]] = {
    "rtdlm": (
        *("penalties", "dry", "no_repeat_ngram", "logit_bias", "temperature", "top_k", "min_p", "top_p"),
        *("typical_p", "epsilon", "eta", "top_n_sigma", "xtc", "mirostat"),
    ),
    # transformers `GenerationMixin._get_logits_processor`: sequence bias, repetition penalty, no-repeat
    # n-gram, then the warpers (checked against the installed transformers by tests/test_stage_orders.py)
    "hf": (
        *("logit_bias", "penalties", "no_repeat_ngram"),
        *("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta"),
    ),
    # vLLM v1 `Sampler` (vllm/v1/sample/sampler.py): logit bias (a non-argmax-invariant logits processor),
    # penalties, temperature, min-p (argmax-invariant processor), then top-k and top-p
    "vllm": ("logit_bias", "penalties", "temperature", "min_p", "top_k", "top_p"),
    # llama.cpp `common_sampler_init` (common/sampling.cpp): logit bias, then the default `samplers` of
    # common/common.h; with mirostat on, the chain is logit bias, temperature, mirostat instead
    "llamacpp": (
        *("logit_bias", "penalties", "dry", "top_n_sigma", "top_k", "typical_p", "top_p", "min_p", "xtc"),
        "temperature",
    ),
    "llamacpp_mirostat": ("logit_bias", "temperature", "mirostat"),
}
"""The real default chains of each system, with every stage it shares with us (``rtdlm``: ours, with
every stage); each stage sees the output of the previous one. tests/test_stage_orders.py says where each
one comes from."""


def _do_sample(value: Any) -> Any:
    if not isinstance(value, bool):
        raise Invalid("true or false")
    return value


def _seed(value: Any) -> Any:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise Invalid("an integer or None")
    return value


def _order(value: Any) -> Any:
    return value if isinstance(value, str) else tuple(str(stage) for stage in value)


GENERAL_PARAMS: tuple[Param, ...] = (
    Param("do_sample", bool, True, _do_sample, "False: greedy, whatever the temperature."),
    Param("seed", int | None, None, _seed, "Seeds every row (None: fresh random seeds)."),
    Param(
        "order",
        str | tuple[str, ...],
        "rtdlm",
        _order,
        "A named order of `ORDERS` or a list of stages (the whole chain).",
        schema_type=Any,
    ),
)
"""The fields that belong to no stage."""


def sampling_params(stages: tuple[Stage, ...] = STAGES) -> tuple[Param, ...]:
    """Every field of the config class of ``stages``: the stages' parameters, then `GENERAL_PARAMS`."""
    return (*(param for stage in stages for param in stage.params), *GENERAL_PARAMS)


class _SamplingConfigRules:
    """The behaviour of every config class; `config_class` adds the fields (a frozen dataclass)."""

    stage_table: ClassVar[Mapping[str, Stage]]
    """The stages this class knows, by name, in `STAGE_NAMES` order."""
    params: ClassVar[tuple[Param, ...]]

    def __post_init__(self) -> None:
        for param in self.params:
            try:
                object.__setattr__(self, param.name, param.check(getattr(self, param.name)))
            except Invalid as error:
                self._fail(param.name, str(error))
        self._check_order()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"sampling.{name}={getattr(self, name)!r} is invalid: must be {allowed}")

    def _check_order(self) -> None:
        """A list is the whole chain (unlisted stages do not run, as in llama.cpp); a named order must
        hold every enabled stage, so that switching to it never silently drops one."""
        names = list(self.stage_table)
        if isinstance(self.order, str) and self.order not in ORDERS:
            self._fail("order", f"one of {sorted(ORDERS)} or a list of stages from {names}")
        if not isinstance(self.order, str):
            unknown = [s for s in self.order if s not in self.stage_table]
            repeated = sorted({s for s in self.order if self.order.count(s) > 1})
            if unknown or repeated:
                problem = f"unknown stage(s) {unknown}" if unknown else f"repeated stage(s) {repeated}"
                self._fail("order", f"a list of distinct stages from {names} ({problem})")
            if "mirostat" in self.order and self.order[-1] != "mirostat":
                self._fail("order", "a list with 'mirostat' last (it samples from what the others left)")
            return
        missing = [s for s, stage in self.stage_table.items() if stage.enabled(self) and s not in self.chain]
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
        return tuple(stage for stage in self.chain if self.stage_table[stage].enabled(self))

    @property
    def has_penalties(self) -> bool:
        return self.stage_table["penalties"].enabled(self)

    @property
    def is_stateful(self) -> bool:
        """True when draws depend on a per-row state carried between steps (mirostat's μ)."""
        return "mirostat" in self.stages and not self.is_greedy

    def replace(self, **overrides: object) -> Any:
        """A copy with some fields changed (validated again)."""
        known = [f.name for f in fields(self)]
        unknown = set(overrides) - set(known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {sorted(unknown)}; known: {known}")
        return replace(self, **overrides)


def config_class(stages: tuple[Stage, ...], name: str = "SamplingConfig") -> type:
    """The frozen config dataclass of ``stages``: one field per `Param` (default, check), the stage table,
    and a docstring listing the fields. `SamplingConfig` is ``config_class(STAGES)``."""
    params = sampling_params(stages)
    lines = [f"    {p.name}: {p.doc} Default {p.default!r}." for p in params]
    doc = _CONFIG_DOC + "\n\n    Fields (from the stage records):\n\n" + "\n".join(lines) + "\n"
    cls = make_dataclass(
        name,
        [(p.name, p.type, field(default=p.default)) for p in params],
        bases=(_SamplingConfigRules,),
        namespace={"stage_table": stage_table(stages), "params": params, "__doc__": doc},
        frozen=True,
    )
    cls.__module__ = __name__
    return cls


_CONFIG_DOC = """How one token is chosen from a row of logits.

    Semantics (see docs/design.md): the enabled stages run in the order named by ``order`` (a key of
    `ORDERS` or a sequence of stage names), each on the distribution the previous one left. Value filters
    are thresholds, so ties share a fate and results never depend on sort order or batch composition.
    ``temperature == 0`` or ``do_sample=False`` means greedy (argmax after the logit-modifying stages).
    Sequences (``order``, ``logit_bias``, ``dry_sequence_breakers``) are stored as tuples; ``logit_bias``
    also accepts a ``{token_id: bias}`` mapping."""

SamplingConfig = config_class(STAGES)

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
