"""Decoders: one file each, one shared `generate(model, prompt_ids, config, max_new_tokens, options)`
(see `base.Decoder`; ``options`` is a `GenerateOptions`: seeds, stops, batching, progress)."""

from sampling.decoding.accounting import derive_rates, predicted_speedup
from sampling.decoding.autoregressive import AutoregressiveDecoder
from sampling.decoding.base import (
    CausalLM,
    Decoder,
    EarlyExitLM,
    GenerateOptions,
    GenerationOutput,
    Progress,
    left_pad,
    merge_outputs,
)
from sampling.decoding.draft_verify import DraftVerifyDecoder, verify_drafts
from sampling.decoding.prompt_lookup import PromptLookupDecoder
from sampling.decoding.self_speculative import SelfSpeculativeDecoder
from sampling.decoding.speculative import SpeculativeDecoder

__all__ = [
    "AutoregressiveDecoder",
    "CausalLM",
    "Decoder",
    "DraftVerifyDecoder",
    "EarlyExitLM",
    "GenerateOptions",
    "GenerationOutput",
    "Progress",
    "PromptLookupDecoder",
    "SelfSpeculativeDecoder",
    "SpeculativeDecoder",
    "derive_rates",
    "left_pad",
    "merge_outputs",
    "predicted_speedup",
    "verify_drafts",
]
