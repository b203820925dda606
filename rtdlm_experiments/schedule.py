"""``python -m rtdlm_experiments.schedule SWEEP [--key KEY] [options] [overrides...]``: run a sweep preset
from ``conf/sweep/`` unattended, from cron or a systemd timer (examples in ``deploy/``).

    python -m rtdlm_experiments.schedule nightly
    python -m rtdlm_experiments.schedule nightly --fail-on-drift --tolerance distinct_2=0.01
    python -m rtdlm_experiments.schedule presets model=tiny-random --key smoke

- One at a time: an exclusive lock on ``<output root>/schedule.lock``; a second scheduled sweep exits at
  once (code 75) instead of competing for the machine.
- Idempotent: the sweep's MLflow parent run is tagged with a key (default ``<sweep>-<today>``). A key
  whose parent FINISHED is not run again; ``--force`` runs it again into a new parent run.
- Resumable: rerunning a key whose parent FAILED or was killed continues that parent; the jobs whose
  child runs FINISHED (same config hash) are not rerun.
- Drift check: each job's key metrics are compared with the same config's in the latest earlier
  scheduled run of the sweep; the comparison is attached to the parent run (``drift/drift.md``,
  ``drift/drift.csv``, tags ``rtdlm.drift*``), and ``--fail-on-drift`` turns drift into exit code 3.

The sweep itself is ``python -m rtdlm_experiments sweep=SWEEP ...`` in a child process, run by whatever
Hydra launcher the overrides pick (basic, joblib, submitit), with the lock held until it ends.

Exit codes: 0 done (or already done), 1 the sweep failed or could not start, 2 bad arguments,
3 drift (with ``--fail-on-drift``), 75 another scheduled sweep holds the lock (or the key is RUNNING on
another host).
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from rtdlm_experiments import tracking
from rtdlm_experiments.analysis import drift
from rtdlm_experiments.config.paths import config_dir, output_root
from rtdlm_experiments.tracking import scheduled

if TYPE_CHECKING:
    from rtdlm_experiments.tracking.runs import MlflowClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DRIFT = 3
EXIT_LOCKED = 75
"""``EX_TEMPFAIL`` of sysexits.h: not an error of this run; a later try may succeed."""

LOCK_FILE = "schedule.lock"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=/-]{0,199}")
"""Keys and sweep names: no quotes or spaces, so they are safe in MLflow search filters and file names."""


def _say(message: str) -> None:
    print(f"schedule: {message}", flush=True)


# --- lock ---------------------------------------------------------------------------------------------


class LockBusy(RuntimeError):
    """Another process holds the schedule lock; ``holder`` is what it wrote into the lock file."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


@contextmanager
def exclusive_lock(path: Path, holder: str) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` for the block, or raise `LockBusy` at once.

    Yields the file descriptor: a child process given it (``pass_fds``) shares the lock, which lasts
    until every holder has closed it, so a sweep whose scheduler was killed still keeps others out.
    ``holder`` is written into the file for the message of whoever finds the lock busy.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LockBusy(os.pread(fd, 1024, 0).decode(errors="replace").strip()) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode() + b"\n", 0)
        yield fd
    finally:
        os.close(fd)


# --- the sweep ----------------------------------------------------------------------------------------


def default_key(sweep: str, today: datetime.date | None = None) -> str:
    """``<sweep>-<YYYY-MM-DD>``: one run per sweep per day, whenever the timer fires that day."""
    return f"{sweep}-{(today or datetime.date.today()).isoformat()}"


def compose_sweep(sweep: str, overrides: Sequence[str]) -> DictConfig:
    """The config (with its ``hydra`` node) of ``sweep=<sweep> *overrides`` with the swept overrides left
    out: what the scheduler reads before launching (the tracking store, the experiment, the mode).
    Raises Hydra's compose errors, so bad arguments fail here, before a parent run exists."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from hydra_plugins.rtdlm_search import register_plugins
    from rtdlm_experiments.config.schema import register_configs

    register_configs()  # the typed schemas the config's defaults name (``decoder/autoregressive_schema``...)
    register_plugins()  # ``sweep=search_*`` names hydra/sweeper=optuna
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    fixed = [override.input_line for override in parsed if not override.is_sweep_override()]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3", job_name="schedule"):
        return compose("config", overrides=[f"sweep={sweep}", *fixed], return_hydra_config=True)


def sweep_command(sweep: str, overrides: Sequence[str], parent_run_id: str) -> list[str]:
    """The app's command line for this sweep, logging under (and resuming) ``parent_run_id``."""
    return [
        sys.executable, "-m", "rtdlm_experiments", f"sweep={sweep}", *overrides,
        f"tracking.parent_run_id={parent_run_id}",
    ]  # fmt: skip


def run_sweep(command: Sequence[str], lock_fd: int) -> int:
    """Run ``command`` to its end, sharing the lock with it; returns its exit code.

    The child gets a session of its own so a terminal's Ctrl-C reaches it once, forwarded from here like
    SIGTERM (systemd stopping the unit) and SIGHUP, so the sweep always hears about it.
    """
    process = subprocess.Popen(command, pass_fds=(lock_fd,), start_new_session=True)

    def forward(signum: int, _frame: Any) -> None:
        process.send_signal(signum)

    handlers = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        return process.wait()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# --- drift --------------------------------------------------------------------------------------------


def check_drift(
    client: MlflowClient, parent_run_id: str, sweep: str, tolerances: Mapping[str, drift.Tolerance]
) -> bool:
    """Compare the sweep's finished jobs with the baseline's, attach the comparison to the parent run
    and print the drifted metrics; returns whether something drifted."""
    parent, current = scheduled.scheduled_jobs(client, parent_run_id)
    baseline = scheduled.find_baseline(client, parent_run_id, sweep, set(current)) if current else None
    if baseline is None:
        scheduled.attach_drift(client, parent_run_id, "no_baseline")
        _say(
            f"drift: no earlier scheduled run of sweep={sweep} finished one of these configs: "
            "nothing to compare"
        )
        return False
    base_run, base_jobs = baseline
    report = drift.compare(base_jobs, current, tolerances)
    out_dir = Path(parent.sweep_dir or output_root() / "schedule" / parent.run_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "drift.csv", out_dir / "drift.md"]
    report.table.to_csv(files[0], index=False)
    files[1].write_text(
        drift.to_text(report, f"{base_run.run_name} (run {base_run.run_id})"), encoding="utf-8"
    )
    drifted = [
        f"{row.run}: {row.metric} {row.previous:.4g} -> {row.current:.4g} (tolerance {row.tolerance})"
        for row in report.drifted.itertuples()
    ]
    verdict = "drift" if report.has_drift else "ok"
    scheduled.attach_drift(client, parent_run_id, verdict, files, base_run.run_id, drifted)
    compared = f"{report.matched_jobs} jobs compared with {base_run.run_name} (run {base_run.run_id})"
    if report.has_drift:
        _say(f"drift: DRIFT in {len(report.drifted)} metrics, {compared}:")
        print("\n".join(f"  {line}" for line in drifted), flush=True)
    else:
        _say(f"drift: none, {compared} on {', '.join(sorted(set(report.table['metric'])))}")
    _say(f"drift report: {files[1]}")
    return report.has_drift


# --- main ---------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Ends `schedule` early with an exit code (its message, if any, already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def _fail(code: int, message: str) -> _Stop:
    print(f"error: {message}", file=sys.stderr)
    return _Stop(code)


def schedule(
    sweep: str,
    key: str,
    overrides: Sequence[str],
    lock_fd: int,
    tolerances: Mapping[str, drift.Tolerance],
    force: bool = False,
    fail_on_drift: bool = False,
) -> int:
    """Run (or resume, or skip) the sweep of ``key`` and check it for drift; returns the exit code.

    Must be called holding the schedule lock (``lock_fd``): the check for an existing key and the run
    that follows are then atomic with respect to other scheduled sweeps.
    """
    try:
        cfg = compose_scheduled_sweep(sweep, overrides)
        uri = tracking.resolve_tracking_uri(cfg.tracking.uri)
        client, experiment_id = _open_store(uri, cfg.experiment_name, f"sweep={sweep} key={key} not started")
        parent_run_id = parent_run_for_key(client, experiment_id, sweep, key, overrides, uri, force)
    except _Stop as stop:
        return stop.code
    if parent_run_id is None:
        return EXIT_OK

    code = run_sweep(sweep_command(sweep, overrides, parent_run_id), lock_fd)
    if tracking.end_if_running(client, parent_run_id):
        _say(f"the sweep stopped before ending run {parent_run_id}: marked FAILED")
    status = scheduled.run_status(client, parent_run_id)
    if code != 0:
        _say(f"sweep={sweep} key={key} failed (exit code {code}, run {status}); the same command resumes it")
    drifted = check_drift(client, parent_run_id, sweep, tolerances)
    if code != 0:
        return EXIT_FAILED
    _say(f"sweep={sweep} key={key} done: run {parent_run_id} {status}")
    return EXIT_DRIFT if drifted and fail_on_drift else EXIT_OK


def compose_scheduled_sweep(sweep: str, overrides: Sequence[str]) -> DictConfig:
    """`compose_sweep`, checked to be a tracked multirun; raises `_Stop` with a usage error otherwise."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = compose_sweep(sweep, overrides)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise _fail(EXIT_USAGE, f"sweep={sweep} {' '.join(overrides)}: {err}") from None
    if cfg.hydra.mode is None or cfg.hydra.mode.name != "MULTIRUN":
        raise _fail(EXIT_USAGE, f"sweep={sweep} is not a sweep preset (it sets no hydra.mode: MULTIRUN)")
    if cfg.tracking.backend != "mlflow":
        raise _fail(
            EXIT_USAGE, "scheduling needs tracking=mlflow (keys, resume state and baselines live there)"
        )
    return cfg


def _open_store(uri: str, experiment_name: str, consequence: str) -> tuple[MlflowClient, str]:
    try:
        client = tracking.mlflow_client(uri)
        return client, tracking.ensure_experiment(client, experiment_name)
    except tracking.TrackingUnavailable as err:
        raise _fail(EXIT_FAILED, f"{err}; {consequence}") from None


def parent_run_for_key(
    client: MlflowClient,
    experiment_id: str,
    sweep: str,
    key: str,
    overrides: Sequence[str],
    uri: str,
    force: bool,
) -> str | None:
    """The parent run this attempt logs under: the key's earlier one when it did not finish (resumed),
    else a new one; None when the key already FINISHED. Raises `_Stop` when the key runs elsewhere."""
    host = socket.gethostname()
    parent = None if force else scheduled.find_key_run(client, experiment_id, key)
    if parent is None:
        parent_run_id = scheduled.start_scheduled_sweep(client, experiment_id, key, sweep, host, overrides)
        _say(f"key {key}: running sweep={sweep} as run {parent_run_id} at {uri}")
        return parent_run_id
    if parent.status == "FINISHED":
        _say(
            f"key {key} already FINISHED as run {parent.run_id} at {uri}: nothing to do "
            "(--force reruns it)"
        )
        return None
    if parent.status == "RUNNING" and parent.host != host:
        raise _fail(
            EXIT_LOCKED,
            f"key {key} is RUNNING as run {parent.run_id} on {parent.host}; "
            "not starting it here too (--force starts a new run)",
        )
    # FAILED, KILLED, or RUNNING on this host although we hold the lock: its scheduler died.
    scheduled.claim_scheduled_run(client, parent.run_id, host)
    _say(f"key {key}: resuming run {parent.run_id} ({parent.status}); its FINISHED jobs are not rerun")
    return parent.run_id


def _parser() -> argparse.ArgumentParser:
    defaults = ", ".join(f"{metric}={tolerance}" for metric, tolerance in drift.DEFAULT_TOLERANCES.items())
    parser = argparse.ArgumentParser(
        prog="python -m rtdlm_experiments.schedule",
        description="Run a sweep preset from conf/sweep/ unattended: locked, idempotent, resumable, "
        "checked for drift against the previous scheduled run.",
        epilog="Exit codes: 0 done or already done, 1 sweep failed, 2 bad arguments, 3 drift "
        "(--fail-on-drift), 75 another scheduled sweep is running.",
    )
    parser.add_argument("sweep", help="a sweep preset: the name of a conf/sweep/*.yaml (e.g. nightly)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job (e.g. model=...)")
    parser.add_argument("--key", help="idempotency key of this run (default: <sweep>-<today>)")
    parser.add_argument("--force", action="store_true", help="run even if the key already FINISHED")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit with code 3 when a metric drifted")
    parser.add_argument(
        "--tolerance",
        action="append",
        default=[],
        metavar="METRIC=TOL",
        help="drift tolerance of a metric: ABS, REL%%, ABS+REL%% or off (e.g. distinct_2=0.02, "
        "tokens_per_second=25%%); repeatable; overrides --tolerances and the defaults: "
        + defaults.replace("%", "%%"),  # argparse %-formats help texts
    )
    parser.add_argument("--tolerances", type=Path, metavar="FILE", help="YAML file of METRIC: TOL")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    key = args.key or default_key(args.sweep)
    for what, name in (("sweep", args.sweep), ("--key", key)):
        if not _NAME.fullmatch(name):
            parser.error(f"{what} {name!r}: use letters, digits and ._:@+=/- only")
    if any(override.lstrip("+~").startswith("tracking.parent_run_id") for override in args.overrides):
        parser.error("tracking.parent_run_id is set by the scheduler")
    try:
        flags = dict(item.split("=", 1) for item in args.tolerance if "=" in item)
        if len(flags) != len(args.tolerance):
            raise ValueError(f"--tolerance takes METRIC=TOL, got {args.tolerance}")
        from_file = drift.load_tolerances(args.tolerances) if args.tolerances else {}
        tolerances = drift.resolve_tolerances(from_file, drift.parse_tolerances(flags))
    except (OSError, ValueError) as err:
        parser.error(str(err))

    lock_path = output_root() / LOCK_FILE
    started = datetime.datetime.now().isoformat(timespec="seconds")
    holder = f"pid {os.getpid()} on {socket.gethostname()}: sweep={args.sweep} key={key} since {started}"
    try:
        with exclusive_lock(lock_path, holder) as lock_fd:
            return schedule(
                args.sweep, key, args.overrides, lock_fd, tolerances, args.force, args.fail_on_drift
            )
    except LockBusy as busy:
        print(
            f"schedule: another scheduled sweep is running ({busy.holder or 'holder unknown'}; lock "
            f"{lock_path}); not starting sweep={args.sweep} key={key}",
            file=sys.stderr,
        )
        return EXIT_LOCKED


if __name__ == "__main__":
    raise SystemExit(main())
