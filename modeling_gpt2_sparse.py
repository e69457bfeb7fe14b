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
Modes 1 and 2 never build an s x s matrix: each (batch, head) row goes a step of query blocks at a time, every
block against its own key window (an overlapping strided view of the keys, so each product is one plain GEMM with
no copies) plus the pivots left of it (pivots are sorted, so a step scores only the prefix it can see). The only
transient is one step's scores (about 4 MiB), and a custom backward recomputes the probabilities (as flash
attention does), so training keeps only q, k, v and the output per layer, no more than dense sdpa does.

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
from .model_checks import CheckedLoading, check_half_overflow
from .transformers_compat import (
    cache_field,
    causal_lm_loss,
    check_unused_kwargs,
    generation_cache,
    generation_cache_kwarg,
    output_cache,
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


@dataclass
class SparsePlan:
    """Per-call description of sparse attention (modes 1 and 2), shared by all layers except the pivots.

    window_start [Q] (absolute position of the first window key of each query; pivots must lie before it),
    block (queries per block), span (keys per block chunk), pivot_bias (added to pivot logits), key_mask
    [B, K] bool or None (False = padding), pivots: one LongTensor [B, n] per layer (n may be 0).
    """

    window_start: torch.Tensor
    block: int
    span: int
    pivot_bias: float
    key_mask: torch.Tensor | None
    pivots: list[torch.Tensor]


def sparse_window_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window_start: torch.Tensor,
    block: int,
    span: int,
    pivot_idx: torch.Tensor,
    pivot_bias: float,
    key_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Window-plus-pivot attention without an s x s matrix.

    query [B, H, Q, D] holds the last Q positions of key/value [B, H, K, D]. The query at absolute position p
    attends to the keys in [window_start[p], p] and to the pivots j (pivot_idx [B, n], absolute positions) with
    j < window_start[p], whose logits get `pivot_bias`; one softmax over both. Queries go in blocks of `block`
    (span must be a multiple of it); every query of block g finds its window inside one chunk of `span` keys ending
    at the block's last query, an overlapping strided view of the keys (no copy). Work goes one (batch, head) row
    and a step of blocks at a time, so every product is one plain GEMM and the scores of a step
    ([blocks, block, pivots + span]) are the only transient; they are recomputed in backward (as flash attention
    does), so nothing quadratic is kept for backward. Returns [B, Q, H, D], contiguous.
    """
    geometry = _SparseGeometry(query, key, window_start, block, span, pivot_idx, pivot_bias, key_mask)
    seed = int(torch.randint(0, 2**62, (1,))) if dropout > 0 else 0
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _SparseWindowAttention.apply(query, key, value, geometry, scaling, dropout, seed)
    return _sparse_forward(query, key, value, geometry, scaling, dropout, seed)


# Score elements per (batch, head) row and step of blocks (4 MiB in fp32): large enough that the per-step Python
# and dispatch overhead is small next to the GEMMs, small enough to stay a minor transient.
_STEP_ELEMENTS = 2**20


class _SparseGeometry:
    """Index bookkeeping of sparse_window_attention: padding, per-block key windows, steps and additive masks.

    Keys live in a padded frame: row i of the padded keys is absolute position `chunk_start + i`, and the window
    chunk of block g is rows [g * block, g * block + span). Pivots are sorted, so the pivots a step of blocks can
    see are a prefix of them (those left of the step's last window), and only that prefix is scored.
    """

    def __init__(self, query, key, window_start, block, span, pivot_idx, pivot_bias, key_mask):
        bsz, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        device = query.device
        if span % block:
            raise ValueError(f"span ({span}) must be a multiple of block ({block})")
        self.q_len, self.k_len, self.block, self.span = q_len, k_len, block, span
        self.n_blocks = -(-q_len // block)
        self.q_pad = self.n_blocks * block - q_len
        self.q_offset = k_len - q_len
        self.chunk_start = self.q_offset + block - span  # absolute position of the first key of block 0's chunk
        self.left_pad, self.first = max(0, -self.chunk_start), max(0, self.chunk_start)
        self.pivot_bias = pivot_bias
        # Only scalars, the caller's window_start and [B, n] pivot tensors are kept (this object lives until
        # backward); positions and masks of a step are built in mask().
        self.window_start = window_start.to(device)
        self.raw_pivots = pivot_idx.sort(dim=-1).values
        self.pivot_idx = self.raw_pivots.clamp(max=k_len - 1)  # positions past the keys are never visible
        self.n_pivots = pivot_idx.shape[1]
        self.key_mask_chunks = self.pivot_visible = None
        if key_mask is not None:
            mask = F.pad(key_mask[:, self.first :].bool(), (self.left_pad, self.q_pad), value=False)
            self.key_mask_chunks = mask.unfold(1, span, block)  # [B, G, span] view
            self.pivot_visible = key_mask.bool().gather(1, self.pivot_idx)  # [B, n]

        # Steps of blocks, each with the number of (sorted) pivots its queries may see.
        step = max(1, _STEP_ELEMENTS // (block * (self.n_pivots + span)))
        bounds = list(range(0, self.n_blocks, step)) + [self.n_blocks]
        self.steps = list(zip(bounds[:-1], bounds[1:]))
        counts = [0] * len(self.steps)
        if self.n_pivots:
            starts = torch.stack([self.window_start[g0 * block : g1 * block].amax() for g0, g1 in self.steps])
            counts = (self.raw_pivots[:, None, :] < starts[None, :, None]).sum(-1).amax(0).tolist()
        self.pivot_counts = counts
        self.max_step = max(g1 - g0 for g0, g1 in self.steps)

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, K, D] -> [B, H, (G - 1) * block + span, D] in the padded key frame (zeros outside the keys)."""
        return F.pad(x[:, :, self.first :], (0, 0, self.left_pad, self.q_pad)).contiguous()

    def windows(self, padded: torch.Tensor) -> torch.Tensor:
        """Padded keys -> [B, H, G, span, D], a strided view (overlapping windows)."""
        return padded.unfold(2, self.span, self.block).transpose(-1, -2)

    def pivots(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, K, D] -> the pivot rows [B, H, n, D]."""
        bsz, heads, _, head_dim = x.shape
        return x.gather(2, self.pivot_idx[:, None, :, None].expand(bsz, heads, self.n_pivots, head_dim))

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """Adjoint of padded(): [B, H, padded, D] -> [B, H, K, D] (a view unless the keys start past the frame)."""
        x = padded[:, :, self.left_pad : self.left_pad + self.k_len - self.first]
        return F.pad(x, (0, 0, self.first, 0)) if self.first else x

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Q, H, D] -> [B, G * block, H, D], zero rows appended to fill the last block."""
        return F.pad(x, (0, 0, 0, 0, 0, self.q_pad)) if self.q_pad else x

    def mask(self, g0: int, g1: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask [B|1, g, block, n + span] of blocks g0..g1 against their first n pivots and their window
        chunks: pivot_bias on visible pivots, 0 on window keys, -inf elsewhere."""
        g, block, device = g1 - g0, self.block, self.window_start.device
        q_pos = torch.arange(self.q_offset + g0 * block, self.q_offset + g1 * block, device=device).view(g, block, 1)
        k_pos = torch.arange(g0, g1, device=device).view(g, 1, 1) * block + torch.arange(self.span, device=device)
        k_pos = k_pos + self.chunk_start  # [g, 1, span] absolute key positions of the chunks
        start = self.window_start[g0 * block : g1 * block]
        start = F.pad(start, (0, g * block - start.shape[0]), value=self.k_len).view(g, block, 1)
        start = torch.minimum(start, q_pos)  # padded query rows attend to themselves only
        window = (k_pos >= start) & (k_pos <= q_pos) & (k_pos >= 0)  # [g, block, span]
        if self.key_mask_chunks is not None:
            window = (window & self.key_mask_chunks[:, g0:g1, None, :]) | (k_pos == q_pos)
        else:
            window = window.unsqueeze(0)
        values = torch.zeros(n + self.span, dtype=dtype, device=device)
        if n:
            values[:n] = self.pivot_bias
            pivots = self.raw_pivots[:, None, None, :n] < start  # [B, g, block, n]
            if self.pivot_visible is not None:
                pivots = pivots & self.pivot_visible[:, None, None, :n]
            window = torch.cat([pivots, window.expand(pivots.shape[0], -1, -1, -1)], dim=-1)
        # -inf (not the dtype's min): exp(-inf) is fast where exp of huge negatives is not; every row keeps at
        # least its own key, so no row is empty.
        return torch.where(window, values, float("-inf"))


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics run in fp32 at least (as CogView's fp32 softmax), in the input's dtype if wider."""
    return torch.promote_types(x.dtype, torch.float32)


def _dropout_mask(shape, p: float, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, device=device) >= p).to(dtype) / (1 - p)


def _scores(x: torch.Tensor, windows: torch.Tensor, pivots: torch.Tensor, block: int, out: torch.Tensor):
    """x [g * block, D] against its blocks' window rows [g, span, D] and the pivot rows [n, D], written into out
    [g, block, n + span] (pivots first). Used for q.K^T and for dO.V^T."""
    n = pivots.shape[0]
    torch.bmm(x.unflatten(0, (windows.shape[0], block)), windows.transpose(1, 2), out=out[..., n:])
    if n:
        torch.mm(x, pivots.t(), out=out.flatten(0, 1)[:, :n])
    return out


def _fold(target: torch.Tensor, grad_windows: torch.Tensor, g0: int, block: int) -> None:
    """Adjoint of the window views: add grad_windows [g, span, D] of blocks g0.. into target [padded, D]."""
    g, span, head_dim = grad_windows.shape
    for j in range(span // block):
        rows = target[(g0 + j) * block : (g0 + j + g) * block].view(g, block, head_dim)
        rows += grad_windows[:, j * block : (j + 1) * block]


class _Operands:
    """What sparse attention reads, as per-row views: scaled queries [B, G * block, H, D] (scaling folded into q is
    cheaper than on the scores), window keys/values [B, H, G, span, D] (overlapping views of padded copies) and
    pivot keys/values [B, H, n, D]."""

    def __init__(self, geo: _SparseGeometry, query, key, value, scaling: float):
        self.q = geo.blocks((query * scaling).transpose(1, 2))
        self.key_windows, self.value_windows = geo.windows(geo.padded(key)), geo.windows(geo.padded(value))
        self.pivot_key, self.pivot_value = geo.pivots(key), geo.pivots(value)

    def probs(self, geo, b, h, g0, g1, n, mask, buffer) -> torch.Tensor:
        """Softmax probabilities (fp32 or wider) [g, block, n + span] of row (b, h), blocks g0..g1, first n pivots."""
        q = self.q[b, g0 * geo.block : g1 * geo.block, h]  # [g * block, D]
        s = _scores(q, self.key_windows[b, h, g0:g1], self.pivot_key[b, h, :n], geo.block, buffer)
        s = s.to(mask.dtype) if s.dtype != mask.dtype else s
        return torch.softmax(s.add_(mask[b if mask.shape[0] > 1 else 0]), dim=-1)


def _buffer(geo: _SparseGeometry, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(geo.max_step * geo.block * (geo.n_pivots + geo.span))


def _view(buffer: torch.Tensor, geo: _SparseGeometry, g: int, n: int) -> torch.Tensor:
    return buffer[: g * geo.block * (n + geo.span)].view(g, geo.block, n + geo.span)


def _sparse_forward(query, key, value, geo: _SparseGeometry, scaling: float, dropout: float, seed: int):
    """Returns out [B, Q, H, D] (contiguous)."""
    bsz, heads, _, head_dim = query.shape
    block = geo.block
    if geo.n_blocks == 1 and dropout == 0:
        return _one_block_forward(query, key, value, geo, scaling)
    ops = _Operands(geo, query, key, value, scaling)
    out = query.new_empty(bsz, geo.n_blocks * block, heads, head_dim)
    buffer = _buffer(geo, query)
    acc = _acc_dtype(query)
    generator = torch.Generator(device=query.device).manual_seed(seed) if dropout > 0 else None
    for (g0, g1), n in zip(geo.steps, geo.pivot_counts):
        mask = geo.mask(g0, g1, n, acc)
        for b in range(bsz):
            for h in range(heads):
                p = ops.probs(geo, b, h, g0, g1, n, mask, _view(buffer, geo, g1 - g0, n))
                if generator is not None:
                    p = p * _dropout_mask(p.shape, dropout, generator, query.device, p.dtype)
                p = p.to(query.dtype)
                o = out[b, g0 * block : g1 * block, h]  # [g * block, D]
                torch.bmm(p[..., n:], ops.value_windows[b, h, g0:g1], out=o.unflatten(0, (g1 - g0, block)))
                if n:
                    o.addmm_(p.flatten(0, 1)[:, :n], ops.pivot_value[b, h, :n])
    return out[:, : geo.q_len]


def _one_block_forward(query, key, value, geo: _SparseGeometry, scaling: float) -> torch.Tensor:
    """_sparse_forward when all queries form one block (decoding, short prompts): every (batch, head) row at once,
    a few ops whatever the number of heads. Returns [B, Q, H, D]."""
    n = geo.pivot_counts[0]
    q = geo.blocks((query * scaling).transpose(1, 2)).transpose(1, 2)  # [B, H, block, D]
    key_window, value_window = geo.windows(geo.padded(key))[:, :, 0], geo.windows(geo.padded(value))[:, :, 0]
    scores = torch.matmul(q, key_window.transpose(-1, -2))  # [B, H, block, span]
    if n:
        pivot_key, pivot_value = geo.pivots(key)[:, :, :n], geo.pivots(value)[:, :, :n]
        scores = torch.cat([torch.matmul(q, pivot_key.transpose(-1, -2)), scores], dim=-1)
    mask = geo.mask(0, 1, n, _acc_dtype(query))  # [B|1, 1, block, n + span]
    p = torch.softmax(scores.to(mask.dtype) + mask, dim=-1).to(query.dtype)
    out = torch.matmul(p[..., n:], value_window)
    if n:
        out = out + torch.matmul(p[..., :n], pivot_value)
    return out.transpose(1, 2)[:, : geo.q_len].contiguous()


class _SparseWindowAttention(torch.autograd.Function):
    """Memory-efficient autograd for sparse_window_attention: saves q, k, v and out (no more than dense sdpa
    keeps); recomputes the probabilities step by step in backward (dropout masks regenerated from the seed)."""

    @staticmethod
    def forward(ctx, query, key, value, geo, scaling, dropout, seed):
        out = _sparse_forward(query, key, value, geo, scaling, dropout, seed)
        ctx.save_for_backward(query, key, value, out)
        ctx.geo, ctx.scaling, ctx.dropout, ctx.seed = geo, scaling, dropout, seed
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out = ctx.saved_tensors
        geo, scaling, dropout = ctx.geo, ctx.scaling, ctx.dropout
        bsz, heads, _, head_dim = query.shape
        block = geo.block
        acc = _acc_dtype(query)

        ops = _Operands(geo, query, key, value, scaling)
        d_out = geo.blocks(grad_out)  # [B, G * block, H, D]
        # softmax backward needs rowsum(dO * O) per query
        delta = geo.blocks((grad_out.to(acc) * out.to(acc)).sum(-1, keepdim=True))  # [B, G * block, H, 1]
        d_query = torch.empty_like(ops.q)
        # key/value gradients in the padded frame, fp32 at least: several blocks add into each key
        frame = ops.key_windows.shape[:2] + ((geo.n_blocks - 1) * block + geo.span, head_dim)
        d_key_padded = key.new_zeros(frame, dtype=acc)
        d_value_padded = torch.zeros_like(d_key_padded)
        d_pivot_key = torch.zeros_like(ops.pivot_key, dtype=acc)
        d_pivot_value = torch.zeros_like(d_pivot_key)
        buffer, d_buffer = _buffer(geo, query), _buffer(geo, query)
        generator = torch.Generator(device=query.device).manual_seed(ctx.seed) if dropout > 0 else None
        for (g0, g1), n in zip(geo.steps, geo.pivot_counts):
            g, rows = g1 - g0, slice(g0 * block, g1 * block)
            mask = geo.mask(g0, g1, n, acc)
            for b in range(bsz):
                for h in range(heads):
                    p = ops.probs(geo, b, h, g0, g1, n, mask, _view(buffer, geo, g, n))  # [g, block, n + span]
                    do = d_out[b, rows, h]  # [g * block, D]
                    value_windows, pivot_value = ops.value_windows[b, h, g0:g1], ops.pivot_value[b, h, :n]
                    dp = _scores(do, value_windows, pivot_value, block, _view(d_buffer, geo, g, n))
                    dp = dp.to(acc) if dp.dtype != acc else dp
                    p_used = p
                    if generator is not None:
                        drop = _dropout_mask(p.shape, dropout, generator, query.device, p.dtype)
                        p_used, dp = p * drop, dp * drop
                    p_used = p_used.to(query.dtype)
                    # dV = P^T dO: window part folded back onto the keys, pivot part summed over the blocks
                    dv_windows = torch.bmm(p_used[..., n:].transpose(1, 2), do.unflatten(0, (g, block)))
                    _fold(d_value_padded[b, h], dv_windows, g0, block)
                    # softmax backward, in place: dS = P * (dP - rowsum(dO * O))
                    ds = dp.sub_(delta[b, rows, h].unflatten(0, (g, block))).mul_(p).to(query.dtype)
                    q = ops.q[b, rows, h]  # [g * block, D]
                    dq = d_query[b, rows, h]
                    torch.bmm(ds[..., n:], ops.key_windows[b, h, g0:g1], out=dq.unflatten(0, (g, block)))
                    dk_windows = torch.bmm(ds[..., n:].transpose(1, 2), q.unflatten(0, (g, block)))
                    _fold(d_key_padded[b, h], dk_windows, g0, block)
                    if n:
                        d_pivot_value[b, h, :n] += torch.mm(p_used.flatten(0, 1)[:, :n].t(), do)
                        dq.addmm_(ds.flatten(0, 1)[:, :n], ops.pivot_key[b, h, :n])
                        d_pivot_key[b, h, :n] += torch.mm(ds.flatten(0, 1)[:, :n].t(), q)
        d_key, d_value = geo.unpad(d_key_padded), geo.unpad(d_value_padded)
        if geo.n_pivots:
            index = geo.pivot_idx[:, None, :, None].expand(d_pivot_key.shape)
            d_key.scatter_add_(2, index, d_pivot_key)
            d_value.scatter_add_(2, index, d_pivot_value)
        d_query = d_query[:, : geo.q_len].mul_(scaling).transpose(1, 2)  # q was scaled before the scores
        return d_query, d_key.to(key.dtype), d_value.to(value.dtype), None, None, None, None


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
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        bsz, q_len, _ = hidden_states.shape
        # With memory, keys and values are recomputed from the (normalised) memory, as CogView does.
        x = hidden_states if mem is None else torch.cat([mem, hidden_states], dim=1)
        query, key, value = self.query_key_value(x).split(self.hidden_size, dim=-1)
        query = query[:, -q_len:].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, Q, D]
        key = key.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, M+Q, D]
        value = value.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [B, H, K, D]

        dropout = self.attention_dropout if self.training else 0.0
        attn_weights = None
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


def sample_pivots(
    is_text: torch.Tensor,
    is_image: torch.Tensor,
    num_pivots: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Every text position plus a uniform sample of image positions, `num_pivots` per row, sorted.

    is_text / is_image: [B, L] bool (padding in neither). Returns LongTensor [B, num_pivots]. The caller checks
    that every row has enough candidates (see `check_pivot_candidates`).
    """
    bsz, length = is_text.shape
    rand_device = generator.device if generator is not None else is_text.device
    noise = torch.rand(bsz, length, generator=generator, device=rand_device).to(is_text.device)
    # Text first (key -1), then images in random order, never anything else (key 2).
    keys = torch.where(is_text, -1.0, torch.where(is_image, noise, 2.0))
    return keys.topk(num_pivots, dim=-1, largest=False).indices.sort(dim=-1).values


def _check_token_tensor(name: str, ids) -> None:
    """TypeError / ValueError naming `name` unless `ids` is a non-empty integer tensor [batch, seq] (no device sync)."""
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an integer tensor of token ids [batch, seq], got {kind}")
    if ids.dim() != 2 or ids.numel() == 0:
        raise ValueError(f"{name} must have a non-empty shape [batch, seq], got {list(ids.shape)}")


def _check_embeds(name: str, embeds, hidden_size: int) -> None:
    """TypeError / ValueError naming `name` unless `embeds` is a finite float tensor [batch, seq, hidden_size]."""
    if not isinstance(embeds, torch.Tensor) or not embeds.is_floating_point():
        kind = embeds.dtype if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise TypeError(f"{name} must be a floating-point tensor [batch, seq, hidden_size], got {kind}")
    if embeds.dim() != 3 or embeds.shape[-1] != hidden_size or embeds.numel() == 0:
        raise ValueError(
            f"{name} must have a non-empty shape [batch, seq, hidden_size={hidden_size}], got {list(embeds.shape)}"
        )
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(embeds).all()):
        raise ValueError(f"{name} holds NaN or inf values")


def check_pivot_candidates(is_text: torch.Tensor, is_image: torch.Tensor, num_pivots: int, mode: int) -> None:
    n_text, n_image = is_text.sum(-1), is_image.sum(-1)
    too_many_text = n_text > num_pivots
    if bool(too_many_text.any()):
        row = int(too_many_text.nonzero()[0, 0])
        raise ValueError(
            f"is_sparse={mode}: row {row} has {int(n_text[row])} text tokens but only {num_pivots} pivots per row are "
            f"drawn (every text token is a pivot); raise num_pivot or shorten the text"
        )
    too_few = n_text + n_image < num_pivots
    if bool(too_few.any()):
        row = int(too_few.nonzero()[0, 0])
        raise ValueError(
            f"is_sparse={mode}: row {row} has {int(n_text[row])} text and {int(n_image[row])} image tokens available "
            f"as pivots, fewer than the {num_pivots} pivots needed; lower num_pivot, pass pivot_idx, or use is_sparse=0"
        )


class GPT2SparseModel(GPT2SparsePreTrainedModel):
    """The CogView transformer: word + position embeddings, `num_layers` blocks, final LayerNorm."""

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
        **kwargs,
    ) -> GPT2SparseModelOutput | tuple:
        r"""
        mems: Transformer-XL memory returned by the previous call (`outputs.mems`); keys and values of this call
            are computed over memory + input. Exclusive with `past_key_values`.
        is_sparse: attention mode for this call, 0 dense, 1 sparse training, 2 sparse inference (default
            `config.is_sparse`).
        sep: mode 0 only; the first `sep` tokens of this call attend to each other both ways (an int, or a
            LongTensor [batch] for one prefix length per row).
        pivot_idx: LongTensor [batch, n] of absolute key positions used as pivots by every layer instead of
            sampling. Mode 1 adds log(seq_len // n) to their logits; mode 2 uses those left of each query's window.
        image_mask: bool [batch, key_length], True where a key (cache or memory included) is an image token;
            defaults to `input_ids < config.num_image_tokens`. Mode 2 needs it when it samples pivots among cached
            positions (`generate` passes it).
        generator: a torch.Generator that makes pivot sampling reproducible.
        """
        config = self.config
        past_key_values = take_cache(past_key_values, kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(config, "output_hidden_states", False)
        if isinstance(is_sparse, bool) or not isinstance(is_sparse, (int, torch.Tensor, type(None))):
            raise TypeError(
                f"is_sparse must be an int (0 dense, 1 sparse training, 2 sparse inference), got {is_sparse!r}"
            )
        mode = config.is_sparse if is_sparse is None else int(is_sparse)
        if mode not in (0, 1, 2):
            raise ValueError(f"is_sparse must be 0 (dense), 1 (sparse training) or 2 (sparse inference), got {mode}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            _check_token_tensor("input_ids", input_ids)
        else:
            _check_embeds("inputs_embeds", inputs_embeds, config.hidden_size)
        check_ranges = not torch.compiler.is_compiling()  # data-dependent checks would break a compiled graph
        if input_ids is not None:
            if (
                check_ranges
                and input_ids.numel()
                and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size)
            ):
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]"
                )
            inputs_embeds = self.word_embeddings(input_ids)
        bsz, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        use_cache = config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # resolved first: the checkpointed layers warn about a cache they are handed
        if mems is not None and len(mems) == 0:
            mems = None
        if mems is not None:
            if past_key_values is not None:
                raise ValueError("Pass either mems (Transformer-XL memory) or past_key_values (a Cache), not both")
            if mode == 1:
                raise ValueError("is_sparse=1 (sparse training) does not support mems; use is_sparse=0 or 2")
            if len(mems) < config.num_layers:
                raise ValueError(f"mems must hold at least num_layers={config.num_layers} tensors, got {len(mems)}")
            if any(
                not isinstance(m, torch.Tensor)
                or m.dim() != 3
                or m.shape[0] != bsz
                or m.shape[-1] != config.hidden_size
                for m in mems[: config.num_layers]
            ):
                raise ValueError(f"every mems tensor must have shape [batch={bsz}, mem_len, {config.hidden_size}]")
            use_cache = False
            past_len = mems[0].shape[1]
        else:
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=config)
            if past_key_values is not None:
                use_growing_kv_layers(past_key_values)
            past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        k_len = past_len + q_len
        if mode == 1 and past_len > 0:
            raise ValueError(
                "is_sparse=1 (sparse training) needs the whole sequence in one call, without a cache or memory; "
                "use is_sparse=2 or 0 to decode"
            )

        if position_ids is None:
            if k_len > config.max_position_embeddings:
                raise ValueError(
                    f"sequence length {k_len} (including {past_len} cached/memory positions) exceeds "
                    f"max_position_embeddings={config.max_position_embeddings}"
                )
            position_ids = torch.arange(past_len, k_len, device=device).unsqueeze(0)
        elif position_ids.is_floating_point():
            raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        elif check_ranges and position_ids.numel():
            low, high = torch.stack(torch.aminmax(position_ids)).tolist()  # one device sync
            if low < 0 or high >= config.max_position_embeddings:
                raise ValueError(
                    f"position_ids must lie in [0, max_position_embeddings={config.max_position_embeddings}), "
                    f"got values in [{low}, {high}]"
                )

        key_mask = None
        if attention_mask is not None and not check_ranges:
            key_mask = attention_mask.bool()  # compiled: no data-dependent checks (an all-ones mask masks nothing)
        elif attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (bsz, k_len):
                raise ValueError(
                    f"attention_mask must be a 2-D [batch, key_length] padding mask of shape ({bsz}, {k_len}) "
                    f"(cache/memory positions included), got {tuple(attention_mask.shape)}"
                )
            is_pad = attention_mask == 0
            flags = torch.stack(
                (((attention_mask != 0) & (attention_mask != 1)).any(), is_pad.any(), is_pad.all(-1).any())
            )
            not_binary, has_padding, empty_row = flags.tolist()  # one device sync for all three
            if not_binary:
                raise ValueError("attention_mask must hold 0/1 (1 = real token, 0 = padding), got other values")
            if empty_row:
                raise ValueError("attention_mask has a row of padding only: every row needs at least one real token")
            if has_padding:
                key_mask = attention_mask.bool()
        if sep is not None:
            sep_values = torch.as_tensor(sep)
            if sep_values.is_floating_point() or sep_values.dtype == torch.bool:
                raise TypeError(f"sep must be an int or an integer tensor [batch] of prefix lengths, got {sep!r}")
            if sep_values.numel() not in (1, bsz) or bool((sep_values < 0).any()):
                raise ValueError(f"sep must be one prefix length >= 0, or one per row (batch={bsz}), got {sep!r}")

        dense_mask, sparse = None, None
        if mode == 0:
            dense_mask = self._dense_mask(q_len, past_len, key_mask, sep, device)
        else:
            if sep is not None and bool(torch.as_tensor(sep).ne(0).any()):
                raise ValueError(f"sep (a bidirectional prefix) is only supported with is_sparse=0, got {mode}")
            sparse = self._sparse_plan(
                mode, input_ids, bsz, q_len, past_len, key_mask, pivot_idx, image_mask, generator, device
            )

        hidden_states = inputs_embeds + self.position_embeddings(position_ids)
        hidden_states = self.embedding_dropout(hidden_states)

        keep_mems = config.max_memory_length > 0
        mem_layers = [hidden_states.detach()] if keep_mems else []
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, attn_weights = layer(
                hidden_states,
                attention_mask=dense_mask,
                sparse=sparse,
                past_key_values=past_key_values,
                mem=mems[i] if mems is not None else None,
                use_cache=use_cache,
            )
            if keep_mems:
                mem_layers.append(hidden_states.detach())
            if output_attentions:
                all_attentions += (attn_weights,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        new_mems = self._update_mems(mem_layers, mems) if keep_mems else None
        return GPT2SparseModelOutput(
            last_hidden_state=hidden_states,
            **cache_field(past_key_values if use_cache else None),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            mems=new_mems,
        )

    def _dense_mask(
        self,
        q_len: int,
        past_len: int,
        key_mask: torch.Tensor | None,
        sep: int | torch.Tensor | None,
        device: torch.device,
    ) -> torch.Tensor | None:
        """Bool mask [B|1, 1, Q, K] (True = attend): causal, plus the first `sep` tokens of this call visible to all
        of its queries (CogView's prefix), minus padding. None when sdpa's own causal path is exact."""
        has_sep = sep is not None and bool(torch.as_tensor(sep).ne(0).any())
        if (
            key_mask is None
            and not has_sep
            and (past_len == 0 or q_len == 1)
            and self.config._attn_implementation == "sdpa"
        ):
            return None
        k_len = past_len + q_len
        q_pos = torch.arange(past_len, k_len, device=device).view(1, q_len, 1)
        k_pos = torch.arange(k_len, device=device).view(1, 1, k_len)
        allowed = k_pos <= q_pos  # [1, Q, K]
        if has_sep:
            sep_t = torch.as_tensor(sep, device=device).view(-1, 1, 1)
            allowed = allowed | (k_pos < past_len + sep_t)  # [B|1, Q, K]
        if key_mask is not None:
            # padded queries keep their own key so their (discarded) rows stay finite
            allowed = (allowed & key_mask[:, None, :].to(device)) | (k_pos == q_pos)
        return allowed.unsqueeze(1)

    def _sparse_plan(
        self,
        mode: int,
        input_ids: torch.Tensor | None,
        bsz: int,
        q_len: int,
        past_len: int,
        key_mask: torch.Tensor | None,
        pivot_idx: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> SparsePlan:
        config = self.config
        w, t = config.query_window, config.key_window_times
        k_len = past_len + q_len
        positions = torch.arange(past_len, k_len, device=device)
        if mode == 1:
            config.validate_sparse_training_length(q_len)
            window_start = (positions // w - (t - 1)) * w  # first key of the query's t-block window
            block, span = w, t * w
            pivot_limit = k_len  # any key may be a pivot; the window mask decides which queries see it
        else:
            window_start = positions - (t * w - 1)  # the last t*w keys, the query included
            block = min(q_len, w)
            span = -(-(t * w + block - 1) // block) * block  # covers every window of the block, a multiple of it
            pivot_limit = max(0, k_len - t * w)  # keys left of the last query's window

        if pivot_idx is not None:
            if pivot_idx.dim() != 2 or pivot_idx.shape[0] not in (1, bsz):
                raise ValueError(f"pivot_idx must be a LongTensor [batch={bsz}, n], got shape {tuple(pivot_idx.shape)}")
            if pivot_idx.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"pivot_idx must hold integer key positions, got dtype {pivot_idx.dtype}")
            # Mode 2 accepts positions not reached yet (a fixed pivot set over a whole generation): they only
            # become visible once they lie left of a query's window.
            upper = k_len if mode == 1 else config.max_position_embeddings
            if pivot_idx.numel() and (int(pivot_idx.min()) < 0 or int(pivot_idx.max()) >= upper):
                raise ValueError(
                    f"pivot_idx holds key positions in [{int(pivot_idx.min())}, {int(pivot_idx.max())}], outside "
                    f"[0, {'key_length' if mode == 1 else 'max_position_embeddings'}={upper})"
                )
            if mode == 1 and not 0 < pivot_idx.shape[1] <= q_len:
                raise ValueError(
                    f"is_sparse=1 needs between 1 and seq_len={q_len} pivots, pivot_idx has {pivot_idx.shape[1]}"
                )
            pivots = pivot_idx.to(device=device, dtype=torch.long).expand(bsz, -1)
            per_layer = [pivots] * config.num_layers
            n_pivots = pivots.shape[1]
        else:
            per_layer, n_pivots = self._sample_pivots(
                mode, input_ids, bsz, pivot_limit, past_len, key_mask, image_mask, generator, device
            )
        pivot_bias = math.log(q_len // n_pivots) if mode == 1 else 0.0
        return SparsePlan(window_start, block, span, pivot_bias, key_mask, per_layer)

    def _sample_pivots(
        self,
        mode: int,
        input_ids: torch.Tensor | None,
        bsz: int,
        limit: int,
        past_len: int,
        key_mask: torch.Tensor | None,
        image_mask: torch.Tensor | None,
        generator: torch.Generator | None,
        device: torch.device,
    ) -> tuple[list[torch.Tensor], int]:
        config = self.config
        empty = torch.zeros(bsz, 0, dtype=torch.long, device=device)
        if limit <= 0:
            return [empty] * config.num_layers, 0
        if image_mask is not None:
            if image_mask.dim() != 2 or image_mask.shape[0] != bsz or image_mask.shape[1] < limit:
                raise ValueError(
                    f"image_mask must be a bool tensor [batch={bsz}, key_length] covering the cached positions too, "
                    f"got shape {tuple(image_mask.shape)}"
                )
            is_image = image_mask[:, :limit].to(device=device, dtype=torch.bool)
        elif input_ids is not None and past_len == 0:
            is_image = input_ids[:, :limit] < config.num_image_tokens
        else:
            raise ValueError(
                f"is_sparse={mode} samples pivots among positions whose tokens are unknown here (cached positions or "
                f"inputs_embeds): pass image_mask [batch, key_length] or pivot_idx"
            )
        valid = key_mask[:, :limit] if key_mask is not None else torch.ones_like(is_image)
        is_text, is_image = valid & ~is_image, valid & is_image
        if mode == 1:
            n_pivots = config.num_pivot
            if n_pivots > limit:
                raise ValueError(f"num_pivot={n_pivots} exceeds the sequence length {limit} in is_sparse=1")
        else:
            # CogView's inference count: all text plus image pivots in proportion num_pivot / max_position_embeddings.
            max_text = int(is_text.sum(-1).max())
            n_left = int(valid.sum(-1).min())
            ratio = config.num_pivot / config.max_position_embeddings
            n_pivots = max_text + max(0, int((n_left - max_text) * ratio))
        check_pivot_candidates(is_text, is_image, n_pivots, mode)
        if n_pivots == 0:
            return [empty] * config.num_layers, 0
        per_layer = [sample_pivots(is_text, is_image, n_pivots, generator) for _ in range(config.num_layers)]
        return per_layer, n_pivots

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


class GPT2SparseLMHeadModel(GPT2SparsePreTrainedModel, GenerationMixin, CompiledDecoding):
    """CogView's GPT2Model: the transformer plus an output layer tied to the word embeddings."""

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
        """`GenerationMixin.generate`, with the prompt checked first: a clear error for ids that are not an integer
        [batch, seq] tensor, or a padding mask of another shape, instead of one from deep inside generate()."""
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is not None:
            _check_token_tensor("input_ids", ids)
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.shape != ids.shape:
                raise ValueError(f"attention_mask has shape {list(mask.shape)}, but input_ids has {list(ids.shape)}")
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, past_key_values: Cache | None = None, **kwargs
    ) -> dict:
        past = generation_cache(self.config, past_key_values, kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None and (past is None or past.get_seq_length() == 0) and not bool(mask[:, -1].all()):
            # the next token would be predicted from a padding position: a silently wrong continuation
            raise ValueError(
                "the batch is right-padded (attention_mask has 0 in the last column); generation needs left padding"
            )
        model_inputs = super().prepare_inputs_for_generation(input_ids, **generation_cache_kwarg(past), **kwargs)
        mode = model_inputs.get("is_sparse")
        mode = self.config.is_sparse if mode is None else mode
        if mode == 2 and model_inputs.get("image_mask") is None and model_inputs.get("pivot_idx") is None:
            # Sparse inference samples pivots among cached positions: tell it which of them are image tokens.
            model_inputs["image_mask"] = input_ids < self.config.num_image_tokens
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
        past_key_values = take_cache(past_key_values, kwargs)
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
            if labels.is_floating_point() or labels.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"labels must be integer token ids of the input's shape {list(hidden_states.shape[:2])}, got "
                    f"{labels.dtype} {list(labels.shape)}"
                )
            bad = ((labels < 0) | (labels >= self.config.vocab_size)) & (labels != -100)
            if not torch.compiler.is_compiling() and bool(bad.any()):
                raise ValueError(
                    f"labels hold {int(labels[bad][0])}, outside [0, vocab_size={self.config.vocab_size}) and not -100"
                )
            loss = causal_lm_loss(logits, labels, num_items_in_batch)

        return GPT2SparseCausalLMOutput(
            loss=loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mems=outputs.mems,
        )


__all__ = ["GPT2SparseLMHeadModel", "GPT2SparseModel", "GPT2SparsePreTrainedModel"]
