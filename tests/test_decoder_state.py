"""One decoder instance serves concurrent calls: per-call state never lives on the instance.

Two threads call `generate` on the same decoder instance while a turnstile forces their model forwards
to alternate strictly (A, B, A, B, ...), so each call runs with the other one half-way through its own
rounds. Each must still produce exactly what it produces alone.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from rtdlm_experiments.models import HFCausalLM, build_tiny_random
from sampling import SamplingConfig, get_preset
from sampling.decoding import (
    AutoregressiveDecoder,
    EarlyExitLM,
    GenerateOptions,
    PromptLookupDecoder,
    SelfSpeculativeDecoder,
    SpeculativeDecoder,
)

FORWARDS = ("forward", "forward_early_exit", "forward_from_layer")


class Turnstile:
    """Lets the registered threads run model forwards one at a time, in strict rotation; a thread that
    is done leaves the rotation. Threads not registered pass freely."""

    def __init__(self, names: list[str]) -> None:
        self.order = list(names)
        self.turn = 0
        self.condition = threading.Condition()
        self.log: list[str] = []

    def _my_turn(self, name: str) -> bool:
        return self.order[self.turn % len(self.order)] == name

    def run(self, call: Any, *args: Any, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        if name not in self.order:
            return call(*args, **kwargs)
        with self.condition:
            self.condition.wait_for(lambda: self._my_turn(name), timeout=60)
            self.log.append(name)
        try:
            return call(*args, **kwargs)
        finally:
            with self.condition:
                self.turn = (self.order.index(name) + 1) % len(self.order)
                self.condition.notify_all()

    def leave(self) -> None:
        with self.condition:
            name = threading.current_thread().name
            position = self.order.index(name)
            self.order.remove(name)
            if self.order:
                self.turn = position % len(self.order)
            self.condition.notify_all()


class Gated:
    """A model whose forwards go through the turnstile; everything else is the wrapped model's."""

    def __init__(self, model: HFCausalLM, turnstile: Turnstile) -> None:
        self._model = model
        self._turnstile = turnstile

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._model, name)
        if name in FORWARDS:
            return lambda *args, **kwargs: self._turnstile.run(attribute, *args, **kwargs)
        return attribute


@pytest.fixture(scope="module")
def target(test_device) -> HFCausalLM:
    return HFCausalLM(
        build_tiny_random(num_layers=3, vocab_size=48, seed=1).to(test_device), eos_token_ids=()
    )


@pytest.fixture(scope="module")
def draft(test_device) -> HFCausalLM:
    return HFCausalLM(
        build_tiny_random(num_layers=1, vocab_size=48, seed=2).to(test_device), eos_token_ids=()
    )


CALLS = {
    "A": ([[5, 6, 7, 5, 6], [9, 1]], 12, range(0, 2)),
    "B": ([[1, 2, 3, 4, 1, 2, 3], [8], [4, 4, 4]], 9, range(10, 13)),
}
"""Two different calls: prompts, max_new_tokens, row seeds (different batch sizes and lengths)."""


def run_interleaved(decoder: Any, target: HFCausalLM, config: SamplingConfig, turnstile: Turnstile) -> dict:
    model = Gated(target, turnstile)
    results: dict[str, Any] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        prompts, max_new_tokens, seeds = CALLS[name]
        try:
            results[name] = decoder.generate(
                model, prompts, config, max_new_tokens, GenerateOptions(row_seeds=seeds)
            )
        except BaseException as error:  # re-raised in the main thread
            errors.append(error)
        finally:
            turnstile.leave()

    threads = [threading.Thread(target=work, args=(name,), name=name) for name in CALLS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    if errors:
        raise errors[0]
    return results


DECODER_NAMES = ["autoregressive", "speculative", "self_speculative", "prompt_lookup"]


def make_decoders(draft: HFCausalLM, turnstile: Turnstile) -> dict[str, Any]:
    return {
        "autoregressive": AutoregressiveDecoder(),
        "speculative": SpeculativeDecoder(Gated(draft, turnstile), num_draft_tokens=3),
        "self_speculative": SelfSpeculativeDecoder(exit_layer=1, num_draft_tokens=3),
        "prompt_lookup": PromptLookupDecoder(max_ngram=2, num_draft_tokens=3),
    }


@pytest.mark.parametrize("config", [get_preset("balanced"), SamplingConfig(temperature=1.2, top_k=10)])
@pytest.mark.parametrize("decoder_name", DECODER_NAMES)
def test_interleaved_calls_equal_sequential_calls(target, draft, decoder_name, config):
    turnstile = Turnstile(list(CALLS))
    decoder = make_decoders(draft, turnstile)[decoder_name]
    alone = {
        name: decoder.generate(target, prompts, config, max_new_tokens, GenerateOptions(row_seeds=seeds))
        for name, (prompts, max_new_tokens, seeds) in CALLS.items()
    }
    together = run_interleaved(decoder, target, config, turnstile)
    # the calls really overlapped: forwards alternated while both were running
    assert turnstile.log[:4] == ["A", "B", "A", "B"]
    for name in CALLS:
        assert together[name].token_ids == alone[name].token_ids
        assert together[name].finished_by_stop == alone[name].finished_by_stop
        assert counts(together[name].stats) == counts(alone[name].stats)


def counts(stats: dict[str, float]) -> dict[str, float]:
    """A decoder's accounting without its timings (which differ between any two runs)."""
    return {key: value for key, value in stats.items() if "seconds" not in key}


def test_the_gated_model_is_still_an_early_exit_model(target):
    assert isinstance(Gated(target, Turnstile([])), EarlyExitLM)
    logits = Gated(target, Turnstile([])).forward(torch.tensor([[1, 2]]), target.new_cache())
    assert logits.shape == (1, 2, 48)
