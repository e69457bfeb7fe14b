"""Sparse GPT-2 (CogView) model: sparse modes against the same model with dense masked attention, cache / memory /
window equivalences, generation, gradient checkpointing and bad-input errors. Tiny configs, CPU, fp32. The attention
kernel on its own: test_sparse_attention.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures import SPARSE_IMAGE, SPARSE_VOCAB, repo_module, sparse_config
from helpers import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

cfg_mod, mod, sa = (
    repo_module(name) for name in ("configuration_gpt2_sparse", "modeling_gpt2_sparse", "sparse_attention")
)
GPT2SparseConfig = cfg_mod.GPT2SparseConfig
GPT2SparseLMHeadModel = mod.GPT2SparseLMHeadModel
VOCAB, N_IMAGE = SPARSE_VOCAB, SPARSE_IMAGE  # ids < 100 are image tokens, 100..119 text


def tiny_config(**overrides) -> GPT2SparseConfig:
    return sparse_config(**{"init_method_std": 0.2, **overrides})  # large enough that attention patterns matter


def tiny_model(**overrides) -> GPT2SparseLMHeadModel:
    torch.manual_seed(0)
    return GPT2SparseLMHeadModel(tiny_config(**overrides)).eval()


def token_ids(batch: int, length: int, n_text: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N_IMAGE, (batch, length), generator=g)
    ids[:, :n_text] = torch.randint(N_IMAGE, VOCAB, (batch, n_text), generator=g)
    return ids


# The dense reference (the allowed-set definition of reference-notes Part B §1) lives with the attention's own tests.
from test_sparse_attention import allowed_and_bias, dense_reference  # noqa: E402


def patched_dense(mode: int, w: int, t: int):
    """A drop-in for modeling's sparse_window_attention that ignores the model's plan and uses the reference."""

    def attention(query, key, value, window_start, block, span, pivot_idx, pivot_bias, key_mask, scaling, **kwargs):
        allowed, bias = allowed_and_bias(mode, query.shape[2], key.shape[2], w, t, pivot_idx)
        return dense_reference(query, key, value, allowed, bias).to(query.dtype)

    return attention


@pytest.mark.parametrize("mode", [1, 2])
def test_model_sparse_modes_equal_dense_masked_model(mode, monkeypatch):
    """Whole model with fixed pivots: the blocked implementation == the same model with dense masked attention."""
    model = tiny_model()
    ids = token_ids(2, 24)
    pivots = torch.tensor([[0, 1, 5, 9, 13, 17], [0, 1, 2, 3, 10, 11]])
    out = model(ids, is_sparse=mode, pivot_idx=pivots).logits
    monkeypatch.setattr(mod, "sparse_window_attention", patched_dense(mode, 4, 2))
    ref = model(ids, is_sparse=mode, pivot_idx=pivots).logits
    assert_close(out, ref, atol=1e-5, msg=f"model mode {mode}")
    dense = model(ids, is_sparse=0).logits
    assert (out - dense).abs().max() > 1e-3, "the sparse pattern should change the result on this input"


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from([1, 2]),
    blocks=st.integers(2, 7),
    batch=st.integers(1, 3),
    n_text=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_model_sampled_pivots_text_image_mixes(mode, blocks, batch, n_text, seed):
    """Random text/image mixes with sampled pivots: the model equals its dense masked version on the pivots it drew,
    and the pivots are every text token plus image tokens (exactly num_pivot per row in mode 1)."""
    model = tiny_model()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, N_IMAGE, (batch, 4 * blocks), generator=g)
    text_pos = torch.rand(batch, 4 * blocks, generator=g).argsort(-1)[:, :n_text]  # text anywhere in the row
    ids.scatter_(1, text_pos, torch.randint(N_IMAGE, VOCAB, (batch, n_text), generator=g))
    seen = []

    def recording(query, key, value, window_start, block, span, pivot_idx, *args, **kwargs):
        seen.append(pivot_idx)
        return mod_attention(query, key, value, window_start, block, span, pivot_idx, *args, **kwargs)

    mod_attention = mod.sparse_window_attention
    try:
        mod.sparse_window_attention = recording
        out = model(ids, is_sparse=mode, generator=torch.Generator().manual_seed(seed)).logits
        mod.sparse_window_attention = patched_dense(mode, 4, 2)
        layer_pivots = list(seen)
        seen.clear()

        def replay(query, key, value, window_start, block, span, pivot_idx, *args, **kwargs):
            pivots = layer_pivots[len(seen)]
            seen.append(pivots)
            return patched_dense(mode, 4, 2)(query, key, value, window_start, block, span, pivots, *args, **kwargs)

        mod.sparse_window_attention = replay
        ref = model(ids, is_sparse=mode).logits
    finally:
        mod.sparse_window_attention = mod_attention
    assert_close(out, ref, atol=1e-5, msg=f"mode {mode}")
    is_text = ids >= N_IMAGE
    for pivots in layer_pivots:
        limit = ids.shape[1] if mode == 1 else ids.shape[1] - 8
        if mode == 1:
            assert pivots.shape[1] == model.config.num_pivot
        for row in range(batch):
            chosen = set(pivots[row].tolist())
            assert len(chosen) == pivots.shape[1] and all(j < limit for j in chosen)
            if pivots.shape[1]:
                assert set(is_text[row, :limit].nonzero().flatten().tolist()) <= chosen


def test_model_pivot_sampling_is_deterministic_with_a_generator():
    """(The sampler itself: test_sparse_attention.py.)"""
    model = tiny_model()
    ids = token_ids(2, 24)
    run = lambda seed: model(ids, is_sparse=1, generator=torch.Generator().manual_seed(seed)).logits  # noqa: E731
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))


def test_mode2_within_window_equals_dense():
    model = tiny_model()
    ids = token_ids(2, 8)  # t * w = 8: every query sees its whole causal past
    assert_close(model(ids, is_sparse=2).logits, model(ids, is_sparse=0).logits, atol=1e-5)


def test_cache_decoding_equals_full_forward_modes_0_and_2():
    model = tiny_model(pb_relax=False)
    ids = token_ids(2, 20)
    pivots = torch.tensor([[0, 1, 3, 6], [0, 1, 2, 5]])
    for mode, prefill_mode in ((0, 0), (2, 2), (2, 0)):
        full = model(ids, is_sparse=mode, pivot_idx=pivots if mode == 2 else None).logits
        # Prefill 7 tokens (inside the window, so a dense prefill equals a sparse one), then decode one by one.
        out = model(ids[:, :7], is_sparse=prefill_mode, use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        for i in range(7, 20):
            out = model(
                ids[:, i : i + 1],
                past_key_values=cache,
                use_cache=True,
                is_sparse=mode,
                pivot_idx=pivots if mode == 2 else None,
            )
            steps.append(out.logits)
        assert_close(torch.cat(steps, 1), full, atol=1e-5, msg=f"cache decode mode {mode} after mode {prefill_mode}")


def test_mode2_decode_with_sampled_pivots_after_dense_prefill():
    model = tiny_model()
    ids = token_ids(1, 30)
    out = model(ids[:, :20], is_sparse=0, use_cache=True)
    image_mask = ids < N_IMAGE
    for i in range(20, 30):
        out = model(
            ids[:, i : i + 1],
            past_key_values=out.past_key_values,
            is_sparse=2,
            image_mask=image_mask[:, : i + 1],
            generator=torch.Generator().manual_seed(i),
        )
        assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="image_mask"):
        model(torch.tensor([[5]]), past_key_values=out.past_key_values, is_sparse=2)


@pytest.mark.parametrize("pb_relax, atol", [(False, 1e-5), (True, 1e-4)])
def test_memory_decoding_equals_full_forward(pb_relax, atol):
    model = tiny_model(pb_relax=pb_relax, max_memory_length=64)
    ids = token_ids(2, 18)
    pivots = torch.tensor([[0, 1, 4], [0, 1, 7]])
    for mode in (0, 2):
        kw = {"pivot_idx": pivots} if mode == 2 else {}
        full = model(ids, is_sparse=mode, use_cache=False, **kw).logits
        out = model(ids[:, :6], is_sparse=mode, use_cache=False, **kw)
        assert len(out.mems) == model.config.num_layers + 1 and out.mems[0].shape == (2, 6, 32)
        steps = [out.logits]
        for i in range(6, 18, 3):  # chunks of 3 tokens
            out = model(ids[:, i : i + 3], mems=out.mems, is_sparse=mode, **kw)
            steps.append(out.logits)
        assert_close(torch.cat(steps, 1), full, atol=atol, msg=f"memory decode mode {mode}")


def test_memory_is_truncated_to_max_memory_length():
    model = tiny_model(max_memory_length=5)
    out = model(token_ids(1, 4), use_cache=False)
    assert out.mems[0].shape[1] == 4
    out2 = model(token_ids(1, 3, seed=1), mems=out.mems)
    assert out2.mems[0].shape[1] == 5
    assert torch.equal(out2.mems[1][:, :2], out.mems[1][:, 2:])


def test_sep_prefix_is_bidirectional_and_eager_equals_sdpa():
    ids = token_ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    outs = {}
    for impl in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=impl)
        outs[impl] = [model(ids, attention_mask=mask).logits, model(ids, sep=4).logits, model(ids).logits]
    for a, b in zip(outs["eager"], outs["sdpa"]):
        assert_close(a, b, atol=1e-5, msg="eager vs sdpa")
    plain, prefix = outs["sdpa"][2], outs["sdpa"][1]
    assert (plain[:, :3] - prefix[:, :3]).abs().max() > 1e-4  # earlier prefix tokens now see later ones
    # padding: the unpadded row is unaffected, the padded row equals running its real tokens alone
    assert_close(outs["sdpa"][0][0], plain[0], atol=1e-5)
    alone = tiny_model(pb_relax=False)(ids[1:, 3:]).logits
    padded = tiny_model(pb_relax=False)(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    assert_close(padded.logits[1:, 3:], alone, atol=1e-5, msg="left padding")


def test_mode1_padding_keys_are_masked():
    model = tiny_model(pb_relax=False)
    ids = token_ids(1, 16, n_text=0)
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[:, 12:] = 0  # right padding in training
    pivots = torch.tensor([[0, 2, 5, 7]])
    a = model(ids, attention_mask=mask, is_sparse=1, pivot_idx=pivots).logits
    ids2 = ids.clone()
    ids2[:, 12:] = 3
    b = model(ids2, attention_mask=mask, is_sparse=1, pivot_idx=pivots).logits
    assert_close(a[:, :12], b[:, :12], atol=1e-5)


def test_generate_modes_0_and_2_cache_equals_no_cache():
    model = tiny_model(pb_relax=False)
    ids = token_ids(2, 6)
    pivots = torch.tensor([[0, 1, 2], [0, 1, 3]])
    for kw in ({"is_sparse": 0}, {"is_sparse": 2, "pivot_idx": pivots}):
        with_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=True, **kw)
        no_cache = model.generate(ids, max_new_tokens=10, do_sample=False, use_cache=False, **kw)
        assert with_cache.shape == (2, 16)  # past t*w = 8: the window slides and pivots come into play
        assert torch.equal(with_cache, no_cache), kw
    kw = {"is_sparse": 2, "pivot_idx": pivots, "num_beams": 2, "max_new_tokens": 5, "do_sample": False}
    assert torch.equal(model.generate(ids, **kw), model.generate(ids, use_cache=False, **kw)), "beam search"
    # sampled pivots inside generate (image_mask is supplied by prepare_inputs_for_generation)
    out = model.generate(ids, max_new_tokens=6, is_sparse=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 12)


def test_gradient_checkpointing_mode1_same_gradients():
    ids = token_ids(2, 16)
    grads = []
    for checkpointing in (False, True):
        model = tiny_model()
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, labels=ids, is_sparse=1, generator=torch.Generator().manual_seed(5)).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert_close(grads[1], grads[0], atol=1e-5, msg="checkpointed gradients")


def test_pb_relax_layernorm_close_to_plain_and_zero_safe():
    ln = mod.GPT2SparseLayerNorm(16, 1e-5, pb_relax=True)
    x = torch.randn(3, 5, 16) * 7
    assert_close(ln(x), F.layer_norm(x, (16,), eps=1e-5), atol=1e-4)
    assert torch.isfinite(ln(torch.zeros(2, 16))).all()
    model = tiny_model()
    assert model.model.layers[0].third_layernorm is not None
    assert tiny_model(sandwich_ln=False).model.layers[0].third_layernorm is None


def test_tied_head_and_config_fields_roundtrip(tmp_path):
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.model.word_embeddings.weight.data_ptr()
    cfg = tiny_config(max_memory_length=7, is_sparse=2)
    d = cfg.to_dict()
    for key in ("query_window", "key_window_times", "num_pivot", "num_image_tokens", "sandwich_ln", "pb_relax"):
        assert key in d
    cfg.save_pretrained(tmp_path)
    again = GPT2SparseConfig.from_pretrained(tmp_path)
    assert (again.max_memory_length, again.is_sparse, again.num_hidden_layers) == (7, 2, 2)
    assert again.tie_word_embeddings is True


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="multiple of query_window"):
        model(token_ids(1, 18), is_sparse=1)
    with pytest.raises(ValueError, match="at least key_window_times"):
        model(token_ids(1, 4), is_sparse=1)
    half_padded = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with pytest.raises(ValueError, match="fewer than the 6 pivots"):
        model(token_ids(1, 8), attention_mask=half_padded, is_sparse=1)
    with pytest.raises(ValueError, match="text tokens"):
        model(torch.full((1, 8), 110), is_sparse=1)
    with pytest.raises(ValueError, match="pivot_idx"):
        model(token_ids(1, 16), is_sparse=1, pivot_idx=torch.tensor([[0, 16]]))
    with pytest.raises(ValueError, match="pivot_idx"):
        model(token_ids(1, 16), is_sparse=2, pivot_idx=torch.tensor([[-1, 3]]))
    mem_model = tiny_model(max_memory_length=8)
    mems = mem_model(token_ids(1, 8), use_cache=False).mems
    with pytest.raises(ValueError, match="mems"):
        mem_model(token_ids(1, 8), mems=mems, is_sparse=1)
    with pytest.raises(ValueError, match="vocab_size"):
        model(torch.tensor([[1, VOCAB]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(token_ids(1, 97))
    with pytest.raises(ValueError, match="is_sparse"):
        model(token_ids(1, 8), is_sparse=3)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        tiny_config(num_attention_heads=5)
    with pytest.raises(ValueError, match="num_image_tokens"):
        tiny_config(num_image_tokens=VOCAB + 1)
