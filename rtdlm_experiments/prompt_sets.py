"""Prompt sets: the ones bundled with the package (``prompts/<name>.jsonl``) or a user's .txt/.jsonl file."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rtdlm_experiments.schema import ConfigError

FILE_SOURCE = "file"
"""``prompts.name`` value that reads ``prompts.path`` instead of a bundled set."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""


def bundled_sets() -> list[str]:
    """Names of the prompt sets shipped in ``rtdlm_experiments/prompts/``."""
    folder = resources.files("rtdlm_experiments") / "prompts"
    return sorted(
        entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl")
    )


def load_prompts(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The prompts a ``prompts`` config (``name``, ``path``, ``limit``) selects; ConfigError if unusable."""
    name, limit = cfg["name"], cfg.get("limit")
    if limit is not None and limit < 1:
        raise ConfigError(f"prompts.limit={limit} is invalid: must be >= 1, or null for all prompts")
    if name == FILE_SOURCE:
        prompts = read_prompt_file(cfg.get("path"))
    elif name in bundled_sets():
        bundled = resources.files("rtdlm_experiments") / "prompts" / f"{name}.jsonl"
        prompts = _parse_jsonl(bundled.read_text(encoding="utf-8"), source=f"bundled set {name!r}")
    else:
        raise ConfigError(
            f"prompts.name={name!r} is invalid: must be a bundled set {bundled_sets()} or {FILE_SOURCE!r}"
        )
    if not prompts:
        raise ConfigError(f"prompts: {name if name != FILE_SOURCE else cfg.get('path')} holds no prompts")
    return prompts[:limit]


def read_prompt_file(path: str | None) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (``text`` + optional ``category`` per line) or any other text file
    (one prompt per non-empty line)."""
    if not path:
        raise ConfigError("prompts.path is missing: prompts=file needs prompts.path=<file.txt|file.jsonl>")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"prompts.path={path!r} is invalid: no such file")
    content = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        return _parse_jsonl(content, source=str(file))
    return [Prompt(line.strip()) for line in content.splitlines() if line.strip()]


def _parse_jsonl(content: str, source: str) -> list[Prompt]:
    prompts = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompts.append(Prompt(str(record["text"]), str(record.get("category", ""))))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(
                f"prompts: line {line_number} of {source} is invalid: need a JSON object with a 'text' field"
                f" ({type(err).__name__}: {err})"
            ) from err
    return prompts
