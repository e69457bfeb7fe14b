"""Sparse GPT-2: the CogView transformer (Ding et al., 2021, arXiv 2105.13290) as transformers remote code.

Follows THUDM CogView's `GPT2Model` / `GPT2ParallelTransformer` (model-parallel size 1): a pre-LN GPT-2 with
learned positions, tanh GELU, an LM head tied to the word embeddings, CogView's sandwich LayerNorm
(`third_layernorm` on the attention output, `fourth_layernorm` on the MLP output), PB-relax LayerNorm
(`LN(x / (max|x| / 8))`, the max over the whole input tensor), Transformer-XL memory (`mems`: the per-layer inputs
of earlier calls, keys and values recomputed from them) and CogView's sparse attention. The state-dict names are
CogView's, so a checkpoint maps one-to-one (`transformer.X` -> `model.X`, `word_embeddings` ->
`model.word_embeddings`). With sandwich LN and PB-relax off it is exactly GPT-2.

Attention modes, chosen per call with `is_sparse` (the config holds the default):
- 0: dense causal attention; optionally the first `sep` tokens of the call attend to each other both ways
  (CogView's prefix). Dispatched through transformers' attention interface (eager or sdpa).
- 1: sparse training. With blocks of `w = query_window` tokens, a query in block g attends causally to the keys of
  blocks g-t+1..g (`t = key_window_times`) plus the pivot keys that lie in blocks <= g-t, whose logits get
  `+log(s // n_pivots)`; one softmax over both. Pivots: every text token plus a random sample of image tokens, `P`
  per row.
- 2: sparse inference. A query at position i attends to the keys (i - t*w, i] (a sliding window, causal) plus the
  pivots left of that window (position <= i - t*w); no bias. CogView's own mode 2 only decodes one step at a time
  (all queries of a call share the window of the last one); here a call with many queries is defined per query, so
  a full-sequence call equals decoding the same tokens one at a time with the same pivots, and a sequence no
  longer than t*w is exactly mode 0. Sampled pivots are drawn from the keys left of the last query's window, with
  CogView's count `max_text + int((n_left - max_text) * P / max_position_embeddings)`.
A `pivot_idx` [batch, n] passed by the caller replaces the sampling in every layer (mode 1 then adds
`log(s // n)`; in mode 2 positions not reached yet simply stay invisible until they are left of a window).
The sparse attention itself (a block-sparse FlexAttention pair on CUDA, a blocked kernel with its own backward
elsewhere; neither builds an s x s matrix; a mode-2 decoding step is a dense softmax under a mask of its window and
pivots, built on the device), its plan and the pivot sampling live in sparse_attention.py.

Differences from CogView: pivot sampling uses torch (an optional `torch.Generator` makes it reproducible) instead of
Python's `random`, and is drawn per layer in the model's forward so gradient checkpointing recomputes with the same
pivots; masked logits use the dtype's minimum instead of -10000 (identical softmax in fp32); an all-zero PB-relax
input gives zeros instead of NaN; padding (`attention_mask`) is supported in every mode and padding tokens are never
pivots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import can_return_tuple, logging

from .configuration_gpt2_sparse import GPT2SparseConfig
from .fast_decoding import CompiledDecoding, attention_function, fast_cpu_gemv, use_growing_kv_layers
from .model_checks import (
    CheckedLoading,
    check_generate_inputs,
    check_half_overflow,
    check_input_values,
    check_inputs,
    check_labels,
    check_mode_flag,
    check_positions,
    check_prefix_length,
    check_static_cache,
    padding_mask,
    reads_values,
)
from .sparse_attention import (
    SparsePlan,
    plan_sparse_attention,
    plan_static_cache_step,
    sparse_window_attention,
    static_image_mask,
)
from .transformers_compat import (
    LayerOutputs,
    base_outputs,
    cache_field,
    causal_lm_loss,
    check_unused_kwargs,
    fixed_cache_size,
    fixed_size_step_inputs,
    generation_cache,
    is_fixed_size,
    take_cache,
)

logger = logging.get_logger(__name__)


@dataclass
class GPT2SparseModelOutput(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus `mems`: the Transformer-XL memory for the next call (num_layers + 1 tensors of
    shape [batch, mem_len, hidden]), present when `config.max_memory_length > 0`."""

    mems: tuple[torch.Tensor, ...] | None = None


@dataclass
class GPT2SparseCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus `mems` (see GPT2SparseModelOutput)."""

    mems: tuple[torch.Tensor, ...] | None = None


class GPT2SparseLayerNorm(nn.LayerNorm):
    """LayerNorm with CogView's optional PB-relax: `LN(x / (max|x| / 8))`.

    The max is one scalar over the whole tensor (all batch items and positions), as in CogView. LayerNorm is scale
    invariant, so this only changes how large eps is relative to the input; it also means batch items and cached
    vs. full calls differ by an eps-sized amount.
    """

    def __init__(self, hidden_size: int, eps: float, pb_relax: bool = False):
        super().__init__(hidden_size, eps=eps)
        self.pb_relax = pb_relax

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.pb_relax:
            # clamp: an all-zero input would be 0/0 in CogView; here it stays zero.
            scale = hidden_states.detach().abs().amax().clamp(min=torch.finfo(hidden_states.dtype).tiny) / 8
            hidden_states = hidden_states / scale
        return F.layer_norm(hidden_states, self.normalized_shape, self.weight, self.bias, self.eps)


class GPT2SparseMLP(nn.Module):
    def __init__(self, config: GPT2SparseConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dense_4h_to_h._is_output_projection = True  # scaled init, as GPT-2 / Megatron
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh")
        return self.dropout(self.dense_4h_to_h(hidden_states))


def _softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim, in fp32 for half-precision scores (as CogView's fp32 softmax)."""
    return torch.softmax(scores, dim=-1, dtype=torch.float32 if scores.element_size() < 4 else None)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense softmax attention. query [B, H, Q, D], key/value [B, H, K, D]; attention_mask bool (True = attend)
    or additive float, [B|1, 1, Q, K]; None means causal (bottom-right aligned). Returns ([B, Q, H, D], probs)."""
    scores = torch.matmul(query * scaling, key.transpose(-1, -2))  # [B, H, Q, K]
    if attention_mask is None and query.shape[2] > 1:
        q_len, k_len = query.shape[2], key.shape[2]
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    probs = _softmax(scores).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # [B, Q, H, D]
    return out, probs


class GPT2SparseAttention(nn.Module):
    """CogView's self-attention: fused `query_key_value` (q|k|v contiguous, head-major), `dense` output."""

    def __init__(self, config: GPT2SparseConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.num_key_value_groups = 1
        self.is_causal = True
        self.attention_dropout = config.attention_dropout
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dense._is_output_projection = True
        self.output_dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sparse: SparsePlan | None = None,
        past_key_values: Cache | None = None,
        mem: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        # With memory, keys and values are recomputed from the (normalised) memory, as CogView does.
        x = hidden_states if mem is None else torch.cat([mem, hidden_states], dim=1)
        query, key, value = self.query_key_value(x).split(self.hidden_size, dim=-1)
        query = query[:, -q_len:].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, Q, D]
        key = key.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, M+Q, D]
        value = value.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:  # a static cache writes at `cache_position` (transformers 4.57 needs it)
            slots = {"cache_position": cache_position} if cache_position is not None else None
            key, value = past_key_values.update(key, value, self.layer_idx, slots)  # [B, H, K, D]

        dropout = self.attention_dropout if self.training else 0.0
        attn_weights = None
        if sparse is not None and sparse.step_masks is not None:  # mode 2, one new token: a dense masked softmax
            attention_mask, sparse = sparse.step_masks[self.layer_idx], None
        elif sparse is not None and sparse.key_length is not None:  # a static cache's prompt: the filled slots
            key, value = key[:, :, : sparse.key_length], value[:, :, : sparse.key_length]
        if sparse is None:
            attention_interface = attention_function(self, query, key, eager_attention_forward)
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs
            )
        else:
            attn_output = sparse_window_attention(
                query,
                key,
                value,
                sparse.window_start,
                sparse.block,
                sparse.span,
                sparse.pivots[self.layer_idx],
                sparse.pivot_bias,
                sparse.key_mask,
                scaling=self.scaling,
                dropout=dropout,
                block_masks=sparse.block_masks,
            )
        attn_output = attn_output.reshape(bsz, q_len, self.hidden_size)
        return self.output_dropout(self.dense(attn_output)), attn_weights


class GPT2SparseLayer(GradientCheckpointingLayer):
    """Pre-LN block with CogView's sandwich LN: x + LN3(attn(LN1(x))), then y + LN4(mlp(LN2(y)))."""

    def __init__(self, config: GPT2SparseConfig, layer_idx: int):
        super().__init__()
        eps, pb_relax = config.layernorm_epsilon, config.pb_relax
        self.input_layernorm = GPT2SparseLayerNorm(config.hidden_size, eps, pb_relax)
        self.attention = GPT2SparseAttention(config, layer_idx)
        self.post_attention_layernorm = GPT2SparseLayerNorm(config.hidden_size, eps, pb_relax)
        self.mlp = GPT2SparseMLP(config)
        if config.sandwich_ln:
            self.third_layernorm = GPT2SparseLayerNorm(config.hidden_size, eps, pb_relax)
            self.fourth_layernorm = GPT2SparseLayerNorm(config.hidden_size, eps, pb_relax)
        else:
            self.third_layernorm = self.fourth_layernorm = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        sparse: SparsePlan | None = None,
        past_key_values: Cache | None = None,
        mem: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed_mem = self.input_layernorm(mem) if mem is not None else None  # CogView normalises memory apart
        attn_output, attn_weights = self.attention(
            self.input_layernorm(hidden_states), attention_mask, sparse, past_key_values, normed_mem, **kwargs
        )
        if self.third_layernorm is not None:
            attn_output = self.third_layernorm(attn_output)
        hidden_states = hidden_states + attn_output

        mlp_output = self.mlp(self.post_attention_layernorm(hidden_states))
        if self.fourth_layernorm is not None:
            mlp_output = self.fourth_layernorm(mlp_output)
        hidden_states = hidden_states + mlp_output
        return hidden_states, attn_weights


class GPT2SparsePreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = GPT2SparseConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GPT2SparseLayer"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = True  # modes 0 and 2 with a static cache (cache_implementation="static")

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_method_std
        if isinstance(module, nn.Linear):
            if getattr(module, "_is_output_projection", False) and self.config.use_scaled_init_for_output_weights:
                std = std / math.sqrt(2.0 * self.config.num_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


SPARSE_MODES = {0: "dense", 1: "sparse training", 2: "sparse inference"}


def _count(mems) -> str:
    return str(len(mems)) if isinstance(mems, (list, tuple)) else type(mems).__name__


def _step_slots(mems, cache: Cache | None, q_len: int, cache_position, embeddings: nn.Embedding):
    """(past_len, slots, k_len): the positions before this call's tokens (those of the KV cache or of the
    Transformer-XL memory, never both), the queries' positions [Q] and the number of keys. A fixed-size cache's
    fill is not read on the host: past_len None, slots `cache_position`, keys all its slots."""
    if is_fixed_size(cache):
        return None, cache_position, fixed_cache_size(cache)
    past_len = cache.get_seq_length() if cache is not None else mems[0].shape[1] if mems is not None else 0
    return past_len, torch.arange(past_len, past_len + q_len, device=embeddings.weight.device), past_len + q_len


class GPT2SparseModel(GPT2SparsePreTrainedModel):
    """The CogView transformer: word + position embeddings, `num_layers` blocks, final LayerNorm."""

    _auto_class = "AutoModel"  # save_pretrained copies the code files next to the weights

    def __init__(self, config: GPT2SparseConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([GPT2SparseLayer(config, i) for i in range(config.num_layers)])
        self.final_layernorm = GPT2SparseLayerNorm(config.hidden_size, config.layernorm_epsilon, config.pb_relax)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        mems: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        is_sparse: int | None = None,
        sep: int | torch.Tensor | None = None,
        pivot_idx: torch.LongTensor | None = None,
        image_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> GPT2SparseModelOutput | tuple:
        r"""
        mems: Transformer-XL memory returned by the previous call (`outputs.mems`); exclusive with the cache.
        is_sparse: this call's attention: 0 dense, 1 sparse training, 2 sparse inference (default config.is_sparse).
        sep: mode 0 only; the first `sep` tokens of this call attend to each other both ways (an int, or a
            LongTensor [batch] for one prefix length per row).
        pivot_idx: LongTensor [batch, n] of absolute key positions used as pivots by every layer instead of
            sampling. Mode 1 adds log(seq_len // n) to their logits; mode 2 uses those left of each query's window.
        image_mask: bool [batch, key_length], True where a key (cache or memory included) is an image token
            (default `input_ids < config.num_image_tokens`); mode 2 samples pivots among cached keys with it.
        generator: a torch.Generator that makes pivot sampling reproducible.
        cache_position: [seq], the slots of a `StaticCache` (modes 0, 2) this call writes (generate() passes them).
        """
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        check_unused_kwargs(kwargs, type(self).__name__)
        collected = LayerOutputs(self.config, output_hidden_states, output_attentions)
        mode = check_mode_flag(is_sparse, "is_sparse", SPARSE_MODES, self.config.is_sparse)
        bsz, q_len = check_inputs(input_ids, inputs_embeds, self.word_embeddings)
        mems, cache, use_cache = self._memory_or_cache(mems, past_key_values, use_cache, mode, bsz, cache_position)
        past_len, slots, k_len = _step_slots(mems, cache, q_len, cache_position, self.word_embeddings)
        position_ids, key_mask, sep = self._check_step(
            input_ids, inputs_embeds, attention_mask, position_ids, sep, mode, past_len, slots, k_len
        )
        if input_ids is not None:
            inputs_embeds = self.word_embeddings(input_ids)
        dense_mask, sparse = self._mask_or_sparse_plan(
            mode, input_ids, bsz, slots, k_len, past_len, key_mask, sep, pivot_idx, image_mask, generator
        )
        hidden_states = inputs_embeds + self.position_embeddings(position_ids)
        hidden_states = self.embedding_dropout(hidden_states)

        mem_layers = [hidden_states.detach()] if self.config.max_memory_length > 0 else None  # layer inputs
        cache_kwargs = dict(past_key_values=cache, use_cache=use_cache, cache_position=cache_position)
        for layer, mem in zip(self.layers, mems if mems is not None else [None] * len(self.layers)):
            collected.add_hidden_state(hidden_states)
            hidden_states, attn_weights = layer(hidden_states, dense_mask, sparse, mem=mem, **cache_kwargs)
            collected.add_attentions(attn_weights)
            if mem_layers is not None:
                mem_layers.append(hidden_states.detach())
        hidden_states = self.final_layernorm(hidden_states)
        collected.add_hidden_state(hidden_states)

        return GPT2SparseModelOutput(
            last_hidden_state=hidden_states,
            **cache_field(cache if use_cache else None),
            hidden_states=collected.hidden_states,
            attentions=collected.attentions,
            mems=self._update_mems(mem_layers, mems) if mem_layers is not None else None,
        )

    def _memory_or_cache(
        self, mems, past_key_values: Cache | None, use_cache: bool | None, mode: int, bsz: int, cache_position=None
    ) -> tuple[list[torch.Tensor] | None, Cache | None, bool]:
        """Transformer-XL memory (checked: one [batch, mem_len, hidden] tensor per layer, all of one length and of
        the model's dtype) or the KV cache (created when `use_cache`), and whether the cache is used: `use_cache`
        (None: config.use_cache), never with memory, nor with gradient checkpointing in training (no warning here:
        the checkpointed layers warn about a cache they are handed)."""
        config = self.config
        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        if mems is None or len(mems) == 0:
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=config)
            if is_fixed_size(past_key_values):
                if mode == 1:  # training: the whole sequence in one call
                    raise ValueError(
                        "is_sparse=1 needs the default dynamic cache; a StaticCache takes is_sparse=0 or 2"
                    )
                check_static_cache(
                    past_key_values, cache_position, config.max_position_embeddings, "max_position_embeddings"
                )
            elif past_key_values is not None:
                use_growing_kv_layers(past_key_values)
            return None, past_key_values, use_cache
        if past_key_values is not None:
            raise ValueError("Pass either mems (Transformer-XL memory) or past_key_values (a Cache), not both")
        if mode == 1:
            raise ValueError("is_sparse=1 (sparse training) does not support mems; use is_sparse=0 or 2")
        if not isinstance(mems, (list, tuple)) or len(mems) < config.num_layers:
            raise ValueError(f"mems must hold at least num_layers={config.num_layers} tensors, got {_count(mems)}")
        mems = mems[: config.num_layers]
        if any(
            not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != bsz or m.shape[-1] != config.hidden_size
            for m in mems
        ):
            raise ValueError(f"every mems tensor must have shape [batch={bsz}, mem_len, {config.hidden_size}]")
        if len({m.shape[1] for m in mems}) > 1:
            raise ValueError(f"mems must have one length for every layer, got {[m.shape[1] for m in mems]}")
        dtype = self.word_embeddings.weight.dtype
        if any(m.dtype != dtype for m in mems):
            raise TypeError(f"mems must have the model's dtype {dtype}, got {sorted({str(m.dtype) for m in mems})}")
        return mems, None, False

    def _check_step(
        self, input_ids, inputs_embeds, attention_mask, position_ids, sep, mode: int, past_len, slots, k_len: int
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This call's positions, padding mask (None: no padding) and `sep` lengths, checked. The data-dependent
        checks (value ranges, NaN, a 0/1 mask) are skipped on decode steps (`model_checks.reads_values`). `slots`
        [Q]: the queries' positions; `k_len`: the keys (a static cache: all its slots, `past_len` None)."""
        config = self.config
        tokens = input_ids if input_ids is not None else inputs_embeds
        bsz, q_len = tokens.shape[:2]
        read = reads_values(past_len, q_len)
        if mode == 1 and past_len != 0:
            raise ValueError(
                "is_sparse=1 (sparse training) needs the whole sequence in one call, without a cache or memory; "
                "use is_sparse=2 or 0 to decode"
            )
        if read:
            check_input_values(input_ids, inputs_embeds, self.word_embeddings, "input_ids", "inputs_embeds")
        if position_ids is None:
            if past_len is not None and k_len > config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {k_len} (including {past_len} cached/memory positions) exceeds "
                    f"max_position_embeddings={config.max_position_embeddings}"
                )
            position_ids = slots.to(tokens.device).unsqueeze(0)
        else:
            check_positions(position_ids, "position_ids", (bsz, q_len), config.max_position_embeddings, read)
        key_mask = None
        if attention_mask is not None:
            key_mask = padding_mask(attention_mask, "attention_mask", (bsz, k_len), read)
        if sep is not None and past_len is None:
            raise ValueError("sep (a bidirectional prefix) needs the default dynamic cache, not a StaticCache")
        if sep is not None:
            sep = check_prefix_length(sep, "sep", bsz, read)
            if mode != 0 and read and bool(sep.ne(0).any()):
                raise ValueError(f"sep (a bidirectional prefix) is only supported with is_sparse=0, got {mode}")
        return position_ids, key_mask, sep

    def _mask_or_sparse_plan(
        self,
        mode: int,
        input_ids,
        bsz: int,
        slots,
        k_len: int,
        past_len,
        key_mask,
        sep,
        pivot_idx,
        image_mask,
        generator,
    ) -> tuple[torch.Tensor | None, SparsePlan | None]:
        """What every layer's attention uses in this call: the dense mask (`_dense_mask`, mode 0), or the sparse plan
        (window, pivots per layer, their bias; `sparse_attention.plan_sparse_attention`, modes 1 and 2)."""
        if mode == 0:
            return self._dense_mask(slots, k_len, past_len, key_mask, sep), None
        if past_len is None:  # a static cache (mode 2): k_len is all its slots
            plan = plan_static_cache_step(
                self.config, mode, input_ids, bsz, slots, k_len, key_mask, pivot_idx, image_mask, generator
            )
            return None, plan
        plan = plan_sparse_attention(
            self.config, mode, input_ids, bsz, len(slots), past_len, key_mask, pivot_idx, image_mask, generator,
            slots.device,
        )  # fmt: skip
        return None, plan

    def _dense_mask(
        self, slots: torch.Tensor, k_len: int, past_len: int | None, key_mask: torch.Tensor | None, sep
    ) -> torch.Tensor | None:
        """Bool mask [B|1, 1, Q, K] (True = attend): causal (query positions `slots`, K = k_len keys), plus the first
        `sep` tokens of this call visible to all of its queries (CogView's prefix), minus padding. None when sdpa's
        own causal path is exact (never with a static cache: its empty slots must be hidden)."""
        q_len, device = len(slots), slots.device
        has_sep = sep is not None
        if (
            key_mask is None
            and not has_sep
            and past_len is not None
            and (past_len == 0 or q_len == 1)
            and self.config._attn_implementation == "sdpa"
        ):
            return None
        q_pos = slots.view(1, q_len, 1)
        k_pos = torch.arange(k_len, device=device).view(1, 1, k_len)
        allowed = k_pos <= q_pos  # [1, Q, K]
        if has_sep:
            sep_t = torch.as_tensor(sep, device=device).view(-1, 1, 1)
            allowed = allowed | (k_pos < past_len + sep_t)  # [B|1, Q, K]
        if key_mask is not None:
            # padded queries keep their own key so their (discarded) rows stay finite
            allowed = (allowed & key_mask[:, None, :].to(device)) | (k_pos == q_pos)
        return allowed.unsqueeze(1)

    def _update_mems(
        self, hiddens: list[torch.Tensor], mems: list[torch.Tensor] | tuple[torch.Tensor, ...] | None
    ) -> tuple[torch.Tensor, ...]:
        """CogView's update_mems: keep the last min(max_memory_length, mem_len + q_len) positions of each layer's
        input (plus the last layer's output)."""
        mem_len = mems[0].shape[1] if mems is not None else 0
        q_len = hiddens[0].shape[1]
        new_len = min(self.config.max_memory_length, mem_len + q_len)
        with torch.no_grad():
            if mems is None or new_len <= q_len:
                return tuple(h[:, q_len - new_len :] for h in hiddens)
            return tuple(torch.cat([m[:, mem_len - (new_len - q_len) :], h], dim=1) for m, h in zip(mems, hiddens))


class GPT2SparseLMHeadModel(GPT2SparsePreTrainedModel, CompiledDecoding, GenerationMixin):
    """CogView's GPT2Model: the transformer plus an output layer tied to the word embeddings."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the code files next to the weights
    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}

    def __init__(self, config: GPT2SparseConfig):
        super().__init__(config)
        self.model = GPT2SparseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with the prompt checked once first (`model_checks.check_generate_inputs`):
        a clear error for ids that are not an integer [batch, seq] tensor in the vocabulary, a padding mask of
        another shape or right-padded, or ids and embeddings both given, instead of one from deep inside
        generate() or a silently wrong continuation."""
        check_generate_inputs(inputs, kwargs, self.config.vocab_size)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, past_key_values: Cache | None = None, cache: Cache | None = None, **kwargs
    ) -> dict:
        past = generation_cache(self.config, past_key_values, dict(kwargs, cache=cache), fixed_size_ok=True)
        if is_fixed_size(past):
            model_inputs = fixed_size_step_inputs(input_ids, past, kwargs)
        else:
            model_inputs = super().prepare_inputs_for_generation(input_ids, **cache_field(past), **kwargs)
        mode = model_inputs.get("is_sparse")
        mode = self.config.is_sparse if mode is None else mode
        if mode == 2 and model_inputs.get("pivot_idx") is None:
            # Sparse inference samples pivots among cached positions: tell it which of them are image tokens.
            image_mask = model_inputs.get("image_mask")
            if image_mask is None:
                image_mask = input_ids < self.config.num_image_tokens
            if is_fixed_size(past):
                image_mask = static_image_mask(image_mask, input_ids.shape[1], fixed_cache_size(past))
            model_inputs["image_mask"] = image_mask
        return model_inputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mems: list[torch.Tensor] | tuple[torch.Tensor, ...] | None = None,
        is_sparse: int | None = None,
        sep: int | torch.Tensor | None = None,
        pivot_idx: torch.LongTensor | None = None,
        image_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> GPT2SparseCausalLMOutput:
        r"""
        labels: token ids for the next-token loss (shifted inside; -100 is ignored). `num_items_in_batch`, passed by
            Trainer, makes the loss a sum divided by that count.
        mems, is_sparse, sep, pivot_idx, image_mask, generator: see `GPT2SparseModel.forward`.

        Example:
        ```python
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/converted", trust_remote_code=True)
        >>> ids = torch.randint(0, model.config.vocab_size, (1, 8))
        >>> model.generate(ids, max_new_tokens=8, do_sample=False, is_sparse=2)
        ```
        """
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        tokens = input_ids if input_ids is not None else inputs_embeds
        with fast_cpu_gemv(tokens, past_key_values, self.lm_head.weight, mems):
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                mems=mems,
                is_sparse=is_sparse,
                sep=sep,
                pivot_idx=pivot_idx,
                image_mask=image_mask,
                generator=generator,
                **kwargs,
            )
            hidden_states = outputs.last_hidden_state
            slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, slice_indices, :])
        if logits.dtype == torch.float16 and hidden_states.shape[1] > 1 and not self.training:
            check_half_overflow(logits)  # once per prompt (prefill); single-token decode steps skip the sync

        loss = None
        if labels is not None:
            check_labels(labels, hidden_states.shape[:2], self.config.vocab_size, "the input's shape")
            loss = causal_lm_loss(logits, labels, num_items_in_batch)
        return GPT2SparseCausalLMOutput(loss=loss, logits=logits, **base_outputs(outputs))


__all__ = ["GPT2SparseLMHeadModel", "GPT2SparseModel", "GPT2SparsePreTrainedModel"]
