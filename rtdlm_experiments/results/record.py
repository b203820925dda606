"""The saved result of a job and the folders that hold them: ``results.json`` (the record),
``generations.jsonl`` (one row per generated sequence) and, in a sweep's folder, ``sweep.json``.

These files are the source of truth: MLflow runs (`rtdlm_experiments.tracking`) and summary tables
(`rtdlm_experiments.analysis.report`) are built from them, live or later by ``sync``.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rtdlm_experiments.results.environment import environment_info

if TYPE_CHECKING:
    from rtdlm_experiments.config.validation import JobSpec
    from rtdlm_experiments.job.app import JobResult

RESULTS_FILE = "results.json"
GENERATIONS_FILE = "generations.jsonl"
SWEEP_FILE = "sweep.json"
"""In a sweep's folder: its name, the keys it sweeps over and the MLflow parent run."""
LOGGED_FILE = "mlflow_run.json"
"""In a job's folder once uploaded: where to, so ``sync`` does not upload it twice."""
SUMMARY_STEM = "summary"
"""``<sweep dir>/summary.{csv,md,png}``: the sweep's table and plot."""
HYDRA_SWEEP_FILE = "multirun.yaml"
"""Written by Hydra into every sweep folder; how ``sync`` recognises one."""


KEY_METRICS = (
    "pass_at_1",
    "pass_at_10",
    "accuracy",
    "exact_match",
    "f1",
    "contains_answer",
    "judge_perplexity",
    "distinct_2",
    "self_bleu_4",
    "seq_rep_4",
    "rep_w16",
    "loop_rate",
    "perplexity",
    "mean_entropy",
    "tokens_per_second",
    "speedup",
    "acceptance_rate",
)
"""Metrics shown side by side (those a job does not have are left out)."""

_NOT_HASHED = ("tracking", "experiment_name")
_INSTANTIATION_KEYS = ("_target_", "_partial_")
"""Hydra's keys say how a decoder is built, ``decoder.name`` already says which one: leaving them out
keeps the hashes of jobs logged before decoders had them, so resumes and drift baselines carry over."""


@dataclass(frozen=True)
class JobMeta:
    """Where a job sits in its run or sweep (from Hydra's runtime config)."""

    run_name: str
    overrides: list[str]
    num: int
    output_dir: str
    sweep_dir: str | None
    started_at_ms: int


# --- config -------------------------------------------------------------------------------------------


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys (lists stay values; tuples, and tuples in them, become lists, as in
    the config's JSON copy, so a config hashes and logs the same in memory and reloaded).

    >>> flatten_config({"a": {"b": 1, "c": [2, 3]}, "d": None})
    {'a.b': 1, 'a.c': [2, 3], 'd': None}
    >>> flatten_config({"sampling": {"logit_bias": ((50256, -100.0),), "order": ("top_k", "min_p")}})
    {'sampling.logit_bias': [[50256, -100.0]], 'sampling.order': ['top_k', 'min_p']}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, prefix=f"{name}."))
        elif isinstance(value, list | tuple):
            flat[name] = [list(item) if isinstance(item, tuple) else item for item in value]
        else:
            flat[name] = value
    return flat


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of what determines a job's generations (everything but where it is logged).

    Two jobs with the same hash produce the same results, which is what resuming a sweep keys on.

    >>> config = {"seed": 1, "decoder": {"name": "autoregressive"}, "tracking": {"uri": "a"}}
    >>> config_hash(config) == config_hash({**config, "tracking": {"uri": "b"}, "experiment_name": "x"})
    True
    >>> config_hash(config) == config_hash({**config, "seed": 2})
    False
    """
    relevant = {key: value for key, value in config.items() if key not in _NOT_HASHED}
    flat = {
        key: value
        for key, value in flatten_config(relevant).items()
        if key.rsplit(".", 1)[-1] not in _INSTANTIATION_KEYS
    }
    return hashlib.sha256(repr(sorted(flat.items())).encode()).hexdigest()[:16]


# --- records ------------------------------------------------------------------------------------------


def job_record(
    config: dict[str, Any], result: JobResult, job: JobMeta, tracking_uri: str | None
) -> dict[str, Any]:
    """Everything ``results.json`` holds about a completed job; ``artifacts`` names the extra files
    `save_job` writes from ``result.artifacts``."""
    return _record(config, job, tracking_uri, status="COMPLETED") | {
        "num_prompts": len(result.prompt_ids),
        "metrics": result.metrics,
        "timings": result.timings,
        "decoder_stats": result.output.stats,
        "environment": {
            **environment_info(),
            "device": result.device,
            "dtype": result.dtype,
            "weights_sha256": result.weights_sha256,
        },
        "tags": dict(result.tags),
        "artifacts": sorted(result.artifacts),
    }


def failure_record(
    config: dict[str, Any], job: JobMeta, error: BaseException, tracking_uri: str | None
) -> dict[str, Any]:
    """``results.json`` of a job that raised: its config and the error, so the failure is tracked too."""
    return _record(config, job, tracking_uri, status="FAILED") | {"error": f"{type(error).__name__}: {error}"}


def reused_record(
    config: dict[str, Any], job: JobMeta, tracking_uri: str | None, finished: Mapping[str, Any]
) -> dict[str, Any]:
    """``results.json`` of a job a resumed sweep did not rerun: it FINISHED in an earlier attempt as run
    ``finished["run_id"]``, which holds its generations. Its metrics are copied so that the sweep's
    summary covers every job."""
    return _record(config, job, tracking_uri, status="COMPLETED") | {
        "metrics": dict(finished["metrics"]),
        "reused_run_id": finished["run_id"],
    }


def _record(config: dict[str, Any], job: JobMeta, tracking_uri: str | None, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "config": config,
        "config_hash": config_hash(config),
        "metrics": {},
        "job": asdict(job),
        "ended_at_ms": int(time.time() * 1000),
        "environment": environment_info(),
        "tracking_uri": tracking_uri,
    }


def generation_records(spec: JobSpec, result: JobResult) -> list[dict[str, Any]]:
    """One ``generations.jsonl`` row per generated sequence, with its per-sample statistics."""
    output = result.output
    records = []
    for index, row in enumerate(result.rows):
        prompt = spec.prompts[row.prompt_index]
        logprobs = output.model_logprobs[index] if output.model_logprobs else []
        entropies = output.entropies[index] if output.entropies else []
        records.append(
            {
                "prompt_index": row.prompt_index,
                "sample_index": row.sample_index,
                "seed": row.seed,
                "category": prompt.category,
                "prompt": prompt.text,
                "answer": list(prompt.answer) if isinstance(prompt.answer, tuple) else prompt.answer,
                "task_id": prompt.task_id,
                "output": result.texts[index],
                "prompt_tokens": len(result.prompt_ids[row.prompt_index]),
                "new_tokens": len(output.token_ids[index]),
                "finished_by_stop": bool(output.finished_by_stop[index]) if output.finished_by_stop else None,
                "mean_logprob": _mean(logprobs),
                "mean_entropy": _mean(entropies),
                "token_ids": output.token_ids[index],
            }
        )
    return records


def _mean(values: Sequence[float]) -> float | None:
    """
    >>> _mean([1.0, 2.0]), _mean([])
    (1.5, None)
    """
    return sum(values) / len(values) if values else None


# --- job folders --------------------------------------------------------------------------------------


def save_job(
    job_dir: Path,
    record: Mapping[str, Any],
    generations: Sequence[Mapping[str, Any]],
    artifacts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
) -> None:
    """Write ``results.json``, ``generations.jsonl`` and each artifact (``{file name: rows}``, written as
    JSON lines) to ``job_dir``; the artifacts first, so a record never lists a file that is missing."""
    job_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (artifacts or {}).items():
        write_jsonl(job_dir / name, rows)
    (job_dir / RESULTS_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    write_jsonl(job_dir / GENERATIONS_FILE, generations)


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """One JSON object per line."""
    with open(path, "w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_job(job_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The record and generations `save_job` wrote."""
    record = json.loads((job_dir / RESULTS_FILE).read_text(encoding="utf-8"))
    generations_file = job_dir / GENERATIONS_FILE
    generations = []
    if generations_file.is_file():
        with open(generations_file, encoding="utf-8") as file:
            generations = [json.loads(line) for line in file if line.strip()]
    return record, generations


def job_dirs(directory: Path) -> list[Path]:
    """Every folder under ``directory`` (itself included) holding a ``results.json``, in job order."""

    def job_order(path: Path) -> tuple[int, str]:
        return (int(path.name), "") if path.name.isdigit() else (1 << 30, str(path))

    return sorted((path.parent for path in directory.rglob(RESULTS_FILE)), key=job_order)


# --- sweep folders ------------------------------------------------------------------------------------


def read_sweep_info(sweep_dir: Path) -> dict[str, Any] | None:
    """The sweep's ``sweep.json`` (written before its jobs start), if any."""
    path = sweep_dir / SWEEP_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def write_sweep_info(sweep_dir: Path, info: Mapping[str, Any]) -> None:
    """Write the sweep's ``sweep.json``."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def finished_job_on_disk(sweep_dir: Path, config_hash: str) -> dict[str, Any] | None:
    """The earlier FINISHED run of a job with this config hash, as the resumed sweep's ``sweep.json``
    lists them (``{"run_id", "run_name", "metrics"}``); None when the sweep resumes nothing."""
    return ((read_sweep_info(sweep_dir) or {}).get("finished_jobs") or {}).get(config_hash)


def sweep_failed(sweep_dir: Path) -> bool:
    """Whether some job of the sweep failed: a FAILED record, or a job folder Hydra made without one."""
    launched = [path.parent for path in sweep_dir.glob("*/.hydra")]
    for job_dir in launched:
        if not (job_dir / RESULTS_FILE).is_file():
            return True
        if json.loads((job_dir / RESULTS_FILE).read_text(encoding="utf-8")).get("status") != "COMPLETED":
            return True
    return False
