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
Modes 1 and 2 never build an s x s matrix: queries are processed in blocks against their own chunk of keys plus
the gathered pivots, a few blocks at a time (transient memory O(s * (P + t*w)) at most), and a custom backward
recomputes the probabilities (as flash attention does), so training keeps only q, k, v, the output and the softmax
log-normaliser per layer.

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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import can_return_tuple, logging

from .configuration_gpt2_sparse import GPT2SparseConfig

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
    at the block's last query. Scores exist only for a few blocks at a time ([B, H, blocks, block, n + span]) and
    are recomputed in backward (as flash attention does), so the transient memory is one chunk of blocks and
    nothing quadratic is kept for backward. Returns [B, Q, H, D].
    """
    geometry = _SparseGeometry(query, key, window_start, block, span, pivot_idx, pivot_bias, key_mask)
    seed = int(torch.randint(0, 2**62, (1,))) if dropout > 0 else 0
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        out = _SparseWindowAttention.apply(query, key, value, geometry, scaling, dropout, seed)
    else:
        out = _sparse_forward(query, key, value, geometry, scaling, dropout, seed)
    return out.transpose(1, 2)  # [B, Q, H, D]


class _SparseGeometry:
    """Index bookkeeping of sparse_window_attention: padding, key chunks and the allowed masks."""

    def __init__(self, query, key, window_start, block, span, pivot_idx, pivot_bias, key_mask):
        bsz, heads, q_len, _ = query.shape
        k_len = key.shape[2]
        device = query.device
        if span % block:
            raise ValueError(f"span ({span}) must be a multiple of block ({block})")
        self.q_len, self.k_len, self.block, self.span = q_len, k_len, block, span
        self.n_blocks = -(-q_len // block)
        self.q_pad = self.n_blocks * block - q_len
        q_offset = k_len - q_len
        # Keys of chunk g: absolute positions chunk_start + g * block + [0, span).
        chunk_start = q_offset + block - span
        self.left_pad, self.first = max(0, -chunk_start), max(0, chunk_start)
        self.pivot_bias = pivot_bias
        self.pivot_idx = pivot_idx.clamp(max=k_len - 1)  # positions past the keys are masked below
        self.n_pivots = pivot_idx.shape[1]

        # Small index tensors; the [blocks, block, n + span] masks are built per chunk of blocks in allowed().
        self.q_pos = torch.arange(q_offset, q_offset + self.n_blocks * block, device=device).view(-1, block, 1)
        self.k_pos = (chunk_start + torch.arange(self.n_blocks, device=device) * block).view(-1, 1, 1) + torch.arange(
            span, device=device
        )
        start = F.pad(window_start.to(device), (0, self.q_pad), value=k_len).view(self.n_blocks, block, 1)
        self.start = torch.minimum(start, self.q_pos)  # padded query rows attend to themselves only
        self.key_mask_chunks = self.pivot_visible = None
        if key_mask is not None:
            mask = F.pad(key_mask[:, self.first :].bool(), (self.left_pad, self.q_pad), value=False)
            self.key_mask_chunks = mask.unfold(1, span, block)  # [B, G, span] view
            self.pivot_visible = key_mask.bool().gather(1, self.pivot_idx)  # [B, n]
        self.raw_pivots = pivot_idx
        # blocks per chunk: about 2**20 score elements (4 MiB in fp32) at a time
        self.step = max(1, 2**20 // (bsz * heads * block * (self.n_pivots + span)))

    def chunks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, K, D] -> [B, H, G, D, span], a strided view (overlapping windows)."""
        x = F.pad(x[:, :, self.first :], (0, 0, self.left_pad, self.q_pad))
        return x.unfold(2, self.span, self.block)

    def new_folded(self, like: torch.Tensor) -> torch.Tensor:
        """Zeroed gradient buffer in padded key coordinates, [B, H, G + span/block - 1, block, D]."""
        bsz, heads, _, head_dim = like.shape
        return like.new_zeros(bsz, heads, self.n_blocks + self.span // self.block - 1, self.block, head_dim)

    def fold_into(self, folded: torch.Tensor, grad_chunks: torch.Tensor, g0: int) -> None:
        """Adjoint of chunks() for blocks g0..: add [B, H, g, span, D] into the buffer of new_folded()."""
        n = grad_chunks.shape[2]
        for j in range(self.span // self.block):
            folded[:, :, g0 + j : g0 + j + n] += grad_chunks[:, :, :, j * self.block : (j + 1) * self.block]

    def unfold_keys(self, folded: torch.Tensor) -> torch.Tensor:
        """new_folded() buffer -> [B, H, K, D]."""
        folded = folded.flatten(2, 3)[:, :, self.left_pad : self.left_pad + self.k_len - self.first]
        return F.pad(folded, (0, 0, self.first, 0))

    def gather_pivots(self, x: torch.Tensor) -> torch.Tensor:
        bsz, heads, _, head_dim = x.shape
        return x.gather(2, self.pivot_idx[:, None, :, None].expand(bsz, heads, self.n_pivots, head_dim))

    def scatter_pivots_(self, target: torch.Tensor, grad: torch.Tensor) -> None:
        """Adjoint of gather_pivots(), accumulated into target in place."""
        bsz, heads, _, head_dim = grad.shape
        target.scatter_add_(2, self.pivot_idx[:, None, :, None].expand(bsz, heads, self.n_pivots, head_dim), grad)

    def blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, Q, D] -> [B, H, G, block, D] (a view unless Q needs padding to whole blocks)."""
        if self.q_pad:
            x = F.pad(x, (0, 0, 0, self.q_pad))
        return x.reshape(x.shape[0], x.shape[1], self.n_blocks, self.block, x.shape[-1])

    def allowed(self, g0: int, g1: int) -> torch.Tensor:
        """Bool [B|1, 1, g, block, n + span] of the keys blocks g0..g1 may attend (pivots first)."""
        q_pos, k_pos, start = self.q_pos[g0:g1], self.k_pos[g0:g1], self.start[g0:g1]
        window = (k_pos >= start) & (k_pos <= q_pos) & (k_pos >= 0)  # [g, block, span]
        if self.key_mask_chunks is not None:
            window = (window & self.key_mask_chunks[:, g0:g1, None, :]) | (k_pos == q_pos)
        else:
            window = window.unsqueeze(0)
        if self.n_pivots:
            pivots = self.raw_pivots[:, None, None, :] < start  # [B, g, block, n]
            if self.pivot_visible is not None:
                pivots = pivots & self.pivot_visible[:, None, None, :]
            window = torch.cat([pivots, window.expand(pivots.shape[0], -1, -1, -1)], dim=-1)
        return window.unsqueeze(1)

    def probs(self, q_blocks, key_chunks, pivot_key, g0, g1, scaling):
        """Attention probabilities (fp32 or wider) of blocks g0..g1: [B, H, g, block, n + span]."""
        s = torch.einsum("bhgqd,bhgdk->bhgqk", q_blocks[:, :, g0:g1], key_chunks[:, :, g0:g1])
        if self.n_pivots:
            s_piv = torch.einsum("bhgqd,bhnd->bhgqn", q_blocks[:, :, g0:g1], pivot_key)
            s = torch.cat([s_piv, s], dim=-1)
        s = s.to(_acc_dtype(s)) * scaling
        if self.n_pivots and self.pivot_bias:
            s[..., : self.n_pivots] += self.pivot_bias
        # -inf (not the dtype's min): exp(-inf) is fast where exp of huge negatives is not; every row keeps at
        # least its own key, so no row is empty.
        return torch.softmax(s.masked_fill_(~self.allowed(g0, g1), float("-inf")), dim=-1)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Softmax statistics run in fp32 at least (as CogView's fp32 softmax), in the input's dtype if wider."""
    return torch.promote_types(x.dtype, torch.float32)


def _dropout_mask(shape, p: float, generator: torch.Generator, device, dtype) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, device=device) >= p).to(dtype) / (1 - p)


def _sparse_forward(query, key, value, geo: _SparseGeometry, scaling: float, dropout: float, seed: int):
    """Returns out [B, H, Q, D]."""
    bsz, heads, _, head_dim = query.shape
    n = geo.n_pivots
    q_blocks = geo.blocks(query)
    key_chunks, value_chunks = geo.chunks(key), geo.chunks(value)
    pivot_key, pivot_value = geo.gather_pivots(key), geo.gather_pivots(value)
    out = query.new_empty(bsz, heads, geo.n_blocks, geo.block, head_dim)
    generator = torch.Generator(device=query.device).manual_seed(seed) if dropout > 0 else None
    for g0 in range(0, geo.n_blocks, geo.step):
        g1 = min(g0 + geo.step, geo.n_blocks)
        p = geo.probs(q_blocks, key_chunks, pivot_key, g0, g1, scaling)
        if generator is not None:
            p = p * _dropout_mask(p.shape, dropout, generator, query.device, p.dtype)
        p = p.to(query.dtype)
        o = torch.einsum("bhgqk,bhgdk->bhgqd", p[..., n:], value_chunks[:, :, g0:g1])
        if n:
            o = o + torch.einsum("bhgqn,bhnd->bhgqd", p[..., :n], pivot_value)
        out[:, :, g0:g1] = o
    return out.flatten(2, 3)[:, :, : geo.q_len]


class _SparseWindowAttention(torch.autograd.Function):
    """Memory-efficient autograd for sparse_window_attention: saves q, k, v and out; recomputes the probabilities
    chunk by chunk of blocks in backward (dropout masks are regenerated from the same seed)."""

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
        n = geo.n_pivots

        q_blocks, d_out, o_blocks = geo.blocks(query), geo.blocks(grad_out), geo.blocks(out)
        key_chunks, value_chunks = geo.chunks(key), geo.chunks(value)
        pivot_key, pivot_value = geo.gather_pivots(key), geo.gather_pivots(value)
        dq = torch.empty_like(q_blocks)
        dk_folded, dv_folded = geo.new_folded(key), geo.new_folded(value)
        d_pivot_key, d_pivot_value = torch.zeros_like(pivot_key), torch.zeros_like(pivot_value)
        generator = torch.Generator(device=query.device).manual_seed(ctx.seed) if dropout > 0 else None
        for g0 in range(0, geo.n_blocks, geo.step):
            g1 = min(g0 + geo.step, geo.n_blocks)
            p = geo.probs(q_blocks, key_chunks, pivot_key, g0, g1, scaling)
            do = d_out[:, :, g0:g1]
            dp = torch.einsum("bhgqd,bhgdk->bhgqk", do, value_chunks[:, :, g0:g1])
            if n:
                dp = torch.cat([torch.einsum("bhgqd,bhnd->bhgqn", do, pivot_value), dp], dim=-1)
            p_used = p
            if generator is not None:
                mask = _dropout_mask(p.shape, dropout, generator, query.device, p.dtype)
                p_used, dp = p * mask, dp * mask
            p_used = p_used.to(query.dtype)
            geo.fold_into(dv_folded, torch.einsum("bhgqk,bhgqd->bhgkd", p_used[..., n:], do), g0)
            # softmax backward: dS = P * (dP - rowsum(dO * O))
            acc = p.dtype
            ds = p * (dp.to(acc) - (do.to(acc) * o_blocks[:, :, g0:g1].to(acc)).sum(-1, keepdim=True))
            ds = (ds * scaling).to(query.dtype)
            qb = q_blocks[:, :, g0:g1]
            dq[:, :, g0:g1] = torch.einsum("bhgqk,bhgdk->bhgqd", ds[..., n:], key_chunks[:, :, g0:g1])
            geo.fold_into(dk_folded, torch.einsum("bhgqk,bhgqd->bhgkd", ds[..., n:], qb), g0)
            if n:
                dq[:, :, g0:g1] += torch.einsum("bhgqn,bhnd->bhgqd", ds[..., :n], pivot_key)
                d_pivot_key += torch.einsum("bhgqn,bhgqd->bhnd", ds[..., :n], qb)
                d_pivot_value += torch.einsum("bhgqn,bhgqd->bhnd", p_used[..., :n], do)
        dk, dv = geo.unfold_keys(dk_folded), geo.unfold_keys(dv_folded)
        if n:
            geo.scatter_pivots_(dk, d_pivot_key)
            geo.scatter_pivots_(dv, d_pivot_value)
        dq = dq.flatten(2, 3)[:, :, : geo.q_len]
        return dq, dk, dv, None, None, None, None


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
            if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # 5.x
                attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                    self.config._attn_implementation, eager_attention_forward
                )
            elif self.config._attn_implementation == "eager":
                attention_interface = eager_attention_forward
            else:  # 4.x
                attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
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


class GPT2SparsePreTrainedModel(PreTrainedModel):
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
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)
        if output_hidden_states is None:
            output_hidden_states = getattr(config, "output_hidden_states", False)
        mode = config.is_sparse if is_sparse is None else int(is_sparse)
        if mode not in (0, 1, 2):
            raise ValueError(f"is_sparse must be 0 (dense), 1 (sparse training) or 2 (sparse inference), got {mode}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
                raise ValueError(
                    f"input_ids must lie in [0, vocab_size={config.vocab_size}), got values in "
                    f"[{int(input_ids.min())}, {int(input_ids.max())}]"
                )
            inputs_embeds = self.word_embeddings(input_ids)
        bsz, q_len = inputs_embeds.shape[:2]
        device = inputs_embeds.device

        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False
        use_cache = config.use_cache if use_cache is None else use_cache
        if mems is not None and len(mems) == 0:
            mems = None
        if mems is not None:
            if past_key_values is not None:
                raise ValueError("Pass either mems (Transformer-XL memory) or past_key_values (a Cache), not both")
            if mode == 1:
                raise ValueError("is_sparse=1 (sparse training) does not support mems; use is_sparse=0 or 2")
            if len(mems) < config.num_layers:
                raise ValueError(f"mems must hold at least num_layers={config.num_layers} tensors, got {len(mems)}")
            if any(m.shape[0] != bsz or m.shape[-1] != config.hidden_size for m in mems[: config.num_layers]):
                raise ValueError(f"every mems tensor must have shape [batch={bsz}, mem_len, {config.hidden_size}]")
            use_cache = False
            past_len = mems[0].shape[1]
        else:
            if use_cache and past_key_values is None:
                past_key_values = DynamicCache(config=config)
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
        elif position_ids.numel() and int(position_ids.max()) >= config.max_position_embeddings:
            raise ValueError(
                f"position_ids must be below max_position_embeddings={config.max_position_embeddings}, "
                f"got {int(position_ids.max())}"
            )

        key_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape != (bsz, k_len):
                raise ValueError(
                    f"attention_mask must be a 2-D [batch, key_length] padding mask of shape ({bsz}, {k_len}) "
                    f"(cache/memory positions included), got {tuple(attention_mask.shape)}"
                )
            if not bool(attention_mask.all()):
                key_mask = attention_mask.bool()

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
                **kwargs,
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
            past_key_values=past_key_values if use_cache else None,
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


class GPT2SparseLMHeadModel(GPT2SparsePreTrainedModel, GenerationMixin):
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

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        model_inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
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
        **kwargs,
    ) -> GPT2SparseCausalLMOutput:
        r"""
        labels: token ids for the next-token loss (shifted inside; -100 is ignored).
        mems, is_sparse, sep, pivot_idx, image_mask, generator: see `GPT2SparseModel.forward`.

        Example:
        ```python
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained("path/to/converted", trust_remote_code=True)
        >>> ids = torch.randint(0, model.config.vocab_size, (1, 8))
        >>> model.generate(ids, max_new_tokens=8, do_sample=False, is_sparse=2)
        ```
        """
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

        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].to(logits.device).reshape(-1)
            loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)

        return GPT2SparseCausalLMOutput(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            mems=outputs.mems,
        )


__all__ = ["GPT2SparseLMHeadModel", "GPT2SparseModel", "GPT2SparsePreTrainedModel"]
