"""CogView's sparse attention (modes 1 and 2 of modeling_gpt2_sparse.py): the window-plus-pivot kernel, its plan
and pivot sampling, on its own so that the model file reads like GPT-2.

What a query sees: the keys of its window (mode 1: the t blocks of w = query_window tokens ending with its own
block; mode 2: the last t*w keys, itself included) plus the pivots left of that window, whose logits get
`pivot_bias` (`log(s // n_pivots)` in mode 1, 0 in mode 2); one softmax over both. Padding keys
(`key_mask` False) are invisible, except that every query keeps its own key so that no row is empty.

Two implementations, chosen by `sparse_window_attention` (the one dispatch point):
- CUDA (no attention dropout, head_dim a power of two in 16..256, at least _FLEX_MIN_QUERIES queries): PyTorch's
  FlexAttention, as two block-sparse calls merged by their log-sum-exp. The window is one call over the keys whose
  block mask lists only the tiles near the diagonal (w=64, t=4: 3 tiles of 128 keys per 128 queries); the pivots
  are gathered into [B, H, n, D] and form a second call on an [s x n] problem, each query block reading only the
  (sorted) pivots left of its windows. The parts give (o1, lse1), (o2, lse2); with lse2 += pivot_bias the result
  is `(o1 * exp(lse1 - m) + o2 * exp(lse2 - m)) / (exp(lse1 - m) + exp(lse2 - m))`, exactly the one softmax over
  window and pivots. Flex computes its own backward (recomputing probabilities, as flash attention does), so
  nothing quadratic is stored. Both calls use one mask function (the same code, tensors as data), and the block
  masks are built once per forward and reused by every layer (the pivot part once per distinct pivot tensor).
- A decoding step of mode 2 (one new query against a cache): a plain masked softmax. The window and the pivots
  become one bool mask over the keys per layer (`decode_step_masks`), computed on the device from the pivot count,
  so nothing on the step waits for the device; the model then runs its dense attention with that mask. With a
  static cache the mask covers all its slots, from the step's slot (`plan_static_cache_step`).
- Everywhere else (the CPU, attention dropout, several queries): a kernel that never builds an s x s matrix either.
  Each (batch, head) row goes a step of query blocks at a time, every block against its own key window (an
  overlapping strided view of the keys, so each product is one plain GEMM with no copies) plus the pivots left of
  it (pivots are sorted, so a step scores only the prefix it can see). The only transient is one step's scores
  (about 4 MiB), and a custom backward recomputes the probabilities, so training keeps only q, k, v and the output
  per layer, no more than dense sdpa does. FlexAttention has no CPU backward, and on the CPU this kernel is faster
  than dense attention already.

Pivot sampling: every text token plus a uniform sample of image tokens (never padding), drawn with torch (an
optional torch.Generator makes it reproducible), per layer in the model's forward so that gradient checkpointing
recomputes with the same pivots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class SparsePlan:
    """Per-call description of sparse attention (modes 1 and 2), shared by all layers except the pivots.

    window_start [Q] (absolute position of the first window key of each query; pivots must lie before it),
    block (queries per block), span (keys per block chunk), pivot_bias (added to pivot logits), key_mask
    [B, K] bool or None (False = padding), pivots: one LongTensor [B, n] per layer (n may be 0).
    block_masks: FlexAttention block masks built by the first layer that needs them, reused by the others.
    """

    window_start: torch.Tensor
    block: int
    span: int
    pivot_bias: float
    key_mask: torch.Tensor | None
    pivots: list[torch.Tensor]
    block_masks: dict = field(default_factory=dict)
    step_masks: list[torch.Tensor] | None = None  # a mode-2 decode step: per layer, bool [B, 1, 1, K] (True: attend)
    key_length: int | None = None  # a static cache's prompt: the keys are its first key_length slots


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
    block_masks: dict | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Window-plus-pivot attention without an s x s matrix.

    query [B, H, Q, D] holds the last Q positions of key/value [B, H, K, D]. The query at absolute position p
    attends to the keys in [window_start[p], p] (window_start nondecreasing) and to the pivots j (pivot_idx [B, n],
    absolute positions) with j < window_start[p], whose logits get `pivot_bias`; one softmax over both. `block` and
    `span` shape the CPU kernel: queries go in blocks of `block` (span a multiple of it), every query of block g
    finding its window inside one chunk of `span` keys ending at the block's last query. `block_masks`: a dict
    shared by the layers of one call (SparsePlan.block_masks) in which the FlexAttention path keeps its block masks.
    backend: "auto" (FlexAttention where it applies, see the module docstring), "flex" or "kernel".
    Returns [B, Q, H, D], contiguous.
    """
    if backend not in ("auto", "flex", "kernel"):
        raise ValueError(f"backend must be 'auto', 'flex' or 'kernel', got {backend!r}")
    if backend == "flex" or (backend == "auto" and _flex_applies(query, dropout)):
        parts = _FlexParts.get(block_masks, query, key, window_start, pivot_idx, key_mask)
        return _two_part_attention(query, key, value, parts, pivot_bias, scaling, _flex_part, fused=True)
    geometry = _SparseGeometry(query, key, window_start, block, span, pivot_idx, pivot_bias, key_mask)
    seed = int(torch.randint(0, 2**62, (1,))) if dropout > 0 else 0
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _SparseWindowAttention.apply(query, key, value, geometry, scaling, dropout, seed)
    return _sparse_forward(query, key, value, geometry, scaling, dropout, seed)


# ---------------------------------------------------------------------------------------------------------------
# FlexAttention path (CUDA): two block-sparse calls merged by their log-sum-exp
# ---------------------------------------------------------------------------------------------------------------
# Below this many queries (decoding steps, short chunks) the kernel's few small GEMMs beat a flex launch, and flex
# would compile a kernel for every new short shape.
_FLEX_MIN_QUERIES = 128
_TILE = 128  # FlexAttention's block-mask tile (queries x keys)
_FAR = 2**30  # a position no window reaches: invisible keys and pivots get it


def _flex_applies(query: torch.Tensor, dropout: float) -> bool:
    head_dim = query.shape[-1]
    return (
        query.is_cuda
        and dropout == 0
        and query.shape[2] >= _FLEX_MIN_QUERIES
        and 16 <= head_dim <= 256
        and head_dim & (head_dim - 1) == 0
        and query.dtype in (torch.float16, torch.bfloat16, torch.float32)
        and _flex_available()
    )


def _flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return has_triton()


def _span_mask(key_pos: torch.Tensor, low: torch.Tensor, high: torch.Tensor, own: torch.Tensor):
    """The mask function of both parts: key column c is visible to query row r when key_pos[b, c] lies in
    [low[r], high[r]], or when c == own[r] (a query's own key, even if padding). Window part: key_pos = the key's
    position (_FAR if padding), [low, high] = [window start, query position], own = query position. Pivot part:
    key_pos = the pivot's position (_FAR if padding), [low, high] = [0, window start - 1], own = -1. One code object
    for both, the data in captured tensors, so torch.compile builds one kernel for both parts and every call."""

    def mask_mod(b, h, q_idx, kv_idx):
        position = key_pos[b, kv_idx]
        return ((position >= low[q_idx]) & (position <= high[q_idx])) | (kv_idx == own[q_idx])

    return mask_mod


def _padded(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """x [..., n] int -> [..., length] int32, filled with `value` (mask functions may read a whole last tile)."""
    return F.pad(x.to(torch.int32), (0, length - x.shape[-1]), value=value).contiguous()


def _tiles(n: int) -> int:
    return -(-n // _TILE)


@dataclass
class _Part:
    """One flex call: the block structure at tile level ([B|1, 1, query tiles, key tiles] bool, `full` tiles need
    no mask function) and the mask function's tensors; `block_mask()` builds (once) the BlockMask."""

    q_len: int
    kv_len: int
    partial: torch.Tensor
    full: torch.Tensor | None
    key_pos: torch.Tensor
    low: torch.Tensor
    high: torch.Tensor
    own: torch.Tensor
    _block_mask: object = None

    def mask_mod(self):
        return _span_mask(self.key_pos, self.low, self.high, self.own)

    def dense(self) -> torch.Tensor:
        """The allowed set [B, 1, Q, KV] bool, evaluated with the same mask function (tests, CPU reference)."""
        b = torch.arange(self.key_pos.shape[0], device=self.key_pos.device).view(-1, 1, 1)
        q = torch.arange(self.q_len, device=b.device).view(1, -1, 1)
        kv = torch.arange(self.kv_len, device=b.device).view(1, 1, -1)
        return self.mask_mod()(b, 0, q, kv).unsqueeze(1)

    def block_mask(self):
        if self._block_mask is None:
            self._block_mask = _make_block_mask(self)
        return self._block_mask


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile lists as BlockMask keeps them: [..., rows, cols] bool -> (listed per row [..., rows] int32, the listed
    columns first [..., rows, cols] int32)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = tiles.to(torch.int8).argsort(dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


def _make_block_mask(part: _Part):
    """The part's BlockMask, with both the key-major lists (forward) and the query-major ones (backward) taken from
    the tile masks we hold. BlockMask.from_kv_blocks would rebuild the query-major lists from the key-major ones
    (a vmapped scatter, then a sort: about 40 small ops and their Python, every time a part is built)."""
    from torch.nn.attention.flex_attention import BlockMask

    kv_num, kv_idx = _ordered(part.partial)
    full_num, full_idx = _ordered(part.full) if part.full is not None else (None, None)
    lengths = (part.q_len, part.kv_len)
    try:
        q_num, q_idx = _ordered(part.partial.transpose(-1, -2))
        full_q_num, full_q_idx = _ordered(part.full.transpose(-1, -2)) if part.full is not None else (None, None)
        return BlockMask(
            seq_lengths=lengths,
            kv_num_blocks=kv_num,
            kv_indices=kv_idx,
            full_kv_num_blocks=full_num,
            full_kv_indices=full_idx,
            q_num_blocks=q_num,
            q_indices=q_idx,
            full_q_num_blocks=full_q_num,
            full_q_indices=full_q_idx,
            BLOCK_SIZE=(_TILE, _TILE),
            mask_mod=part.mask_mod(),
        )
    except TypeError:  # a torch whose BlockMask takes other arguments: the public constructor derives them
        return BlockMask.from_kv_blocks(
            kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=_TILE, mask_mod=part.mask_mod(), seq_lengths=lengths
        )


def _query_tiles(window_start: torch.Tensor, q_pos: torch.Tensor):
    """Per query tile: (lowest window start >= 0, highest window start, first and last query position)."""
    fill = _tiles(q_pos.shape[0]) * _TILE - q_pos.shape[0]

    def per_tile(x, value, reduce):
        return reduce(F.pad(x, (0, fill), value=value).view(-1, _TILE), dim=-1)

    return (
        per_tile(window_start, _FAR, torch.amin).clamp(min=0),
        per_tile(window_start, -_FAR, torch.amax),
        per_tile(q_pos, _FAR, torch.amin),
        per_tile(q_pos, -_FAR, torch.amax),
    )


def _window_part(bsz: int, window_start, q_pos, k_len: int, key_mask) -> _Part:
    """The window over all keys: key tile j is read by query tile i if it meets [lowest start, last query], and
    is full (no mask function) if every query of the tile sees all of it (no padding, whole tiles only)."""
    q_len, device = q_pos.shape[0], q_pos.device
    start_lo, start_hi, pos_lo, pos_hi = _query_tiles(window_start, q_pos)
    first = torch.arange(_tiles(k_len), device=device) * _TILE  # first key of each key tile
    last = first + _TILE - 1
    needed = (first[None] <= pos_hi[:, None]) & (last[None] >= start_lo[:, None])  # [QT, KT]
    full = None
    key_pos = torch.arange(k_len, device=device).expand(bsz, k_len)
    if key_mask is None:
        whole = (torch.arange(_tiles(q_len), device=device) + 1) * _TILE <= q_len
        full = needed & (first[None] >= start_hi[:, None]) & (last[None] <= pos_lo[:, None]) & (last[None] < k_len)
        full = full & whole[:, None]
        needed, full = needed & ~full, full.expand(bsz, 1, -1, -1)
    else:
        key_pos = torch.where(key_mask.to(device).bool(), key_pos, _FAR)
    q_pad = _tiles(q_len) * _TILE
    return _Part(
        q_len,
        k_len,
        needed.expand(bsz, 1, -1, -1),  # one mask per batch row, as the pivot part (flex may not broadcast)
        full,
        key_pos=_padded(key_pos, _tiles(k_len) * _TILE, _FAR),
        low=_padded(window_start, q_pad, _FAR),
        high=_padded(q_pos, q_pad, -_FAR),
        own=_padded(q_pos, q_pad, -1),
    )


def _pivot_part(bsz: int, window_start, q_pos, k_len: int, pivot_idx, key_mask) -> tuple[_Part, torch.Tensor]:
    """The gathered pivots: (the part, the key rows to gather [B, n]). Pivots are sorted by position (padding and
    positions past the keys get _FAR: never visible), so query tile i reads the pivot tiles up to the last pivot
    left of its highest window start."""
    device, n = q_pos.device, pivot_idx.shape[1]
    raw = pivot_idx.to(device).expand(bsz, n)
    index = raw.clamp(max=k_len - 1)
    visible = raw < k_len
    if key_mask is not None:
        visible = visible & key_mask.to(device).bool().gather(1, index)
    position, order = torch.where(visible, raw, _FAR).sort(dim=-1)
    index = index.gather(1, order)
    _, start_hi, _, _ = _query_tiles(window_start, q_pos)
    left = torch.searchsorted(position, start_hi.expand(bsz, -1).contiguous())  # [B, QT] pivots left of it
    needed = torch.arange(_tiles(n), device=device) * _TILE < left[:, :, None]  # [B, QT, PT]
    q_pad = _tiles(q_pos.shape[0]) * _TILE
    part = _Part(
        q_pos.shape[0],
        n,
        needed[:, None],
        None,
        key_pos=_padded(position, _tiles(n) * _TILE, _FAR),
        low=torch.zeros(q_pad, dtype=torch.int32, device=device),
        high=_padded(window_start - 1, q_pad, -_FAR),
        own=torch.full((q_pad,), -1, dtype=torch.int32, device=device),
    )
    return part, index


class _FlexParts:
    """The two parts of one call: `window` and `pivots` (None without pivots), with `pivot_index` [B, n], the key
    rows the pivot part reads."""

    def __init__(self, window: _Part, pivots: _Part | None, pivot_index: torch.Tensor | None):
        self.window, self.pivots, self.pivot_index = window, pivots, pivot_index

    @classmethod
    def get(cls, cache: dict | None, query, key, window_start, pivot_idx, key_mask) -> _FlexParts:
        """The parts of this layer. With a `cache` (one per call, SparsePlan.block_masks) the window part is built
        once for all layers and the pivot part once per pivot tensor (layers with sampled pivots differ)."""
        cache = {} if cache is None else cache
        bsz, _, q_len, _ = query.shape
        k_len, device = key.shape[2], query.device
        shape, given_start = (bsz, q_len, k_len), window_start

        def positions():  # only when a part is built: a cached layer call launches nothing here
            q_pos = torch.arange(k_len - q_len, k_len, device=device)
            return window_start.to(device=device, dtype=torch.long), q_pos

        entry = cache.get("window")
        if entry is None or entry[0] != shape or entry[1] is not given_start:
            entry = cache["window"] = shape, given_start, _window_part(bsz, *positions(), k_len, key_mask)
        window = entry[2]
        if not pivot_idx.shape[1]:
            return cls(window, None, None)
        pivots = cache.setdefault("pivots", {})
        entry = pivots.get(id(pivot_idx))
        if entry is None or entry[0] is not pivot_idx or entry[1] != shape:
            # the tensor itself is kept in the entry, so its id cannot be reused by another while cached
            entry = pivots[id(pivot_idx)] = (
                pivot_idx,
                shape,
                *_pivot_part(bsz, *positions(), k_len, pivot_idx, key_mask),
            )
        return cls(window, entry[2], entry[3])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H, K, D] -> the pivot rows [B, H, n, D]."""
        bsz, heads, _, head_dim = x.shape
        index = self.pivot_index[:, None, :, None].expand(bsz, heads, self.pivot_index.shape[1], head_dim)
        return x.gather(2, index)


def _two_part_attention(
    query, key, value, parts: _FlexParts, pivot_bias: float, scaling: float, attend, fused: bool = False
):
    """Sparse attention as two attention calls merged by their log-sum-exp. `attend(q, k, v, part, scaling)`
    returns (out [B, H, Q, D], lse [B, H, Q] fp32, -inf for rows that see nothing): FlexAttention on CUDA,
    `dense_part` in the CPU tests. `fused`: merge with the compiled one-pass merge (CUDA) instead of the chunked
    eager one. Returns [B, Q, H, D], contiguous."""
    out, lse = attend(query, key, value, parts.window, scaling)
    if parts.pivots is not None:
        pivot_out, pivot_lse = attend(query, parts.gather(key), parts.gather(value), parts.pivots, scaling)
        # a constant added to every logit of a part leaves its softmax alone and adds to its log-sum-exp
        if pivot_bias:
            pivot_lse = pivot_lse + pivot_bias
        if not fused:
            out = merge_by_lse(out, lse, pivot_out, pivot_lse)
        elif torch.is_grad_enabled() and (out.requires_grad or pivot_out.requires_grad):
            out = _FusedMerge.apply(out, lse, pivot_out, pivot_lse)
        else:  # inference: the window part's output becomes the result, no third [B, H, Q, D] tensor
            _merge_code("into", _FusedMerge.compiled)(out, lse, pivot_out, pivot_lse)
            del pivot_out
    return out.transpose(1, 2).contiguous()


def dense_part(query, key, value, part: _Part, scaling: float):
    """One part in plain torch (an [Q x KV] matrix, for tests and tiny inputs): (out, lse) as FlexAttention
    returns them, from the same mask function."""
    allowed = part.dense()  # [B, 1, Q, KV]
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    seen = allowed.any(-1)  # rows that see no key get out 0 and lse -inf, with finite gradients
    scores = scores.masked_fill(~allowed, float("-inf")).masked_fill(~seen[..., None], 0.0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]) * seen[..., None]
    return torch.matmul(probs.to(value.dtype), value), lse.masked_fill(~seen, float("-inf"))


_COMPILED_FLEX = None


def _flex_part(query, key, value, part: _Part, scaling: float):
    """One part through compiled FlexAttention: (out [B, H, Q, D], lse [B, H, Q] fp32, natural log)."""
    global _COMPILED_FLEX
    from torch.nn.attention import flex_attention as flex

    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex.flex_attention)  # once per process: one kernel for both parts
    if hasattr(flex, "AuxRequest"):
        out, aux = _COMPILED_FLEX(
            query, key, value, block_mask=part.block_mask(), scale=scaling, return_aux=flex.AuxRequest(lse=True)
        )
        return out, aux.lse
    return _COMPILED_FLEX(query, key, value, block_mask=part.block_mask(), scale=scaling, return_lse=True)


# Elements per chunk of the merge: its fp32 temporaries stay a few MiB whatever the sequence length.
_MERGE_ELEMENTS = 2**22


class _MergeByLse(torch.autograd.Function):
    """out = a1 * o1 + a2 * o2 with (a1, a2) = softmax(lse1, lse2): two partial attentions over disjoint key sets
    combined into the attention over their union. Saves only o1, o2 and the lse (which the attention calls keep
    anyway); fp32 arithmetic in chunks of query rows (any memory layout, no copies), so no full-size fp32 tensor
    is made. Gradients: do_i = a_i * dout, dlse1 = -dlse2 = a1 * a2 * <dout, o1 - o2>. The output is laid out as
    [B, Q, H, D] (the caller's next step), seen as [B, H, Q, D]."""

    @staticmethod
    def forward(ctx, o1, lse1, o2, lse2):
        ctx.save_for_backward(o1, lse1, o2, lse2)
        bsz, heads, q_len, head_dim = o1.shape
        out = o1.new_empty(bsz, q_len, heads, head_dim).transpose(1, 2)
        acc = _acc_dtype(o1)
        for rows, a1, a2 in _MergeByLse.chunks(lse1, lse2, head_dim):
            out[:, :, rows] = (o1[:, :, rows].to(acc) * a1 + o2[:, :, rows].to(acc) * a2).to(out.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        o1, lse1, o2, lse2 = ctx.saved_tensors
        acc = _acc_dtype(o1)
        d_o1, d_o2 = torch.empty(o1.shape, dtype=o1.dtype, device=o1.device), torch.empty_like(o2)
        d_lse1 = torch.empty(lse1.shape, dtype=lse1.dtype, device=lse1.device)
        for rows, a1, a2 in _MergeByLse.chunks(lse1, lse2, o1.shape[-1]):
            g = grad_out[:, :, rows].to(acc)
            d_o1[:, :, rows] = (g * a1).to(d_o1.dtype)
            d_o2[:, :, rows] = (g * a2).to(d_o2.dtype)
            diff = o1[:, :, rows].to(acc) - o2[:, :, rows].to(acc)
            d_lse1[:, :, rows] = (a1 * a2).squeeze(-1) * (g * diff).sum(-1)
        return d_o1, d_lse1, d_o2, -d_lse1

    @staticmethod
    def chunks(lse1, lse2, head_dim: int):
        """(query slice, a1 [B, H, rows, 1], a2 [B, H, rows, 1]) per chunk of query rows."""
        bsz, heads, q_len = lse1.shape
        step = max(1, _MERGE_ELEMENTS // (bsz * heads * head_dim))
        for begin in range(0, q_len, step):
            rows = slice(begin, begin + step)
            a, b = lse1[:, :, rows], lse2[:, :, rows]
            total = torch.logaddexp(a, b)
            yield rows, torch.exp(a - total)[..., None], torch.exp(b - total)[..., None]


# The merge on CUDA: one pass over o1 and o2 each way, written as plain torch and compiled (Inductor fuses it into
# a kernel or two with the fp32 arithmetic in registers); the eager chunked _MergeByLse costs about a dozen
# launches per 2**22 elements (hundreds per layer at 64k tokens), this a fixed two or three.
def _merge_weights(lse1, lse2):
    """(a1, a2) = softmax over (lse1, lse2), [B, H, Q, 1] each; lse2 = -inf gives (1, 0)."""
    diff = lse1 - lse2
    return torch.sigmoid(diff)[..., None], torch.sigmoid(-diff)[..., None]


def _merge_out(o1, lse1, o2, lse2):
    """out [B, Q, H, D] contiguous (the caller's next layout) from o [B, H, Q, D]."""
    acc = _acc_dtype(o1)
    a1, a2 = _merge_weights(lse1, lse2)
    return (o1.to(acc) * a1 + o2.to(acc) * a2).to(o1.dtype).transpose(1, 2).contiguous()


def _merge_into(o1, lse1, o2, lse2):
    """The merge written over o1 (inference)."""
    acc = _acc_dtype(o1)
    a1, a2 = _merge_weights(lse1, lse2)
    o1.copy_(o1.to(acc) * a1 + o2.to(acc) * a2)


def _merge_grad(grad, o1, lse1, o2, lse2):
    """(d_o1, d_lse1, d_o2, d_lse2) for grad [B, H, Q, D]; d_lse1 = -d_lse2 = a1 * a2 * <grad, o1 - o2>."""
    acc = _acc_dtype(o1)
    a1, a2 = _merge_weights(lse1, lse2)
    g = grad.to(acc)
    d_lse1 = (a1 * a2).squeeze(-1) * (g * (o1.to(acc) - o2.to(acc))).sum(-1)
    return (g * a1).to(o1.dtype), d_lse1, (g * a2).to(o2.dtype), -d_lse1


_MERGE_CODE = {"out": _merge_out, "into": _merge_into, "grad": _merge_grad}
_COMPILED_MERGE: dict = {}


def _merge_code(name: str, compiled: bool = True):
    """One of the merge functions, compiled once per process and dtype, for any shape (dynamic: no recompile per
    sequence length); compiled=False: the same code eagerly (CPU tests)."""
    if not compiled:
        return _MERGE_CODE[name]
    if name not in _COMPILED_MERGE:
        _COMPILED_MERGE[name] = torch.compile(_MERGE_CODE[name], dynamic=True)
    return _COMPILED_MERGE[name]


class _FusedMerge(torch.autograd.Function):
    """merge_by_lse through the compiled one-pass functions above (CUDA); saves what _MergeByLse saves. Returns
    [B, H, Q, D], a view of a [B, Q, H, D] tensor. `compiled` is a class attribute so tests can run it eagerly."""

    compiled = True

    @staticmethod
    def forward(ctx, o1, lse1, o2, lse2):
        ctx.save_for_backward(o1, lse1, o2, lse2)
        return _merge_code("out", _FusedMerge.compiled)(o1, lse1, o2, lse2).transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_out):
        return _merge_code("grad", _FusedMerge.compiled)(grad_out, *ctx.saved_tensors)


def merge_by_lse(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> torch.Tensor:
    """Attention over two disjoint key sets from the attention over each: o [B, H, Q, D], lse [B, H, Q] (fp32,
    natural log; lse1 finite). Returns [B, H, Q, D] in o1's dtype."""
    return _MergeByLse.apply(o1, lse1, o2, lse2)


# ---------------------------------------------------------------------------------------------------------------
# The kernel (CPU, dropout, decoding steps)
# ---------------------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------------------
# Planning and pivot sampling
# ---------------------------------------------------------------------------------------------------------------
def sample_pivots(
    is_text: torch.Tensor,
    is_image: torch.Tensor,
    num_pivots: int,
    generator: torch.Generator | None = None,
    draw_width: int = 0,
) -> torch.Tensor:
    """Every text position plus a uniform sample of image positions, `num_pivots` per row, sorted.

    is_text / is_image: [B, L] bool (padding in neither). Returns LongTensor [B, num_pivots]. The caller checks
    that every row has enough candidates (see `check_pivot_candidates`). `draw_width`: see `_pivot_keys`.
    """
    keys = _pivot_keys(is_text, is_image, generator, draw_width)
    return keys.topk(num_pivots, dim=-1, largest=False).indices.sort(dim=-1).values


def _pivot_keys(
    is_text: torch.Tensor, is_image: torch.Tensor, generator: torch.Generator | None, draw_width: int = 0
) -> torch.Tensor:
    """[B, L] sort keys, the pivots first: text (-1), then images in random order (noise in [0, 1)), never anything
    else (2). The noise is drawn [B, max(L, draw_width)] and cut to L columns, so callers that pass the same
    `draw_width` (the model's positions) give a key the same noise whatever L they look at: a decode step over all
    the slots of a static cache picks the pivots a dynamic cache's step (or the uncached forward) picks."""
    if generator is not None and torch.compiler.is_compiling():
        raise ValueError(
            "generator= cannot drive the pivot sampling of a compiled step (torch.compile does not trace a "
            "torch.Generator): leave it out and seed with torch.manual_seed, or decode without compiling"
        )
    rand_device = generator.device if generator is not None else is_text.device
    shape = (is_text.shape[0], max(is_text.shape[1], draw_width))
    noise = torch.rand(shape, generator=generator, device=rand_device)[:, : is_text.shape[1]].to(is_text.device)
    return torch.where(is_text, -1.0, torch.where(is_image, noise, 2.0))


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


def plan_sparse_attention(
    config,
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
    """The sparse attention of one call (modes 1 and 2) for every layer: each query's window, the block geometry of
    the CPU kernel, the pivots (the caller's `pivot_idx`, or sampled per layer) and mode 1's pivot bias. `config` is
    a GPT2SparseConfig (query_window, key_window_times, num_pivot, num_layers, num_image_tokens,
    max_position_embeddings)."""
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

    if mode == 2 and q_len == 1 and past_len > 0:
        masks = decode_step_masks(config, bsz, k_len, key_mask, pivot_idx, image_mask, generator, device)
        return SparsePlan(window_start, block, span, 0.0, key_mask, [], step_masks=masks)
    if pivot_idx is not None:
        check_pivot_idx_shape(pivot_idx, bsz)
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
        per_layer, n_pivots = _sample_pivots(
            config, mode, input_ids, bsz, pivot_limit, past_len, key_mask, image_mask, generator, device
        )
    pivot_bias = math.log(q_len // n_pivots) if mode == 1 else 0.0
    return SparsePlan(window_start, block, span, pivot_bias, key_mask, per_layer)


def plan_static_cache_step(
    config,
    mode: int,
    input_ids: torch.Tensor | None,
    bsz: int,
    slots: torch.Tensor,
    n_slots: int,
    key_mask: torch.Tensor | None,
    pivot_idx: torch.Tensor | None,
    image_mask: torch.Tensor | None,
    generator: torch.Generator | None,
) -> SparsePlan:
    """Mode 2 with a static cache of `n_slots` slots, this call's queries at `slots` (`cache_position`): a decode
    step's masks over all the slots, from its slot on the device (`decode_step_masks`); a prompt's plan over the
    filled slots (their count read on the host, prompts only), with `key_length` so that the attention uses those."""
    if len(slots) == 1:
        masks = decode_step_masks(config, bsz, n_slots, key_mask, pivot_idx, image_mask, generator, slots.device, slots)
        return SparsePlan(slots, 1, 1, 0.0, key_mask, [], step_masks=masks)
    past_len = int(slots[0])
    k_len = past_len + len(slots)
    key_mask = key_mask[:, :k_len] if key_mask is not None else None
    plan = plan_sparse_attention(
        config, mode, input_ids, bsz, len(slots), past_len, key_mask, pivot_idx, image_mask, generator, slots.device
    )
    plan.key_length = k_len
    return plan


def static_image_mask(image_mask: torch.Tensor, length: int, n_slots: int) -> torch.Tensor:
    """Mode 2's `image_mask` for a generate() step with a static cache of `n_slots` slots: that wide on every step
    (the slots after the sequence are never pivot candidates), from a mask covering the `length` tokens so far."""
    if not isinstance(image_mask, torch.Tensor) or image_mask.dim() != 2 or image_mask.shape[1] < length:
        shape = tuple(image_mask.shape) if isinstance(image_mask, torch.Tensor) else type(image_mask).__name__
        raise ValueError(
            f"image_mask must be a bool tensor [batch, key_length] covering the {length} positions so far, got {shape}"
        )
    image_mask = image_mask[:, :n_slots].bool()
    return F.pad(image_mask, (0, n_slots - image_mask.shape[1]))


def check_pivot_idx_shape(pivot_idx: torch.Tensor, bsz: int) -> None:
    if pivot_idx.dim() != 2 or pivot_idx.shape[0] not in (1, bsz):
        raise ValueError(f"pivot_idx must be a LongTensor [batch={bsz}, n], got shape {tuple(pivot_idx.shape)}")
    if pivot_idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"pivot_idx must hold integer key positions, got dtype {pivot_idx.dtype}")


def decode_step_masks(
    config,
    bsz: int,
    k_len: int,
    key_mask: torch.Tensor | None,
    pivot_idx: torch.Tensor | None,
    image_mask: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    last: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Mode 2's attention for one new query as a bool mask [B, 1, 1, k_len] per layer: the last t*w keys plus the
    pivots left of them, padding excluded. Built on the device with no host read. The query sits at `last`: by
    default k_len - 1 (a dynamic cache); with a static cache, `last` is the step's slot (a device tensor) and the
    k_len keys are all the cache's slots, those after `last` empty.

    The pivots are the caller's `pivot_idx` (the positions it lists, its range checked on the prompt's call) or
    sampled as `_sample_pivots` samples them, with the same random numbers, so the same generator picks the same
    keys: every text token and the image tokens of lowest noise, as many as CogView's count, which is computed
    here as a tensor. The one difference: where a row has fewer candidates than that count (text and image tokens
    together), it takes them all; the prompt's call raises instead (a check here would wait for the device)."""
    span = config.query_window * config.key_window_times
    keys = torch.arange(k_len, device=device)
    last = k_len - 1 if last is None else last.reshape(())
    limit = (last + 1 - span).clamp(min=0) if isinstance(last, torch.Tensor) else max(0, last + 1 - span)
    before = keys < limit  # the pivot candidates: left of the window
    visible = ((keys >= limit) & (keys <= last)).expand(bsz, k_len)
    own = keys == last  # the query's own key, visible even if marked as padding (no row is empty)
    if pivot_idx is not None:
        check_pivot_idx_shape(pivot_idx, bsz)
        visible = visible | (pivot_idx.to(device)[:, :, None] == keys).any(1) & before  # [B|1, k_len]
    valid = key_mask if key_mask is not None else torch.ones(bsz, k_len, dtype=torch.bool, device=device)
    static = isinstance(limit, torch.Tensor)  # no shortcut on its value, no host read
    if (not static and limit == 0) or pivot_idx is not None:
        return [(visible & valid | own)[:, None, None]] * config.num_layers
    is_image = _image_positions(config, image_mask, None, bsz, k_len if static else limit, 0, device)
    is_image = F.pad(is_image, (0, k_len - is_image.shape[1]))  # the keys from `limit` on are no candidates
    is_text, is_image = valid & before & ~is_image, valid & before & is_image
    max_text, n_left = is_text.sum(-1).max(), (valid & before).sum(-1).min()
    ratio = config.num_pivot / config.max_position_embeddings
    count = max_text + ((n_left - max_text) * ratio).floor().clamp(min=0).long()  # CogView's; see _sample_pivots
    masks = []
    for _ in range(config.num_layers):
        order = _pivot_keys(is_text, is_image, generator, config.max_position_embeddings).argsort(dim=-1)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(k_len, device=device).expand_as(order))
        pivots = (ranks < count) & (is_text | is_image)
        masks.append(((visible | pivots) & valid | own)[:, None, None])
    return masks


def _sample_pivots(
    config,
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
    """Pivots per layer among the keys before `limit` (every text token plus sampled image tokens) and their
    count: num_pivot in mode 1; in mode 2 CogView's inference count (see plan_sparse_attention's caller)."""
    empty = torch.zeros(bsz, 0, dtype=torch.long, device=device)
    if limit <= 0:
        return [empty] * config.num_layers, 0
    is_image = _image_positions(config, image_mask, input_ids, bsz, limit, past_len, device, mode)
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
    draw = config.max_position_embeddings  # the noise of decode_step_masks: the same pivots for the same generator
    per_layer = [sample_pivots(is_text, is_image, n_pivots, generator, draw) for _ in range(config.num_layers)]
    return per_layer, n_pivots


def _image_positions(config, image_mask, input_ids, bsz: int, limit: int, past_len: int, device, mode: int = 2):
    """bool [B, limit]: which of the first `limit` keys are image tokens (`image_mask`, or the prompt's ids)."""
    if image_mask is not None:
        if image_mask.dim() != 2 or image_mask.shape[0] != bsz or image_mask.shape[1] < limit:
            raise ValueError(
                f"image_mask must be a bool tensor [batch={bsz}, key_length] covering the cached positions too, "
                f"got shape {tuple(image_mask.shape)}"
            )
        return image_mask[:, :limit].to(device=device, dtype=torch.bool)
    if input_ids is not None and past_len == 0:
        return input_ids[:, :limit] < config.num_image_tokens
    raise ValueError(
        f"is_sparse={mode} samples pivots among positions whose tokens are unknown here (cached positions or "
        f"inputs_embeds): pass image_mask [batch, key_length] or pivot_idx"
    )
