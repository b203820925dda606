"""The sampling core: exact, batched, fast token sampling and decoding on top of any `CausalLM`.

Depends on torch and the standard library only.
"""

from sampling.config import ORDERS, PRESETS, SamplingConfig, get_preset
from sampling.sampler import Candidates, SampleOutput, SamplerState, TokenSampler

__all__ = [
    "ORDERS",
    "PRESETS",
    "Candidates",
    "SampleOutput",
    "SamplerState",
    "SamplingConfig",
    "TokenSampler",
    "get_preset",
]
