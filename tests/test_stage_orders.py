"""Every named order is its system's real default chain, with every stage of ours that system has.

HF is checked against the installed transformers itself: its own `_get_logits_processor` builds the
processor list of a `GenerationConfig` that turns every sampling option on, and the order of the classes it
returns must be our ``hf`` order. vLLM and llama.cpp are not installed, so their chains are transcribed
here from their source, with the file and commit read:

- vLLM: ``vllm/v1/sample/sampler.py`` at commit 3e342658b2e9c85a30a54d19e64e5ad77b8a26a6 —
  `Sampler.apply_logits_processors` runs the non-argmax-invariant logits processors (min tokens, logit
  bias), then `apply_penalties` (repetition, frequency, presence); `Sampler.sample` then applies the
  temperature, the argmax-invariant processors (min-p by default), then `TopKTopPSampler` (top-k, top-p).
- llama.cpp: ``common/sampling.cpp`` at commit 3b3f5fed31ab654c4ed858b98b70df1b9855a2aa —
  `common_sampler_init` pushes the logit-bias sampler first; with ``mirostat == 0`` it then adds
  ``params.samplers`` in order, whose default is in ``common/common.h`` at commit
  001d906a6d86e2490e394361e7cc6f478b100088 (`common_params_sampling::samplers`); with ``mirostat == 2`` it
  adds temperature and mirostat v2 instead.
"""

from __future__ import annotations

import pytest

from sampling import SamplingConfig
from sampling.config import ORDERS, STAGE_NAMES

HF_CLASS_STAGE = {
    "SequenceBiasLogitsProcessor": "logit_bias",
    "RepetitionPenaltyLogitsProcessor": "penalties",
    "NoRepeatNGramLogitsProcessor": "no_repeat_ngram",
    "TemperatureLogitsWarper": "temperature",
    "TopKLogitsWarper": "top_k",
    "TopPLogitsWarper": "top_p",
    "MinPLogitsWarper": "min_p",
    "TypicalLogitsWarper": "typical_p",
    "EpsilonLogitsWarper": "epsilon",
    "EtaLogitsWarper": "eta",
}
"""Which of our stages each HF processor class is (a name map, not an order)."""
HF_CLASSES_WE_LACK = {"TopHLogitsWarper"}
"""HF processors with no stage of ours (top-H, added in transformers 4.57)."""

HF_EVERY_SAMPLING_OPTION = {
    "do_sample": True,
    "sequence_bias": {(5,): 1.0},
    "repetition_penalty": 1.2,
    "no_repeat_ngram_size": 2,
    "temperature": 0.7,
    "top_h": 0.5,
    "top_k": 10,
    "top_p": 0.9,
    "min_p": 0.1,
    "typical_p": 0.9,
    "epsilon_cutoff": 0.01,
    "eta_cutoff": 0.01,
}

VLLM_SAMPLER = ("logit_bias", "penalties", "temperature", "min_p", "top_k", "top_p")
"""vllm/v1/sample/sampler.py @ 3e342658 (see the module docstring): min tokens (no stage of ours), logit
bias, penalties, temperature, min-p, top-k, top-p."""

LLAMACPP_STAGE = {
    "COMMON_SAMPLER_TYPE_PENALTIES": "penalties",
    "COMMON_SAMPLER_TYPE_DRY": "dry",
    "COMMON_SAMPLER_TYPE_TOP_N_SIGMA": "top_n_sigma",
    "COMMON_SAMPLER_TYPE_TOP_K": "top_k",
    "COMMON_SAMPLER_TYPE_TYPICAL_P": "typical_p",
    "COMMON_SAMPLER_TYPE_TOP_P": "top_p",
    "COMMON_SAMPLER_TYPE_MIN_P": "min_p",
    "COMMON_SAMPLER_TYPE_XTC": "xtc",
    "COMMON_SAMPLER_TYPE_TEMPERATURE": "temperature",
}
LLAMACPP_DEFAULT_SAMPLERS = (
    *("COMMON_SAMPLER_TYPE_PENALTIES", "COMMON_SAMPLER_TYPE_DRY", "COMMON_SAMPLER_TYPE_TOP_N_SIGMA"),
    *("COMMON_SAMPLER_TYPE_TOP_K", "COMMON_SAMPLER_TYPE_TYPICAL_P", "COMMON_SAMPLER_TYPE_TOP_P"),
    *("COMMON_SAMPLER_TYPE_MIN_P", "COMMON_SAMPLER_TYPE_XTC", "COMMON_SAMPLER_TYPE_TEMPERATURE"),
)
"""`common_params_sampling::samplers` in common/common.h @ 001d906a, verbatim enum names."""


def test_hf_order_is_the_processor_list_transformers_builds():
    pytest.importorskip("transformers")
    from transformers import GenerationConfig

    from rtdlm_experiments.models import build_tiny_random

    model = build_tiny_random()
    config = GenerationConfig(**HF_EVERY_SAMPLING_OPTION)
    processors = model._get_logits_processor(generation_config=config, input_ids_seq_length=3, device="cpu")
    names = [type(processor).__name__ for processor in processors]
    assert set(names) - set(HF_CLASS_STAGE) == HF_CLASSES_WE_LACK  # every other processor is a stage of ours
    assert tuple(HF_CLASS_STAGE[name] for name in names if name in HF_CLASS_STAGE) == ORDERS["hf"]


def test_hf_order_accepts_every_hf_option_together():
    config = SamplingConfig(
        logit_bias={5: 1.0},
        repetition_penalty=1.2,
        no_repeat_ngram_size=3,
        temperature=0.7,
        top_k=10,
        top_p=0.9,
        min_p=0.1,
        typical_p=0.9,
        epsilon_cutoff=0.01,
        eta_cutoff=0.01,
        order="hf",
    )
    assert config.stages == ORDERS["hf"]


def test_vllm_order_is_its_sampler():
    assert ORDERS["vllm"] == VLLM_SAMPLER


def test_llamacpp_orders_are_common_sampler_init():
    assert ORDERS["llamacpp"] == ("logit_bias", *(LLAMACPP_STAGE[name] for name in LLAMACPP_DEFAULT_SAMPLERS))
    assert ORDERS["llamacpp_mirostat"] == ("logit_bias", "temperature", "mirostat")
    with pytest.raises(ValueError, match=r"\['mirostat'\] are not in it"):
        SamplingConfig(mirostat=2, order="llamacpp")
    assert SamplingConfig(mirostat=2, temperature=0.8, order="llamacpp_mirostat").stages == (
        "temperature",
        "mirostat",
    )


def test_rtdlm_holds_every_stage_once_and_mirostat_last():
    assert sorted(ORDERS["rtdlm"]) == sorted(STAGE_NAMES) and ORDERS["rtdlm"][-1] == "mirostat"
    for order in ORDERS.values():
        assert len(set(order)) == len(order) and set(order) <= set(STAGE_NAMES)
