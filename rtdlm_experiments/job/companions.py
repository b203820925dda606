"""Second models loaded beside a job's model: a speculative decoder's draft, a judge. Both read the job
model's token ids, so they must share its tokenizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.models import load_model

_TOKENIZER_PROBE = "def f(x):\n    return x * 2  # Ünïcödé, 数字 and emoji 🙂"
_WHY_SAME_TOKENIZER = {
    "decoder.draft_model": "speculative decoding needs identical token ids",
    "judge.model": "the judge scores the job's token ids",
}


def placement(model: Any) -> dict[str, str]:
    """dtype/device (and engine) keyword arguments that put a second model where ``model`` is."""
    where: dict[str, Any] = {"device": str(model.device)}
    if dtype := getattr(model, "dtype", None):
        where["dtype"] = str(dtype).removeprefix("torch.")
    if engine := getattr(model, "engine", None):
        where["engine"] = engine  # a llama.cpp target gets a llama.cpp draft, with its settings
    if settings := getattr(model, "settings", None):
        where["llamacpp"] = settings
    return where


def check_same_tokenizer(
    target: Any, draft: Any, draft_name: str, field_name: str = "decoder.draft_model"
) -> None:
    """Raise a ConfigError naming ``field_name`` unless ``draft`` maps text to the same ids as ``target``."""
    same = (
        target.vocab_size == draft.vocab_size
        and set(target.eos_token_ids) == set(draft.eos_token_ids)
        and target.tokenizer.encode(_TOKENIZER_PROBE) == draft.tokenizer.encode(_TOKENIZER_PROBE)
    )
    if not same:
        why = _WHY_SAME_TOKENIZER.get(field_name, "it must read the same token ids")
        raise ConfigError(
            f"{field_name}={draft_name!r} is invalid: its tokenizer differs from the target model "
            f"{getattr(target, 'name', '?')!r}'s ({why})"
        )


def load_companion(
    name: Any,
    target: Any,
    load: Callable[..., Any] = load_model,
    field_name: str = "decoder.draft_model",
) -> Any:
    """Model ``name`` (a model config name or mapping) loaded by ``load`` where ``target`` is, checked to
    share its tokenizer."""
    model = load(name, **placement(target))
    label = name.get("name", "?") if isinstance(name, Mapping) else name
    check_same_tokenizer(target, model, draft_name=label, field_name=field_name)
    return model
