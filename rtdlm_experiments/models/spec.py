"""What a model is made of: the `ModelSpec` record, and the error when real weights cannot be prepared."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SourceKind = Literal["gguf_parts", "tiny_random", "local"]


class ModelPreparationError(RuntimeError):
    """A real model could not be prepared: part packages missing, or the joined file is corrupt."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to build it; hashable, so it keys the per-process model cache.

    ``source`` picks the loader: ``gguf_parts`` joins ``packages`` (one GGUF part each, under ``data/``),
    ``tiny_random`` builds a seeded Qwen2-architecture model in-process, ``local`` loads an HF directory.
    """

    name: str
    source: SourceKind
    packages: tuple[str, ...] = ()
    package_version: str | None = None
    pip_requirement: str | None = None
    """What to ``pip install`` when parts are missing, if not the parts themselves (e.g. a meta package)."""
    sha256: str | None = None
    size: int | None = None
    gguf_filename: str = "model.gguf"
    path: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    seed: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()
    """Stop tokens the GGUF metadata drops but the upstream generation_config lists."""
    license: str = ""
    description: str = ""
