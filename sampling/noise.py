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
_U64 = (1 << 64) - 1
_PYTHON_KEYS_MAX = 64


def _xor_shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``z ^= z >>> bits`` (logical shift) in place."""
    return z.bitwise_xor_((z >> bits).bitwise_and_((1 << (64 - bits)) - 1))


def mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer: a bijective, well-avalanched hash of int64 values (returns a new tensor)."""
    z = _xor_shift_right(z.clone(), 30).mul_(_MUL1)
    z = _xor_shift_right(z, 27).mul_(_MUL2)
    return _xor_shift_right(z, 31)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """One int64 key per row from its seed, step counter and a stream ``salt`` (all [B] or scalars).

    SplitMix64 of a Weyl sequence, the generator's own construction: keys of nearby (seed, step)
    pairs are unrelated. Small batches are hashed with Python integers (same bits, a tenth of the
    time: each tensor op costs microseconds of dispatch on one element).
    """
    seeds, steps = torch.broadcast_tensors(seeds.long(), steps.long())
    if seeds.numel() > _PYTHON_KEYS_MAX:
        return mix64(mix64(seeds * _GOLDEN + salt).add_(steps * _GOLDEN))
    keys = [
        _mix64_int((_mix64_int((seed * _GOLDEN + salt) & _U64) + step * _GOLDEN) & _U64)
        for seed, step in zip(seeds.flatten().tolist(), steps.flatten().tolist(), strict=True)
    ]
    return torch.tensor([_as_int64(k) for k in keys], dtype=torch.long, device=seeds.device).view(seeds.shape)


def _mix64_int(z: int) -> int:
    z = ((z ^ (z >> 30)) * _MUL1) & _U64
    z = ((z ^ (z >> 27)) * _MUL2) & _U64
    return z ^ (z >> 31)


def uniform(keys: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float64 uniforms in (0, 1): one per row (``ids`` None) or one per (row, id) for ids ``[B, N]``."""
    hashed = mix64(keys if ids is None else (ids.long() * _GOLDEN).bitwise_xor_(keys.unsqueeze(-1)))
    return ((hashed >> 11).bitwise_and_(_MASK53).double().add_(0.5)).mul_(2.0**-53)


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
    log_exp_noise = uniform(keys, ids).log_().neg_().log_()
    return torch.argmax(log_weights.double() - log_exp_noise, dim=-1)
