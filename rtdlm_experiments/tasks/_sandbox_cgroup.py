"""A memory cgroup per sandboxed program: RLIMIT_AS bounds each process's address space but not memory that
lives outside it (``memfd``, SysV and POSIX shared memory, tmpfs files), nor a program's processes together.
A cgroup's memory limit counts all of it. Version 2 (``memory.max``) where this process's cgroup delegates
the memory controller, else version 1 (``memory.limit_in_bytes``); neither (not root, no hierarchy
mounted) leaves RLIMIT_AS alone, and the isolation tag says so.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

PREFIX = "rtdlm-sandbox-"
REMOVE_PATIENCE_S = 5.0
_serial = itertools.count()


@dataclass(frozen=True)
class Hierarchy:
    version: str
    """``"v1"`` or ``"v2"``."""
    base: Path
    """This process's own cgroup in that hierarchy: the programs' cgroups are made inside it."""


def _mounts() -> list[tuple[str, str, str, str]]:
    """``(fstype, mount point, mount root, super options)`` of every cgroup mount."""
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8") as info:
        for line in info:
            before, after = line.split(" - ", 1)
            fields, tail = before.split(), after.split()
            if tail[0] in ("cgroup", "cgroup2"):
                found.append((tail[0], fields[4], fields[3], tail[2] if len(tail) > 2 else ""))
    return found


def _own_cgroups() -> dict[str, str]:
    """{controllers: path} from ``/proc/self/cgroup`` (``""``: the v2 hierarchy)."""
    with open("/proc/self/cgroup", encoding="utf-8") as table:
        return {parts[1]: parts[2] for line in table if len(parts := line.rstrip("\n").split(":", 2)) == 3}


def _inside(point: str, root: str, path: str) -> Path:
    relative = path[len(root) :] if root != "/" and path.startswith(root) else path
    return Path(point) / relative.lstrip("/")


@cache
def hierarchy() -> Hierarchy | None:
    """Where this process may make memory cgroups, or None."""
    if os.geteuid() != 0:
        return None
    try:
        mounts, own = _mounts(), _own_cgroups()
        for fstype, point, root, _ in mounts:
            if fstype == "cgroup2" and "" in own:
                base = _inside(point, root, own[""])
                if "memory" in (base / "cgroup.subtree_control").read_text().split():
                    return Hierarchy("v2", base)
        for fstype, point, root, options in mounts:
            memory = next((path for names, path in own.items() if "memory" in names.split(",")), None)
            if fstype == "cgroup" and "memory" in options.split(",") and memory is not None:
                return Hierarchy("v1", _inside(point, root, memory))
    except OSError:
        return None
    return None


def _write(path: Path, value: int | str) -> None:
    path.write_text(str(value))


@contextmanager
def memory_cgroup(where: Hierarchy | None, limit_bytes: int) -> Iterator[Path | None]:
    """A fresh cgroup limited to ``limit_bytes`` (no swap) for one program; removed afterwards (the
    program's processes must be gone by then). None when ``where`` is None."""
    if where is None:
        yield None
        return
    path = where.base / f"{PREFIX}{os.getpid()}-{next(_serial)}"
    path.mkdir()
    try:
        if where.version == "v2":
            _write(path / "memory.max", limit_bytes)
            if (path / "memory.swap.max").exists():
                _write(path / "memory.swap.max", 0)
        else:
            _write(path / "memory.limit_in_bytes", limit_bytes)
            if (path / "memory.memsw.limit_in_bytes").exists():
                _write(path / "memory.memsw.limit_in_bytes", limit_bytes)
        yield path
    finally:
        _remove(path)


def oom_kills(cgroup: Path | None) -> int:
    """How many processes the kernel killed for exceeding the cgroup's limit."""
    if cgroup is None:
        return 0
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(OSError):
            for line in (cgroup / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


def _remove(path: Path) -> None:
    """rmdir, retried while the last processes leave (bounded: a cgroup that stays busy is left)."""
    deadline = time.monotonic() + REMOVE_PATIENCE_S
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
