"""Shared builders for the ecosystem tests (pipelines, streaming, Trainer, PEFT, accelerate, Hub, compile, dtypes).

No tests live here. `build_folder(family, path)` writes a tiny random model of one family into a folder the way a
Hub repository holds it: the code files, `config.json` with `auto_map`, safetensors weights, a real tokenizer and
`generation_config.json`, so `Auto*.from_pretrained(path, trust_remote_code=True)` and `pipeline(...)` load it in a
fresh process exactly as they would load the published repository.

Families (`FAMILIES`):
- "glm": the ChatGLM-6B variant, with the repository's own GLM tokenizer (the embedded default's
  `tokenizer.model`); weights from `test_glm_fixtures.spread_weights`, so greedy generations depend on the prompt.
- "glm-10b" (not in the default run, to keep the suite's time): the same with `GLMConfig.variant="glm"`, the
  GLM-10B family architecture. `ECOSYSTEM_FAMILIES=glm,glm-10b,gpt2_sparse,bart_gen pytest tests/test_ecosystem_*`
  runs every ecosystem test on it too; add it to the default once the time budget allows.
- "gpt2_sparse": CogView's sparse GPT-2 (sandwich LN and PB-relax on) with a tiny byte-level BPE GPT-2 tokenizer.
- "bart_gen": BART generation with the same tiny BPE vocabulary through a BartTokenizer.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from helpers import REPO_ROOT, code_files, run_fresh

FAMILIES = tuple(os.environ.get("ECOSYSTEM_FAMILIES", "glm,gpt2_sparse,bart_gen").split(","))
CODE_FILES = {
    "glm": code_files("configuration_glm.py", "modeling_glm.py"),
    "glm-10b": code_files("configuration_glm.py", "modeling_glm.py"),
    "gpt2_sparse": code_files("configuration_gpt2_sparse.py", "modeling_gpt2_sparse.py"),
    "bart_gen": code_files("configuration_bart_gen.py", "modeling_bart_gen.py"),
}
# The Auto class that holds the LM head, per family.
AUTO_LM = {
    "glm": "AutoModelForCausalLM",
    "glm-10b": "AutoModelForCausalLM",
    "gpt2_sparse": "AutoModelForCausalLM",
    "bart_gen": "AutoModelForSeq2SeqLM",
}
# Prompts the tests feed through each family's tokenizer (GLM prompts carry a blank; the tokenizer appends
# `[gMASK] <sop>` where there is none).
PROMPTS = {
    "glm": ["The capital of [MASK] is Paris.", "27 plus 15 equals"],
    "glm-10b": ["The capital of [MASK] is Paris.", "27 plus 15 equals [gMASK]"],
    "gpt2_sparse": ["the cat sat", "a hat"],
    "bart_gen": ["the cat sat.", "a hat."],
}
# Module names whose classes the LoRA tests target (GLM: as ChatGLM-6B adapters do).
LORA_TARGETS = {
    "glm": ["query_key_value"],
    "glm-10b": ["query_key_value"],
    "gpt2_sparse": ["query_key_value"],
    "bart_gen": ["q_proj", "v_proj"],
}


@dataclass
class Family:
    """What a test needs to know about one family's folder."""

    name: str
    path: Path
    auto_lm: str
    no_split_block: str  # the layer class accelerate must keep on one device
    prompts: list[str] = field(default_factory=list)

    @property
    def is_seq2seq(self) -> bool:
        return self.name == "bart_gen"


def repo_module(name: str) -> types.ModuleType:
    """A root code file imported as a module of one package (the files use relative imports)."""
    package = "ecosystem_repo"
    if package not in sys.modules:
        module = types.ModuleType(package)
        module.__path__ = [str(REPO_ROOT)]
        sys.modules[package] = module
    import importlib

    return importlib.import_module(f"{package}.{name}")


def write_bpe_vocab(folder: Path) -> None:
    """vocab.json + merges.txt of a tiny byte-level BPE: <s> <pad> </s> <unk>, a-z . , Ġ, a few merges, <mask>."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in [*"abcdefghijklmnopqrstuvwxyz.,", "Ġ", "th", "Ġt", "at", "Ġa", "Ġc", "<mask>"]:
        vocab[piece] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nĠ t\na t\nĠ a\nĠ c\n")


def _glm_tokenizer(folder: Path):
    """The repository's GLM tokenizer files (the embedded default's SentencePiece model) copied into `folder`."""
    for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_glm.py"):
        shutil.copy2(REPO_ROOT / name, folder / name)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)


def _bpe_tokenizer(folder: Path, cls_name: str):
    import transformers

    scratch = folder / "_bpe"
    scratch.mkdir(parents=True, exist_ok=True)
    write_bpe_vocab(scratch)
    cls = getattr(transformers, cls_name)
    # decoder-only generation needs left padding; BART's positions ignore the mask, so it keeps right padding
    padding_side = "left" if cls_name == "GPT2Tokenizer" else "right"
    kwargs = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>", padding_side=padding_side)
    tokenizer = cls(str(scratch / "vocab.json"), str(scratch / "merges.txt"), **kwargs)
    tokenizer.save_pretrained(folder)
    shutil.rmtree(scratch)
    return tokenizer


@torch.no_grad()
def _spread(model: torch.nn.Module, seed: int) -> None:
    """Larger random weights, so tiny models generate prompt-dependent (not constant) tokens."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name and name.endswith("weight"):
            value = 1.0 + 0.5 * torch.randn(param.shape, generator=generator)
        elif name.endswith("bias"):
            value = 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5
        param.copy_(value)


def build_model(name: str, tokenizer, seed: int = 1, layers: int = 2, **overrides) -> torch.nn.Module:
    """A tiny random model of family `name` (`layers` blocks; BART: in the encoder and in the decoder) whose special
    token ids are the tokenizer's; `overrides` are config fields."""
    if name in ("glm", "glm-10b"):
        from test_glm_fixtures import glm_class, spread_weights

        fields = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_layers=layers,
            num_attention_heads=4,
            inner_hidden_size=64,
            max_sequence_length=128,
            pad_token_id=tokenizer.pad_token_id,
            mask_token_id=tokenizer.convert_tokens_to_ids("[MASK]"),
            gmask_token_id=tokenizer.convert_tokens_to_ids("[gMASK]"),
            smask_token_id=tokenizer.convert_tokens_to_ids("[sMASK]"),
            bos_token_id=tokenizer.convert_tokens_to_ids("<sop>"),
            eos_token_id=tokenizer.convert_tokens_to_ids("<eop>"),
            variant="glm" if name == "glm-10b" else "chatglm",
        )
        config = glm_class("GLMConfig")(**{**fields, **overrides})
        return spread_weights(glm_class()(config), seed).eval()
    if name == "gpt2_sparse":
        fields = dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=64,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            query_window=4,
            key_window_times=2,
            num_pivot=4,
            num_image_tokens=0,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        config = repo_module("configuration_gpt2_sparse").GPT2SparseConfig(**{**fields, **overrides})
        model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(config)
    elif name == "bart_gen":
        fields = dict(
            vocab_size=len(tokenizer),
            d_model=32,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=48,
            decoder_ffn_dim=48,
            max_position_embeddings=64,
            dropout=0.0,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.eos_token_id,
        )
        config = repo_module("configuration_bart_gen").BartGenConfig(**{**fields, **overrides})
        model = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(config)
    else:
        raise ValueError(f"unknown family {name!r}; expected one of {FAMILIES}")
    _spread(model, seed)
    return model.eval()


_FOLDERS: dict[str, Family] = {}


def run_fresh_here(code: str, *args: str) -> str:
    """helpers.run_fresh with this process's torch thread count in the child (pytest-xdist workers run one
    thread), so both sides sum in the same order and their outputs can be compared closely."""
    preamble = "import sys, torch\ntorch.set_num_threads(int(sys.argv.pop(1)))\n"
    return run_fresh(preamble + textwrap.dedent(code), str(torch.get_num_threads()), *args)


def folder(name: str) -> Family:
    """The folder of family `name`, built once per process (pytest-xdist workers build their own)."""
    if name not in _FOLDERS:
        root = Path(tempfile.mkdtemp(prefix="ecosystem_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _FOLDERS[name] = build_folder(name, root / name)
    return _FOLDERS[name]


def load(name: str, **kwargs) -> tuple[torch.nn.Module, object]:
    """(model, tokenizer) of family `name` loaded from its folder through the Auto classes, in this process."""
    import transformers

    family = folder(name)
    model = getattr(transformers, family.auto_lm).from_pretrained(family.path, trust_remote_code=True, **kwargs)
    tokenizer = transformers.AutoTokenizer.from_pretrained(family.path, trust_remote_code=True)
    return model.eval(), tokenizer


def build_folder(name: str, path: Path, seed: int = 1, **overrides) -> Family:
    """Write a tiny random model of family `name` with its tokenizer and code files into `path` (a Hub repo)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if name.startswith("glm"):
        tokenizer = _glm_tokenizer(path)
    else:
        tokenizer = _bpe_tokenizer(path, "GPT2Tokenizer" if name == "gpt2_sparse" else "BartTokenizer")
    model = build_model(name, tokenizer, seed, **overrides)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    for code_file in CODE_FILES[name]:  # a class built directly (not through an Auto class) does not copy them
        shutil.copy2(REPO_ROOT / code_file, path / code_file)
    block = {"gpt2_sparse": "GPT2SparseLayer", "bart_gen": "BartGenDecoderLayer"}.get(name, "GLMBlock")
    return Family(name, path, AUTO_LM[name], block, list(PROMPTS[name]))


SOURCES = ["the cat sat on the mat.", "a hat is on the cat.", "that cat has a hat.", "the mat is flat."]
TARGETS = ["cat sat.", "hat.", "a cat.", "flat mat."]
GLM_SOURCES = ["The capital of [MASK] is Paris.", "27 plus 15 equals [MASK].", "[MASK] is red.", "Oxygen is [MASK]."]
GLM_TARGETS = ["France", "42", "The sky", "O"]


def training_examples(name: str, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Four fixed-length (input_ids, attention_mask, labels) examples, as a Trainer dataset (labels -100 = ignored)."""
    if name.startswith("glm"):
        # the blank-infilling objective: context, <sop>, target, <eop>; labels only on the span
        batch = tokenizer.build_inputs_for_generation(
            tokenizer(GLM_SOURCES), targets=GLM_TARGETS, max_gen_length=6, padding=True
        )
    elif name == "gpt2_sparse":
        batch = tokenizer(SOURCES, padding="max_length", max_length=24, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    else:
        batch = tokenizer(SOURCES, padding="max_length", max_length=24, return_tensors="pt")
        labels = tokenizer(TARGETS, padding="max_length", max_length=10, return_tensors="pt")
        batch["labels"] = labels["input_ids"].masked_fill(labels["attention_mask"] == 0, -100)
    keys = ("input_ids", "attention_mask", "labels")
    return [{k: torch.as_tensor(batch[k][i]) for k in keys} for i in range(len(batch["input_ids"]))]
