"""One experiment job: composed config → validated spec → model + decoder → generations → metrics.

Everything here is computation: the job's record format is `rtdlm_experiments.results`', saving and
logging it the entry point's (`rtdlm_experiments.__main__`). `prepare_job` checks every value before
anything heavy happens, so a bad override fails in a second with one line naming the field.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments.metrics import all_metrics
from rtdlm_experiments.models import ModelPreparationError, load_model, validate_model_config
from rtdlm_experiments.prompt_sets import Prompt, load_prompts
from rtdlm_experiments.schema import ConfigError
from sampling import SamplingConfig, get_preset
from sampling.decoding import AutoregressiveDecoder
from sampling.decoding.base import CausalLM, Decoder, GenerationOutput, merge_outputs

TRACKING_BACKENDS = ("mlflow", "none")

_POSITIVE_DECODER_FIELDS = ("num_draft_tokens", "max_ngram", "exit_layer")
_LABEL_KEYS = ("name",)
"""Decoder config keys that describe the job but are no constructor arguments."""
_DRAFT_MODEL_KEY = "draft_model"
"""A decoder config field naming a model config: the app loads it next to the target and passes the
loaded model under this keyword."""

_WARMUP_TOKENS = 2


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


@dataclass(frozen=True)
class Row:
    """One generated sequence: sample ``sample_index`` of prompt ``prompt_index``."""

    prompt_index: int
    sample_index: int
    seed: int


@dataclass
class JobResult:
    """What a job computed; `rtdlm_experiments.results` turns it into the job's record."""

    output: GenerationOutput
    rows: list[Row]
    prompt_ids: list[list[int]]
    texts: list[str]
    metrics: dict[str, float]
    timings: dict[str, float]
    device: str
    dtype: str
    baseline: GenerationOutput | None = None


# --- validation (no model is loaded here) ----------------------------------------------------------


def sampling_config(cfg: Mapping[str, Any], seed: int | None = None) -> SamplingConfig:
    """The preset named by ``cfg["preset"]`` with every non-null field of ``cfg`` overriding it."""
    overrides = {key: value for key, value in cfg.items() if key != "preset" and value is not None}
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
    try:
        get_class(cfg["_target_"])
    except Exception as err:
        raise ConfigError(f"decoder._target_={cfg['_target_']!r} is invalid: {_first_line(err)}") from err
    if _DRAFT_MODEL_KEY in cfg:
        _validate_model(cfg[_DRAFT_MODEL_KEY], field_name=f"decoder.{_DRAFT_MODEL_KEY}")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def prepare_job(cfg: DictConfig) -> JobSpec:
    """Validate a composed config into a `JobSpec`; raises `ConfigError` naming the first bad field."""
    for key in ("max_new_tokens", "num_samples", "batch_size"):
        if cfg[key] < 1:
            raise ConfigError(f"{key}={cfg[key]} is invalid: must be >= 1")
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
    _validate_model(model_cfg, field_name="model")
    decoder_cfg = OmegaConf.to_container(cfg.decoder, resolve=True)
    validate_decoder_config(decoder_cfg)
    return JobSpec(
        sampling=sampling_config(cfg.sampling, seed=cfg.seed),
        model=model_cfg,
        decoder=decoder_cfg,
        prompts=load_prompts(cfg.prompts),
        chat_template=cfg.prompts.chat_template,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        num_samples=cfg.num_samples,
        batch_size=cfg.batch_size,
    )


def _validate_model(model_cfg: Mapping[str, Any] | str, field_name: str) -> None:
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
    return config


# --- building ---------------------------------------------------------------------------------------


def build_decoder(
    cfg: Mapping[str, Any], target: CausalLM, load_draft_model: Callable[..., CausalLM] = load_model
) -> Decoder:
    """The decoder a ``decoder`` config describes, for ``target``, built with ``hydra.utils.instantiate``.

    A ``_partial_`` config is completed with what depends on the target: a ``draft_model`` (a model
    config name) is loaded by ``load_draft_model`` where the target is and must share its tokenizer.
    An ``exit_layer`` must be below the target's layer count.
    """
    validate_decoder_config(cfg)
    check_exit_layer(cfg, target)
    arguments = {key: value for key, value in cfg.items() if key not in (*_LABEL_KEYS, _DRAFT_MODEL_KEY)}
    built = instantiate(arguments)
    if not isinstance(built, functools.partial):
        return built
    return built(**draft_model_argument(cfg, target, load_draft_model))


def check_exit_layer(cfg: Mapping[str, Any], target: CausalLM) -> None:
    """An early exit after layer ``exit_layer`` needs a later layer to verify with."""
    if "exit_layer" in cfg and cfg["exit_layer"] >= target.num_layers:
        raise ConfigError(
            f"decoder.exit_layer={cfg['exit_layer']} is invalid: "
            f"must be < the model's {target.num_layers} layers"
        )


def draft_model_argument(
    cfg: Mapping[str, Any], target: CausalLM, load_draft_model: Callable[..., CausalLM]
) -> dict[str, CausalLM]:
    """``{"draft_model": <loaded model>}`` when the config names one, else nothing to bind."""
    if _DRAFT_MODEL_KEY not in cfg:
        return {}
    name = cfg[_DRAFT_MODEL_KEY]
    draft = load_draft_model(name, **_placement(target))
    check_same_tokenizer(target, draft, draft_name=name)
    return {_DRAFT_MODEL_KEY: draft}


def _placement(model: Any) -> dict[str, str]:
    """dtype/device keyword arguments that put a second model where ``model`` is."""
    placement = {"device": str(model.device)}
    if dtype := getattr(model, "dtype", None):
        placement["dtype"] = str(dtype).removeprefix("torch.")
    return placement


_TOKENIZER_PROBE = "def f(x):\n    return x * 2  # Ünïcödé, 数字 and emoji 🙂"


def check_same_tokenizer(target: Any, draft: Any, draft_name: str) -> None:
    """Speculative decoding compares token ids, so both models must map text to the same ids."""
    same = (
        target.vocab_size == draft.vocab_size
        and set(target.eos_token_ids) == set(draft.eos_token_ids)
        and target.tokenizer.encode(_TOKENIZER_PROBE) == draft.tokenizer.encode(_TOKENIZER_PROBE)
    )
    if not same:
        raise ConfigError(
            f"decoder.draft_model={draft_name!r} is invalid: its tokenizer differs from the target model "
            f"{getattr(target, 'name', '?')!r}'s (speculative decoding needs identical token ids)"
        )


# --- running ----------------------------------------------------------------------------------------


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """The sampler seed of one (prompt, sample): independent of batching, prompt count and num_samples."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # below 2**62, like the sampler's own random seeds


def plan_rows(num_prompts: int, num_samples: int, seed: int) -> list[Row]:
    """Every (prompt, sample) pair, prompt-major, with its seed."""
    return [
        Row(prompt, sample, row_seed(seed, prompt, sample))
        for prompt in range(num_prompts)
        for sample in range(num_samples)
    ]


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt; with ``chat_template`` and a tokenizer that has one, the prompt becomes a
    user turn followed by the assistant's generation prompt (what instruct models are trained on)."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
            )
            for prompt in prompts
        ]
        return [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    return [list(tokenizer.encode(prompt.text)) for prompt in prompts]


def decode_texts(tokenizer: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Text of each generated sequence, special tokens dropped."""
    return [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in token_ids]


def generate_rows(
    decoder: Decoder,
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[Row],
    spec: JobSpec,
    progress: Callable[[int], None] | None = None,
) -> GenerationOutput:
    """Generate every row in batches of ``spec.batch_size``; ``progress(n)`` after each batch of n rows."""
    outputs = []
    for start in range(0, len(rows), spec.batch_size):
        batch = rows[start : start + spec.batch_size]
        outputs.append(
            decoder.generate(
                model,
                [prompt_ids[row.prompt_index] for row in batch],
                spec.sampling,
                spec.max_new_tokens,
                row_seeds=[row.seed for row in batch],
            )
        )
        if progress is not None:
            progress(len(batch))
    return merge_outputs(outputs)


def run_job(spec: JobSpec, progress_factory: Callable[[int, str], Any] | None = None) -> JobResult:
    """Load the model(s), generate every (prompt, sample), decode the texts and compute the metrics.

    Non-autoregressive decoders are timed against the autoregressive decoder on the same rows, config
    and seeds, in this process, so the speedup compares like with like. Both are warmed up first.
    ``progress_factory(total, description)`` returns a tqdm-like object with ``update(n)`` and ``close()``.
    """
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    model = load_model(spec.model)
    decoder = build_decoder(spec.decoder, model)
    timings["load_seconds"] = time.perf_counter() - tick

    prompt_ids = encode_prompts(model.tokenizer, spec.prompts, spec.chat_template)
    rows = plan_rows(len(spec.prompts), spec.num_samples, spec.seed)
    decoders = {"decoder": decoder}
    if not isinstance(decoder, AutoregressiveDecoder):
        decoders = {"baseline": AutoregressiveDecoder(), **decoders}
    outputs = _generate_timed(decoders, model, prompt_ids, rows, spec, timings, progress_factory)
    output, baseline = outputs["decoder"], outputs.get("baseline")

    tick = time.perf_counter()
    texts = decode_texts(model.tokenizer, output.token_ids)
    metrics = all_metrics(output, texts, baseline.total_seconds if baseline else None, seed=spec.seed)
    timings["metrics_seconds"] = time.perf_counter() - tick
    return JobResult(
        output=output,
        rows=rows,
        prompt_ids=prompt_ids,
        texts=texts,
        metrics=metrics,
        timings=timings,
        device=str(model.device),
        dtype=str(getattr(model, "dtype", spec.model.get("dtype", ""))).removeprefix("torch."),
        baseline=baseline,
    )


def _generate_timed(
    decoders: Mapping[str, Decoder],
    model: CausalLM,
    prompt_ids: Sequence[list[int]],
    rows: Sequence[Row],
    spec: JobSpec,
    timings: dict[str, float],
    progress_factory: Callable[[int, str], Any] | None,
) -> dict[str, GenerationOutput]:
    """Warm up every decoder, then generate every row with each; adds their seconds to ``timings``."""
    tick = time.perf_counter()
    for warm in decoders.values():
        warm.generate(model, prompt_ids[:1], spec.sampling, _WARMUP_TOKENS, row_seeds=[rows[0].seed])
    timings["warmup_seconds"] = time.perf_counter() - tick

    outputs: dict[str, GenerationOutput] = {}
    for role, active in decoders.items():
        label = spec.decoder["name"] if role == "decoder" else "AR baseline"
        bar = progress_factory(len(rows), label) if progress_factory else None
        tick = time.perf_counter()
        outputs[role] = generate_rows(active, model, prompt_ids, rows, spec, bar.update if bar else None)
        timings[f"{role}_wall_seconds"] = time.perf_counter() - tick
        if bar:
            bar.close()
    return outputs
