"""Every tag name this project sets on MLflow runs, and run names that say what differs: a sweep's parent
names what it sweeps and on which model, a child only its own swept values, a single run its preset,
decoder and model.

    sweep sampling=creative,balanced · qwen2.5-coder-0.5b      (parent)
    creative                                                   (child of that sweep)
    num_draft_tokens=4 · speculative                           (child of a two-key sweep)
    balanced · autoregressive · tiny-random                    (single run)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# --- tag names: the only place they are spelled ----------------------------------------------------------

JOB_TAG = "rtdlm.job"
"""Tag set on every job run (not on sweep parents), so reports can tell them apart."""
CONFIG_HASH_TAG = "config_hash"
"""Tag of every job run: `config_hash` of its resolved config."""
SWEEP_TAG = "rtdlm.sweep"
"""Tag of every sweep's parent run: ``true``, or the sweep preset's name when the scheduler started it."""
SWEEP_DIR_TAG = "sweep_dir"
"""On a sweep's parent: its output folder."""
HOST_TAG = "rtdlm.host"
"""The host a run was started on; on a scheduled parent, the host whose scheduler runs it now."""
VERSION_TAG_PREFIX = "rtdlm.version."
GIT_DIRTY_TAG = "rtdlm.git_dirty"
MODEL_NAME_TAG = "rtdlm.model.name"
MODEL_DTYPE_TAG = "rtdlm.model.dtype"
MODEL_SHA256_TAG = "rtdlm.model.sha256"
SEARCH_TAG_PREFIX = "rtdlm.search."
"""A search's outcome on its parent run: ``best_trial``, ``best.<param>``, ``best_job_dir``,
``front_trials``."""
BEST_JOB_DIR_TAG = f"{SEARCH_TAG_PREFIX}best_job_dir"
"""On a search's parent: the folder of its best trial's job (what ``presets save --from-run`` follows)."""
SCHEDULE_KEY_TAG = "rtdlm.schedule.key"
"""A scheduled sweep's idempotency key (`rtdlm_experiments.schedule`)."""
SCHEDULE_OVERRIDES_TAG = "rtdlm.schedule.overrides"
DRIFT_TAG = "rtdlm.drift"
"""``ok``, ``drift`` or ``no_baseline``."""
DRIFT_BASELINE_TAG = "rtdlm.drift.baseline_run_id"
DRIFT_DETAILS_TAG = "rtdlm.drift.drifted"

LEGACY_SCHEDULE_SWEEP_TAG = "rtdlm.schedule.sweep"
"""Older spelling of a scheduled parent's `SWEEP_TAG` (its sweep's name), still read: yesterday's
scheduled runs carry it and are today's drift baseline."""
LEGACY_SCHEDULE_HOST_TAG = "rtdlm.schedule.host"
"""Older spelling of a scheduled parent's `HOST_TAG`, still read: an unfinished parent that carries it
is resumed only by the host it names (and a resume moves it to `HOST_TAG`)."""

# --- run names ------------------------------------------------------------------------------------------

SEPARATOR = " · "
_MODEL_KEY = "model"
_SINGLE_RUN_DETAIL_PREFIXES = ("sampling.", "decoder.")
"""Overrides of a single run worth naming (a field of its preset or decoder); the rest (where it is
logged, which prompts) is the same noise for every run and stays in the ``hydra.overrides`` tag."""


def override_key(override: str) -> str:
    """``+sampling.top_p=0.9`` → ``sampling.top_p`` (Hydra hands jobs their overrides as ``key=value``).

    >>> override_key("+sampling.top_p=0.9"), override_key("~decoder")
    ('sampling.top_p', 'decoder')
    """
    return override.split("=", 1)[0].lstrip("+~")


def short_value(override: str) -> str:
    """How one override reads in a name: a config group's choice by itself, a field as ``field=value``.

    >>> short_value("sampling=creative"), short_value("decoder.num_draft_tokens=4")
    ('creative', 'num_draft_tokens=4')
    """
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    return value if "." not in key else f"{key.rsplit('.', 1)[-1]}={value}"


def sweep_run_name(swept: Mapping[str, str], model: str | None) -> str:
    """The parent run of a sweep: ``sweep <key=values ...> · <model>``; the model is left out when it is
    swept (it is then among the swept values).

    >>> sweep_run_name({"sampling": "creative,balanced"}, "qwen2.5-coder-0.5b")
    'sweep sampling=creative,balanced · qwen2.5-coder-0.5b'
    >>> sweep_run_name({"model": "a,b", "decoder.num_draft_tokens": "2,4"}, "a")
    'sweep model=a,b decoder.num_draft_tokens=2,4'
    """
    what = " ".join(f"{key}={values}" for key, values in swept.items()) or "(nothing swept)"
    if model and _MODEL_KEY not in swept:
        return f"sweep {what}{SEPARATOR}{model}"
    return f"sweep {what}"


def child_run_name(overrides: Sequence[str], swept_keys: Sequence[str]) -> str:
    """A sweep's job: its value of each swept key, in the order they were swept.

    >>> child_run_name(["model=tiny-random", "sampling=creative"], ["sampling"])
    'creative'
    >>> child_run_name(["decoder=speculative", "decoder.num_draft_tokens=4"], ["decoder.num_draft_tokens",
    ...                 "decoder"])
    'num_draft_tokens=4 · speculative'

    A swept group added with ``+`` (a sweep preset's ``+sweep/truncation: a,b``) names its choice too:

    >>> child_run_name(["sampling.temperature=2.0", "+sweep/truncation=min_p_30"],
    ...                ["sampling.temperature", "+sweep/truncation"])
    'temperature=2.0 · min_p_30'
    """
    by_key = {override_key(override): override for override in overrides}
    parts = [short_value(by_key[key]) for key in map(override_key, swept_keys) if key in by_key]
    return SEPARATOR.join(parts) or "default"


def single_run_name(preset: str, decoder: str, model: str, overrides: Sequence[str] = ()) -> str:
    """A run outside a sweep: ``preset · decoder · model``, then the sampling/decoder fields it overrides.

    >>> single_run_name("balanced", "autoregressive", "tiny-random",
    ...                 ["model=tiny-random", "sampling.top_p=0.9", "experiment_name=x"])
    'balanced · autoregressive · tiny-random · top_p=0.9'
    """
    details = [
        short_value(override)
        for override in overrides
        if override_key(override).startswith(_SINGLE_RUN_DETAIL_PREFIXES)
    ]
    return SEPARATOR.join([preset, decoder, model, *details])
