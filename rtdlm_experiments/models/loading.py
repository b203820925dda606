"""Loading a model once per process: one loader per ``ModelSpec.source``, and the cache in front of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rtdlm_experiments.models.engines import LlamaCppSettings, llamacpp_settings
from rtdlm_experiments.models.gguf import gguf_file_for, gguf_tokenizer_dir, prepare_gguf_model
from rtdlm_experiments.models.hf_adapter import HFCausalLM
from rtdlm_experiments.models.hf_dir import check_local_dir, load_hf_dir
from rtdlm_experiments.models.registry import _config_mapping, resolve_model_config, resolve_model_engine
from rtdlm_experiments.models.spec import ModelSpec, SourceKind
from rtdlm_experiments.models.tiny import ByteTokenizer, build_tiny_random

logger = logging.getLogger(__name__)

Loaded = tuple[torch.nn.Module, Any, tuple[int, ...] | None]
"""A loader's result: the HF model (in dtype, on device), its tokenizer or None, and the stop tokens
(None: take them from the model's own configs)."""

_LOADED: dict[tuple[ModelSpec, torch.dtype, torch.device], HFCausalLM] = {}
_LOADED_LLAMACPP: dict[tuple[ModelSpec, LlamaCppSettings], Any] = {}


def clear_model_cache() -> None:
    """Forget every model loaded in this process (frees their memory once no one else holds them)."""
    _LOADED.clear()
    _LOADED_LLAMACPP.clear()


def _load_tiny_random(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> Loaded:
    sizes = (spec.num_layers or 2, spec.vocab_size or 256, spec.hidden_size or 64, spec.seed or 0)
    hf_model = build_tiny_random(*sizes).to(device=device, dtype=dtype)
    tokenizer = ByteTokenizer() if sizes[1] >= ByteTokenizer.vocab_size else None
    return hf_model, tokenizer, None


def _load_local(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> Loaded:
    path = Path(spec.path or "")
    check_local_dir(path)
    hf_model, tokenizer = load_hf_dir(path, dtype, device)
    return hf_model, tokenizer, None


def _load_gguf_parts(spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> Loaded:
    hf_model, tokenizer = load_hf_dir(prepare_gguf_model(spec), dtype, device)
    base = HFCausalLM(hf_model, tokenizer).eos_token_ids
    return hf_model, tokenizer, tuple(dict.fromkeys(base + spec.extra_eos_token_ids))


_LOADERS: dict[SourceKind, Callable[[ModelSpec, torch.dtype, torch.device], Loaded]] = {
    "gguf_parts": _load_gguf_parts,
    "tiny_random": _load_tiny_random,
    "local": _load_local,
}
"""The loader of each ``ModelSpec.source``."""


def _gguf_tokenizer(spec: ModelSpec) -> Any:
    """The HF tokenizer of a GGUF model (no weights converted): both engines encode text to the same ids."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_tokenizer_dir(spec), local_files_only=True)


def _load_llamacpp(spec: ModelSpec, settings: LlamaCppSettings) -> Any:
    from rtdlm_experiments.models.llamacpp import LlamaCppCausalLM

    key = (spec, settings)
    if key not in _LOADED_LLAMACPP:
        start = time.perf_counter()
        path = gguf_file_for(spec)
        tokenizer = _gguf_tokenizer(spec)
        model = LlamaCppCausalLM(path, settings, tokenizer, spec.name, spec.extra_eos_token_ids)
        logger.info("loaded %s on llama.cpp (%s) in %.1f s", spec.name, settings, time.perf_counter() - start)
        _LOADED_LLAMACPP[key] = model
    return _LOADED_LLAMACPP[key]


def load_model(
    name_or_config: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    engine: str | None = None,
    llamacpp: LlamaCppSettings | None = None,
) -> Any:
    """The model named by a registry name, a `ModelSpec` or a model config mapping: an `HFCausalLM`, or
    a `LlamaCppCausalLM` when the engine (``engine``, else the mapping's ``engine``: torch | llamacpp |
    auto; unset: torch) resolves to llama.cpp.

    ``dtype`` (float32 | bfloat16) and ``device`` (auto | cpu | cuda) default to the mapping's entries,
    else float32 and auto; llama.cpp ignores both (its weights are the GGUF's, on the CPU) and takes
    ``llamacpp`` settings, else the mapping's ``n_threads`` / ``n_ctx`` / ``n_seq_max``. Loaded models
    are cached per process by (spec, dtype, device) or (spec, settings), so a sweep reuses them;
    `clear_model_cache` drops them.
    """
    if resolve_model_engine(name_or_config, engine) == "llamacpp":
        spec, _, _ = resolve_model_config(name_or_config, dtype, device)
        mapping = {} if isinstance(name_or_config, ModelSpec) else _config_mapping(name_or_config)
        return _load_llamacpp(spec, llamacpp or llamacpp_settings(mapping))
    spec, torch_dtype, torch_device = resolve_model_config(name_or_config, dtype, device)
    key = (spec, torch_dtype, torch_device)
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    hf_model, tokenizer, eos = _LOADERS[spec.source](spec, torch_dtype, torch_device)
    model = HFCausalLM(hf_model, tokenizer, name=spec.name, eos_token_ids=eos)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) in %.1f s", spec.name, torch_dtype, torch_device, seconds)
    _LOADED[key] = model
    return model
