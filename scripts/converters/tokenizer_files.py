"""Tokenizer part of the GLM conversions: write our `GLMTokenizer` files for a THUDM checkpoint folder.

- `convert_chatglm_tokenizer(src, out)`: a THUDM/chatglm-6b folder (`ice_text.model`,
  `tokenizer_config.json`) -> `tokenizer.model` (ice_text.model copied), `tokenizer_config.json` with
  flavour "chatglm" and the auto_map, `chat_template.jinja`, `tokenization_glm.py` and the sibling modules it
  imports (`tokenization_glm_vocab.py`, `tokenization_glm_checks.py`).
- `convert_glm_tokenizer(src, out)`: a THUDM/glm-* folder -> the same files with flavour "glm-chinese"
  (GLMChineseTokenizer, `cog-pretrain.model`: glm-large-chinese, glm-10b-chinese) or "glm-english"
  (GLMGPT2Tokenizer, `vocab.json` + `merges.txt`, or SwissArmyTransformer's `gpt2-vocab.json` +
  `gpt2-merges.txt`: glm-10b, glm-2b; written as `vocab.json` + `merges.txt`). GLM's RoBERTa/BERT
  tokenizers (no [gMASK]/[sMASK]) are refused. When SRC has `added_tokens.json`, its ids must agree with
  the flavour's layout.

Decoding is pinned to the references': their tokenizer_config.json did not set `clean_up_tokenization_spaces`, so
they decoded with the default of the transformers they ran on (4.33: on); the converted tokenizer_config.json
states it explicitly (`true`, or the source folder's own value when it has one), which GLMTokenizer honours on
every transformers version.

The files are written by `GLMTokenizer.save_pretrained` from this repository's tokenization_glm.py,
so the output loads with `AutoTokenizer.from_pretrained(out, trust_remote_code=True)` on
transformers 4.57 and 5.x alike. Both functions return the names of the files written.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

from .common import REPO_ROOT, ConversionError, read_json

GPT2_FILE_NAMES = [("vocab.json", "merges.txt"), ("gpt2-vocab.json", "gpt2-merges.txt")]
CHATGLM_SOP_PIECE_ID = 130004  # "<sop>" in ice_text.model; THUDM's bos_token_id minus it = num_image_tokens
CODE_PACKAGE = "glm_repository_code"  # the package the repository's root modules are imported under


def _tokenizer_class():
    """GLMTokenizer from the repository root, imported as a module of a package standing for the root (its sibling
    imports are relative, as remote code's must be), registered so that save_pretrained writes the auto_map and
    copies tokenization_glm.py with the root modules it imports."""
    if not (REPO_ROOT / "tokenization_glm.py").is_file():
        raise ConversionError("repository file tokenization_glm.py is missing: is this a complete checkout?")
    if CODE_PACKAGE not in sys.modules:
        package = types.ModuleType(CODE_PACKAGE)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[CODE_PACKAGE] = package
    cls = importlib.import_module(f"{CODE_PACKAGE}.tokenization_glm").GLMTokenizer
    cls.register_for_auto_class("AutoTokenizer")
    return cls


def _save(tokenizer, out: Path) -> list[str]:
    before = {p.name for p in out.iterdir()}
    tokenizer.save_pretrained(str(out))
    return sorted({p.name for p in out.iterdir()} - before)


def _clean_up_spaces(tok_config: dict) -> bool:
    """The references' decode clean-up: the source's explicit setting, else on (transformers 4.33's default)."""
    value = tok_config.get("clean_up_tokenization_spaces", True)
    if not isinstance(value, bool):
        raise ConversionError(f"tokenizer_config.json clean_up_tokenization_spaces={value!r}: expected true or false")
    return value


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
            clean_up_tokenization_spaces=_clean_up_spaces(tok_config),
        )
    except ValueError as err:
        raise ConversionError(f"cannot build the ChatGLM tokenizer from {vocab}: {err}") from err
    return _save(tokenizer, out)


def convert_glm_tokenizer(src: Path, out: Path) -> list[str]:
    """Write the tokenizer of a THUDM/glm-* folder into `out`; returns the names written ([] when SRC has no
    vocabulary files)."""
    src, out = Path(src), Path(out)
    tok_config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    tokenizer_class = tok_config.get("tokenizer_class")
    bpe_files = next(
        ((src / v, src / m) for v, m in GPT2_FILE_NAMES if (src / v).is_file() and (src / m).is_file()), None
    )
    if tokenizer_class is None:  # guess from the files present
        tokenizer_class = "GLMChineseTokenizer" if (src / "cog-pretrain.model").is_file() else "GLMGPT2Tokenizer"
    if tokenizer_class == "GLMChineseTokenizer":
        if not (src / "cog-pretrain.model").is_file():
            return []
        kwargs = dict(vocab_file=str(src / "cog-pretrain.model"), flavour="glm-chinese")
    elif tokenizer_class == "GLMGPT2Tokenizer":
        if bpe_files is None:
            return []
        kwargs = dict(bpe_vocab_file=str(bpe_files[0]), merges_file=str(bpe_files[1]), flavour="glm-english")
    else:
        raise ConversionError(
            f"{src}: tokenizer_class {tokenizer_class!r} is not supported (GLM's RoBERTa/BERT tokenizers have no "
            "[gMASK]/[sMASK]); only GLMChineseTokenizer and GLMGPT2Tokenizer are"
        )
    try:
        tokenizer = _tokenizer_class()(
            **kwargs,
            model_max_length=_model_max_length(src, 1024),
            clean_up_tokenization_spaces=_clean_up_spaces(tok_config),
        )
    except ValueError as err:
        raise ConversionError(f"cannot build the {kwargs['flavour']} tokenizer from {src}: {err}") from err
    if (src / "added_tokens.json").is_file():
        added = read_json(src / "added_tokens.json")
        ours = {token: tokenizer.convert_tokens_to_ids(token) for token in added}
        wrong = {token: (int(i), ours[token]) for token, i in added.items() if int(i) != ours[token]}
        if wrong:
            shown = ", ".join(f"{t}: {a} in added_tokens.json, {b} here" for t, (a, b) in wrong.items())
            raise ConversionError(f"{src / 'added_tokens.json'} places GLM's tokens differently: {shown}")
    return _save(tokenizer, out)
