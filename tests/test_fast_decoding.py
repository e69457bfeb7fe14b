"""fast_decoding.py's speed-ups change no result (shown on GLM; the other families share the module).

- `GrowingKVLayer` (keys/values in a buffer with spare room, written in place) holds exactly what transformers'
  `DynamicLayer` (torch.cat per step) holds, through random sequences of the operations generate() and users apply
  to a cache: updates of any length, beam reordering, cropping, batch repetition and selection, reset; beam
  reorders gather into a second buffer (one copy a step), crops keep the buffer; `BeamSharedKVLayer` (BART's
  cross-attention cache) skips exactly the reorders that leave its bits unchanged, and beam search with both
  gives the plain layers' ids and scores.
- `use_growing_kv_layers` swaps only a fresh `DynamicCache`, and the model really decodes with the growing layers.
- `fast_cpu_gemv` switches oneDNN off exactly for batch-1 single-token bf16 steps on the CPU, restores the flag
  (also when the step raises), and gives the same logits and greedy ids as the oneDNN path.
- `one_token_attention` computes sdpa's result (masks bool, additive or none; keys and values as cache views),
  `attention_function` picks it only for one-token bf16/fp16 CPU steps with enough work, and every family's
  decoding keeps its greedy ids through it.
- `compile_decode_step()` sets the oneDNN switch around the compiled graph exactly as the eager steps do (after the
  first compiled call, the trace, which keeps oneDNN on: see test_quantization's int8 compile test), traces
  without graph breaks or per-token recompilation, and keeps the ids.
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from fixtures import GMASK, SOP, random_prompt
from fixtures import glm_modeling as modeling_module
from fixtures import spread_glm as tiny_model
from helpers import assert_close
from transformers.cache_utils import DynamicCache, DynamicLayer


def fast_decoding():
    """The fast_decoding module as the dynamic-module loader imported it next to modeling_glm."""
    return sys.modules[modeling_module().fast_cpu_gemv.__module__]


def _other_family(family: str):
    """A private copy of the robustness suite's tiny BART or sparse GPT-2 (shared, cached models: never altered)."""
    from fixtures import bart_model, sparse_model

    return copy.deepcopy(bart_model() if family == "bart" else sparse_model())


def _fast_decoding_of(model):
    """The fast_decoding module next to `model`'s modeling file (each loader imports its own copy)."""
    return sys.modules[sys.modules[type(model).__module__].attention_function.__module__]


def _same(growing, plain, msg: str) -> None:
    assert growing.get_seq_length() == plain.get_seq_length(), msg
    if plain.get_seq_length():
        assert torch.equal(growing.keys, plain.keys), msg
        assert torch.equal(growing.values, plain.values), msg
        assert torch.equal(growing.keys.signbit(), plain.keys.signbit()), msg  # -0.0 is not 0.0 here


@pytest.mark.parametrize("layer_class", ["GrowingKVLayer", "GrowingKVLayer-two-buffers", "BeamSharedKVLayer"])
@pytest.mark.parametrize("seed", range(6))
def test_growing_layer_holds_what_dynamic_layer_holds(seed, layer_class, monkeypatch):
    if layer_class.endswith("-two-buffers"):  # how a GPU reorders beams
        monkeypatch.setattr(fast_decoding(), "reorders_in_place", lambda device: False)
    generator = torch.Generator().manual_seed(seed)
    growing, plain = getattr(fast_decoding(), layer_class.split("-")[0])(), DynamicLayer()
    batch, heads, dim = 3, 2, 4
    history = []
    for step in range(80):
        op = ["update"] * 6 + [
            "reorder",
            "reorder-pairs",
            "reorder-pairs",
            "crop",
            "select",
            "select-mask",
            "repeat",
            "reset",
        ]
        op = op[int(torch.randint(len(op), (1,), generator=generator))] if step else "update"
        length = plain.get_seq_length()
        if op == "update":
            new = int(torch.randint(1, 5 if step % 7 else 300, (1,), generator=generator))  # now and then > spare room
            k, v = torch.randn(2, batch, heads, new, dim, generator=generator)
            if not length:  # a prompt repeated for pairs of beams, as generate() repeats it
                k[1::2], v[1::2] = k[: batch // 2 * 2 : 2], v[: batch // 2 * 2 : 2]
            out_growing, out_plain = growing.update(k, v), plain.update(k, v)
            assert torch.equal(out_growing[0], out_plain[0]) and torch.equal(out_growing[1], out_plain[1])
        elif op == "reorder" and length:
            beam_idx = torch.randint(batch, (batch,), generator=generator)
            growing.reorder_cache(beam_idx), plain.reorder_cache(beam_idx)
        elif op == "reorder-pairs" and length:  # within pairs of rows, as beam search reorders within its groups
            beam_idx = (torch.arange(batch) // 2 * 2 + torch.randint(2, (batch,), generator=generator)).clamp(
                max=batch - 1
            )
            growing.reorder_cache(beam_idx), plain.reorder_cache(beam_idx)
        elif op == "crop" and length > 1:
            remove = -int(torch.randint(1, length, (1,), generator=generator))
            growing.crop(remove), plain.crop(remove)
        elif op == "select" and length and batch > 1:
            keep = torch.arange(batch - 1)
            growing.batch_select_indices(keep), plain.batch_select_indices(keep)
            batch -= 1
        elif op == "select-mask" and length and batch > 1:  # a bool mask, as a user may pass
            keep = torch.arange(batch) != int(torch.randint(batch, (1,), generator=generator))
            growing.batch_select_indices(keep), plain.batch_select_indices(keep)
            batch -= 1
        elif op == "repeat" and length and batch < 4:
            growing.batch_repeat_interleave(2), plain.batch_repeat_interleave(2)
            batch *= 2
        elif op == "reset":
            growing.reset(), plain.reset()
            if plain.is_initialized:  # 4.57 zeroes in place and keeps the length; 5.x drops the tensors
                batch = plain.keys.shape[0]
        history.append(op)
        _same(growing, plain, f"after {history}")


def test_growing_layer_writes_in_place_until_the_spare_room_is_used():
    layer = fast_decoding().GrowingKVLayer()
    layer.update(torch.randn(1, 2, 100, 4), torch.randn(1, 2, 100, 4))
    storage = layer.keys.untyped_storage().data_ptr()
    for _ in range(255):  # 100 + 255 tokens fit the first buffer (100 + 256)
        layer.update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert layer.keys.untyped_storage().data_ptr() == storage
    layer.update(torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4))
    assert layer.keys.untyped_storage().data_ptr() != storage and layer.get_seq_length() == 357


@pytest.mark.parametrize("in_place", [True, False], ids=["cpu", "elsewhere"])
def test_beam_reorders_keep_the_buffers(in_place, monkeypatch):
    """Beam search: reorder then write one position, step after step. On the CPU the layer reorders in place (one
    buffer); elsewhere it keeps two buffers and alternates between them (one copy per step, spare room kept). Either
    way it holds what a `DynamicLayer` holds."""
    monkeypatch.setattr(fast_decoding(), "reorders_in_place", lambda device: in_place)
    layer, plain = fast_decoding().GrowingKVLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 4, 2, 10, 8, generator=generator)
    layer.update(k, v), plain.update(k, v)
    storages = set()
    for _ in range(20):
        beam_idx = torch.randint(4, (4,), generator=generator)
        layer.reorder_cache(beam_idx), plain.reorder_cache(beam_idx)
        k, v = torch.randn(2, 4, 2, 1, 8, generator=generator)
        layer.update(k, v), plain.update(k, v)
        storages.add(layer.keys.untyped_storage().data_ptr())
        _same(layer, plain, "beam step")
    assert len(storages) == (1 if in_place else 2)


def test_cpu_beam_reorders_copy_only_moved_rows_after_the_shared_prompt(monkeypatch):
    """Rows repeated per beam group over the prompt (as generate() repeats it): a reorder within the groups copies
    the rows whose beam moved and only the positions after the prompt; one across the groups copies the moved rows
    whole. What each reorder writes is recorded; the layer holds what a `DynamicLayer` holds."""
    layer, plain = fast_decoding().GrowingKVLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(2)
    k, v = torch.randn(2, 2, 3, 10, 8, generator=generator).repeat_interleave(3, dim=1)  # 2 groups of 3 beams
    layer.update(k, v), plain.update(k, v)
    writes, recording = [], [False]
    setitem = torch.Tensor.__setitem__

    def recorded(tensor, index, value):
        if recording[0]:
            writes[-1].append((value.shape[0], value.shape[2]))  # (rows, positions)
        return setitem(tensor, index, value)

    monkeypatch.setattr(torch.Tensor, "__setitem__", recorded)
    orders = [[0, 0, 2, 3, 5, 5], [1, 1, 2, 3, 3, 4], [3, 4, 5, 0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 0, 2, 3, 5, 5]]
    for step, beam_idx in enumerate(orders):
        writes.append([])
        recording[0] = True
        layer.reorder_cache(torch.tensor(beam_idx))
        recording[0] = False
        plain.reorder_cache(torch.tensor(beam_idx))
        k, v = torch.randn(2, 6, 3, 1, 8, generator=generator)
        layer.update(k, v), plain.update(k, v)
        _same(layer, plain, f"step {step}")
    # lengths 10..14 at the reorders; keys and values written alike
    assert writes == [[], [(3, 1)] * 2, [(6, 12)] * 2, [], [(2, 4)] * 2]


def test_crop_keeps_writing_into_the_buffer():
    layer, plain = fast_decoding().GrowingKVLayer(), DynamicLayer()
    k, v = torch.randn(2, 1, 2, 20, 4)
    layer.update(k, v), plain.update(k, v)
    storage = layer.keys.untyped_storage().data_ptr()
    layer.crop(-5), plain.crop(-5)
    k, v = torch.randn(2, 1, 2, 3, 4)
    layer.update(k, v), plain.update(k, v)
    _same(layer, plain, "crop then update")
    assert layer.keys.untyped_storage().data_ptr() == storage


def test_beam_shared_layer_skips_exactly_the_reorders_that_change_nothing():
    """Rows repeated per beam group (as generate() repeats the encoder output): a reorder within the groups keeps
    the very tensors; one across groups gathers, and the layer still holds what a `DynamicLayer` holds."""
    layer, plain = fast_decoding().BeamSharedKVLayer(), DynamicLayer()
    generator = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 2, 3, 7, 4, generator=generator).repeat_interleave(3, dim=1)  # 2 groups of 3 beams
    k[3:, 0, 0, 0] = 0.0
    k[5, 0, 0, 0] = -0.0  # equal to 0.0 but not the same bits: beam 5 is not shared with beams 3 and 4
    layer.update(k, v), plain.update(k, v)
    keys = layer.keys
    for beam_idx in ([0, 0, 2, 3, 3, 5], [1, 2, 0, 4, 3, 5], [2, 2, 2, 4, 4, 5]):
        layer.reorder_cache(torch.tensor(beam_idx)), plain.reorder_cache(torch.tensor(beam_idx))
        assert layer.keys is keys, beam_idx
        _same(layer, plain, f"within groups {beam_idx}")
    for beam_idx in ([0, 1, 2, 3, 5, 5], [3, 3, 3, 0, 0, 0], [0, 1, 2, 3, 4, 4]):
        layer.reorder_cache(torch.tensor(beam_idx)), plain.reorder_cache(torch.tensor(beam_idx))
        _same(layer, plain, f"across groups {beam_idx}")


@pytest.mark.parametrize("family", ["bart", "sparse"])
def test_beam_search_with_the_fast_layers_gives_the_plain_layers_ids(family, monkeypatch):
    """Beam search (4 beams, batch 2, a padded row) with growing and beam-shared layers returns the ids and scores
    of plain `DynamicLayer` caches; BART's cross-attention cache is never gathered."""
    model = _other_family(family)
    module = _fast_decoding_of(model)
    ids = torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=9, min_new_tokens=9, num_beams=4, num_return_sequences=2,
                  do_sample=False, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    cross_gathers = []
    original = DynamicLayer.reorder_cache

    def counting(layer, beam_idx):
        cross_gathers.append(type(layer).__name__)
        return original(layer, beam_idx)

    monkeypatch.setattr(DynamicLayer, "reorder_cache", counting)
    with torch.no_grad():
        fast = model.generate(ids, **kwargs)
        assert "BeamSharedKVLayer" not in cross_gathers and "GrowingKVLayer" not in cross_gathers
        monkeypatch.setattr(module, "use_growing_kv_layers", lambda cache: None)
        plain = model.generate(ids, **kwargs)
    assert torch.equal(fast.sequences, plain.sequences)
    assert torch.equal(fast.sequences_scores, plain.sequences_scores)


def test_only_fresh_dynamic_caches_get_growing_layers():
    module = fast_decoding()
    config = tiny_model().config
    fresh = DynamicCache(config=config)
    module.use_growing_kv_layers(fresh)
    assert all(type(layer) is module.GrowingKVLayer for layer in fresh.layers)

    filled = DynamicCache(config=config)
    filled.update(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 3, 8), 0)
    module.use_growing_kv_layers(filled)
    assert all(type(layer) is DynamicLayer for layer in filled.layers)


def test_generate_decodes_with_growing_layers_and_equals_the_uncached_ids():
    model = tiny_model()
    generator = torch.Generator().manual_seed(3)
    ids = torch.tensor([random_prompt(generator, 9) for _ in range(2)])
    out = model.generate(ids, max_new_tokens=12, do_sample=False, return_dict_in_generate=True)
    assert all(type(layer).__name__ == "GrowingKVLayer" for layer in out.past_key_values.layers)
    uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, uncached)


def _decode_step_inputs(model, batch: int):
    generator = torch.Generator().manual_seed(batch)
    ids = torch.tensor([random_prompt(generator, 7) for _ in range(batch)])
    prefill = model(ids, use_cache=True)
    next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
    full = torch.cat((ids, next_ids), dim=1)
    positions = model.transformer.get_position_ids(full)[..., -1:]
    return dict(input_ids=next_ids, position_ids=positions, past_key_values=prefill.past_key_values)


@pytest.mark.parametrize(
    "dtype, batch, switched",
    [(torch.bfloat16, 1, True), (torch.bfloat16, 2, False), (torch.float32, 1, False)],
    ids=["bf16-b1", "bf16-b2", "fp32-b1"],
)
def test_onednn_is_switched_off_exactly_for_batch1_bf16_decode_steps(dtype, batch, switched):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    model = tiny_model().to(dtype)
    seen = []
    model.transformer.layers[0].register_forward_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    with torch.no_grad():
        inputs = _decode_step_inputs(model, batch)
        seen.clear()
        model(**inputs)
    assert seen == [not switched]
    assert torch.backends.mkldnn.enabled


def test_a_head_whose_weight_is_a_method_keeps_onednn():
    """A quantized LM head (torch.ao's dynamic int8 Linear, applied by a user after loading) exposes `weight()` as a
    method: the batch-1 step leaves oneDNN as it is instead of failing on `weight.device`."""
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        step = _decode_step_inputs(model, 1)
    context = fast_decoding().fast_cpu_gemv(step["input_ids"], step["past_key_values"], lambda: None)
    with context:
        assert torch.backends.mkldnn.enabled


def test_onednn_flag_is_restored_when_the_step_raises():
    model = tiny_model().to(torch.bfloat16)
    with torch.no_grad():
        step = _decode_step_inputs(model, 1)  # a one-token step after a cached prompt: switched

    def boom(*_):
        raise RuntimeError("boom")

    model.transformer.layers[0].register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.tensor([[5, GMASK, SOP]]))  # 3 tokens: not switched
    with pytest.raises(RuntimeError, match="boom"):
        model(**step)
    assert torch.backends.mkldnn.enabled


def test_fast_gemv_gives_the_onednn_logits_and_greedy_ids():
    model = tiny_model().to(torch.bfloat16)
    generator = torch.Generator().manual_seed(5)
    ids = torch.tensor([random_prompt(generator, 9)])
    with torch.no_grad():
        inputs = _decode_step_inputs(model, 1)
        fast = model(**inputs).logits
        inputs = _decode_step_inputs(model, 1)
        module = modeling_module()
        original = module.fast_cpu_gemv
        module.fast_cpu_gemv = lambda tokens, cache, weight, mems=None: original(None, cache, weight)  # never switch
        try:
            reference = model(**inputs).logits
            reference_ids = model.generate(ids, max_new_tokens=10, do_sample=False)
        finally:
            module.fast_cpu_gemv = original
        fast_ids = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert_close(fast.float(), reference.float(), atol=0.05, msg="bf16 logits: gemv vs oneDNN")
    assert torch.equal(fast_ids, reference_ids)


@pytest.mark.parametrize("family", ["bart", "sparse"])
def test_bart_and_sparse_gpt2_decode_with_both_speedups(family):
    """The other families use the same module: growing layers in generate()'s cache (BART: its self-attention
    half), and oneDNN switched off for batch-1 bf16 decoding steps only (BART: never while the encoder runs)."""
    model = _other_family(family).to(torch.bfloat16)
    blocks = model.model.decoder.layers if family == "bart" else model.model.layers
    seen = []
    blocks[0].register_forward_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    ids = torch.randint(5, 60, (1, 6))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values.self_attention_cache if family == "bart" else out.past_key_values
    assert all(type(layer).__name__ == "GrowingKVLayer" for layer in cache.layers)
    if torch.backends.mkldnn.is_available():
        # BART: 4 one-token decoder steps, the first computing the cross-attention keys/values of all 6 source
        # tokens (so not switched); sparse GPT-2: the 6-token prompt, then 3 one-token steps
        assert seen == [True] + [False] * 3
        assert torch.backends.mkldnn.enabled


def test_sparse_gpt2_memory_steps_keep_onednn():
    """With CogView's memory, a one-token step projects every memory row too: not a gemv, so oneDNN stays on."""
    from fixtures import repo_module, sparse_config

    model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(sparse_config(max_memory_length=16))
    model = model.eval().to(torch.bfloat16)
    seen = []
    model.model.layers[0].register_forward_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    with torch.no_grad():
        out = model(torch.randint(5, 60, (1, 6)), use_cache=False)
        model(torch.randint(5, 60, (1, 1)), mems=out.mems)
    assert seen == [True, True]


# ----------------------------------------------------------------------------------------------------------------
# one_token_attention: sdpa's result for one query token, picked only where it is faster
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
@pytest.mark.parametrize("batch, keys", [(1, 7), (3, 40)])
def test_one_token_attention_computes_what_sdpa_computes(dtype, mask_kind, batch, keys):
    generator = torch.Generator().manual_seed(batch * keys)
    heads, dim = 4, 16
    query = torch.randn(batch, heads, 1, dim, generator=generator)
    # keys and values as a growing cache holds them: a view of a buffer with spare room
    buffers = torch.randn(2, batch, heads, keys + 5, dim, generator=generator)
    key, value = buffers[0, :, :, :keys], buffers[1, :, :, :keys]
    allowed = torch.rand(batch, 1, 1, keys, generator=generator) > 0.3
    allowed[..., -1] = True  # the token itself
    mask = {"none": None, "bool": allowed, "additive": torch.zeros(allowed.shape).masked_fill(~allowed, -1e4)}
    mask = mask[mask_kind]
    scaling = 0.3
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask if mask_kind != "additive" else mask, scale=scaling
    ).transpose(1, 2)
    low = (query.to(dtype), key.to(dtype), value.to(dtype))
    low_mask = mask.to(dtype) if mask_kind == "additive" else mask
    got, weights = fast_decoding().one_token_attention(None, *low, low_mask, scaling=scaling)
    assert weights is None and got.dtype == dtype and got.shape == (batch, 1, heads, dim)
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert_close(got.float(), expected, atol=tolerance, msg=f"{dtype} {mask_kind}")


class _Attention(torch.nn.Module):
    def __init__(self, implementation: str):
        super().__init__()
        self.config = type("Config", (), {"_attn_implementation": implementation})()


@pytest.mark.parametrize(
    "implementation, dtype, queries, keys, training, picked",
    [
        ("sdpa", torch.bfloat16, 1, 1024, False, "one_token"),
        ("sdpa", torch.float16, 1, 1024, False, "one_token"),
        ("sdpa", torch.bfloat16, 1, 16, False, "sdpa"),  # too little work: sdpa is as fast
        ("sdpa", torch.bfloat16, 2, 1024, False, "sdpa"),  # a prompt, not a decode step
        ("sdpa", torch.float32, 1, 1024, False, "sdpa"),  # fp32 sdpa is fast
        ("sdpa", torch.bfloat16, 1, 1024, True, "sdpa"),  # training: dropout is sdpa's
        ("eager", torch.bfloat16, 1, 1024, False, "eager"),
    ],
)
def test_attention_function_picks_one_token_attention_only_where_it_is_faster(
    implementation, dtype, queries, keys, training, picked
):
    module = fast_decoding()
    attention = _Attention(implementation).train(training)
    query = torch.zeros(1, 8, queries, 64, dtype=dtype)
    key = torch.zeros(1, 8, keys, 64, dtype=dtype)

    def eager(*args, **kwargs):
        raise AssertionError("not called")

    function = module.attention_function(attention, query, key, eager)
    expected = {"one_token": module.one_token_attention, "eager": eager}.get(picked)
    if expected is not None:
        assert function is expected
    else:
        assert function not in (module.one_token_attention, eager)
        assert "sdpa" in function.__name__


@pytest.mark.parametrize("family", ["glm", "bart", "sparse"])
def test_each_family_decodes_with_one_token_attention_and_keeps_its_ids(family, monkeypatch):
    """With the work threshold lowered so that tiny models qualify, every family's decode steps run
    `one_token_attention` (BART: self- and cross-attention) and generate the sdpa path's greedy ids in bf16."""
    if family == "glm":
        model = tiny_model(attn_implementation="sdpa").to(torch.bfloat16)
        generator = torch.Generator().manual_seed(5)
        ids = torch.tensor([random_prompt(generator, 9) for _ in range(2)])
    else:
        model = _other_family(family).to(torch.bfloat16)
        model.config._attn_implementation = "sdpa"
        ids = torch.randint(5, 60, (2, 6), generator=torch.Generator().manual_seed(5))
    module = _fast_decoding_of(model)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        calls = []
        original = module.one_token_attention

        def counting(*args, **kw):
            calls.append(args[1].shape)
            return original(*args, **kw)

        monkeypatch.setattr(module, "ONE_TOKEN_ATTENTION_MIN_WORK", 0)
        monkeypatch.setattr(module, "one_token_attention", counting)
        got = model.generate(ids, **kwargs)
    if family == "bart":  # every decoder step is one token (from the start token on), self- and cross-attention
        assert len(calls) == 6 * 2 * model.config.decoder_layers
    else:  # the prompt, then 5 one-token steps
        assert len(calls) == 5 * model.config.num_layers
    assert torch.equal(got, expected)


# ----------------------------------------------------------------------------------------------------------------
# compile_decode_step: the oneDNN switch around the compiled graph
# ----------------------------------------------------------------------------------------------------------------
def _fake_compile(seen: list):
    """torch.compile stand-in recording the oneDNN flag as the 'compiled' step starts."""

    def compile(function, **kwargs):
        assert kwargs == {"dynamic": True, "fullgraph": True}

        def step(*args, **kw):
            seen.append(torch.backends.mkldnn.enabled)
            return function(*args, **kw)

        return step

    return compile


@pytest.mark.parametrize(
    "family, dtype, expected",
    [
        ("glm", torch.bfloat16, [True, False, False]),  # prompt eager, then 3 compiled one-token steps: the trace,
        # with oneDNN on, then switched
        ("glm", torch.float32, [True] * 3),
        ("bart", torch.bfloat16, [True, False, False, False]),  # the first step (the trace) projects the source
        ("sparse", torch.bfloat16, [True, False, False]),
    ],
)
def test_compiled_decode_steps_switch_onednn_like_the_eager_ones(family, dtype, expected, monkeypatch):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch built without oneDNN")
    if family == "glm":
        model = tiny_model()
        ids = torch.tensor([random_prompt(torch.Generator().manual_seed(2), 5)])
    else:
        model = _other_family(family)
        ids = torch.randint(5, 60, (1, 6), generator=torch.Generator().manual_seed(2))
    model = model.to(dtype)
    seen = []
    monkeypatch.setattr(_fast_decoding_of(model).torch, "compile", _fake_compile(seen))
    with torch.no_grad():
        expected_ids = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        model.compile_decode_step()
        got = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert seen == expected
    assert torch.equal(got, expected_ids)
    assert torch.backends.mkldnn.enabled


def test_compiled_decode_step_traces_without_breaks_or_recompiles_and_keeps_the_ids():
    """Real dynamo tracing (its `eager` backend: no C++ compiler needed) of a batch-1 bf16 GLM: no graph break
    (fullgraph), no recompilation per token, the eager ids."""
    from torch._dynamo.utils import counters

    model = tiny_model().to(torch.bfloat16)
    ids = torch.tensor([random_prompt(torch.Generator().manual_seed(4), 6)])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            expected = model.generate(ids, **kwargs)
            model.compile_decode_step(backend="eager")
            got = model.generate(ids, **kwargs)
            graphs = counters["stats"]["unique_graphs"]
            longer = model.generate(ids, **{**kwargs, "max_new_tokens": 14, "min_new_tokens": 14})
        assert torch.equal(got, expected)
        assert torch.equal(longer[:, : expected.shape[1]], expected)
        # a graph for the first step's shapes, perhaps a second with the cache length symbolic; none per token
        assert 1 <= graphs <= 2 and counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
