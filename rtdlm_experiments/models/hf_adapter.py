"""``HFCausalLM``: any in-memory transformers causal LM behind the `sampling.decoding.base.CausalLM` protocol,
including the early-exit split that self-speculative decoding needs."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from typing import Any

import torch

_SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _layer_types(config: Any, num_layers: int) -> list[str]:
    """Attention type per layer as the KV cache sees it (Mistral has no ``layer_types``, only a window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError, TypeError):
        return list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)


class HFCausalLM:
    """A transformers causal LM behind the `CausalLM` protocol (explicit DynamicCache, float32 logits).

    ``forward`` goes through the HF model itself; ``forward_early_exit`` / ``forward_from_layer`` drive the
    decoder layers directly (Llama-style models only) so the self-speculative draft and verifier share one
    cache: the draft fills layers ``[0, E)``, the verifier layers ``[E, L)``.
    """

    engine = "torch"

    def __init__(
        self,
        hf_model: torch.nn.Module,
        tokenizer: Any = None,
        name: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model = hf_model.eval()
        self.tokenizer = tokenizer
        config = hf_model.config
        self.config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.name = name or getattr(config, "name_or_path", None) or type(hf_model).__name__
        first = next(hf_model.parameters())
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.num_layers: int = int(self.config.num_hidden_layers)
        self.vocab_size: int = int(hf_model.get_output_embeddings().weight.shape[0])
        if eos_token_ids is None:
            generation_config = getattr(hf_model, "generation_config", None)
            candidates = (
                _as_ids(getattr(generation_config, "eos_token_id", None))
                + _as_ids(getattr(config, "eos_token_id", None))
                + _as_ids(getattr(tokenizer, "eos_token_id", None))
            )
            eos_token_ids = list(dict.fromkeys(candidates))
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        max_positions = getattr(self.config, "max_position_embeddings", None)
        self.max_context: int | None = int(max_positions) if max_positions else None
        self._layer_types = _layer_types(self.config, self.num_layers)
        self._sliding = any(t != "full_attention" for t in self._layer_types)

    def __repr__(self) -> str:
        return (
            f"HFCausalLM({self.name!r}, layers={self.num_layers}, vocab={self.vocab_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- cache ---------------------------------------------------------------------------------------

    def new_cache(self) -> Any:
        """An empty DynamicCache.

        Models with sliding-window layers get plain full-length layers (the masks still apply the window):
        transformers' sliding layers cannot be cropped once the window is full, and rollback is required.
        """
        from transformers import DynamicCache

        return DynamicCache() if self._sliding else DynamicCache(config=self.model.config)

    def _layer_length(self, cache: Any, layer: int) -> int:
        return cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0

    def cache_length(self, cache: Any) -> int:
        """Positions held by the last layer (early layers may run ahead during self-speculation)."""
        return self._layer_length(cache, self.num_layers - 1)

    def crop_cache(self, cache: Any, length: int) -> None:
        """Drop positions >= ``length`` in every layer; shorter or never-filled layers are left alone."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        for layer in cache.layers:
            held = layer.get_seq_length()
            if held > length:
                layer.crop(length - held)  # transformers 5 crops by a negative count of positions to drop

    # -- forward passes ------------------------------------------------------------------------------

    @staticmethod
    def _detach(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Results of inference_mode are "inference tensors" that callers could not update in place
        # (e.g. a sampler applying penalties); this copy outside inference mode is an ordinary tensor.
        if dtype is not None and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor.clone()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor | None = None,
        last_positions: int | None = None,
    ) -> torch.Tensor:
        """All layers on ``input_ids`` [B, T] appended to ``cache``; float32 logits [B, T, V] (or of the
        last ``last_positions`` positions only).

        With ``attention_mask`` [B, past + T] (left padding) positions are ``cumsum(mask) - 1``, so each
        padded row gets the logits it would get alone.
        """
        lengths = {self._layer_length(cache, i) for i in range(self.num_layers)}
        if len(lengths) > 1:
            raise ValueError(
                f"cache layers hold different lengths {sorted(lengths)}; crop_cache to a common length first"
            )
        input_ids = input_ids.to(self.device)
        batch, new = input_ids.shape
        past = self.cache_length(cache)
        if attention_mask is None:
            position_ids = torch.arange(past, past + new, device=self.device).unsqueeze(0).expand(batch, -1)
        else:
            attention_mask = self._check_mask(attention_mask, batch, past, new)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=last_positions or 0,
            ).logits
        return self._detach(logits, torch.float32)

    def _check_splittable(self) -> None:
        model_type = getattr(self.config, "model_type", None)
        inner = getattr(self.model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if (
            model_type not in _SPLITTABLE
            or inner is None
            or not all(hasattr(inner, p) for p in parts)
            or getattr(self.config, "use_bidirectional_attention", False)
        ):
            raise NotImplementedError(
                f"early-exit forward is implemented for Llama-style decoders {list(_SPLITTABLE)}, "
                f"not for model_type={model_type!r} ({type(self.model).__name__})"
            )

    @functools.cached_property
    def _per_type_rope(self) -> bool:
        """Gemma 3 keeps one rotary table per attention type; Llama/Qwen/Mistral share one."""
        return "layer_type" in inspect.signature(self.model.model.rotary_emb.forward).parameters

    def _check_layer(self, layer: int, what: str) -> None:
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"{what}={layer} is out of range: must be in [0, {self.num_layers}]")

    def _run_layers(
        self,
        hidden: torch.Tensor,
        cache: Any,
        start: int,
        end: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layers ``[start, end)`` on ``hidden`` (batch without padding); positions from layer ``start``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        inner = self.model.model
        new = hidden.shape[1]
        past = self._layer_length(cache, min(start, self.num_layers - 1))
        if attention_mask is None:
            position_ids = torch.arange(past, past + new, device=hidden.device).expand(hidden.shape[0], -1)
        else:
            attention_mask = self._check_mask(attention_mask, hidden.shape[0], past, new)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        masks: dict[str, Any] = {}
        embeddings: dict[str, Any] = {}
        for i in range(start, end):
            layer_type = self._layer_types[i]
            if layer_type in masks:
                continue
            full = layer_type == "full_attention"
            make_mask = create_causal_mask if full else create_sliding_window_causal_mask
            # Sized against this range's own first layer: early and late layers may hold different lengths.
            masks[layer_type] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=i,
            )
            embeddings[layer_type] = (
                inner.rotary_emb(hidden, position_ids, layer_type)
                if self._per_type_rope
                else inner.rotary_emb(hidden, position_ids)
            )
        for i in range(start, end):
            layer_type = self._layer_types[i]
            out = inner.layers[i](
                hidden,
                attention_mask=masks[layer_type],
                position_embeddings=embeddings[layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _check_mask(self, attention_mask: torch.Tensor, batch: int, past: int, new: int) -> torch.Tensor:
        attention_mask = attention_mask.to(self.device).long()
        if tuple(attention_mask.shape) != (batch, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = "
                f"{(batch, past + new)}"
            )
        return attention_mask

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.model.model.norm(hidden))
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def forward_early_exit(
        self, input_ids: torch.Tensor, cache: Any, exit_layer: int, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding + layers ``[0, exit_layer)`` + norm + head; only those layers' cache grows.

        Returns ``(logits float32 [B, T, V], hidden [B, T, H])``, ``hidden`` being the residual stream
        entering layer ``exit_layer`` (before the norm), to be finished later by `forward_from_layer`.
        ``attention_mask`` [B, past + T] (past = layer 0's cache length) allows padding and holes.
        """
        self._check_splittable()
        self._check_layer(exit_layer, "exit_layer")
        with torch.inference_mode():
            hidden = self.model.model.embed_tokens(input_ids.to(self.device))
            hidden = self._run_layers(hidden, cache, 0, exit_layer, attention_mask)
            logits = self._head(hidden)
        return self._detach(logits, torch.float32), self._detach(hidden)

    def forward_from_layer(
        self, hidden: torch.Tensor, cache: Any, start_layer: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layers ``[start_layer, L)`` + norm + head on ``hidden`` [B, T, H]; float32 logits [B, T, V].

        Positions continue from layer ``start_layer``'s cache length, which may lag the early layers';
        ``attention_mask`` then covers that layer's cached positions plus the new ones.
        """
        self._check_splittable()
        self._check_layer(start_layer, "start_layer")
        with torch.inference_mode():
            hidden = hidden.to(device=self.device, dtype=self.dtype)
            hidden = self._run_layers(hidden, cache, start_layer, self.num_layers, attention_mask)
            logits = self._head(hidden)
        return self._detach(logits, torch.float32)
