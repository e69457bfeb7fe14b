"""GLM (General Language Model, Du et al. 2022), ChatGLM-6B and GLM-10B architectures, as transformers remote code.

GLM fills blanks autoregressively: the context (with a `[MASK]`, `[sMASK]` or `[gMASK]` blank) is read with
bidirectional attention, and the span opened by `<sop>` is generated causally. Positions are 2-D: every span
token takes the position of its blank, and a second "block position" counts 1, 2, ... inside the span.

Two architectures share every class here; `config.variant` picks, in each module's `__init__`, the few parts
that differ (nothing else branches on it):

| part | `"chatglm"` (THUDM/chatglm-6b) | `"glm"` (THUDM/glm-10b, glm-large-chinese, glm-2b) |
| --- | --- | --- |
| positions | 2-D rotary inside attention | learned position + block-position embeddings added to the input |
| residual | `alpha * LN(x) + f(LN(x))` | pre-LN `x + f(LN(x))` |
| query_key_value rows | per head: (q, k, v) x heads | contiguous: all q, all k, all v |
| MLP activation | tanh GELU | erf GELU |
| span position | the first `[gMASK]`, else the first `[MASK]`/`[sMASK]` | the first blank of any kind |
| a row without `<sop>` | an error | all context (classification inputs) |

The ChatGLM variant follows THUDM's `modeling_chatglm.py` (final revision) numerically and keeps its
state-dict keys (`transformer.layers.N.attention.query_key_value`, ...), so ChatGLM-6B checkpoints and LoRA
adapters targeting `query_key_value` load unchanged. The GLM variant follows THUDM's GLM remote code
(`modeling_glm.py` of the glm-* hub repositories) with the same key names minus its `glm.` prefix
(`scripts/convert_checkpoint.py --arch glm` renames them); it adds `GLMForSequenceClassification` and
`GLMForMultipleChoice`, and accepts GLM's inputs as they are: a `sep` prefix length (int or per row) or an
explicit 4-D mask as `attention_mask`, `[B, 2, S]` `position_ids`, and what GLM's tokenizer
`build_inputs_for_generation` returns (`position_ids`, `generation_attention_mask`) passed to `generate()`.
It is written fresh in the style of transformers' Llama: rotary -> masks -> MLP -> attention -> block ->
models -> heads. Differences from THUDM's code:
- batch-first tensors and transformers' `DynamicCache` (no seq-first tuple caches, no `_reorder_cache`), so
  beam search, streaming and left-padded batches work through the stock `generate()`;
- the prefix-LM mask and 2-D position ids are built inside the model, vectorised, from `input_ids` and the
  2-D padding mask (left padding keeps positions counted from the first real token, like THUDM's tokenizer);
- eager and sdpa attention through transformers' attention registry (`fast_decoding.attention_function`, which
  also swaps in a faster one-token attention on CPU); the eager path keeps THUDM's layer-dependent query scaling,
  -10000 masking and fp32 softmax;
- rotary cos/sin are computed in fp32 from the fp16-rounded `inv_freq` (THUDM computes them in the model
  dtype, so half-precision runs differ from THUDM's in the last bits);
- `chat()`/`stream_chat()` are built on `generate()` and `TextIteratorStreamer`;
- GLM: a key/value cache instead of GLM's hidden-state `mems` (GLM's own generate never used them), the
  softmax in fp32 with masked scores at -10000 (GLM: model dtype, -65504; the same probabilities), a 2-D
  `attention_mask` is a padding mask (GLM read it as a plain key mask), and the classification head pools
  the first real token of a left-padded row (GLM: token 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    MultipleChoiceModelOutput,
    SequenceClassifierOutput,
)
from transformers.utils import logging

from .configuration_glm import GLMConfig
from .fast_decoding import CompiledDecoding, attention_function, fast_cpu_gemv, use_growing_kv_layers
from .glm_chat import GLMChatMixin
from .model_checks import (
    CheckedLoading,
    check_generate_inputs,
    check_half_overflow,
    check_input_values,
    check_inputs,
    check_labels,
    check_prefix_length,
    check_tensor,
    padding_mask,
    reads_values,
)
from .transformers_compat import (
    cache_field,
    causal_lm_loss,
    check_unused_kwargs,
    generation_cache,
    output_cache,
    take_cache,
)

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ----------------------------------------------------------------------------------------------------------------
class GLMRotaryEmbedding(nn.Module):
    """cos/sin for ChatGLM's 2-D rotary embedding.

    Each head is split in two halves of `head_dim / 2`: the first is rotated by the position ids, the second by
    the block position ids, each half with NeoX-style `rotate_half`. Like THUDM, `inv_freq` is rounded through
    fp16 (a precision quirk of the original that the checkpoints were trained with).
    """

    inv_freq: torch.Tensor

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.rotary_dim = config.head_dim // 2  # per position stream
        self.base = 10000.0
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=device) / self.rotary_dim
        return (1.0 / self.base**exponents).half().float()

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids: [B, 2, S] (position, block position) -> cos, sin: [B, S, 1, 1, head_dim], broadcasting
        # against the queries and keys laid out [B, S, H, 2 (q, k), head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, 2, S, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, 2, S, rotary_dim]
        emb = emb.transpose(1, 2).flatten(2)[:, :, None, None]  # [B, S, 1, 1, head_dim]: position, block position
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half_2d(x: torch.Tensor) -> torch.Tensor:
    """`rotate_half` applied to each half of the head dimension separately: (a, b | c, d) -> (-b, a | -d, c)."""
    x = x.unflatten(-1, (2, 2, -1))  # [..., half, quarter, head_dim / 4]
    return torch.cat((-x[..., 1:, :], x[..., :1, :]), dim=-2).flatten(-3)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half_2d(x) * sin, for the queries and keys of a step at once (x: [B, S, H, 2, D])."""
    return x * cos + rotate_half_2d(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Blank-infilling inputs: 2-D position ids and the prefix-LM mask
# ----------------------------------------------------------------------------------------------------------------
def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 where there is none)."""
    return hits.to(torch.int32).argmax(dim=-1)


def build_position_ids(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: GLMConfig,
    validate: bool = True,
    require_span: bool = True,
) -> torch.Tensor:
    """2-D position ids [B, 2, S] for GLM blank infilling, without a loop over the batch.

    Row b reads: the context (everything before the first `<sop>`) has positions 0, 1, ... counted from the first
    real token (so left padding does not shift them) and block position 0; the span from `<sop>` on has the
    position of the blank and block positions 1, 2, ... The blank is, for ChatGLM, the first `[gMASK]`, else the
    first `[MASK]`/`[sMASK]` (THUDM's model); for GLM the first blank of any kind (GLM's tokenizer). Padding gets
    position 0. A row without `<sop>` is all context. `validate` raises a ValueError naming the rows without a
    `<sop>` (when `require_span`) or with a `<sop>` but no blank.
    """
    batch_size, seq_len = input_ids.shape
    is_gmask = input_ids == config.gmask_token_id
    is_short_blank = torch.zeros_like(is_gmask)
    for token_id in (config.mask_token_id, config.smask_token_id):
        if token_id is not None:
            is_short_blank |= input_ids == token_id
    if attention_mask is not None:  # a blank or <sop> id inside the padding is padding, not a blank / span start
        real = attention_mask.bool()
        is_gmask, is_short_blank = is_gmask & real, is_short_blank & real
    has_gmask = is_gmask.any(dim=-1)
    if config.variant == "chatglm":  # THUDM's ChatGLM model: [gMASK] wins over [MASK] wherever it is
        blank_index = torch.where(has_gmask, _first_index(is_gmask), _first_index(is_short_blank))  # [B]
    else:  # GLM's tokenizer: the first blank of any kind
        blank_index = _first_index(is_gmask | is_short_blank)  # [B]
    is_sop = input_ids == config.bos_token_id
    if attention_mask is not None:
        is_sop = is_sop & real
    has_sop = is_sop.any(dim=-1)
    sop_index = torch.where(has_sop, _first_index(is_sop), seq_len)  # [B]; seq_len: no span
    if validate:
        if require_span:
            _check_rows(
                has_sop,
                f"no <sop> token (bos_token_id {config.bos_token_id}) opening the span "
                "to generate; the tokenizer appends it (chatglm: `[gMASK] <sop>` at the end of every prompt; "
                "glm: tokenizer.build_inputs_for_generation)",
            )
        _check_rows(
            has_gmask | is_short_blank.any(dim=-1) | ~has_sop,
            "no blank token ([gMASK], [MASK] or [sMASK], ids "
            f"{config.gmask_token_id}, {config.mask_token_id}, {config.smask_token_id})",
        )

    if attention_mask is None:
        positions = torch.arange(seq_len, device=input_ids.device).expand(batch_size, seq_len)
    else:
        positions = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # counted from the first real token
    token_index = torch.arange(seq_len, device=input_ids.device)
    in_span = token_index >= sop_index[:, None]  # [B, S]
    blank_position = positions.gather(1, blank_index[:, None])  # [B, 1]
    position_ids = torch.where(in_span, blank_position, positions)
    block_position_ids = (token_index - sop_index[:, None] + 1).clamp(min=0)
    return torch.stack((position_ids, block_position_ids), dim=1)


def _check_rows(row_ok: torch.Tensor, problem: str) -> None:
    if not bool(row_ok.all()):
        rows = torch.nonzero(~row_ok).flatten().tolist()  # error path only
        raise ValueError(f"input_ids row(s) {rows}: {problem}.")


def build_attention_mask(
    block_position_ids: torch.Tensor,
    padding_mask: torch.Tensor | None,
    past_length: int,
    prefix_length: int = 0,
) -> torch.Tensor | None:
    """Boolean prefix-LM mask [B, 1, q, kv] (True = attend), or None when every query may see every key.

    Query i may see key j if j <= i (causal) or if j is a context token (block position 0): the context is
    bidirectional, the span causal. Cached keys are all earlier than the queries, so only the current chunk's
    block positions matter. `padding_mask` [B, past + q] hides padding; `prefix_length` P-tuning keys are
    visible to everyone.
    """
    batch_size, query_length = block_position_ids.shape
    if query_length == 1 and padding_mask is None:
        return None  # one new token at the end of the sequence sees everything
    device = block_position_ids.device
    kv_index = torch.arange(past_length + query_length, device=device)  # [kv]
    q_index = past_length + torch.arange(query_length, device=device)  # [q]
    allowed = (kv_index[None, :] <= q_index[:, None])[None]  # causal: [1, q, kv]
    if query_length > 1:
        is_context_key = F.pad(block_position_ids == 0, (past_length, 0))  # [B, kv]
        allowed = allowed | is_context_key[:, None, :]
    if padding_mask is not None:
        allowed = allowed & padding_mask.bool()[:, None, :]
    allowed = allowed.expand(batch_size, query_length, -1)
    if prefix_length:
        allowed = F.pad(allowed, (prefix_length, 0), value=True)
    return allowed[:, None]


def read_attention_mask(
    attention_mask, batch_size: int, query_length: int, kv_length: int, read: bool
) -> tuple[str | None, torch.Tensor | None]:
    """What `attention_mask` means, decided in this one place: (kind, tensor), kind one of
    - "padding": a 2-D [B, past + S] 0/1 mask, as bool (None: it masks nothing);
    - "explicit": a 4-D [B, 1, S, past + S] boolean / 0/1 mask (True = attend), as bool;
    - "sep": GLM's prefix-length convention (an int, a 1-element or a [B] tensor), as lengths [B];
    - None: no mask.
    Raises a ValueError / TypeError naming `attention_mask` for anything else. `read`: run the data-dependent
    checks (0/1 values, negative lengths); off on decode steps (`model_checks.reads_values`)."""
    if attention_mask is None:
        return None, None
    if isinstance(attention_mask, bool) or not isinstance(attention_mask, (int, torch.Tensor)):
        raise ValueError(
            f"attention_mask must be a tensor or GLM's prefix length (an int), got {type(attention_mask).__name__}"
        )
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() <= 1:
        return "sep", check_prefix_length(attention_mask, "attention_mask", batch_size, read).expand(batch_size)
    if attention_mask.dim() == 2 and attention_mask.shape == (batch_size, kv_length):
        return "padding", padding_mask(attention_mask, "attention_mask", (batch_size, kv_length), read, True)
    if attention_mask.dim() != 4:
        raise ValueError(
            f"attention_mask must be a [batch, past + seq] = [{batch_size}, {kv_length}] padding mask, a "
            f"4-D [batch, 1, seq, past + seq] mask or GLM's prefix length (an int or a [batch] tensor), got "
            f"{list(attention_mask.shape)}"
        )
    if attention_mask.shape[0] != batch_size or attention_mask.shape[2:] != (query_length, kv_length):
        raise ValueError(
            f"a 4-D attention_mask must have shape [batch, 1, q, past + q] = [{batch_size}, 1, "
            f"{query_length}, {kv_length}], got {list(attention_mask.shape)}"
        )
    if attention_mask.dtype != torch.bool:
        if read and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError(
                "a 4-D attention_mask must be boolean or hold 0/1 (True / 1 = attend); additive float "
                "masks are not accepted"
            )
        attention_mask = attention_mask.bool()
    return "explicit", attention_mask


def build_sep_mask(sep: torch.Tensor, query_length: int, past_length: int, prefix_length: int = 0) -> torch.Tensor:
    """Boolean mask [B, 1, q, kv] for GLM's `sep` convention: keys before `sep[b]` are seen by every query, the
    rest causally (GLM's `build_mask_matrix`; cached keys come first and are always visible)."""
    kv_index = torch.arange(past_length + query_length, device=sep.device)  # [kv]
    q_index = past_length + torch.arange(query_length, device=sep.device)  # [q]
    allowed = (kv_index[None, None, :] <= q_index[None, :, None]) | (kv_index[None, None, :] < sep[:, None, None])
    if prefix_length:
        allowed = F.pad(allowed, (prefix_length, 0), value=True)
    return allowed[:, None]


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class GLMMLP(nn.Module):
    """A plain MLP h -> inner -> GELU -> h with biases (THUDM's ChatGLM calls it `GLU`). ChatGLM uses the tanh
    approximation of GELU, GLM the exact erf form."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)
        self.gelu_approximate = "tanh" if config.variant == "chatglm" else "none"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate=self.gelu_approximate))


def split_qkv_per_head(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ChatGLM's fused projection: [B, S, H * (q|k|v)] -> queries and keys [B, S, H, 2, D], values [B, S, H, D]."""
    qkv = qkv.unflatten(-1, (num_heads, 3, head_dim))
    return qkv[..., :2, :], qkv[..., 2, :]


def split_qkv_contiguous(qkv: torch.Tensor, num_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GLM's fused projection: [B, S, (all q | all k | all v)] -> queries and keys [B, S, H, 2, D], values
    [B, S, H, D]."""
    qkv = qkv.unflatten(-1, (3, num_heads, head_dim))
    return qkv[..., :2, :, :].transpose(-3, -2), qkv[..., 2, :, :]


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
    """ChatGLM's attention: the query is divided by sqrt(d) * (layer_id + 1) before the matmul in the model dtype
    (fp16 overflow guard), masked scores are set to -10000, then the scores go to fp32, are multiplied back by
    (layer_id + 1) and softmaxed. Mathematically softmax(q k^T / sqrt(d)), which is what sdpa computes."""
    # query, key, value: [B, H, S, D]; attention_mask: bool [B, 1, q, kv] (True = attend)
    coeff = float(getattr(module, "layer_scaling", 1.0))
    scores = torch.matmul(query / (coeff / scaling), key.transpose(2, 3))  # [B, H, q, kv]
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, -10000.0)
    weights = torch.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, q, H, D]
    return output, weights


class GLMAttention(nn.Module):
    """Self-attention with a fused query_key_value projection: laid out per head as q|k|v with 2-D rotary
    embeddings (ChatGLM-6B), or as contiguous q|k|v blocks without rotary (GLM, whose positions are added to the
    input embeddings)."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        chatglm = config.variant == "chatglm"
        self.layer_scaling = layer_idx + 1 if chatglm else 1  # ChatGLM's query_key_layer_scaling_coeff (eager path)
        self.split_qkv = split_qkv_per_head if chatglm else split_qkv_contiguous
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout_prob
        self.is_causal = False  # the prefix-LM mask is always passed explicitly (or not needed)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        past_key_values: Cache | None = None,
        prefix_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, query_length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)  # [B, q, 3 * hidden]
        query_key, value = self.split_qkv(qkv, self.num_heads, self.head_dim)  # [B, q, H, 2, D], [B, q, H, D]
        if position_embeddings is not None:  # ChatGLM's rotary cos/sin, queries and keys in one go
            query_key = apply_rotary_pos_emb(query_key, *position_embeddings)
        query, key = query_key.transpose(1, 2).unbind(-2)  # each [B, H, q, D]
        value = value.transpose(1, 2)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [B, H, kv, D]
        if prefix_key_value is not None:  # P-tuning prefix when running without a cache (training)
            key = torch.cat((prefix_key_value[0], key), dim=2)
            value = torch.cat((prefix_key_value[1], value), dim=2)

        attention_interface = attention_function(self, query, key, eager_attention_forward)
        dropout = self.attention_dropout if self.training else 0.0
        output, weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=dropout, **kwargs
        )  # output: [B, q, H, D]
        return self.dense(output.reshape(batch_size, query_length, -1)), weights


class GLMBlock(GradientCheckpointingLayer):
    """Attention and MLP, each behind a LayerNorm. ChatGLM's residual adds the *normalised* input scaled by alpha
    (DeepNorm-like), `alpha * LN(x) + f(LN(x))`; GLM's is the plain pre-LN `x + f(LN(x))`, with dropout on f."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.residual_from_norm = config.variant == "chatglm"
        self.alpha = config.residual_alpha if self.residual_from_norm else 1.0
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)
        self.dropout = nn.Dropout(config.output_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        prefix_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_input = self.input_layernorm(hidden_states)
        attention_output, weights = self.attention(
            attention_input, attention_mask, position_embeddings, past_key_values, prefix_key_value, **kwargs
        )
        if self.training:
            attention_output = self.dropout(attention_output)
        residual = attention_input if self.residual_from_norm else hidden_states
        hidden_states = torch.add(attention_output, residual, alpha=self.alpha)  # residual * alpha + output
        mlp_input = self.post_attention_layernorm(hidden_states)
        mlp_output = self.mlp(mlp_input)
        if self.training:
            mlp_output = self.dropout(mlp_output)
        residual = mlp_input if self.residual_from_norm else hidden_states
        return torch.add(mlp_output, residual, alpha=self.alpha), weights


class GLMPrefixEncoder(nn.Module):
    """P-tuning v2: learned keys and values for `pre_seq_len` virtual tokens in every layer (THUDM's
    PrefixEncoder, same parameter names), optionally reparameterised by a two-layer MLP."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.prefix_projection = config.prefix_projection
        kv_size = config.num_layers * 2 * config.hidden_size
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        # prefix_tokens: [B, P] -> [B, P, num_layers * 2 * hidden]
        embedded = self.embedding(prefix_tokens)
        return self.trans(embedded) if self.prefix_projection else embedded


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class GLMPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = GLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # THUDM checkpoints store each layer's rotary inv_freq; ours is recomputed, so those keys are dropped quietly.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    _trained_after_loading = ("prefix_encoder.",)  # the P-tuning prefix may be new (CheckedLoading)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)  # CheckedLoading: never half-loaded or damaged weights
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        # 5.x replaces the parameters while loading, which resets the P-tuning freeze done in __init__
        if getattr(model.config, "pre_seq_len", None) is not None:
            model.freeze_for_prefix_tuning()
        return loaded

    def freeze_for_prefix_tuning(self) -> None:
        """P-tuning v2 trains only the prefix encoder: freeze every other parameter (THUDM does the same)."""
        for name, param in self.named_parameters():
            param.requires_grad_(".prefix_encoder." in f".{name}")

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, GLMRotaryEmbedding):
            # non-persistent buffer: 5.x builds the model on the meta device and only this fills it
            module.inv_freq.copy_(module.compute_inv_freq(module.inv_freq.device))


class GLMModel(GLMPreTrainedModel):
    """The GLM transformer without a head: word embeddings, blocks, final LayerNorm (THUDM's ChatGLMModel; for
    variant "glm" GLM's GLMModel + GLMStack, with the learned position and block-position tables)."""

    _auto_class = "AutoModel"  # save_pretrained copies the code files next to the weights

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.variant == "glm":  # learned positions added to the input; max_sequence_length + 1 rows like GLM
            self.position_embeddings = nn.Embedding(config.max_sequence_length + 1, config.hidden_size)
            self.block_position_embeddings = nn.Embedding(config.max_sequence_length + 1, config.hidden_size)
        self.embedding_dropout = nn.Dropout(config.embedding_dropout_prob)
        self.layers = nn.ModuleList(GLMBlock(config, layer_idx) for layer_idx in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.rotary_emb = GLMRotaryEmbedding(config) if config.variant == "chatglm" else None
        self.gradient_checkpointing = False
        if config.pre_seq_len is not None:
            self.prefix_encoder = GLMPrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(config.prefix_dropout)
        self.post_init()
        if config.pre_seq_len is not None:
            self.freeze_for_prefix_tuning()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def get_position_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The 2-D position ids [B, 2, S] the model builds for `input_ids` (needed to continue a cache by hand)."""
        return build_position_ids(input_ids, attention_mask, self.config, require_span=self.rotary_emb is not None)

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """P-tuning keys and values, one (key, value) pair of [B, H, pre_seq_len, D] per layer."""
        config = self.config
        prefix_tokens = torch.arange(config.pre_seq_len, device=self.word_embeddings.weight.device)
        prefix = self.prefix_encoder(prefix_tokens.expand(batch_size, -1)).to(dtype)
        prefix = prefix.view(
            batch_size, config.pre_seq_len, 2 * config.num_layers, config.num_attention_heads, config.head_dim
        )
        prefix = self.prefix_dropout(prefix).permute(2, 0, 3, 1, 4)  # [2 * layers, B, H, P, D]
        return [(prefix[2 * i], prefix[2 * i + 1]) for i in range(config.num_layers)]

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
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        input_ids: [B, S] token ids. Without explicit `position_ids`, every row needs a blank (`[gMASK]`,
            `[MASK]` or `[sMASK]`) and a `<sop>`: the context before `<sop>` is read bidirectionally, the rest
            causally. (Variant "glm": a row without `<sop>` is all context, e.g. a classification input.)
        attention_mask: one of
            - [B, past + S] padding mask (1 = real token; pad on the left for generation); the prefix-LM mask
              is built from the tokens;
            - an explicit boolean / 0-1 mask [B, 1, S, past + S] (True / 1 = attend), used as given (a row
              with nothing to attend to, a padding row, attends everywhere instead of producing NaN);
            - GLM's `sep` convention: an int, a 1-element tensor or a [B] tensor giving the number of leading
              tokens (counted from the start of the sequence) that every token sees; the rest is causal.
        position_ids: [B, 2, S] (position, block position). Built from `input_ids` when omitted; needed when
            continuing a non-empty cache by hand (`model.get_position_ids(full_ids, mask)[..., -S:]`).
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = self._use_cache(use_cache)
        past_key_values = take_cache(past_key_values, kwargs)
        _refuse_mems(kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        batch_size, query_length = check_inputs(input_ids, inputs_embeds, self.word_embeddings)

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        if past_key_values is not None:
            use_growing_kv_layers(past_key_values)
        embeds_dtype = inputs_embeds.dtype if inputs_embeds is not None else self.word_embeddings.weight.dtype
        past_length, prefix_key_values = self._prepare_prefix(past_key_values, batch_size, embeds_dtype)
        read = reads_values(past_length, query_length)  # data-dependent checks: not on decode steps
        if read:
            check_input_values(input_ids, inputs_embeds, self.word_embeddings, "input_ids", "inputs_embeds")
        if input_ids is not None:
            inputs_embeds = self.word_embeddings(input_ids)
        if past_length + query_length > config.max_sequence_length:
            raise ValueError(
                f"sequence length {past_length + query_length} (cached {past_length} + new {query_length}) exceeds "
                f"max_sequence_length={config.max_sequence_length}"
            )

        # 2-D positions and the prefix-LM mask, once for all layers.
        kind, mask = read_attention_mask(attention_mask, batch_size, query_length, past_length + query_length, read)
        padding = mask if kind == "padding" else None
        position_ids = self._resolve_position_ids(
            input_ids, padding, position_ids, past_length, (batch_size, query_length), read
        )
        attention_mask = self._prefix_lm_mask(kind, mask, position_ids, past_length, query_length)
        if self.rotary_emb is not None:  # ChatGLM: positions rotate queries and keys in every layer
            position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)
            hidden_states = inputs_embeds
        else:  # GLM: learned positions added to the input, in GLM's order
            position_embeddings = None
            hidden_states = inputs_embeds + self.position_embeddings(position_ids[:, 0])
            hidden_states = hidden_states + self.block_position_embeddings(position_ids[:, 1])
        hidden_states = self.embedding_dropout(hidden_states)

        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer_idx, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, weights = layer(
                hidden_states,
                attention_mask=attention_mask,
                position_embeddings=position_embeddings,
                past_key_values=past_key_values,
                prefix_key_value=prefix_key_values[layer_idx] if prefix_key_values is not None else None,
                output_attentions=output_attentions,
            )
            if output_attentions:
                all_attentions += (weights,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **cache_field(past_key_values if use_cache else None),
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return output if return_dict else output.to_tuple()

    def _prepare_prefix(
        self, past_key_values: Cache | None, batch_size: int, dtype: torch.dtype
    ) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """Number of tokens already in the cache, and the P-tuning keys/values when they must ride along.

        The P-tuning prefix goes first into an empty cache, once; without a cache (training) it is returned
        to be concatenated in every layer.
        """
        cache_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefix_length = self.config.pre_seq_len or 0
        if not prefix_length:
            return cache_length, None
        if cache_length:
            return cache_length - prefix_length, None
        prefix_key_values = self.get_prompt(batch_size, dtype)
        if past_key_values is None:
            return 0, prefix_key_values
        for layer_idx, (key, value) in enumerate(prefix_key_values):
            past_key_values.update(key, value, layer_idx)
        return 0, None

    def _use_cache(self, use_cache: bool | None) -> bool:
        """`use_cache`, or config.use_cache when None; off with gradient checkpointing in training (with a warning
        when it was asked for)."""
        requested = use_cache
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            if requested:
                logger.warning_once(
                    "use_cache=True is incompatible with gradient checkpointing; using use_cache=False."
                )
            use_cache = False
        return use_cache

    def _resolve_position_ids(
        self,
        input_ids: torch.Tensor | None,
        padding: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_length: int,
        shape: tuple[int, int],
        read: bool,
    ) -> torch.Tensor:
        """The caller's 2-D positions [B, 2, S], checked, or those built from `input_ids` and the padding."""
        if position_ids is not None:
            return self._check_position_ids(position_ids, shape, read)
        if input_ids is None:
            raise ValueError(
                "with inputs_embeds, pass position_ids [batch, 2, seq] too (they are built from input_ids)"
            )
        if past_length > 0:
            raise ValueError(
                f"position_ids are needed to continue a cache holding {past_length} tokens: pass "
                "model.get_position_ids(full_input_ids, full_attention_mask)[..., -new_length:] "
                "(generate() does this for you)."
            )
        # GLM rows without <sop> are all context (classification / multiple-choice inputs); ChatGLM needs a span
        return build_position_ids(input_ids, padding, self.config, require_span=self.rotary_emb is not None)

    def _check_position_ids(self, position_ids, shape: tuple[int, int], read: bool) -> torch.Tensor:
        """`position_ids` [B, 2, S] of an integer dtype, within GLM's learned tables (variant "glm")."""
        check_tensor(position_ids, "position_ids", "integer positions [batch, 2, seq]")
        if position_ids.is_floating_point() or position_ids.is_complex() or position_ids.dtype == torch.bool:
            raise TypeError(f"position_ids must be an integer tensor, got dtype {position_ids.dtype}")
        batch_size, query_length = shape
        if position_ids.shape != (batch_size, 2, query_length):
            raise ValueError(
                f"position_ids must have shape [batch, 2, seq] = [{batch_size}, 2, {query_length}] "
                f"(position ids, block position ids), got {list(position_ids.shape)}"
            )
        # GLM's learned tables have max_sequence_length + 1 rows
        if self.rotary_emb is None and read:
            bad = (position_ids < 0) | (position_ids > self.config.max_sequence_length)
            if bool(bad.any()):
                raise ValueError(
                    f"position_ids must lie in [0, max_sequence_length={self.config.max_sequence_length}] "
                    f"(the rows of the position tables), got {int(position_ids[bad][0])}"
                )
        return position_ids.to(torch.long)

    def _prefix_lm_mask(
        self, kind: str | None, mask: torch.Tensor | None, position_ids: torch.Tensor, past_length: int, length: int
    ) -> torch.Tensor | None:
        """The boolean mask [B, 1, S, P + past + S] every layer uses (None: every query sees every key), from the
        `attention_mask` read by `read_attention_mask`; P-tuning keys are visible to every query."""
        prefix_length = self.config.pre_seq_len or 0
        if kind == "sep":
            return build_sep_mask(mask, length, past_length, prefix_length)
        if kind == "explicit":
            # A query row that may see nothing (a padding row of GLM's right-padded masks) attends everywhere: its
            # output is meaningless either way (the references average all values there), but sdpa would give
            # NaN, and NaN values of a padding position poison every query through 0 * NaN.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            return F.pad(mask, (prefix_length, 0), value=True) if prefix_length else mask
        return build_attention_mask(position_ids[:, 1], mask, past_length, prefix_length)


class GLMForConditionalGeneration(GLMPreTrainedModel, GenerationMixin, CompiledDecoding, GLMChatMixin):
    """GLM with the LM head tied to the word embeddings; `generate()`, `chat()` and `stream_chat()`."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the code files next to the weights
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # glm-2b ships a classification head (dense, out_proj) next to the LM weights; the converter reports it and
    # keeps it for GLMForSequenceClassification, this class ignores it quietly.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"^dense\.", r"^out_proj\."]

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.transformer = GLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()
        if config.pre_seq_len is not None:
            self.freeze_for_prefix_tuning()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

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
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        r"""
        Arguments as in [`GLMModel.forward`], plus `labels` [B, S] (the loss is the next-token cross-entropy over
        the shifted labels, -100 ignored; `num_items_in_batch`, passed by Trainer, makes it a sum divided by that
        count) and `logits_to_keep` (compute logits for the last N positions only).

        Example:
        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
        >>> model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        >>> inputs = tokenizer(["The capital of [MASK] is Paris."], return_tensors="pt")  # appends [gMASK] <sop>
        >>> output = model.generate(**inputs, max_new_tokens=16, num_beams=4)
        >>> tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        ```
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        past_key_values = take_cache(past_key_values, kwargs)
        tokens = input_ids if input_ids is not None else inputs_embeds
        with fast_cpu_gemv(tokens, past_key_values, self.lm_head.weight):
            outputs = self.transformer(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
                **kwargs,
            )
            hidden_states = outputs.last_hidden_state
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :])
        if logits.dtype == torch.float16 and hidden_states.shape[1] > 1 and not self.training:
            check_half_overflow(logits)  # once per prompt (prefill); single-token decode steps skip the sync

        loss = None
        if labels is not None:
            read = not torch.compiler.is_compiling()
            check_labels(labels, hidden_states.shape[:2], self.config.vocab_size, "the shape of input_ids", read)
            loss = causal_lm_loss(logits, labels, num_items_in_batch)  # in fp32, like THUDM

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            **cache_field(output_cache(outputs)),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------
    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with the prompt checked first: a clear error for ids that are not an integer
        [batch, seq] tensor, or a padding mask of another shape, instead of one from deep inside generate()."""
        # GLM's own generation inputs (3-D position_ids, a 4-D generation_attention_mask) may be right-padded
        glm_inputs = kwargs.get("generation_attention_mask") is not None or (
            isinstance(kwargs.get("position_ids"), torch.Tensor) and kwargs["position_ids"].dim() == 3
        )
        check_generate_inputs(inputs, kwargs, self.config.vocab_size, left_padding=not glm_inputs)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        generation_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Feed the tokens the cache has not seen, with their 2-D positions and mask for this step.

        By default positions and the prefix-LM mask are rebuilt from the full sequence and the 2-D padding mask
        (generate()'s own 1-D `position_ids` are replaced). GLM's generation inputs, `position_ids` [B, 2, L + G]
        and `generation_attention_mask` [B, 1, L + G, L + G] as GLM's tokenizer `build_inputs_for_generation`
        returns them, are sliced to this step instead. Works on transformers 4.57 and 5.x alike: the new tokens
        are found from the cache length (not from `cache_position` / `next_sequence_length`), and GLM inputs that
        generate() expanded for beams / `num_return_sequences` along the wrong dimension (5.x treats 3-D
        `position_ids` as multimodal [3, B, L]) or not at all are brought back to one row per sequence.
        """
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            raise ValueError(
                "GLM generation needs input_ids (the blank and <sop> tokens drive the mask), not inputs_embeds"
            )
        past_key_values = generation_cache(self.config, past_key_values, kwargs)
        cache_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        past_length = cache_length - (self.config.pre_seq_len or 0) if cache_length else 0
        batch_size, length = input_ids.shape
        glm_positions = position_ids if position_ids is not None and position_ids.dim() == 3 else None
        if glm_positions is not None or generation_attention_mask is not None:
            step_position_ids, step_mask = self._glm_generation_step(
                input_ids, past_length, glm_positions, generation_attention_mask, attention_mask
            )
        else:  # (right padding was refused by generate() itself, once)
            position_ids = build_position_ids(input_ids, attention_mask, self.config, validate=past_length == 0)
            step_position_ids, step_mask = position_ids[..., past_length:], attention_mask
        model_inputs = {
            "input_ids": input_ids[:, past_length:],
            "position_ids": step_position_ids,
            "past_key_values": past_key_values,
            "attention_mask": step_mask,
        }
        skipped = {"cache_position", "next_sequence_length", "is_first_iteration", "labels"}
        model_inputs.update({k: v for k, v in kwargs.items() if k not in skipped and k not in model_inputs})
        return model_inputs

    def _glm_generation_step(
        self,
        input_ids: torch.Tensor,
        past_length: int,
        position_ids: torch.Tensor | None,
        generation_attention_mask: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's slices of GLM's precomputed generation positions [B, 2, L + G] and mask [B, 1, L + G, L + G]
        (either may be absent: it is then built from the tokens)."""
        batch_size, length = input_ids.shape
        if generation_attention_mask is not None:
            mask = _to_batch(generation_attention_mask, batch_size, "generation_attention_mask")
            if mask.dim() != 4 or mask.shape[-1] < length or mask.shape[-2] < length:
                raise ValueError(
                    f"generation_attention_mask {list(generation_attention_mask.shape)} covers fewer than the "
                    f"{length} tokens generated so far: build the inputs with max_gen_length >= max_new_tokens "
                    "(tokenizer.build_inputs_for_generation(..., max_gen_length=...))"
                )
            step_mask = mask[:, :, past_length:length, :length]
        else:  # the 2-D padding mask; the model derives the prefix-LM mask from the block positions
            step_mask = attention_mask
        if position_ids is not None:
            positions = _to_batch(position_ids, batch_size, "position_ids")
            if positions.shape[-1] < length:
                raise ValueError(
                    f"position_ids {list(position_ids.shape)} cover fewer than the {length} tokens generated so "
                    "far: build the inputs with max_gen_length >= max_new_tokens"
                )
            step_positions = positions[..., past_length:length]
        else:
            step_positions = build_position_ids(input_ids, None, self.config, validate=past_length == 0)
            step_positions = step_positions[..., past_length:]
        return step_positions, step_mask


class GLMForSequenceClassification(GLMPreTrainedModel):
    """GLM's classification head: the first token's final hidden state -> dropout -> tanh(dense) -> dropout ->
    out_proj with `config.num_labels` outputs (GLM's GLMForSequenceClassification; `dense` and `out_proj` keep its
    key names). `config.classifier_dropout` (None: `output_dropout_prob`) is the head's dropout.

    GLM pools token 0, which is `[CLS]` in GLM's right-padded batches; with a left-padded 2-D `attention_mask`
    this head pools each row's first real token, the same `[CLS]`. Inputs of shape [B, C, S] (with masks and
    positions shaped alike) are C choices per example, each scored by the head (use num_labels=1): logits [B, C].
    The loss follows `config.problem_type` as in transformers' heads (cross-entropy for integer labels, as GLM).
    """

    _auto_class = "AutoModelForSequenceClassification"  # save_pretrained copies the code files next to the weights
    accepts_loss_kwargs = False  # a mean loss per batch: Trainer divides by the accumulation steps itself
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"^lm_head\."]

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = GLMModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.output_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        r"""
        Arguments as in [`GLMModel.forward`] (without a cache), plus `labels`: [B] class indices (or floats for
        regression / multi-label, per `config.problem_type`), or [B] choice indices for [B, C, S] inputs.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        num_choices = None
        if (input_ids if input_ids is not None else inputs_embeds) is not None and (
            (input_ids is not None and input_ids.dim() == 3) or (inputs_embeds is not None and inputs_embeds.dim() == 4)
        ):
            num_choices = (input_ids if input_ids is not None else inputs_embeds).shape[1]
            input_ids, inputs_embeds, position_ids = (
                t.flatten(0, 1) if t is not None else None for t in (input_ids, inputs_embeds, position_ids)
            )
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() >= 2:
                attention_mask = attention_mask.flatten(0, 1)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [B, S, h]
        batch_size = hidden_states.shape[0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            pool_index = _first_index(attention_mask != 0)  # left padding: the first real token
        else:
            pool_index = torch.zeros(batch_size, dtype=torch.long, device=hidden_states.device)
        pooled = hidden_states[torch.arange(batch_size, device=hidden_states.device), pool_index]  # [B, h]
        pooled = self.dropout(torch.tanh(self.dense(self.dropout(pooled))))
        logits = self.out_proj(pooled)  # [B, num_labels]
        if num_choices is not None:
            logits = logits.view(-1, num_choices)

        loss = None
        if labels is not None:
            loss = self._loss(logits, labels.to(logits.device), num_choices is not None)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, choices: bool) -> torch.Tensor:
        if choices:
            return F.cross_entropy(logits.float(), labels)
        if self.config.problem_type is None:  # transformers' rule
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"
        if self.config.problem_type == "regression":
            return F.mse_loss(logits.float().squeeze(-1), labels.float().reshape(-1))
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.float().view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class GLMForMultipleChoice(GLMPreTrainedModel):
    """GLM's multiple choice by blank filling: a choice scores the summed log-probability of its tokens written into
    the blank, and every choice of an example is read in one forward pass (GLM's GLMForMultipleChoice).

    Inputs as GLM's tokenizer `build_inputs_for_multiple_choice` builds them: `input_ids` [B, L] with the context
    followed, for each choice, by `<sop>` and the choice's tokens but its last; `position_ids` [B, 2, L]; a 4-D
    `attention_mask` [B, 1, L, L] (each choice sees the context and itself, causally); and for every choice its
    token ids (`choice_ids`) and the positions whose next-token distribution predicts them (`choice_indices`),
    either in GLM's form (per example, a list of 1-D tensors, one per choice) or padded: LongTensors [B, C, T]
    with `choice_ids` padded by -100. Logits are the choice scores [B, C]; `labels` [B] the right choice.
    """

    _auto_class = "AutoModelForMultipleChoice"  # save_pretrained copies the code files next to the weights
    accepts_loss_kwargs = False  # a mean loss per batch: Trainer divides by the accumulation steps itself
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"^dense\.", r"^out_proj\."]

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        self.transformer = GLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        choice_ids: torch.LongTensor | list | None = None,
        choice_indices: torch.LongTensor | list | None = None,
        labels: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MultipleChoiceModelOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if choice_ids is None or choice_indices is None:
            raise ValueError(
                "GLMForMultipleChoice needs choice_ids and choice_indices (tokenizer.build_inputs_for_multiple_choice "
                "builds them with input_ids, position_ids and attention_mask)"
            )
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # [B, L, h]
        ids, index = _padded_choices(choice_ids, choice_indices, hidden_states.shape[0], hidden_states.device)
        valid = ids != -100  # [B, C, T]
        if bool((index[valid] < 0).any()) or bool((index[valid] >= hidden_states.shape[1]).any()):
            raise ValueError(f"choice_indices must point into the {hidden_states.shape[1]} input positions")
        rows = torch.arange(ids.shape[0], device=ids.device)[:, None, None]
        picked = hidden_states[rows, index.clamp(min=0, max=hidden_states.shape[1] - 1)]  # [B, C, T, h]
        log_probs = torch.log_softmax(self.lm_head(picked).float(), dim=-1)  # [B, C, T, V]
        token_log_probs = log_probs.gather(-1, ids.clamp(min=0)[..., None])[..., 0]  # [B, C, T]
        scores = token_log_probs.masked_fill(~valid, 0.0).sum(dim=-1)  # [B, C]

        loss = F.cross_entropy(scores, labels.to(scores.device)) if labels is not None else None
        output = MultipleChoiceModelOutput(
            loss=loss, logits=scores, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


def _padded_choices(choice_ids, choice_indices, batch_size: int, device: torch.device):
    """`choice_ids` / `choice_indices` as LongTensors [B, C, T] (ids padded with -100), from GLM's nested lists of
    1-D tensors or from tensors already padded."""
    if isinstance(choice_ids, torch.Tensor) and isinstance(choice_indices, torch.Tensor):
        if choice_ids.dim() != 3 or choice_ids.shape != choice_indices.shape or choice_ids.shape[0] != batch_size:
            raise ValueError(
                f"padded choice_ids and choice_indices must both be [batch={batch_size}, choices, tokens], got "
                f"{list(choice_ids.shape)} and {list(choice_indices.shape)}"
            )
        return choice_ids.to(device, torch.long), choice_indices.to(device, torch.long)
    if len(choice_ids) != batch_size or len(choice_indices) != batch_size:
        raise ValueError(f"choice_ids and choice_indices need one entry per example ({batch_size})")
    num_choices = {len(c) for c in choice_ids} | {len(c) for c in choice_indices}
    if len(num_choices) != 1:
        raise ValueError("every example needs the same number of choices (and of choice_indices entries)")
    rows = [
        (torch.as_tensor(i).reshape(-1), torch.as_tensor(x).reshape(-1))
        for c, n in zip(choice_ids, choice_indices)
        for i, x in zip(c, n)
    ]
    if any(len(i) != len(x) for i, x in rows):
        raise ValueError("each choice needs as many choice_indices as choice_ids")
    width = max(len(i) for i, _ in rows)
    ids = torch.full((len(rows), width), -100, dtype=torch.long)
    index = torch.zeros((len(rows), width), dtype=torch.long)
    for row, (i, x) in enumerate(rows):
        ids[row, : len(i)], index[row, : len(x)] = i, x
    shape = (batch_size, num_choices.pop(), width)
    return ids.view(shape).to(device), index.view(shape).to(device)


def _refuse_mems(kwargs: dict) -> None:
    if kwargs.get("mems") is not None:
        raise ValueError(
            "mems (GLM's cache of hidden states) is not supported: this model keeps a key/value cache in "
            "past_key_values (a transformers DynamicCache, which generate() manages)"
        )


def _to_batch(tensor: torch.Tensor, batch_size: int, name: str) -> torch.Tensor:
    """GLM generation inputs with one row per prompt -> one row per generated sequence.

    transformers 4.57 expands them for beams / num_return_sequences itself (repeat_interleave on dim 0); 5.x
    takes a 3-D `position_ids` for multimodal [3, B, L] positions and repeats along dim 1, turning [B, 2, L] into
    [B, 2 * k, L]; some callers pass them unexpanded. All three come back as [B * k, ...] here.
    """
    rows = tensor.shape[0]
    if rows == batch_size:
        if name == "position_ids" and tensor.shape[1] != 2:
            raise ValueError(f"position_ids must have shape [batch, 2, seq], got {list(tensor.shape)}")
        return tensor
    if rows == 0 or batch_size % rows:
        raise ValueError(f"{name} has {rows} rows, which does not divide the {batch_size} sequences being generated")
    copies = batch_size // rows
    if name == "position_ids" and tensor.shape[1] == 2 * copies:  # transformers 5.x: repeated along dim 1
        tensor = tensor.unflatten(1, (2, copies))[:, :, 0]
    elif name == "position_ids" and tensor.shape[1] != 2:
        raise ValueError(f"position_ids must have shape [batch, 2, seq], got {list(tensor.shape)}")
    return tensor.repeat_interleave(copies, dim=0)


__all__ = [
    "GLMPreTrainedModel",
    "GLMModel",
    "GLMForConditionalGeneration",
    "GLMForSequenceClassification",
    "GLMForMultipleChoice",
]
