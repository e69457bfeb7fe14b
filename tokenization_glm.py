"""GLM tokenizer: one class for ChatGLM-6B and for GLM's Chinese and English models.

`GLMTokenizer` is a slow (`PreTrainedTokenizer`) tokenizer, loaded with `AutoTokenizer.from_pretrained(path,
trust_remote_code=True)` on transformers 4.57 and 5.x. One class, several *flavours* (`flavour`, saved in
tokenizer_config.json); the special-token layouts are in `FLAVOURS` below:
- `"chatglm"` reproduces THUDM's `ChatGLMTokenizer` (THUDM/chatglm-6b, `ice_text.model`, final revision,
  `num_image_tokens=0`): `\\n` -> `<n>`, `\\t` -> `<|tab|>`, runs of 2..80 spaces -> `<|blank_N|>` before
  SentencePiece; each chunk between special tokens gets the dummy prefix; `A [gMASK] <sop>` (pair: `+ B <eop>`);
  decoding drops `<pad>` and the control pieces (ids 130000+) and undoes the whitespace encoding.
- `"glm-chinese"` reproduces GLM's `GLMChineseTokenizer` (glm-large/10b-chinese, `cog-pretrain.model`): `[CLS] A
  <|endoftext|>`, left truncation, the special tokens after the 50000 pieces ([UNUSED1/2] keep the layout), `[UNK]`
  = the unknown piece 0; decoding puts spaces around the special tokens.
- `"glm-english"` reproduces GLM's `GLMGPT2Tokenizer` (glm-10b, glm-2b): GPT-2's byte-level BPE (`vocab.json` +
  `merges.txt`, run by `tokenizers`), the same framing, GLM's command tokens after the 50257 BPE tokens.

Behaviour is pinned here, never inherited from the installed transformers:
- Whitespace next to a special token typed in the text is stripped, as under transformers 4.33 (the last version
  the references ran on).
- The clean-up of tokenization spaces (`"a , b !"` -> `"a, b!"`) is the init argument `clean_up_tokenization_spaces`
  (saved, honoured on every version, with this module's own rules: `clean_up_spaces`; 5.0.0 lacks the base-class
  helper). The references decoded with it on (4.33's default); the checkpoint converter writes `true`, so converted
  folders decode exactly as THUDM's/GLM's. The class default is `false` so that `decode(encode(text)) == text`
  (the repository's own default model keeps that).
- Deliberate differences from THUDM: with `"chatglm"` the literal text `[gMASK]` / `[sMASK]` is the special token
  (THUDM split it into pieces), so prompts and the chat template can hold those blanks; and ONE special token that
  would decode to nothing (`<eop>`, `<sop>`, `<pad>`, ...) decodes to its text with `skip_special_tokens=False`
  (THUDM: `""`), so that tools taking `decode(eos_id)` as a stop string (lm-eval `--model hf`) stop at the end.
- Ambiguous input is refused with a TypeError/ValueError naming the argument, never guessed at.
Other differences: only `input_ids` and `attention_mask` are returned (the model builds the prefix-LM mask and the
2-D positions), padding is on the LEFT by default, and `build_inputs_for_generation` returns causal-LM labels.
Blank infilling helpers: `build_inputs_for_generation`, `build_inputs_for_multiple_choice` (`GLMForMultipleChoice`).

Two sibling modules travel with this file (imported relatively, so transformers' remote-code loader and
`save_pretrained` copy them): tokenization_glm_vocab.py, the vocabulary back-ends (a SentencePiece model, GPT-2's
byte-level BPE), and tokenization_glm_checks.py, the argument checks of the public entries.

A new flavour is a `_Flavour` record plus, if it is neither SentencePiece nor GPT-2 BPE, a back-end with the
interface of `SentencePieceVocab` (tokenization_glm_vocab.py). A new SentencePiece model for `"chatglm"` needs the
user-defined symbols `<n>`, `<|tab|>`, `<|blank_2|>`..`<|blank_80|>`, the control symbols `[MASK] [gMASK] [sMASK]
<sop> <eop>` (decode drops them), `<pad>` and `<unk>`, and `byte_fallback=True` if there is room (>= ~400 pieces);
a missing piece is named::

    spm.SentencePieceTrainer.train(input="corpus.txt", model_prefix="tokenizer", vocab_size=200, pad_id=3,
        control_symbols=["[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>"],
        user_defined_symbols=["<n>", "<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)])
    tok = GLMTokenizer("tokenizer.model", flavour="chatglm")
    GLMTokenizer.register_for_auto_class("AutoTokenizer")
    tok.save_pretrained("my-model")  # tokenizer.model, tokenizer_config.json, tokenization_glm*.py

The model config then takes `tok.sop_token_id` (bos), `eop_token_id` (eos), `mask_token_id`, `gmask_token_id`,
`smask_token_id` and `pad_token_id`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizer
from transformers.tokenization_utils_base import AddedToken, BatchEncoding
from transformers.utils import logging

from .tokenization_glm_checks import check_conversation, check_int, check_text, is_id, is_strs, shown, token_id_rows
from .tokenization_glm_vocab import VOCAB_FILES_NAMES, GPT2BPEVocab, SentencePieceVocab

logger = logging.get_logger(__name__)

# ChatGLM-6B's prompt (THUDM's `chat`): one question as is; with history "[Round i]\n问：q\n答：r\n" per turn
# (0-indexed), then "[Round n]\n问：q\n答：". add_generation_prompt adds "[gMASK]<sop>", which encoding with special
# tokens appends: apply_chat_template(..., add_generation_prompt=True, tokenize=True) == tokenizer(prompt).input_ids.
CHATGLM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('ChatGLM-6B conversations alternate user and assistant messages, starting with user') -}}"
    "{%- endif -%}"
    "{%- if messages | length == 1 -%}{{- message['content'] -}}"
    "{%- elif loop.index0 % 2 == 0 -%}"
    "{{- '[Round ' ~ (loop.index0 // 2) ~ ']\\n问：' ~ message['content'] ~ '\\n答：' -}}"
    "{%- else -%}{{- message['content'] ~ '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '[gMASK]<sop>' -}}{%- endif -%}"
)

# The clean-up of tokenization spaces the references decoded with (transformers 4.33; the same ten rules through
# 5.23), applied in this order. Kept here so that decoding never depends on the base class having the helper.
CLEAN_UP_RULES = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)  # fmt: skip

# Where transformers keeps the added tokens of a slow tokenizer (text -> id, id -> AddedToken): private, so read
# through `_added_tokens()` with the public (sorted, slower) properties as the fallback.
ADDED_TOKENS_ATTRIBUTES = ("_added_tokens_encoder", "_added_tokens_decoder")


def clean_up_spaces(text: str) -> str:
    """Remove the spaces that word-by-word decoding leaves before punctuation and English contractions."""
    for old, new in CLEAN_UP_RULES:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class _Flavour:
    """Everything that differs between the reference tokenizers."""

    name: str
    named_tokens: dict[str, str]  # bos/eos/unk/pad/cls/sep/mask -> token text
    extra_tokens: tuple[str, ...]  # further special tokens (never split)
    sop_token: str = "<|startofpiece|>"  # opens a generated span (GLM's bos for generation)
    eop_token: str = "<|endofpiece|>"  # closes a span
    gmask_token: str = "[gMASK]"
    smask_token: str = "[sMASK]"
    appended_tokens: tuple[str, ...] = ()  # tokens after the vocabulary's own, in id order (GLM's layout)
    keep_whitespace: frozenset[str] = frozenset()  # special tokens that keep the whitespace next to them
    encode_whitespace: bool = False  # ChatGLM's \n -> <n>, \t -> <|tab|>, spaces -> <|blank_N|>
    suffix_special_tokens: bool = False  # ChatGLM: ids + [gMASK, <sop>]; else [CLS] + ids + [eos]
    drop_pad_on_decode: bool = False
    truncation_side: str = "right"
    chat_template: str | None = None
    required_pieces: tuple[str, ...] = field(default=())
    backend: str = "sentencepiece"  # or "gpt2-bpe"


# fmt: off
FLAVOURS: dict[str, _Flavour] = {
    "chatglm": _Flavour(
        name="chatglm",
        named_tokens=dict(bos_token="<sop>", eos_token="<eop>", unk_token="<unk>", pad_token="<pad>", mask_token="[MASK]"),
        extra_tokens=("[gMASK]", "[sMASK]"), sop_token="<sop>", eop_token="<eop>",
        keep_whitespace=frozenset({"[gMASK]", "[sMASK]"}),
        encode_whitespace=True, suffix_special_tokens=True, drop_pad_on_decode=True, chat_template=CHATGLM_CHAT_TEMPLATE,
        required_pieces=("[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<pad>", "<n>", "<|tab|>"),
    ),
    "glm-chinese": _Flavour(  # <|endoftext|> 50000 ... [gMASK] 50009
        name="glm-chinese",
        named_tokens=dict(eos_token="<|endoftext|>", unk_token="[UNK]", sep_token="[SEP]", pad_token="<|endoftext|>",
                          cls_token="[CLS]", mask_token="[MASK]"),
        extra_tokens=("[UNUSED1]", "[UNUSED2]", "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"),
        appended_tokens=("<|endoftext|>", "[SEP]", "[CLS]", "[MASK]", "[UNUSED1]", "[UNUSED2]",
                         "<|startofpiece|>", "<|endofpiece|>", "[sMASK]", "[gMASK]"),
        truncation_side="left",
    ),
    "glm-english": _Flavour(  # <|startofpiece|> 50257 ... [sMASK] 50264; <|endoftext|> 50256 is bos/eos/unk/pad
        name="glm-english",
        named_tokens=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                          pad_token="<|endoftext|>", cls_token="[CLS]", mask_token="[MASK]", sep_token="[SEP]"),
        extra_tokens=("<|startofpiece|>", "<|endofpiece|>", "[UNK]", "[gMASK]", "[sMASK]"),
        appended_tokens=("<|startofpiece|>", "<|endofpiece|>", "[CLS]", "[MASK]", "[SEP]", "[UNK]", "[gMASK]", "[sMASK]"),
        keep_whitespace=frozenset({"<|endoftext|>"}),  # GPT2Tokenizer's own AddedToken: no stripping
        truncation_side="left", required_pieces=("<|endoftext|>",), backend="gpt2-bpe",
    ),
}
# fmt: on


def _special_token_kwargs(spec: _Flavour, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The init kwargs with the flavour's special tokens: its named tokens unless given, its extra tokens first
    (their order fixes ids in 4.x), then any saved ones (4.x's list, 5.x's list or {name: token})."""
    # THUDM's tokenizer_config.json carries custom *_token kwargs; 5.x would turn them into special tokens
    # (changing how the text "[gMASK]" splits), and we derive them from the flavour anyway.
    for key in ("gmask_token", "smask_token", "end_token", "sop_token", "eop_token"):
        kwargs.pop(key, None)
    for key, value in spec.named_tokens.items():
        kwargs.setdefault(key, value)
    saved_extra = kwargs.pop("extra_special_tokens", None) or []
    if isinstance(saved_extra, dict):  # 5.x's named form {name: token}; 4.57 writes {}
        saved_extra = list(saved_extra.values())
    saved = list(kwargs.pop("additional_special_tokens", None) or []) + list(saved_extra)
    extras: list[str | AddedToken] = []
    for token in [*spec.extra_tokens, *saved]:
        if str(token) not in [str(t) for t in extras]:
            extras.append(token)
    kwargs["additional_special_tokens"] = extras
    kwargs.setdefault("truncation_side", spec.truncation_side)
    if spec.chat_template is not None:
        kwargs.setdefault("chat_template", spec.chat_template)
    return kwargs


class GLMTokenizer(PreTrainedTokenizer):
    """Tokenizer for GLM models; see the module docstring. `vocab_file`: the SentencePiece model (ChatGLM-6B's
    `ice_text.model`, GLM's `cog-pretrain.model`), or for `"glm-english"` the BPE `vocab.json` (also
    `bpe_vocab_file`, with `merges_file`). ChatGLM only: `num_image_tokens` (ids below it are image tokens and text
    ids shift by it; THUDM's final config sets 0, older checkpoints 20000), `max_blank_length` (the longest space
    run encoded as one `<|blank_N|>`). `remove_space`, `do_lower_case`: THUDM's optional preprocessing (off).
    `clean_up_tokenization_spaces`: decode's default (False; converted THUDM/GLM folders store True)."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(
        self,
        vocab_file: str | None = None,
        flavour: str = "chatglm",
        num_image_tokens: int = 0,
        max_blank_length: int = 80,
        remove_space: bool = False,
        do_lower_case: bool = False,
        bpe_vocab_file: str | None = None,
        merges_file: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if flavour not in FLAVOURS:
            raise ValueError(f"flavour={flavour!r} is not supported; expected one of {sorted(FLAVOURS)}")
        spec = FLAVOURS[flavour]
        check_int(num_image_tokens, "num_image_tokens", 0)
        check_int(max_blank_length, "max_blank_length", 2)
        if flavour != "chatglm" and num_image_tokens:
            raise ValueError(f"num_image_tokens={num_image_tokens} is only meaningful for flavour='chatglm'")
        if not isinstance(clean_up_tokenization_spaces, bool):
            raise TypeError(
                f"clean_up_tokenization_spaces must be True or False, got {shown(clean_up_tokenization_spaces)}"
            )
        self.flavour, self._spec = flavour, spec
        self.num_image_tokens, self.max_blank_length = num_image_tokens, max_blank_length
        self.remove_space, self._lowercase = remove_space, do_lower_case
        # The vocabulary must exist before PreTrainedTokenizer.__init__, which calls get_vocab().
        if spec.backend == "gpt2-bpe":
            self._vocab = GPT2BPEVocab(bpe_vocab_file or vocab_file, merges_file)
            self.vocab_file, self.bpe_vocab_file, self.merges_file = None, self._vocab.vocab_file, merges_file
        else:
            self._vocab = SentencePieceVocab(vocab_file)
            self.vocab_file, self.bpe_vocab_file, self.merges_file = vocab_file, None, None
        self._check_pieces()
        self._text_offset = num_image_tokens  # id of SentencePiece piece 0
        sp_end = num_image_tokens + self._vocab.size
        self._appended = {tok: sp_end + i for i, tok in enumerate(spec.appended_tokens)}
        self._appended_by_id = {i: tok for tok, i in self._appended.items()}
        self._base_vocab: dict[str, int] | None = None
        self._blank_re = re.compile(r"<\|blank_(\d+)\|>")
        self._space_run_re = re.compile(rf" {{2,{max_blank_length}}}")
        super().__init__(
            flavour=flavour,
            num_image_tokens=num_image_tokens,
            max_blank_length=max_blank_length,
            remove_space=remove_space,
            do_lower_case=do_lower_case,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **_special_token_kwargs(spec, kwargs),
        )
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces  # whatever the base class did with it

    # ------------------------------------------------------------------ vocabulary
    def _check_pieces(self) -> None:
        spec = self._spec
        required = list(spec.required_pieces)
        if spec.encode_whitespace:
            required += [f"<|blank_{n}|>" for n in range(2, self.max_blank_length + 1)]
        missing = [p for p in required if not self._vocab.has_piece(p)]
        if missing:
            shown = ", ".join(missing[:12]) + (" ..." if len(missing) > 12 else "")
            raise ValueError(
                f"vocab_file={self._vocab.vocab_file!r} lacks pieces the {spec.name!r} flavour needs: {shown} "
                "(see the module docstring of tokenization_glm.py for how to build a compatible SentencePiece model)"
            )

    @property
    def vocab_size(self) -> int:
        return self._text_offset + self._vocab.size + len(self._appended)

    def _build_base_vocab(self) -> dict[str, int]:
        vocab = {f"<image_{i}>": i for i in range(self.num_image_tokens)}
        sp = self._vocab
        vocab.update({sp.id_to_piece(i): i + self._text_offset for i in range(sp.size)})
        vocab.update(self._appended)
        unk = self._spec.named_tokens.get("unk_token")
        if unk is not None and not sp.has_piece(unk) and unk not in self._appended:
            # GLM's "[UNK]" is an alias of the SentencePiece unknown piece: one key per id keeps
            # len(get_vocab()) == vocab_size (transformers numbers new tokens from it).
            del vocab[sp.id_to_piece(sp.unk_id)]
            vocab[unk] = sp.unk_id + self._text_offset
        return vocab

    def get_vocab(self) -> dict[str, int]:
        if self._base_vocab is None:
            self._base_vocab = self._build_base_vocab()
        vocab = dict(self._base_vocab)
        vocab.update(self._added_tokens()[0])
        return vocab

    def _added_tokens(self) -> tuple[dict[str, int], dict[int, AddedToken]]:
        """The added tokens as (text -> id, id -> AddedToken): transformers' private cache when it has one (4.57
        through 5.x), else its public properties (sorted copies); empty while the base class is being set up."""
        encoder, decoder = (getattr(self, name, None) for name in ADDED_TOKENS_ATTRIBUTES)
        if isinstance(encoder, dict) and isinstance(decoder, dict):
            return encoder, decoder
        try:
            return self.added_tokens_encoder, self.added_tokens_decoder
        except AttributeError:
            return {}, {}

    def _convert_token_to_id(self, token: str) -> int:
        if token in self._appended:
            return self._appended[token]
        if token.startswith("<image_") and token.endswith(">") and token[7:-1].isdigit():
            index = int(token[7:-1])
            if index < self.num_image_tokens:
                return index
        return self._vocab.piece_to_id(token) + self._text_offset

    def _convert_id_to_token(self, index: int) -> str:
        index = int(index)
        if 0 <= index < self._text_offset:
            return f"<image_{index}>"
        if self._text_offset <= index < self._text_offset + self._vocab.size:
            return self._vocab.id_to_piece(index - self._text_offset)
        if index in self._appended_by_id:
            return self._appended_by_id[index]
        raise ValueError(f"token_ids holds token id {index}, outside the vocabulary (ids 0..{self.vocab_size - 1})")

    # ------------------------------------------------------------------ text -> pieces -> ids
    def __call__(self, text: Any = None, text_pair: Any = None, *args, **kwargs) -> BatchEncoding:
        """`PreTrainedTokenizer.__call__` after checking `text` and `text_pair` (see `check_text`)."""
        if text is not None or kwargs.get("text_target") is None:
            check_text(text, "text")
        if text_pair is not None:
            check_text(text_pair, "text_pair")
        return super().__call__(text, text_pair, *args, **kwargs)

    def _preprocess(self, text: str) -> str:
        if self.remove_space:
            text = " ".join(text.strip().split())
        if self._lowercase:
            text = text.lower()
        if self._spec.encode_whitespace:
            text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
            # Longest runs first, as THUDM does: a run of 81 spaces is <|blank_80|> + " ".
            text = self._space_run_re.sub(lambda m: f"<|blank_{len(m.group(0))}|>", text)
        return text

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self._vocab.encode_pieces(self._preprocess(text))

    def tokenize(self, text: str, **kwargs) -> list[str]:
        """Split on added/special tokens, then SentencePiece each chunk (each chunk gets the dummy prefix).

        Whitespace next to a special token is stripped, as the references did under transformers 4.33
        (their special tokens were plain strings); other added tokens follow their lstrip/rstrip flags.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:  # SentencePiece would fail with an opaque C++ cast error
                raise ValueError(
                    f"text is not valid Unicode: {err.reason} at index {err.start} ({text[err.start]!r}); "
                    "decode the source bytes with errors='replace' first"
                ) from err
        split_special_tokens = kwargs.pop("split_special_tokens", getattr(self, "split_special_tokens", False))
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        added, added_by_id = self._added_tokens()
        if split_special_tokens or not added:
            return self._tokenize(text) if text else []
        splitter, specials = self._splitter()
        chunks = splitter.split(text)
        for i, chunk in enumerate(chunks):
            if chunk not in added:
                continue
            token = added_by_id.get(added[chunk])
            strip_left = chunk in specials or (isinstance(token, AddedToken) and token.lstrip)
            strip_right = chunk in specials or (isinstance(token, AddedToken) and token.rstrip)
            if strip_left and i > 0 and chunks[i - 1] not in added:
                chunks[i - 1] = chunks[i - 1].rstrip()
            if strip_right and i + 1 < len(chunks) and chunks[i + 1] not in added:
                chunks[i + 1] = chunks[i + 1].lstrip()
        tokens: list[str] = []
        for chunk in chunks:
            if chunk in added:
                tokens.append(chunk)
            elif chunk:
                tokens.extend(self._tokenize(chunk))
        return tokens

    def _splitter(self) -> tuple[re.Pattern, set[str]]:
        """A regex that splits text on the added tokens (longest first, like transformers' Trie, but
        in C), and the special tokens that strip whitespace; cached until the added tokens change."""
        added = self._added_tokens()[0]
        key = (frozenset(added), tuple(self.all_special_tokens))
        if getattr(self, "_splitter_cache", (None,))[0] != key:
            pattern = re.compile("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")")
            self._splitter_cache = (key, pattern, set(self.all_special_tokens) - self._spec.keep_whitespace)
        return self._splitter_cache[1], self._splitter_cache[2]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Same result as transformers' loop over tokens, with the SentencePiece lookups done in one C++ call."""
        if tokens is None or isinstance(tokens, str) or self.num_image_tokens:
            return super().convert_tokens_to_ids(tokens)
        tokens = list(tokens)
        added, appended, offset = self._added_tokens()[0], self._appended, self._text_offset
        piece_ids = self._vocab.pieces_to_ids(tokens)
        return [
            added[t] if t in added else appended[t] if t in appended else i + offset for t, i in zip(tokens, piece_ids)
        ]

    # ------------------------------------------------------------------ special tokens
    sop_token = property(lambda self: self._spec.sop_token)
    eop_token = property(lambda self: self._spec.eop_token)
    gmask_token = property(lambda self: self._spec.gmask_token)
    smask_token = property(lambda self: self._spec.smask_token)
    sop_token_id = property(lambda self: self.convert_tokens_to_ids(self._spec.sop_token))
    eop_token_id = property(lambda self: self.convert_tokens_to_ids(self._spec.eop_token))
    gmask_token_id = property(lambda self: self.convert_tokens_to_ids(self._spec.gmask_token))
    smask_token_id = property(lambda self: self.convert_tokens_to_ids(self._spec.smask_token))

    @property
    def mask_token_ids(self) -> list[int]:
        """Ids of the blank tokens [MASK], [sMASK], [gMASK]."""
        return [self.mask_token_id, self.smask_token_id, self.gmask_token_id]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """chatglm: `A [gMASK] <sop>` (pair: `A [gMASK] <sop> B <eop>`); glm-chinese: `[CLS] A <|endoftext|>`."""
        if self._spec.suffix_special_tokens:
            ids = token_ids_0 + [self.gmask_token_id, self.sop_token_id]
            if token_ids_1 is not None:
                ids = ids + token_ids_1 + [self.eop_token_id]
            return ids
        if token_ids_1 is not None:
            raise ValueError(f"text_pair is not supported by the {self.flavour!r} flavour (GLM encodes one text)")
        return [self.cls_token_id] + token_ids_0 + [self.eos_token_id]

    def get_special_tokens_mask(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None, already_has_special_tokens: bool = False
    ) -> list[int]:
        if already_has_special_tokens:
            special = set(self.all_special_ids) | {self.sop_token_id, self.eop_token_id, self.gmask_token_id}
            return [1 if i in special else 0 for i in token_ids_0]
        marked = self.build_inputs_with_special_tokens([-1] * len(token_ids_0), token_ids_1 and [-1] * len(token_ids_1))
        return [0 if i == -1 else 1 for i in marked]  # the framing the flavour adds, wherever it goes

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def apply_chat_template(self, conversation: Any, *args, **kwargs):
        """`PreTrainedTokenizer.apply_chat_template` after checking that `conversation` is a list of
        {"role": str, "content": str} messages (or a batch of such lists)."""
        check_conversation(conversation)
        return super().apply_chat_template(conversation, *args, **kwargs)

    # ------------------------------------------------------------------ ids -> pieces -> text
    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str | list[str]:
        """Ids (an int, a list, a tensor) to text; a batch (2-D) gives a list of texts, on every version.

        `clean_up_tokenization_spaces=None` takes the tokenizer's setting (see the module docstring)."""
        rows, batched = token_id_rows(token_ids, "token_ids")
        texts = [self._decode(row, skip_special_tokens, clean_up_tokenization_spaces, **kwargs) for row in rows]
        return texts if batched else texts[0]

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        """A batch of id sequences (a list of lists, or a 2-D tensor) to a list of texts."""
        rows, batched = token_id_rows(sequences, "sequences")
        if not batched:
            raise TypeError(
                f"sequences must be a batch (a list of id lists or a 2-D tensor), got {shown(sequences)}: "
                "decode() takes a single sequence"
            )
        return [self._decode(row, skip_special_tokens, **kwargs) for row in rows]

    def _postprocess(self, text: str) -> str:
        if self._spec.encode_whitespace:
            text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
            top = self.max_blank_length
            text = self._blank_re.sub(
                lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= top else m.group(0), text
            )
        return text

    def _is_piece_id(self, index: int) -> bool:
        return self._text_offset <= index < self._text_offset + self._vocab.size

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Pieces back to text; tokens that are not SentencePiece pieces are joined with spaces around them."""
        alone = [t in self._appended or t.startswith("<image_") or not self._vocab.has_piece(t) for t in tokens]
        return self._join(list(zip(tokens, alone)), " ")

    def _join(self, tokens: list[tuple[str, bool]], separator: str) -> str:
        """(token, stands alone) pairs to text: runs of pieces are decoded together, the others stand alone."""
        parts, run = [], []
        for token, alone in [*tokens, ("", True)]:
            if alone and run:
                parts.append(self._postprocess(self._vocab.decode_pieces(run)))
                run = []
            (parts if alone else run).append(token)
        return separator.join(parts[:-1])

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        spaces_between_special_tokens: bool = True,
        **kwargs,
    ) -> str:
        """Decode ids: runs of SentencePiece ids are decoded together; other tokens (GLM's added special
        tokens, user-added tokens) stand alone, joined with spaces when `spaces_between_special_tokens`.
        The chatglm flavour drops `<pad>` and image ids (control pieces decode to nothing), except that one
        special token alone decodes to its text."""
        token_ids = [token_ids] if is_id(token_ids) else list(token_ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        pad_id = self.pad_token_id if self._spec.drop_pad_on_decode else None
        tokens = []
        for index in token_ids:
            if not is_id(index):
                raise TypeError(f"token_ids must hold integer token ids, got {shown(index)}")
            if index in skip or index == pad_id or 0 <= index < self._text_offset:
                continue
            # SentencePiece ids decode together (GLM's "[UNK]" alias decodes as the <unk> piece, as the reference
            # did; ChatGLM's control pieces [MASK], <sop>, ... decode to nothing); other tokens stand alone.
            if self._is_piece_id(index):
                tokens.append((self._vocab.id_to_piece(index - self._text_offset), False))
            else:
                tokens.append((self._convert_id_to_token_with_added(index), True))
        text = self._join(tokens, " " if spaces_between_special_tokens else "")
        if not text and not skip_special_tokens and len(token_ids) == 1 and token_ids[0] in self._special_ids():
            return self._convert_id_to_token_with_added(token_ids[0])  # e.g. "<eop>" for a stop string
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return clean_up_spaces(text) if clean_up_tokenization_spaces else text

    def _special_ids(self) -> set[int]:
        spec = self._spec
        return set(self.convert_tokens_to_ids([*spec.named_tokens.values(), *spec.extra_tokens]))

    def _convert_id_to_token_with_added(self, index: int) -> str:
        token = self._added_tokens()[1].get(index)
        return str(token) if token is not None else self._convert_id_to_token(index)

    @staticmethod
    def clean_up_tokenization(text: str) -> str:
        """transformers' hook, answered with this module's own rules (some releases lack the base-class one)."""
        return clean_up_spaces(text)

    # ------------------------------------------------------------------ blank infilling
    def build_inputs_for_generation(
        self,
        model_input: dict[str, Any],
        max_gen_length: int = 512,
        targets: str | list[str] | None = None,
        padding: bool = False,
    ) -> BatchEncoding:
        """Inputs for generating (or learning) the span of the first blank of each row.

        `model_input`: what the tokenizer returned (`input_ids`, optional `attention_mask`; tensors or lists, any
        padding side); each row needs a blank ([MASK], [sMASK] or [gMASK]). `<sop>` is appended (unless the row ends
        with it, as chatglm encodings do) and the rows are LEFT-padded again: pass `input_ids` and `attention_mask`
        to `generate()`. With `targets` (one string per row) each target + `<eop>` (cut to `max_gen_length`) follows
        `<sop>`, and `labels` are returned: -100 on padding, context and `<sop>`, else the ids, in the causal-LM
        convention (labels[i] == input_ids[i]; GLM-10B's reference labels were shifted once more: off by one).
        `padding=True` pads every row to context + 1 + `max_gen_length` tokens."""
        import torch

        check_int(max_gen_length, "max_gen_length", 1)
        if not isinstance(padding, bool):
            raise TypeError(f"padding must be True or False, got {shown(padding)}")
        sop, eop, pad = self.sop_token_id, self.eop_token_id, self.pad_token_id
        contexts = [real if real[-1] == sop else real + [sop] for real, _ in self._real_rows_with_blank(model_input)]
        spans: list[list[int]] = [[] for _ in contexts]
        if targets is not None:
            targets = [targets] if isinstance(targets, str) else targets
            if not is_strs(targets):
                raise TypeError(f"targets must be a str or a list of str (one per row), got {shown(targets)}")
            if len(targets) != len(contexts):
                raise ValueError(f"targets has {len(targets)} entries for {len(contexts)} rows of model_input")
            spans = [(self.encode(t, add_special_tokens=False) + [eop])[:max_gen_length] for t in targets]
        seqs = [c + s for c, s in zip(contexts, spans)]
        total = max(map(len, seqs))
        if padding and targets is not None:
            total = max(map(len, contexts)) + max_gen_length
        batch: dict[str, list[list[int]]] = {
            "input_ids": [[pad] * (total - len(s)) + s for s in seqs],
            "attention_mask": [[0] * (total - len(s)) + [1] * len(s) for s in seqs],
        }
        if targets is not None:
            batch["labels"] = [[-100] * (total - len(s)) + s for s in spans]
        input_ids = model_input["input_ids"]
        if not torch.is_tensor(input_ids):
            return BatchEncoding(batch)
        return BatchEncoding({k: torch.tensor(v, dtype=torch.long, device=input_ids.device) for k, v in batch.items()})

    def build_inputs_for_multiple_choice(
        self, model_input: dict[str, Any], choices: list[list[str]], max_length: int | None = None
    ) -> BatchEncoding:
        """Inputs for `GLMForMultipleChoice`: every answer choice written into the blank, in one sequence.

        As GLM's tokenizer does it: per example (a row of `model_input`, its padding dropped) the context is
        followed, for each choice, by the start-of-piece token and the choice's tokens but its last, so that
        the prediction after `<sop>` + choice[:i] scores choice[i]. The choice tokens take the position of the
        context's blank (its first [MASK], [sMASK] or [gMASK]; GLM required a [MASK]) and block positions
        1, 2, ...; each choice sees the context and, causally, itself; the context sees only itself.

        `choices`: one list of answer strings per example, the same number for each. Returns tensors for the model:
        `input_ids` [B, L], `position_ids` [B, 2, L], `attention_mask` [B, 1, L, L] (1 = attend), `choice_ids`
        (padded with -100) and `choice_indices` [B, C, T]; rows right-padded with the pad token, positions repeating
        the last one. `max_length` is ignored, as in GLM."""
        import torch

        examples = self._real_rows_with_blank(model_input)
        if not isinstance(choices, (list, tuple)) or not all(is_strs(c) for c in choices):
            raise TypeError(
                f"choices must be a list holding one list of answer strings per example, got {shown(choices)}"
            )
        if len(choices) != len(examples):
            raise ValueError(
                f"choices must hold one list of answer strings per example ({len(examples)}), got {len(choices)}"
            )
        if len({len(c) for c in choices}) != 1 or not choices[0]:
            raise ValueError("every example needs the same (non-zero) number of choices")
        samples = [self._choice_sample(context, blank, row) for (context, blank), row in zip(examples, choices)]
        width = max(len(s[0]) for s in samples)
        span_width = max(len(ids) for s in samples for ids in s[4])
        input_ids, position_ids, masks, choice_ids, choice_indices = [], [], [], [], []
        for tokens, positions, blocks, mask, ids, index in samples:
            extra = width - len(tokens)
            input_ids.append(tokens + [self.pad_token_id] * extra)
            position_ids.append([positions + positions[-1:] * extra, blocks + blocks[-1:] * extra])
            masks.append(torch.nn.functional.pad(mask, (0, extra, 0, extra)))
            choice_ids.append([i + [-100] * (span_width - len(i)) for i in ids])
            choice_indices.append([i + [0] * (span_width - len(i)) for i in index])
        return BatchEncoding(
            {
                "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "position_ids": torch.tensor(position_ids, dtype=torch.long),
                "attention_mask": torch.stack(masks)[:, None],
                "choice_ids": torch.tensor(choice_ids, dtype=torch.long),
                "choice_indices": torch.tensor(choice_indices, dtype=torch.long),
            }
        )

    def _choice_sample(self, context: list[int], blank: int, choices: list[str]) -> tuple:
        """One example of `build_inputs_for_multiple_choice`: (tokens, positions, block positions, mask [L, L],
        the ids of each choice, the positions that predict them)."""
        import torch

        tokens, positions, blocks = list(context), list(range(len(context))), [0] * len(context)
        spans, choice_ids, choice_indices = [], [], []
        for choice in choices:
            ids = self.encode(choice, add_special_tokens=False)
            if not ids:
                raise ValueError(f"choice {choice!r} encodes to no tokens")
            spans.append((len(tokens), len(ids)))
            choice_ids.append(ids)
            choice_indices.append(list(range(len(tokens), len(tokens) + len(ids))))
            tokens += [self.sop_token_id] + ids[:-1]
            positions += [blank] * len(ids)
            blocks += list(range(1, len(ids) + 1))
        mask = torch.zeros(len(tokens), len(tokens), dtype=torch.long)
        mask[: len(context), : len(context)] = 1  # the context reads itself (bidirectionally)
        for start, length in spans:  # each choice: the context, then itself causally
            mask[start : start + length, : len(context)] = 1
            mask[start : start + length, start : start + length] = torch.ones(length, length).tril()
        return tokens, positions, blocks, mask, choice_ids, choice_indices

    def _real_rows_with_blank(self, model_input: dict[str, Any]) -> list[tuple[list[int], int]]:
        """The rows of a tokenizer output without their padding, each with the index of its first blank token.
        An attention mask that disagrees with the ids in rows or length, or holds values other than 0/1, is an
        error: dropping what does not line up would silently change the prompt."""
        if not isinstance(model_input, Mapping) or model_input.get("input_ids") is None:
            raise TypeError(
                f"model_input must be what the tokenizer returned (with 'input_ids'), got {shown(model_input)}"
            )
        rows, _ = token_id_rows(model_input["input_ids"], "model_input['input_ids']")
        mask = model_input.get("attention_mask")
        if mask is None:
            masks = [[1] * len(r) for r in rows]
        else:  # 0/1 ints or bools
            masks = token_id_rows(mask, "model_input['attention_mask']", lambda v: isinstance(v, int))[0]
        if len(masks) != len(rows) or any(len(m) != len(r) for m, r in zip(masks, rows)):
            shapes = [len(r) for r in rows], [len(m) for m in masks]
            raise ValueError(
                f"model_input['attention_mask'] (row lengths {shapes[1]}) does not match input_ids ({shapes[0]})"
            )
        if any(v not in (0, 1) for m in masks for v in m):
            raise ValueError("model_input['attention_mask'] must hold only 0 (padding) and 1 (token)")
        blanks, result = set(self.mask_token_ids), []
        for i, (row, row_mask) in enumerate(zip(rows, masks)):
            real = [t for t, m in zip(row, row_mask) if m]
            blank = next((j for j, t in enumerate(real) if t in blanks), None)
            if blank is None:
                raise ValueError(
                    f"model_input['input_ids'] row {i} has no blank token: expected one of "
                    f"{self.mask_token}, {self.smask_token}, {self.gmask_token} (ids {sorted(blanks)})"
                )
            result.append((real, blank))
        return result

    # ------------------------------------------------------------------ saving
    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        if not os.path.isdir(save_directory):
            raise ValueError(f"save_directory={save_directory!r} is not a directory")
        return self._vocab.save(save_directory, filename_prefix + "-" if filename_prefix else "")

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedTokenizer.from_pretrained`, surfacing our own error for a damaged vocabulary file.

        transformers 4.x handles an error of `__init__` with `except import_protobuf_decode_error():`, whose evaluation
        raises an unrelated "requires the protobuf library" ImportError when protobuf is not installed; the real
        error (e.g. "vocab_file=... is not a SentencePiece model") is then only its context.
        """
        try:
            return super().from_pretrained(*args, **kwargs)
        except ImportError as err:
            if "protobuf" in str(err) and isinstance(err.__context__, (ValueError, TypeError)):
                raise err.__context__ from None
            raise

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs) -> tuple[str, ...]:
        """Save, then rewrite what transformers 5.x writes in a form 4.x reads too.

        5.x writes the extra special tokens as a list under `extra_special_tokens`, which 4.x cannot
        load; under `additional_special_tokens` both versions read them.
        """
        files = super().save_pretrained(save_directory, *args, **kwargs)
        config_file = os.path.join(os.fspath(save_directory), "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
            extras = config.get("extra_special_tokens")
            if isinstance(extras, list):
                config.pop("extra_special_tokens")
                config["additional_special_tokens"] = extras
                with open(config_file, "w", encoding="utf-8") as f:
                    f.write(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        return files
