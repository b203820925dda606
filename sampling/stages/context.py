"""`ChainContext`: what a stage reads besides the logits it receives (the config, the ids, the whole rows'
statistics while the chain runs on candidates, mirostat's μ and XTC's coin)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sampling.stages.common import by_row_blocks, finite_std, shifted_weights, softmax_summary, sum64


@dataclass
class ChainContext:
    """What a stage may read besides the logits it receives.

    ``full`` holds the whole rows while the chain runs on candidate columns and no filter has run yet
    (the row statistics then come from ``full`` scaled by ``scale``, the product of the temperatures so
    far); once a filter ran, the candidates hold every surviving token and ``full`` is None.
    """

    config: Any
    """The `SamplingConfig` (typed loosely: the stage records it is built from come first)."""
    history: torch.Tensor | None = None
    generated: torch.Tensor | None = None
    full: torch.Tensor | None = None
    scale: torch.Tensor | float = 1.0
    sorted_desc: bool = False
    mu: torch.Tensor | None = None
    xtc_active: torch.Tensor | bool = True
    stats: dict[tuple[str, int], torch.Tensor] | None = None
    """Whole-row statistics of every row, shared by the passes of one candidate search (rows ``rows``)."""
    rows: torch.Tensor | None = None
    first_input: tuple[torch.Tensor, torch.Tensor | None] | None = None
    """(the candidate values the first filter received, the rows' log-normalizer) after a candidate run."""
    last: torch.Tensor | None = None
    """[B, 1] column of each row's last real candidate when rows are padded (None: the last column)."""
    _scaled: torch.Tensor | None = field(default=None, repr=False)
    _rescales: int = 0

    def _row(self) -> torch.Tensor:
        if self._scaled is None:  # float32: a float64 copy of a batch costs more than its sums
            scale = self.scale.float() if isinstance(self.scale, torch.Tensor) else self.scale
            self._scaled = self.full if isinstance(scale, float) and scale == 1.0 else self.full * scale
        return self._scaled

    def _stat(self, name: str, values: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]):
        if self.full is None:
            return compute(values)
        key = (name, self._rescales)
        if self.stats is None or (key not in self.stats and self.rows is not None):
            return compute(self._row())
        if key not in self.stats:
            self.stats[key] = compute(self._row())
        return self.stats[key] if self.rows is None else self.stats[key][self.rows]

    def log_total(self, values: torch.Tensor) -> torch.Tensor | None:
        if self.full is None:
            return None
        if self.stats is not None and ("summary", self._rescales) in self.stats:
            return self._stat("summary", values, _summary)[..., 0]
        return self._stat("log_total", values, _log_total)

    def top(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("max", values, lambda row: row.amax(-1).double())

    def entropy(self, values: torch.Tensor) -> torch.Tensor:
        if self.full is None:
            return softmax_summary(values)[1]
        return self._stat("summary", values, _summary)[..., 1]

    def count(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("count", values, lambda row: torch.isfinite(row).sum(-1))

    def sigma(self, values: torch.Tensor) -> torch.Tensor:
        return self._stat("sigma", values, finite_std)

    def rescale(self, temperature: torch.Tensor | float) -> None:
        if isinstance(temperature, torch.Tensor):
            temperature = temperature.view(-1, 1)
        self.scale = self.scale / temperature
        self._scaled = None
        self._rescales += 1


def _summary(row: torch.Tensor) -> torch.Tensor:
    return torch.stack(softmax_summary(row), -1)


def _log_total(row: torch.Tensor) -> torch.Tensor:
    """The log-normalizer alone (float64): `softmax_summary` without the entropy's extra pass."""

    def block(rows: torch.Tensor) -> torch.Tensor:
        top, _, weights = shifted_weights(rows)
        return top.squeeze(-1).double() + sum64(weights).log()

    return by_row_blocks(block, row)
