"""``LlamaCppCausalLM``: a GGUF model run by llama.cpp (llama-cpp-python's low-level API) behind the
`sampling.decoding.base.CausalLM` protocol, so every decoder that needs no hidden states drives it and our
`TokenSampler` draws from its logits.

One llama.cpp context per model with ``n_seq_max`` sequences of ``n_ctx`` cells each (non-unified KV:
a row attends only to its own cells). Each forward builds one ``llama_batch`` over the real tokens of
every row (padding and holes are skipped; positions are per sequence, `llamacpp_cache`), rows ordered by
sequence id so that llama.cpp packs consecutive sequences into one micro-batch, and copies each requested
row's logits once, from ``llama_get_logits_ith`` straight into the float32 result tensor.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rtdlm_experiments.models.engines import LlamaCppSettings
from rtdlm_experiments.models.llamacpp_cache import LlamaCppCache, SequencePool


def _bindings() -> Any:
    import llama_cpp
    import llama_cpp._logger as llama_logger

    llama_logger.set_verbose(False)  # llama.cpp's load chatter; errors still print
    return llama_cpp


def extra_buffers_usable(system_info: str) -> bool:
    """Whether llama.cpp may put weights in its extra buffers (repacked for this CPU's SIMD kernels).

    Not when the build has AMX int8 kernels: llama.cpp then prefers the AMX buffer whenever the kernel
    grants tile state, and some VMs grant it and list ``amx_int8`` yet fault on AMX arithmetic (SIGILL
    inside ``llama_decode`` on this project's Xeon VM), which no flag reveals. Plain buffers run anywhere.

    >>> extra_buffers_usable("AVX2 = 1 | AMX_INT8 = 1 | REPACK = 1 |")
    False
    >>> extra_buffers_usable("AVX2 = 1 | REPACK = 1 |")
    True
    """
    return "AMX_INT8 = 1" not in system_info


class _Batch:
    """A reusable ``llama_batch`` whose arrays are numpy buffers we own (one sequence id per token), so a
    batch is filled with vectorized writes instead of one ctypes call per field and token."""

    def __init__(self, lib: Any, capacity: int) -> None:
        self.capacity = capacity
        self.token = np.zeros(capacity, dtype=np.int32)
        self.pos = np.zeros(capacity, dtype=np.int32)
        self.n_seq_id = np.ones(capacity, dtype=np.int32)
        self.seq_store = np.zeros(capacity, dtype=np.int32)
        self.logits = np.zeros(capacity, dtype=np.int8)
        base, step = self.seq_store.ctypes.data, self.seq_store.itemsize
        self.seq_ptrs = (ctypes.c_void_p * capacity)(*[base + i * step for i in range(capacity)])
        self.struct = lib.llama_batch()
        self.struct.embd = None
        self.struct.token = self.token.ctypes.data_as(ctypes.POINTER(lib.llama_token))
        self.struct.pos = self.pos.ctypes.data_as(ctypes.POINTER(lib.llama_pos))
        self.struct.n_seq_id = self.n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self.struct.seq_id = ctypes.cast(self.seq_ptrs, ctypes.POINTER(ctypes.POINTER(lib.llama_seq_id)))
        self.struct.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))

    def fill(self, tokens: np.ndarray, pos: np.ndarray, seqs: np.ndarray, outputs: np.ndarray) -> None:
        n = len(tokens)
        self.token[:n], self.pos[:n], self.seq_store[:n], self.logits[:n] = tokens, pos, seqs, outputs
        self.struct.n_tokens = n


class LlamaCppCausalLM:
    """A GGUF file on llama.cpp as a `CausalLM`. ``tokenizer`` is the HF tokenizer of the same model (both
    engines then read identical token ids); ``settings`` gives threads, cells per row and rows at once."""

    engine = "llamacpp"

    def __init__(
        self,
        gguf_path: Path,
        settings: LlamaCppSettings,
        tokenizer: Any = None,
        name: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
    ) -> None:
        lib = self._lib = _bindings()
        lib.llama_backend_init()
        model_params = lib.llama_model_default_params()
        model_params.use_extra_bufts = extra_buffers_usable(
            lib.llama_print_system_info().decode("utf-8", "replace")
        )
        self._model = lib.llama_model_load_from_file(str(gguf_path).encode(), model_params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        self._ctx = lib.llama_init_from_model(self._model, self._context_params(settings))
        if not self._ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {gguf_path} with {settings}")
        self._memory = lib.llama_get_memory(self._ctx)
        self._lock = threading.RLock()
        self._chunk = int(lib.llama_n_batch(self._ctx))
        self._batch = _Batch(lib, self._chunk)
        self._pool = SequencePool(int(lib.llama_n_seq_max(self._ctx)))
        vocab = lib.llama_model_get_vocab(self._model)
        self.settings = settings
        self.tokenizer = tokenizer
        self.name = name or Path(gguf_path).stem
        self.path = Path(gguf_path)
        self.dtype = torch.float32  # of the logits; the weights are whatever the GGUF holds (Q4_K_M here)
        self.device = torch.device("cpu")
        self.num_layers = int(lib.llama_model_n_layer(self._model))
        self.vocab_size = int(lib.llama_vocab_n_tokens(vocab))
        self.max_context: int | None = int(lib.llama_n_ctx_seq(self._ctx))
        own = [int(lib.llama_vocab_eos(vocab)), int(lib.llama_vocab_eot(vocab))]
        from_tokenizer = [getattr(tokenizer, "eos_token_id", None)]
        candidates = [t for t in [*from_tokenizer, *own, *extra_eos_token_ids] if t is not None and t >= 0]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(candidates))

    def _context_params(self, settings: LlamaCppSettings) -> Any:
        params = self._lib.llama_context_default_params()
        params.n_seq_max = settings.n_seq_max
        params.n_ctx = settings.n_ctx * settings.n_seq_max
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = settings.n_threads
        params.kv_unified = False  # each row attends to its own cells only: cost and logits per row
        params.no_perf = True
        return params

    def __repr__(self) -> str:
        return (
            f"LlamaCppCausalLM({self.name!r}, layers={self.num_layers}, vocab={self.vocab_size}, "
            f"threads={self.settings.n_threads}, n_ctx={self.max_context}, n_seq_max={self._pool.size})"
        )

    # -- cache ---------------------------------------------------------------------------------------

    def new_cache(self) -> LlamaCppCache:
        """An empty cache; its rows take sequence ids at the first forward and free them on `release`,
        on leaving ``with``, at garbage collection, or when a newer batch needs them (`SequencePool`)."""
        return LlamaCppCache(self._pool, self._remove)

    def _remove(self, seq_id: int, start: int) -> None:
        with self._lock:
            if self._ctx is None:  # closed: nothing held any more
                return
            if not self._lib.llama_memory_seq_rm(self._memory, seq_id, start, -1):
                raise RuntimeError(f"llama.cpp could not remove positions >= {start} of sequence {seq_id}")

    def cache_length(self, cache: LlamaCppCache) -> int:
        return cache.width

    def crop_cache(self, cache: LlamaCppCache, length: int) -> None:
        cache.crop(length)

    # -- forward -------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: LlamaCppCache,
        attention_mask: torch.Tensor | None = None,
        last_positions: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, P, V] (P = ``last_positions`` or T) of ``input_ids`` [B, T] appended to ``cache``;
        rows of padding positions (mask 0) are zeros."""
        batch, steps = input_ids.shape
        wanted = steps if last_positions is None else min(last_positions, steps)
        with self._lock:
            cache.ensure_rows(batch)
            past = cache.width
            mask = self._full_mask(attention_mask, batch, past + steps)
            cache.reconcile(mask[:, :past])
            new_mask = mask[:, past:]
            self._check_room(cache, new_mask)
            out = torch.zeros(batch, wanted, self.vocab_size, dtype=torch.float32)
            try:
                self._decode(input_ids, cache, new_mask, out, steps - wanted)
            except BaseException:  # llama.cpp may hold part of this input: the rows are unusable now
                cache.evict("a forward on it failed part-way")
                raise
            cache.extend(new_mask)
        return out

    @staticmethod
    def _full_mask(mask: torch.Tensor | None, batch: int, width: int) -> torch.Tensor:
        if mask is None:
            return torch.ones(batch, width, dtype=torch.long)
        if tuple(mask.shape) != (batch, width):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)}, expected {(batch, width)}")
        return mask.cpu()

    def _check_room(self, cache: LlamaCppCache, new_mask: torch.Tensor) -> None:
        needed = int((cache.held + new_mask.long().sum(dim=1)).max()) if len(cache.held) else 0
        if self.max_context is not None and needed > self.max_context:
            raise ValueError(
                f"a row needs {needed} cells but the llama.cpp context holds {self.max_context} per row "
                f"(raise model.n_ctx)"
            )

    def _decode(
        self, input_ids: torch.Tensor, cache: LlamaCppCache, new_mask: torch.Tensor, out: torch.Tensor,
        first_output: int,
    ) -> None:  # fmt: skip
        """Feed every row's real new tokens (rows by sequence id) in chunks of at most n_batch tokens."""
        order = sorted(range(len(cache.seq_ids)), key=cache.seq_ids.__getitem__)
        real = new_mask.bool()[order]
        rows, columns = torch.nonzero(real, as_tuple=True)
        rows = torch.tensor(order, dtype=torch.long)[rows]
        if len(rows) == 0:
            return
        ids = input_ids.cpu()[rows, columns].numpy().astype(np.int32)
        within = new_mask.long().cumsum(dim=1)[rows, columns] - 1
        positions = (cache.held[rows] + within).numpy().astype(np.int32)
        seqs = np.asarray(cache.seq_ids, dtype=np.int32)[rows.numpy()]
        outputs = (columns >= first_output).numpy().astype(np.int8)
        for start in range(0, len(ids), self._chunk):
            chunk = slice(start, start + self._chunk)
            self._batch.fill(ids[chunk], positions[chunk], seqs[chunk], outputs[chunk])
            status = self._lib.llama_decode(self._ctx, self._batch.struct)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            self._copy_logits(out, rows[chunk], columns[chunk] - first_output, outputs[chunk])

    def _copy_logits(
        self, out: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor, outputs: np.ndarray
    ) -> None:
        """One copy per requested token: llama.cpp's logits row → ``out[row, slot]``."""
        row_bytes = self.vocab_size * 4
        base, strides = out.data_ptr(), (out.stride(0) * 4, out.stride(1) * 4)
        for index in np.flatnonzero(outputs).tolist():
            source = self._lib.llama_get_logits_ith(self._ctx, index)
            target = base + int(rows[index]) * strides[0] + int(slots[index]) * strides[1]
            ctypes.memmove(target, source, row_bytes)

    def close(self) -> None:
        """Free the llama.cpp context and model (also done at garbage collection)."""
        lib = getattr(self, "_lib", None)
        if lib is None or not hasattr(self, "_lock"):
            return
        with self._lock:
            if getattr(self, "_ctx", None):
                lib.llama_free(self._ctx)
            self._ctx = None
            if getattr(self, "_model", None):
                lib.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
