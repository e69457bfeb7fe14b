"""Ambiguous or wrong input to the GLM tokenizer's public entries is refused with an error naming the argument.

Same table style as tests/test_robustness_inputs.py (id, a callable making the bad call, the exception type, a regex
the message must match); those rows cover the tokenizer's first cases (None text, bytes, ids past the vocabulary,
max_gen_length 0), these cover what used to be accepted and silently guessed at:
- `decode(None)`, ids of the wrong type or nesting (a float, a bool, a str, a triply nested list);
- text that is not text: an int or a list of ints (5.x takes them as ids), a triply nested list (5.x takes it as a
  batch), None inside a batch;
- `build_inputs_for_generation` with an attention mask that disagrees with the ids in rows or length (rows or
  tokens used to be dropped silently), a negative or non-int `max_gen_length`, targets that are not strings;
- `build_inputs_for_multiple_choice` with a flat list of answer strings (each string used to be taken character by
  character as the choices of one example);
- `apply_chat_template` with a conversation that is not a list of {"role": str, "content": str} messages.
Then property tests feed random wrong types to each public entry and check the error type and the argument's name.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import TOKENIZER_FLAVOURS, tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st


def tok():
    return tokenizer("chatglm")


def enc(*texts: str):
    return tok()(list(texts), padding=True)


def gen(model_input, **kwargs):
    return lambda: tok().build_inputs_for_generation(model_input, **kwargs)


def two_rows():
    return enc("北京是[MASK]的首都", "a [MASK] b c d")


ROWS = [
    ("decode None", lambda: tok().decode(None), TypeError, r"token_ids must hold integer token ids.*NoneType"),
    ("decode float", lambda: tok().decode(1.5), TypeError, r"token_ids .*float"),
    ("decode bool ids", lambda: tok().decode([True, 5]), TypeError, r"token_ids .*bool"),
    ("decode str", lambda: tok().decode("hello"), TypeError, r"token_ids .*str"),
    ("decode 3-D", lambda: tok().decode([[[5, 6]]]), TypeError, r"token_ids must hold integer"),
    ("decode float tensor", lambda: tok().decode(torch.tensor([5.0])), TypeError, r"token_ids .*float"),
    ("batch_decode None", lambda: tok().batch_decode(None), TypeError, r"sequences"),
    ("batch_decode flat ids", lambda: tok().batch_decode([5, 6]), TypeError, r"sequences must be a batch"),
    ("__call__ int", lambda: tok()(5), TypeError, r"text must be a str.*int 5"),
    ("__call__ list of ints", lambda: tok()([5, 6]), TypeError, r"text must be a str.*list"),
    ("__call__ 3-deep list", lambda: tok()([[["a"]]]), TypeError, r"text must be a str"),
    ("__call__ None in batch", lambda: tok()(["a", None]), TypeError, r"text must be a str"),
    ("__call__ int pair", lambda: tok()("a", 5), TypeError, r"text_pair must be a str"),
    ("__call__ bytes", lambda: tok()(b"abc"), TypeError, r"text must be a str.*bytes"),
    ("generation mask rows", gen({**two_rows(), "attention_mask": two_rows()["attention_mask"][:1]}), ValueError,
     r"model_input\['attention_mask'\].*does not match input_ids"),
    ("generation mask length", gen({**two_rows(), "attention_mask": [m[1:] for m in two_rows()["attention_mask"]]}),
     ValueError, r"model_input\['attention_mask'\].*does not match"),
    ("generation mask values", gen({**two_rows(), "attention_mask": [[2] * len(r) for r in two_rows()["input_ids"]]}),
     ValueError, r"model_input\['attention_mask'\] must hold only 0"),
    ("generation negative max_gen_length", gen(two_rows(), max_gen_length=-3), ValueError, r"max_gen_length=-3"),
    ("generation float max_gen_length", gen(two_rows(), max_gen_length=8.0), TypeError, r"max_gen_length must be an int"),
    ("generation bool max_gen_length", gen(two_rows(), max_gen_length=True), TypeError, r"max_gen_length"),
    ("generation targets int", gen(two_rows(), targets=5), TypeError, r"targets must be a str"),
    ("generation targets None inside", gen(two_rows(), targets=["a", None]), TypeError, r"targets"),
    ("generation model_input list", gen([[5, 6]]), TypeError, r"model_input must be what the tokenizer returned"),
    ("generation float ids", gen({"input_ids": [[5.0, 6.0]]}), TypeError, r"model_input\['input_ids'\]"),
    ("generation padding str", gen(two_rows(), padding="max_length"), TypeError, r"padding must be True or False"),
    ("multiple choice flat strings", lambda: tok().build_inputs_for_multiple_choice(two_rows(), ["yes", "no"]),
     TypeError, r"choices must be a list holding one list of answer strings per example"),
    ("multiple choice row count", lambda: tok().build_inputs_for_multiple_choice(two_rows(), [["yes", "no"]]),
     ValueError, r"choices must hold one list .* \(2\), got 1"),
    ("chat template str", lambda: tok().apply_chat_template("hello", tokenize=False), TypeError, r"conversation must be"),
    ("chat template None", lambda: tok().apply_chat_template(None, tokenize=False), TypeError, r"conversation"),
    ("chat template list of str", lambda: tok().apply_chat_template(["hi"], tokenize=False), TypeError,
     r"conversation\[0\] must be a dict"),
    ("chat template int content", lambda: tok().apply_chat_template([{"role": "user", "content": 5}], tokenize=False),
     TypeError, r"conversation\[0\] needs a str 'role' and a str 'content'"),
    ("init clean_up setting", lambda: type(tok())(tok().vocab_file, clean_up_tokenization_spaces="yes"), TypeError,
     r"clean_up_tokenization_spaces must be True or False"),
]  # fmt: skip


def test_the_table_has_at_least_15_tokenizer_cases():
    assert len(ROWS) >= 15 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("case,call,error,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_raises_a_clear_error(case, call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_the_shapes_that_stay_accepted_are_unchanged():
    """The refusals above leave the valid forms alone: batches, pairs, pre-split words, tensors, one int."""
    t = tok()
    assert t(["a", "b"])["input_ids"] == [t("a")["input_ids"], t("b")["input_ids"]]
    assert t([["a", "b"]])["input_ids"] == [t("a", "b")["input_ids"]]  # a batch of (text, pair)
    assert t(["a", "b"], is_split_into_words=True)["input_ids"] == t(["a", "b"], is_split_into_words=True)["input_ids"]
    ids = t("你好")["input_ids"]
    assert t.decode(torch.tensor(ids)) == t.decode(ids) == t.decode(tuple(ids))
    assert t.decode([ids, ids]) == t.batch_decode(torch.tensor([ids, ids])) == [t.decode(ids)] * 2
    assert t.decode(ids[0]) == t.decode([ids[0]])
    mask_bool = {
        "input_ids": torch.tensor([ids[:1] + [t.mask_token_id]]),
        "attention_mask": torch.tensor([[1, 1]]).bool(),
    }
    assert t.build_inputs_for_generation(mask_bool)["input_ids"].shape == (1, 3)


# ----------------------------------------------------------------------------------------------- property tests
NOT_TEXT = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.binary(), st.none(),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.lists(st.lists(st.lists(st.text(max_size=3), min_size=1, max_size=2), min_size=1, max_size=2), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)  # fmt: skip
NOT_IDS = st.one_of(
    st.none(), st.floats(), st.booleans(), st.text(min_size=1, max_size=4), st.binary(min_size=1),
    st.lists(st.one_of(st.floats(), st.text(min_size=1, max_size=3), st.none(), st.booleans()), min_size=1, max_size=3),
    st.lists(st.lists(st.lists(st.integers(0, 99), min_size=1, max_size=2), min_size=1, max_size=2), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
)  # fmt: skip
NOT_CHAT = st.one_of(
    st.integers(), st.none(), st.text(max_size=5), st.binary(),
    st.lists(st.one_of(st.integers(), st.text(max_size=3), st.none()), min_size=1, max_size=3),
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                    "content": st.one_of(st.integers(), st.none(), st.lists(st.text(max_size=2)))}),
             min_size=1, max_size=2),
)  # fmt: skip
PROPERTY = settings(max_examples=25, deadline=None)


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@PROPERTY
@given(text=NOT_TEXT)
def test_call_refuses_what_is_not_text(flavour, text):
    with pytest.raises(TypeError, match=r"^text must be a str"):
        tokenizer(flavour)(text)


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@PROPERTY
@given(ids=NOT_IDS)
def test_decode_and_batch_decode_refuse_what_is_not_ids(flavour, ids):
    t = tokenizer(flavour)
    with pytest.raises(TypeError, match=r"^token_ids must hold integer token ids"):
        t.decode(ids)
    with pytest.raises(TypeError, match=r"^sequences must"):
        t.batch_decode(ids)


NOT_COUNT = st.one_of(st.floats(), st.booleans(), st.text(max_size=3), st.none(), st.lists(st.integers(), max_size=2))
NOT_TARGETS = st.one_of(
    st.integers(), st.floats(), st.binary(), st.lists(st.one_of(st.integers(), st.none(), st.binary()), min_size=1)
)
NOT_CHOICES = st.one_of(NOT_TEXT, st.lists(st.text(max_size=3), min_size=1, max_size=3), st.text(max_size=3))
INFILLING = {  # argument -> (strategy of wrong values, call with it)
    "model_input": (NOT_TEXT, lambda t, good, bad: t.build_inputs_for_generation(bad)),
    "max_gen_length": (NOT_COUNT, lambda t, good, bad: t.build_inputs_for_generation(good, max_gen_length=bad)),
    "targets": (NOT_TARGETS, lambda t, good, bad: t.build_inputs_for_generation(good, targets=bad)),
    "choices": (NOT_CHOICES, lambda t, good, bad: t.build_inputs_for_multiple_choice(good, bad)),
}


@pytest.mark.parametrize("flavour", TOKENIZER_FLAVOURS)
@pytest.mark.parametrize("argument", sorted(INFILLING))
@PROPERTY
@given(data=st.data())
def test_blank_infilling_entries_refuse_wrong_types(flavour, argument, data):
    t = tokenizer(flavour)
    good = t(f"a {t.mask_token} b", return_tensors="pt")
    strategy, call = INFILLING[argument]
    bad = data.draw(strategy)
    with pytest.raises(TypeError, match=rf"^{argument}"):
        call(t, good, bad)


@PROPERTY
@given(conversation=NOT_CHAT)
def test_apply_chat_template_refuses_what_is_not_a_conversation(conversation):
    with pytest.raises(TypeError, match=r"^conversation"):
        tokenizer("chatglm").apply_chat_template(conversation, tokenize=False)
