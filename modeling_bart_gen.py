"""BART-gen: BART for conditional generation, as remote code that works on transformers 4.57 and 5.x.

BART (Lewis et al., 2019, "BART: Denoising Sequence-to-Sequence Pre-training for Natural Language
Generation, Translation, and Comprehension") is a post-LN Transformer encoder-decoder with learned absolute
positions (offset by 2, a fairseq legacy), a token embedding `shared` by the encoder, the decoder and the LM
head, and a `final_logits_bias` added to the logits.

This file follows `transformers.models.bart.modeling_bart.BartForConditionalGeneration` numerically and
key for key (a BART state dict loads with no tensor renamed), including its quirks: positions come from
`arange`, never from the attention mask, so left-padded inputs give exactly what transformers gives. It
differs in how it is written, so that it survives transformers upgrades (the seed's bug, and Florence-2's
BART copy that broke in 5.x):
- the LM head is tied to `model.shared` through the dict form of `_tied_weights_keys` (5.x ties only
  through it), and the config declares `tie_word_embeddings=True` itself;
- the caches are transformers `Cache` objects only: an `EncoderDecoderCache` whose cross-attention K/V are
  computed once per generation (`is_updated`), no tuples and no `_reorder_cache` (beam search reorders
  the Cache itself);
- masks are built here, once per forward, from public tensors (no `masking_utils`, whose signature changed
  between 4.57 and 5.x); attention dispatches through transformers' registry ("eager" or "sdpa";
  `fast_decoding.attention_function`);
- bad input (ids past the vocabulary, sequences past `max_position_embeddings`, labels without
  `decoder_start_token_id`/`pad_token_id`) raises a ValueError naming the problem;
- `BartGenText2TextPipeline` (pipeline_bart_gen.py, exported here), named in the config's `custom_pipelines`,
  keeps `pipeline("text2text-generation", model=DIR, trust_remote_code=True)` working on 5.x, which removed that task.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPastAndCrossAttentions,
    Seq2SeqLMOutput,
    Seq2SeqModelOutput,
)
from transformers.utils import can_return_tuple, logging

from .configuration_bart_gen import BartGenConfig
from .fast_decoding import CompiledDecoding, attention_function, fast_cpu_gemv, use_growing_kv_layers
from .model_checks import (
    CheckedLoading,
    check_encoder_states,
    check_generate_inputs,
    check_half_overflow,
    check_input_values,
    check_inputs,
    check_labels,
    check_max_positions,
    check_prompt_ids,
    check_shift_ids,
    check_static_cache,
    padding_mask,
    reads_values,
    resolve_use_cache,
)
from .pipeline_bart_gen import BartGenText2TextPipeline  # config.json's custom_pipelines names it here
from .transformers_compat import (
    CACHE_NAMES,
    LayerOutputs,
    as_encoder_output,
    base_outputs,
    cache_field,
    causal_lm_loss,
    check_unused_kwargs,
    fixed_cache_size,
    fixed_size_step_inputs,
    generation_cache,
    is_fixed_size,
    output_cache,
    take_cache,
)

logger = logging.get_logger(__name__)


# Adapted from transformers.models.bart.modeling_bart.shift_tokens_right
def shift_tokens_right(input_ids: torch.Tensor, pad_token_id: int | None, decoder_start_token_id: int | None):
    """Decoder inputs from labels: prepend `decoder_start_token_id`, drop the last token, -100 -> pad."""
    check_shift_ids(pad_token_id, decoder_start_token_id)
    shifted = input_ids.new_zeros(input_ids.shape)
    shifted[:, 1:] = input_ids[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill_(shifted == -100, pad_token_id)


def _to_backend_mask(allowed: torch.Tensor, dtype: torch.dtype, attn_implementation: str | None) -> torch.Tensor:
    """bool "may attend" mask -> what the attention function wants: bool for sdpa, additive float otherwise."""
    if attn_implementation == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def _key_padding_mask(
    attention_mask, name: str, shape: tuple[int, int], dtype: torch.dtype, attn_implementation: str | None, read: bool
) -> torch.Tensor | None:
    """[B, 1, 1, S] hiding padded keys from every query (queries at padding still attend), from a 0/1 padding mask
    checked by `model_checks.padding_mask` as `name` of `shape`; None without padding."""
    if attention_mask is None:
        return None
    padding = padding_mask(attention_mask, name, shape, read)
    return None if padding is None else _to_backend_mask(padding[:, None, None, :], dtype, attn_implementation)


# Adapted from transformers.models.bart.modeling_bart.BartLearnedPositionalEmbedding (takes lengths, not ids)
class BartGenLearnedPositionalEmbedding(nn.Embedding):
    """Learned absolute positions; row `p + 2` holds position p (BART's fairseq offset)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        self.offset = 2
        super().__init__(num_embeddings + self.offset, embedding_dim)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        # positions are the query slots, arange(past, past + seq), for every row of the batch (never from a mask)
        return self.weight[slots + self.offset]  # (T, C)


# Adapted from transformers.models.bart.modeling_bart.BartScaledWordEmbedding
class BartGenScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by `embed_scale` (sqrt(d_model) when config.scale_embedding, else 1)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


# Adapted from transformers.models.bart.modeling_bart.eager_attention_forward
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
    """Plain softmax attention; `attention_mask` is additive (0 or the dtype's min). Returns out: (B, T, nh, hs)."""
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, T, S)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, T, nh, hs)
    return attn_output, attn_weights


# Adapted from transformers.models.bart.modeling_bart.BartAttention
class BartGenAttention(nn.Module):
    """Multi-head attention: encoder self-attention, decoder (causal) self-attention, or cross-attention.

    It is cross-attention when `key_value_states` (the encoder output) is given; its K/V then go into the
    cross half of an `EncoderDecoderCache` on the first decoding step and are reused on every later one.
    """

    def __init__(self, config: BartGenConfig, num_heads: int, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__()
        self.config = config
        self.embed_dim = config.d_model
        self.num_heads = num_heads
        self.head_dim = self.embed_dim // num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        # sdpa reads this when no mask is passed: only the decoder's self-attention is causal
        self.is_causal = is_causal
        self.layer_idx = layer_idx

        self.k_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.v_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        key_value_states: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`cache_position`: the slots of a fixed-size self-attention cache this step writes (None otherwise)."""
        B, T, _ = hidden_states.shape
        is_cross_attention = key_value_states is not None
        query = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)

        cache = past_key_values  # this attention's half of an EncoderDecoderCache, or a decoder-only cache
        if isinstance(past_key_values, EncoderDecoderCache):
            cache = (
                past_key_values.cross_attention_cache if is_cross_attention else past_key_values.self_attention_cache
            )
        elif is_cross_attention and past_key_values is not None:
            raise ValueError("cross-attention needs an EncoderDecoderCache, got " + type(past_key_values).__name__)

        if is_cross_attention and cache is not None and past_key_values.is_updated.get(self.layer_idx):
            # encoder K/V were projected on the first step of this generation: reuse them
            key = cache.layers[self.layer_idx].keys  # (B, nh, S, hs)
            value = cache.layers[self.layer_idx].values
        else:
            source = key_value_states if is_cross_attention else hidden_states
            key = self.k_proj(source).view(B, source.shape[1], -1, self.head_dim).transpose(1, 2)  # (B, nh, S, hs)
            value = self.v_proj(source).view(B, source.shape[1], -1, self.head_dim).transpose(1, 2)
            if cache is not None:
                static = None if cache_position is None or is_cross_attention else {"cache_position": cache_position}
                key, value = cache.update(key, value, self.layer_idx, static)  # self-attention: (B, nh, past + T, hs)
                if is_cross_attention:
                    past_key_values.is_updated[self.layer_idx] = True

        attention_interface = attention_function(self, query, key, eager_attention_forward)

        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling,
        )  # (B, T, nh, hs)
        attn_output = self.out_proj(attn_output.reshape(B, T, -1))  # (B, T, C)
        return attn_output, attn_weights


# Adapted from transformers.models.bart.modeling_bart.BartEncoderLayer (returns its attention weights)
class BartGenEncoderLayer(GradientCheckpointingLayer):
    """Post-LN block: x = LN(x + SelfAttn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: BartGenConfig, layer_idx: int | None = None):
        super().__init__()
        self.embed_dim = config.d_model
        self.self_attn = BartGenAttention(config, config.encoder_attention_heads, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.fc1 = nn.Linear(self.embed_dim, config.encoder_ffn_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_dim, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, attn_weights = self.self_attn(hidden_states, attention_mask=attention_mask)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = F.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual + hidden_states)

        # as BART: keep fp16 activations finite in the encoder
        if hidden_states.dtype == torch.float16 and not torch.isfinite(hidden_states).all():
            clamp_value = torch.finfo(hidden_states.dtype).max - 1000
            hidden_states = torch.clamp(hidden_states, min=-clamp_value, max=clamp_value)
        return hidden_states, attn_weights


# Adapted from transformers.models.bart.modeling_bart.BartDecoderLayer (returns its attention weights)
class BartGenDecoderLayer(GradientCheckpointingLayer):
    """Post-LN block: x = LN(x + CausalSelfAttn(x)); x = LN(x + CrossAttn(x, enc)); x = LN(x + FFN(x))."""

    def __init__(self, config: BartGenConfig, layer_idx: int | None = None):
        super().__init__()
        self.embed_dim = config.d_model
        self.self_attn = BartGenAttention(config, config.decoder_attention_heads, is_causal=True, layer_idx=layer_idx)
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.encoder_attn = BartGenAttention(config, config.decoder_attention_heads, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.fc1 = nn.Linear(self.embed_dim, config.decoder_ffn_dim)
        self.fc2 = nn.Linear(config.decoder_ffn_dim, self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,  # read (and cleared) by GradientCheckpointingLayer while checkpointing
        cache_position: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        residual = hidden_states
        hidden_states, self_attn_weights = self.self_attn(
            hidden_states, past_key_values=past_key_values, attention_mask=attention_mask, cache_position=cache_position
        )
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.self_attn_layer_norm(residual + hidden_states)

        cross_attn_weights = None
        if encoder_hidden_states is not None:
            residual = hidden_states
            hidden_states, cross_attn_weights = self.encoder_attn(
                hidden_states,
                key_value_states=encoder_hidden_states,
                past_key_values=past_key_values,
                attention_mask=encoder_attention_mask,
            )
            hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)
            hidden_states = self.encoder_attn_layer_norm(residual + hidden_states)

        residual = hidden_states
        hidden_states = self.activation_fn(self.fc1(hidden_states))
        hidden_states = F.dropout(hidden_states, p=self.activation_dropout, training=self.training)
        hidden_states = F.dropout(self.fc2(hidden_states), p=self.dropout, training=self.training)
        hidden_states = self.final_layer_norm(residual + hidden_states)
        return hidden_states, self_attn_weights, cross_attn_weights


# Adapted from transformers.models.bart.modeling_bart.BartPreTrainedModel
class BartGenPreTrainedModel(CheckedLoading, PreTrainedModel):
    config_class = BartGenConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BartGenEncoderLayer", "BartGenDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _keys_to_ignore_on_load_unexpected = [r"encoder\.version", r"decoder\.version"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            # 5.x marks loaded tensors; a row write bypasses its guard on nn.init, so check it here
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if isinstance(getattr(module, "final_logits_bias", None), torch.Tensor):
            nn.init.zeros_(module.final_logits_bias)


# Adapted from transformers.models.bart.modeling_bart.BartEncoder (inputs checked, padding mask built here)
class BartGenEncoder(BartGenPreTrainedModel):
    """The encoder: token + position embeddings, LayerNorm, `config.encoder_layers` post-LN layers."""

    def __init__(self, config: BartGenConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        # the same module object as BartGenModel.shared when built by it (so the weight is shared on 4.57 too)
        self.embed_tokens = (
            embed_tokens
            if embed_tokens is not None
            else BartGenScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
        )
        self.embed_positions = BartGenLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BartGenEncoderLayer(config, layer_idx=i) for i in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        kwargs = {k: v for k, v in kwargs.items() if k not in CACHE_NAMES}  # the decoder's (4.57 passes it on)
        check_unused_kwargs(kwargs, type(self).__name__)
        collected = LayerOutputs(self.config, output_hidden_states, output_attentions)
        read = not torch.compiler.is_compiling()  # the encoder runs once per source: never a decode step
        B, S = check_inputs(input_ids, inputs_embeds, self.embed_tokens, width_name="d_model")
        if read:
            check_input_values(input_ids, inputs_embeds, self.embed_tokens, "input_ids", "inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, S, C)
        check_max_positions(S, self.config.max_position_embeddings, "input_ids (encoder)")

        hidden_states = inputs_embeds + self.embed_positions(torch.arange(S, device=inputs_embeds.device))
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)

        impl = self.config._attn_implementation
        mask = _key_padding_mask(attention_mask, "attention_mask", (B, S), inputs_embeds.dtype, impl, read)

        for layer in self.layers:
            collected.add_hidden_state(hidden_states)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                collected.add_attentions(None)
                continue  # LayerDrop
            hidden_states, attn_weights = layer(hidden_states, mask)
            collected.add_attentions(attn_weights)
        collected.add_hidden_state(hidden_states)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=collected.hidden_states, attentions=collected.attentions
        )


# Adapted from transformers.models.bart.modeling_bart.BartDecoder (masks built here, see above)
class BartGenDecoder(BartGenPreTrainedModel):
    """The decoder: causal self-attention with a KV cache, cross-attention to the encoder output."""

    def __init__(self, config: BartGenConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.dropout = config.dropout
        self.layerdrop = config.decoder_layerdrop
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = (
            embed_tokens
            if embed_tokens is not None
            else BartGenScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
        )
        self.embed_positions = BartGenLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([BartGenDecoderLayer(config, layer_idx=i) for i in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    def _prepare_cache(self, past_key_values: Cache | None, use_cache: bool, cross_attention: bool) -> Cache | None:
        """The caller's cache or, with `use_cache`, a new one (encoder-decoder with an encoder), growing layers in."""
        if use_cache and past_key_values is None:
            past_key_values = EncoderDecoderCache(DynamicCache(), DynamicCache()) if cross_attention else DynamicCache()
        if past_key_values is not None:
            use_growing_kv_layers(past_key_values)
        return past_key_values

    def _step_slots(self, cache: Cache | None, cache_position, T: int, device) -> tuple[int | None, torch.Tensor, int]:
        """(past_length, slots, k_len): the decoder positions before this call (the cache's), the queries' slots [T]
        and the number of keys. A fixed-size cache's fill is not read on the host: past_length None, slots
        `cache_position` (checked), keys all its slots."""
        if is_fixed_size(cache):
            limit = self.config.max_position_embeddings
            check_static_cache(cache, cache_position, limit, "max_position_embeddings")
            return None, cache_position.to(device), fixed_cache_size(cache)
        past_length = cache.get_seq_length() if cache is not None else 0
        return past_length, torch.arange(past_length, past_length + T, device=device), past_length + T

    def _self_attention_mask(
        self,
        attention_mask: torch.Tensor | None,
        slots: torch.Tensor,
        k_len: int,
        past_length: int | None,
        dtype: torch.dtype,
        read: bool = True,
        batch_size: int | None = None,
    ) -> torch.Tensor | None:
        """Causal mask of the queries at `slots` [T] over k_len keys, AND the decoder padding mask (checked:
        [batch_size, k_len]); None when sdpa's is_causal suffices (never with a fixed-size cache, past_length None:
        its empty slots must be hidden)."""
        padding = None
        if attention_mask is not None:
            B = batch_size if batch_size is not None else getattr(attention_mask, "shape", (0,))[0]
            padding = padding_mask(attention_mask, "decoder_attention_mask", (B, k_len), read)
        impl, T = self.config._attn_implementation, len(slots)
        if padding is None and past_length is not None and (T == 1 or (past_length == 0 and impl == "sdpa")):
            return None  # one new token sees the whole cache; a fresh sequence uses sdpa's own causal mask
        kv_pos = torch.arange(k_len, device=slots.device)
        allowed = (kv_pos[None, :] <= slots[:, None])[None, None]  # (1, 1, T, K)
        if padding is not None:
            allowed = allowed & padding[:, None, None, :]  # (B, 1, T, past + T)
        return _to_backend_mask(allowed, dtype, impl)

    def _cross_attention_mask(
        self, encoder_hidden_states: torch.Tensor | None, encoder_attention_mask: torch.Tensor | None, dtype, read: bool
    ) -> torch.Tensor | None:
        """[B, 1, 1, S] hiding the source's padding from every query; None without an encoder output or padding."""
        if encoder_hidden_states is None:
            return None
        shape = tuple(encoder_hidden_states.shape[:2])
        impl = self.config._attn_implementation
        return _key_padding_mask(encoder_attention_mask, "attention_mask (encoder)", shape, dtype, impl, read)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache_position: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        """`cache_position`: the [T] slots this step writes, needed with a fixed-size cache (generate() passes it)."""
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        check_unused_kwargs(kwargs, type(self).__name__)
        has_encoder = encoder_hidden_states is not None  # cross-attention in every layer
        collected = LayerOutputs(self.config, output_hidden_states, output_attentions, cross=has_encoder)
        use_cache = resolve_use_cache(self, use_cache)
        names = ("decoder_input_ids", "decoder_inputs_embeds")
        B, T = check_inputs(input_ids, inputs_embeds, self.embed_tokens, *names, width_name="d_model")
        if has_encoder:
            check_encoder_states(encoder_hidden_states, B, self.config.d_model, self.embed_tokens.weight.dtype)
        past_key_values = self._prepare_cache(past_key_values, use_cache, has_encoder)
        device = (input_ids if input_ids is not None else inputs_embeds).device  # not the weights' (offloading: meta)
        past_length, slots, k_len = self._step_slots(past_key_values, cache_position, T, device)
        read = reads_values(past_length, T)  # data-dependent checks: not on decode steps
        if read:
            check_input_values(input_ids, inputs_embeds, self.embed_tokens, *names)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # (B, T, C)
        check_max_positions(k_len, self.config.max_position_embeddings, "the decoder sequence (cache + new tokens)")
        dtype = inputs_embeds.dtype
        self_mask = self._self_attention_mask(attention_mask, slots, k_len, past_length, dtype, read, B)
        cross_mask = self._cross_attention_mask(encoder_hidden_states, encoder_attention_mask, dtype, read)

        hidden_states = inputs_embeds + self.embed_positions(slots)
        hidden_states = self.layernorm_embedding(hidden_states)
        hidden_states = F.dropout(hidden_states, p=self.dropout, training=self.training)

        for layer in self.layers:
            collected.add_hidden_state(hidden_states)
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue  # LayerDrop
            hidden_states, self_weights, cross_weights = layer(
                hidden_states,
                self_mask,
                encoder_hidden_states,  # positional, so gradient checkpointing passes its gradient
                encoder_attention_mask=cross_mask,
                past_key_values=past_key_values,
                use_cache=use_cache,
                cache_position=slots if past_length is None else None,
            )
            collected.add_attentions(self_weights, cross_weights)
        collected.add_hidden_state(hidden_states)

        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=hidden_states,
            **cache_field(past_key_values if use_cache else None),
            hidden_states=collected.hidden_states,
            attentions=collected.attentions,
            cross_attentions=collected.cross_attentions,
        )


# Adapted from transformers.models.bart.modeling_bart.BartModel
class BartGenModel(BartGenPreTrainedModel):
    """Encoder + decoder sharing one token embedding (`shared`); outputs the decoder's hidden states."""

    _auto_class = "AutoModel"  # save_pretrained / push_to_hub copy the code files even when built directly
    # The encoder and decoder hold the very module `shared` (one Parameter on every version); the mapping
    # lets 5.x save one copy and load checkpoints that store any of the three names.
    _tied_weights_keys = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }
    # a BartGenForConditionalGeneration checkpoint also holds the LM class's bias
    _keys_to_ignore_on_load_unexpected = [r"encoder\.version", r"decoder\.version", r"final_logits_bias"]

    def __init__(self, config: BartGenConfig):
        super().__init__(config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = BartGenScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id, embed_scale)
        self.encoder = BartGenEncoder(config, self.shared)
        self.decoder = BartGenDecoder(config, self.shared)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.shared

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.shared = value
        self.encoder.embed_tokens = value
        self.decoder.embed_tokens = value

    def get_encoder(self) -> BartGenEncoder:
        return self.encoder

    def get_decoder(self) -> BartGenDecoder:
        return self.decoder

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple[torch.Tensor, ...] | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> Seq2SeqModelOutput:
        r"""
        decoder_input_ids: when neither they nor `decoder_inputs_embeds` are given, BART denoises: the decoder
            reads `input_ids` shifted right (starting with `config.decoder_start_token_id`).
        encoder_outputs: a precomputed encoder output (as generate() passes it); the encoder is then skipped.
        """
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        cache_position = kwargs.pop("cache_position", None)  # the decoder's slots, for a fixed-size cache
        check_unused_kwargs(kwargs, type(self).__name__)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass decoder_input_ids (or decoder_inputs_embeds), or input_ids to shift right")
            check_prompt_ids(input_ids, "input_ids", self.shared.num_embeddings)
            decoder_input_ids = shift_tokens_right(
                input_ids, self.config.pad_token_id, self.config.decoder_start_token_id
            )
        if encoder_outputs is None:
            encoder_outputs = self.encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                inputs_embeds=inputs_embeds,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
        else:
            encoder_outputs = as_encoder_output(encoder_outputs)
        decoder_outputs = self.decoder(
            input_ids=decoder_input_ids,
            attention_mask=decoder_attention_mask,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            cache_position=cache_position,
        )
        return Seq2SeqModelOutput(
            last_hidden_state=decoder_outputs.last_hidden_state,
            **cache_field(output_cache(decoder_outputs)),
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            cross_attentions=decoder_outputs.cross_attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
        )


# Adapted from transformers.models.bart.modeling_bart.BartForConditionalGeneration
class BartGenForConditionalGeneration(BartGenPreTrainedModel, CompiledDecoding, GenerationMixin):
    """BART with its LM head (tied to `model.shared`) and `final_logits_bias`: summarisation, translation, ..."""

    _auto_class = "AutoModelForSeq2SeqLM"  # save_pretrained / push_to_hub copy the code files
    _can_compile_fullgraph = True  # a static cache (cache_implementation="static") and transformers' auto-compile
    _tied_weights_keys = {"lm_head.weight": "model.shared.weight"}
    _keys_to_ignore_on_load_missing = [r"final_logits_bias"]

    def __init__(self, config: BartGenConfig):
        super().__init__(config)
        self.model = BartGenModel(config)
        self.register_buffer("final_logits_bias", torch.zeros((1, config.vocab_size)))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()

    def get_encoder(self) -> BartGenEncoder:
        return self.model.encoder

    def get_decoder(self) -> BartGenDecoder:
        return self.model.decoder

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, new_embeddings: nn.Linear) -> None:
        self.lm_head = new_embeddings

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        new_embeddings = super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        n_old, n_new = self.final_logits_bias.shape[-1], new_embeddings.weight.shape[0]
        bias = F.pad(self.final_logits_bias, (0, n_new - n_old))  # zeros for new tokens; a negative pad crops
        self.register_buffer("final_logits_bias", bias.contiguous())
        return new_embeddings

    def prepare_decoder_input_ids_from_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return shift_tokens_right(labels, self.config.pad_token_id, self.config.decoder_start_token_id)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, with the source checked first: a clear error for ids that are not an integer
        [batch, length] tensor in the vocabulary, a padding mask of another shape, or ids and embeddings both
        given, instead of one from deep inside generate() or embeddings silently ignored."""
        check_generate_inputs(inputs, kwargs, self.config.vocab_size, left_padding=False)
        return super().generate(inputs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self, decoder_input_ids: torch.LongTensor, past_key_values: Cache | None = None, cache=None, **kwargs
    ) -> dict:
        """transformers' own, with the cache taken under either name and refused when missing (see
        `transformers_compat.generation_cache`); a fixed-size cache's step inputs built by `fixed_size_step_inputs`."""
        cache = generation_cache(self.config, past_key_values, dict(kwargs, cache=cache), fixed_size_ok=True)
        if is_fixed_size(cache):
            return fixed_size_step_inputs(decoder_input_ids, cache, kwargs, decoder=True)
        return super().prepare_inputs_for_generation(decoder_input_ids, **cache_field(cache), **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple[torch.Tensor, ...] | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        r"""
        labels: target ids (-100 = ignored in the loss). Without decoder inputs, the decoder reads the labels
            shifted right, starting with `config.decoder_start_token_id`.
        logits_to_keep: if an int > 0, only the logits of the last `logits_to_keep` decoder positions are computed.
        num_items_in_batch: passed by Trainer; makes the loss a sum divided by that count.

        Example:

        ```python
        >>> from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
        >>> model = AutoModelForSeq2SeqLM.from_pretrained("path/to/converted-bart", trust_remote_code=True)
        >>> tokenizer = AutoTokenizer.from_pretrained("path/to/converted-bart")
        >>> inputs = tokenizer(["PG&E scheduled the blackouts in response to forecasts for high winds."], return_tensors="pt")
        >>> summary_ids = model.generate(**inputs, num_beams=4, max_new_tokens=20)
        >>> tokenizer.batch_decode(summary_ids, skip_special_tokens=True)
        ```
        """
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        if labels is not None:
            check_labels(labels, None, self.config.vocab_size)
            use_cache = False  # training on full target sequences: nothing to cache
            if decoder_input_ids is None and decoder_inputs_embeds is None:
                decoder_input_ids = self.prepare_decoder_input_ids_from_labels(labels)

        decoder_tokens = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        cached = past_key_values is not None and (is_fixed_size(past_key_values) or past_key_values.get_seq_length())
        with fast_cpu_gemv(decoder_tokens, past_key_values, self.lm_head.weight):
            outputs = self.model(
                input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                encoder_outputs=encoder_outputs,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                decoder_inputs_embeds=decoder_inputs_embeds,
                use_cache=use_cache,
                output_attentions=output_attentions,
                output_hidden_states=output_hidden_states,
                return_dict=True,
                **kwargs,
            )
            hidden_states = outputs.last_hidden_state  # (B, T, C)
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(hidden_states[:, keep, :]) + self.final_logits_bias.to(hidden_states.device)
        if logits.dtype == torch.float16 and not self.training and (not cached or hidden_states.shape[1] > 1):
            check_half_overflow(logits)  # once per source (the encoder just ran) or decoder prompt, not per token

        loss = self._loss(logits, labels, num_items_in_batch) if labels is not None else None
        return Seq2SeqLMOutput(loss=loss, logits=logits, **base_outputs(outputs))

    def _loss(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy of the logits against `labels` (checked: the decoder's shape), unshifted: labels[:, i] is the
        target of decoder position i, whose input is labels[:, i - 1] when the decoder inputs come from the labels."""
        check_labels(labels, logits.shape[:2], self.config.vocab_size, "the decoder's shape [batch, length] =", False)
        return causal_lm_loss(logits, labels, num_items_in_batch, shift=False)


__all__ = ["BartGenPreTrainedModel", "BartGenModel", "BartGenForConditionalGeneration", "BartGenText2TextPipeline"]
