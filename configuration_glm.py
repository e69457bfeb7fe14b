"""Configuration of the GLM model (General Language Model with autoregressive blank infilling).

One config class serves the GLM architecture variants:

- ``variant="chatglm"``: the ChatGLM-6B architecture (THUDM/chatglm-6b): 2-D rotary embeddings, the
  ``alpha * LN(x)`` residual, layer-dependent query scaling with an fp32 softmax, tanh-GELU MLP, LM head
  tied to the word embeddings, optional P-tuning v2 prefix encoder.
- ``variant="glm"``: the GLM-10B family (glm-10b, glm-10b-chinese, glm-large-chinese, glm-2b; THUDM's GLM
  remote code, ``model_type: glm``): learned absolute and block-position embeddings
  (``max_sequence_length + 1`` rows each), pre-LN plain residual, contiguous q|k|v split, erf GELU, dropout
  after the embeddings, the attention probabilities and each block output; output tied to the word
  embeddings. ``residual_alpha`` and ``position_encoding_2d`` do not apply to it.

The field names are THUDM's ChatGLM-6B ``config.json`` names (``num_layers``, ``inner_hidden_size``,
``max_sequence_length``, ``layernorm_epsilon``, ...), so a THUDM ``config.json`` is accepted unchanged;
``attribute_map`` adds the usual Hugging Face names (``num_hidden_layers``, ``intermediate_size``, ...).
Differences from THUDM's ``ChatGLMConfig``: the defaults are the final chatglm-6b checkpoint's values
(130xxx special-token ids, ``use_cache=True``), ``smask_token_id``, ``residual_alpha`` and ``variant``
are added, ``tie_word_embeddings`` is declared explicitly, and the config validates itself. GLM's own
``GLMConfig`` fields that matter (``embedding_dropout_prob``, ``attention_dropout_prob``,
``output_dropout_prob``, plus the ``classifier_dropout`` its classification head reads) keep their names;
a GLM ``config.json`` is translated by ``scripts/convert_checkpoint.py --arch glm``.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

VARIANTS = ("chatglm", "glm")

# The classes `Auto*.from_pretrained(..., trust_remote_code=True)` resolve to. Every saved config carries
# all of them, whichever class was saved (transformers itself only writes the entry of the saved class).
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_glm.GLMConfig",
    "AutoModel": "modeling_glm.GLMModel",
    "AutoModelForCausalLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_glm.GLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_glm.GLMForSequenceClassification",
    "AutoModelForMultipleChoice": "modeling_glm.GLMForMultipleChoice",
}


class GLMConfig(PretrainedConfig):
    r"""Configuration for [`GLMModel`] and [`GLMForConditionalGeneration`].

    The defaults describe THUDM/chatglm-6b (final "slim" revision, 130528-token vocabulary).

    Args:
        vocab_size: rows of the word-embedding table (and of the tied LM head).
        hidden_size: width of the residual stream.
        num_layers: number of transformer blocks (HF name: `num_hidden_layers`).
        num_attention_heads: attention heads; `hidden_size` must divide evenly, and for 2-D rotary
            embeddings the head dimension must be a multiple of 4.
        inner_hidden_size: width of the MLP (HF name: `intermediate_size`); `None` (the default) means
            4 * hidden_size, which is THUDM's 16384 for chatglm-6b and what GLM's code hard-codes.
        max_sequence_length: longest sequence (prompt plus generated tokens) the model accepts.
        layernorm_epsilon: LayerNorm epsilon.
        position_encoding_2d: ChatGLM's 2-D rotary embedding (first half of each head rotated by the
            position ids, second half by the block position ids). Only `True` is supported.
        residual_alpha: scale of the normalised input in ChatGLM's residual `LN(x) * alpha + f(LN(x))`.
            THUDM's code uses `sqrt(2 * 28)` whatever the depth, so that is the default; a model
            trained with another depth under THUDM's code used the same value.
        variant: `"chatglm"` (ChatGLM-6B) or `"glm"` (GLM-10B family).
        bos_token_id: `<sop>`, the token that opens the span to generate; the context is everything
            before it (bidirectional attention), the span from it on is causal.
        eos_token_id: `<eop>`, the token that closes a generated span.
        mask_token_id, gmask_token_id, smask_token_id: the blank tokens `[MASK]`, `[gMASK]`, `[sMASK]`.
            Position ids of the span equal the position of the first `[gMASK]`, or, without one, of
            the first `[MASK]`/`[sMASK]`.
        pad_token_id: `<pad>`.
        pre_seq_len: length of the P-tuning v2 prefix (`None`: no prefix encoder).
        prefix_projection: P-tuning v2 with a two-layer MLP reparameterisation of the prefix.
        prefix_dropout: dropout on the prefix keys and values (THUDM: 0.1).
        quantization_bit: THUDM's int4/int8 quantisation; only 0 (not quantised) loads (convert quantised checkpoints).
        embedding_dropout_prob, attention_dropout_prob, output_dropout_prob: GLM's dropout on the summed
            embeddings, on the attention probabilities and on each attention / MLP output (GLM checkpoints
            were trained with 0.1; THUDM's ChatGLM-6B code has none, hence the default 0.0).
        classifier_dropout: dropout of [`GLMForSequenceClassification`]'s head; `None` means
            `output_dropout_prob` (as in GLM's code).
        initializer_range: standard deviation of the normal initialiser.
        use_cache: return the key/value cache from `forward`.
        tie_word_embeddings: tie the LM head to the word embeddings (ChatGLM-6B: tied).
    """

    model_type = "glm_infill"
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to config.json
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
        "layer_norm_eps": "layernorm_epsilon",
    }

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        inner_hidden_size: int | None = None,
        max_sequence_length: int = 2048,
        layernorm_epsilon: float = 1e-5,
        position_encoding_2d: bool = True,
        residual_alpha: float = math.sqrt(2 * 28),
        variant: str = "chatglm",
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        smask_token_id: int | None = 130002,
        pad_token_id: int = 3,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        prefix_dropout: float = 0.1,
        quantization_bit: int = 0,
        embedding_dropout_prob: float = 0.0,
        attention_dropout_prob: float = 0.0,
        output_dropout_prob: float = 0.0,
        classifier_dropout: float | None = None,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size if inner_hidden_size is not None else 4 * hidden_size
        self.max_sequence_length = max_sequence_length
        self.layernorm_epsilon = layernorm_epsilon
        self.position_encoding_2d = position_encoding_2d
        self.residual_alpha = residual_alpha
        self.variant = variant
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.smask_token_id = smask_token_id
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.prefix_dropout = prefix_dropout
        self.quantization_bit = quantization_bit
        self.embedding_dropout_prob = embedding_dropout_prob
        self.attention_dropout_prob = attention_dropout_prob
        self.output_dropout_prob = output_dropout_prob
        self.classifier_dropout = classifier_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        kwargs.pop("head_dim", None)  # derived below; a stale value in a config.json is ignored
        self.head_dim = hidden_size // num_attention_heads if num_attention_heads else 0
        # Every saved config names all the Auto classes; entries given (e.g. "repo--module.Class") win.
        self.auto_map = {**DEFAULT_AUTO_MAP, **(kwargs.pop("auto_map", None) or {})}
        # tie_word_embeddings and the token ids go through super(): 4.57's base __init__ resets them otherwise,
        # and 5.x no longer has them as base fields (an undeclared tie means untied there).
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id, self.eos_token_id, self.pad_token_id = bos_token_id, eos_token_id, pad_token_id
        self.check_fields()

    def check_fields(self) -> None:
        """ValueError naming the first invalid field. Run by __init__ and again by every model's __init__
        (`model_checks.CheckedLoading`), so fields set after __init__ (`from_pretrained(..., **overrides)`) are
        checked too."""
        """Raise a ValueError naming the field for any inconsistent setting."""

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GLMConfig.{name} must be a positive integer, got {value!r}")

        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_attention_heads",
            "inner_hidden_size",
            "max_sequence_length",
        ):
            positive_int(name)
        if self.variant not in VARIANTS:
            raise ValueError(f"GLMConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"GLMConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.variant == "chatglm":
            if self.position_encoding_2d is not True:
                raise ValueError(
                    "GLMConfig.position_encoding_2d must be True for variant='chatglm' (the 1-D rotary "
                    f"variant of THUDM's code is not supported), got {self.position_encoding_2d!r}"
                )
            if self.head_dim % 4 != 0:
                raise ValueError(
                    f"GLMConfig: the head dimension hidden_size / num_attention_heads = {self.head_dim} must be a "
                    "multiple of 4 for 2-D rotary embeddings (two rotated halves of even size)"
                )
        if self.quantization_bit not in (0, None):
            raise ValueError(
                f"GLMConfig.quantization_bit={self.quantization_bit!r}: THUDM's int4/int8 quantised checkpoints "
                "(QuantizedLinear with weight_scale) do not load directly: convert them with "
                "`scripts/convert_checkpoint.py --arch chatglm-6b` (README: Quantized models)."
            )
        if not (isinstance(self.residual_alpha, (int, float)) and self.residual_alpha > 0):
            raise ValueError(f"GLMConfig.residual_alpha must be a positive number, got {self.residual_alpha!r}")
        if not (isinstance(self.layernorm_epsilon, (int, float)) and self.layernorm_epsilon > 0):
            raise ValueError(f"GLMConfig.layernorm_epsilon must be a positive number, got {self.layernorm_epsilon!r}")
        if self.pre_seq_len is not None:
            positive_int("pre_seq_len")
        for name in ("prefix_dropout", "embedding_dropout_prob", "attention_dropout_prob", "output_dropout_prob"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"GLMConfig.{name} must be a number in [0, 1), got {value!r}")
        if self.classifier_dropout is not None and not (
            isinstance(self.classifier_dropout, (int, float)) and 0.0 <= self.classifier_dropout < 1.0
        ):
            raise ValueError(f"GLMConfig.classifier_dropout must be None or in [0, 1), got {self.classifier_dropout!r}")
        for name in (
            "bos_token_id",
            "eos_token_id",
            "mask_token_id",
            "gmask_token_id",
            "smask_token_id",
            "pad_token_id",
        ):
            value = getattr(self, name)
            if value is None and name in ("smask_token_id", "pad_token_id"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"GLMConfig.{name} must be a token id in [0, vocab_size={self.vocab_size}), got {value!r}"
                )
        if self.bos_token_id in self.blank_token_ids:
            raise ValueError(f"GLMConfig.bos_token_id ({self.bos_token_id}) must differ from the blank token ids")
        if self.eos_token_id == self.bos_token_id:
            raise ValueError(
                f"GLMConfig.eos_token_id ({self.eos_token_id}) must differ from bos_token_id: <eop> closes the span "
                "that <sop> opens"
            )
        if self.pad_token_id is not None and self.pad_token_id in (self.bos_token_id, *self.blank_token_ids):
            raise ValueError(
                f"GLMConfig.pad_token_id ({self.pad_token_id}) must differ from bos_token_id and the blank token ids "
                "(padding would be read as a span start or a blank)"
            )

    def to_diff_dict(self) -> dict:
        # 4.57 leaves out values equal to its base defaults (tie_word_embeddings=True); write the tie out so
        # that any reader (5.x no longer has that default) sees it.
        output = super().to_diff_dict()
        output["tie_word_embeddings"] = self.tie_word_embeddings
        return output

    @property
    def blank_token_ids(self) -> tuple[int, ...]:
        """The blank tokens, `[gMASK]` first (it wins when a prompt holds several kinds)."""
        ids = (self.gmask_token_id, self.mask_token_id, self.smask_token_id)
        return tuple(i for i in ids if i is not None)
