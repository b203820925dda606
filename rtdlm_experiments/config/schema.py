"""Typed schemas of the Hydra config (the config directory and output root: `rtdlm_experiments.config.paths`).

The dataclasses are registered in Hydra's ConfigStore so a misspelled key or a value of the wrong type
fails when the config is composed, before any model loads. They check types only: value ranges are
checked by the objects the app builds from them (`sampling.SamplingConfig`, the model registry, the
app's decoder checks), so each rule lives in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from rtdlm_experiments.config.paths import config_dir, output_root
from sampling.config import sampling_params


def _sampling_schema() -> type:
    """`SamplingSchema`: a preset of `sampling.PRESETS` plus one optional override per `SamplingConfig`
    field, generated from the stage records (`sampling.config.sampling_params`), so a new stage's fields
    reach the command line without an edit here. ``null`` keeps the preset's value; ``seed`` is left out
    (the job's ``seed`` seeds the sampler)."""
    overrides = [
        (param.name, param.schema_type or param.type | None, field(default=None))
        for param in sampling_params()
        if param.name not in _NOT_IN_SAMPLING_SCHEMA
    ]
    return make_dataclass(
        "SamplingSchema",
        [("preset", str, field(default="balanced")), *overrides],
        namespace={"__doc__": _SAMPLING_SCHEMA_DOC, "__module__": __name__},
    )


_NOT_IN_SAMPLING_SCHEMA = ("seed",)
_SAMPLING_SCHEMA_DOC = """A preset of `sampling.PRESETS` plus per-field overrides (``null``: keep the preset).

    ``repetition_window: null`` and ``dry_penalty_last_n: null`` therefore mean the preset's window (every
    preset uses the whole context). The job's ``seed`` seeds the sampler, so there is no seed here.
    ``order`` is a named order or a list of stages (``sampling.order=[penalties,top_k,temperature]``);
    ``logit_bias`` a ``{token_id: bias}`` mapping (``sampling.logit_bias={50256: -inf}``), typed `Any`
    because OmegaConf cannot merge a mapping into an unset typed dict; `sampling.SamplingConfig` checks
    both, and every range. The fields come from the sampling stage records."""

SamplingSchema = _sampling_schema()


@dataclass
class DecoderSchema:
    """Which decoder generates the tokens; each decoder's yaml extends one of the subclasses below.

    The app builds it with ``hydra.utils.instantiate``: ``_target_`` is the decoder class, the other
    fields but ``name`` (a label) are its keyword arguments. ``_partial_: true`` makes a partial that the
    app completes with what needs the loaded target model (a ``draft_model`` config name becomes the
    loaded draft model; an ``exit_layer`` is checked against the target's layers).
    """

    _target_: str = MISSING
    _partial_: bool = False
    name: str = MISSING


@dataclass
class AutoregressiveSchema(DecoderSchema):
    name: str = "autoregressive"


@dataclass
class DraftingSchema(DecoderSchema):
    """What every draft-then-verify decoder shares: how many drafts a round may offer, and who decides."""

    num_draft_tokens: int = MISSING
    """γ for ``policy: constant``; the most drafts a round may offer for the other policies."""
    policy: str = MISSING
    """``measured`` (γ from the measured verify/draft cost curve and acceptance; off when it cannot win),
    ``heuristic`` (HF's +2/−1 rule) or ``constant``."""


@dataclass
class SpeculativeSchema(DraftingSchema):
    name: str = "speculative"
    draft_model: str = MISSING
    """Name of a config in the ``model`` group; it must share the target's tokenizer."""
    min_confidence: float = 0.0
    """End a row's drafts after one the draft model gave less than this probability (0: off)."""


@dataclass
class SelfSpeculativeSchema(DraftingSchema):
    name: str = "self_speculative"
    exit_layer: int = MISSING


@dataclass
class PromptLookupSchema(DraftingSchema):
    name: str = "prompt_lookup"
    max_ngram: int = MISSING


@dataclass
class PromptsSchema:
    """``name``: a prompt set bundled with the package, or ``file`` to read ``path`` (.txt or .jsonl), or
    a task's name; ``_target_``: the `Task` (`rtdlm_experiments.tasks.base`) that holds it."""

    _target_: str | None = None
    """The task's class (called with ``name`` and ``path``); null: a bundled set or file."""
    name: str = "default"
    path: str | None = None
    limit: int | None = None
    """Use only ``limit`` prompts (quick runs, tests): the first ``limit`` of a fixed, seeded shuffle, or
    of the file's order when ``shuffle`` is false."""
    shuffle: bool | None = None
    """Whether ``limit`` samples the problems (a fixed shuffle) or takes the file's first; null: the
    task's default (benchmarks: true; prompt sets and files: false)."""
    chat_template: bool = True
    """Wrap each prompt as a user turn with the tokenizer's chat template, when it has one."""
    stop_strings: list[str] | None = None
    """Text that ends a generation (cut before it); ``null`` = the prompt set's own (HumanEval continued
    raw: the end of the function; every other set: none), ``[]`` = none."""


@dataclass
class EvalSchema:
    """Scoring that runs model-written code (HumanEval): opt-in, sandboxed
    (`rtdlm_experiments.tasks.execution`)."""

    allow_code_execution: bool = False
    """A job whose prompt set needs code execution fails before any model loads unless this is true."""
    timeout_s: float = 5.0
    """Wall-clock limit of one program."""
    workers: int | None = None
    """Programs run in parallel; ``null`` = the CPU count, at most 8."""


@dataclass
class JudgeSchema:
    """Judge likelihood: each generation's tokens scored under another model (``null`` = off)."""

    model: str | None = None
    """Name of a config in the ``model`` group; it must share the job model's tokenizer."""
    batch_size: int = 8
    """Generations per judge forward."""


@dataclass
class TrackingSchema:
    """``backend``: ``mlflow`` or ``none``. ``uri``: an MLflow tracking URI; ``null`` means
    ``$MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store under the output root."""

    backend: str = "mlflow"
    uri: str | None = None
    parent_run_id: str | None = None
    """Resume this sweep parent run: its FINISHED jobs (same config hash) are skipped, the others run and
    are logged under it. Set by `rtdlm_experiments.schedule`; multiruns only."""


@dataclass
class SearchSchema:
    """What a search (``hydra/sweeper=optuna``, `rtdlm_experiments.search`) optimizes; unused otherwise."""

    objectives: list[str] = field(default_factory=list)
    """``METRIC:max`` or ``METRIC:min``, e.g. ``[quality/pass_at_1:max]``; several give a Pareto front."""
    constraints: list[str] = field(default_factory=list)
    """``METRIC>=NUMBER`` or ``METRIC<=NUMBER``: a trial is feasible when every one holds."""
    racing: bool = True
    """Stop a trial early when it is worse than the incumbent with ``confidence`` (one objective only)."""
    chunk_prompts: int = 5
    """Prompts per chunk: racing looks after every chunk but the last."""
    confidence: float = 0.95
    """Of the racing rule over all its looks (Bonferroni)."""
    max_generations: int | None = None
    """A generation budget (rows = prompts × samples, a raced trial counting what it generated): no new
    trial starts unless a whole one still fits, so a search can be given a grid's budget; racing's
    savings then buy more trials. ``hydra.sweeper.n_trials`` still caps the trials. None: no budget."""


@dataclass
class ExperimentConfig:
    """The whole composed config of one job."""

    model: dict[str, Any] = field(default_factory=dict)
    """Free-form on purpose: `rtdlm_experiments.models.validate_model_config` owns its keys."""
    sampling: SamplingSchema = field(default_factory=SamplingSchema)
    decoder: DecoderSchema = MISSING
    prompts: PromptsSchema = field(default_factory=PromptsSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    eval: EvalSchema = field(default_factory=EvalSchema)
    judge: JudgeSchema = field(default_factory=JudgeSchema)
    search: SearchSchema = field(default_factory=SearchSchema)
    seed: int = 0
    max_new_tokens: int = 32
    num_samples: int = 1
    """Samples per prompt."""
    batch_size: int = 8
    ignore_eos: bool = False
    """Generate exactly ``max_new_tokens`` per row: the model's end-of-sequence tokens do not end rows
    (stop strings still do)."""
    experiment_name: str = "rtdlm-experiments"


DECODER_SCHEMAS: dict[str, type[DecoderSchema]] = {
    "autoregressive": AutoregressiveSchema,
    "speculative": SpeculativeSchema,
    "self_speculative": SelfSpeculativeSchema,
    "prompt_lookup": PromptLookupSchema,
}


def config_groups_text() -> str:
    """The config groups and their options as ``--help`` lists them: the yaml files of ``conf/`` only,
    so the schemas registered in the ConfigStore (``*_schema``) stay internal.

    >>> "sampling: balanced, creative" in config_groups_text()
    True
    """
    groups = sorted(path for path in config_dir().iterdir() if path.is_dir() and path.name != "hydra")
    options = {group.name: sorted(file.stem for file in group.glob("*.yaml")) for group in groups}
    return "\n".join(f"  {group}: {', '.join(names)}" for group, names in options.items())


def register_configs() -> None:
    """Register the schemas with Hydra (``config.yaml`` and each decoder yaml extend them) and the
    ``rtdlm.output_root`` and ``rtdlm.config_groups`` (for ``--help``) resolvers. Safe to call more
    than once."""
    store = ConfigStore.instance()
    store.store(name="experiment_schema", node=ExperimentConfig)
    for name, schema in DECODER_SCHEMAS.items():
        store.store(group="decoder", name=f"{name}_schema", node=schema)
    if not OmegaConf.has_resolver("rtdlm.output_root"):
        OmegaConf.register_new_resolver("rtdlm.output_root", lambda: str(output_root()))
    if not OmegaConf.has_resolver("rtdlm.config_groups"):
        OmegaConf.register_new_resolver("rtdlm.config_groups", config_groups_text)


register_configs()
