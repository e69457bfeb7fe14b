"""What makes decoding fast in every model family of this repository (GLM, sparse GPT-2, BART-gen).

Three measured speed-ups of the per-token step, none of which changes a result beyond rounding
(tests/test_fast_decoding.py):

- `GrowingKVLayer`: transformers' `DynamicLayer` appends each step's keys and values with `torch.cat`, copying the
  whole layer cache every step (O(length) per token and per layer). This layer writes into a buffer with spare
  room instead, and reorders beams copying only what changes (on the CPU: the moved rows, after the prompt that
  the beams of a group share), not the whole cache twice.
  `use_growing_kv_layers` installs it into the caches generate() creates.
- `BeamSharedKVLayer` (an encoder-decoder's cross-attention cache): skips the beam reorders that cannot change
  it, the rows of a beam group being identical copies of the encoder output.
- `fast_cpu_gemv`: on CPU, torch sends bf16 matmuls to oneDNN, whose matrix-vector product (one row: batch-1
  decoding) moves about half the bytes per second of torch's own kernel. A batch-1 step switches oneDNN off.
- `one_token_attention`: torch's CPU sdpa kernel (flash attention) is slow in bf16/fp16 for a single query
  token, 1.2x (200 keys) to 4.5x (1000 keys, batch 4) slower than two oneDNN matmuls around an fp32 softmax.
  `attention_function` picks it for such steps, and is where every family looks its attention function up.

And `CompiledDecoding.compile_decode_step()`, the supported way to run the decoding step under `torch.compile` (a
static cache and CUDA graphs on a GPU; dynamic shapes on the CPU), with generate()'s static caches sized in buckets
(`static_cache_slots`) so that prompts of every length share a few graphs.

The numbers behind them are in the README's Benchmarks section (`scripts/benchmarks/bandwidth.py`, `glm.py`).
A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, EncoderDecoderCache

from .transformers_compat import CACHE_NAMES, is_fixed_size, registered_attention


class GrowingKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in a buffer with spare room at the end, so a decode step writes
    one position instead of copying the whole layer cache.

    `keys`/`values` are always the filled part, `buffer[:, :, :length]`: everything that reads them
    (`get_seq_length`, attention) sees exactly what a `DynamicLayer` holds. Growth is by a quarter (at least 256
    positions), so the spare room costs at most 25% more cache memory.

    The operations generate() applies to a cache keep the buffer, so each costs at most one copy of the cache.
    Beam search's `reorder_cache` (a `DynamicLayer` copies the whole cache twice per beam step: the gather, then
    `torch.cat`):
    - on the CPU copies only what changes, in place: the rows whose beam now continues another beam, and of them
      only the positions after the prompt. generate() repeats each prompt for its beams, so the rows of a beam
      group hold the same prompt keys and values, and a reorder within the groups (all beam search does) leaves
      them as they are; the layer labels its rows at the first reorder (equal labels: equal bits over the
      positions held then) and skips those positions while reorders keep the labels. A beam step then costs about
      what a greedy step costs. (Which rows moved is read on the host: free on the CPU.)
    - elsewhere gathers the rows into a second buffer of the same size and swaps the two, reading nothing on the
      host; the second buffer exists only once beam search has reordered, so greedy decoding never holds it.
    `crop` (assisted decoding) only
    shortens the view; `batch_select_indices` and `batch_repeat_interleave` gather into a new buffer with spare
    room. Because the buffers are reused, a `keys`/`values` tensor taken out of the layer before a reorder or a
    crop may see its contents overwritten by the steps after it (generate() keeps none). Whatever else replaces
    them (offloading, `reset`, a user's assignment) leaves plain tensors behind; the next `update` notices that
    `keys` is no longer its view and moves them into a fresh buffer.
    """

    _key_view: torch.Tensor | None = None
    _value_view: torch.Tensor | None = None
    _spare_keys: torch.Tensor | None = None  # the second buffer for beam search's reorders
    _spare_values: torch.Tensor | None = None
    _labels: torch.Tensor | None = None  # per row; equal labels: rows equal bit for bit over positions [0, _labelled)
    _labelled: int = 0

    def _owns_views(self) -> bool:
        """Whether `keys`/`values` are still the views of this layer's buffers (nothing replaced them)."""
        return self._key_view is not None and self.keys is self._key_view and self.values is self._value_view

    def _set_length(self, length: int) -> None:
        self.keys = self._key_view = self._key_buffer[:, :, :length]
        self.values = self._value_view = self._value_buffer[:, :, :length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if torch.compiler.is_compiling():  # in-place writes to a buffer held by a Python object: keep it simple
            return super().update(key_states, value_states, *args, **kwargs)
        length = self.get_seq_length()
        new_length = length + key_states.shape[-2]
        if not self._owns_views() or new_length > self._key_buffer.shape[-2]:
            if not self._owns_views():  # replaced from outside: the labels no longer describe the rows
                self._labels = None
            capacity = new_length + max(new_length // 4, 256)
            self._key_buffer = _allocate(self.keys if length else None, key_states, capacity)
            self._value_buffer = _allocate(self.values if length else None, value_states, capacity)
            self._spare_keys = self._spare_values = None
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        self._key_buffer[:, :, length:new_length] = key_states
        self._value_buffer[:, :, length:new_length] = value_states
        self._set_length(new_length)
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        length = self.get_seq_length()
        if not length or not self._owns_views() or torch.compiler.is_compiling():
            return super().reorder_cache(beam_idx)
        beam_idx = beam_idx.to(self._key_buffer.device)
        if reorders_in_place(self._key_buffer.device):
            return self._reorder_in_place(beam_idx, length)
        if self._spare_keys is None:
            self._spare_keys = torch.empty_like(self._key_buffer)
            self._spare_values = torch.empty_like(self._value_buffer)
        torch.index_select(self.keys, 0, beam_idx, out=self._spare_keys[:, :, :length])
        torch.index_select(self.values, 0, beam_idx, out=self._spare_values[:, :, :length])
        self._key_buffer, self._spare_keys = self._spare_keys, self._key_buffer
        self._value_buffer, self._spare_values = self._spare_values, self._value_buffer
        self._set_length(length)

    def _reorder_in_place(self, beam_idx: torch.Tensor, length: int) -> None:
        """Copy the rows that change (row r takes row beam_idx[r]), after the positions that stay the same."""
        if self._labels is None:
            self._labels, self._labelled = row_labels(self.keys, self.values), length
        start = 0
        if self._labels is not None:
            moved_labels = self._labels[beam_idx]
            if torch.equal(moved_labels, self._labels):
                start = self._labelled
            else:  # across the groups: everything moves with its row
                self._labels = moved_labels
        moved = (beam_idx != torch.arange(len(beam_idx), device=beam_idx.device)).nonzero().flatten()
        if len(moved) and start < length:
            sources = beam_idx[moved]
            for buffer in (self._key_buffer, self._value_buffer):
                buffer[moved, :, start:length] = buffer[sources, :, start:length]  # gathered first, then written

    def reset(self) -> None:
        super().reset()  # 4.57 zeroes the buffer in place (the spare buffer would still hold the old prompt)
        self._spare_keys = self._spare_values = self._labels = None

    def crop(self, *args, **kwargs) -> None:
        super().crop(*args, **kwargs)  # 4.57 and 5.x read the argument differently; both leave a shorter view
        if self._key_view is not None and self.is_initialized and self.keys._base is self._key_buffer:
            self._set_length(self.keys.shape[-2])  # still the buffer: keep writing into it
            self._labelled = min(self._labelled, self.keys.shape[-2])
        else:
            self._labels = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.get_seq_length() and self._owns_views():
            rows = torch.arange(self.keys.shape[0], device=self.keys.device)[indices]  # what keys[indices] keeps
            return self._gather_rows(rows)
        return super().batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() and self._owns_views():
            rows = torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats)
            return self._gather_rows(rows)
        return super().batch_repeat_interleave(repeats)

    def _gather_rows(self, rows: torch.Tensor) -> None:
        """Keep the batch rows `rows` (a new batch size) in new buffers with the current spare room: one copy."""
        length = self.get_seq_length()
        for name in ("_key_buffer", "_value_buffer"):
            old = getattr(self, name)
            new = old.new_empty(len(rows), *old.shape[1:])
            torch.index_select(old[:, :, :length], 0, rows, out=new[:, :, :length])
            setattr(self, name, new)
        self._spare_keys = self._spare_values = self._labels = None
        self._set_length(length)


class BeamSharedKVLayer(DynamicLayer):
    """A `DynamicLayer` that skips a beam reorder which would leave it unchanged, bit for bit.

    Meant for an encoder-decoder's cross-attention cache: its keys and values come from the encoder output, which
    generate() repeats for every beam of a sequence, so the rows of one beam group are identical, and beam search
    only ever picks beams of the same group. transformers still gathers the whole cross-attention cache at every
    step (`EncoderDecoderCache.reorder_cache`), a copy as large as the self-attention cache after 128 steps of a
    128-token source. This layer labels its rows once (equal labels: bitwise equal keys and values) and skips a
    reorder that maps every row onto a row with its own label; any other reorder is done as `DynamicLayer` does it.
    On the CPU only: on a GPU the per-step comparison would cost a host synchronisation.
    """

    _labels: torch.Tensor | None = None
    _labelled: tuple[torch.Tensor, torch.Tensor] | None = None  # the keys and values that `_labels` describe

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # on a GPU the comparison below would wait for the device at every step; the gather is cheaper there
        on_cpu = self.is_initialized and self.keys.device.type == "cpu"
        labels = self._row_labels() if on_cpu and self.get_seq_length() and not torch.compiler.is_compiling() else None
        if labels is None:
            return super().reorder_cache(beam_idx)
        beam_idx = beam_idx.to(labels.device)
        if torch.equal(labels[beam_idx], labels):
            return
        super().reorder_cache(beam_idx)
        self._labels, self._labelled = labels[beam_idx], (self.keys, self.values)

    def _row_labels(self) -> torch.Tensor | None:
        if self._labelled is None or self._labelled[0] is not self.keys or self._labelled[1] is not self.values:
            self._labels, self._labelled = row_labels(self.keys, self.values), (self.keys, self.values)
        return self._labels


def reorders_in_place(device: torch.device) -> bool:
    """Whether `GrowingKVLayer` reorders beams in place (reading on the host which rows moved) on `device`."""
    return device.type == "cpu"


# integer dtypes to compare floating-point values bit for bit (-0.0 is not 0.0, a NaN equals its own bits)
_INTEGER_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def row_labels(keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """A label per batch row of a layer's keys and values [B, H, S, D]: the first row holding the same bits (at
    every position, keys and values), so equal labels mean equal rows; None for an unusual dtype. Candidates are
    found by one key element per position (a Python dict), then compared whole: a few row comparisons per row."""
    bits = _INTEGER_OF_SIZE.get(keys.element_size())
    if bits is None or keys.dtype != values.dtype:
        return None
    keys, values = keys.view(bits), values.view(bits)
    seen: dict[tuple, list[int]] = {}  # sample -> the rows with it that differ from each other
    labels = []
    for row, sample in enumerate(keys[:, 0, :, 0].tolist()):
        candidates = seen.setdefault(tuple(sample), [])
        same = (
            other
            for other in candidates
            if torch.equal(keys[other], keys[row]) and torch.equal(values[other], values[row])
        )
        label = next(same, None)
        if label is None:
            candidates.append(row)
            label = row
        labels.append(label)
    return torch.tensor(labels, device=keys.device)


def _allocate(filled: torch.Tensor | None, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """An empty [B, H, capacity, D] buffer shaped like `new`, starting with `filled`'s positions."""
    buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
    if filled is not None:
        buffer[:, :, : filled.shape[-2]] = filled
    return buffer


def use_growing_kv_layers(cache: Cache) -> None:
    """Swap the plain, still empty `DynamicLayer`s of a `DynamicCache` (what generate() creates; for an
    `EncoderDecoderCache`, its self-attention half) for `GrowingKVLayer`s, and those of an `EncoderDecoderCache`'s
    cross-attention half for `BeamSharedKVLayer`s. Anything else (a static or quantised cache, a filled cache, a
    transformers version whose caches are built differently) is left as it is: this is a speed-up, never a
    requirement."""
    if type(cache) is EncoderDecoderCache:
        _replace_fresh_layers(cache.cross_attention_cache, BeamSharedKVLayer)
        cache = cache.self_attention_cache
    _replace_fresh_layers(cache, GrowingKVLayer)


def _replace_fresh_layers(cache: Cache, layer_class: type[DynamicLayer]) -> None:
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or not isinstance(layers, list):
        return
    if all(type(layer) is DynamicLayer and not layer.is_initialized for layer in layers):
        cache.layers = [layer_class() for _ in layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:  # DynamicCache() without a config
        cache.layer_class_to_replicate = layer_class


def fast_cpu_gemv(
    tokens: torch.Tensor | None, cache: Cache | None, weight: torch.Tensor, mems: torch.Tensor | None = None
) -> AbstractContextManager:
    """Route the matmuls of a batch-1 bf16 decode step on CPU past oneDNN (a context for the whole step).

    For bf16, torch's CPU matmul goes through oneDNN, whose matrix-vector product reaches about half the memory
    bandwidth that torch's own gemv kernel does (measured on this project's AVX-512-bf16 machine: 10.9 vs 21.6 GB/s
    over ~110M parameters). With more than one row oneDNN is far faster (3.6x at 4 rows, 9x at 128), so only a
    decoding step of one sequence and one new token (`tokens` [1, 1, ...]) with `weight` bf16 on the CPU switches
    it off, for the duration of the step (a process-wide torch flag, restored on exit). A step is decoding once
    `cache` holds the prompt: an encoder-decoder's first step also projects the whole source for cross-attention,
    and with sparse GPT-2's `mems` the memory rows go through the projections too, so neither switches.
    """
    switch = (
        isinstance(tokens, torch.Tensor)  # anything else is refused by name by the model's input checks
        and tokens.shape[:2].numel() == 1
        and mems is None
        and cache is not None
        and (is_fixed_size(cache) or cache.get_seq_length() > 0)  # a static cache's length would cost a sync
        and isinstance(weight, torch.Tensor)  # (a quantized module's `weight` may be a method)
        and weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and not torch.compiler.is_compiling()
    )
    return _onednn(False) if switch else nullcontext()


# Below this many multiply-adds (batch x heads x keys x head_dim) torch's sdpa is as fast for one query token: the
# two matmuls have a fixed cost of their own (measured in the 110M GLM's decode step on the project's CPU: equal
# around 12 heads x 400 keys x 64 at batch 1, 18% faster per step at 1024 keys or at batch 16 with 128 keys).
ONE_TOKEN_ATTENTION_MIN_WORK = 1 << 19


def attention_function(module: nn.Module, query: torch.Tensor, key: torch.Tensor, eager: Callable) -> Callable:
    """The attention function for this call: the family's `eager` one, transformers' registered implementation
    named by `config._attn_implementation` (sdpa, flash, a user's own), or `one_token_attention` in place of sdpa
    for a single query token in bf16/fp16 on the CPU against enough keys."""
    implementation = module.config._attn_implementation
    if (
        implementation == "sdpa"
        and query.shape[2] == 1
        and query.device.type == "cpu"
        and query.dtype in (torch.bfloat16, torch.float16)
        and query.numel() * key.shape[2] >= ONE_TOKEN_ATTENTION_MIN_WORK
        and not module.training
        and not torch.compiler.is_compiling()
    ):
        return one_token_attention
    return registered_attention(implementation, eager)


def one_token_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """What sdpa computes for one query token, softmax(q k^T * scaling + mask) v, as two oneDNN matmuls around an
    fp32 softmax (the rounding of transformers' eager attention). query [B, H, 1, D], key/value [B, H, kv, D],
    attention_mask bool [B, 1, 1, kv] (True = attend) or additive float, or None -> output [B, 1, H, D]."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    with _onednn(True):  # the matmuls have many columns: oneDNN's (on again inside a `fast_cpu_gemv` step)
        # keys times query, not query times keys^T: oneDNN copies a transposed cache view first
        scores = torch.matmul(key, query.transpose(2, 3)).transpose(2, 3)  # [B, H, 1, kv]
        scores = scores.float().mul_(scaling)
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            scores.masked_fill_(~attention_mask, torch.finfo(torch.float32).min)
        elif attention_mask is not None:
            scores += attention_mask
        weights = torch.softmax(scores, dim=-1).to(value.dtype)
        output = torch.matmul(weights, value)  # [B, H, 1, D]
    return output.transpose(1, 2), None


@contextmanager
def _onednn(enabled: bool) -> Iterator[None]:
    """torch's process-wide oneDNN flag set to `enabled` for the block, then restored."""
    previous = torch.backends.mkldnn.enabled
    if previous == enabled:
        yield
        return
    torch.backends.mkldnn.enabled = enabled
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = previous


# generate()'s static caches come in sizes from this many slots (see `static_cache_slots`), an encoder-decoder's
# sources (its cross-attention cache) in lengths from SOURCE_MIN_LENGTH (see `static_source_inputs`)
STATIC_CACHE_MIN_SLOTS = 256
SOURCE_MIN_LENGTH = 64


def static_cache_slots(needed: int, limit: int | None, smallest: int = STATIC_CACHE_MIN_SLOTS) -> int:
    """How many slots the static cache generate() creates has, for a call that needs `needed` (prompt plus new
    tokens): the next power of two from `smallest`, at most the model's `limit` of positions (unless more are needed:
    the model's own check then names the problem). A compiled static decode step has the shape of the cache, so
    every new size is a new graph: with sizes 256, 512, 1024, 2048 a 2048-position model traces at most four graphs,
    for every prompt length, instead of one per length; the cost is up to twice the slots the call needs (attention
    reads them all, masked)."""
    if limit is not None and needed > limit:
        return needed
    slots = max(smallest, 1 << max(needed - 1, 0).bit_length())
    return slots if limit is None else min(slots, limit)


def static_source_inputs(model, inputs: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor | None, dict]:
    """An encoder-decoder's generate() arguments with the source right-padded to a bucket length (`static_cache_slots`
    from 64; the padding masked out, so the encoder's outputs for the real tokens and the generated ids stay the
    same) when generate() will create a static cache: its cross-attention cache has the source's length, and a
    compiled decode step would otherwise trace a graph per source length. Anything else passes unchanged: another
    cache, a cache or encoder outputs given, embeddings instead of ids."""
    config = kwargs.get("generation_config") or model.generation_config
    implementation = kwargs.get("cache_implementation", config.cache_implementation)
    given = any(kwargs.get(name) is not None for name in ("encoder_outputs", "inputs_embeds", *CACHE_NAMES))
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if implementation != "static" or given or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return inputs, kwargs
    extra = static_cache_slots(ids.shape[1], model.config.max_position_embeddings, SOURCE_MIN_LENGTH) - ids.shape[1]
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask
    kwargs = {**kwargs, "attention_mask": F.pad(mask, (0, extra), value=0)}
    ids = F.pad(ids, (0, extra), value=model.config.pad_token_id or 0)  # (masked: any id would do)
    if inputs is not None:
        return ids, kwargs
    return None, {**kwargs, "input_ids": ids}


def decodes_with_static_cache(device: torch.device, config) -> bool:
    """Whether `compile_decode_step()` takes the static path (a static cache, one graph of fixed shapes, CUDA graphs
    on a GPU) by default: on an accelerator, for a configuration that takes a static cache (not GLM's P-tuning,
    `pre_seq_len`, nor sparse GPT-2's training mode, `is_sparse=1`). The CPU keeps the dynamic-shape path: there are
    no CUDA graphs to gain (the 110M bf16 GLM at batch 1, generate(): 14.9 ms per token dynamic, 15.0 static, 15.4
    eager), and a dynamic cache holds only the positions in use."""
    return device.type != "cpu" and not getattr(config, "pre_seq_len", None) and getattr(config, "is_sparse", 0) != 1


DYNAMIC_COMPILE_OPTIONS = dict(dynamic=True, fullgraph=True)  # one decode-step graph for every cache length


def static_compile_options(device: torch.device, compile_kwargs: dict) -> dict:
    """`torch.compile`'s arguments for a static decode step: one graph of fixed shapes (`fullgraph=True,
    dynamic=False`); with inductor (and no `mode` of the caller's), CUDA graphs on a GPU, what `mode="reduce-overhead"`
    sets, given as options (torch takes one or the other) together with eager's random numbers (`fallback_random`),
    so that sparse GPT-2's mode-2 pivot draw inside the graph gives the eager ids."""
    options = dict(fullgraph=True, dynamic=False)
    if compile_kwargs.get("backend", "inductor") == "inductor" and "mode" not in compile_kwargs:
        options["options"] = {"triton.cudagraphs": device.type == "cuda", "fallback_random": True}
    return options


class CompiledDecoding:
    """Mixin of the generation classes (before `GenerationMixin` among the bases): `model.compile_decode_step()`,
    and generate()'s static caches sized by `static_cache_slots` (an encoder-decoder's sources padded to a bucket
    length by `static_source_inputs`)."""

    _decodes_static = False  # set by compile_decode_step(static=True): generate() then creates a static cache

    def compile_decode_step(self, static: bool | None = None, **compile_kwargs) -> None:
        """Run every later one-token decoding step (what `generate()` calls per new token, in every decoding mode:
        greedy, sampling, beam search) compiled, in one of two ways (`static`; by default the static one on a GPU,
        see `decodes_with_static_cache`). `compile_kwargs` go to `torch.compile`. Prompts run eagerly.

        - Static: generate() creates a static cache unless given a cache or a `cache_implementation` (sized in
          buckets by `static_cache_slots`), and the step compiles with `static_compile_options`: one graph per cache
          size and batch size (an encoder-decoder's first step, which projects the source, one more), none per
          token, CUDA graphs on a GPU. transformers' own auto-compile is turned off for these calls
          (`disable_compile`): it would compile a second graph around this one, and for sampling and greedy only.
        - Dynamic (the CPU's): `torch.compile(dynamic=True, fullgraph=True)`, one graph for all cache lengths. A
          call that chooses a dynamic cache after the static path was set up runs this one too (a fixed-shape graph
          would be traced again for every token).

        Why not a plain `torch.compile(model.forward)`: the batch-1 bf16 CPU step switches oneDNN off
        (`fast_cpu_gemv`), a process-wide flag that a compiled graph cannot set; here it is set around the graph.
        (On the 110M bf16 GLM, compiling the forward alone was slower than eager: 21.6 vs 15.4 ms per token.) The
        first compiled call, which traces, keeps oneDNN on: inductor sets up its CPU weight-only int8 lowering (a
        torchao int8 linear -> torch's int8 matrix-vector kernel) at the first compilation of the process, and only
        if oneDNN is on then; without it a torchao int8 model runs its eager path, a bf16 copy of every weight per
        call.
        """
        if static is None:
            static = decodes_with_static_cache(self.device, self.config)
        self._decodes_static = static
        eager = self.__dict__.setdefault("_uncompiled_forward", self.forward)  # a second call replaces the first
        weight = self.get_output_embeddings().weight
        steps = {}  # the compiled step per kind of cache (static or not), each created at its first call

        @functools.wraps(eager)  # generate() reads forward's signature
        def forward(*args, **kwargs):
            ids = kwargs.get("decoder_input_ids", kwargs.get("input_ids"))
            if ids is None or ids.shape[1] != 1:
                return eager(*args, **kwargs)
            cache = next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
            fixed = static and is_fixed_size(cache)  # a call that chose a dynamic cache takes the dynamic shapes
            if fixed not in steps:  # the trace, with oneDNN on (see above)
                options = static_compile_options(self.device, compile_kwargs) if fixed else DYNAMIC_COMPILE_OPTIONS
                steps[fixed] = torch.compile(eager, **{**options, **compile_kwargs})
                return steps[fixed](*args, **kwargs)
            with fast_cpu_gemv(ids, cache, weight, kwargs.get("mems")):
                return steps[fixed](*args, **kwargs)

        self.forward = forward

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """generate(), with a static cache after `compile_decode_step(static=True)` (unless the call chooses its
        cache), and an encoder-decoder's source in a few lengths for a static cache (`static_source_inputs`)."""
        chosen = kwargs.get("use_cache") is False or any(
            kwargs.get(name) is not None for name in ("cache_implementation", *CACHE_NAMES)
        )
        if self._decodes_static and not chosen:
            kwargs = {**kwargs, "cache_implementation": "static", "disable_compile": True}
        if self.config.is_encoder_decoder:
            inputs, kwargs = static_source_inputs(self, inputs, kwargs)
        return super().generate(inputs, *args, **kwargs)

    # generate()'s static cache, sized by `static_cache_slots`: transformers 4.57-5.4 create it in `_get_cache`, 5.5+
    # in `_prepare_static_cache`, each given `max_cache_len` by keyword (tests/test_static_cache.py checks the size
    # on every release the compatibility subset runs)
    def _get_cache(self, *args, **kwargs) -> Cache:
        return super()._get_cache(*args, **self._bucketed(kwargs))

    def _prepare_static_cache(self, *args, **kwargs) -> Cache:
        return super()._prepare_static_cache(*args, **self._bucketed(kwargs))

    def _bucketed(self, kwargs: dict) -> dict:
        if "max_cache_len" not in kwargs:
            return kwargs
        limit = getattr(self.config, "max_position_embeddings", None)
        return {**kwargs, "max_cache_len": static_cache_slots(kwargs["max_cache_len"], limit)}
