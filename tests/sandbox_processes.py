"""Which processes a sandbox test started: those whose environment holds the ``HOME`` of one of the
sandbox directories that test's programs ran in (children inherit it, whichever uid or process group they
end up in). Counting a whole uid pool instead would see other sandbox users on the same machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from rtdlm_experiments.tasks import execution


def record_sandbox_dirs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The sandbox directories of the programs the test runs from now on, in order."""
    made: list[Path] = []
    original = execution._make_workdir

    def recording(uid):
        made.append(original(uid))
        return made[-1]

    monkeypatch.setattr(execution, "_make_workdir", recording)
    return made


def live_processes_started_in(workdirs: list[Path]) -> list[int]:
    """Pids of live (not zombie) processes whose environment holds ``HOME=<one of workdirs>``."""
    homes = {f"HOME={folder}".encode() for folder in workdirs}
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
            status = (entry / "status").read_text().splitlines()
        except OSError:
            continue
        state = next((line for line in status if line.startswith("State:")), "")
        if homes & environ and "zombie" not in state:
            found.append(int(entry.name))
    return found
