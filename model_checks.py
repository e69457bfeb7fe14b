"""Checks every model family of this repository (GLM, sparse GPT-2, BART-gen) runs, so that broken weights,
numerics or inputs fail loudly instead of producing fluent-looking garbage.

- At load: transformers loads a checkpoint that lacks weights of the model with only a warning, leaving those
  weights randomly initialised, and loads NaN or inf values without a word. `CheckedLoading` refuses both with a
  `ValueError` saying what is wrong (tests/test_robustness_files.py damages files to show it).
- At run time: a checkpoint whose activations exceed float16's range gives inf/NaN logits in fp16, which greedy
  search silently turns into token 0. `check_half_overflow` raises a `FloatingPointError` naming the fix
  (tests/test_robustness_numerics.py).
- On input: one set of checks for every family's `forward` and `generate` (tensor-ness, dtypes, shapes, value
  ranges, padding masks), each error naming the argument; the checks that read tensor values run only where data
  enters (`reads_values`), never on generate()'s decode steps (tests/test_robustness_inputs.py,
  tests/test_host_syncs.py).

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging

from .transformers_compat import fixed_cache_size, retie_lm_head

logger = logging.get_logger(__name__)


class CheckedLoading:
    """Mixin of the `PreTrainedModel` classes (listed before `PreTrainedModel`): the config is checked again when
    a model is built (`config.check_fields()`: `from_pretrained(..., **overrides)` sets fields after the config's
    __init__ checked them), and `from_pretrained` refuses a half-loaded or damaged checkpoint, naming the file
    (and tensor) where transformers' own error names neither. `_trained_after_loading`: name parts of weights a
    checkpoint may lack because they are meant to be trained (new heads are always allowed: only the model body is
    required)."""

    _trained_after_loading: tuple[str, ...] = ()

    def __init__(self, config, *args, **kwargs):
        check_fields = getattr(config, "check_fields", None)
        if callable(check_fields):
            check_fields()
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except Exception as err:
            problem = describe_weight_file_error(
                cls, args[0] if args else kwargs.get("pretrained_model_name_or_path"), kwargs, err
            )
            if problem is None:
                raise
            raise ValueError(problem) from err
        retie_lm_head(model)
        check_loaded_weights(model, info.get("missing_keys", []), cls._trained_after_loading)
        return (model, info) if want_info else model


def _weight_files(source, kwargs: dict) -> list[Path]:
    """The safetensors files of a local model folder (error path only; a hub repository's files are not looked up:
    this module makes no hub calls, and transformers' own error stands there)."""
    if source is None:
        return []
    folder = Path(str(source)) / (kwargs.get("subfolder") or "")
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else []


def describe_weight_file_error(cls, source, kwargs: dict, err: Exception) -> str | None:
    """What is wrong with the weight files behind a failed `from_pretrained`, naming the file and the tensor (None:
    not a weight-file problem; transformers' error stands). A file safetensors cannot read (truncated, empty, a
    corrupted header) and a tensor whose shape differs from the model's are described here: transformers' own
    errors name neither (4.57: "size mismatch for weight" of some Linear; safetensors: "header too small")."""
    if "mismatch" not in str(err) and type(err).__name__ != "SafetensorError":
        return None
    from safetensors import safe_open

    shapes: dict[str, tuple[Path, list[int]]] = {}
    for file in _weight_files(source, kwargs):
        try:
            with safe_open(str(file), framework="pt") as reader:
                for key in reader.keys():
                    shapes[key] = (file, list(reader.get_slice(key).get_shape()))
        except Exception as bad:
            size = file.stat().st_size
            return (
                f"the weight file {file} cannot be read ({size} bytes: {bad}); it is truncated or damaged "
                "(re-download or re-convert it)"
            )
    if "mismatch" not in str(err) or not shapes:
        return None
    try:
        config = kwargs.get("config")
        if not isinstance(config, cls.config_class):
            config = cls.config_class.from_pretrained(source, subfolder=kwargs.get("subfolder") or "")
            for key, value in kwargs.items():
                if hasattr(config, key):
                    setattr(config, key, value)
        with torch.device("meta"):
            expected = {key: list(value.shape) for key, value in cls(config).state_dict().items()}
    except Exception:
        return None
    prefix = f"{cls.base_model_prefix}."
    for key, (file, shape) in shapes.items():
        own = key if key in expected else prefix + key if prefix + key in expected else key.removeprefix(prefix)
        if own in expected and expected[own] != shape:
            return (
                f"the weight file {file} holds {key} of shape {shape}, but the model (config.json's sizes) expects "
                f"{expected[own]}: the checkpoint is of another size or architecture, or config.json is wrong"
            )
    return None


def check_loaded_weights(model: nn.Module, missing_keys, trained_after_loading: tuple[str, ...] = ()) -> None:
    """Raise if weights of the model body are missing from the checkpoint (they would run randomly initialised) or
    if a parameter or a stored buffer (BART's `final_logits_bias`) holds NaN / inf (a corrupted file)."""
    prefix = model.base_model_prefix
    has_body = hasattr(model, prefix)  # a head model: its body lives under `prefix.`
    body = sorted(
        key
        for key in missing_keys
        if (not has_body or key.startswith(f"{prefix}.")) and not any(part in key for part in trained_after_loading)
    )
    if body:
        shown = ", ".join(body[:5]) + (f" (+{len(body) - 5} more)" if len(body) > 5 else "")
        raise ValueError(
            f"the checkpoint lacks {len(body)} weight(s) of the model body: {shown}. It is incomplete or of another "
            "architecture (check config.json's sizes and architecture); refusing to run with randomly initialised weights."
        )
    damaged = []
    stored = model.state_dict(keep_vars=True).keys()  # parameters and persistent buffers: what the file held
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in stored)]
    for name, param in tensors:
        if not param.is_floating_point() or param.device.type == "meta":
            continue
        if type(param.detach()) is not torch.Tensor:  # a quantized tensor subclass (torchao): stored as integers
            continue
        total = param.detach().sum(dtype=torch.float32 if param.element_size() < 4 else None)  # no large temporary
        if not bool(torch.isfinite(total)) and not bool(torch.isfinite(param).all()):
            damaged.append(name)
    if damaged:
        raise ValueError(
            f"the checkpoint holds NaN or inf values in {', '.join(damaged[:5])}: the weight file is damaged "
            "(re-download or re-convert it)"
        )


def check_half_overflow(logits: torch.Tensor) -> None:
    """Raise a clear error for fp16 logits holding inf/NaN. One device sync: callers check once per prompt (the
    prefill, or an encoder-decoder's first step), not per decoded token."""
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            "float16 overflow: the logits hold inf/NaN, so this checkpoint cannot run in float16 on this input. "
            "Load it with dtype=torch.bfloat16 (float32's range, same memory) or torch.float32."
        )


# ---------------------------------------------------------------------------------------------------------------
# Input checks: run once where the data enters (the prompt, a training batch), not on generate()'s decode steps
# ---------------------------------------------------------------------------------------------------------------
# The dtypes torch's nn.Embedding accepts as indices; anything else is refused by name here.
INDEX_DTYPES = (torch.int64, torch.int32)


def reads_values(past_length: int | None, query_length: int) -> bool:
    """Whether the data-dependent checks (value ranges, NaN, 0/1 masks) run on this call.

    Each of them reads a tensor's value on the host: one device synchronisation, which on a GPU stalls the queue
    of kernels. They run where data enters a model: a prompt, a training batch, anything written into an empty
    cache. They are skipped on a decode step, one new token per row continuing a filled cache (generate() feeds
    the ids it sampled itself), and under torch.compile (a data-dependent branch would break the graph). Static
    checks (types, dtypes, shapes) cost nothing and always run. tests/test_host_syncs.py counts the reads.
    `past_length` None: a fixed-size cache, whose fill is not known on the host; one new token is a decode step."""
    decoding = query_length == 1 and (past_length is None or past_length > 0)
    return not torch.compiler.is_compiling() and not decoding


def check_shift_ids(pad_token_id: int | None, decoder_start_token_id: int | None) -> None:
    """ValueError unless the ids that build decoder inputs from labels (BART's shift right) are set."""
    if decoder_start_token_id is None:
        raise ValueError(
            "config.decoder_start_token_id is None: it is needed to build decoder_input_ids from labels "
            "(set it in config.json, BART uses the eos id 2) or pass decoder_input_ids yourself"
        )
    if pad_token_id is None:
        raise ValueError(
            "config.pad_token_id is None: it is needed to replace -100 in labels when building decoder_input_ids "
            "(set it in config.json, BART uses 1) or pass decoder_input_ids yourself"
        )


def check_static_cache(cache, cache_position, max_positions: int, limit_name: str) -> None:
    """A fixed-size cache (`StaticCache`, `cache_implementation="static"`) a model can fill: the step's slots given
    as `cache_position` [seq] (generate() passes them), and no more slots than the model has positions."""
    name = type(cache).__name__
    if not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1:
        raise ValueError(f"a {name} needs cache_position, the [seq] slots this step writes (generate() passes it)")
    if fixed_cache_size(cache) > max_positions:
        raise ValueError(f"a {name} of {fixed_cache_size(cache)} slots exceeds {limit_name}={max_positions}")


def _kind(value) -> str:
    return f"dtype {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__


def check_tensor(value, name: str, expected: str) -> None:
    """TypeError naming `name` unless `value` is a torch.Tensor (a list or a numpy array is refused here, not deep
    inside torch with "'list' object has no attribute 'dim'")."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor ({expected}), got {type(value).__name__}")


def check_token_ids(ids, name: str) -> None:
    """TypeError / ValueError naming `name` unless `ids` is a non-empty int64/int32 tensor [batch, seq] (static)."""
    check_tensor(ids, name, "integer token ids [batch, seq]")
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor of token ids [batch, seq] (torch.long or torch.int32), got "
            f"dtype {ids.dtype}"
        )
    if ids.dim() != 2:
        raise ValueError(
            f"{name} must have a non-empty shape [batch, seq], got {list(ids.shape)} (add a batch dimension?)"
        )
    if ids.numel() == 0:
        raise ValueError(
            f"{name} must have a non-empty shape [batch, seq], got {list(ids.shape)} ({name} is empty: every batch "
            "needs at least one row and token)"
        )


def check_prompt_ids(ids, name: str, vocab_size: int) -> None:
    """`check_token_ids`, then `check_token_range` (skipped under torch.compile): token ids that enter a model once
    per call of generate() or per batch (a prompt, a source), where one device sync costs nothing per token."""
    check_token_ids(ids, name)
    if not torch.compiler.is_compiling():
        check_token_range(ids, name, vocab_size)


def check_token_range(ids: torch.Tensor, name: str, vocab_size: int) -> None:
    """ValueError naming `name` and the first id outside [0, vocab_size) (one device sync)."""
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= vocab_size:
        row, col = torch.nonzero((ids < 0) | (ids >= vocab_size))[0].tolist()  # error path only
        raise ValueError(
            f"{name}[{row}, {col}] = {int(ids[row, col])} is outside the vocabulary [0, vocab_size={vocab_size}); "
            "is the tokenizer the one of this checkpoint?"
        )


def check_embeds(embeds, name: str, width: int, dtype: torch.dtype, width_name: str = "hidden_size") -> None:
    """TypeError / ValueError naming `name` unless `embeds` is a non-empty [batch, seq, width] tensor of the
    model's floating dtype `dtype` (static)."""
    check_tensor(embeds, name, f"embeddings [batch, seq, {width_name}]")
    if not embeds.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [batch, seq, {width_name}], got dtype {embeds.dtype}")
    if embeds.dim() != 3 or embeds.shape[-1] != width or embeds.numel() == 0:
        raise ValueError(
            f"{name} must have a non-empty shape [batch, seq, {width_name}={width}], got {list(embeds.shape)}"
        )
    if embeds.dtype != dtype:
        raise TypeError(f"{name} has dtype {embeds.dtype} but the model runs in {dtype}: convert with .to({dtype})")


def check_encoder_states(states, batch_size: int, d_model: int, dtype: torch.dtype) -> None:
    """TypeError / ValueError naming `encoder_outputs` unless an encoder-decoder's encoder output (the hidden states
    its decoder attends to) is a [batch_size, source length, d_model] tensor of the model's dtype (static)."""
    check_tensor(states, "encoder_outputs", f"[batch, source length, d_model={d_model}]")
    if states.dim() != 3 or states.shape[0] != batch_size or states.shape[-1] != d_model:
        raise ValueError(
            f"encoder_outputs must be [batch={batch_size}, source length, d_model={d_model}], got {list(states.shape)}"
        )
    if states.dtype != dtype:
        raise TypeError(f"encoder_outputs has dtype {states.dtype}, the model runs in {dtype}")


def check_max_positions(length: int, max_positions: int, name: str) -> None:
    """ValueError naming `name` when it needs more positions than a learned position table has rows (static)."""
    if length > max_positions:
        raise ValueError(
            f"{name} needs {length} positions but config.max_position_embeddings is {max_positions}: "
            f"truncate the input to at most {max_positions} tokens"
        )


def check_finite(values: torch.Tensor, name: str) -> None:
    """ValueError naming `name` if it holds NaN or inf (one device sync)."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} holds NaN or inf values")


def check_inputs(
    input_ids,
    inputs_embeds,
    embeddings: nn.Embedding,
    ids_name: str = "input_ids",
    embeds_name: str = "inputs_embeds",
    width_name: str = "hidden_size",
) -> tuple[int, int]:
    """Static checks of a model's input, exactly one of token ids and embeddings (matching the `embeddings` table's
    width and dtype): its batch size and length. `check_input_values` reads the values."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {ids_name} and {embeds_name}")
    if input_ids is not None:
        check_token_ids(input_ids, ids_name)
        return tuple(input_ids.shape)
    check_embeds(inputs_embeds, embeds_name, embeddings.embedding_dim, embeddings.weight.dtype, width_name)
    return tuple(inputs_embeds.shape[:2])


def check_input_values(input_ids, inputs_embeds, embeddings: nn.Embedding, ids_name: str, embeds_name: str) -> None:
    """The data-dependent half of `check_inputs`: ids inside the table, embeddings finite (one device sync)."""
    if input_ids is not None:
        check_token_range(input_ids, ids_name, embeddings.num_embeddings)
    else:
        check_finite(inputs_embeds, embeds_name)


def check_labels(
    labels, shape: tuple[int, ...] | None, vocab_size: int, expected: str = "", read_values: bool = True
) -> None:
    """TypeError / ValueError naming `labels` unless they are int64/int32 ids of `shape` (when given; `expected`
    says which shape in words) in [0, vocab_size) or -100 (ignored; the range check, one device sync, only when
    `read_values` and not under torch.compile)."""
    check_tensor(labels, "labels", "integer token ids, -100 = ignored")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be an integer tensor of token ids (-100 = ignored), got dtype {labels.dtype}")
    if shape is not None and tuple(labels.shape) != tuple(shape):
        raise ValueError(f"labels must have {expected} {list(shape)}, got {list(labels.shape)}")
    if read_values and not torch.compiler.is_compiling():
        bad = ((labels < 0) | (labels >= vocab_size)) & (labels != -100)
        if bool(bad.any()):
            raise ValueError(
                f"labels hold {int(labels[bad][0])}, outside the vocabulary [0, vocab_size={vocab_size}) and not -100"
            )


def padding_mask(
    mask, name: str, shape: tuple[int, int], read_values: bool = True, empty_rows_ok: bool = False
) -> torch.Tensor | None:
    """A 2-D 0/1 padding mask [batch, key_length] (1 = real token) as bool, or None when it masks nothing.

    TypeError / ValueError naming `name` for another type or shape, values other than 0/1, or (unless
    `empty_rows_ok`) a row of padding only. Without `read_values` (a decode step) the mask is used as given."""
    check_tensor(mask, name, "a 0/1 padding mask [batch, length]")
    if mask.is_floating_point() and mask.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must hold 0/1 values, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(
            f"{name} must have shape [batch, length] = {list(shape)} (a 2-D 0/1 padding mask, cached positions "
            f"included), got {list(mask.shape)}"
        )
    if not read_values:
        return mask.bool()
    is_pad = mask == 0
    flags = torch.stack((((mask != 0) & (mask != 1)).any(), is_pad.any(), is_pad.all(-1).any()))
    not_binary, has_padding, empty_row = flags.tolist()  # one device sync for all three
    if not_binary:
        raise ValueError(f"{name} must hold 0/1 (1 = real token, 0 = padding), got other values")
    if empty_row and not empty_rows_ok:
        raise ValueError(f"{name} has a row of padding only: every row needs at least one real token")
    return mask.bool() if has_padding else None


def check_prefix_length(value, name: str, batch_size: int, read_values: bool = True) -> torch.Tensor:
    """A prefix length (GLM's / CogView's `sep`: an int, or an integer tensor of 1 or `batch_size` values) as a
    LongTensor [1 or batch]. A negative length is refused (when `read_values`), not read as 0."""
    if isinstance(value, bool) or not isinstance(value, (int, torch.Tensor)):
        raise TypeError(f"{name} must be an int or an integer tensor [batch] of prefix lengths, got {_kind(value)}")
    lengths = torch.as_tensor(value)
    if lengths.dtype not in INDEX_DTYPES + (torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must be an int or an integer tensor [batch] of prefix lengths, got {_kind(value)}")
    lengths = lengths.long().reshape(-1)
    if lengths.numel() not in (1, batch_size):
        raise ValueError(
            f"{name} is a prefix length per row: expected 1 or batch = {batch_size} values, got {lengths.numel()}"
        )
    if read_values and not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be one prefix length >= 0, or one per row (batch={batch_size}), got {value!r}")
    return lengths


def check_mode_flag(value, name: str, meanings: dict[int, str], default: int) -> int:
    """An int flag (e.g. sparse GPT-2's `is_sparse`; `meanings`: value -> what it means) given as an int or a
    one-element integer tensor; `default` when None."""
    if value is None:
        return default
    allowed = " or ".join(f"{flag} ({meaning})" for flag, meaning in meanings.items())
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.dtype == torch.bool:
            raise TypeError(f"{name} must be an int, {allowed}; got a tensor of shape {list(value.shape)}")
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, {allowed}; got {value!r}")
    if value not in meanings:
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


def refuse_right_padding(attention_mask) -> None:
    """generate()'s prompt must be left-padded: with 0 in the last column, the first new token of that row would be
    predicted from a padding position (a silently wrong continuation). One device sync, once per generate()."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 and not bool(attention_mask[:, -1].all()):
        raise ValueError(
            "the batch is right-padded (attention_mask has 0 in the last column); generation needs left "
            "padding: set tokenizer.padding_side = 'left'"
        )


def check_positions(position_ids, name: str, shape: tuple[int, int], size: int, read_values: bool) -> None:
    """TypeError / ValueError naming `name` unless it is an integer tensor [batch or 1, seq] (`shape` = (batch,
    seq)) whose values index a table of `size` rows (the range check only when `read_values`)."""
    check_tensor(position_ids, name, "integer positions [batch, seq]")
    if position_ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {position_ids.dtype}")
    batch, length = shape
    if position_ids.dim() != 2 or position_ids.shape[0] not in (1, batch) or position_ids.shape[1] != length:
        raise ValueError(f"{name} must have shape [batch, seq] = [{batch}, {length}], got {list(position_ids.shape)}")
    if read_values:
        low, high = torch.stack(torch.aminmax(position_ids)).tolist()  # one device sync
        if low < 0 or high >= size:
            raise ValueError(f"{name} must lie in [0, max_position_embeddings={size}), got values in [{low}, {high}]")


def check_generate_inputs(
    inputs, kwargs: dict, vocab_size: int, ids_name: str = "input_ids", left_padding: bool = True
) -> None:
    """The prompt of generate(), checked once before decoding: token ids (type, dtype, shape, range), an
    attention_mask of their shape (left-padded when `left_padding`), and not both ids and `inputs_embeds`."""
    ids = inputs if inputs is not None else kwargs.get("input_ids")
    if ids is not None and kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "pass input_ids or inputs_embeds to generate(), not both: the embeddings would be silently ignored"
        )
    if ids is not None:
        check_prompt_ids(ids, ids_name, vocab_size)
    mask = kwargs.get("attention_mask")
    if mask is None:
        return
    check_tensor(mask, "attention_mask", "a 0/1 padding mask [batch, length]")
    if ids is not None and mask.dim() == 2 and mask.shape != ids.shape:
        raise ValueError(
            f"attention_mask has shape {list(mask.shape)}, but input_ids has shape {list(ids.shape)}: "
            "attention_mask must have shape [batch, length] of input_ids"
        )
    if left_padding:
        refuse_right_padding(mask)


def resolve_use_cache(model, use_cache: bool | None) -> bool:
    """`use_cache`, or `model.config.use_cache` when None; off with gradient checkpointing in training, with a
    warning when it was asked for explicitly."""
    requested = use_cache
    use_cache = use_cache if use_cache is not None else model.config.use_cache
    if model.gradient_checkpointing and model.training and use_cache:
        if requested:
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing; using use_cache=False.")
        use_cache = False
    return use_cache
