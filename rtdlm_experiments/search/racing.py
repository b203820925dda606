"""Racing: a trial generates its prompts in chunks and stops as soon as it is worse than the incumbent
(the best finished trial) with 95% confidence, on the same prompts and seeds.

The rule. After chunk ``j`` the trial has per-prompt objective values ``x_i`` and the incumbent, on the
same prompts and row seeds (common random numbers), ``y_i``. With ``d_i = sign * (x_i - y_i)`` (``sign``
= -1 for a metric to minimize), the trial is pruned when the one-sided Student-t upper bound of
``mean(d)`` is below 0. Repeated looks are accounted for by Bonferroni over the planned looks: a trial
with ``K`` chunks is looked at ``K - 1`` times (never after its last chunk), each look at level
``1 - (1 - confidence) / (K - 1)``, so the chance that a trial at least as good as the incumbent is
pruned at any look is at most ``1 - confidence`` (given the t-bound's per-look coverage).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sampling.decoding.base import GenerationOutput, merge_outputs

PROMPT_SCORES_FILE = "search_prompt_scores.jsonl"
"""In a trial's job folder: the objective's value on each prompt it generated."""

_PER_ROW_FIELDS = ("token_ids", "model_logprobs", "entropies", "num_kept", "finished_by_stop")


def look_level(confidence: float, planned_looks: int) -> float:
    """The one-sided level of one look under Bonferroni.

    >>> round(look_level(0.95, 4), 4)
    0.9875
    """
    return 1.0 - (1.0 - confidence) / max(1, planned_looks)


def paired_upper_bound(differences: Sequence[float], level: float) -> float:
    """One-sided Student-t upper bound of the mean of ``differences`` at ``level``; +inf for fewer than
    two values (no spread to judge by).

    >>> paired_upper_bound([-1.0, -1.0, -1.0], 0.95)
    -1.0
    >>> round(paired_upper_bound([-1.0, 0.0, -0.5, -0.5], 0.95), 4)
    -0.0196
    >>> paired_upper_bound([-1.0], 0.95)
    inf
    """
    from scipy.stats import t as student_t

    n = len(differences)
    if n < 2:
        return math.inf
    mean = sum(differences) / n
    variance = sum((value - mean) ** 2 for value in differences) / (n - 1)
    return mean + float(student_t.ppf(level, n - 1)) * math.sqrt(variance / n)


def should_prune(differences: Sequence[float], confidence: float, planned_looks: int) -> bool:
    """The racing rule: the trial's paired difference to the incumbent is below 0 with ``confidence``,
    Bonferroni-corrected for ``planned_looks``.

    >>> should_prune([-0.4, -0.6, -0.5, -0.3, -0.5], 0.95, 3), should_prune([-0.4, 0.6, 0.0], 0.95, 3)
    (True, False)
    """
    return paired_upper_bound(differences, look_level(confidence, planned_looks)) < 0.0


def prompt_chunks(prompt_indices: Sequence[int], chunk_prompts: int) -> list[list[int]]:
    """Row positions grouped by consecutive chunks of ``chunk_prompts`` distinct prompts.

    >>> prompt_chunks([0, 0, 1, 1, 2, 2], 2)
    [[0, 1, 2, 3], [4, 5]]
    """
    chunks: list[list[int]] = []
    seen: list[int] = []
    for position, prompt in enumerate(prompt_indices):
        if not seen or prompt != seen[-1]:
            seen.append(prompt)
            if (len(seen) - 1) % chunk_prompts == 0:
                chunks.append([])
        chunks[-1].append(position)
    return chunks


def select_rows(output: GenerationOutput, positions: Sequence[int]) -> GenerationOutput:
    """The per-row lists of ``output`` for ``positions`` only (timings and counters left as they are)."""
    picked = {
        name: [getattr(output, name)[i] for i in positions] if getattr(output, name) else []
        for name in _PER_ROW_FIELDS
    }
    return replace(output, **picked)


@dataclass
class Race:
    """One trial's race against the incumbent's per-prompt values (``incumbent``; empty = no incumbent
    yet, so nothing is pruned but the values are still recorded)."""

    metric: str
    sign: float
    incumbent: Mapping[int, float]
    chunk_prompts: int
    confidence: float = 0.95
    scores: dict[int, float] = field(default_factory=dict)
    looks: int = 0
    pruned: bool = False
    upper_bound: float = math.inf
    planned_rows: int = 0
    used_rows: int = 0

    def run(
        self,
        rows: Sequence[Any],
        generate: Callable[[Sequence[Any]], dict[str, GenerationOutput]],
        score: Callable[[Sequence[Any], GenerationOutput], Mapping[int, float]],
    ) -> tuple[list[Any], dict[str, GenerationOutput]]:
        """Generate ``rows`` (which have a ``prompt_index``) chunk by chunk with ``generate`` (outputs by
        role), score each chunk's prompts with ``score``, stop when the rule prunes; returns the rows
        generated and their outputs merged per role."""
        chunks = prompt_chunks([row.prompt_index for row in rows], self.chunk_prompts)
        planned_looks = len(chunks) - 1
        self.planned_rows = len(rows)
        done: list[Any] = []
        parts: list[dict[str, GenerationOutput]] = []
        for number, positions in enumerate(chunks):
            chunk_rows = [rows[i] for i in positions]
            parts.append(generate(chunk_rows))
            done += chunk_rows
            self.scores.update(score(chunk_rows, parts[-1]["decoder"]))
            if number < planned_looks and self._look(planned_looks):
                break
        self.used_rows = len(done)
        return done, {role: merge_outputs([part[role] for part in parts]) for role in parts[0]}

    def _look(self, planned_looks: int) -> bool:
        shared = [prompt for prompt in self.scores if prompt in self.incumbent]
        if len(shared) < 2:
            return False
        self.looks += 1
        differences = [self.sign * (self.scores[p] - self.incumbent[p]) for p in shared]
        self.upper_bound = paired_upper_bound(differences, look_level(self.confidence, planned_looks))
        self.pruned = self.upper_bound < 0.0
        return self.pruned

    def metrics(self) -> dict[str, float]:
        """What the job reports about its race (in the ``other/`` namespace)."""
        return {
            "race_pruned": float(self.pruned),
            "race_looks": float(self.looks),
            "race_generations_used": float(self.used_rows),
            "race_generations_saved": float(self.planned_rows - self.used_rows),
            "race_upper_bound": self.upper_bound if math.isfinite(self.upper_bound) else math.nan,
        }

    def artifacts(self) -> dict[str, list[dict[str, Any]]]:
        rows = [{"prompt_index": prompt, "score": value} for prompt, value in sorted(self.scores.items())]
        return {PROMPT_SCORES_FILE: rows}
