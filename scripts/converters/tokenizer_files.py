"""Tokenizer part of the GLM conversions: write our `GLMTokenizer` files for a THUDM checkpoint folder.

- `convert_chatglm_tokenizer(src, out)`: a THUDM/chatglm-6b folder (`ice_text.model`,
  `tokenizer_config.json`) -> `tokenizer.model` (ice_text.model copied), `tokenizer_config.json` with
  flavour "chatglm" and the auto_map, `chat_template.jinja`, `tokenization_glm.py`.
- `convert_glm_tokenizer(src, out)`: a THUDM/glm-* folder with `cog-pretrain.model` (glm-large-chinese,
  glm-10b-chinese) -> the same files with flavour "glm-chinese". GLM's English (GPT-2 BPE) and
  RoBERTa/BERT tokenizers are not supported yet and are reported as such.

The files are written by `GLMTokenizer.save_pretrained` from this repository's tokenization_glm.py,
so the output loads with `AutoTokenizer.from_pretrained(out, trust_remote_code=True)` on
transformers 4.57 and 5.x alike. Both functions return the names of the files written.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .common import REPO_ROOT, ConversionError, read_json

CHATGLM_SOP_PIECE_ID = 130004  # "<sop>" in ice_text.model; THUDM's bos_token_id minus it = num_image_tokens


def _tokenizer_class():
    """GLMTokenizer from the repository root, registered under its module name so save_pretrained copies it."""
    name = "tokenization_glm"
    if name not in sys.modules:
        path = REPO_ROOT / "tokenization_glm.py"
        if not path.is_file():
            raise ConversionError("repository file tokenization_glm.py is missing: is this a complete checkout?")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    cls = sys.modules[name].GLMTokenizer
    cls.register_for_auto_class("AutoTokenizer")
    return cls


def _save(tokenizer, out: Path) -> list[str]:
    before = {p.name for p in out.iterdir()}
    tokenizer.save_pretrained(str(out))
    return sorted({p.name for p in out.iterdir()} - before)


def _model_max_length(src: Path, default: int) -> int:
    config_file = src / "config.json"
    if config_file.is_file():
        return int(read_json(config_file).get("max_sequence_length", default))
    return default


def convert_chatglm_tokenizer(src: Path, out: Path) -> list[str]:
    """Write the "chatglm" flavour tokenizer for a THUDM/chatglm-6b folder into `out`."""
    src, out = Path(src), Path(out)
    vocab = src / "ice_text.model"
    if not vocab.is_file():
        raise ConversionError(f"expected ice_text.model (ChatGLM-6B's SentencePiece model) in {src}")
    tok_config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    model_config = read_json(src / "config.json") if (src / "config.json").is_file() else {}
    if "num_image_tokens" in tok_config:
        num_image_tokens = int(tok_config["num_image_tokens"])
    elif "bos_token_id" in model_config:  # pre-"slim" checkpoints shift every id by 20000 image tokens
        num_image_tokens = int(model_config["bos_token_id"]) - CHATGLM_SOP_PIECE_ID
    else:
        num_image_tokens = 0
    if "bos_token_id" in model_config and model_config["bos_token_id"] != CHATGLM_SOP_PIECE_ID + num_image_tokens:
        raise ConversionError(
            f"tokenizer_config.json num_image_tokens={num_image_tokens} puts <sop> at id "
            f"{CHATGLM_SOP_PIECE_ID + num_image_tokens}, but config.json has bos_token_id={model_config['bos_token_id']}"
        )
    try:
        tokenizer = _tokenizer_class()(
            str(vocab),
            flavour="chatglm",
            num_image_tokens=num_image_tokens,
            remove_space=bool(tok_config.get("remove_space", False)),
            do_lower_case=bool(tok_config.get("do_lower_case", False)),
            model_max_length=_model_max_length(src, 2048),
        )
    except ValueError as err:
        raise ConversionError(f"cannot build the ChatGLM tokenizer from {vocab}: {err}") from err
    return _save(tokenizer, out)


def convert_glm_tokenizer(src: Path, out: Path) -> list[str]:
    """Write the tokenizer of a THUDM/glm-* folder into `out` (GLM's Chinese SentencePiece tokenizer only)."""
    src, out = Path(src), Path(out)
    tok_config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    tokenizer_class = tok_config.get("tokenizer_class", "GLMChineseTokenizer")
    vocab = src / "cog-pretrain.model"
    if tokenizer_class != "GLMChineseTokenizer" or not vocab.is_file():
        raise ConversionError(
            f"{src}: tokenizer_class {tokenizer_class!r} is not supported yet (only GLMChineseTokenizer with "
            "cog-pretrain.model); convert the weights with the tokenizer files left out"
        )
    try:
        tokenizer = _tokenizer_class()(str(vocab), flavour="glm-chinese", model_max_length=_model_max_length(src, 1024))
    except ValueError as err:
        raise ConversionError(f"cannot build the GLM Chinese tokenizer from {vocab}: {err}") from err
    return _save(tokenizer, out)
