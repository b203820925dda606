"""A search's plots: each objective against the trial number (best-so-far line, pruned trials hollow at
their last running value), and for two objectives the trials with the Pareto front."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtdlm_experiments.search.objectives import Objective


def draw(
    rows: Sequence[dict[str, Any]], objectives: Sequence[Objective], chosen: Sequence[int], out_dir: Path
) -> dict[str, Path]:
    """Write ``objective_vs_trial.png`` (and ``front.png`` for two objectives); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {"objective_plot": out_dir / "objective_vs_trial.png"}
    fig, axes = plt.subplots(len(objectives), 1, figsize=(7, 3.2 * len(objectives)), squeeze=False)
    for axis, objective in zip(axes[:, 0], objectives, strict=True):
        _objective_panel(axis, rows, objective)
    axes[-1, 0].set_xlabel("trial")
    fig.tight_layout()
    fig.savefig(files["objective_plot"], dpi=110)
    plt.close(fig)
    if len(objectives) == 2:
        files["front_plot"] = out_dir / "front.png"
        _front(rows, objectives, chosen, files["front_plot"])
    return files


def _objective_panel(axis: Any, rows: Sequence[dict[str, Any]], objective: Objective) -> None:
    metric = objective.metric
    shown = [r for r in rows if r.get(metric) is not None]
    complete = [r for r in shown if r["state"] == "COMPLETE" and r["feasible"]]
    groups = (
        ("complete", complete, {"color": "C0"}),
        ("pruned", [r for r in shown if r["state"] == "PRUNED"], {"facecolors": "none", "edgecolors": "C3"}),
        ("infeasible", [r for r in shown if r["state"] == "COMPLETE" and not r["feasible"]],
         {"marker": "x", "color": "grey"}),
    )  # fmt: skip
    for label, points, style in groups:
        if points:
            axis.scatter([r["trial"] for r in points], [r[metric] for r in points], label=label, **style)
    for row in complete:
        low, high = row.get(metric + "_ci_low"), row.get(metric + "_ci_high")
        if low is not None and high is not None:
            axis.plot([row["trial"]] * 2, [low, high], color="C0", alpha=0.3)
    best, xs, ys = None, [], []
    for row in sorted(complete, key=lambda r: r["trial"]):
        value = objective.sign * row[metric]
        best = value if best is None else max(best, value)
        xs.append(row["trial"])
        ys.append(objective.sign * best)
    if xs:
        axis.step(xs, ys, where="post", color="k", linewidth=1, label="best feasible so far")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel(f"{metric} ({'max' if objective.sign > 0 else 'min'})")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)


def _front(
    rows: Sequence[dict[str, Any]], objectives: Sequence[Objective], chosen: Sequence[int], path: Path
) -> None:
    import matplotlib.pyplot as plt

    x_metric, y_metric = (objective.metric for objective in objectives)
    fig, axis = plt.subplots(figsize=(6, 4.5))
    done = [r for r in rows if r["state"] == "COMPLETE" and r.get(x_metric) is not None]
    feasible = [r for r in done if r["feasible"]]
    infeasible = [r for r in done if not r["feasible"]]
    axis.scatter([r[x_metric] for r in feasible], [r[y_metric] for r in feasible], color="C0", label="trials")
    if infeasible:
        axis.scatter(
            [r[x_metric] for r in infeasible], [r[y_metric] for r in infeasible], marker="x", color="grey",
            label="infeasible",
        )  # fmt: skip
    front = sorted((r for r in done if r["trial"] in chosen), key=lambda r: r[x_metric])
    axis.plot(
        [r[x_metric] for r in front], [r[y_metric] for r in front], "o-", color="C3", label="Pareto front"
    )
    for row in front:
        axis.annotate(str(row["trial"]), (row[x_metric], row[y_metric]), fontsize=8)
    axis.set_xlabel(x_metric)
    axis.set_ylabel(y_metric)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
