"""One experiment job: composed config → validated spec → model + decoder → generations → metrics.

Everything here is computation; saving and logging the result is `rtdlm_experiments.tracking`'s job.
`prepare_job` checks every value before anything heavy happens, so a bad override fails in a second
with one line naming the field.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rtdlm_experiments.prompt_sets import Prompt, load_prompts
from rtdlm_experiments.schema import ConfigError
from sampling import SamplingConfig, decoding, get_preset
from sampling.decoding.base import CausalLM, Decoder, GenerationOutput, merge_outputs

TRACKING_BACKENDS = ("mlflow", "none")

_DECODER_CLASSES: dict[str, str] = {
    "autoregressive": "AutoregressiveDecoder",
    "speculative": "SpeculativeDecoder",
    "self_speculative": "SelfSpeculativeDecoder",
    "prompt_lookup": "PromptLookupDecoder",
}
"""Decoder config name → class in `sampling.decoding`, looked up only when chosen."""

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
    """What a job computed; `rtdlm_experiments.tracking` turns it into files and MLflow entries."""

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
    """Range checks of a ``decoder`` config that need no model (the schema already checked types)."""
    name = cfg["name"]
    if name not in _DECODER_CLASSES:
        raise ConfigError(f"decoder.name={name!r} is invalid: must be one of {sorted(_DECODER_CLASSES)}")
    for key in ("num_draft_tokens", "max_ngram", "exit_layer"):
        if key in cfg and cfg[key] < 1:
            raise ConfigError(f"decoder.{key}={cfg[key]} is invalid: must be >= 1")
    if name == "speculative":
        _validate_model(cfg["draft_model"], field_name="decoder.draft_model")


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
    from rtdlm_experiments.models import ModelPreparationError, validate_model_config

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


def config_hash(config: Mapping[str, Any]) -> str:
    """Stable short hash of what determines a job's generations (everything but where it is logged).

    Two jobs with the same hash produce the same results, which is what resuming a sweep keys on.
    """
    relevant = {key: value for key, value in config.items() if key not in ("tracking", "experiment_name")}
    canonical = repr(sorted(_flatten(relevant).items()))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def flatten_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists stay values)."""
    return _flatten(config)


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


# --- building ---------------------------------------------------------------------------------------


def build_decoder(
    cfg: Mapping[str, Any], target: CausalLM, load_model: Callable[..., Any] | None = None
) -> Decoder:
    """The decoder named by a ``decoder`` config, for ``target``.

    The class is looked up in `sampling.decoding` only when chosen, so a decoder that is not
    implemented yet fails only the jobs that ask for it. A speculative draft model is loaded with
    ``load_model`` (default: `rtdlm_experiments.models.load_model`) and must share the target's tokenizer.
    """
    validate_decoder_config(cfg)
    name = cfg["name"]
    decoder_class = getattr(decoding, _DECODER_CLASSES[name], None)
    if decoder_class is None:
        raise ConfigError(
            f"decoder={name} is not available: sampling.decoding has no {_DECODER_CLASSES[name]}"
        )
    if name == "autoregressive":
        return decoder_class()
    if name == "speculative":
        if load_model is None:
            from rtdlm_experiments.models import load_model
        draft = load_model(cfg["draft_model"], **_placement(target))
        check_same_tokenizer(target, draft, draft_name=cfg["draft_model"])
        return decoder_class(draft, num_draft_tokens=cfg["num_draft_tokens"], adaptive=cfg["adaptive"])
    if name == "self_speculative":
        if cfg["exit_layer"] >= target.num_layers:
            raise ConfigError(
                f"decoder.exit_layer={cfg['exit_layer']} is invalid: "
                f"must be < the model's {target.num_layers} layers"
            )
        return decoder_class(exit_layer=cfg["exit_layer"], num_draft_tokens=cfg["num_draft_tokens"])
    return decoder_class(max_ngram=cfg["max_ngram"], num_draft_tokens=cfg["num_draft_tokens"])


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
    from rtdlm_experiments.metrics import all_metrics
    from rtdlm_experiments.models import load_model
    from sampling.decoding import AutoregressiveDecoder

    timings: dict[str, float] = {}
    tick = time.perf_counter()
    model = load_model(spec.model)
    decoder = build_decoder(spec.decoder, model, load_model)
    timings["load_seconds"] = time.perf_counter() - tick

    prompt_ids = encode_prompts(model.tokenizer, spec.prompts, spec.chat_template)
    rows = plan_rows(len(spec.prompts), spec.num_samples, spec.seed)
    decoders = {"decoder": decoder}
    if spec.decoder["name"] != "autoregressive":
        decoders = {"baseline": AutoregressiveDecoder(), **decoders}

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


# --- records (what tracking saves) ------------------------------------------------------------------


@dataclass(frozen=True)
class JobMeta:
    """Where a job sits in its run or sweep (from Hydra's runtime config)."""

    run_name: str
    overrides: list[str]
    num: int
    output_dir: str
    sweep_dir: str | None
    started_at_ms: int


_VERSIONED_PACKAGES = ("torch", "transformers", "mlflow", "hydra-core", "omegaconf", "rtdlm-experiments")


@functools.cache
def environment_info() -> dict[str, Any]:
    """Python and package versions and, from a source checkout, the git commit (``dirty`` when the
    working tree has uncommitted changes)."""
    versions = {"python": platform.python_version()}
    for package in _VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions,
        "hostname": platform.node(),
        **_git_state(Path(__file__).resolve().parents[1]),
    }


def _git_state(checkout: Path) -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    if not (checkout / ".git").exists():
        return {"git_sha": None, "git_dirty": None}
    try:
        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def job_record(
    config: dict[str, Any], result: JobResult, job: JobMeta, tracking_uri: str | None
) -> dict[str, Any]:
    """Everything ``results.json`` holds about a completed job."""
    return _record(config, job, tracking_uri, status="COMPLETED") | {
        "num_prompts": len(result.prompt_ids),
        "metrics": result.metrics,
        "timings": result.timings,
        "decoder_stats": result.output.stats,
        "environment": {**environment_info(), "device": result.device, "dtype": result.dtype},
    }


def failure_record(
    config: dict[str, Any], job: JobMeta, error: BaseException, tracking_uri: str | None
) -> dict[str, Any]:
    """``results.json`` of a job that raised: its config and the error, so the failure is tracked too."""
    return _record(config, job, tracking_uri, status="FAILED") | {"error": f"{type(error).__name__}: {error}"}


def reused_record(
    config: dict[str, Any], job: JobMeta, tracking_uri: str | None, finished: Mapping[str, Any]
) -> dict[str, Any]:
    """``results.json`` of a job a resumed sweep did not rerun: it FINISHED in an earlier attempt as run
    ``finished["run_id"]``, which holds its generations. Its metrics are copied so that the sweep's
    summary covers every job."""
    return _record(config, job, tracking_uri, status="COMPLETED") | {
        "metrics": dict(finished["metrics"]),
        "reused_run_id": finished["run_id"],
    }


def _record(config: dict[str, Any], job: JobMeta, tracking_uri: str | None, status: str) -> dict[str, Any]:
    return {
        "status": status,
        "config": config,
        "config_hash": config_hash(config),
        "metrics": {},
        "job": asdict(job),
        "ended_at_ms": int(time.time() * 1000),
        "environment": environment_info(),
        "tracking_uri": tracking_uri,
    }


def generation_records(spec: JobSpec, result: JobResult) -> list[dict[str, Any]]:
    """One ``generations.jsonl`` row per generated sequence, with its per-sample statistics."""
    output = result.output
    records = []
    for index, row in enumerate(result.rows):
        prompt = spec.prompts[row.prompt_index]
        logprobs = output.model_logprobs[index] if output.model_logprobs else []
        entropies = output.entropies[index] if output.entropies else []
        records.append(
            {
                "prompt_index": row.prompt_index,
                "sample_index": row.sample_index,
                "seed": row.seed,
                "category": prompt.category,
                "prompt": prompt.text,
                "output": result.texts[index],
                "prompt_tokens": len(result.prompt_ids[row.prompt_index]),
                "new_tokens": len(output.token_ids[index]),
                "finished_by_stop": bool(output.finished_by_stop[index]) if output.finished_by_stop else None,
                "mean_logprob": _mean(logprobs),
                "mean_entropy": _mean(entropies),
                "token_ids": output.token_ids[index],
            }
        )
    return records


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None
