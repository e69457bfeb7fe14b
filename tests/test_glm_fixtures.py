"""Shared helpers for the GLM tests (both variants): tiny configs, informative random weights, inputs.

No tests live here. The model classes are loaded the way users get them, through transformers' dynamic-module
loader from the repository root (the code files use relative imports, so they are not importable directly).

A tiny random ChatGLM with the default init just repeats its last input token (the `alpha * LN(x)` residual
dominates, see reference-notes §b0), which would make every generation comparison pass trivially. `spread_weights`
gives the weights more spread: random-sign LayerNorm weights, unit-variance embeddings and 8x larger output
projections, so greedy generations vary with the prompt (checked in test_glm_model.py).
"""

from __future__ import annotations

import math
import sys

import torch
from helpers import REPO_ROOT

# Tiny vocabulary with ChatGLM's special tokens placed inside it.
VOCAB = 128
PAD, MASK, GMASK, SMASK, SOP, EOP = 0, 120, 121, 122, 124, 125
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    inner_hidden_size=64,
    max_sequence_length=64,
    pad_token_id=PAD,
    mask_token_id=MASK,
    gmask_token_id=GMASK,
    smask_token_id=SMASK,
    bos_token_id=SOP,
    eos_token_id=EOP,
)
WORDS = (5, 100)  # ordinary token ids are drawn from [5, 100)

_classes: dict[str, type] = {}


def glm_class(name: str = "GLMForConditionalGeneration") -> type:
    """A class of modeling_glm.py / configuration_glm.py, loaded through the dynamic-module machinery."""
    if name not in _classes:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        module = "configuration_glm" if name == "GLMConfig" else "modeling_glm"
        _classes[name] = get_class_from_dynamic_module(f"{module}.{name}", str(REPO_ROOT))
    return _classes[name]


def modeling_module():
    """The loaded modeling_glm module (for its helper functions)."""
    return sys.modules[glm_class().__module__]


def tiny_config(**overrides):
    return glm_class().config_class(**{**TINY, **overrides})


@torch.no_grad()
def spread_weights(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Re-initialise `model` so that a tiny random ChatGLM generates prompt-dependent tokens."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        shape = param.shape
        if "layernorm" in name and name.endswith("weight"):
            value = torch.randn(shape, generator=generator)  # random signs and scales
        elif name.endswith("bias"):
            value = torch.randn(shape, generator=generator) * 0.2
        elif "word_embeddings" in name or "prefix_encoder.embedding" in name or "position_embeddings" in name:
            value = torch.randn(shape, generator=generator)
        else:
            scale = 8.0 if name.endswith(("attention.dense.weight", "dense_4h_to_h.weight")) else 1.0
            value = torch.randn(shape, generator=generator) * scale / math.sqrt(shape[-1])
        param.copy_(value.to(param.dtype))
    return model


VARIANTS = ("chatglm", "glm")


def tiny_model(seed: int = 1, attn_implementation: str | None = None, **overrides):
    config = tiny_config(**overrides)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    model = glm_class()(config)
    return spread_weights(model, seed).eval()


def prompt(context: list[int], blank: int = GMASK, sop: bool = True) -> list[int]:
    """ChatGLM's prompt layout: context, then the blank and <sop> appended (tokenizer style)."""
    return list(context) + [blank] + ([SOP] if sop else [])


def random_prompt(generator: torch.Generator, length: int, blank: int = GMASK) -> list[int]:
    context = torch.randint(*WORDS, (length,), generator=generator).tolist()
    return prompt(context, blank)


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded input_ids and attention_mask, as the GLM tokenizer produces them."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def assert_same_tokens_or_near_tie(actual: torch.Tensor, expected: torch.Tensor, logits_fn, msg: str = "") -> None:
    """Token sequences must agree; a divergence is accepted only where the top-2 logits of `expected`'s prefix
    are within 1e-4 (a float tie that either implementation may break either way)."""
    if actual.shape == expected.shape and torch.equal(actual, expected):
        return
    width = min(actual.shape[-1], expected.shape[-1])
    diff = (actual[..., :width] != expected[..., :width]).nonzero()
    assert len(diff) > 0, f"{msg}: lengths differ without a diverging token: {actual} vs {expected}"
    row, col = (int(i) for i in diff[0]) if diff.dim() == 2 else (0, int(diff[0]))
    row_ids = expected[row] if expected.dim() == 2 else expected
    top2 = logits_fn(row_ids[:col].unsqueeze(0))[0, -1].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < 1e-4, (
        f"{msg}: tokens diverge at ({row}, {col}) with a top-2 logit gap of {gap:.2e}:\n{actual}\n{expected}"
    )
