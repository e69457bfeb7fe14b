"""The same checks on every model family (GLM in both variants, sparse GPT-2, BART-gen), each driven by the
family's tester in tests/fixtures/testers.py: the output shapes of each head, cache equivalence, eager vs sdpa,
save and reload through the Auto classes, and a greedy generate.

Tolerances are for fp32 on CPU: the same computation split differently (cache vs recompute, eager vs sdpa) differs
by float rounding only (about 1e-5 on these tiny models, whose logits reach about 20).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from fixtures.testers import NEW_TOKENS, TESTERS
from helpers import assert_close

FAMILY = pytest.mark.parametrize("tester", list(TESTERS.values()), ids=list(TESTERS))
PADDED = pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
HEADS = [(tester, auto) for tester in TESTERS.values() for auto in tester.heads]
HEAD = pytest.mark.parametrize("tester, auto", HEADS, ids=[f"{t.name}-{auto}" for t, auto in HEADS])
RELOAD = HEADS


def _logits(model, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs).logits


@HEAD
def test_each_head_returns_outputs_of_the_expected_shapes(tester, auto):
    model = tester.model(auto)
    inputs = tester.head_inputs(auto, tester.inputs(padded=True))
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    tester.check_shapes(auto, out, inputs)


@FAMILY
@PADDED
def test_last_tokens_through_the_cache_equal_a_full_recompute(tester, padded):
    """The prefix with the cache, then NEW_TOKENS tokens in one call, against the whole sequence without a cache."""
    model = tester.model()
    inputs = tester.inputs(padded)
    full = _logits(model, **inputs, use_cache=False)
    with torch.no_grad():
        first = model(**tester.prefix(inputs), use_cache=True)
        rest = model(**tester.continuation(model, inputs, first), use_cache=True).logits
    real = tester.real(inputs)
    split = full.shape[1] - NEW_TOKENS
    assert_close(first.logits[real[:, :split]], full[:, :split][real[:, :split]], atol=1e-4, msg="prefix")
    assert_close(rest[real[:, split:]], full[:, split:][real[:, split:]], atol=1e-4, msg="cached vs full recompute")


@FAMILY
@PADDED
def test_eager_equals_sdpa(tester, padded):
    inputs = tester.inputs(padded)
    eager = _logits(tester.model(attn_implementation="eager"), **inputs)
    sdpa = _logits(tester.model(attn_implementation="sdpa"), **inputs)
    real = tester.real(inputs)
    assert_close(sdpa[real], eager[real], atol=1e-4, msg="eager vs sdpa")


@pytest.mark.parametrize("tester, auto", RELOAD, ids=[f"{t.name}-{auto}" for t, auto in HEADS])
def test_save_and_reload_through_the_auto_class(tester, auto, tmp_path):
    model = tester.model(auto)
    model.save_pretrained(tmp_path)
    auto_class = getattr(transformers, auto)
    loaded = auto_class.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(loaded).__name__ == tester.heads[auto]
    assert type(loaded) is not type(model)  # loaded from the folder's code files, not reused from this process
    inputs = tester.head_inputs(auto, tester.inputs(padded=True))
    with torch.no_grad():
        expected, actual = model(**inputs), loaded(**inputs)
    for key in ("logits", "last_hidden_state"):
        if key in expected:
            assert_close(actual[key], expected[key], atol=0, msg=f"{auto} {key} after reload")


@FAMILY
def test_greedy_generate_appends_tokens(tester):
    model = tester.model()
    inputs = tester.prefix(tester.inputs(padded=True))
    inputs.pop("decoder_input_ids", None)  # BART: generate starts the target itself
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    start = 1 if tester.lm_auto == "AutoModelForSeq2SeqLM" else inputs["input_ids"].shape[1]
    assert out.shape == (inputs["input_ids"].shape[0], start + NEW_TOKENS)
    assert len(set(out[:, start:].flatten().tolist())) > 1, "every row generated the same token"


def test_bart_encoder_and_decoder_reload_on_their_own(tmp_path):
    """BART-gen's encoder and decoder saved and loaded as models of their own reproduce the whole model's states."""
    tester = TESTERS["bart_gen"]
    model = tester.model("AutoModel")
    inputs = tester.inputs(padded=True)
    encoder, decoder = model.get_encoder(), model.get_decoder()
    encoder.save_pretrained(tmp_path / "encoder")
    decoder.save_pretrained(tmp_path / "decoder")
    encoder = type(encoder).from_pretrained(tmp_path / "encoder", attn_implementation="eager").eval()
    decoder = type(decoder).from_pretrained(tmp_path / "decoder", attn_implementation="eager").eval()
    with torch.no_grad():
        expected = model(**inputs)
        source = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        target = decoder(
            input_ids=inputs["decoder_input_ids"],
            encoder_hidden_states=source,
            encoder_attention_mask=inputs["attention_mask"],
        ).last_hidden_state
    assert_close(source, expected.encoder_last_hidden_state, atol=0, msg="encoder alone")
    assert_close(target, expected.last_hidden_state, atol=0, msg="decoder alone")
