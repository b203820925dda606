"""Side-by-side tables and plots of tracked runs.

    python -m rtdlm_experiments.report                      # every job of the default experiment
    python -m rtdlm_experiments.report --sweep <parent run id>
    python -m rtdlm_experiments.report --experiment my-exp --sort-by distinct_2

Writes ``report.csv``, ``report.md`` and ``report.png`` and prints the Markdown table. The same table and
plot are written for every sweep (`summarize_sweep`) and attached to its parent run.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rtdlm_experiments import tracking
from rtdlm_experiments.results import (
    JOB_TAG,
    KEY_METRICS,
    SUMMARY_STEM,
    flatten_config,
    job_dirs,
    load_job,
)
from rtdlm_experiments.schema import output_root

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

CONFIG_COLUMNS = {
    "model": "params.model.name",
    "preset": "params.sampling.preset",
    "decoder": "params.decoder.name",
}
"""Report column → run column describing the job."""


def runs_frame(runs: Iterable[Run]) -> pd.DataFrame:
    """Runs as one row each, with ``metrics.*``, ``params.*`` and ``tags.*`` columns like
    `mlflow.search_runs` (built from a client's runs, so no global tracking URI is involved)."""
    records = []
    for run in runs:
        record: dict[str, Any] = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
        }
        record.update({f"metrics.{key}": value for key, value in run.data.metrics.items()})
        record.update({f"params.{key}": value for key, value in run.data.params.items()})
        record.update({f"tags.{key}": value for key, value in run.data.tags.items()})
        records.append(record)
    return pd.DataFrame.from_records(records)


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Saved job records (``results.json``) in the layout of `runs_frame`, so a sweep's summary can be
    built from disk, with or without a tracking server."""
    rows = []
    for record in records:
        row: dict[str, Any] = {
            "run_id": None,
            "status": "FINISHED" if record.get("status") == "COMPLETED" else "FAILED",
            "tags.mlflow.runName": record["job"]["run_name"],
        }
        row.update({f"metrics.{key}": value for key, value in record.get("metrics", {}).items()})
        row.update({f"params.{key}": str(value) for key, value in flatten_config(record["config"]).items()})
        rows.append(row)
    return pd.DataFrame.from_records(rows)


def search_job_runs(
    client: MlflowClient, experiment_id: str, parent_run_id: str | None = None
) -> pd.DataFrame:
    """Every job run of an experiment, or only the children of one sweep."""
    filters = [f"tags.`{JOB_TAG}` = 'true'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return runs_frame(tracking.search_runs(client, experiment_id, " and ".join(filters)))


def summary_table(runs: pd.DataFrame, sort_by: str | None = None) -> pd.DataFrame:
    """One row per run: name, status, model, preset, decoder and the key metrics, sorted by ``sort_by``
    (a metric, descending) or by the configuration columns and name."""
    if runs.empty:
        return pd.DataFrame(columns=["run", "status", *CONFIG_COLUMNS])
    table = pd.DataFrame({"run": runs.get("tags.mlflow.runName", runs["run_id"]), "status": runs["status"]})
    for column, source in CONFIG_COLUMNS.items():
        table[column] = runs.get(source)
    for metric in KEY_METRICS:
        if f"metrics.{metric}" in runs:
            table[metric] = runs[f"metrics.{metric}"]
    if sort_by:
        if sort_by not in table:
            raise ValueError(f"cannot sort by {sort_by!r}: not among the columns {list(table.columns)}")
        return table.sort_values(sort_by, ascending=sort_by not in KEY_METRICS, ignore_index=True)
    return table.sort_values([*CONFIG_COLUMNS, "run"], ignore_index=True, na_position="last")


def to_markdown(table: pd.DataFrame, float_digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional ``tabulate``)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{float_digits}f}"
        return "" if value is None else str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_summary(table: pd.DataFrame, path: Path) -> Path:
    """Diversity vs repetition (distinct-2 against seq-rep-4, one marker per preset, each point labelled
    with its run), plus speedup bars when some run has a speedup. Returns ``path``."""
    from matplotlib.figure import Figure  # the object API renders with Agg, no display or pyplot state

    has_speedup = "speedup" in table and table["speedup"].notna().any()
    figure = Figure(figsize=(12 if has_speedup else 7, 5), layout="constrained")
    axes = figure.subplots(1, 2 if has_speedup else 1, squeeze=False)[0]
    _plot_frontier(axes[0], table)
    if has_speedup:
        _plot_speedup(axes[1], table.dropna(subset=["speedup"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


_MARKERS = "osD^vP*Xh<>"
_LABEL_CHARS = 32


def _label(run_name: Any) -> str:
    """A run name short enough for a tick label or an annotation."""
    text = str(run_name)
    return text if len(text) <= _LABEL_CHARS else text[: _LABEL_CHARS - 1] + "…"


def _plot_frontier(axis: Any, table: pd.DataFrame) -> None:
    axis.set(xlabel="distinct-2 (higher = more diverse)", ylabel="seq-rep-4 (lower = less repetition)")
    if not {"distinct_2", "seq_rep_4"} <= set(table.columns):
        axis.set_title("no diversity metrics")
        return
    axis.set_title("Diversity vs repetition")
    presets = table["preset"].fillna("?")
    for index, preset in enumerate(sorted(presets.unique())):
        rows = table[presets == preset]
        axis.scatter(
            rows["distinct_2"], rows["seq_rep_4"], marker=_MARKERS[index % len(_MARKERS)], label=preset
        )
        for row in rows.itertuples():
            axis.annotate(
                _label(row.run),
                (row.distinct_2, row.seq_rep_4),
                fontsize=7,
                alpha=0.7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    axis.legend(title="preset", fontsize=8)
    axis.grid(alpha=0.3)


def _plot_speedup(axis: Any, table: pd.DataFrame) -> None:
    axis.barh([_label(name) for name in table["run"]], table["speedup"])
    axis.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set(title="Speedup over autoregressive decoding", xlabel="× (wall time of AR / decoder)")
    axis.invert_yaxis()


def write_report(table: pd.DataFrame, out_dir: Path, stem: str = "report") -> dict[str, Path]:
    """Save ``table`` as CSV and Markdown and its plot as PNG under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / f"{stem}.csv", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    table.to_csv(paths["csv"], index=False)
    paths["md"].write_text(to_markdown(table), encoding="utf-8")
    plot_summary(table, paths["png"])
    return paths


def summarize_sweep(sweep_dir: Path) -> dict[str, Path]:
    """Summary table (CSV, Markdown) and plot of every job of the sweep, from the saved records, written
    to the sweep folder; returns their paths (empty when no job saved a record)."""
    records = [load_job(job_dir)[0] for job_dir in job_dirs(sweep_dir)]
    if not records:
        return {}
    return write_report(summary_table(records_frame(records)), sweep_dir, stem=SUMMARY_STEM)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--experiment", default="rtdlm-experiments", help="MLflow experiment name")
    parser.add_argument("--sweep", metavar="RUN_ID", help="only the children of this sweep's parent run")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    parser.add_argument("--sort-by", help="a column to sort by (metrics sort descending)")
    parser.add_argument("--out", type=Path, help="output folder (default: <output root>/reports/<name>)")
    args = parser.parse_args(argv)

    client = tracking.mlflow_client(tracking.resolve_tracking_uri(args.uri))
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        parser.exit(1, f"error: no MLflow experiment named {args.experiment!r} at {client.tracking_uri}\n")
    try:
        table = summary_table(search_job_runs(client, experiment.experiment_id, args.sweep), args.sort_by)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if table.empty:
        parser.exit(1, f"error: no job runs found in experiment {args.experiment!r}\n")
    out_dir = args.out or output_root() / "reports" / (args.sweep or args.experiment)
    paths = write_report(table, out_dir)
    print(to_markdown(table))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
