"""Command-line overrides of numeric fields checked before Hydra composes the config: Hydra rejects
``seed=abc`` with a multi-line message and exit code 1, where every other bad value gets one line and
exit code 2 (`rtdlm_experiments.config.errors.ConfigError`). The schema dataclasses say which keys are
numeric.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator, Sequence

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.schema import DECODER_SCHEMAS, ExperimentConfig

NUMERIC = (int, float)
_SWEEP_SYNTAX = ("(", "[", "{", "$")


def _numeric_type(annotation: object) -> type | None:
    """int or float for ``int``, ``float`` and their optional forms; else None."""
    options = typing.get_args(annotation) or (annotation,)
    found = [option for option in options if option in NUMERIC]
    return found[0] if len(found) == 1 and all(o in (*NUMERIC, type(None)) for o in options) else None


def _fields(schema: type, prefix: str = "") -> Iterator[tuple[str, type]]:
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        hint = hints[item.name]
        if dataclasses.is_dataclass(hint):
            yield from _fields(hint, f"{prefix}{item.name}.")
        elif (numeric := _numeric_type(hint)) is not None:
            yield f"{prefix}{item.name}", numeric


def numeric_keys() -> dict[str, type]:
    """Every numeric key of the config, dotted, with its type (decoder keys from every decoder schema).

    >>> keys = numeric_keys()
    >>> keys["seed"], keys["eval.timeout_s"], keys["decoder.num_draft_tokens"], "sampling.preset" in keys
    (<class 'int'>, <class 'float'>, <class 'int'>, False)
    """
    keys = dict(_fields(ExperimentConfig))
    for schema in DECODER_SCHEMAS.values():
        keys |= {f"decoder.{name}": kind for name, kind in _fields(schema)}
    return keys


def _parses(value: str, kind: type) -> bool:
    if value == "null":
        return True
    try:
        (float if kind is float else int)(value)
    except ValueError:
        return False
    return True  # a float's range (inf, nan) is the field's own check, after composition


def check_overrides(arguments: Sequence[str]) -> None:
    """ConfigError for the first ``key=value`` override of a numeric key whose value is not a number
    (sweeps ``a,b`` are checked item by item; Hydra's functions and interpolations are left to Hydra).

    >>> check_overrides(["seed=3", "sampling=creative", "-m", "num_samples=1,2", "eval.timeout_s=inf"])
    >>> check_overrides(["seed=abc"])
    Traceback (most recent call last):
    ...
    rtdlm_experiments.config.errors.ConfigError: seed='abc' is invalid: must be an integer
    """
    keys = numeric_keys()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:
            continue
        key, value = argument.split("=", 1)
        key = key.lstrip("+")
        if key not in keys or any(mark in value for mark in _SWEEP_SYNTAX):
            continue
        kind = keys[key]
        for item in value.split(","):
            if not _parses(item.strip().strip("'\""), kind):
                need = "an integer" if kind is int else "a number"
                raise ConfigError(f"{key}={item.strip()!r} is invalid: must be {need}")
