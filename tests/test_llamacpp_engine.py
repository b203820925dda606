"""The llama.cpp engine on real weights (qwen2.5-coder-0.5b Q4_K_M, the smallest model we ship).

Exactness is the sampler's: each decoder on this engine must draw continuations distributed as the
`TokenSampler`'s ``distribution()`` of this engine's own logits (chi-square against the enumerated joint,
with a broken twin the same test rejects). Batch invariance and determinism of the engine are tested
directly; agreement with the torch engine is measured in `benchmarks/bench_engines.py`, not asserted.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import sampling.decoding.draft_verify as draft_verify
from rtdlm_experiments.models import load_model
from rtdlm_experiments.models.engines import LlamaCppSettings, llamacpp_installed
from rtdlm_experiments.models.llamacpp import LlamaCppCausalLM
from rtdlm_experiments.models.llamacpp_cache import LlamaCppCache
from sampling import SamplingConfig, TokenSampler, get_preset
from sampling.decoding import AutoregressiveDecoder, PromptLookupDecoder, SpeculativeDecoder
from sampling.decoding.base import GenerateOptions
from tests.test_speculative import joint_p_value, resample_from_target_on_rejection

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(not llamacpp_installed(), reason="llama-cpp-python is not installed"),
]

NAME = "qwen2.5-coder-0.5b"
DRAWS = int(os.environ.get("RTDLM_LLAMACPP_DRAWS", "800"))
VERIFY_DRAWS = int(os.environ.get("RTDLM_LLAMACPP_VERIFY_DRAWS", "256"))
LENGTH = 2
CONFIG = SamplingConfig(temperature=1.6, top_k=4)  # at most 4 tokens per step: 4 + 16 cells to enumerate
TEXTS = ("def add(a, b):\n    return", "The capital of France is", "x = [1, 2, 3]\nfor i in x:\n    print(")


@pytest.fixture(scope="module")
def model():
    return load_model(
        NAME, engine="llamacpp", llamacpp=LlamaCppSettings(n_threads=1, n_ctx=256, n_seq_max=32)
    )


@pytest.fixture(scope="module")
def draft():
    """The same weights in a second llama.cpp context, logits perturbed: a draft that is often accepted
    and often rejected (the 0.5B is our smallest model; a real pair would need the 1.5B as target).
    Scale 0.3: after "Hello" q overlaps p by ~0.5, where resampling from p after a rejection is furthest
    from exact (noncentrality ~60 at 256 draws; at scale 1.5 it was ~5 and that twin passed)."""
    other = load_model(
        NAME, engine="llamacpp", llamacpp=LlamaCppSettings(n_threads=1, n_ctx=256, n_seq_max=32)
    )
    return PerturbedDraft(other, scale=0.3)


class PerturbedDraft:
    """A `CausalLM` delegating to a llama.cpp model, with a fixed random offset added to its logits."""

    def __init__(self, inner, scale: float) -> None:
        self.inner = inner
        self.offset = scale * torch.randn(inner.vocab_size, generator=torch.Generator().manual_seed(3))
        for attribute in ("num_layers", "vocab_size", "eos_token_ids", "max_context", "device", "tokenizer"):
            setattr(self, attribute, getattr(inner, attribute))

    def new_cache(self):
        return self.inner.new_cache()

    def forward(self, input_ids, cache, attention_mask=None, last_positions=None):
        return self.inner.forward(input_ids, cache, attention_mask, last_positions) + self.offset

    def cache_length(self, cache) -> int:
        return self.inner.cache_length(cache)

    def crop_cache(self, cache, length: int) -> None:
        self.inner.crop_cache(cache, length)


def encode(model, text: str) -> list[int]:
    return list(model.tokenizer.encode(text, add_special_tokens=False))


def exact_joint(model, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """P(continuation) under autoregressive sampling with CONFIG, from the engine's own logits."""
    sampler, joint = TokenSampler(CONFIG), {(): 1.0}
    for _ in range(length):
        prefixes = list(joint)
        ids = torch.tensor([prompt + list(p) for p in prefixes])
        logits = model.forward(ids, model.new_cache(), last_positions=1)[:, -1]
        probs = sampler.distribution(logits, ids, generated=ids[:, len(prompt) :]).double().numpy()
        joint = {
            p + (int(t),): joint[p] * probs[i, t]
            for i, p in enumerate(prefixes)
            for t in np.flatnonzero(probs[i] > 0)
        }
    return joint


def draw(decoder, model, prompts: list[list[int]]) -> list[list[int]]:
    """DRAWS continuations, cycling through ``prompts`` (rows of different lengths share a batch)."""
    rows = [prompts[i % len(prompts)] for i in range(DRAWS)]
    options = GenerateOptions(row_seeds=range(DRAWS), ignore_eos=True, max_batch_size=32)
    out = decoder.generate(model, rows, CONFIG, LENGTH, options)
    assert all(len(ids) == LENGTH for ids in out.token_ids)
    return out.token_ids


def p_values(model, prompts: list[list[int]], tokens: list[list[int]]) -> list[float]:
    """Per prompt: the chi-square p-value of its rows' draws against its exact joint."""
    every = len(prompts)
    return [
        joint_p_value(tokens[i::every], exact_joint(model, prompt, LENGTH))
        for i, prompt in enumerate(prompts)
    ]


@pytest.fixture(scope="module")
def prompt(model) -> list[int]:
    return encode(model, "a b c d a b c d a b c d a b c")  # prompt lookup drafts what the model likes


@pytest.fixture(scope="module")
def short_prompt(model) -> list[int]:
    return encode(model, "Hello")  # left-padded by 14 columns next to `prompt`


@pytest.fixture(scope="module")
def lookup_prompt(model) -> list[int]:
    return encode(model, "a b a b a")  # 5 tokens: prompt lookup drafts from the first round on


def test_autoregressive_refill_draws_the_samplers_distribution(model, prompt, short_prompt):
    prompts = [prompt, short_prompt]
    assert min(p_values(model, prompts, draw(AutoregressiveDecoder(), model, prompts))) > 1e-3


def test_the_same_test_rejects_padding_fed_as_tokens(model, prompt, short_prompt, monkeypatch):
    """Broken twin of the engine: left-padding columns go to llama.cpp as real tokens, so a short row
    reads pad tokens before its prompt."""

    def everything_real(mask, batch, width):
        return torch.ones(batch, width, dtype=torch.long)

    def forget_columns(self, count):  # the padding columns now hold tokens: just stop tracking them
        self.real = self.real[:, count:]

    monkeypatch.setattr(LlamaCppCausalLM, "_full_mask", staticmethod(everything_real))
    monkeypatch.setattr(LlamaCppCache, "drop_leading_columns", forget_columns)
    tokens = draw(AutoregressiveDecoder(), model, [prompt, short_prompt])
    assert rejected(tokens[1::2], exact_joint(model, short_prompt, LENGTH))


def rejected(tokens: list[list[int]], joint: dict[tuple[int, ...], float]) -> bool:
    """Whether the chi-square test rejects ``tokens`` (a continuation of probability 0 rejects at once)."""
    try:
        return joint_p_value(tokens, joint) < 1e-3
    except AssertionError:
        return True


def draft_verify_decoders(draft, gamma: int) -> dict:
    return {
        "speculative": SpeculativeDecoder(draft, num_draft_tokens=gamma, policy="constant"),
        "prompt_lookup": PromptLookupDecoder(max_ngram=2, num_draft_tokens=gamma, policy="constant"),
    }


@pytest.mark.parametrize("batch_size", [1, 3])
def test_greedy_draft_verify_gives_the_autoregressive_tokens(model, draft, prompt, batch_size):
    """Deterministic check of the cache under rollback: greedy drafts (often rejected: a strongly perturbed
    draft) cropped, holes left by rows that kept fewer drafts, rows of different lengths; every decoder
    must emit the token ids greedy autoregressive decoding emits on this engine."""
    prompts = [prompt] + [encode(model, text) for text in TEXTS[:2]]
    greedy, length = SamplingConfig(temperature=0.0), 10
    options = GenerateOptions(ignore_eos=True, max_batch_size=batch_size)
    reference = AutoregressiveDecoder().generate(model, prompts, greedy, length, options).token_ids
    for name, decoder in draft_verify_decoders(PerturbedDraft(draft.inner, scale=3.0), gamma=3).items():
        out = decoder.generate(model, prompts, greedy, length, options)
        assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"] > 0, name
        assert out.token_ids == reference, name


@pytest.mark.parametrize("decoder_name", ["speculative", "prompt_lookup"])
def test_draft_verify_decoders_draw_the_samplers_distribution(
    model, draft, short_prompt, lookup_prompt, decoder_name, monkeypatch
):
    """Speculative runs on "Hello" (a flat target, so the twin's bias shows), prompt lookup on a prompt it
    drafts from; batches of 32 = n_seq_max (the finished batch's sequences are reclaimed)."""
    decoder = draft_verify_decoders(draft, gamma=2)[decoder_name]
    prompt = short_prompt if decoder_name == "speculative" else lookup_prompt
    joint = exact_joint(model, prompt, LENGTH)
    options = GenerateOptions(row_seeds=range(VERIFY_DRAWS), ignore_eos=True, max_batch_size=32)
    out = decoder.generate(model, [prompt] * VERIFY_DRAWS, CONFIG, LENGTH, options)
    assert out.stats["drafted_tokens"] > out.stats["accepted_tokens"] > 0, "exercise acceptance and rejection"
    assert joint_p_value(out.token_ids, joint) > 1e-3
    monkeypatch.setattr(draft_verify, "verify_drafts", resample_from_target_on_rejection)
    broken = decoder.generate(model, [prompt] * VERIFY_DRAWS, CONFIG, LENGTH, options)
    assert rejected(broken.token_ids, joint)


def solo_and_batched_logits(model, prompts: list[list[int]], steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations' logits [rows, steps, V], each row alone and all rows in one left-padded batch
    (the batch follows the rows' own greedy tokens so both see the same inputs)."""
    solo = []
    for row in prompts:
        cache = model.new_cache()
        logits = [model.forward(torch.tensor([row]), cache, last_positions=1)[0, -1]]
        for _ in range(steps - 1):
            logits.append(model.forward(logits[-1].argmax().view(1, 1), cache)[0, -1])
        solo.append(torch.stack(logits))
    solo_logits = torch.stack(solo)
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in prompts])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts])
    cache = model.new_cache()
    batched = [model.forward(ids, cache, mask, last_positions=1)[:, -1]]
    for step in range(steps - 1):
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        batched.append(model.forward(solo_logits[:, step].argmax(-1, keepdim=True), cache, mask)[:, -1])
    return solo_logits, torch.stack(batched, dim=1)


def test_a_rows_logits_barely_depend_on_its_batch_and_runs_repeat_exactly(model, record_property):
    """llama.cpp's batched kernels do change a row's logits with its batch (not bit-exact): measured
    2026-12-06 on this VM (1 thread, qwen2.5-coder-0.5b Q4_K_M, 3 rows x 6 greedy steps), batch 1 vs 3:
    max |logit difference| 0.316 over the whole vocabulary, max total variation of softmax(logits)
    0.0148 (both printed and recorded by each run). So each row is sampled exactly from the
    logits of the batch it ran in, and those differ from its batch-1 logits by this much; the same batch
    twice is bit-identical."""
    prompts = [encode(model, text) for text in TEXTS]
    solo, batched = solo_and_batched_logits(model, prompts, steps=6)
    _, again = solo_and_batched_logits(model, prompts, steps=6)
    assert torch.equal(batched, again), "the same batch twice must give bit-identical logits"
    difference = float((solo - batched).abs().max())
    variation = float(0.5 * (solo.softmax(-1) - batched.softmax(-1)).abs().sum(-1).max())
    measured = {"max_abs_logit_difference_batch1_vs_batch3": difference, "max_total_variation": variation}
    for key, value in measured.items():
        record_property(key, value)
    print(json.dumps(measured))
    assert torch.equal(solo.argmax(-1), batched.argmax(-1))
    assert difference < 0.05 * float(solo.abs().max())
    assert variation < 0.02


def test_refill_batching_gives_each_row_its_tokens_alone(model):
    prompts = [encode(model, text) for text in TEXTS] * 2
    config = get_preset("balanced", seed=0)
    decoder, seeds = AutoregressiveDecoder(), list(range(len(prompts)))
    alone = decoder.generate(model, prompts, config, 12, GenerateOptions(row_seeds=seeds, max_batch_size=1))
    batched = GenerateOptions(row_seeds=seeds, max_batch_size=4)
    assert decoder.generate(model, prompts, config, 12, batched).token_ids == alone.token_ids


def test_the_engine_serves_the_app_config_path(model):
    assert model.vocab_size == 151936 and model.num_layers == 24
    assert set(model.eos_token_ids) >= {151645, 151643}
    assert model.engine == "llamacpp" and model.max_context == 256
