"""The job side of a search: whether this job is a search trial that races, and against what.

The sweeper writes ``<sweep dir>/search/incumbent.json`` (the best finished trial's per-prompt objective
values) before it launches trials; a job of that sweep reads it here. A job outside a search, or a
search with several objectives (racing needs one) or ``search.racing=false``, gets no race.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.search.objectives import parse_objectives
from rtdlm_experiments.search.racing import Race

log = logging.getLogger(__name__)

SEARCH_DIR = "search"
INCUMBENT_FILE = "incumbent.json"


def incumbent_path(sweep_dir: Path) -> Path:
    return sweep_dir / SEARCH_DIR / INCUMBENT_FILE


def write_incumbent(sweep_dir: Path, trial_number: int | None, scores: Mapping[int, float]) -> None:
    """What the next trials race against (written atomically: jobs may start while it is replaced)."""
    path = incumbent_path(sweep_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"trial": trial_number, "scores": {str(prompt): value for prompt, value in scores.items()}}
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(payload) + "\n", encoding="utf-8")
    temporary.replace(path)


def read_incumbent(sweep_dir: Path) -> dict[int, float]:
    payload = json.loads(incumbent_path(sweep_dir).read_text(encoding="utf-8"))
    return {int(prompt): float(value) for prompt, value in payload["scores"].items()}


def race_for_job(cfg: Any, sweep_dir: Path | None) -> Race | None:
    """This job's race, when it is a trial of a racing search with one objective; else None."""
    search = cfg.get("search")
    if sweep_dir is None or search is None or not incumbent_path(sweep_dir).is_file():
        return None
    if not search.racing or len(search.objectives) != 1:
        return None
    if search.chunk_prompts < 2:
        raise ConfigError(f"search.chunk_prompts={search.chunk_prompts} is invalid: must be >= 2")
    if not 0.5 <= search.confidence < 1:
        raise ConfigError(f"search.confidence={search.confidence} is invalid: must be in [0.5, 1)")
    objective = parse_objectives(list(search.objectives))[0]
    rows_per_chunk = search.chunk_prompts * cfg.num_samples
    if rows_per_chunk < cfg.batch_size:
        log.warning(
            "racing generates %d rows per chunk (search.chunk_prompts x num_samples), fewer than "
            "batch_size=%d rows in flight: each chunk runs a smaller batch, which costs throughput",
            rows_per_chunk, cfg.batch_size,
        )  # fmt: skip
    return Race(
        metric=objective.metric,
        sign=objective.sign,
        incumbent=read_incumbent(sweep_dir),
        chunk_prompts=int(search.chunk_prompts),
        confidence=float(search.confidence),
    )
