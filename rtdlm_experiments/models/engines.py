"""Which engine runs a model: torch (any model, the dequantized weights) or llama.cpp (GGUF models only,
the quantized weights as shipped), and the llama.cpp engine's settings from a model config.

Everything here is checked without loading anything, so a bad combination fails in one line before a
model loads: ``model.engine=llamacpp`` for a model that has no GGUF file, or without the package, or with
a decoder that needs the model's hidden states (self-speculative early exit), which llama.cpp keeps inside.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rtdlm_experiments.models.spec import ModelSpec

ENGINES = ("torch", "llamacpp", "auto")
ENGINE_KEYS = ("engine", "n_threads", "n_ctx", "n_seq_max")
"""Model config keys that choose and configure the engine (not the weights)."""
INSTALL_HINT = "pip install 'rtdlm-experiments[llamacpp]' (compiles llama.cpp, ~20 min on 2 cores)"
DEFAULT_N_CTX = 2048
DEFAULT_N_SEQ_MAX = 32


def llamacpp_installed() -> bool:
    """Whether ``llama_cpp`` (llama-cpp-python) can be imported here (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


@dataclass(frozen=True)
class LlamaCppSettings:
    """One llama.cpp context: ``n_threads`` CPU threads, ``n_ctx`` cells per sequence (prompt + new
    tokens of one row), ``n_seq_max`` sequences (rows in flight, a draft-verify batch, newcomers being
    prefilled: all the rows one model serves at once)."""

    n_threads: int
    n_ctx: int = DEFAULT_N_CTX
    n_seq_max: int = DEFAULT_N_SEQ_MAX


def _positive(cfg: Mapping[str, Any], key: str, default: int) -> int:
    value = cfg.get(key)
    if value is None or value == "???":
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"model.{key}={value!r} is invalid: must be a positive integer")
    return value


def llamacpp_settings(cfg: Mapping[str, Any]) -> LlamaCppSettings:
    """The llama.cpp settings of a model config; threads default to the CPUs this process may use.

    >>> llamacpp_settings({"n_threads": 2, "n_ctx": 1024})
    LlamaCppSettings(n_threads=2, n_ctx=1024, n_seq_max=32)
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    settings = LlamaCppSettings(
        n_threads=_positive(cfg, "n_threads", cpus),
        n_ctx=_positive(cfg, "n_ctx", DEFAULT_N_CTX),
        n_seq_max=_positive(cfg, "n_seq_max", DEFAULT_N_SEQ_MAX),
    )
    if settings.n_seq_max > 256:
        raise ValueError(f"model.n_seq_max={settings.n_seq_max} is invalid: llama.cpp allows at most 256")
    return settings


def resolve_engine(
    engine: Any, spec: ModelSpec, needs_hidden_states: bool = False, installed: bool | None = None
) -> str:
    """``torch`` or ``llamacpp`` for ``model.engine`` (torch | llamacpp | auto, None meaning torch).

    ``auto`` picks llama.cpp for a GGUF model when the package is installed and the decoder does not
    need hidden states, else torch. An explicit ``llamacpp`` that cannot work raises ValueError naming
    the field.

    >>> gguf, tiny = ModelSpec("q", "gguf_parts"), ModelSpec("t", "tiny_random")
    >>> [resolve_engine("auto", gguf, installed=True), resolve_engine("auto", tiny, installed=True)]
    ['llamacpp', 'torch']
    >>> resolve_engine("auto", gguf, needs_hidden_states=True, installed=True)
    'torch'
    """
    engine = "torch" if engine is None else engine
    if engine not in ENGINES:
        raise ValueError(f"model.engine={engine!r} is invalid: must be one of {', '.join(ENGINES)}")
    if engine == "torch":
        return engine
    installed = llamacpp_installed() if installed is None else installed
    if engine == "auto":
        usable = spec.source == "gguf_parts" and installed and not needs_hidden_states
        return "llamacpp" if usable else "torch"
    if spec.source != "gguf_parts":
        raise ValueError(
            f"model.engine=llamacpp is invalid for model {spec.name!r}: llama.cpp runs GGUF models only "
            "(qwen2.5-coder-0.5b, qwen2.5-coder-1.5b, gemma-3-270m); use model.engine=torch"
        )
    if needs_hidden_states:
        raise ValueError(
            "model.engine=llamacpp is invalid with decoder=self_speculative: early exit needs the model's "
            "intermediate layers, which llama.cpp does not expose; use model.engine=torch (or auto)"
        )
    if not installed:
        raise ValueError(
            f"model.engine=llamacpp is invalid here: llama-cpp-python is not installed; {INSTALL_HINT}"
        )
    return engine
