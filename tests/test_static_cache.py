"""A fixed-size KV cache (`generate(..., cache_implementation="static")` or a `StaticCache` passed in) for GLM,
sparse GPT-2 (mode 0) and BART-gen: the same tokens as the default dynamic cache, and a decode step that compiles to
one graph (GLM, sparse GPT-2).

With a static cache the keys and values live in buffers of `max_cache_len` slots; the mask (GLM's prefix-LM mask,
sparse GPT-2's causal one) is built over all of them from `cache_position` (the step's slots), so every decode step
has the same shapes and `torch.compile(fullgraph=True)` (what transformers' auto-compile uses, with CUDA graphs on a
GPU) traces it once. Here the compile runs on the CPU with the `eager` backend (no C++ toolchain needed): the graph
count is what a GPU run would capture. Sparse GPT-2's mode 2 (sparse inference) builds each decode step's window and
pivots over all the slots from the step's slot, with the dynamic cache's random numbers (the same pivots, the same
ids); mode 1 (training) refuses a static cache clearly. BART-gen's self-attention cache is static and its cross-attention cache holds the
source's keys (generate() sizes it to the source).

generate() sizes its own static cache in buckets (`fast_decoding.static_cache_slots`: powers of two from 256, at most
the model's positions), so prompts of different lengths share a graph; `model.compile_decode_step()` takes this
static path by default on a GPU (and here, forced, on the CPU): a static cache, a step compiled with fixed shapes
(CUDA graphs on a GPU) for greedy, sampled and beam decoding.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import bart_config, left_pad, prompt, repo_module, sparse_config, spread_weights
from fixtures import spread_glm as tiny_model
from torch._dynamo.utils import counters
from transformers import CompileConfig
from transformers.cache_utils import StaticCache

output_cache = repo_module("transformers_compat").output_cache
fast_decoding = repo_module("fast_decoding")
VARIANTS = ["chatglm", "glm"]
MODES = {
    "greedy": dict(do_sample=False),
    "beam": dict(do_sample=False, num_beams=3),
    "sample": dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0),
}


def batch(context_lengths=(4, 2)):
    """A left-padded batch of prompts of different lengths (the shorter row padded)."""
    return left_pad([prompt(list(range(5, 5 + n))) + [9] for n in context_lengths])


def sparse_model(attn: str = "sdpa", **overrides):
    """A tiny sparse GPT-2 with spread weights (varied tokens)."""
    torch.manual_seed(0)
    config = sparse_config(**overrides)
    config._attn_implementation = attn
    model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(config).eval()
    with torch.no_grad():
        return spread_weights(model, seed=11)


def sparse_batch(lengths=(9, 5)):
    generator = torch.Generator().manual_seed(sum(lengths))
    return left_pad([torch.randint(1, 120, (n,), generator=generator).tolist() for n in lengths])


def bart_model(attn: str = "sdpa"):
    """A tiny BART-gen with spread weights (varied tokens)."""
    torch.manual_seed(0)
    config = bart_config()
    config._attn_implementation = attn
    model = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(config).eval()
    with torch.no_grad():
        return spread_weights(model, seed=9)


def bart_batch(lengths=(7, 4)):
    """Sources of different lengths, right-padded (BART's tokenizers pad on the right)."""
    generator = torch.Generator().manual_seed(sum(lengths))
    ids = torch.full((len(lengths), max(lengths)), bart_config().pad_token_id)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n], mask[row, :n] = torch.randint(3, 99, (n,), generator=generator), 1
    return ids, mask


# family -> (model builder taking the attention implementation, batch builder taking prompt lengths, two lengths)
FAMILIES = {
    "glm-chatglm": (
        lambda attn="sdpa": tiny_model(variant="chatglm", attn_implementation=attn),
        batch,
        ((4, 2), (9, 1)),
    ),
    "glm-glm": (lambda attn="sdpa": tiny_model(variant="glm", attn_implementation=attn), batch, ((4, 2), (9, 1))),
    "gpt2_sparse": (sparse_model, sparse_batch, ((9, 5), (3, 12))),
    # mode 2 (sparse inference): prompts past the 8-key window, so that pivots are drawn at every step
    "gpt2_sparse-mode2": (lambda attn="sdpa": sparse_model(attn, is_sparse=2), sparse_batch, ((40, 30), (20, 45))),
    "bart_gen": (bart_model, bart_batch, ((7, 4), (3, 9))),
}
COMPILED = [name for name in FAMILIES if name != "bart_gen"]  # BART: one StaticCache cannot serve every source


def generate(model, ids, mask, mode: str, new_tokens: int = 8, **kwargs):
    torch.manual_seed(0)
    lengths = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    return model.generate(input_ids=ids, attention_mask=mask, **lengths, **MODES[mode], **kwargs)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_static_cache_generates_the_dynamic_cache_tokens(family, mode, attn):
    build, make_batch, (lengths, _) = FAMILIES[family]
    model = build(attn)
    ids, mask = make_batch(lengths)
    dynamic = generate(model, ids, mask, mode)
    static = generate(model, ids, mask, mode, cache_implementation="static", return_dict_in_generate=True)
    cache = output_cache(static)
    cache = getattr(cache, "self_attention_cache", cache)  # BART-gen: an EncoderDecoderCache
    assert isinstance(cache, StaticCache), f"generate() used {type(cache).__name__}, not a StaticCache"
    assert torch.equal(static.sequences, dynamic), f"{family} {mode} {attn}: static cache tokens differ"
    assert len(set(dynamic[:, -8:].flatten().tolist())) > 2, "constant tokens would prove little"


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_static_cache_passed_in_serves_prompts_of_any_length(variant):
    """One StaticCache, reset between calls, for two prompt lengths: each gives the dynamic cache's tokens."""
    model = tiny_model(variant=variant)
    cache = StaticCache(config=model.config, max_cache_len=40)
    for lengths in ((4, 2), (9, 1)):
        ids, mask = batch(lengths)
        cache.reset()
        static = generate(model, ids, mask, "greedy", past_key_values=cache)
        assert torch.equal(static, generate(model, ids, mask, "greedy")), f"{variant} prompt lengths {lengths}"


def compile_on_cpu(model) -> None:
    """transformers' own auto-compile of the decode step (fullgraph, static shapes), on the CPU as on a GPU."""
    config = CompileConfig(backend="eager", fullgraph=True, dynamic=False)
    config._compile_all_devices = True  # transformers compiles on CUDA only unless asked
    model.generation_config.compile_config = config
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("family", COMPILED)
def test_compiled_static_decode_is_one_graph_for_every_token_and_prompt_length(family):
    build, make_batch, all_lengths = FAMILIES[family]
    model = build()
    expected = {lengths: generate(model, *make_batch(lengths), "greedy") for lengths in all_lengths}
    compile_on_cpu(model)
    cache = StaticCache(config=model.config, max_cache_len=64)
    for lengths, dynamic in expected.items():
        cache.reset()
        compiled = generate(model, *make_batch(lengths), "greedy", past_key_values=cache)
        assert torch.equal(compiled, dynamic), f"{family} {lengths}: the compiled static decode's tokens differ"
    assert counters["stats"]["unique_graphs"] == 1, f"decode steps compiled {dict(counters['stats'])} graphs"
    assert counters["stats"]["calls_captured"] > 0, "nothing was compiled: the test would prove nothing"


@pytest.mark.parametrize("rows", [2, 1])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cache_implementation_static_compiles_once_per_generate(variant, rows):
    """generate()'s own StaticCache with transformers' auto-compile: no recompilation from one token to the next
    (at batch 1 too, where a step's ids sliced from the sequence would change strides every token)."""
    model = tiny_model(variant=variant)
    ids, mask = batch() if rows == 2 else (torch.tensor([prompt([5, 6, 7, 8]) + [9]]), None)
    dynamic = generate(model, ids, mask, "greedy")
    compile_on_cpu(model)
    assert torch.equal(generate(model, ids, mask, "greedy", cache_implementation="static"), dynamic)
    assert counters["stats"]["unique_graphs"] == 1, f"decode steps compiled {dict(counters['stats'])} graphs"


def self_attention_slots(output) -> int:
    return repo_module("transformers_compat").fixed_cache_size(output_cache(output))


def test_static_cache_slots_are_powers_of_two_from_256_within_the_models_positions():
    slots = fast_decoding.static_cache_slots
    assert [slots(n, 2048) for n in (1, 20, 256, 257, 600, 1024, 1025, 2048)] == [
        256,
        256,
        256,
        512,
        1024,
        1024,
        2048,
        2048,
    ]
    assert [slots(n, 300) for n in (20, 256, 257, 300)] == [256, 256, 300, 300]  # capped at the model's positions
    assert slots(20, 64) == 64 and slots(100, 64) == 100  # more than the model has: its own check names the problem
    assert slots(20, None) == 256


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generate_sizes_its_static_cache_to_the_bucket(family):
    """The tiny models have fewer positions (40-96) than the smallest bucket: every call gets them all, one size."""
    build, make_batch, all_lengths = FAMILIES[family]
    model = build()
    for lengths in all_lengths:
        output = generate(
            model, *make_batch(lengths), "greedy", cache_implementation="static", return_dict_in_generate=True
        )
        assert self_attention_slots(output) == model.config.max_position_embeddings, f"{family} {lengths}"


def test_generate_grows_its_static_cache_a_bucket_at_a_time():
    """A GLM with 600 positions: 15 and 20 positions needed share 256 slots, 280 takes 512, and a short prompt after
    it keeps the 512 (transformers reuses a large enough cache: no new graph)."""
    model = tiny_model(max_sequence_length=600)
    slots = []
    for context in (4, 9, 270, 4):
        ids, mask = left_pad([prompt([5 + i % 50 for i in range(context)])])
        output = generate(model, ids, mask, "greedy", cache_implementation="static", return_dict_in_generate=True)
        slots.append(self_attention_slots(output))
    assert slots == [256, 256, 512, 512]


def test_bart_sources_are_padded_to_a_bucket_length_for_a_static_cache():
    """BART-gen with 512 positions: sources of 7 and 30 tokens become 64 (masked padding on the right), 70 becomes
    128, and generate() sizes the cross-attention cache to that; a dynamic cache keeps the source as it is. The ids
    are those of the unpadded source either way."""
    torch.manual_seed(0)
    config = bart_config(max_position_embeddings=512)
    model = spread_weights(repo_module("modeling_bart_gen").BartGenForConditionalGeneration(config).eval(), seed=9)
    compat = repo_module("transformers_compat")
    for lengths, bucket in (((7, 4), 64), ((30, 9), 64), ((70, 12), 128)):
        ids, mask = bart_batch(lengths)
        dynamic = generate(model, ids, mask, "greedy")
        static = generate(model, ids, mask, "greedy", cache_implementation="static", return_dict_in_generate=True)
        cross = compat.output_cache(static).cross_attention_cache
        assert cross.layers[0].max_cache_len == bucket, f"source lengths {lengths}"
        assert torch.equal(static.sequences, dynamic), f"source lengths {lengths}"
    inputs, kwargs = fast_decoding.static_source_inputs(model, ids, {"attention_mask": mask})
    assert inputs is ids and kwargs == {"attention_mask": mask}  # no static cache asked for: unchanged


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_decode_step_static_is_one_graph_for_prompts_of_every_length(family, mode):
    """`compile_decode_step(static=True)` (a GPU's default) on the CPU with the eager backend: generate() creates a
    static cache, the decode steps of greedy, beam and sampled decoding run compiled and give the dynamic cache's
    ids; one graph for both prompt lengths (BART-gen: both sources padded to one bucket length; a second graph for
    its first step, which projects the source for cross-attention)."""
    build, make_batch, all_lengths = FAMILIES[family]
    model = build()
    expected = {lengths: generate(model, *make_batch(lengths), mode) for lengths in all_lengths}
    model.compile_decode_step(static=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    for lengths, dynamic in expected.items():
        compiled = generate(model, *make_batch(lengths), mode, return_dict_in_generate=True)
        cache = output_cache(compiled)
        assert isinstance(getattr(cache, "self_attention_cache", cache), StaticCache), type(cache).__name__
        assert torch.equal(compiled.sequences, dynamic), f"{family} {lengths}: the compiled static decode's ids differ"
    # BART-gen: transformers before 5.15 reuse generate()'s cache, whose reset leaves the first step one more guard
    # to trace (cross-attention's `is_updated` entries present, False), once
    graphs = (2, 3) if family == "bart_gen" else (1,)
    assert counters["stats"]["unique_graphs"] in graphs, f"decode steps compiled {dict(counters['stats'])} graphs"
    assert counters["stats"]["calls_captured"] > 0, "nothing was compiled: the test would prove nothing"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_decode_step_static_at_batch_1_does_not_trace_per_token(family):
    """At batch 1 a step's ids sliced from the growing sequence ([1, 1], strides that change every token) would make
    the fixed-shape graph trace again per token; the step inputs are fresh tensors."""
    build, make_batch, (lengths, _) = FAMILIES[family]
    model = build()
    ids, mask = make_batch(lengths)
    assert mask[0].all()  # the first row is the longest: one prompt with no padding
    ids, mask = ids[:1], None
    dynamic = generate(model, ids, mask, "greedy")
    model.compile_decode_step(static=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(generate(model, ids, mask, "greedy"), dynamic)
    graphs = 2 if family == "bart_gen" else 1
    assert counters["stats"]["unique_graphs"] == graphs, f"decode steps compiled {dict(counters['stats'])} graphs"


def test_compile_decode_step_static_leaves_a_callers_cache_choice_alone():
    """A call that chooses a dynamic cache gets one, decoded by a dynamic-shape graph: the fixed-shape one would be
    traced again per token (and, with `fullgraph=True`, fail at torch's recompile limit)."""
    model = tiny_model()
    ids, mask = batch()
    expected = generate(model, ids, mask, "greedy", new_tokens=16)
    model.compile_decode_step(static=True, backend="eager")
    torch._dynamo.reset()
    counters.clear()
    dynamic = generate(model, ids, mask, "greedy", 16, cache_implementation="dynamic", return_dict_in_generate=True)
    assert not isinstance(output_cache(dynamic), StaticCache)
    assert torch.equal(dynamic.sequences, expected)
    assert 0 < counters["stats"]["unique_graphs"] <= 2, f"15 decode steps compiled {dict(counters['stats'])} graphs"
    given = StaticCache(config=model.config, max_cache_len=40)
    assert torch.equal(generate(model, ids, mask, "greedy", 16, past_key_values=given), dynamic.sequences)
    assert model.generation_config.cache_implementation is None  # nothing saved with the model changes


def test_compile_decode_step_called_again_replaces_the_first():
    """A second call compiles the model's own forward again (not the first call's compiled wrapper around it)."""
    model = tiny_model()
    ids, mask = batch()
    expected = generate(model, ids, mask, "greedy")
    model.compile_decode_step(static=True, backend="eager")
    model.compile_decode_step(static=False, backend="eager")
    assert model.forward.__wrapped__ == type(model).forward.__get__(model)
    assert not model._decodes_static
    assert torch.equal(generate(model, ids, mask, "greedy"), expected)


def test_compile_decode_step_chooses_the_static_path_on_accelerators_for_configurations_that_take_it():
    choose = fast_decoding.decodes_with_static_cache
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    glm = tiny_model().config
    assert choose(cuda, glm) and not choose(cpu, glm)
    assert not choose(cuda, tiny_model(pre_seq_len=2).config)  # P-tuning needs the dynamic cache
    assert choose(cuda, sparse_model().config) and choose(cuda, bart_model().config)
    assert choose(cuda, sparse_model(is_sparse=2).config) and not choose(cuda, sparse_model(is_sparse=1).config)
    model = tiny_model()
    model.compile_decode_step(backend="eager")  # on the CPU: the dynamic-shape path, generate()'s cache untouched
    assert model.generation_config.cache_implementation is None


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compile_decode_step_on_a_gpu_uses_cuda_graphs_and_gives_the_eager_ids(family):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    build, make_batch, all_lengths = FAMILIES[family]
    model = build().cuda()
    batches = {lengths: [t.cuda() for t in make_batch(lengths)] for lengths in all_lengths}
    expected = {lengths: generate(model, *inputs, "greedy") for lengths, inputs in batches.items()}
    model.compile_decode_step()
    assert model._decodes_static
    torch._dynamo.reset()
    counters.clear()
    for lengths, inputs in batches.items():
        assert torch.equal(generate(model, *inputs, "greedy"), expected[lengths]), f"{family} {lengths}"
    graphs = (2, 3) if family == "bart_gen" else (1,)  # BART-gen's first step projects the source (see above)
    assert counters["stats"]["unique_graphs"] in graphs, f"decode steps compiled {dict(counters['stats'])} graphs"


def test_static_cache_refusals_name_the_problem():
    model = tiny_model()
    ids, mask = batch()
    cache = StaticCache(config=model.config, max_cache_len=40)
    with pytest.raises(ValueError, match="needs cache_position"):
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="exceeds max_sequence_length"):
        too_long = StaticCache(config=model.config, max_cache_len=model.config.max_sequence_length + 1)
        model(input_ids=ids, past_key_values=too_long, cache_position=torch.arange(ids.shape[1]))
    with pytest.raises(ValueError, match="position_ids are needed to continue a fixed-size cache"):
        model(input_ids=ids, attention_mask=F_pad(mask, 40), past_key_values=cache, cache_position=torch.arange(7))
    ptuning = tiny_model(pre_seq_len=2)
    with pytest.raises(ValueError, match="P-tuning"):
        ptuning.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")


def F_pad(mask: torch.Tensor, size: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (0, size - mask.shape[1]), value=1)


def test_static_forward_by_hand_matches_the_dynamic_forward():
    """Prefill and one decode step written out by hand with a StaticCache: the logits of the dynamic cache."""
    model = tiny_model()
    ids, mask = batch()
    positions = model.transformer.get_position_ids(ids, mask)
    dynamic = model(input_ids=ids, attention_mask=mask)
    cache = StaticCache(config=model.config, max_cache_len=16)
    static = model(
        input_ids=ids, attention_mask=F_pad(mask, 16), position_ids=positions, past_key_values=cache,
        cache_position=torch.arange(ids.shape[1]),
    )  # fmt: skip
    torch.testing.assert_close(static.logits, dynamic.logits, atol=1e-5, rtol=1e-5)
    next_ids = dynamic.logits[:, -1:].argmax(-1)
    full_ids, full_mask = torch.cat((ids, next_ids), 1), torch.cat((mask, torch.ones_like(next_ids)), 1)
    step_positions = model.transformer.get_position_ids(full_ids, full_mask)[..., -1:]
    dynamic_step = model(
        input_ids=next_ids, attention_mask=full_mask, position_ids=step_positions,
        past_key_values=output_cache(dynamic),
    )  # fmt: skip
    static_step = model(
        input_ids=next_ids, attention_mask=F_pad(full_mask, 16), position_ids=step_positions, past_key_values=cache,
        cache_position=torch.tensor([ids.shape[1]]),
    )  # fmt: skip
    torch.testing.assert_close(static_step.logits, dynamic_step.logits, atol=1e-5, rtol=1e-5)


def test_sparse_gpt2_static_cache_refusals_name_the_problem():
    model = sparse_model()
    ids, mask = sparse_batch()
    cache = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="needs cache_position"):
        model(input_ids=ids, attention_mask=F_pad(mask, 32), past_key_values=cache)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        too_long = StaticCache(config=model.config, max_cache_len=model.config.max_position_embeddings + 1)
        model(input_ids=ids, past_key_values=too_long, cache_position=torch.arange(ids.shape[1]))
    with pytest.raises(ValueError, match="is_sparse=1 needs the default dynamic cache"):
        sparse_model().generate(ids, attention_mask=mask, max_new_tokens=2, is_sparse=1, cache_implementation="static")
    with pytest.raises(ValueError, match=r"image_mask must be .* covering the 9 positions so far, got \(2, 5\)"):
        sparse_model().generate(  # a fresh model each: 4.57's generate() cannot reuse the static cache of a failed call
            ids, attention_mask=mask, max_new_tokens=2, is_sparse=2, image_mask=mask[:, :5].bool(),
            cache_implementation="static",
        )  # fmt: skip
    with pytest.raises(ValueError, match="sep .* needs the default dynamic cache"):
        model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(ids.shape[1]), sep=2)


def test_sparse_mode2_compiled_step_refuses_a_generator_by_name():
    """torch.compile cannot trace a torch.Generator: the pivot draw says so instead of an opaque tracing error."""
    model = sparse_model(is_sparse=2)
    model.compile_decode_step(static=True, backend="eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="generator= cannot drive the pivot sampling of a compiled step"):
        generate(model, *sparse_batch((40, 30)), "greedy", generator=torch.Generator().manual_seed(0))


@pytest.mark.slow
def test_compile_decode_step_static_with_inductor_draws_mode2_pivots_as_eager_does():
    """The static path's default inductor options take eager's random numbers (`fallback_random`): sparse GPT-2's
    mode 2, whose pivots are drawn inside the compiled step, generates the eager ids (inductor's own random numbers
    would draw other pivots)."""
    model = sparse_model(is_sparse=2)
    expected = {lengths: generate(model, *sparse_batch(lengths), "sample") for lengths in ((40, 30), (20, 45))}
    model.compile_decode_step(static=True)
    torch._dynamo.reset()
    counters.clear()
    for lengths, eager in expected.items():
        assert torch.equal(generate(model, *sparse_batch(lengths), "sample"), eager), f"prompt lengths {lengths}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
