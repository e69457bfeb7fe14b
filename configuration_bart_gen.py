"""Configuration of BART-gen: BART for conditional generation as remote code (`model_type="bart_gen"`).

Follows `transformers.models.bart.configuration_bart.BartConfig` field for field, so a transformers BART
`config.json` loads into it unchanged. It differs in three ways, all for surviving transformers upgrades:
- a unique `model_type` ("bart_gen"), so a checkpoint never silently falls back to the native class;
- `tie_word_embeddings=True` is declared explicitly (transformers 5.x no longer has a base default, and a
  config that relies on it loads with an untied, randomly initialised LM head);
- generation parameters (`forced_bos_token_id`, `forced_eos_token_id`, `num_beams`, ...) are never config
  attributes (5.x refuses to save them): they live in `generation_config.json`. Passing them here logs a
  warning and drops them; `scripts/convert_checkpoint.py --arch bart` moves them for you;
- `custom_pipelines` names the repository's text2text-generation pipeline (5.x removed the native task).
"""

from __future__ import annotations

import copy

from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Keys that belong to `GenerationConfig`, never to the model config (the union of what transformers 4.57
# and 5.x treat as generation parameters, minus `use_cache`, which is also a model field).
GENERATION_PARAMETERS = (
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "repetition_penalty",
    "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind",
)  # fmt: skip

# GenerationConfig's defaults: 4.57's config base class sets these as attributes on every config, so
# a config dict written by 4.57's `to_dict()` carries them; they are dropped without a warning.
_GENERATION_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "early_stopping": False, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "typical_p": 1.0,
    "repetition_penalty": 1.0, "length_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
    "num_return_sequences": 1, "output_scores": False, "return_dict_in_generate": False,
    "remove_invalid_values": False,
}  # fmt: skip

# Written into every saved config.json, so that AutoModel and AutoModelForSeq2SeqLM both resolve
# whichever of the two classes was saved.
DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_bart_gen.BartGenConfig",
    "AutoModel": "modeling_bart_gen.BartGenModel",
    "AutoModelForSeq2SeqLM": "modeling_bart_gen.BartGenForConditionalGeneration",
}

# `pipeline()` reads this before its own task table (4.57 and 5.x alike), so "text2text-generation", which 5.x
# removed, resolves to the repository's pipeline class on both versions (defined in pipeline_bart_gen.py,
# exported by modeling_bart_gen.py, whose import makes the remote-code loader copy it).
DEFAULT_CUSTOM_PIPELINES = {
    "text2text-generation": {
        "impl": "modeling_bart_gen.BartGenText2TextPipeline",
        "pt": ["AutoModelForSeq2SeqLM"],
        "type": "text",
    }
}


def _validate_options(fields: dict) -> None:
    """ValueError naming the field for dropout probabilities outside [0, 1), an unknown activation function, or a
    special-token id outside the vocabulary."""
    for name in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop"):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    if fields["activation_function"] not in ACT2FN:
        raise ValueError(f"activation_function={fields['activation_function']!r} is not one of transformers' ACT2FN")
    vocab_size = fields["vocab_size"]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        ids = fields[name] if isinstance(fields[name], (list, tuple)) else [fields[name]]
        for value in ids:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size
            ):
                raise ValueError(f"{name}={fields[name]!r} must be None or a token id in [0, vocab_size={vocab_size})")


class BartGenConfig(PretrainedConfig):
    """Sizes and options of a BART encoder-decoder (defaults: facebook/bart-large)."""

    model_type = "bart_gen"
    _auto_class = "AutoConfig"  # save_pretrained copies this file next to config.json
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "num_attention_heads": "encoder_attention_heads",
        "hidden_size": "d_model",
        "num_hidden_layers": "encoder_layers",
    }

    def __init__(
        self,
        vocab_size: int = 50265,
        max_position_embeddings: int = 1024,  # longest encoder input / decoder sequence (BART adds 2 table rows)
        encoder_layers: int = 12,
        encoder_ffn_dim: int = 4096,
        encoder_attention_heads: int = 16,
        decoder_layers: int = 12,
        decoder_ffn_dim: int = 4096,
        decoder_attention_heads: int = 16,
        encoder_layerdrop: float = 0.0,  # probability of skipping a whole layer in training (LayerDrop)
        decoder_layerdrop: float = 0.0,
        activation_function: str = "gelu",
        d_model: int = 1024,
        dropout: float = 0.1,  # on embeddings, attention outputs and FFN outputs
        attention_dropout: float = 0.0,  # on attention probabilities
        activation_dropout: float = 0.0,  # inside the FFN, after the activation
        init_std: float = 0.02,
        classifier_dropout: float = 0.0,  # unused by the generation model; kept so BART configs round-trip
        scale_embedding: bool = False,  # True: token embeddings are multiplied by sqrt(d_model)
        use_cache: bool = True,
        num_labels: int = 3,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 2,
        is_encoder_decoder: bool = True,
        decoder_start_token_id: int | None = 2,  # first decoder input; also used to shift labels right
        tie_word_embeddings: bool = True,  # LM head shares the `shared` token embedding (the seed's bug if not)
        **kwargs,
    ):

        # Old BART configs carry generation defaults; they belong to generation_config.json.
        moved = {key: kwargs.pop(key) for key in GENERATION_PARAMETERS if key in kwargs}
        if kwargs.pop("force_bos_token_to_be_generated", None):
            moved["forced_bos_token_id"] = moved.get("forced_bos_token_id", bos_token_id)
        moved = {
            key: value for key, value in moved.items() if value is not None and _GENERATION_DEFAULTS.get(key) != value
        }
        if moved:
            logger.warning(
                f"BartGenConfig ignores the generation parameters {sorted(moved)}: put them in "
                "generation_config.json (`scripts/convert_checkpoint.py --arch bart` moves them there)."
            )
        kwargs.setdefault("auto_map", dict(DEFAULT_AUTO_MAP))
        kwargs.setdefault("custom_pipelines", copy.deepcopy(DEFAULT_CUSTOM_PIPELINES))

        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.encoder_ffn_dim = encoder_ffn_dim
        self.encoder_layers = encoder_layers
        self.encoder_attention_heads = encoder_attention_heads
        self.decoder_ffn_dim = decoder_ffn_dim
        self.decoder_layers = decoder_layers
        self.decoder_attention_heads = decoder_attention_heads
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.activation_function = activation_function
        self.init_std = init_std
        self.encoder_layerdrop = encoder_layerdrop
        self.decoder_layerdrop = decoder_layerdrop
        self.classifier_dropout = classifier_dropout
        self.use_cache = use_cache
        self.scale_embedding = scale_embedding
        # Token ids and tying go through super() (4.57's base __init__ resets them otherwise) and are set
        # again after it (5.x's base no longer declares them, so they must exist on this class).
        super().__init__(
            num_labels=num_labels,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            is_encoder_decoder=is_encoder_decoder,
            decoder_start_token_id=decoder_start_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.decoder_start_token_id = decoder_start_token_id
        self.is_encoder_decoder = is_encoder_decoder
        self.tie_word_embeddings = tie_word_embeddings
        self.check_fields()

    def check_fields(self) -> None:
        """ValueError naming the first invalid field. Run by __init__ and again by every model's __init__
        (`model_checks.CheckedLoading`), so fields set after __init__ (`from_pretrained(..., **overrides)`) are
        checked too."""
        sizes = (
            "vocab_size",
            "max_position_embeddings",
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
        )
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_model % self.encoder_attention_heads != 0 or self.d_model % self.decoder_attention_heads != 0:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by encoder_attention_heads "
                f"({self.encoder_attention_heads}) and decoder_attention_heads ({self.decoder_attention_heads})"
            )
        names = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "decoder_layerdrop")
        names += ("activation_function", "vocab_size", "pad_token_id", "bos_token_id", "eos_token_id")
        _validate_options({name: getattr(self, name) for name in names + ("decoder_start_token_id",)})

    def to_diff_dict(self) -> dict:
        # 4.57 leaves out values equal to the defaults; this one must be in config.json whatever reads it
        # (a config without it loads untied in transformers 5.x when read by a class without this default).
        config_dict = super().to_diff_dict()
        config_dict["tie_word_embeddings"] = self.tie_word_embeddings
        return config_dict


__all__ = ["BartGenConfig", "GENERATION_PARAMETERS"]
