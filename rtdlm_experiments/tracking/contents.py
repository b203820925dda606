"""What a job's MLflow run holds, built from its saved record and generations (pure: nothing is logged
here; `rtdlm_experiments.tracking.jobs` logs it): tags, the generations as rows and as a readable HTML
page, the prompt set as a dataset, and the record's own tags and extra artifacts.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rtdlm_experiments.tracking.names import (
    CONFIG_HASH_TAG,
    GIT_DIRTY_TAG,
    HOST_TAG,
    JOB_TAG,
    MODEL_DTYPE_TAG,
    MODEL_NAME_TAG,
    MODEL_SHA256_TAG,
    VERSION_TAG_PREFIX,
)

GENERATION_COLUMNS = ("prompt_index", "sample_index", "category", "prompt", "output")
"""The leading columns of the generations table; every other scalar field of a row (its per-row
metrics) follows them."""
_NOT_TABULATED = ("token_ids", "seed", "prompt_tokens")
_TAG_LIMIT = 4000


def environment_tags(environment: Mapping[str, Any]) -> dict[str, str]:
    """Versions, host and git state of a record's ``environment`` as tags (parents and children alike).

    >>> environment_tags({"versions": {"torch": "2.1"}, "hostname": "h", "git_sha": "ab", "git_dirty": True})
    ... # doctest: +NORMALIZE_WHITESPACE
    {'rtdlm.version.torch': '2.1', 'rtdlm.host': 'h', 'git_sha': 'ab', 'mlflow.source.git.commit': 'ab',
     'rtdlm.git_dirty': 'true'}
    """
    tags = {f"{VERSION_TAG_PREFIX}{name}": str(version) for name, version in
            (environment.get("versions") or {}).items() if version}  # fmt: skip
    if environment.get("hostname"):
        tags[HOST_TAG] = str(environment["hostname"])
    if sha := environment.get("git_sha"):
        tags["git_sha"] = tags["mlflow.source.git.commit"] = str(sha)
    if environment.get("git_dirty") is not None:
        tags[GIT_DIRTY_TAG] = str(bool(environment["git_dirty"])).lower()
    for key in ("device", "dtype"):
        if environment.get(key):
            tags[key] = str(environment[key])
    return tags


def model_tags(model: Mapping[str, Any], dtype: str | None, weights_sha256: str | None) -> dict[str, str]:
    """The model as tags: name, dtype, and the sha-256 of its weights when the job recorded it.

    >>> model_tags({"name": "m", "dtype": "float32"}, None, "ab")
    {'rtdlm.model.name': 'm', 'rtdlm.model.dtype': 'float32', 'rtdlm.model.sha256': 'ab'}
    """
    tags = {
        MODEL_NAME_TAG: str(model.get("name", "")),
        MODEL_DTYPE_TAG: str(dtype or model.get("dtype")),
    }
    if weights_sha256:
        tags[MODEL_SHA256_TAG] = weights_sha256
    return tags


def job_tags(record: Mapping[str, Any], parent_run_id: str | None) -> dict[str, str]:
    """Every tag of a job's run: provenance, source, environment, the record's own ``tags`` (they win)."""
    job = record["job"]
    overrides = " ".join(job.get("overrides", []))
    tags = {
        JOB_TAG: "true",
        "hydra.overrides": overrides,
        "hydra.job_num": str(job.get("num", "")),
        "output_dir": str(job.get("output_dir", "")),
        CONFIG_HASH_TAG: str(record.get("config_hash", "")),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": f"python -m rtdlm_experiments {overrides}".strip(),
        **environment_tags(record.get("environment") or {}),
    }
    if record.get("error"):
        tags["error"] = str(record["error"])[:_TAG_LIMIT]
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    tags.update({str(key): str(value)[:_TAG_LIMIT] for key, value in (record.get("tags") or {}).items()})
    return tags


def generation_rows(generations: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The generations table: prompt, sample and completion first, then each row's scalar metrics.

    >>> generation_rows([{"prompt_index": 0, "sample_index": 1, "prompt": "p", "output": "o",
    ...                   "token_ids": [1], "new_tokens": 1}])
    [{'prompt_index': 0, 'sample_index': 1, 'category': None, 'prompt': 'p', 'output': 'o', 'new_tokens': 1}]
    """
    rows = []
    for row in generations:
        table_row = {key: row.get(key) for key in GENERATION_COLUMNS}
        table_row.update({
            key: value for key, value in row.items()
            if key not in table_row and key not in _NOT_TABULATED and _is_scalar(value)
        })  # fmt: skip
        rows.append(table_row)
    return rows


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def generations_html(rows: Sequence[Mapping[str, Any]], title: str) -> str:
    """A self-contained HTML page of the generations table (MLflow's artifact view renders HTML): one
    block per prompt, its samples below it with their metrics."""
    metric_keys = [key for key in (rows[0] if rows else {}) if key not in GENERATION_COLUMNS]
    parts = [
        "<!doctype html><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1em}pre{white-space:pre-wrap;background:#f6f8fa;"
        "padding:.5em;margin:.2em 0}table{border-collapse:collapse;margin-bottom:1.5em;width:100%}"
        "td,th{border:1px solid #ddd;padding:4px;vertical-align:top;text-align:left}"
        "th{background:#eef}td.completion{width:60%}</style>",
        f"<h2>{html.escape(title)}</h2>",
    ]
    previous_prompt = None
    for row in rows:
        if row.get("prompt_index") != previous_prompt:
            if previous_prompt is not None:
                parts.append("</table>")
            previous_prompt = row.get("prompt_index")
            category = f" ({html.escape(str(row['category']))})" if row.get("category") else ""
            parts += [
                f"<h3>Prompt {row.get('prompt_index')}{category}</h3>",
                f"<pre>{html.escape(str(row.get('prompt', '')))}</pre>",
                "<table><tr><th>sample</th><th>completion</th>"
                + "".join(f"<th>{html.escape(key)}</th>" for key in metric_keys)
                + "</tr>",
            ]
        cells = "".join(f"<td>{html.escape(_cell(row.get(key)))}</td>" for key in metric_keys)
        parts.append(
            f"<tr><td>{row.get('sample_index')}</td>"
            f"<td class='completion'><pre>{html.escape(str(row.get('output', '')))}</pre></td>{cells}</tr>"
        )
    if previous_prompt is not None:
        parts.append("</table>")
    return "\n".join(parts) + "\n"


def _cell(value: Any) -> str:
    """
    >>> _cell(0.123456), _cell(None), _cell(True)
    ('0.1235', '', 'True')
    """
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def prompt_set(config: Mapping[str, Any], generations: Sequence[Mapping[str, Any]]) -> dict[str, str] | None:
    """The prompt set as an MLflow dataset: name, source and a digest of the prompt texts the job used.

    >>> prompt_set({"prompts": {"name": "default", "limit": 2}}, [{"prompt_index": 0, "prompt": "a"}])
    ... # doctest: +ELLIPSIS
    {'name': 'default[:2]', 'digest': '...', 'source_type': 'code', 'source': '{"uri": ...', 'profile': ...}
    """
    prompts = dict(config.get("prompts") or {})
    texts = {row.get("prompt_index"): str(row.get("prompt", "")) for row in generations}
    if not texts:
        return None
    is_file = prompts.get("name") == "file" and prompts.get("path")
    name = Path(str(prompts["path"])).name if is_file else str(prompts.get("name", "prompts"))
    if prompts.get("limit"):
        name += f"[:{prompts['limit']}]"
    uri = Path(str(prompts["path"])).resolve().as_uri() if is_file else (
        f"rtdlm_experiments/prompts/{prompts.get('name')}.jsonl")  # fmt: skip
    ordered = [texts[index] for index in sorted(texts, key=lambda index: (index is None, index))]
    digest = hashlib.sha256(json.dumps(ordered).encode()).hexdigest()[:16]
    return {
        "name": name,
        "digest": digest,
        "source_type": "local" if is_file else "code",
        "source": json.dumps({"uri": uri}),
        "profile": json.dumps({"num_prompts": len(ordered)}),
    }


def flat_records_file(path: Path) -> list[dict[str, Any]] | None:
    """The rows of a .jsonl or .csv artifact when it is a list of flat records (a table), else None."""
    try:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as file:
                rows = [json.loads(line) for line in file if line.strip()]
        elif path.suffix == ".csv":
            import pandas as pd

            rows = pd.read_csv(path).to_dict(orient="records")
        else:
            return None
    except (OSError, ValueError):
        return None
    flat = all(isinstance(row, dict) and all(_is_scalar(value) for value in row.values()) for row in rows)
    return rows if rows and flat else None
