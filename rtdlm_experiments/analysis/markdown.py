"""GitHub-flavoured Markdown tables: the one writer the reports and the benchmarks share."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table of already formatted cells (``|`` inside a cell is escaped).

    >>> print(markdown_table(["run", "distinct_2"], [["a|b", "0.5"]]))
    | run | distinct_2 |
    |---|---|
    | a\\|b | 0.5 |
    """

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"

    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])
