"""Configuration of the sparse GPT-2 (CogView transformer) model.

Follows the argument names of THUDM CogView's `arguments.py` / `GPT2ParallelTransformer` (query_window,
key_window_times, num_pivot, max_memory_length, layernorm_epsilon, ...) so that a config converted from a
CogView checkpoint carries the same fields as the original run. Differences from CogView: sandwich LayerNorm
and PB-relax are switchable (CogView always has both on; a converted transformers GPT-2 has both off), the
default attention mode (`is_sparse`) is stored in the config, and the settings are validated up front.
"""

from __future__ import annotations

from transformers import PretrainedConfig

DEFAULT_AUTO_MAP = {
    "AutoConfig": "configuration_gpt2_sparse.GPT2SparseConfig",
    "AutoModel": "modeling_gpt2_sparse.GPT2SparseModel",
    "AutoModelForCausalLM": "modeling_gpt2_sparse.GPT2SparseLMHeadModel",
}


class GPT2SparseConfig(PretrainedConfig):
    r"""Configuration for [`GPT2SparseModel`] and [`GPT2SparseLMHeadModel`].

    Args:
        vocab_size: number of tokens; ids below `num_image_tokens` are image tokens, the rest text.
        hidden_size: width of the residual stream.
        num_layers: number of transformer blocks (`num_hidden_layers` is an alias).
        num_attention_heads: attention heads; must divide `hidden_size`.
        intermediate_size: MLP width, `4 * hidden_size` when None (CogView and GPT-2 default).
        max_position_embeddings: rows of the learned position table (CogView: 1089).
        layernorm_epsilon: LayerNorm eps.
        hidden_dropout: dropout on the embeddings and on the attention / MLP outputs (CogView uses one value for
            both, as does this model).
        attention_dropout: dropout on the attention probabilities.
        init_method_std: std of the normal init; the attention and MLP output projections use
            `init_method_std / sqrt(2 * num_layers)` when `use_scaled_init_for_output_weights` is set.
        sandwich_ln: CogView's `third_layernorm` / `fourth_layernorm` on the attention and MLP outputs.
        pb_relax: PB-relax LayerNorm, `LN(x / (max|x| / 8))` with the max taken over the whole input tensor.
        is_sparse: default attention mode (0 dense causal, 1 sparse training, 2 sparse inference); a forward call
            can override it.
        query_window: block size `w` of sparse attention.
        key_window_times: `t`, the window spans the query's block and the `t - 1` blocks before it (mode 1) or the
            last `t * w` keys (mode 2).
        num_pivot: `P`, pivot keys per row in sparse training (every text token plus sampled image tokens).
        num_image_tokens: ids below this are image tokens (CogView: 8192).
        max_memory_length: Transformer-XL memory kept between calls (0 disables memory).
    """

    model_type = "gpt2_sparse"
    keys_to_ignore_at_inference = ["past_key_values", "mems"]
    attribute_map = {
        "num_hidden_layers": "num_layers",
        "initializer_range": "init_method_std",
        "layer_norm_eps": "layernorm_epsilon",
        "n_positions": "max_position_embeddings",
    }

    def __init__(
        self,
        vocab_size: int = 58240,
        hidden_size: int = 1024,
        num_layers: int = 24,
        num_attention_heads: int = 16,
        intermediate_size: int | None = None,
        max_position_embeddings: int = 1089,
        layernorm_epsilon: float = 1e-5,
        hidden_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        init_method_std: float = 0.02,
        use_scaled_init_for_output_weights: bool = True,
        sandwich_ln: bool = True,
        pb_relax: bool = True,
        is_sparse: int = 0,
        query_window: int = 64,
        key_window_times: int = 4,
        num_pivot: int = 256,
        num_image_tokens: int = 8192,
        max_memory_length: int = 0,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size if intermediate_size is not None else 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layernorm_epsilon = layernorm_epsilon
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.init_method_std = init_method_std
        self.use_scaled_init_for_output_weights = use_scaled_init_for_output_weights
        self.sandwich_ln = sandwich_ln
        self.pb_relax = pb_relax
        self.is_sparse = is_sparse
        self.query_window = query_window
        self.key_window_times = key_window_times
        self.num_pivot = num_pivot
        self.num_image_tokens = num_image_tokens
        self.max_memory_length = max_memory_length
        self.use_cache = use_cache
        self.check_fields()
        # Every saved config names all the Auto classes, whichever class was saved (transformers itself
        # writes only the saved class's entry), so `AutoModel*.from_pretrained(dir, trust_remote_code=True)`
        # works on any folder this code writes.
        kwargs["auto_map"] = {**DEFAULT_AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def check_fields(self) -> None:
        """ValueError naming the first invalid field. Run by __init__ and again by every model's __init__
        (`model_checks.CheckedLoading`), so fields set after __init__ (`from_pretrained(..., **overrides)`) are
        checked too."""
        positive = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "query_window": self.query_window,
            "key_window_times": self.key_window_times,
            "num_pivot": self.num_pivot,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2SparseConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"GPT2SparseConfig.hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.is_sparse not in (0, 1, 2):
            raise ValueError(
                f"GPT2SparseConfig.is_sparse must be 0 (dense), 1 (sparse training) or 2 (sparse inference), "
                f"got {self.is_sparse!r}"
            )
        if not isinstance(self.num_image_tokens, int) or not 0 <= self.num_image_tokens <= self.vocab_size:
            raise ValueError(
                f"GPT2SparseConfig.num_image_tokens must be an integer in [0, vocab_size={self.vocab_size}], "
                f"got {self.num_image_tokens!r}"
            )
        if not isinstance(self.max_memory_length, int) or self.max_memory_length < 0:
            raise ValueError(
                f"GPT2SparseConfig.max_memory_length must be a non-negative integer, got {self.max_memory_length!r}"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"GPT2SparseConfig.{name} must be in [0, 1), got {value!r}")
        if isinstance(self.layernorm_epsilon, bool) or not (
            isinstance(self.layernorm_epsilon, (int, float)) and self.layernorm_epsilon > 0
        ):
            raise ValueError(
                f"GPT2SparseConfig.layernorm_epsilon must be a positive number, got {self.layernorm_epsilon!r}"
            )
        if self.is_sparse == 1 and (
            self.max_position_embeddings < self.key_window_times * self.query_window
            or self.num_pivot > self.max_position_embeddings
        ):
            raise ValueError(
                "GPT2SparseConfig.is_sparse=1 (sparse training by default) needs max_position_embeddings "
                f"({self.max_position_embeddings}) >= key_window_times * query_window "
                f"({self.key_window_times} * {self.query_window}) and >= num_pivot ({self.num_pivot})"
            )

    def validate_sparse_training_length(self, seq_len: int, name: str = "sequence length") -> None:
        """Raise a ValueError unless a sequence of `seq_len` tokens can run sparse training (is_sparse=1)."""
        w, t = self.query_window, self.key_window_times
        if seq_len % w != 0:
            raise ValueError(
                f"is_sparse=1 (sparse training) needs the {name} ({seq_len}) to be a multiple of query_window "
                f"({w}); pad the batch or change query_window"
            )
        if seq_len < t * w:
            raise ValueError(
                f"is_sparse=1 (sparse training) needs the {name} ({seq_len}) to be at least key_window_times * "
                f"query_window ({t} * {w} = {t * w}); use is_sparse=0 for shorter sequences"
            )
