"""Shared builders for the robustness and fuzz tests (test_robustness_*.py, test_fuzz_*.py). No tests live here.

The repository's flat code files are imported as one package (`robustness_repo`), so that their relative imports
(`from .configuration_glm import ...`) resolve; every family gets a tiny random model (hidden 32, 2 layers) that is
built once per process. Loading through the Auto classes is exercised in fresh processes by the tests themselves.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

import torch
from helpers import REPO_ROOT, TOKENIZER_DATA

PACKAGE = "robustness_repo"


def repo_module(name: str) -> types.ModuleType:
    """A root module of the repository (e.g. "modeling_glm"), imported as part of the `robustness_repo` package."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.{name}")


# ---------------------------------------------------------------------------------------------------------------- GLM
GLM_VARIANTS = ("chatglm", "glm")
GLM_VOCAB = 128
PAD, MASK, GMASK, SMASK, SOP, EOP = 0, 120, 121, 122, 124, 125
GLM_TINY = dict(
    vocab_size=GLM_VOCAB,
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
GLM_PROMPT = [5, 6, 7, GMASK, SOP]  # context, blank, <sop>: what the chatglm tokenizer produces


def glm_config(**overrides):
    return repo_module("configuration_glm").GLMConfig(**{**GLM_TINY, **overrides})


@functools.cache
def glm_model(variant: str = "chatglm"):
    torch.manual_seed(0)
    return repo_module("modeling_glm").GLMForConditionalGeneration(glm_config(variant=variant)).eval()


# --------------------------------------------------------------------------------------------------------------- BART
BART_VOCAB = 99
BART_TINY = dict(
    vocab_size=BART_VOCAB,
    d_model=32,
    encoder_layers=2,
    decoder_layers=2,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    encoder_ffn_dim=37,
    decoder_ffn_dim=41,
    max_position_embeddings=40,
    dropout=0.0,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
    decoder_start_token_id=2,
)
BART_IDS = torch.tensor([[0, 5, 6, 2]])


def bart_config(**overrides):
    return repo_module("configuration_bart_gen").BartGenConfig(**{**BART_TINY, **overrides})


@functools.cache
def bart_model():
    torch.manual_seed(0)
    return repo_module("modeling_bart_gen").BartGenForConditionalGeneration(bart_config()).eval()


# --------------------------------------------------------------------------------------------------- sparse GPT-2
SPARSE_VOCAB, SPARSE_IMAGE = 120, 100  # ids < 100 are image tokens, 100..119 text
SPARSE_TINY = dict(
    vocab_size=SPARSE_VOCAB,
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    max_position_embeddings=96,
    hidden_dropout=0.0,
    attention_dropout=0.0,
    query_window=4,
    key_window_times=2,
    num_pivot=6,
    num_image_tokens=SPARSE_IMAGE,
    eos_token_id=None,
    pad_token_id=0,
)
SPARSE_IDS = torch.tensor([[101, 5, 6, 7, 8, 9, 10, 11]])


def sparse_config(**overrides):
    return repo_module("configuration_gpt2_sparse").GPT2SparseConfig(**{**SPARSE_TINY, **overrides})


@functools.cache
def sparse_model():
    torch.manual_seed(0)
    return repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(sparse_config()).eval()


# ---------------------------------------------------------------------------------------------------------- tokenizer
TOKENIZER_FLAVOURS = ("chatglm", "glm-chinese", "glm-english")


@functools.cache
def tokenizer(flavour: str = "chatglm"):
    """The reference tokenizers (THUDM's ice_text, GLM's cog-pretrain and GPT-2 BPE files) as GLMTokenizer."""
    cls = repo_module("tokenization_glm").GLMTokenizer
    if flavour == "chatglm":
        return cls(str(TOKENIZER_DATA / "ice_text.model"), flavour="chatglm")
    if flavour == "glm-chinese":
        return cls(str(TOKENIZER_DATA / "cog-pretrain.model"), flavour="glm-chinese")
    return cls(
        bpe_vocab_file=str(TOKENIZER_DATA / "gpt2-vocab.json"),
        merges_file=str(TOKENIZER_DATA / "gpt2-merges.txt"),
        flavour="glm-english",
    )
