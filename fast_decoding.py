"""What makes decoding fast in every model family of this repository (GLM, sparse GPT-2, BART-gen).

Two measured speed-ups of the per-token step, neither of which changes a result (tests/test_fast_decoding.py):

- `GrowingKVLayer`: transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, copying the
  whole layer cache every step (O(length) per token and per layer). This layer writes into a buffer with spare
  room instead. `use_growing_kv_layers` installs it into the caches generate() creates.
- `fast_cpu_gemv`: on CPU, torch sends bf16 matmuls to oneDNN, whose matrix-vector product (one row: batch-1
  decoding) moves about half the bytes per second of torch's own kernel. A batch-1 step switches oneDNN off.

The numbers behind both are in the README's Benchmarks section (`scripts/benchmarks/bandwidth.py`, `glm.py`).
A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache


class GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare room at the end, so a decode step writes
    one position instead of copying the whole layer cache.

    `keys`/`values` are always the filled part, `buffer[:, :, :length]`: everything that reads them
    (`get_seq_length`, attention) sees exactly what a `DynamicLayer` holds. Whatever replaces them (beam
    reordering, cropping, batch selection, offloading, `reset`) leaves plain tensors behind; the next `update`
    notices that `keys` is no longer its view and moves them into a fresh buffer. Growth is by a quarter (at least
    256 positions), so the spare room costs at most 25% more cache memory.
    """

    _key_view: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():  # in-place writes to a buffer held by a Python object: keep it simple
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        if self._key_view is None or self.keys is not self._key_view or new_length > self._key_buffer.shape[-2]:
            capacity = new_length + max(new_length // 4, 256)
            self._key_buffer = _allocate(self.keys if length else None, key_states, capacity)
            self._value_buffer = _allocate(self.values if length else None, value_states, capacity)
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self._key_buffer[:, :, length:new_length] = key_states
        self._value_buffer[:, :, length:new_length] = value_states
        self.keys = self._key_view = self._key_buffer[:, :, :new_length]
        self.values = self._value_buffer[:, :, :new_length]
        return self.keys, self.values


def _allocate(filled: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty [B, H, capacity, D] buffer shaped like `new`, starting with `filled`'s positions."""
    buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
    if filled is not None:
        buffer[:, :, : filled.shape[-2]] = filled
    return buffer


def use_growing_kv_layers(cache: Cache) -> None:
    """Swap the plain, still empty `DynamicLayer`s of a `DynamicCache` (what generate() creates; for an
    `EncoderDecoderCache`, its self-attention half) for `GrowingKVLayer`s. Anything else (a static or quantised
    cache, a filled cache, a transformers version whose caches are built differently) is left as it is: this is a
    speed-up, never a requirement."""
    if type(cache) is EncoderDecoderCache:
        cache = cache.self_attention_cache
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not isinstance(layers, list):
        return
    if all(type(layer) is DynamicLayer and not layer.is_initialized for layer in layers):
        cache.layers = [GrowingKVLayer() for _ in layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # DynamicCache() without a config
        cache.layer_class_to_replicate = GrowingKVLayer


@contextmanager
def fast_cpu_gemv(rows: int, weight: torch.Tensor) -> Iterator[None]:
    """Route the matmuls of a batch-1 bf16 decode step on CPU past oneDNN.

    For bf16, torch's CPU matmul goes through oneDNN, whose matrix-vector product reaches about half the memory
    bandwidth that torch's own gemv kernel does (measured on this project's AVX-512-bf16 machine: 10.9 vs 21.6 GB/s
    over ~110M parameters). With more than one row oneDNN is far faster (3.6x at 4 rows, 9x at 128), so only a
    single-token, single-sequence step (`rows` = batch x new tokens = 1, with `weight` bf16 on the CPU) switches it
    off, for the duration of the step (a process-wide torch flag, restored on exit).
    """
    switch = (
        rows == 1
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.enabled
        and not torch.compiler.is_compiling()
    )
    if not switch:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True
