"""A job's inputs, validated: composed config → `JobSpec`, before anything heavy happens.

`prepare_job` checks every value without loading a model, so a bad override fails in a second with one
line naming the field and the allowed range (`ConfigError`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.job.prompt_sets import Prompt, build_task, load_prompts, stop_strings
from rtdlm_experiments.models import ModelPreparationError, validate_model_config
from rtdlm_experiments.models.registry import resolve_model_engine
from rtdlm_experiments.tasks.base import Task
from sampling import SamplingConfig, get_preset
from sampling.decoding.self_speculative import SelfSpeculativeDecoder
from sampling.decoding.speculation_policy import POLICIES

TRACKING_BACKENDS = ("mlflow", "none")
MAX_NUM_SAMPLES = 10_000
MAX_NEW_TOKENS = 131_072
"""The longest context of any supported model; the loaded model's own context is checked before
generating (`check_model_fit`)."""
MAX_BATCH_SIZE = 4_096
MAX_ROWS = 1_000_000
"""Prompts × samples: each row is planned, generated and saved as a record."""
MAX_TOTAL_NEW_TOKENS = 50_000_000
"""Rows × max_new_tokens: every generated token is kept with its per-token statistics (about 100 bytes
in Python lists), so this bounds a job's memory at a few GiB."""
MAX_TIMEOUT_S = 3_600.0
MAX_DECODER_COUNT = 1_024
"""Drafts per round, n-gram length, exit layer: far above any useful value, below what would allocate
without bound (a round's drafts are scored in one forward)."""
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1_000
MAX_WORKERS = 64

_POSITIVE_DECODER_FIELDS = ("num_draft_tokens", "max_ngram", "exit_layer")
DRAFT_MODEL_KEY = "draft_model"
"""A decoder config field naming a model config: the app loads it next to the target and passes the
loaded model under this keyword."""


@dataclass(frozen=True)
class ExecutionSettings:
    """The ``eval`` config: whether model-written code may run, and how."""

    allow_code_execution: bool = False
    timeout_s: float = 5.0
    workers: int | None = None


def execution_settings(cfg: Mapping[str, Any]) -> ExecutionSettings:
    """The ``eval`` config node as `ExecutionSettings`."""
    return ExecutionSettings(
        bool(cfg.get("allow_code_execution", False)), float(cfg.get("timeout_s", 5.0)), cfg.get("workers")
    )


def check_code_execution(task: Task, settings: ExecutionSettings) -> None:
    """Scoring that runs model-written code is opt-in: fail (before any model loads) unless allowed."""
    if settings.timeout_s <= 0:
        raise ConfigError(f"eval.timeout_s={settings.timeout_s} is invalid: must be > 0")
    if settings.workers is not None and settings.workers < 1:
        raise ConfigError(f"eval.workers={settings.workers} is invalid: must be >= 1, or null")
    if task.needs_code_execution and not settings.allow_code_execution:
        raise ConfigError(
            "eval.allow_code_execution=false is invalid for these prompts: scoring them runs model-written "
            "code (sandboxed); pass eval.allow_code_execution=true to allow it"
        )


@dataclass(frozen=True)
class JobSpec:
    """A job's inputs, validated: what `run_job` needs and nothing it would have to check again."""

    sampling: SamplingConfig
    model: dict[str, Any]
    decoder: dict[str, Any]
    prompts: list[Prompt]
    chat_template: bool
    seed: int
    max_new_tokens: int
    num_samples: int
    batch_size: int
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)
    judge_model: str | None = None
    judge_batch_size: int = 4
    task: Task | None = None
    """The task that scores the generations (None: a prompt set's answers only)."""


def sampling_config(cfg: Mapping[str, Any], seed: int | None = None) -> SamplingConfig:
    """The preset named by ``cfg["preset"]`` with every non-null field of ``cfg`` overriding it.

    Hydra's lists and mappings (``order``, ``dry_sequence_breakers``, ``logit_bias``) become plain ones;
    an ``order`` that is neither a list nor a string (``sampling.order=5``) is read as an order's name,
    so it fails as an unknown one.

    >>> sampling_config({"preset": "precise", "order": ["top_k", "temperature"], "top_p": None}).order
    ('top_k', 'temperature')
    """
    overrides = {
        key: OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        for key, value in cfg.items()
        if key != "preset" and value is not None
    }
    if "order" in overrides and not isinstance(overrides["order"], str | list | tuple):
        overrides["order"] = str(overrides["order"])
    try:
        return get_preset(cfg["preset"], **overrides, seed=seed)
    except ValueError as err:
        message = str(err)
        if message.startswith("unknown sampling preset"):
            message = f"sampling.preset={cfg['preset']!r} is invalid: {message}"
        raise ConfigError(message) from err


def validate_decoder_config(cfg: Mapping[str, Any]) -> None:
    """Checks of a ``decoder`` config that need no model (the schema already checked types): its
    ``_target_`` names a class, its counts are positive and its draft model config is valid."""
    for key in _POSITIVE_DECODER_FIELDS:
        if key in cfg and cfg[key] < 1:
            raise ConfigError(f"decoder.{key}={cfg[key]} is invalid: must be >= 1")
        if key in cfg:
            check_range(f"decoder.{key}", cfg[key], 1, MAX_DECODER_COUNT)
    if "min_confidence" in cfg and not 0.0 <= cfg["min_confidence"] < 1.0:
        raise ConfigError(
            f"decoder.min_confidence={cfg['min_confidence']} is invalid: must be in [0, 1) (0: off)"
        )
    if "policy" in cfg and cfg["policy"] not in POLICIES:
        allowed = ", ".join(POLICIES)
        raise ConfigError(f"decoder.policy={cfg['policy']!r} is invalid: must be one of {allowed}")
    try:
        get_class(cfg["_target_"])
    except Exception as err:
        raise ConfigError(f"decoder._target_={cfg['_target_']!r} is invalid: {_first_line(err)}") from err
    if DRAFT_MODEL_KEY in cfg:
        validate_model(cfg[DRAFT_MODEL_KEY], field_name=f"decoder.{DRAFT_MODEL_KEY}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def check_range(name: str, value: Any, low: float, high: float) -> None:
    """ConfigError unless ``low <= value <= high`` (NaN never is).

    >>> check_range("num_samples", 10**9, 1, 10_000)
    Traceback (most recent call last):
    ...
    rtdlm_experiments.config.errors.ConfigError: num_samples=1000000000 is invalid: must be in [1, 10000]
    >>> check_range("eval.timeout_s", float("nan"), 0.001, 3600)
    Traceback (most recent call last):
    ...
    rtdlm_experiments.config.errors.ConfigError: eval.timeout_s=nan is invalid: must be in [0.001, 3600]
    """
    if not low <= value <= high:
        raise ConfigError(f"{name}={value} is invalid: must be in [{low:g}, {high:g}]")


def check_job_size(num_prompts: int, num_samples: int, max_new_tokens: int) -> None:
    """Rows (prompts × samples) and their new tokens within what one job can hold."""
    rows = num_prompts * num_samples
    if rows > MAX_ROWS:
        raise ConfigError(
            f"num_samples={num_samples} is invalid: {num_prompts} prompts × {num_samples} samples = {rows}"
            f" rows, at most {MAX_ROWS} per job"
        )
    if rows * max_new_tokens > MAX_TOTAL_NEW_TOKENS:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} is invalid: {rows} rows × {max_new_tokens} = "
            f"{rows * max_new_tokens} new tokens, at most {MAX_TOTAL_NEW_TOKENS} per job (each is kept "
            "with its statistics): fewer samples, prompts (prompts.limit) or new tokens"
        )


def check_model_fit(
    spec: JobSpec, prompt_ids: list[list[int]], vocab_size: int, max_context: int | None
) -> None:
    """Checks that need the loaded model (its vocabulary and context), run before any generation: every
    ``logit_bias`` id is a token of the vocabulary, and each prompt plus ``max_new_tokens`` fits the
    context (naming the first prompt that does not)."""
    for token_id, _ in spec.sampling.logit_bias:
        if token_id >= vocab_size:
            raise ConfigError(
                f"sampling.logit_bias={{{token_id}: ...}} is invalid: token ids must be in [0, {vocab_size})"
                " (the model's vocabulary)"
            )
    if max_context is None:
        return
    if spec.max_new_tokens >= max_context:
        raise ConfigError(
            f"max_new_tokens={spec.max_new_tokens} is invalid: must be below the model's context of "
            f"{max_context} tokens (the prompt needs room too)"
        )
    for index, ids in enumerate(prompt_ids):
        if len(ids) + spec.max_new_tokens > max_context:
            text = spec.prompts[index].text
            raise ConfigError(
                f"prompts: prompt {index} ({text[:40]!r}{'...' if len(text) > 40 else ''}) is invalid: "
                f"{len(ids)} tokens + max_new_tokens={spec.max_new_tokens} > the model's context of "
                f"{max_context}"
            )


def prepare_job(cfg: DictConfig) -> JobSpec:
    """Validate a composed config into a `JobSpec`; raises `ConfigError` naming the first bad field."""
    check_range("max_new_tokens", cfg.max_new_tokens, 1, MAX_NEW_TOKENS)
    check_range("num_samples", cfg.num_samples, 1, MAX_NUM_SAMPLES)
    check_range("batch_size", cfg.batch_size, 1, MAX_BATCH_SIZE)
    if cfg.seed < 0:
        raise ConfigError(f"seed={cfg.seed} is invalid: must be >= 0")
    if cfg.tracking.backend not in TRACKING_BACKENDS:
        raise ConfigError(
            f"tracking.backend={cfg.tracking.backend!r} is invalid: must be one of {TRACKING_BACKENDS}"
        )
    if cfg.tracking.parent_run_id and cfg.tracking.backend != "mlflow":
        raise ConfigError(
            f"tracking.parent_run_id={cfg.tracking.parent_run_id!r} is invalid: resuming needs MLflow"
        )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    validate_model(model_cfg, field_name="model")
    decoder_cfg = OmegaConf.to_container(cfg.decoder, resolve=True)
    validate_decoder_config(decoder_cfg)
    model_cfg["engine"] = model_engine(model_cfg, decoder_cfg)
    task = build_task(cfg.prompts)
    prompts = load_prompts(cfg.prompts, task)
    check_job_size(len(prompts), cfg.num_samples, cfg.max_new_tokens)
    execution = execution_settings(cfg.get("eval") or {})
    check_range("eval.timeout_s", execution.timeout_s, 0.001, MAX_TIMEOUT_S)
    if execution.workers is not None:
        check_range("eval.workers", execution.workers, 1, MAX_WORKERS)
    check_code_execution(task, execution)
    judge = cfg.get("judge") or {}
    if judge.get("model") is not None:
        validate_model(judge["model"], field_name="judge.model")
    check_range("judge.batch_size", judge.get("batch_size", 1), 1, MAX_BATCH_SIZE)
    return JobSpec(
        sampling=sampling_config(cfg.sampling, seed=cfg.seed),
        model=model_cfg,
        decoder=decoder_cfg,
        prompts=prompts,
        chat_template=cfg.prompts.chat_template,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
        stop_strings=_bounded_stop_strings(stop_strings(cfg.prompts, task)),
        ignore_eos=bool(cfg.get("ignore_eos", False)),
        execution=execution,
        judge_model=judge.get("model"),
        judge_batch_size=judge.get("batch_size", 4),
        task=task,
    )


def _bounded_stop_strings(strings: tuple[str, ...]) -> tuple[str, ...]:
    """At most `MAX_STOP_STRINGS`, each at most `MAX_STOP_STRING_CHARS` long (each is searched for in
    every row's text after every step)."""
    check_range("len(prompts.stop_strings)", len(strings), 0, MAX_STOP_STRINGS)
    if longest := max(strings, key=len, default=""):
        check_range("the longest of prompts.stop_strings' length", len(longest), 1, MAX_STOP_STRING_CHARS)
    return strings


def model_engine(model_cfg: dict[str, Any], decoder_cfg: Mapping[str, Any]) -> str:
    """The engine that runs the job (``model.engine`` with ``auto`` resolved): a decoder that needs hidden
    states (self-speculative early exit) gets torch under ``auto`` and is refused on llamacpp."""
    try:
        needs_hidden = issubclass(get_class(decoder_cfg["_target_"]), SelfSpeculativeDecoder)
        return resolve_model_engine(model_cfg, needs_hidden_states=needs_hidden)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def validate_model(model_cfg: Mapping[str, Any] | str, field_name: str) -> None:
    try:
        validate_model_config(model_cfg)
    except (ValueError, TypeError, ModelPreparationError) as err:
        message = str(err).strip("'\"")
        raise ConfigError(message if field_name in message else f"{field_name}: {message}") from err


def resolved_config(cfg: DictConfig, spec: JobSpec) -> dict[str, Any]:
    """The composed config as plain data, with ``sampling`` holding every effective field (the preset's
    values filled in), so it describes the job without needing `sampling.PRESETS`."""
    config = OmegaConf.to_container(cfg, resolve=True)
    sampling = asdict(spec.sampling)
    sampling.pop("seed")  # the job's seed, already at the top level
    config["sampling"] = {"preset": cfg.sampling.preset, **sampling}
    config["model"] = {**config.get("model", {}), "engine": spec.model.get("engine", "torch")}
    return config
