"""Property-based fuzzing of the GLM tokenizer (all three flavours, on the reference vocabularies).

Random unicode from every category (control and format characters, private use, unassigned code points, lone
surrogates), the special-token strings scattered through it, whitespace runs and huge inputs. Properties, each a
simple statement independent of the implementation:
- text that is valid Unicode always encodes, to ids inside the vocabulary, deterministically, and decodes to a str;
  a lone surrogate (not encodable as UTF-8) is a ValueError naming the text, never a crash inside SentencePiece;
- every occurrence of a special-token string in the text becomes exactly one id of that token, and no other text
  produces that id;
- a padded batch holds each text's own ids (left padding), whatever the texts;
- huge inputs (hundreds of thousands of characters, or thousands of special tokens) encode in time linear in
  their length.
(tests/test_tokenizer.py checks ids against the reference tokenizers and the decode(encode(x)) == x round trip.)
"""

from __future__ import annotations

import time

import pytest
from fixtures import TOKENIZER_FLAVOURS, tokenizer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ANY_CHARACTER = st.characters(codec=None, categories=None, exclude_categories=("Cs",))  # every category but Cs


def specials(tok) -> list[str]:
    return [tok.mask_token, tok.gmask_token, tok.smask_token, tok.sop_token, tok.eop_token]


def text_with_specials(flavour: str, alphabet=ANY_CHARACTER):
    tok = tokenizer(flavour)
    piece = st.one_of(
        st.text(alphabet, max_size=8),
        st.sampled_from(specials(tok)),
        st.integers(1, 90).map(lambda n: " " * n),
        st.sampled_from(["\n", "\t", "\r\n", "\x00", "\u200b", "\ufeff", "\u2581"]),
    )
    return st.lists(piece, max_size=12).map("".join)


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@FUZZ
@given(data=st.data())
def test_any_valid_text_encodes_inside_the_vocabulary(flavour, data):
    tok = tokenizer(flavour)
    text = data.draw(text_with_specials(flavour))
    ids = tok(text)["input_ids"]
    assert all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
    assert tok(text)["input_ids"] == ids  # deterministic
    assert isinstance(tok.decode(ids), str) and isinstance(tok.decode(ids, skip_special_tokens=True), str)

    plain = tok.encode(text, add_special_tokens=False)
    for token in specials(tok):
        token_id = tok.convert_tokens_to_ids(token)
        assert plain.count(token_id) == text.count(token), f"{token!r} in {text!r}"


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@settings(max_examples=15, deadline=None)
@given(before=st.text(max_size=5), after=st.text(max_size=5), surrogate=st.integers(0xD800, 0xDFFF))
def test_a_lone_surrogate_is_a_clear_error(flavour, before, after, surrogate):
    text = before + chr(surrogate) + after
    with pytest.raises(ValueError, match=rf"text is not valid Unicode.*index {len(before)}"):
        tokenizer(flavour)(text)


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@settings(max_examples=15, deadline=None)
@given(texts=st.lists(st.text(ANY_CHARACTER, max_size=12), min_size=1, max_size=4))
def test_a_padded_batch_holds_each_texts_own_ids(flavour, texts):
    tok = tokenizer(flavour)
    batch = tok(texts, padding=True)
    for ids, mask, text in zip(batch["input_ids"], batch["attention_mask"], texts):
        assert [i for i, m in zip(ids, mask) if m] == tok(text)["input_ids"]
        assert mask == sorted(mask)  # zeros (padding) first


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@settings(max_examples=10, deadline=None)
@given(text=st.text(st.characters(categories=("Cc", "Cf", "Zs", "Zl", "Zp", "Co")), min_size=1, max_size=40))
def test_control_and_format_characters_never_break_encoding(flavour, text):
    tok = tokenizer(flavour)
    ids = tok(text)["input_ids"]
    assert all(0 <= i < len(tok) for i in ids)
    assert isinstance(tok.decode(ids), str)


@pytest.mark.slow
@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
def test_huge_inputs_encode_in_linear_time(flavour):
    tok = tokenizer(flavour)
    unit = "北京是中国的首都 the capital [MASK] of\tcode  x = 1\n" + tok.gmask_token

    def encode_seconds(repeats: int) -> tuple[float, list[int]]:
        start = time.perf_counter()
        ids = tok.encode(unit * repeats, add_special_tokens=False)
        return time.perf_counter() - start, ids

    small, small_ids = encode_seconds(300)
    big, big_ids = encode_seconds(6000)  # ~290,000 characters
    assert big_ids == small_ids * 20  # every unit encodes alike: nothing lost or merged across a huge input
    assert big < max(60 * small, 5.0), f"20x the text took {big / small:.0f}x the time"
    start = time.perf_counter()
    ids = tok.encode(tok.gmask_token * 20000, add_special_tokens=False)  # the special-token splitter at scale
    assert ids == [tok.gmask_token_id] * 20000 and time.perf_counter() - start < 10.0
