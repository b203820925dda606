"""The llama.cpp engine without llama.cpp: the sequence-per-row cache's bookkeeping (what it asks llama.cpp to
remove), the `kv_rows` hooks that let refill batching edit it, and choosing the engine before any load."""

from __future__ import annotations

import pytest
import torch
from composed import compose_config

from rtdlm_experiments.config.errors import ConfigError
from rtdlm_experiments.config.validation import prepare_job, resolved_config
from rtdlm_experiments.models import engines
from rtdlm_experiments.models.llamacpp_cache import LlamaCppCache, SequencePool
from rtdlm_experiments.models.registry import resolve_model_engine
from sampling.decoding import kv_rows


class Recorder:
    """Stands in for llama_memory_seq_rm: records (seq_id, first removed position)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, seq_id: int, start: int) -> None:
        self.calls.append((seq_id, start))


def fed(cache: LlamaCppCache, mask: list[list[int]]) -> None:
    """What the model's forward does around llama_decode for new columns ``mask``."""
    new = torch.tensor(mask)
    cache.ensure_rows(new.shape[0])
    cache.extend(new)


def test_rows_take_the_lowest_free_sequences_and_give_them_back():
    pool, removed = SequencePool(4), Recorder()
    first, second = LlamaCppCache(pool, removed), LlamaCppCache(pool, removed)
    fed(first, [[1, 1], [0, 1]])
    fed(second, [[1]])
    assert (first.seq_ids, second.seq_ids) == ([0, 1], [2])
    assert first.held.tolist() == [2, 1]  # padding takes no position
    first.release()
    assert sorted(removed.calls) == [(0, 0), (1, 0)]
    third = LlamaCppCache(pool, removed)
    fed(third, [[1], [1], [1]])
    assert third.seq_ids == [0, 1, 3]
    with pytest.raises(RuntimeError, match=r"n_seq_max"):
        fed(LlamaCppCache(pool, removed), [[1]] * 5)


def test_a_cache_kept_alive_by_a_failed_call_never_blocks_the_next_batch():
    """A failed call's traceback keeps its cache alive: the pool reclaims the least recently used other
    cache's sequences, and that cache raises if it is ever used again (it never reads others' cells)."""
    pool, removed = SequencePool(4), Recorder()
    failed, finished = LlamaCppCache(pool, removed), LlamaCppCache(pool, removed)
    fed(failed, [[1], [1]])
    fed(finished, [[1], [1]])
    fed(failed, [[1], [1]])  # used last: the finished batch goes first
    newcomer = LlamaCppCache(pool, removed)
    fed(newcomer, [[1], [1], [1]])
    assert sorted(newcomer.seq_ids) == [0, 1, 2] and failed.seq_ids == [] and finished.seq_ids == []
    assert sorted(removed.calls) == [(0, 0), (1, 0), (2, 0), (3, 0)]
    with pytest.raises(RuntimeError, match="reclaimed for a newer batch"):
        fed(failed, [[1], [1]])
    fed(newcomer, [[1], [1], [1]])  # still its own: a cache is never reclaimed for itself
    assert sorted(newcomer.seq_ids) == [0, 1, 2]


def test_a_cache_frees_its_sequences_on_leaving_with_and_when_collected():
    pool, removed = SequencePool(2), Recorder()
    with LlamaCppCache(pool, removed) as cache:
        fed(cache, [[1], [1]])
    assert sorted(pool.take(2)) == [0, 1]
    pool.give_back([0, 1])
    fed(LlamaCppCache(pool, removed), [[1], [1]])  # dropped at once: the finalizer frees it
    assert sorted(pool.take(2)) == [0, 1] and sorted(removed.calls) == [(0, 0), (0, 0), (1, 0), (1, 0)]


def test_a_rejected_tail_that_became_a_hole_is_removed_before_the_next_forward():
    cache, removed = LlamaCppCache(SequencePool(2), Recorder()), None
    removed = cache._remove
    fed(cache, [[1, 1, 1, 1], [1, 1, 1, 1]])  # prompt + pending + 2 drafts per row
    # row 0 kept both drafts, row 1 kept none: its two draft columns are holes now
    cache.reconcile(torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert removed.calls == [(1, 2)] and cache.held.tolist() == [4, 2]
    # a hole before a kept token cannot be expressed with contiguous positions
    with pytest.raises(ValueError, match="only a row's tail"):
        cache.reconcile(torch.tensor([[1, 0, 1, 1], [1, 1, 0, 0]]))
    with pytest.raises(ValueError, match="never received"):
        cache.reconcile(torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]))


def test_crop_removes_each_rows_tokens_beyond_the_kept_columns():
    cache = LlamaCppCache(SequencePool(2), Recorder())
    fed(cache, [[0, 1, 1], [1, 1, 1]])
    fed(cache, [[1, 1], [1, 0]])
    cache.crop(3)
    assert cache._remove.calls == [(0, 2), (1, 3)]
    assert cache.width == 3 and cache.held.tolist() == [2, 3]
    cache.crop(5)  # longer than held: nothing to do
    assert len(cache._remove.calls) == 2


def test_kv_rows_hooks_edit_rows_without_touching_kv_data():
    pool, removed = SequencePool(4), Recorder()
    flight, newcomers = LlamaCppCache(pool, removed), LlamaCppCache(pool, removed)
    fed(flight, [[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    assert kv_rows.row_editable(flight)
    kv_rows.select_rows(flight, torch.tensor([2, 0]))
    assert flight.seq_ids == [2, 0] and removed.calls == [(1, 0)]
    kv_rows.drop_leading_columns(flight, 1)
    assert flight.real.tolist() == [[False, True], [True, True]]
    with pytest.raises(ValueError, match="hold tokens"):
        kv_rows.drop_leading_columns(flight, 1)
    fed(newcomers, [[1, 1, 1, 1]])
    kv_rows.append_rows(flight, newcomers)
    assert flight.seq_ids == [2, 0, 1] and newcomers.seq_ids == []
    assert flight.real.long().tolist() == [[0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]
    assert flight.held.tolist() == [1, 2, 4]


def compose_job(*overrides: str):
    return compose_config("prompts=default", "tracking=none", *overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model=tiny-random", "model.engine=llamacpp"], "llama.cpp runs GGUF models only"),
        (["model=qwen2.5-coder-0.5b", "model.engine=jax"], "must be one of torch, llamacpp, auto"),
        (["model=qwen2.5-coder-0.5b", "model.engine=llamacpp", "model.n_threads=0"], "model.n_threads=0"),
    ],
)
def test_bad_engine_choices_fail_in_one_line_before_loading(overrides, message, monkeypatch):
    monkeypatch.setattr(engines, "llamacpp_installed", lambda: True)
    with pytest.raises(ConfigError, match=message) as caught:
        prepare_job(compose_job(*overrides))
    assert "\n" not in str(caught.value)


def test_self_speculative_is_refused_on_llamacpp_and_runs_on_torch_under_auto(monkeypatch):
    monkeypatch.setattr(engines, "llamacpp_installed", lambda: True)
    decoder = ["model=qwen2.5-coder-0.5b", "decoder=self_speculative"]
    with pytest.raises(ConfigError, match="self_speculative"):
        prepare_job(compose_job(*decoder, "model.engine=llamacpp"))
    assert prepare_job(compose_job(*decoder, "model.engine=auto")).model["engine"] == "torch"
    assert prepare_job(compose_job("model=qwen2.5-coder-0.5b")).model["engine"] == "llamacpp"


def test_llamacpp_without_the_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(engines, "llamacpp_installed", lambda: False)
    with pytest.raises(ConfigError, match=r"rtdlm-experiments\[llamacpp\]"):
        prepare_job(compose_job("model=qwen2.5-coder-0.5b", "model.engine=llamacpp"))
    assert resolve_model_engine({"name": "qwen2.5-coder-0.5b", "engine": "auto"}) == "torch"


def test_the_resolved_engine_is_a_param_of_the_run(monkeypatch):
    monkeypatch.setattr(engines, "llamacpp_installed", lambda: False)
    cfg = compose_job("model=tiny-random")
    spec = prepare_job(cfg)
    assert resolved_config(cfg, spec)["model"]["engine"] == "torch"
