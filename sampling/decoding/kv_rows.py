"""Row and column edits of a layered KV cache: what refill batching needs beyond the `CausalLM` protocol.

The protocol treats a cache as opaque; these edits work on the layout transformers' ``DynamicCache``
uses (and any cache shaped like it, without importing transformers): ``cache.layers``, each layer holding
``keys`` and ``values`` tensors ``[batch, heads, positions, head_dim]``. Sliding-window layers (which
keep only the last positions) are not editable this way; `row_editable` says whether a cache qualifies,
and the decoder falls back to static batching when it does not.

A cache object that edits its own rows (an engine whose KV cache lives elsewhere, e.g. llama.cpp's
sequences) opts in by having the three methods ``select_rows``, ``drop_leading_columns`` and
``append_rows`` with the semantics below; each function here then calls the method instead.

Every edit keeps the cache rectangular: rows are added or removed whole, and columns are added (zeros)
or removed (a prefix) for every row at once. The attention mask says which columns a row attends to, so
zero columns and columns left behind by other rows are never seen.
"""

from __future__ import annotations

from typing import Any

import torch


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", None) or [])


_ROW_EDIT_METHODS = ("select_rows", "drop_leading_columns", "append_rows")


def _edits_itself(cache: Any) -> bool:
    return all(callable(getattr(cache, name, None)) for name in _ROW_EDIT_METHODS)


def row_editable(cache: Any) -> bool:
    """Whether ``cache`` edits its own rows, or has the layered ``keys``/``values`` layout (every layer
    filled, none sliding)."""
    if _edits_itself(cache):
        return True
    layers = _layers(cache)
    return bool(layers) and all(
        isinstance(getattr(layer, "keys", None), torch.Tensor)
        and isinstance(getattr(layer, "values", None), torch.Tensor)
        and layer.keys.dim() == 4
        and not getattr(layer, "is_sliding", False)
        for layer in layers
    )


def select_rows(cache: Any, rows: torch.Tensor) -> None:
    """Keep only batch rows ``rows`` (indices, in that order), in every layer, in place."""
    if _edits_itself(cache):
        return cache.select_rows(rows)
    for layer in _layers(cache):
        layer.keys = layer.keys[rows.to(layer.keys.device)]
        layer.values = layer.values[rows.to(layer.values.device)]


def drop_leading_columns(cache: Any, count: int) -> None:
    """Remove the first ``count`` positions of every row, in every layer, in place."""
    if count <= 0:
        return
    if _edits_itself(cache):
        return cache.drop_leading_columns(count)
    for layer in _layers(cache):
        layer.keys = layer.keys[:, :, count:]
        layer.values = layer.values[:, :, count:]


def append_rows(cache: Any, other: Any) -> None:
    """Append ``other``'s rows after ``cache``'s, in place; the narrower of the two is padded on the left
    with zero positions so both end in the same last column (as left padding does for prompts)."""
    if _edits_itself(cache):
        return cache.append_rows(other)
    for layer, extra in zip(_layers(cache), _layers(other), strict=True):
        layer.keys = _cat_right_aligned(layer.keys, extra.keys)
        layer.values = _cat_right_aligned(layer.values, extra.values)


def _cat_right_aligned(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``[B1, H, L1, D]`` and ``[B2, H, L2, D]`` → ``[B1 + B2, H, max(L1, L2), D]``, right-aligned.

    >>> a, b = torch.ones(1, 1, 3, 1), 2 * torch.ones(2, 1, 1, 1)
    >>> _cat_right_aligned(a, b)[:, 0, :, 0].tolist()
    [[1.0, 1.0, 1.0], [0.0, 0.0, 2.0], [0.0, 0.0, 2.0]]
    """
    width = max(first.shape[2], second.shape[2])
    return torch.cat([_pad_left(first, width), _pad_left(second, width)], dim=0)


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[2]
    if missing == 0:
        return tensor
    return torch.nn.functional.pad(tensor, (0, 0, missing, 0))
