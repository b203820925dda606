"""What the app prints to a terminal: a progress bar over generated tokens, third-party progress bars kept
out of logs, and the end-of-sweep table with confidence intervals.

The progress bar counts a job's token budget (rows × ``max_new_tokens``): each decoding step advances it
by the tokens generated plus the budget released by rows that ended early, so it reaches 100 % exactly
when every row is done, and its rate (tok/s) counts generated tokens only.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


class TokenProgress:
    """A tqdm bar over a job's token budget; silent (and nearly free) when stderr is not a terminal.

    ``advance(new_tokens, released_budget)`` after every step; ``close()`` at the end.
    """

    def __init__(self, total_tokens: int, description: str, enabled: bool | None = None) -> None:
        from tqdm import tqdm

        self.generated = 0
        self.accounted = 0
        self._started = time.perf_counter()
        disable = None if enabled is None else not enabled  # None: tqdm disables itself off a TTY
        self._bar = tqdm(total=total_tokens, desc=description, unit="tok", disable=disable, leave=False)

    def advance(self, new_tokens: int, released_budget: int = 0) -> None:
        """Count one step: ``new_tokens`` generated, ``released_budget`` given back by rows that ended."""
        self.generated += new_tokens
        self.accounted += new_tokens + released_budget
        self._bar.update(new_tokens + released_budget)
        elapsed = time.perf_counter() - self._started
        if elapsed > 0:
            self._bar.set_postfix_str(f"{self.generated / elapsed:.1f} tok/s", refresh=False)

    def update(self, n: int) -> None:
        """tqdm's own call, for callers that count whole units without a token split."""
        self.accounted += n
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def progress_factory(total_tokens: int, description: str) -> TokenProgress:
    """What the app calls at the start of each generation pass: a `TokenProgress`."""
    return TokenProgress(total_tokens, description)


def quiet_third_party_progress(stream: Any = None) -> bool:
    """Switch off other libraries' progress bars (transformers' "Loading weights", the HF hub's) when
    ``stream`` (default stdout) is not a terminal, so they do not fill log files. Returns whether it did.
    """
    stream = sys.stdout if stream is None else stream
    if getattr(stream, "isatty", lambda: False)():
        return False
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if "transformers" in sys.modules:  # else the variables above reach it when it is imported
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()
    return True


def with_interval(metrics: Mapping[str, Any], name: str, digits: int = 3) -> str:
    """``value ± half-width`` when ``<name>_ci_low``/``<name>_ci_high`` exist, else the value.

    >>> with_interval({"a": 0.5, "a_ci_low": 0.4, "a_ci_high": 0.62}, "a")
    '0.500 [0.400, 0.620]'
    >>> with_interval({"a": 0.5}, "a"), with_interval({"a": float("nan")}, "a")
    ('0.500', '')
    """
    value = metrics.get(name)
    if not _finite(value):
        return ""
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    if _finite(low) and _finite(high):
        return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"
    return f"{value:.{digits}f}"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def summary_text(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], label: str = "run") -> str:
    """A plain-text table, one row per job: its name and status, then each metric (with its confidence
    interval when the row has one); metrics no row has are left out.

    >>> print(summary_text([{"run": "a", "status": "FINISHED", "x": 1.0}, {"run": "bb", "status": "FAILED"}],
    ...                    ["x", "y"]))
    run  status    x
    a    FINISHED  1.000
    bb   FAILED
    """
    shown = [name for name in metrics if any(_finite(row.get(name)) for row in rows)]
    header = [label, "status", *shown]
    body = [
        [str(row.get(label, "")), str(row.get("status", "")), *(with_interval(row, name) for name in shown)]
        for row in rows
    ]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in [header, *body]
    )
