"""Every stage of the sampler: the records of `history`, `classic` and `filters`, collected in one place.

`STAGES` is the single source of the stage names, the `SamplingConfig` fields (with their defaults and
checks), when each stage runs, and the chain table; see `sampling.stages.record` for what a record holds.
"""

from __future__ import annotations

from sampling.stages import classic, filters, history
from sampling.stages.record import Stage, stage_table

STAGES: tuple[Stage, ...] = (*history.RECORDS, *classic.RECORDS, *filters.RECORDS)
"""Every stage, the logit modifiers first; `STAGE_NAMES` lists their names in this order."""

STAGE_NAMES: tuple[str, ...] = tuple(stage_table(STAGES))
"""Every stage a chain can name; `order` lists some of them, each at most once, ``mirostat`` last."""
