"""Side-by-side tables and plots of tracked runs.

    python -m rtdlm_experiments.analysis.report                      # every job of the default experiment
    python -m rtdlm_experiments.analysis.report --sweep <parent run id>
    python -m rtdlm_experiments.analysis.report --experiment my-exp --sort-by distinct_2

Writes ``report.csv``, ``report.md`` and ``report.png`` and prints the Markdown table. The same table and
plot are written for every sweep (`summarize_sweep`) and attached to its parent run.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rtdlm_experiments import tracking
from rtdlm_experiments.analysis import compare
from rtdlm_experiments.analysis.markdown import markdown_table
from rtdlm_experiments.analysis.task_summary import task_verdicts, verdicts_markdown
from rtdlm_experiments.config.paths import output_root
from rtdlm_experiments.results.metric_names import resolve_metric, value_range
from rtdlm_experiments.results.record import (
    KEY_METRICS,
    SUMMARY_STEM,
    flatten_config,
    job_dirs,
    load_job,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG_COLUMNS = {
    "model": "params.model.name",
    "preset": "params.sampling.preset",
    "decoder": "params.decoder.name",
    "task": "params.prompts.name",
}
"""Report column → run column describing the job."""


def records_frame(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """Saved job records (``results.json``) in the layout of `rtdlm_experiments.tracking.runs_frame`, so a
    sweep's summary can be built from disk, with or without a tracking server."""
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


def summary_table(runs: pd.DataFrame, sort_by: str | None = None) -> pd.DataFrame:
    """One row per run: name, status, model, preset, decoder and the key metrics (with their
    ``_ci_low``/``_ci_high`` bounds when runs have them), sorted by ``sort_by`` (a metric, plain or
    namespaced, descending) or by the configuration columns and name."""
    if runs.empty:
        return pd.DataFrame(columns=["run", "status", *CONFIG_COLUMNS])
    table = pd.DataFrame({"run": runs.get("tags.mlflow.runName", runs["run_id"]), "status": runs["status"]})
    for column, source in CONFIG_COLUMNS.items():
        table[column] = runs.get(source)
    for metric in KEY_METRICS:
        for column in (metric, f"{metric}_ci_low", f"{metric}_ci_high"):
            if f"metrics.{column}" in runs:
                table[column] = runs[f"metrics.{column}"]
    if sort_by:
        column = resolve_metric(sort_by, table.columns)
        if column is None:
            raise ValueError(f"cannot sort by {sort_by!r}: not among the columns {list(table.columns)}")
        return table.sort_values(column, ascending=column not in KEY_METRICS, ignore_index=True)
    return table.sort_values([*CONFIG_COLUMNS, "run"], ignore_index=True, na_position="last")


def to_markdown(table: pd.DataFrame, float_digits: int = 3) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional ``tabulate``)."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:.{float_digits}f}"
        return "" if value is None else str(value)

    rows = [[cell(value) for value in row] for row in table.itertuples(index=False)]
    return markdown_table([str(column) for column in table.columns], rows) + "\n"


def plot_summary(table: pd.DataFrame, path: Path) -> Path:
    """Render `summary_figure` to ``path`` (PNG); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    summary_figure(table).savefig(path, dpi=100)
    return path


def summary_figure(table: pd.DataFrame) -> Figure:
    """Diversity vs repetition (distinct-2 against seq-rep-4), quality vs diversity when the runs have a
    quality metric (`quality_metric`), and speedup bars when some run has a speedup. Every run has a
    number and a colour: the points and bars carry the numbers (nearby points share one label), the key
    below the plots maps each number to the full run name. Axes cover each metric's possible range
    (`axis_limits`); ``<m>_ci_low``/``<m>_ci_high`` columns become error bars."""
    from matplotlib.figure import Figure  # the object API renders with Agg, no display or pyplot state
    from matplotlib.lines import Line2D

    table = table.reset_index(drop=True)
    runs = _run_styles(table)
    quality = quality_metric(table)
    has_speedup = "speedup" in table and table["speedup"].notna().any()
    panels = 1 + (quality is not None) + has_speedup
    key_height = 0.4 + 0.2 * len(table)
    figure = Figure(figsize=(1 + 5.5 * panels, 4.5 + key_height), layout="constrained")
    grid = figure.add_gridspec(2, panels, height_ratios=[4.5, key_height])
    _plot_scatter(figure.add_subplot(grid[0, 0]), table, runs, _FRONTIER, "Diversity vs repetition")
    if quality is not None:
        _plot_scatter(
            figure.add_subplot(grid[0, 1]), table, runs, ("distinct_2", quality), "Quality vs diversity"
        )
    if has_speedup:
        _plot_speedup(figure.add_subplot(grid[0, panels - 1]), table, runs)
    key = figure.add_subplot(grid[1, :])
    key.axis("off")
    handles = [Line2D([], [], color=style["color"], marker=style["marker"], linestyle="") for style in runs]
    labels = [f"{style['number']}  {name}" for style, name in zip(runs, table["run"], strict=True)]
    key.legend(handles, labels, loc="upper left", fontsize=8, frameon=False, title="runs", alignment="left")
    return figure


QUALITY_METRICS = ("pass_at_1", "accuracy", "contains_answer", "exact_match", "judge_perplexity")
"""Quality metrics in order of preference for the summary plot."""


def quality_metric(table: pd.DataFrame) -> str | None:
    """The first of `QUALITY_METRICS` that some run has, or None.

    >>> quality_metric(pd.DataFrame({"distinct_2": [0.5], "contains_answer": [0.25]}))
    'contains_answer'
    """
    return next((m for m in QUALITY_METRICS if m in table and table[m].notna().any()), None)


_AXIS_LABELS = {
    "distinct_2": "distinct-2 (higher = more diverse)",
    "seq_rep_4": "seq-rep-4 (lower = less repetition)",
    "judge_perplexity": "judge perplexity (lower = better)",
    "pass_at_1": "pass@1 (higher = better)",
    "accuracy": "accuracy (higher = better)",
    "contains_answer": "contains the answer (higher = better)",
    "exact_match": "exact match (higher = better)",
}


_MARKERS = "osD^vP*Xh<>"
_FRONTIER = ("distinct_2", "seq_rep_4")
_LABEL_MERGE_FRACTION = 0.03
"""Points closer than this fraction of both axis spans share one label (numbers would overprint)."""


def _run_styles(table: pd.DataFrame) -> list[dict[str, str]]:
    """Each run's number, colour (one per run) and marker (one per preset)."""
    presets = table["preset"].fillna("?") if "preset" in table else pd.Series("?", index=table.index)
    markers = {preset: _MARKERS[index % len(_MARKERS)] for index, preset in enumerate(sorted(set(presets)))}
    return [
        {"number": str(index + 1), "color": f"C{index % 10}", "marker": markers[presets[index]]}
        for index in range(len(table))
    ]


def _error(table: pd.DataFrame, metric: str) -> list[list[float]] | None:
    """Asymmetric error bars (below, above) from the metric's CI columns, or None when it has none."""
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    if low not in table or high not in table or table[[low, high]].isna().all().all():
        return None
    below = (table[metric] - table[low]).clip(lower=0).fillna(0)
    above = (table[high] - table[metric]).clip(lower=0).fillna(0)
    return [below.tolist(), above.tolist()]


def axis_limits(metric: str, values: Sequence[float]) -> tuple[float | None, float]:
    """Axis limits covering the data and the metric's bounds: a non-negative metric starts at 0, a
    fraction's axis reaches 1; 5 % margins. (None: let matplotlib choose.)

    >>> axis_limits("distinct_2", [0.4, 0.6]), axis_limits("speedup", [0.5, 2.0])
    ((-0.05, 1.05), (-0.1, 2.1))
    """
    low, high = value_range(metric)
    finite = [float(value) for value in values if math.isfinite(value)]
    bottom = low if low is not None else min(finite, default=0.0)
    top = max([*finite, bottom] + ([high] if high is not None else []))
    margin = 0.05 * ((top - bottom) or 1.0)
    return (bottom - margin if low is not None else None), top + margin


def _plot_scatter(
    axis: Any, table: pd.DataFrame, runs: list[dict[str, str]], metrics: tuple[str, str], title: str
) -> None:
    x_metric, y_metric = metrics
    axis.set(xlabel=_AXIS_LABELS.get(x_metric, x_metric), ylabel=_AXIS_LABELS.get(y_metric, y_metric))
    if not set(metrics) <= set(table.columns):
        axis.set_title(f"no {' / '.join(m for m in metrics if m not in table.columns)}")
        return
    axis.set_title(title)
    x_error, y_error = _error(table, x_metric), _error(table, y_metric)
    plotted = table.dropna(subset=list(metrics))
    for index in plotted.index:
        axis.errorbar(
            table.at[index, x_metric],
            table.at[index, y_metric],
            xerr=_one(x_error, index),
            yerr=_one(y_error, index),
            fmt=runs[index]["marker"],
            color=runs[index]["color"],
            markersize=7,
            capsize=3,
        )
    x_limits = axis_limits(x_metric, _with_bounds(table, x_metric))
    y_limits = axis_limits(y_metric, _with_bounds(table, y_metric))
    for members in _nearby_groups(plotted, metrics, x_limits, y_limits):
        label = ",".join(runs[index]["number"] for index in members)
        point = (plotted.at[members[0], x_metric], plotted.at[members[0], y_metric])
        axis.annotate(label, point, fontsize=8, xytext=(6, 4), textcoords="offset points")
    axis.set_xlim(*x_limits)
    axis.set_ylim(*y_limits)
    axis.grid(alpha=0.3)


def _with_bounds(table: pd.DataFrame, metric: str) -> list[float]:
    """The metric's values and its CI bounds (what the axis must show)."""
    columns = [column for column in (metric, f"{metric}_ci_low", f"{metric}_ci_high") if column in table]
    return [float(value) for column in columns for value in table[column].dropna()]


def _nearby_groups(
    rows: pd.DataFrame,
    metrics: tuple[str, str],
    x_limits: tuple[float | None, float],
    y_limits: tuple[float | None, float],
) -> list[list[int]]:
    """Row indices grouped so that points within `_LABEL_MERGE_FRACTION` of the axis spans share a label."""
    x_span = x_limits[1] - (x_limits[0] or 0.0) or 1.0
    y_span = y_limits[1] - (y_limits[0] or 0.0) or 1.0
    groups: list[list[int]] = []
    for index in rows.index:
        x, y = rows.at[index, metrics[0]], rows.at[index, metrics[1]]
        for group in groups:
            gx, gy = rows.at[group[0], metrics[0]], rows.at[group[0], metrics[1]]
            if (
                abs(x - gx) <= _LABEL_MERGE_FRACTION * x_span
                and abs(y - gy) <= _LABEL_MERGE_FRACTION * y_span
            ):
                group.append(index)
                break
        else:
            groups.append([index])
    return groups


def _one(error: list[list[float]] | None, index: int) -> list[list[float]] | None:
    return None if error is None else [[error[0][index]], [error[1][index]]]


def _plot_speedup(axis: Any, table: pd.DataFrame, runs: list[dict[str, str]]) -> None:
    rows = table.dropna(subset=["speedup"])
    axis.barh(
        range(len(rows)),
        rows["speedup"],
        xerr=_error(rows, "speedup"),
        capsize=3,
        color=[runs[index]["color"] for index in rows.index],
    )
    axis.set_yticks(range(len(rows)), [runs[index]["number"] for index in rows.index])
    axis.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.set(
        title="Speedup over autoregressive decoding", xlabel="× (wall time of AR / decoder)", ylabel="run"
    )
    axis.set_xlim(*axis_limits("speedup", _with_bounds(rows, "speedup")))
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
    to the sweep folder, and, when a task has several jobs, per task its best job against the runner-up
    (`rtdlm_experiments.analysis.task_summary`); returns their paths (empty when no job saved a record)."""
    records = [load_job(job_dir)[0] for job_dir in job_dirs(sweep_dir)]
    if not records:
        return {}
    paths = write_report(summary_table(records_frame(records)), sweep_dir, stem=SUMMARY_STEM)
    verdicts = task_verdicts(job_dirs(sweep_dir))
    if any(verdict.runner_up is not None for verdict in verdicts):
        paths["tasks_md"] = sweep_dir / f"{SUMMARY_STEM}_tasks.md"
        paths["tasks_md"].write_text(verdicts_markdown(verdicts) + "\n", encoding="utf-8")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--compare"]:
        return compare.main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.analysis.report",
        description=__doc__.split("\n")[0],
        epilog="Paired comparison of two jobs: --compare RUN_A RUN_B (run ids or job folders; "
        "see python -m rtdlm_experiments.analysis.compare --help).",
    )
    parser.add_argument("--experiment", default="rtdlm-experiments", help="MLflow experiment name")
    parser.add_argument("--sweep", metavar="RUN_ID", help="only the children of this sweep's parent run")
    parser.add_argument("--uri", help="tracking URI (default: $MLFLOW_TRACKING_URI, else the embedded store)")
    parser.add_argument(
        "--sort-by", help="a column to sort by; a metric by plain or namespaced name (sorts descending)"
    )
    parser.add_argument("--out", type=Path, help="output folder (default: <output root>/reports/<name>)")
    args = parser.parse_args(argv)

    client = tracking.mlflow_client(tracking.resolve_tracking_uri(args.uri))
    experiment_id = tracking.experiment_id(client, args.experiment)
    if experiment_id is None:
        parser.exit(1, f"error: no MLflow experiment named {args.experiment!r} at {client.tracking_uri}\n")
    try:
        table = summary_table(tracking.search_job_runs(client, experiment_id, args.sweep), args.sort_by)
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
