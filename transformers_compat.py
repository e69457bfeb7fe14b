"""Where transformers' calling conventions enter the models of this repository, in one place.

The original GLM, ChatGLM-6B and CogView code died of transformers upgrades: a renamed argument, a moved helper, a
changed default, each silently absorbed by a `**kwargs`. Every convention that differs between the transformers
releases this repository supports (4.57 to the newest 5.x) is handled here, so the next rename is a one-line change
and the model files read like plain models:

- the KV cache's name: `past_key_values` up to 5.23, `cache` from 5.24 on (generate() passes it to `forward()` and
  reads it back from the output under that name). `take_cache` accepts both; `cache_field` and `output_cache` use
  the running transformers' name (`CACHE_NAME`), so no deprecation warning is logged;
- arguments a model does not know: `check_unused_kwargs` refuses any that carries state (a tensor, a cache) and
  warns once about the rest, so that a future rename fails loudly instead of decoding without history;
- generate()'s cache: `generation_cache` refuses a generation step that arrives without one (`use_cache=True`),
  which is how a rename on generate()'s side would otherwise show: wrong tokens, no error;
- the outputs a caller asks for (`LayerOutputs`): transformers' own models collect per-layer hidden states and
  attention weights with hooks installed by decorators that change between releases (`check_model_inputs` in 4.57,
  `capture_outputs` in 5.x); the layer loops here collect them themselves. A head passes its base model's outputs
  on with `base_outputs` (the cache under its current name);
  an encoder-decoder takes a precomputed encoder output as a `BaseModelOutput` or a tuple (`as_encoder_output`);
- the attention-function registry (`registered_attention`): indexed in 4.x, `get_interface` in 5.x;
- Trainer's loss convention (`causal_lm_loss`): a model whose `forward` takes `**kwargs` is handed
  `num_items_in_batch` and must divide by it, or gradient accumulation scales the gradients;
- weight tying after loading (`retie_lm_head`): transformers 5.0.0 leaves the head untied when a checkpoint stores
  both the embeddings and an identical `lm_head.weight` (THUDM's ChatGLM-6B files do).
A transformers older than `MIN_TRANSFORMERS` is refused at import, naming the floor.

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
import transformers
from packaging.version import Version
from torch import nn
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

MIN_TRANSFORMERS = "4.57"  # the oldest release the test matrix covers (scripts/test.sh)
NEXT_MAJOR = "6"  # the first release outside the tested range
TRANSFORMERS_VERSION = transformers.__version__

if Version(TRANSFORMERS_VERSION) < Version(MIN_TRANSFORMERS):
    raise ImportError(
        f"this model's code needs transformers>={MIN_TRANSFORMERS},<{NEXT_MAJOR}; found {TRANSFORMERS_VERSION}. "
        f'Upgrade with: pip install "transformers>={MIN_TRANSFORMERS},<{NEXT_MAJOR}"'
    )


class TransformersCompatibilityError(RuntimeError):
    """transformers called a model in a way this code does not know (a renamed or missing argument)."""


# ---------------------------------------------------------------------------------------------------------------
# The KV cache's name
# ---------------------------------------------------------------------------------------------------------------
CACHE_NAMES = ("past_key_values", "cache")  # every name the cache has had, oldest first
# The running transformers' name: generate() passes the cache to forward() and reads it from the output under it.
CACHE_NAME = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def take_cache(past_key_values: Cache | None, kwargs: dict, fixed_size_ok: bool = False) -> Cache | None:
    """The cache a caller passed, as `past_key_values` (transformers <= 5.23) or `cache` (5.24+, popped from
    `kwargs`). Both at once must be the same object. A fixed-size cache (`StaticCache`) only where the model
    supports one (`fixed_size_ok`)."""
    cache = kwargs.pop("cache", None)
    if past_key_values is not None and cache is not None and past_key_values is not cache:
        raise ValueError("pass the KV cache once, as `cache` or as `past_key_values`, not two different ones")
    cache = past_key_values if past_key_values is not None else cache
    if is_fixed_size(cache) and not fixed_size_ok:  # masks of this model are sized to a growing cache
        raise ValueError(
            f"{type(cache).__name__} (cache_implementation='static' and other fixed-size caches) is not supported by "
            "this model yet: use the default dynamic cache; model.compile_decode_step() compiles the decoding step"
        )
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(
            f"past_key_values must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; tuple "
            "caches of the original implementations are not supported (transformers >= 5.24 calls it `cache`)"
        )
    return cache


def is_fixed_size(cache: Cache | None) -> bool:
    """A cache of fixed size (`StaticCache` and its kin: `cache_implementation="static"`), whose fill is a device
    tensor (4.57 counts non-zero slots, 5.x keeps a counter), so its length must not be read on the host per step."""
    return bool(getattr(cache, "is_compileable", False))


def fixed_cache_size(cache: Cache) -> int:
    """The number of slots of a fixed-size cache (4.57 names it `max_cache_len` on the cache and on each layer, 5.x
    on each layer only); of an `EncoderDecoderCache`, its self-attention half's."""
    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    return cache.layers[0].max_cache_len


def pad_to_cache(mask: torch.Tensor | None, cache_size: int) -> torch.Tensor | None:
    """A step's mask over the keys so far, widened to every slot of a fixed-size cache: a 2-D padding mask with
    1 (the model hides slots after each query causally), a 4-D explicit mask with 0 (nothing to see there)."""
    if mask is None:
        return None
    return F.pad(mask, (0, cache_size - mask.shape[-1]), value=1 if mask.dim() == 2 else 0)


def step_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a step input with a fresh tensor's strides: a slice of generate()'s growing sequence has new strides
    every token, and `.contiguous()` returns a slice with size-1 dimensions ([1, 1] at batch 1) as it is, so a step
    compiled with fixed shapes would trace again every token."""
    return tensor.clone(memory_format=torch.contiguous_format)


def fixed_size_step_inputs(input_ids: torch.Tensor, cache: Cache, kwargs: dict, decoder: bool = False) -> dict:
    """A model's inputs for one generate() step with a fixed-size cache (`StaticCache`), built here rather than by
    transformers (whose versions differ in how they slice, position and mask such a step): the new ids, their slots
    `cache_position`, positions counted over the real tokens of the 2-D padding mask (as generate() counts them),
    and that mask widened to every slot. Every shape is the same on every decode step. The cache's fill is read
    once per step, outside the model's forward. `decoder`: an encoder-decoder's step (`decoder_input_ids`,
    `decoder_attention_mask`, no position ids: BART's are the slots; the encoder's inputs pass through)."""
    past_length = int(cache.get_seq_length())
    length = input_ids.shape[1]
    prefix = "decoder_" if decoder else ""
    mask = kwargs.get(f"{prefix}attention_mask")
    inputs = {
        f"{prefix}input_ids": step_tensor(input_ids[:, past_length:]),
        "cache_position": torch.arange(past_length, length, device=input_ids.device),
        f"{prefix}attention_mask": pad_to_cache(mask, fixed_cache_size(cache)),
        CACHE_NAME: cache,
    }
    positions = kwargs.get("position_ids")
    if not decoder and positions is None:
        positions = mask.long().cumsum(-1) - 1 if mask is not None else torch.arange(length, device=input_ids.device)
        positions = positions.clamp(min=0).expand(input_ids.shape[0], -1)
    if positions is not None:
        inputs["position_ids"] = step_tensor(positions[:, past_length:])
    skipped = {"cache_position", "next_sequence_length", "is_first_iteration", "labels", *CACHE_NAMES}
    inputs.update({k: v for k, v in kwargs.items() if k not in skipped and k not in inputs})
    return inputs


def cache_field(cache: Cache | None) -> dict:
    """`{CACHE_NAME: cache}`, to be splatted into a model output, `CausalLMOutputWithPast(logits=x,
    **cache_field(cache))`, or into transformers' own `prepare_inputs_for_generation`, which takes the cache under
    the same name (tests/test_transformers_compat.py checks both on every version)."""
    return {CACHE_NAME: cache}


def output_cache(output) -> Cache | None:
    """The cache of a model output, read without the deprecation warning of the old name's alias."""
    return getattr(output, CACHE_NAME)


# ---------------------------------------------------------------------------------------------------------------
# Arguments a model does not use
# ---------------------------------------------------------------------------------------------------------------
# Passed by transformers, needed by none of the models here (each with who passes it and why it is not needed).
IGNORED_KWARGS = frozenset(
    {
        "cache_position",  # generate() in 4.x: positions come from the cache length here
        "return_dict",  # @can_return_tuple consumes it on the top-level classes
    }
)


def check_unused_kwargs(kwargs: dict, model: str) -> None:
    """Refuse keyword arguments `model` does not know that carry state (a tensor, a cache, a list of them): a
    renamed argument of a new transformers release would otherwise vanish into `**kwargs`. Others are logged once."""
    unknown = {name: value for name, value in kwargs.items() if name not in IGNORED_KWARGS}
    if not unknown:
        return
    stateful = sorted(name for name, value in unknown.items() if _carries_state(value))
    if stateful:
        raise TransformersCompatibilityError(
            f"{model}.forward() got unknown argument(s) carrying tensors or a cache: {', '.join(stateful)} "
            f"(transformers {TRANSFORMERS_VERSION}). If transformers renamed an argument (the cache is accepted as "
            f"{' or '.join(CACHE_NAMES)}), this model's code needs updating; ignoring it would give wrong results."
        )
    logger.warning_once(f"{model}.forward() ignores unknown argument(s): {', '.join(sorted(unknown))}")


def _carries_state(value) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_carries_state(item) for item in value)
    return isinstance(value, (torch.Tensor, Cache))


def generation_cache(config, past_key_values: Cache | None, kwargs: dict, fixed_size_ok: bool = False) -> Cache | None:
    """The cache generate() hands to `prepare_inputs_for_generation`, under either name (popped from `kwargs`).

    With `use_cache=True` every step after the prompt brings one (4.57 and later 5.x create it before the prompt
    step; early 5.x let the forward create it there); a later step without it means transformers now passes it
    under a name this code does not know, and decoding on would see one token and no history. That is refused,
    naming the version. `fixed_size_ok` as for `take_cache`."""
    cache = take_cache(past_key_values, kwargs, fixed_size_ok)
    use_cache = kwargs.get("use_cache")
    use_cache = getattr(config, "use_cache", True) if use_cache is None else use_cache
    strays = sorted(name for name, value in kwargs.items() if isinstance(value, Cache))
    # 5.0-5.x generate() creates no cache before the prompt step (`is_first_iteration`): the forward creates it and
    # generate() carries the returned one on; from then on every step must bring it back.
    first_step = kwargs.get("is_first_iteration") is True
    if strays or (use_cache and cache is None and not first_step):
        found = f"; found a cache under {', '.join(strays)}" if strays else ""
        raise TransformersCompatibilityError(
            f"generate() of transformers {TRANSFORMERS_VERSION} passed no KV cache under the names this model "
            f"knows ({', '.join(CACHE_NAMES)}) with use_cache=True{found}. Decoding on would ignore the history "
            "and produce wrong tokens; this model's code needs updating for this transformers release."
        )
    return cache


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------
class LayerOutputs:
    """The per-layer outputs a model's forward returns when asked: the hidden states entering every layer plus the
    final one (`output_hidden_states`), and every layer's attention weights (`output_attentions`; with `cross`, an
    encoder-decoder's cross-attention weights too). None asks the config. Each field is a tuple, or None when not
    asked for, as transformers' output dataclasses hold them."""

    def __init__(self, config, output_hidden_states: bool | None, output_attentions: bool | None, cross: bool = False):
        if output_hidden_states is None:
            output_hidden_states = getattr(config, "output_hidden_states", False)
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)
        self.hidden_states = () if output_hidden_states else None
        self.attentions = () if output_attentions else None
        self.cross_attentions = () if output_attentions and cross else None

    def add_hidden_state(self, hidden_states: torch.Tensor) -> None:
        if self.hidden_states is not None:
            self.hidden_states += (hidden_states,)

    def add_attentions(self, weights: torch.Tensor | None, cross_weights: torch.Tensor | None = None) -> None:
        if self.attentions is not None:
            self.attentions += (weights,)
        if self.cross_attentions is not None:
            self.cross_attentions += (cross_weights,)


def as_encoder_output(encoder_outputs) -> BaseModelOutput:
    """A precomputed encoder output passed to an encoder-decoder: a `BaseModelOutput` (what generate() passes) as it
    is, or the tuple (last_hidden_state, hidden_states, attentions) of a `return_dict=False` call as one."""
    if isinstance(encoder_outputs, BaseModelOutput):
        return encoder_outputs
    if not isinstance(encoder_outputs, (tuple, list)) or not encoder_outputs:
        raise TypeError(
            "encoder_outputs must be a BaseModelOutput or a tuple (last_hidden_state, ...), got "
            f"{type(encoder_outputs).__name__}"
        )
    return BaseModelOutput(
        last_hidden_state=encoder_outputs[0],
        hidden_states=encoder_outputs[1] if len(encoder_outputs) > 1 else None,
        attentions=encoder_outputs[2] if len(encoder_outputs) > 2 else None,
    )


def base_outputs(outputs: ModelOutput) -> dict:
    """The fields of a base model's output that its head returns unchanged: all but `last_hidden_state` (which the
    head turned into logits), by name, the cache under the running transformers' name. A head returns
    `CausalLMOutputWithPast(loss=loss, logits=logits, **base_outputs(outputs))`, so no field is dropped."""
    return {name: value for name, value in outputs.items() if name != "last_hidden_state"}


# ---------------------------------------------------------------------------------------------------------------
# Attention registry, loss, tying
# ---------------------------------------------------------------------------------------------------------------
def registered_attention(implementation: str | None, eager: Callable) -> Callable:
    """transformers' attention function named `implementation` (sdpa, flash, a user's registered one), or `eager`."""
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):  # 5.x
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    if implementation in (None, "eager"):  # 4.x
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    shift: bool = True,
) -> torch.Tensor:
    """Cross-entropy of `logits` [B, S, V] against `labels` [B, S] (-100 = ignored), in fp32.

    `shift`: the logits at position i predict labels[i + 1] (decoder-only models); an encoder-decoder's labels are
    already aligned. The sum is divided by `num_items_in_batch` when Trainer passes it (the label count of every
    micro-batch of a gradient-accumulation step, so k small batches add up to one big one), else by this batch's
    label count. A batch whose labels are all ignored gives a loss of 0 with zero gradients (not NaN)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    labels = labels.to(logits.device).reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels, ignore_index=-100, reduction="sum")
    if num_items_in_batch is None:
        num_items_in_batch = (labels != -100).sum().clamp(min=1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config) -> torch.Tensor:
    """The loss of a sequence-classification head, in fp32, by transformers' rule: `config.problem_type` (set on
    first use from `num_labels` and the labels' dtype) picks MSE (regression), cross-entropy (single label) or
    binary cross-entropy with logits (multi-label)."""
    if config.problem_type is None:
        if config.num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    if config.problem_type == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float().reshape(-1))
    if config.problem_type == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, config.num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def retie_lm_head(model: nn.Module) -> None:
    """Tie the output embeddings to the input embeddings again where the config ties them but the loader left two
    equal copies (transformers 5.0.0 with checkpoints that store both) or a head never loaded, still on the meta
    device (5.3.0). Differing copies stay as loaded."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is embeddings.weight:
        return
    if head.weight.shape != embeddings.weight.shape or embeddings.weight.device.type == "meta":
        return
    # transformers 5.3.0 leaves the tied head on the meta device (never loaded): it can only be the embeddings
    if head.weight.device.type == "meta" or torch.equal(head.weight, embeddings.weight):
        head.weight = embeddings.weight
