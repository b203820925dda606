"""Prompt sets and tasks: the ``prompts`` config → its `Task` (``prompts._target_``) → the problems a job
asks, and the stop strings it uses. The bundled sets (``prompts/<name>.jsonl``) and a user's .txt/.jsonl
file are `rtdlm_experiments.tasks.prompt_file.PromptSetTask`; benchmarks (HumanEval, GSM8K, MBPP, TriviaQA,
NQ-open) have their own task classes. Nothing here depends on which task it is.

A ``.jsonl`` line is ``{"text": ..., "category": ..., "answer": ..., "scorer": ..., "tests": ...}`` with
only ``text`` required; ``answer`` (a string or a list of acceptable strings) is the reference for
short-answer scoring, ``scorer`` (``numeric`` or ``regex``) how it is compared, ``tests`` Python that
raises when the reply's code is wrong (`rtdlm_experiments.tasks.prompt_file`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.utils import get_method

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.paths import config_dir
from rtdlm_experiments.tasks.base import Prompt, Task, select_problems

__all__ = ["Prompt", "build_task", "load_prompts", "stop_strings"]

FILE_SOURCE = "file"
"""``prompts.name`` value that reads ``prompts.path`` instead of a bundled set."""
PROMPT_SET_TARGET = "rtdlm_experiments.tasks.prompt_file.PromptSetTask"
"""The task of a ``prompts`` config without ``_target_``: a bundled set or a file."""
_GENERIC_KEYS = ("_target_", "limit", "shuffle", "chat_template", "stop_strings")


def bundled_sets() -> list[str]:
    """Names of the prompt sets shipped in ``rtdlm_experiments/prompts/``."""
    folder = resources.files("rtdlm_experiments") / "prompts"
    return sorted(
        entry.name.removesuffix(".jsonl") for entry in folder.iterdir() if entry.name.endswith(".jsonl")
    )


MAX_PROMPTS = 100_000


def task_configs() -> list[str]:
    """Names of the ``prompts`` config group (``prompts=<name>``)."""
    return sorted(path.stem for path in (Path(config_dir()) / "prompts").glob("*.yaml"))


def build_task(cfg: Mapping[str, Any]) -> Task:
    """The `Task` a ``prompts`` config names: its ``_target_`` called with the task's own fields
    (``name``, and ``path`` when set); ConfigError when it cannot be built."""
    target = cfg.get("_target_") or PROMPT_SET_TARGET
    fields = {key: value for key, value in cfg.items() if key not in _GENERIC_KEYS and value is not None}
    try:
        return get_method(target)(**fields)
    except Exception as err:
        message = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"prompts._target_={target!r} is invalid with {fields}: {message}") from err


def load_prompts(cfg: Mapping[str, Any], task: Task | None = None) -> list[Prompt]:
    """The problems a ``prompts`` config (``limit``, ``shuffle``, ``chat_template``) selects of its task;
    ConfigError if unusable."""
    limit = cfg.get("limit")
    if limit is not None and not 1 <= limit <= MAX_PROMPTS:
        raise ConfigError(f"prompts.limit={limit} is invalid: must be in [1, {MAX_PROMPTS}], or null for all")
    task = task or build_task(cfg)
    problems = task.problems(chat_template=bool(cfg.get("chat_template", True)))
    if not problems:
        raise ConfigError(f"prompts: {cfg.get('path') or cfg['name']} holds no prompts")
    if limit is None and len(problems) > MAX_PROMPTS:
        raise ConfigError(
            f"prompts: {len(problems)} prompts is invalid: at most {MAX_PROMPTS} (set prompts.limit)"
        )
    shuffle = cfg.get("shuffle")
    return select_problems(problems, limit, task.shuffle_by_default if shuffle is None else bool(shuffle))


def stop_strings(cfg: Mapping[str, Any], task: Task | None = None) -> tuple[str, ...]:
    """The stop strings of a ``prompts`` config: its ``stop_strings``, or when that is null the task's own.

    >>> stop_strings({"name": "default", "stop_strings": ["\\n\\n"]}), stop_strings({"name": "default"})
    (('\\n\\n',), ())
    """
    configured = cfg.get("stop_strings")
    if configured is None:
        return (task or build_task(cfg)).stop_strings(bool(cfg.get("chat_template", True)))
    strings = tuple(configured)
    if not all(isinstance(string, str) and string for string in strings):
        raise ConfigError(f"prompts.stop_strings={list(strings)!r} is invalid: must be non-empty strings")
    return strings


def read_set(name: str, path: str | None) -> list[Prompt]:
    """A bundled set's prompts, or the file's when ``name`` is ``file``."""
    if name == FILE_SOURCE:
        return read_prompt_file(path)
    if name not in bundled_sets():
        tasks = [task for task in task_configs() if task not in (*bundled_sets(), FILE_SOURCE)]
        raise ConfigError(
            f"prompts.name={name!r} is invalid: must be a bundled set {bundled_sets()} or {FILE_SOURCE!r}"
            f", or pick a task with prompts=<task> (one of {tasks})"
        )
    bundled = resources.files("rtdlm_experiments") / "prompts" / f"{name}.jsonl"
    return _parse_jsonl(bundled.read_text(encoding="utf-8"), source=f"bundled set {name!r}")


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


SCORERS = ("numeric", "regex")


def _parse_scoring(record: Mapping[str, Any]) -> tuple[str, str]:
    """A line's ``scorer`` and ``tests``, checked: a scorer needs an answer, a regex must compile.

    >>> _parse_scoring({"answer": "4", "scorer": "numeric"}), _parse_scoring({"tests": "assert f() == 1"})
    (('numeric', ''), ('', 'assert f() == 1'))
    """
    scorer, tests = record.get("scorer") or "", record.get("tests") or ""
    if scorer and scorer not in SCORERS:
        raise ValueError(f"'scorer' must be one of {SCORERS}, not {scorer!r}")
    if scorer and record.get("answer") is None:
        raise ValueError(f"'scorer': {scorer!r} needs an 'answer'")
    if scorer == "regex":
        answer = record["answer"]
        for pattern in [answer] if isinstance(answer, str) else answer:
            re.compile(pattern)
    if not isinstance(tests, str):
        raise TypeError("'tests' must be a string of Python")
    return scorer, tests


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
                    *_parse_scoring(record),
                )
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, ValueError, re.error) as err:
            raise ConfigError(
                f"prompts: line {line_number} of {source} is invalid: need a JSON object with a 'text' field"
                f" (a string) and optional strings 'category', 'task_id', 'answer' (or a list of strings),"
                f" 'scorer' (numeric|regex, with 'answer'), 'tests' (Python)"
                f" ({type(err).__name__}: {err})"
            ) from err
    return prompts
