"""Prompt sets: the ones bundled with the package (``prompts/<name>.jsonl``), the HumanEval problems, or a
user's .txt/.jsonl file.

A ``.jsonl`` line is ``{"text": ..., "category": ..., "answer": ...}`` with only ``text`` required;
``answer`` (a string or a list of acceptable strings) is the reference for short-answer scoring
(`rtdlm_experiments.tasks.answers`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from rtdlm_experiments.schema import ConfigError
from rtdlm_experiments.tasks import humaneval

FILE_SOURCE = "file"
"""``prompts.name`` value that reads ``prompts.path`` instead of a bundled set."""
HUMANEVAL_SOURCE = "humaneval"
"""``prompts.name`` value for the 164 HumanEval problems (asked as a chat turn or continued raw, following
``prompts.chat_template``)."""


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = ""
    answer: str | tuple[str, ...] | None = None
    """Reference answer(s) for short-answer scoring; None when the prompt has none."""
    task_id: str = ""
    """The task the prompt poses (e.g. ``HumanEval/0``), for scoring that needs more than the text."""


def bundled_sets() -> list[str]:
    """Names of the prompt sets shipped in ``rtdlm_experiments/prompts/``."""
    folder = resources.files("rtdlm_experiments") / "prompts"
    return sorted(
        entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl")
    )


MAX_PROMPTS = 100_000


def load_prompts(cfg: Mapping[str, Any]) -> list[Prompt]:
    """The prompts a ``prompts`` config (``name``, ``path``, ``limit``) selects; ConfigError if unusable."""
    name, limit = cfg["name"], cfg.get("limit")
    if limit is not None and not 1 <= limit <= MAX_PROMPTS:
        raise ConfigError(f"prompts.limit={limit} is invalid: must be in [1, {MAX_PROMPTS}], or null for all")
    if name == FILE_SOURCE:
        prompts = read_prompt_file(cfg.get("path"))
    elif name == HUMANEVAL_SOURCE:
        prompts = humaneval_prompts(chat_template=bool(cfg.get("chat_template", True)))
    elif name in bundled_sets():
        bundled = resources.files("rtdlm_experiments") / "prompts" / f"{name}.jsonl"
        prompts = _parse_jsonl(bundled.read_text(encoding="utf-8"), source=f"bundled set {name!r}")
    else:
        raise ConfigError(
            f"prompts.name={name!r} is invalid: must be a bundled set {bundled_sets()},"
            f" {HUMANEVAL_SOURCE!r} or {FILE_SOURCE!r}"
        )
    if not prompts:
        raise ConfigError(f"prompts: {name if name != FILE_SOURCE else cfg.get('path')} holds no prompts")
    if len(prompts[:limit]) > MAX_PROMPTS:
        raise ConfigError(
            f"prompts: {len(prompts)} prompts is invalid: at most {MAX_PROMPTS} (set prompts.limit)"
        )
    return prompts[:limit]


def stop_strings(cfg: Mapping[str, Any]) -> tuple[str, ...]:
    """The stop strings of a ``prompts`` config: its ``stop_strings``, or when that is null the set's own
    (HumanEval continued raw: where the function ends; HumanEval as a chat: where the reply's code block
    closes; every other set: none).

    >>> stop_strings({"name": "default", "stop_strings": ["\\n\\n"]}), stop_strings({"name": "default"})
    (('\\n\\n',), ())
    >>> "\\ndef " in stop_strings({"name": "humaneval", "chat_template": False})
    True
    >>> stop_strings({"name": "humaneval", "chat_template": True})
    ('\\n```\\n',)
    """
    configured = cfg.get("stop_strings")
    if configured is None:
        if cfg["name"] != HUMANEVAL_SOURCE:
            return ()
        chat = cfg.get("chat_template", True)
        return humaneval.CHAT_STOP_SEQUENCES if chat else humaneval.STOP_SEQUENCES
    strings = tuple(configured)
    if not all(isinstance(string, str) and string for string in strings):
        raise ConfigError(f"prompts.stop_strings={list(strings)!r} is invalid: must be non-empty strings")
    return strings


def needs_code_execution(prompts: Sequence[Prompt]) -> bool:
    """Whether scoring these prompts runs model-written code (HumanEval problems)."""
    return any(prompt.task_id.startswith(humaneval.TASK_PREFIX) for prompt in prompts)


def humaneval_prompts(chat_template: bool) -> list[Prompt]:
    """The HumanEval problems in order, as a user turn (``chat_template``) or the raw prompt to continue."""
    return [
        Prompt(humaneval.prompt_text(problem, chat_template), "code", task_id=problem.task_id)
        for problem in humaneval.load_problems()
    ]


def read_prompt_file(path: str | None) -> list[Prompt]:
    """Prompts from a ``.jsonl`` file (``text`` + optional ``category`` and ``answer`` per line) or any
    other text file (one prompt per non-empty line)."""
    if not path:
        raise ConfigError("prompts.path is missing: prompts=file needs prompts.path=<file.txt|file.jsonl>")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"prompts.path={path!r} is invalid: no such file")
    content = _read_text(file, path)
    if file.suffix == ".jsonl":
        return _parse_jsonl(content, source=str(file))
    return [Prompt(line.strip()) for line in content.splitlines() if line.strip()]


MAX_PROMPT_FILE_BYTES = 64 << 20
"""A prompt file larger than this is refused before it is read (no prompt set needs more)."""


def _read_text(file: Path, path: str) -> str:
    """The file's UTF-8 text; ConfigError naming it if it is too large, unreadable or not UTF-8."""
    try:
        size = file.stat().st_size
        if size > MAX_PROMPT_FILE_BYTES:
            raise ConfigError(
                f"prompts.path={path!r} is invalid: {size} bytes, at most {MAX_PROMPT_FILE_BYTES} allowed"
            )
        data = file.read_bytes()[: MAX_PROMPT_FILE_BYTES + 1]
    except OSError as err:
        raise ConfigError(f"prompts.path={path!r} is invalid: cannot read it: {err.strerror}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"prompts.path={path!r} is invalid: not UTF-8 text (byte {err.start}: {err.reason})"
        ) from err


def _string_field(record: dict, key: str, required: bool = False) -> str:
    """``record[key]`` if it is a string ('' when absent and optional); TypeError otherwise."""
    if key not in record and not required:
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise TypeError(f"{key!r} must be a string, not {value!r}")
    return value


def _parse_answer(value: Any) -> str | tuple[str, ...] | None:
    """``answer`` as stored in a Prompt: a string, a tuple of strings, or None.

    >>> _parse_answer(["Paris", "paris, France"]), _parse_answer("4"), _parse_answer(None)
    (('Paris', 'paris, France'), '4', None)
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return tuple(value)
    raise TypeError(f"'answer' must be a string or a non-empty list of strings, not {value!r}")


def _parse_jsonl(content: str, source: str) -> list[Prompt]:
    prompts = []
    for line_number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise TypeError(f"a line must be a JSON object, not {type(record).__name__}")
            prompts.append(
                Prompt(
                    _string_field(record, "text", required=True),
                    _string_field(record, "category"),
                    _parse_answer(record.get("answer")),
                    _string_field(record, "task_id"),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(
                f"prompts: line {line_number} of {source} is invalid: need a JSON object with a 'text' field"
                f" (a string) and optional strings 'category', 'task_id', 'answer' (or a list of strings)"
                f" ({type(err).__name__}: {err})"
            ) from err
    return prompts
