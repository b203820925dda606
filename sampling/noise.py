"""Counter-based random numbers: a pure function of (seed, step, token id, salt).

Draws keyed this way are reproducible and batch-invariant by construction: a row's randomness cannot
depend on which other rows share its batch, on its position, or on how candidates are ordered. The
mixer is SplitMix64's finalizer on int64 tensors (wrapping arithmetic, logical shifts emulated).
"""

from __future__ import annotations

import torch


def _as_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)
_MASK53 = (1 << 53) - 1


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer: a bijective, well-avalanched hash of int64 values."""
    z = (z ^ _shift_right(z, 30)) * _MUL1
    z = (z ^ _shift_right(z, 27)) * _MUL2
    return z ^ _shift_right(z, 31)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """One int64 key per row from its seed, step counter and a stream ``salt`` (all [B] or scalars)."""
    return mix64(mix64(seeds.long() * _GOLDEN + salt) + steps.long() * _GOLDEN)


def uniform(keys: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 uniforms in (0, 1): one per row (``ids`` None) or one per (row, id) for ids ``[B, N]``."""
    hashed = mix64(keys if ids is None else keys.unsqueeze(-1) ^ mix64(ids.long() + _GOLDEN))
    return (_shift_right(hashed, 11).double() + 0.5) * (2.0**-53)


def race_argmax(
    log_weights: torch.Tensor, keys: torch.Tensor, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the exponential-race winner per row: ``argmax(w_i / E_i)`` with ``E_i ~ Exp(1)``.

    Picks column i with probability ``w_i / Σ w``; works on unnormalized log-weights (``-inf`` = never).
    Noise is keyed by token id (``ids``, default the column index), so the winner does not depend on
    column order.
    """
    if ids is None:
        ids = torch.arange(log_weights.shape[-1], device=log_weights.device).expand_as(log_weights)
    log_exp_noise = torch.log(-torch.log(uniform(keys, ids)))
    return torch.argmax(log_weights.double() - log_exp_noise, dim=-1)
