"""The vocabulary back-ends of `GLMTokenizer` (tokenization_glm.py): a vocabulary file as pieces <-> ids and
text <-> pieces, with no knowledge of GLM's special tokens, flavours or transformers' tokenizer classes.

- `SentencePieceVocab`: a SentencePiece model (ChatGLM-6B's `ice_text.model`, GLM-Chinese's `cog-pretrain.model`).
- `GPT2BPEVocab`: GPT-2's byte-level BPE (`vocab.json` + `merges.txt`: GLM-English), run by `tokenizers`.

The interface `GLMTokenizer` uses (a new back-end provides the same): `size` and `unk_id`, `vocab_file`,
`has_piece`, `encode_pieces`, `piece_to_id`, `pieces_to_ids`, `id_to_piece`, `decode_pieces`, `save(directory,
prefix)` returning the paths written, and pickling. Ids here are the file's own (0-based); the tokenizer adds its
offsets (ChatGLM's image tokens) and appended special tokens on top.

Named `tokenization_glm_vocab` so it sorts beside tokenization_glm.py and says what it holds: the vocabulary layer
only (the argument checks live in tokenization_glm_checks.py). A sibling module of the tokenizer: transformers'
remote-code loader and `save_pretrained` copy it with tokenization_glm.py (it is imported relatively).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

# SentencePiece flavours use `vocab_file`; the GPT-2 BPE flavour `bpe_vocab_file` and `merges_file`.
VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model", "bpe_vocab_file": "vocab.json", "merges_file": "merges.txt"}


class SentencePieceVocab:
    """A SentencePiece model as a vocabulary backend: pieces <-> ids, text <-> pieces."""

    def __init__(self, vocab_file: str):
        if not isinstance(vocab_file, (str, os.PathLike)) or not os.path.isfile(vocab_file):
            raise ValueError(
                f"vocab_file={vocab_file!r} is not a file: expected the path of a SentencePiece model "
                f"(saved as {VOCAB_FILES_NAMES['vocab_file']})"
            )
        self.vocab_file = os.fspath(vocab_file)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.vocab_file)
        except (RuntimeError, OSError) as err:
            raise ValueError(f"vocab_file={self.vocab_file!r} is not a SentencePiece model ({err})") from err
        self.size = self.sp.get_piece_size()
        self.unk_id = self.sp.unk_id()

    def has_piece(self, piece: str) -> bool:
        return self.sp.piece_to_id(piece) != self.unk_id or piece == self.sp.id_to_piece(self.unk_id)

    def encode_pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def pieces_to_ids(self, pieces: list[str]) -> list[int]:
        return self.sp.piece_to_id(pieces) if pieces else []  # one C++ call

    def id_to_piece(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def decode_pieces(self, pieces: list[str]) -> str:
        return self.sp.decode_pieces(pieces)

    def save(self, directory: str, prefix: str) -> tuple[str, ...]:
        path = os.path.join(directory, prefix + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.isfile(self.vocab_file):
            if os.path.abspath(self.vocab_file) != os.path.abspath(path):
                shutil.copyfile(self.vocab_file, path)
        else:  # the source file went away (e.g. a temporary download): write the loaded model
            with open(path, "wb") as f:
                f.write(self.sp.serialized_model_proto())
        return (path,)

    # Pickling: SentencePieceProcessor is not picklable; keep the serialized model instead.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["sp"] = self.sp.serialized_model_proto()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.sp = spm.SentencePieceProcessor()
        self.sp.LoadFromSerializedProto(state["sp"])


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (byte-level BPE alphabet):
    printable Latin-1 bytes map to themselves, the others to code points from 256 upwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class GPT2BPEVocab:
    """GPT-2's byte-level BPE (`vocab.json` + `merges.txt`) as a vocabulary backend.

    Tokenising runs in the `tokenizers` library (GPT-2's pre-tokenisation regex and byte-level alphabet, the
    same pieces as transformers' slow GPT2Tokenizer); decoding maps the pieces back to bytes here.
    """

    def __init__(self, vocab_file: str | None, merges_file: str | None):
        for name, path in (("vocab.json", vocab_file), ("merges.txt", merges_file)):
            if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
                raise ValueError(
                    f"the GPT-2 BPE flavour needs its {name} file (GLM's gpt2-vocab.json / gpt2-merges.txt), got "
                    f"{path!r}: pass bpe_vocab_file= (or vocab_file=) and merges_file="
                )
        self.vocab_file, self.merges_file = os.fspath(vocab_file), os.fspath(merges_file)
        try:
            with open(self.vocab_file, encoding="utf-8") as f:
                encoder = json.load(f)
            with open(self.merges_file, encoding="utf-8") as f:
                merges = [tuple(line.split()) for line in f.read().split("\n") if line and not line.startswith("#")]
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read the GPT-2 BPE files {self.vocab_file}, {self.merges_file}: {err}") from err
        if not isinstance(encoder, dict) or any(len(m) != 2 for m in merges):
            raise ValueError(f"{self.vocab_file} / {self.merges_file} are not a GPT-2 vocabulary and merge list")
        self._build(encoder, merges)

    def _build(self, encoder: dict[str, int], merges: list[tuple[str, str]]) -> None:
        self.encoder, self.merges = encoder, merges
        self.decoder = {i: piece for piece, i in encoder.items()}
        self.size = len(encoder)
        self.unk_id = encoder.get("<|endoftext|>", 0)  # GPT2Tokenizer's unk_token
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        tokenizer = Tokenizer(models.BPE(vocab=encoder, merges=merges))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        self.tokenizer = tokenizer

    def has_piece(self, piece: str) -> bool:
        return piece in self.encoder

    def encode_pieces(self, text: str) -> list[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens if text else []

    def piece_to_id(self, piece: str) -> int:
        return self.encoder.get(piece, self.unk_id)

    def pieces_to_ids(self, pieces: list[str]) -> list[int]:
        return [self.encoder.get(p, self.unk_id) for p in pieces]

    def id_to_piece(self, index: int) -> str:
        return self.decoder[index]

    def decode_pieces(self, pieces: list[str]) -> str:
        data = bytearray(self.byte_decoder[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace")  # GPT2Tokenizer's default errors="replace"

    def save(self, directory: str, prefix: str) -> tuple[str, ...]:
        vocab_path = os.path.join(directory, prefix + VOCAB_FILES_NAMES["bpe_vocab_file"])
        merges_path = os.path.join(directory, prefix + VOCAB_FILES_NAMES["merges_file"])
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.encoder, ensure_ascii=False) + "\n")
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges))
        return vocab_path, merges_path

    # Pickling: keep the vocabulary and merges, rebuild the `tokenizers` object.
    def __getstate__(self) -> dict[str, Any]:
        return {"vocab_file": self.vocab_file, "merges_file": self.merges_file, "encoder": self.encoder,
                "merges": self.merges}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.vocab_file, self.merges_file = state["vocab_file"], state["merges_file"]
        self._build(state["encoder"], [tuple(m) for m in state["merges"]])
