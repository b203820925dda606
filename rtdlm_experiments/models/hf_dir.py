"""Hugging Face model directories on disk: check that one is loadable, load it (safetensors only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def check_local_dir(path: Path) -> None:
    """Raise ValueError naming ``model.path`` unless ``path`` is an HF model directory with safetensors."""
    if not path.is_dir():
        raise ValueError(f"model.path={str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path={str(path)!r} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"model.path={str(path)!r} has no *.safetensors weights (only safetensors are loaded)"
        )


def load_hf_dir(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The causal LM in ``path`` on ``device`` in ``dtype``, plus its tokenizer (None if it ships none)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path,
        use_safetensors=True,
        dtype=dtype,
        trust_remote_code=False,
        local_files_only=True,
        attn_implementation="sdpa",
    )
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    return model.to(device), tokenizer
