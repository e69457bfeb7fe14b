"""GLM (General Language Model, Du et al. 2022) with the ChatGLM-6B architecture, as transformers remote code.

GLM fills blanks autoregressively: the context (with a `[MASK]`, `[sMASK]` or `[gMASK]` blank) is read with
bidirectional attention, and the span opened by `<sop>` is generated causally. Positions are 2-D: every span
token takes the position of its blank, and a second "block position" counts 1, 2, ... inside the span.

This file follows THUDM's `modeling_chatglm.py` (THUDM/chatglm-6b, final revision) numerically and keeps its
state-dict keys (`transformer.layers.N.attention.query_key_value`, ...), so ChatGLM-6B checkpoints and LoRA
adapters targeting `query_key_value` load unchanged. It is written fresh in the style of transformers' Llama:
Norm -> rotary -> masks -> MLP -> attention -> block -> models. Differences from THUDM's code:
- batch-first tensors and transformers' `DynamicCache` (no seq-first tuple caches, no `_reorder_cache`), so
  beam search, streaming and left-padded batches work through the stock `generate()`;
- the prefix-LM mask and 2-D position ids are built inside the model, vectorised, from `input_ids` and the
  2-D padding mask (left padding keeps positions counted from the first real token, like THUDM's tokenizer);
- eager and sdpa attention through `ALL_ATTENTION_FUNCTIONS`; the eager path keeps THUDM's layer-dependent
  query scaling, -10000 masking and fp32 softmax;
- rotary cos/sin are computed in fp32 from the fp16-rounded `inv_freq` (THUDM computes them in the model
  dtype, so half-precision runs differ from THUDM's in the last bits);
- `chat()`/`stream_chat()` are built on `generate()` and `TextIteratorStreamer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from threading import Thread

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import LogitsProcessor, LogitsProcessorList, TextIteratorStreamer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import logging

from .configuration_glm import GLMConfig

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
        # position_ids: [B, 2, S] (position, block position) -> cos, sin: [B, 1, S, head_dim]
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, 2, S, rotary_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, 2, S, rotary_dim]
        emb = emb.transpose(1, 2).flatten(2)  # [B, S, head_dim]: position half, then block-position half
        return emb.cos()[:, None].to(dtype), emb.sin()[:, None].to(dtype)


def rotate_half_2d(x: torch.Tensor) -> torch.Tensor:
    """`rotate_half` applied to each half of the head dimension separately: (a, b | c, d) -> (-b, a | -d, c)."""
    x = x.unflatten(-1, (2, 2, -1))  # [..., half, quarter, head_dim / 4]
    return torch.cat((-x[..., 1:, :], x[..., :1, :]), dim=-2).flatten(-3)


def apply_rotary_pos_emb(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # q, k: [B, H, S, D]; cos, sin: [B, 1, S, D]
    return q * cos + rotate_half_2d(q) * sin, k * cos + rotate_half_2d(k) * sin


# ----------------------------------------------------------------------------------------------------------------
# Blank-infilling inputs: 2-D position ids and the prefix-LM mask
# ----------------------------------------------------------------------------------------------------------------
def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (0 where there is none)."""
    return hits.to(torch.int32).argmax(dim=-1)


def build_position_ids(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, config: GLMConfig, validate: bool = True
) -> torch.Tensor:
    """2-D position ids [B, 2, S] for GLM blank infilling, without a loop over the batch.

    Row b reads: the context (everything before the first `<sop>`) has positions 0, 1, ... counted from the first
    real token (so left padding does not shift them) and block position 0; the span from `<sop>` on has the
    position of the blank (the first `[gMASK]`, else the first `[MASK]`/`[sMASK]`) and block positions 1, 2, ...
    Padding gets position 0. `validate` raises a ValueError naming the rows without a blank or a `<sop>`.
    """
    batch_size, seq_len = input_ids.shape
    is_gmask = input_ids == config.gmask_token_id
    is_short_blank = torch.zeros_like(is_gmask)
    for token_id in (config.mask_token_id, config.smask_token_id):
        if token_id is not None:
            is_short_blank |= input_ids == token_id
    has_gmask = is_gmask.any(dim=-1)
    blank_index = torch.where(has_gmask, _first_index(is_gmask), _first_index(is_short_blank))  # [B]
    is_sop = input_ids == config.bos_token_id
    sop_index = _first_index(is_sop)  # [B]
    if validate:
        _check_rows(
            has_gmask | is_short_blank.any(dim=-1),
            "no blank token ([gMASK], [MASK] or [sMASK], ids "
            f"{config.gmask_token_id}, {config.mask_token_id}, {config.smask_token_id})",
        )
        _check_rows(
            is_sop.any(dim=-1),
            f"no <sop> token (bos_token_id {config.bos_token_id}) opening the span "
            "to generate; the tokenizer appends `[gMASK] <sop>` to a prompt",
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


# ----------------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------------
class GLMMLP(nn.Module):
    """THUDM calls it `GLU`, but it is a plain MLP: h -> inner -> tanh-GELU -> h, with biases."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


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
    """Self-attention with a fused query_key_value projection, laid out per head as q|k|v (ChatGLM-6B)."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.layer_scaling = layer_idx + 1  # ChatGLM's query_key_layer_scaling_coeff (eager path)
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # the prefix-LM mask is always passed explicitly (or not needed)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        past_key_values: Cache | None = None,
        prefix_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, query_length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch_size, query_length, self.num_heads, 3 * self.head_dim)
        query, key, value = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each [B, H, q, D]
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)

        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [B, H, kv, D]
        if prefix_key_value is not None:  # P-tuning prefix when running without a cache (training)
            key = torch.cat((prefix_key_value[0], key), dim=2)
            value = torch.cat((prefix_key_value[1], value), dim=2)

        if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # 5.x
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
        elif self.config._attn_implementation == "eager":
            attention_interface = eager_attention_forward
        else:  # 4.x
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        output, weights = attention_interface(
            self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs
        )  # output: [B, q, H, D]
        return self.dense(output.reshape(batch_size, query_length, -1)), weights


class GLMBlock(GradientCheckpointingLayer):
    """ChatGLM block: the residual adds the *normalised* input scaled by alpha (DeepNorm-like)."""

    def __init__(self, config: GLMConfig, layer_idx: int):
        super().__init__()
        self.alpha = config.residual_alpha
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = GLMAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLMMLP(config)

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
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        hidden_states = mlp_input * self.alpha + self.mlp(mlp_input)
        return hidden_states, weights


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
class GLMPreTrainedModel(PreTrainedModel):
    config_class = GLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    # THUDM checkpoints store each layer's rotary inv_freq; ours is recomputed, so those keys are dropped quietly.
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        # 5.x replaces the parameters while loading, which resets the P-tuning freeze done in __init__
        if getattr(model.config, "pre_seq_len", None) is not None:
            model.freeze_for_prefix_tuning()
        return model

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
    """The GLM transformer without a head: word embeddings, blocks, final LayerNorm (THUDM's ChatGLMModel)."""

    _auto_class = "AutoModel"  # save_pretrained copies the code files next to the weights

    def __init__(self, config: GLMConfig):
        super().__init__(config)
        if config.variant != "chatglm":
            # The GLM-10B family slots in here (learned position + block-position embeddings added to the word
            # embeddings), in GLMBlock (pre-LN plain residual), GLMAttention (contiguous q|k|v, no rotary) and
            # GLMMLP (erf GELU); masks, positions, cache and generation are shared.
            raise NotImplementedError(
                f"GLMConfig.variant={config.variant!r} (GLM-10B family: learned position and block-position "
                "embeddings, pre-LN residual) is not implemented in this release; only variant='chatglm' is."
            )
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GLMBlock(config, layer_idx) for layer_idx in range(config.num_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.rotary_emb = GLMRotaryEmbedding(config)
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
        return build_position_ids(input_ids, attention_mask, self.config)

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
            causally.
        attention_mask: [B, past + S] padding mask (1 = real token; pad on the left for generation), or an
            explicit boolean / 0-1 mask [B, 1, S, past + S] (True / 1 = attend), used as given.
        position_ids: [B, 2, S] (position, block position). Built from `input_ids` when omitted; needed when
            continuing a non-empty cache by hand (`model.get_position_ids(full_ids, mask)[..., -S:]`).
        """
        config = self.config
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        use_cache = use_cache if use_cache is not None else config.use_cache
        return_dict = return_dict if return_dict is not None else config.return_dict
        if self.gradient_checkpointing and self.training and use_cache:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False.")
            use_cache = False

        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if past_key_values is not None and not isinstance(past_key_values, Cache):
            raise ValueError(
                "past_key_values must be a transformers Cache (e.g. DynamicCache), got "
                f"{type(past_key_values).__name__}; tuple caches of the original ChatGLM code are not supported."
            )
        if input_ids is not None:
            self._check_token_ids(input_ids)
            inputs_embeds = self.word_embeddings(input_ids)
        batch_size, query_length = inputs_embeds.shape[:2]

        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_length, prefix_key_values = self._prepare_prefix(past_key_values, batch_size, inputs_embeds.dtype)
        prefix_length = config.pre_seq_len or 0
        if past_length + query_length > config.max_sequence_length:
            raise ValueError(
                f"sequence length {past_length + query_length} (cached {past_length} + new {query_length}) exceeds "
                f"max_sequence_length={config.max_sequence_length}"
            )

        # 2-D positions and the prefix-LM mask, once for all layers.
        kv_length = past_length + query_length
        if attention_mask is not None and attention_mask.dim() != 4 and attention_mask.shape != (batch_size, kv_length):
            raise ValueError(
                f"attention_mask must be a [batch, past + seq] = [{batch_size}, {kv_length}] padding mask or a "
                f"4-D [batch, 1, seq, past + seq] mask, got {list(attention_mask.shape)}"
            )
        position_ids = self._resolve_position_ids(
            input_ids, attention_mask, position_ids, past_length, batch_size, query_length
        )
        attention_mask = self._resolve_attention_mask(
            attention_mask, position_ids, past_length, prefix_length, batch_size, query_length
        )
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)

        hidden_states = inputs_embeds
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
            past_key_values=past_key_values if use_cache else None,
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

    def _check_token_ids(self, input_ids: torch.Tensor) -> None:
        vocab_size = self.config.vocab_size
        out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(out_of_range.any()):
            row, col = (int(i) for i in torch.nonzero(out_of_range)[0])
            raise ValueError(
                f"input_ids[{row}, {col}] = {int(input_ids[row, col])} is outside the vocabulary "
                f"[0, vocab_size={vocab_size}); is the tokenizer the one of this checkpoint?"
            )

    def _resolve_position_ids(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_length: int,
        batch_size: int,
        query_length: int,
    ) -> torch.Tensor:
        if position_ids is not None:
            if position_ids.shape != (batch_size, 2, query_length):
                raise ValueError(
                    f"position_ids must have shape [batch, 2, seq] = [{batch_size}, 2, {query_length}] "
                    f"(position ids, block position ids), got {list(position_ids.shape)}"
                )
            return position_ids.to(torch.long)
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
        padding_mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        return build_position_ids(input_ids, padding_mask, self.config)

    def _resolve_attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        past_length: int,
        prefix_length: int,
        batch_size: int,
        query_length: int,
    ) -> torch.Tensor | None:
        kv_length = past_length + query_length
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape[0] != batch_size or attention_mask.shape[2:] != (query_length, kv_length):
                raise ValueError(
                    f"a 4-D attention_mask must have shape [batch, 1, q, past + q] = [{batch_size}, 1, "
                    f"{query_length}, {kv_length}], got {list(attention_mask.shape)}"
                )
            if attention_mask.dtype != torch.bool:
                if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
                    raise ValueError(
                        "a 4-D attention_mask must be boolean or hold 0/1 (True / 1 = attend); additive float "
                        "masks are not accepted"
                    )
                attention_mask = attention_mask.bool()
            if prefix_length:
                attention_mask = F.pad(attention_mask, (prefix_length, 0), value=True)
            return attention_mask
        if attention_mask is not None:
            if bool(attention_mask.all()):
                attention_mask = None  # no padding: skip the per-key test
        return build_attention_mask(position_ids[:, 1], attention_mask, past_length, prefix_length)


class GLMForConditionalGeneration(GLMPreTrainedModel, GenerationMixin):
    """GLM with the LM head tied to the word embeddings; `generate()`, `chat()` and `stream_chat()`."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the code files next to the weights
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

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
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = None
        if labels is not None:
            # next-token prediction: the logits at i predict labels[i + 1] (computed in fp32, like THUDM)
            shift_logits = logits[:, :-1, :].float()
            shift_labels = labels[:, 1:].to(shift_logits.device)
            loss = F.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=-100,
                reduction="sum" if num_items_in_batch is not None else "mean",
            )
            if num_items_in_batch is not None:  # Trainer with gradient accumulation: normalise over all micro-batches
                loss = loss / num_items_in_batch

        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return output if return_dict else output.to_tuple()

    # ------------------------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------------------------
    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Feed the tokens the cache has not seen, with their 2-D positions recomputed from the full sequence.

        Works on transformers 4.57 and 5.x alike: the new tokens are found from the cache length (not from
        `cache_position` / `next_sequence_length`), and generate()'s own 1-D `position_ids` are replaced.
        """
        if inputs_embeds is not None and input_ids.shape[1] == 0:
            raise ValueError(
                "GLM generation needs input_ids (the blank and <sop> tokens drive the mask), not inputs_embeds"
            )
        cache_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        past_length = cache_length - (self.config.pre_seq_len or 0) if cache_length else 0
        if past_length == 0 and attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "the batch is right-padded (attention_mask has 0 in the last column); generation needs left "
                "padding: set tokenizer.padding_side = 'left'"
            )
        position_ids = build_position_ids(input_ids, attention_mask, self.config, validate=past_length == 0)
        model_inputs = {
            "input_ids": input_ids[:, past_length:],
            "position_ids": position_ids[..., past_length:],
            "past_key_values": past_key_values,
            "attention_mask": attention_mask,
        }
        skipped = {"position_ids", "cache_position", "next_sequence_length", "is_first_iteration", "labels"}
        model_inputs.update({k: v for k, v in kwargs.items() if k not in skipped and k not in model_inputs})
        return model_inputs

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """ChatGLM-6B's chat API: answer `query` given `history`; returns (response, history + [(query, response)])."""
        history = list(history or [])
        inputs, gen_kwargs = self._chat_inputs(
            tokenizer, query, history, logits_processor, do_sample, top_p, temperature
        )
        output = self.generate(**inputs, max_length=max_length, num_beams=num_beams, **gen_kwargs, **kwargs)
        response = process_response(
            tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        )
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """ChatGLM-6B's streaming chat: yields (response so far, history + [(query, response so far)])."""
        history = list(history or [])
        inputs, gen_kwargs = self._chat_inputs(
            tokenizer, query, history, logits_processor, do_sample, top_p, temperature
        )
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def run_generate() -> None:
            try:
                self.generate(**inputs, max_length=max_length, streamer=streamer, **gen_kwargs, **kwargs)
            except BaseException as err:  # re-raised in the caller's thread below
                errors.append(err)
                streamer.end()

        thread = Thread(target=run_generate, daemon=True)
        thread.start()
        text, response = "", None
        for piece in streamer:
            text += piece
            if piece:
                response = process_response(text)
                yield response, history + [(query, response)]
        thread.join()
        if errors:
            raise errors[0]
        if response is None:  # an empty answer (e.g. <eop> first) still ends the stream with one reply
            yield "", history + [(query, "")]

    def _chat_inputs(
        self, tokenizer, query: str, history: list[tuple[str, str]], logits_processor, do_sample, top_p, temperature
    ) -> tuple[dict, dict]:
        """The encoded ChatGLM prompt, and generate() settings (sampling ones only when sampling)."""
        encoded = tokenizer([build_chat_prompt(query, history)], return_tensors="pt")
        inputs = {k: encoded[k].to(self.device) for k in ("input_ids", "attention_mask") if k in encoded}
        processors = LogitsProcessorList([InvalidScoreLogitsProcessor()])
        processors.extend(logits_processor or [])
        gen_kwargs = {"do_sample": do_sample, "logits_processor": processors}
        if do_sample:
            gen_kwargs.update(top_p=top_p, temperature=temperature)
        return inputs, gen_kwargs


def build_chat_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLM-6B's multi-turn prompt: the bare query without history, else numbered rounds of 问/答."""
    if not history:
        return query
    rounds = [f"[Round {i}]\n问：{old_query}\n答：{response}\n" for i, (old_query, response) in enumerate(history)]
    return "".join(rounds) + f"[Round {len(history)}]\n问：{query}\n答："


_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}


def process_response(response: str) -> str:
    """ChatGLM-6B's post-processing: strip, fill the training-date placeholder, and make ASCII punctuation next
    to a CJK character full-width."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in _FULL_WIDTH.items():
        mark = re.escape(ascii_mark)
        response = re.sub(rf"({_CJK}){mark}", rf"\1{full_width}", response)
        response = re.sub(rf"{mark}({_CJK})", rf"{full_width}\1", response)
    return response


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """ChatGLM-6B's guard against fp16 overflow: NaN/+inf scores become a forced token 5 instead of a crash.

    Unlike THUDM's, -inf is left alone: generate()'s own processors (bad words, min length, ...) put it there.
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if bool((torch.isnan(scores) | torch.isposinf(scores)).any()):
            scores = torch.zeros_like(scores)
            scores[..., 5] = 5e4
        return scores


__all__ = ["GLMPreTrainedModel", "GLMModel", "GLMForConditionalGeneration"]
