"""Several searches sharing one study (the same ``storage`` and ``study_name``, e.g. on PostgreSQL): who
runs which trial, when a RUNNING trial is really interrupted, and how the searches together stop at
exactly ``n_trials``.

Every trial a search asks carries its worker (host, pid and a token of that search). A RUNNING trial
counts as interrupted only when its worker is gone: on this host, its pid no longer exists (or it is this
process, and the search that asked it has ended); a trial without a worker (a search from
before this rule, or killed between ask and tagging) when it started more than ``UNTAGGED_GRACE`` ago.
A trial of a worker on another host is never taken over (its liveness cannot be seen from here).
"""

from __future__ import annotations

import datetime
import os
import socket
import uuid
from collections.abc import Sequence

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

INTERRUPTED_ATTR = "interrupted"
SURPLUS_ATTR = "surplus"
WORKER_ATTR = "worker"
UNTAGGED_GRACE = datetime.timedelta(seconds=60)


def new_worker() -> dict[str, object]:
    """The identity of one search, stored on each trial it asks."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "search": uuid.uuid4().hex[:12]}


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(trial: FrozenTrial, me: dict[str, object], now: datetime.datetime | None = None) -> bool:
    """Whether the search running ``trial`` is gone, so the trial was interrupted (``me``: the search
    asking)."""
    worker = trial.user_attrs.get(WORKER_ATTR)
    if not isinstance(worker, dict):
        now = now or datetime.datetime.now()
        return trial.datetime_start is None or now - trial.datetime_start > UNTAGGED_GRACE
    if worker.get("host") != me["host"]:
        return False
    if worker.get("pid") == me["pid"]:
        return worker.get("search") != me["search"]
    return not pid_alive(int(worker["pid"]))


def excluded(trial: FrozenTrial) -> bool:
    """A trial that takes no slot of ``n_trials``: interrupted (re-asked) or asked beyond the target."""
    return bool(trial.user_attrs.get(INTERRUPTED_ATTR) or trial.user_attrs.get(SURPLUS_ATTR))


def taking_slots(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that take a slot of ``n_trials``: finished ones and RUNNING ones, neither excluded
    (WAITING ones, enqueued but not yet asked, take none)."""
    return [t for t in trials if t.state != TrialState.WAITING and not excluded(t)]


def running_elsewhere(study: optuna.Study, me: dict[str, object]) -> list[FrozenTrial]:
    """RUNNING trials of other searches still alive (this search waits for them before its outcome)."""
    return [
        trial
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if trial.user_attrs.get(WORKER_ATTR) != me and not owner_gone(trial, me)
    ]


def claim(study: optuna.Study, trials: Sequence[Trial], n_trials: int, me: dict[str, object]) -> list[Trial]:
    """Tag freshly asked ``trials`` with search ``me`` and keep those within the first ``n_trials`` slots
    (by trial number: numbers are assigned under a lock of the study row, so every search sees the same
    order); one beyond them, asked by two searches racing for the last slot, is closed FAIL with the
    ``surplus`` attr and not run."""
    for trial in trials:
        trial.set_user_attr(WORKER_ATTR, me)
    numbers = sorted(t.number for t in taking_slots(study.get_trials(deepcopy=False)))
    allowed = set(numbers[:n_trials])
    kept = []
    for trial in trials:
        if trial.number in allowed:
            kept.append(trial)
        else:
            trial.set_user_attr(SURPLUS_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
    return kept
