"""Decoders: one file each, one shared `generate(model, prompt_ids, config, max_new_tokens, stop_ids)`."""

from sampling.decoding.autoregressive import AutoregressiveDecoder
from sampling.decoding.base import CausalLM, Decoder, GenerationOutput

__all__ = ["AutoregressiveDecoder", "CausalLM", "Decoder", "GenerationOutput"]
