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
It is written fresh in the style of transformers' Llama: rotary -> MLP -> attention -> block -> models -> heads;
how the inputs become positions and masks is in `glm_inputs.py`, generation and chat in `glm_generation.py`.
Differences from THUDM's code:
- batch-first tensors and transformers' caches (`DynamicCache`, or a `StaticCache` whose decode step compiles to
  one graph), not seq-first tuples, so beam search, streaming and left padding work through the stock `generate()`;
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
from .glm_generation import GLMGenerationMixin
from .glm_inputs import (
    build_position_ids,
    check_fixed_size_cache,
    first_index,
    flatten_choices,
    padded_choices,
    positions_and_mask,
    refuse_mems,
)
from .model_checks import (
    CheckedLoading,
    check_half_overflow,
    check_input_values,
    check_inputs,
    check_labels,
    reads_values,
    resolve_use_cache,
)
from .transformers_compat import (
    LayerOutputs,
    base_outputs,
    cache_field,
    causal_lm_loss,
    check_unused_kwargs,
    is_fixed_size,
    sequence_classification_loss,
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
        cache_position: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, query_length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states)  # [B, q, 3 * hidden]
        query_key, value = self.split_qkv(qkv, self.num_heads, self.head_dim)  # [B, q, H, 2, D], [B, q, H, D]
        if position_embeddings is not None:  # ChatGLM's rotary cos/sin, queries and keys in one go
            query_key = apply_rotary_pos_emb(query_key, *position_embeddings)
        query, key = query_key.transpose(1, 2).unbind(-2)  # each [B, H, q, D]
        value = value.transpose(1, 2)

        if past_key_values is not None:  # a static cache writes at `cache_position` (transformers 4.57 needs it)
            slots = {"cache_position": cache_position} if cache_position is not None else None
            key, value = past_key_values.update(key, value, self.layer_idx, slots)  # [B, H, kv, D]
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
        cache_position: torch.LongTensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        r"""
        input_ids: [B, S] token ids. Without `position_ids`, every row needs a blank (`[gMASK]`, `[MASK]` or
            `[sMASK]`) and a `<sop>`: the context before `<sop>` is read bidirectionally, the rest causally.
            (Variant "glm": a row without `<sop>` is all context, e.g. a classification input.)
        attention_mask: a [B, past + S] padding mask (1 = real token; pad on the left for generation), the
            prefix-LM mask being built from the tokens; or an explicit boolean / 0-1 mask [B, 1, S, past + S]
            (True / 1 = attend; a row that may see nothing attends everywhere instead of giving NaN); or GLM's
            `sep`: an int, 1-element or [B] tensor, the number of leading tokens every token sees (the rest causal).
        position_ids: [B, 2, S] (position, block position). Built from `input_ids` when omitted; needed when
            continuing a non-empty cache by hand (`model.get_position_ids(full_ids, mask)[..., -S:]`).
        cache_position: [S], the slots of a `StaticCache` this call writes (generate() passes them).
        """
        config = self.config
        collected = LayerOutputs(config, output_hidden_states, output_attentions)
        return_dict = return_dict if return_dict is not None else config.return_dict
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
        refuse_mems(kwargs)
        check_unused_kwargs(kwargs, type(self).__name__)
        batch_size, query_length = check_inputs(input_ids, inputs_embeds, self.word_embeddings)
        use_cache = resolve_use_cache(self, use_cache)
        past_key_values, past_length, prefix_key_values, cache_position = self._prepare_cache(
            past_key_values, use_cache, (batch_size, query_length), inputs_embeds, cache_position
        )
        read = reads_values(past_length, query_length)  # data-dependent checks: not on decode steps
        inputs_embeds = self._embed_tokens(input_ids, inputs_embeds, read)

        # 2-D positions and the prefix-LM mask, once for all layers.
        position_ids, attention_mask = positions_and_mask(
            config, input_ids, attention_mask, position_ids, (batch_size, query_length), read,
            past_key_values, past_length, cache_position,
        )  # fmt: skip
        hidden_states, position_embeddings = self._embed_positions(inputs_embeds, position_ids)

        for layer, prefix_key_value in zip(self.layers, prefix_key_values or [None] * len(self.layers)):
            collected.add_hidden_state(hidden_states)
            hidden_states, weights = layer(
                hidden_states, attention_mask, position_embeddings, past_key_values, prefix_key_value,
                output_attentions=collected.attentions is not None, cache_position=cache_position,
            )  # fmt: skip
            collected.add_attentions(weights)
        hidden_states = self.final_layernorm(hidden_states)
        collected.add_hidden_state(hidden_states)

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **cache_field(past_key_values if use_cache else None),
            hidden_states=collected.hidden_states,
            attentions=collected.attentions,
        )
        return output if return_dict else output.to_tuple()

    def _prepare_cache(
        self,
        past_key_values: Cache | None,
        use_cache: bool,
        shape: tuple[int, int],
        inputs_embeds: torch.Tensor | None,
        cache_position: torch.Tensor | None,
    ) -> tuple[Cache | None, int | None, list[tuple[torch.Tensor, torch.Tensor]] | None, torch.Tensor | None]:
        """The cache this call extends (a new `DynamicCache` when `use_cache` and none was given), the number of
        tokens already in it, the P-tuning keys/values when they must ride along, and the step's slots.

        The P-tuning prefix goes first into an empty cache, once; without a cache (training) it is returned to be
        concatenated in every layer. A fixed-size cache (`cache_implementation="static"`) is read without a host
        sync: its length is None, and `cache_position` [S], which generate() passes, gives the step's slots.
        """
        batch_size, query_length = shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if is_fixed_size(past_key_values):
            check_fixed_size_cache(past_key_values, cache_position, self.config)
            return past_key_values, None, None, cache_position
        if past_key_values is not None:
            use_growing_kv_layers(past_key_values)
        cache_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        prefix_length = self.config.pre_seq_len or 0
        past_length = cache_length - prefix_length if cache_length else 0
        if past_length + query_length > self.config.max_sequence_length:
            raise ValueError(
                f"sequence length {past_length + query_length} (cached {past_length} + new {query_length}) exceeds "
                f"max_sequence_length={self.config.max_sequence_length}"
            )
        if not prefix_length or cache_length:
            return past_key_values, past_length, None, None
        dtype = inputs_embeds.dtype if inputs_embeds is not None else self.word_embeddings.weight.dtype
        prefix_key_values = self.get_prompt(batch_size, dtype)
        if past_key_values is None:
            return None, 0, prefix_key_values, None
        for layer_idx, (key, value) in enumerate(prefix_key_values):
            past_key_values.update(key, value, layer_idx)
        return past_key_values, 0, None, None

    def _embed_tokens(self, input_ids, inputs_embeds, read: bool) -> torch.Tensor:
        if read:
            check_input_values(input_ids, inputs_embeds, self.word_embeddings, "input_ids", "inputs_embeds")
        return self.word_embeddings(input_ids) if input_ids is not None else inputs_embeds

    def _embed_positions(
        self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The first layer's input and the rotary cos/sin: ChatGLM rotates queries and keys in every layer by the
        positions, GLM adds learned position and block-position embeddings to the input (in GLM's order)."""
        if self.rotary_emb is not None:
            return self.embedding_dropout(inputs_embeds), self.rotary_emb(position_ids, inputs_embeds.dtype)
        hidden_states = inputs_embeds + self.position_embeddings(position_ids[:, 0])
        hidden_states = hidden_states + self.block_position_embeddings(position_ids[:, 1])
        return self.embedding_dropout(hidden_states), None


class GLMForConditionalGeneration(GLMPreTrainedModel, GLMGenerationMixin, CompiledDecoding, GenerationMixin):
    """GLM with the LM head tied to the word embeddings; `generate()`, `chat()` and `stream_chat()`."""

    _auto_class = "AutoModelForCausalLM"  # save_pretrained copies the code files next to the weights
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}
    # glm-2b ships a classification head (dense, out_proj) next to the LM weights; the converter reports it and
    # keeps it for GLMForSequenceClassification, this class ignores it quietly.
    _can_compile_fullgraph = True  # a static cache (cache_implementation="static") and transformers' auto-compile
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
        past_key_values = take_cache(past_key_values, kwargs, fixed_size_ok=True)
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
            check_labels(labels, hidden_states.shape[:2], self.config.vocab_size, "the shape of input_ids")
            loss = causal_lm_loss(logits, labels, num_items_in_batch)  # in fp32, like THUDM

        output = CausalLMOutputWithPast(loss=loss, logits=logits, **base_outputs(outputs))
        return output if return_dict else output.to_tuple()


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
        num_choices, (input_ids, inputs_embeds, position_ids, attention_mask) = flatten_choices(
            input_ids, inputs_embeds, position_ids, attention_mask
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
        hidden_states = outputs.last_hidden_state  # [B, S, h]
        batch_size = hidden_states.shape[0]
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            pool_index = first_index(attention_mask != 0)  # left padding: the first real token
        else:
            pool_index = torch.zeros(batch_size, dtype=torch.long, device=hidden_states.device)
        pooled = hidden_states[torch.arange(batch_size, device=hidden_states.device), pool_index]  # [B, h]
        pooled = self.dropout(torch.tanh(self.dense(self.dropout(pooled))))
        logits = self.out_proj(pooled)  # [B, num_labels]
        if num_choices is not None:
            logits = logits.view(-1, num_choices)

        loss = None
        if labels is not None and num_choices is not None:  # the right choice among C
            loss = F.cross_entropy(logits.float(), labels.to(logits.device))
        elif labels is not None:
            loss = sequence_classification_loss(logits, labels.to(logits.device), self.config)
        output = SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return output if return_dict else output.to_tuple()


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
        ids, index = padded_choices(choice_ids, choice_indices, hidden_states.shape[0], hidden_states.device)
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


__all__ = [
    "GLMPreTrainedModel",
    "GLMModel",
    "GLMForConditionalGeneration",
    "GLMForSequenceClassification",
    "GLMForMultipleChoice",
]
