"""`--arch bart`: a transformers BART folder (BartForConditionalGeneration or BartModel weights) -> BART-gen.

The state-dict keys of BART-gen are transformers' own, so the weights are copied, not renamed (a BartModel
checkpoint, whose keys lack the `model.` prefix, gets it). What changes:
- config.json: `model_type` "bart_gen", our `auto_map`, `tie_word_embeddings` written out, and every
  generation parameter (`forced_bos_token_id`, `num_beams`, `no_repeat_ngram_size`, ...; transformers 5.x
  refuses them in a model config) moved into generation_config.json;
- generation_config.json: SRC's own, completed with the generation parameters of SRC's config.json and its
  token ids (what transformers derived from an old config.json that had no generation_config.json);
- the tied copies of the shared embedding (encoder/decoder `embed_tokens`, `lm_head`) are written once, as
  `model.shared.weight`, after checking that they really are copies;
- tokenizer files are copied when SRC has them (a `tokenizer_class` is added if missing, since AutoTokenizer
  cannot infer it from `model_type` "bart_gen").
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

import torch

from .common import (
    REPO_ROOT,
    ConversionError,
    SafetensorsWriter,
    check_all_placed,
    code_files,
    copy_code_files,
    copy_files,
    iter_tensors,
    read_json,
    write_json,
)

CODE_FILES = code_files("configuration_bart_gen.py", "modeling_bart_gen.py")
TOKENIZER_FILES = [
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json",
]  # fmt: skip
# config.json keys that describe the source checkpoint, not the converted one
DROPPED_CONFIG_KEYS = {"architectures", "auto_map", "model_type", "transformers_version", "_name_or_path"}
# Tensors that are views of `model.shared.weight` when the embeddings are tied
TIED_ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")
# Legacy fairseq buffers that transformers ignores too
IGNORED_SUFFIXES = (".version",)


def _import_code():
    """Import the repository's configuration/modeling files as one package (they use relative imports)."""
    name = "_bart_gen_code"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[name] = package
    config_module = importlib.import_module(f"{name}.configuration_bart_gen")
    modeling_module = importlib.import_module(f"{name}.modeling_bart_gen")
    return config_module, modeling_module


def split_config(src_config: dict, generation_parameters: tuple[str, ...]) -> tuple[dict, dict]:
    """Split a BART config.json into (model config fields, generation parameters)."""
    model_fields, generation = {}, {}
    for key, value in src_config.items():
        if key in DROPPED_CONFIG_KEYS:
            continue
        if key in generation_parameters:
            if value is not None:
                generation[key] = value
        elif key == "force_bos_token_to_be_generated":  # pre-4.x spelling of forced_bos_token_id = bos
            if value:
                generation.setdefault("forced_bos_token_id", src_config.get("bos_token_id", 0))
        else:
            model_fields[key] = value
    model_fields.setdefault("tie_word_embeddings", True)
    return model_fields, generation


def build_generation_config(src: Path, model_fields: dict, from_config: dict) -> dict:
    """SRC's generation_config.json wins; the config's generation params and token ids fill the gaps."""
    generation = read_json(src / "generation_config.json") if (src / "generation_config.json").is_file() else {}
    for key, value in from_config.items():
        generation.setdefault(key, value)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if model_fields.get(key) is not None:
            generation.setdefault(key, model_fields[key])
    generation.pop("transformers_version", None)
    generation["_from_model_config"] = False
    return generation


def _normalise_name(name: str, base_model_only: bool) -> str:
    return "model." + name if base_model_only else name


def convert_bart(src: Path, out: Path, dtype: torch.dtype | None, args: argparse.Namespace) -> None:
    config_module, modeling_module = _import_code()
    src_config = read_json(src / "config.json")
    if src_config.get("model_type") not in ("bart", "bart_gen"):
        raise ConversionError(
            f"{src / 'config.json'} has model_type {src_config.get('model_type')!r}; --arch bart expects a "
            "transformers BART checkpoint (model_type 'bart')"
        )
    model_fields, generation_from_config = split_config(src_config, config_module.GENERATION_PARAMETERS)
    try:
        config = config_module.BartGenConfig(**model_fields)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"{src / 'config.json'} is not a usable BART config: {err}") from err
    config.architectures = ["BartGenForConditionalGeneration"]
    tied = bool(config.tie_word_embeddings)

    # Expected names and shapes, from the model itself built on the meta device (no memory, no init).
    with torch.device("meta"):
        expected = {
            k: tuple(v.shape) for k, v in modeling_module.BartGenForConditionalGeneration(config).state_dict().items()
        }

    source_names = []
    base_model_only = None
    writer = SafetensorsWriter(out, dtype)
    shared, aliases, unplaced = None, {}, []
    for name, tensor in iter_tensors(src):
        if base_model_only is None:  # BartModel checkpoints store "shared.weight", "encoder.*", "decoder.*"
            base_model_only = not name.startswith(("model.", "lm_head.", "final_logits_bias"))
        source_names.append(name)
        if name.endswith(IGNORED_SUFFIXES):
            continue
        key = _normalise_name(name, base_model_only)
        if key not in expected:
            unplaced.append(name)
            continue
        if tuple(tensor.shape) != expected[key]:
            raise ConversionError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies {expected[key]}"
            )
        if tied and key in TIED_ALIASES:
            aliases[key] = tensor.clone()  # written once, as model.shared.weight, after the check below
            continue
        if key == "model.shared.weight":
            shared = tensor.clone()
        writer.add(key, tensor)
    check_all_placed(unplaced, src)

    if tied:
        if shared is None:  # some exports keep only one of the tied names
            for key in TIED_ALIASES:
                if key in aliases:
                    shared = aliases[key]
                    writer.add("model.shared.weight", shared)
                    break
        if shared is None:
            raise ConversionError(f"{src} holds no token embedding (model.shared.weight or one of its tied copies)")
        for key, tensor in aliases.items():
            if not torch.equal(tensor, shared):
                raise ConversionError(
                    f"{key} differs from model.shared.weight although config.json ties them "
                    "(tie_word_embeddings is true or absent). If the untied head is intended, set "
                    '"tie_word_embeddings": false in the source config.json and convert again.'
                )
    missing = [
        k for k in expected if k not in writer.names and k != "final_logits_bias" and not (tied and k in TIED_ALIASES)
    ]
    if missing:
        shown = ", ".join(missing[:10]) + (f" (+{len(missing) - 10} more)" if len(missing) > 10 else "")
        raise ConversionError(f"{src} lacks {len(missing)} tensor(s) the model needs: {shown}")
    writer.close()

    if dtype is not None:
        config.torch_dtype = str(dtype).removeprefix("torch.")
    config.save_pretrained(out)
    write_json(out / "generation_config.json", build_generation_config(src, model_fields, generation_from_config))
    copy_code_files(out, CODE_FILES)

    written = copy_files(src, out, TOKENIZER_FILES)
    if written:
        tokenizer_config = read_json(out / "tokenizer_config.json") if "tokenizer_config.json" in written else {}
        if not tokenizer_config.get("tokenizer_class"):
            # AutoTokenizer would otherwise look up model_type "bart_gen", which has no tokenizer
            tokenizer_config["tokenizer_class"] = "BartTokenizer"
            write_json(out / "tokenizer_config.json", tokenizer_config)
    moved = sorted(generation_from_config)
    if moved:
        print(f"moved generation parameters from config.json to generation_config.json: {', '.join(moved)}")


ARCHS = {"bart": convert_bart}
