"""See what a sampling preset does before running it: every effective field, overrides applied.

    python -m rtdlm_experiments.config.presets                      # every preset side by side
    python -m rtdlm_experiments.config.presets creative             # one preset, field by field
    python -m rtdlm_experiments.config.presets creative top_p=0.8   # ... with the overrides a run would apply
    python -m rtdlm_experiments.config.presets save NAME --from-run RUN  # a run's config, as sampling=NAME

The numbers live in `sampling.PRESETS`; the ``sampling/`` config group only names a preset, which is
why ``--cfg job`` shows its fields as ``null`` ("the preset's value").
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from typing import Any

from sampling import PRESETS, SamplingConfig, get_preset

_HIDDEN_FIELDS = ("seed",)
"""The job's ``seed`` seeds the sampler; it is no part of a preset."""


def preset_fields(config: SamplingConfig) -> dict[str, Any]:
    """A config's effective fields (its seed left out)."""
    return {key: value for key, value in asdict(config).items() if key not in _HIDDEN_FIELDS}


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["top_p=0.8", "sampling.order=hf"]`` → ``{"top_p": 0.8, "order": "hf"}`` (YAML-typed values).

    >>> parse_overrides(["top_p=0.8", "sampling.order=hf", "do_sample=false"])
    {'top_p': 0.8, 'order': 'hf', 'do_sample': False}
    """
    import yaml

    parsed = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator:
            raise ValueError(f"expected FIELD=VALUE, got {item!r}")
        parsed[key.removeprefix("sampling.")] = yaml.safe_load(value)
    return parsed


def describe(name: str, overrides: dict[str, Any] | None = None) -> str:
    """One preset (with overrides), a field per line, overridden fields marked ``*``."""
    config = get_preset(name, **(overrides or {}))
    changed = set(overrides or {})
    lines = [f"sampling={name}" + (" (* = overridden)" if changed else "")]
    width = max(len(field.name) for field in fields(SamplingConfig))
    for key, value in preset_fields(config).items():
        lines.append(f"  {key:<{width}}  {value!r}{' *' if key in changed else ''}")
    return "\n".join(lines)


def table() -> str:
    """Every preset side by side, one field per row."""
    configs = {name: preset_fields(config) for name, config in PRESETS.items()}
    keys = list(next(iter(configs.values())))
    rows = [["field", *configs]]
    rows += [[key, *(repr(config[key]) for config in configs.values())] for key in keys]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)  # fmt: skip


def save_main(argv: Sequence[str]) -> int:
    """``save NAME --from-run RUN``: write a job's (or a search's best) sampling config as a preset file."""
    from rtdlm_experiments.config.preset_files import sampling_from_run, save_preset

    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.config.presets save",
        description="Save a run's sampling config as a preset that sampling=NAME loads.",
    )
    parser.add_argument("name", help="the new preset's name")
    parser.add_argument(
        "--from-run", required=True, metavar="RUN",
        help="a job folder, a search's sweep folder, or an MLflow run id (a job's, or a search's parent)",
    )  # fmt: skip
    parser.add_argument("--tracking-uri", help="MLflow store of RUN (default: the project's)")
    parser.add_argument("--force", action="store_true", help="replace an existing saved preset")
    args = parser.parse_args(argv)
    try:
        sampling = sampling_from_run(args.from_run, args.tracking_uri)
        path = save_preset(args.name, sampling, f"run {args.from_run}", args.force)
    except (ValueError, OSError) as err:
        parser.exit(2, f"error: {err}\n")
    print(f"saved {path}: load it with sampling={args.name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["save"]:
        return save_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.config.presets",
        description="Show a sampling preset's effective values."
    )
    parser.add_argument("name", nargs="?", help=f"a preset: {', '.join(PRESETS)} (default: all)")
    parser.add_argument("overrides", nargs="*", help="FIELD=VALUE as on the app's command line")
    args = parser.parse_args(argv)
    if args.name is None:
        print(table())
        return 0
    try:
        print(describe(args.name, parse_overrides(args.overrides)))
    except (ValueError, TypeError) as err:
        parser.exit(2, f"error: {err}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
