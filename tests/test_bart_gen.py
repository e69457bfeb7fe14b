"""BART-gen against transformers' own BartForConditionalGeneration (installed, same process, same weights).

Every comparison builds a tiny random native BART, copies its state dict into ours (the keys are the same)
and compares logits, losses and generated ids. Nothing here is stored data: the reference is whichever
transformers version runs the suite (4.57 or 5.x).
"""

from __future__ import annotations

import copy

import pytest
import torch
from fixtures import BART_TINY, BART_VOCAB, repo_module
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import BartConfig, BartForConditionalGeneration, PretrainedConfig

configuration_bart_gen, modeling_bart_gen = repo_module("configuration_bart_gen"), repo_module("modeling_bart_gen")
BartGenConfig = configuration_bart_gen.BartGenConfig
BartGenForConditionalGeneration = modeling_bart_gen.BartGenForConditionalGeneration
BartGenModel = modeling_bart_gen.BartGenModel

VOCAB = BART_VOCAB
# the fixtures' tiny BART with a deeper, narrower decoder and larger weights
SIZES = {**BART_TINY, "decoder_layers": 3, "decoder_attention_heads": 2, "init_std": 0.2}


def make_pair(attn_implementation: str = "sdpa", **overrides):
    """A random native BART and ours holding the same weights (and the same generation config)."""
    sizes = {**SIZES, **overrides}
    native_config = BartConfig(**sizes, forced_eos_token_id=2)
    native_config._attn_implementation = attn_implementation
    native = BartForConditionalGeneration(native_config).eval()
    with torch.no_grad():
        native.final_logits_bias.normal_(std=0.5)
    config = BartGenConfig(**sizes)
    config._attn_implementation = attn_implementation
    ours = BartGenForConditionalGeneration(config).eval()
    ours.load_state_dict(native.state_dict(), strict=True)
    ours.generation_config = copy.deepcopy(native.generation_config)
    return native, ours


def padded_batch():
    """Three rows: full, left-padded, right-padded (BART positions ignore padding, as transformers does)."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (3, 11), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0
    attention_mask[2, 7:] = 0
    input_ids[attention_mask == 0] = 1
    input_ids[:, 0] = torch.where(attention_mask[:, 0] == 1, 0, 1)
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return make_pair("sdpa")


def test_state_dict_keys_and_shapes_equal_native(pair):
    native, ours = pair
    native_sd, ours_sd = native.state_dict(), ours.state_dict()
    assert sorted(native_sd) == sorted(ours_sd)
    assert all(native_sd[k].shape == ours_sd[k].shape for k in native_sd)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_logits_and_loss_equal_native(attn_implementation):
    torch.manual_seed(0)
    native, ours = make_pair(attn_implementation)
    input_ids, attention_mask = padded_batch()
    labels = torch.randint(3, VOCAB, (3, 6))
    labels[0, 4:] = -100
    with torch.no_grad():
        expected = native(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        actual = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        # no decoder inputs and no labels: both shift input_ids right (BART denoising)
        expected_denoise = native(input_ids=input_ids, attention_mask=attention_mask).logits
        actual_denoise = ours(input_ids=input_ids, attention_mask=attention_mask).logits
    assert_close(actual.logits, expected.logits, atol=1e-5, msg="logits")
    assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, atol=1e-5, msg="encoder")
    assert_close(actual.loss, expected.loss, atol=1e-5, msg="loss")
    assert_close(actual_denoise, expected_denoise, atol=1e-5, msg="denoising logits")
    # -100 is ignored: the loss is the mean over the 16 real label positions
    manual = torch.nn.functional.cross_entropy(actual.logits[labels != -100], labels[labels != -100])
    assert_close(actual.loss, manual, atol=1e-6, msg="loss ignores -100")


GENERATION_MODES = {
    "greedy": dict(),
    "beam": dict(num_beams=4, length_penalty=0.6, no_repeat_ngram_size=2, early_stopping=True, num_return_sequences=2),
    "sample": dict(do_sample=True, top_k=20, temperature=0.9),
}


@pytest.mark.parametrize("mode", sorted(GENERATION_MODES))
def test_generate_equals_native_batched_padded(pair, mode):
    native, ours = pair
    input_ids, attention_mask = padded_batch()
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=12, **GENERATION_MODES[mode])
    torch.manual_seed(123)
    expected = native.generate(**kwargs)
    torch.manual_seed(123)
    actual = ours.generate(**kwargs)
    assert expected.shape[1] > 4, "the random model stopped too early for a meaningful comparison"
    assert torch.equal(actual, expected), f"{mode}:\n{actual}\n!=\n{expected}"


def test_generate_equals_native_eager_greedy_and_beam():
    torch.manual_seed(0)
    native, ours = make_pair("eager")
    input_ids, attention_mask = padded_batch()
    for kwargs in (dict(), dict(num_beams=3)):
        expected = native.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, **kwargs)
        actual = ours.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=8, **kwargs)
        assert torch.equal(actual, expected), kwargs


def test_generate_with_cache_equals_without(pair):
    _, ours = pair
    input_ids, attention_mask = padded_batch()
    for kwargs in (dict(), dict(num_beams=4, num_return_sequences=2)):
        cached = ours.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, **kwargs)
        uncached = ours.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=10, use_cache=False, **kwargs
        )
        assert torch.equal(cached, uncached), kwargs


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_incremental_decoding_equals_full_recompute(attn_implementation):
    """Prefix through the cache, then 3 more tokens at once (a T > 1 step on a non-empty cache)."""
    torch.manual_seed(0)
    _, ours = make_pair(attn_implementation)
    input_ids, attention_mask = padded_batch()
    decoder_input_ids = torch.randint(3, VOCAB, (3, 8))
    with torch.no_grad():
        full = ours(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids).logits
        first = ours(
            input_ids=input_ids,
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids[:, :5],
            use_cache=True,
        )
        assert type(first.past_key_values).__name__ == "EncoderDecoderCache"
        rest = ours(
            encoder_outputs=(first.encoder_last_hidden_state,),
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids[:, 5:],
            past_key_values=first.past_key_values,
            use_cache=True,
        ).logits
    assert_close(torch.cat([first.logits, rest], dim=1), full, atol=1e-5, msg="cached vs full")


def test_cross_attention_kv_projected_once_per_generation(pair):
    _, ours = pair
    input_ids, attention_mask = padded_batch()
    calls = []
    hooks = [
        layer.encoder_attn.k_proj.register_forward_hook(lambda *_: calls.append(1))
        for layer in ours.model.decoder.layers
    ]
    try:
        out = ours.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=6, min_new_tokens=6)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape[1] == 7
    assert len(calls) == len(ours.model.decoder.layers)  # once per layer, not once per step


def test_eager_equals_sdpa_with_padding():
    torch.manual_seed(0)
    _, eager = make_pair("eager")
    sdpa_config = copy.deepcopy(eager.config)
    sdpa_config._attn_implementation = "sdpa"
    sdpa = BartGenForConditionalGeneration(sdpa_config).eval()
    sdpa.load_state_dict(eager.state_dict())
    input_ids, attention_mask = padded_batch()
    decoder_attention_mask = torch.ones(3, 6, dtype=torch.long)
    decoder_attention_mask[1, 4:] = 0
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=torch.randint(3, VOCAB, (3, 6)),
        decoder_attention_mask=decoder_attention_mask,
    )
    with torch.no_grad():
        assert_close(sdpa(**kwargs).logits, eager(**kwargs).logits, atol=1e-5, msg="eager vs sdpa")


def test_no_legacy_reorder_cache(pair):
    _, ours = pair
    assert not hasattr(ours, "_reorder_cache")  # beam search reorders the Cache object itself


def test_lm_head_tied_and_saved_once(tmp_path, pair):
    from safetensors import safe_open

    _, ours = pair
    model = ours.model
    assert ours.lm_head.weight is model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight is model.decoder.embed_tokens.weight
    ours.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    embedding_like = {k for k in keys if k.endswith(("shared.weight", "embed_tokens.weight", "lm_head.weight"))}
    assert embedding_like == {"model.shared.weight"}

    loaded = BartGenForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.model.shared.weight
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        before = loaded(input_ids=input_ids, attention_mask=attention_mask)
        assert_close(before.logits, ours(input_ids=input_ids, attention_mask=attention_mask).logits, atol=1e-6)
        loaded.model.shared.weight.mul_(torch.rand_like(loaded.model.shared.weight) + 0.5)
        after = loaded(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    assert (after.logits - before.logits).abs().max() > 1e-2
    head = after.decoder_hidden_states[-1] @ loaded.model.shared.weight.T + loaded.final_logits_bias
    assert_close(after.logits, head, atol=1e-5, msg="logits = h @ shared^T + final_logits_bias")


def test_resize_token_embeddings_keeps_tie_and_bias():
    torch.manual_seed(0)
    _, ours = make_pair()
    ours.resize_token_embeddings(VOCAB + 5)
    assert ours.config.vocab_size == VOCAB + 5
    assert ours.lm_head.weight is ours.model.shared.weight
    assert ours.model.encoder.embed_tokens is ours.model.shared
    assert ours.final_logits_bias.shape == (1, VOCAB + 5)
    assert ours(input_ids=torch.tensor([[0, VOCAB + 4, 2]])).logits.shape == (1, 3, VOCAB + 5)


def test_bad_inputs_raise_clear_value_errors():
    torch.manual_seed(0)
    _, ours = make_pair()
    ids = torch.tensor([[0, 5, 6, 2]])
    with pytest.raises(ValueError, match="vocabulary"):
        ours(input_ids=torch.tensor([[0, VOCAB, 2]]))
    with pytest.raises(ValueError, match="vocabulary"):
        ours(input_ids=ids, decoder_input_ids=torch.tensor([[2, -3]]))
    with pytest.raises(ValueError, match="labels"):
        ours(input_ids=ids, labels=torch.tensor([[5, VOCAB + 1]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(input_ids=torch.randint(3, VOCAB, (1, 41)))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours.generate(input_ids=ids, max_new_tokens=60, min_new_tokens=60)
    config = copy.deepcopy(ours.config)
    config.decoder_start_token_id = None
    no_start = BartGenForConditionalGeneration(config)
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        no_start(input_ids=ids, labels=ids)
    config = copy.deepcopy(ours.config)
    config.pad_token_id = None
    with pytest.raises(ValueError, match="pad_token_id"):
        BartGenForConditionalGeneration(config)(input_ids=ids, labels=ids)
    with pytest.raises(ValueError, match="divisible"):
        BartGenConfig(d_model=30, encoder_attention_heads=4)


def test_shift_tokens_right_matches_native():
    from transformers.models.bart.modeling_bart import shift_tokens_right

    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert torch.equal(modeling_bart_gen.shift_tokens_right(labels, 1, 2), shift_tokens_right(labels, 1, 2))


def test_config_keeps_generation_parameters_out(tmp_path):
    import json

    native_fields = BartConfig(**SIZES).to_dict()
    config = BartGenConfig(**{k: v for k, v in native_fields.items() if k not in ("model_type", "architectures")})
    config_old = BartGenConfig(**SIZES, forced_bos_token_id=0, num_beams=4, no_repeat_ngram_size=3, max_length=20)
    base_defaults = PretrainedConfig()  # 4.57's base class sets generation defaults on every config; 5.x none
    for cfg in (config, config_old):
        for key in configuration_bart_gen.GENERATION_PARAMETERS:
            assert getattr(cfg, key, None) == getattr(base_defaults, key, None), key
    config_old.save_pretrained(tmp_path)  # 5.x raises here if a generation parameter slipped through
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "bart_gen"
    assert saved["tie_word_embeddings"] is True
    assert saved["auto_map"] == configuration_bart_gen.DEFAULT_AUTO_MAP
    assert "forced_bos_token_id" not in saved and "num_beams" not in saved
    assert config.hidden_size == SIZES["d_model"] and config.num_attention_heads == SIZES["encoder_attention_heads"]


def test_return_dict_false_and_base_model(pair):
    native, ours = pair
    input_ids, attention_mask = padded_batch()
    labels = torch.randint(3, VOCAB, (3, 5))
    with torch.no_grad():
        as_tuple = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels, return_dict=False)
        as_dict = ours(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        base = BartGenModel(ours.config).eval()
        base.load_state_dict(ours.model.state_dict())
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        native_hidden = native.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert isinstance(as_tuple, tuple)
    assert_close(as_tuple[0], as_dict.loss, atol=0)
    assert_close(as_tuple[1], as_dict.logits, atol=0)
    assert_close(hidden, native_hidden, atol=1e-5, msg="BartGenModel vs BartModel")
    assert ours.get_encoder() is ours.model.encoder


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    _, ours = make_pair("eager")
    input_ids, attention_mask = padded_batch()
    labels = torch.randint(3, VOCAB, (3, 6))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(ours).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert any("encoder.layers.0" in n for n in grads[1])  # gradients reach the encoder through the checkpoints
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], atol=1e-5, msg=name)


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 12),
    pads=st.lists(st.integers(0, 6), min_size=3, max_size=3),
    left=st.booleans(),
)
def test_property_logits_equal_native_for_any_padding(pair, batch, length, pads, left):
    native, ours = pair
    input_ids = torch.randint(3, VOCAB, (batch, length))
    attention_mask = torch.ones_like(input_ids)
    for row in range(batch):
        n = min(pads[row], length - 1)  # at least one real token per row
        if n and left:
            attention_mask[row, :n] = 0
        elif n:
            attention_mask[row, length - n :] = 0
    decoder_input_ids = torch.randint(3, VOCAB, (batch, 4))
    with torch.no_grad():
        expected = native(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
        actual = ours(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    assert_close(actual.logits, expected.logits, atol=1e-5)
