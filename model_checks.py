"""Checks every model family of this repository (GLM, sparse GPT-2, BART-gen) runs, so that broken weights or
numerics fail loudly instead of producing fluent-looking garbage.

- At load: transformers loads a checkpoint that lacks weights of the model with only a warning, leaving those
  weights randomly initialised, and loads NaN or inf values without a word. `CheckedLoading` refuses both with a
  `ValueError` saying what is wrong (tests/test_robustness_files.py damages files to show it).
- At run time: a checkpoint whose activations exceed float16's range gives inf/NaN logits in fp16, which greedy
  search silently turns into token 0. `check_half_overflow` raises a `FloatingPointError` naming the fix
  (tests/test_robustness_numerics.py).

A sibling module of the model files: transformers' remote-code loader fetches and copies it with them.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformers_compat import retie_lm_head


class CheckedLoading:
    """Mixin of the `PreTrainedModel` classes (listed before `PreTrainedModel`): `from_pretrained` refuses a
    half-loaded or damaged checkpoint. `_trained_after_loading`: name parts of weights a checkpoint may lack
    because they are meant to be trained (new heads are always allowed: only the model body is required)."""

    _trained_after_loading: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        retie_lm_head(model)
        check_loaded_weights(model, info.get("missing_keys", []), cls._trained_after_loading)
        return (model, info) if want_info else model


def check_loaded_weights(model: nn.Module, missing_keys, trained_after_loading: tuple[str, ...] = ()) -> None:
    """Raise if weights of the model body are missing from the checkpoint (they would run randomly initialised) or
    if a parameter holds NaN / inf (a corrupted file)."""
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
    for name, param in model.named_parameters():
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
