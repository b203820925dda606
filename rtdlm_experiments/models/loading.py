"""Loading a model once per process: one loader per ``ModelSpec.source``, and the cache in front of them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from rtdlm_experiments.models.gguf import prepare_gguf_model
from rtdlm_experiments.models.hf_adapter import HFCausalLM
from rtdlm_experiments.models.hf_dir import check_local_dir, load_hf_dir
from rtdlm_experiments.models.registry import resolve_model_config
from rtdlm_experiments.models.spec import ModelSpec, SourceKind
from rtdlm_experiments.models.tiny import ByteTokenizer, build_tiny_random

logger = logging.getLogger(__name__)

Loaded = tuple[torch.nn.Module, Any, tuple[int, ...] | None]
"""A loader's result: the HF model (in dtype, on device), its tokenizer or None, and the stop tokens
(None: take them from the model's own configs)."""

_LOADED: dict[tuple[ModelSpec, torch.dtype, torch.device], HFCausalLM] = {}


def clear_model_cache() -> None:
    """Forget every model loaded in this process (frees their memory once no one else holds them)."""
    _LOADED.clear()


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


def load_model(
    name_or_config: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> HFCausalLM:
    """The model named by a registry name, a `ModelSpec` or a model config mapping, as an `HFCausalLM`.

    ``dtype`` (float32 | bfloat16) and ``device`` (auto | cpu | cuda) default to the mapping's entries,
    else float32 and auto. Loaded models are cached per process by (spec, dtype, device), so a sweep
    reuses them; `clear_model_cache` drops them.
    """
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
