"""Property tests: a wrong type, dtype or shape in any of a model's main arguments gives a TypeError / ValueError
whose message names that argument, in every family, through forward() and generate().

Each example takes a valid call (the tiny models of tests/fixtures) and spoils one argument with a value that is
wrong under every reading of it (GLM also accepts an int, a 1-D and a 4-D attention_mask, so masks are spoiled only
by their type): a Python list / tuple / str / float / dict where a tensor is expected, token ids or labels of a
dtype nn.Embedding cannot index with (floats, bool, int8/16, uint8, complex), or ids with 0, 1 or 3 dimensions.
tests/test_robustness_inputs.py pins the exact messages; this file looks for inputs that slip past the checks.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import BART_IDS, GLM_PROMPT, SPARSE_IDS, bart_model, glm_model, sparse_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BAD_INDEX_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.bool,
    torch.int8,
    torch.int16,
    torch.uint8,
    torch.complex64,
)
GREEDY = dict(max_new_tokens=1, do_sample=False)

FAMILIES = {
    "glm[chatglm]": (lambda: glm_model("chatglm"), torch.tensor([GLM_PROMPT])),
    "glm[glm]": (lambda: glm_model("glm"), torch.tensor([GLM_PROMPT])),
    "sparse": (sparse_model, SPARSE_IDS),
    "bart": (bart_model, BART_IDS),
}


def not_a_tensor(ids: torch.Tensor):
    """Values of the wrong Python type for a tensor argument (built from `ids` where a look-alike helps)."""
    return st.sampled_from([ids.tolist(), tuple(ids[0].tolist()), "1 2 3", 1.5, {"input_ids": ids}])


def spoiled_ids(ids: torch.Tensor):
    """Token ids spoiled by type, dtype or number of dimensions (never a valid [batch, seq] integer tensor)."""
    wrong_dtype = st.sampled_from(BAD_INDEX_DTYPES).map(lambda dtype: ids.to(dtype))
    wrong_dims = st.sampled_from([ids[0, 0], ids[0], ids[None]])
    return st.one_of(not_a_tensor(ids), wrong_dtype, wrong_dims)


def _call(family: str, argument: str, value, generate: bool):
    build, ids = FAMILIES[family]
    model = build()
    kwargs = {"input_ids": ids}
    if family == "bart" and not generate:
        kwargs["decoder_input_ids"] = ids
    kwargs[argument] = value
    if generate:
        inputs = kwargs.pop("input_ids")
        return model.generate(inputs, **kwargs, **GREEDY)
    return model(**kwargs)


def _expect_named_error(family: str, argument: str, value, generate: bool) -> None:
    with pytest.raises((TypeError, ValueError)) as caught:
        _call(family, argument, value, generate)
    message = str(caught.value)
    assert argument in message, f"{family} {argument}={value!r}: the error does not name {argument}: {message}"


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data())
def test_forward_names_the_spoiled_argument(family, data):
    ids = FAMILIES[family][1]
    argument = data.draw(st.sampled_from(["input_ids", "attention_mask", "labels"]), label="argument")
    if argument == "attention_mask":
        value = data.draw(not_a_tensor(ids), label="value")
    else:  # labels are token ids too (-100 = ignored)
        value = data.draw(spoiled_ids(ids), label="value")
    _expect_named_error(family, argument, value, generate=False)


@pytest.mark.parametrize("family", FAMILIES)
@FUZZ
@given(data=st.data())
def test_generate_names_the_spoiled_argument(family, data):
    ids = FAMILIES[family][1]
    argument = data.draw(st.sampled_from(["input_ids", "attention_mask"]), label="argument")
    if argument == "attention_mask":
        value = data.draw(not_a_tensor(ids), label="value")
    else:
        value = data.draw(spoiled_ids(ids), label="value")
    _expect_named_error(family, argument, value, generate=True)
