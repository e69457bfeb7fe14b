"""Generation tests of the GLM model: generate() modes (for both variants), streaming, chat()/stream_chat().

Token comparisons tolerate only genuine float ties (top-2 logits within 1e-4 where two paths diverge).
"""

from __future__ import annotations

import pytest
import torch
from fixtures import EOP, GMASK, PAD, SOP, left_pad, random_prompt, repo_module
from fixtures import GLM_VARIANTS as VARIANTS
from fixtures import spread_glm as tiny_model
from helpers import assert_same_tokens_or_near_tie
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import TextIteratorStreamer

PROPERTY = settings(max_examples=10, deadline=None)
GREEDY = dict(do_sample=False, max_new_tokens=6)


def logits_fn(model):
    return lambda ids: model(ids).logits


def rows_from(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [random_prompt(g, n) for n in lengths]


def strip_row(sequence: torch.Tensor, prompt_width: int, prompt_len: int) -> torch.Tensor:
    """One row of a left-padded batch output: its own prompt, then generated tokens up to the first <eop>."""
    tokens = sequence[prompt_width - prompt_len :]
    generated = tokens[prompt_len:]
    stops = (generated == EOP).nonzero()
    if len(stops):
        generated = generated[: int(stops[0]) + 1]
    return torch.cat((tokens[:prompt_len], generated))


@pytest.mark.parametrize("variant", VARIANTS)
@PROPERTY
@given(lengths=st.lists(st.integers(1, 7), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_greedy_with_cache_equals_without(variant, lengths, seed):
    model = tiny_model(seed=seed % 3 + 1, variant=variant)
    ids, mask = left_pad(rows_from(seed, lengths))
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **GREEDY)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **GREEDY)
    for b in range(len(lengths)):
        real = int(mask[b].sum())
        assert_same_tokens_or_near_tie(
            strip_row(cached[b], ids.shape[1], real),
            strip_row(uncached[b], ids.shape[1], real),
            logits_fn(model),
            msg=f"row {b}",
        )


@pytest.mark.parametrize("variant", VARIANTS)
@PROPERTY
@given(lengths=st.lists(st.integers(1, 8), min_size=2, max_size=4), seed=st.integers(0, 999))
def test_batched_left_padded_greedy_equals_one_by_one(variant, lengths, seed):
    model = tiny_model(seed=seed % 3 + 1, variant=variant)
    rows = rows_from(seed, lengths)
    ids, mask = left_pad(rows)
    batched = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), **GREEDY)[0]
        assert_same_tokens_or_near_tie(
            strip_row(batched[b], ids.shape[1], len(row)),
            strip_row(alone, len(row), len(row)),
            logits_fn(model),
            msg=f"row {b}",
        )


@pytest.mark.parametrize("variant", VARIANTS)
@PROPERTY
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=2), seed=st.integers(0, 999))
def test_beam_search_with_cache_equals_without(variant, lengths, seed):
    model = tiny_model(seed=seed % 3 + 1, variant=variant)
    ids, mask = left_pad(rows_from(seed, lengths))
    beam = dict(num_beams=3, num_return_sequences=2, do_sample=False, max_new_tokens=5)
    cached = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, **beam)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beam)
    assert cached.shape[0] == 2 * len(lengths)
    assert torch.equal(cached, uncached), f"{cached}\n{uncached}"


@pytest.mark.parametrize("variant", VARIANTS)
@PROPERTY
@given(lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3), seed=st.integers(0, 999))
def test_beam_with_one_beam_equals_greedy(variant, lengths, seed):
    model = tiny_model(seed=seed % 3 + 1, variant=variant)
    ids, mask = left_pad(rows_from(seed, lengths))
    greedy = model.generate(input_ids=ids, attention_mask=mask, **GREEDY)
    one_beam = model.generate(input_ids=ids, attention_mask=mask, num_beams=1, early_stopping=True, **GREEDY)
    assert torch.equal(greedy, one_beam)


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_beam_search_equals_one_by_one(variant):
    model = tiny_model(variant=variant)
    rows = rows_from(7, [2, 6, 4])
    ids, mask = left_pad(rows)
    beam = dict(num_beams=3, do_sample=False, max_new_tokens=5)
    batched = model.generate(input_ids=ids, attention_mask=mask, **beam)
    for b, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), **beam)[0]
        assert torch.equal(strip_row(batched[b], ids.shape[1], len(row)), strip_row(alone, len(row), len(row)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampling_with_a_seed_is_reproducible_and_cache_independent(variant):
    model = tiny_model(variant=variant)
    ids, mask = left_pad(rows_from(11, [3, 5]))
    sample = dict(do_sample=True, top_p=0.9, temperature=0.8, max_new_tokens=8)
    torch.manual_seed(5)
    cached = model.generate(input_ids=ids, attention_mask=mask, **sample)
    torch.manual_seed(5)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **sample)
    assert torch.equal(cached, uncached)
    torch.manual_seed(5)
    many = model.generate(input_ids=ids, attention_mask=mask, num_return_sequences=3, **sample)
    assert many.shape[0] == 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_eos_is_eop_and_stops_generation(variant):
    model = tiny_model(variant=variant)
    assert model.generation_config.eos_token_id == EOP
    ids = torch.tensor(rows_from(3, [5]))
    free = model.generate(ids, **GREEDY)[0, ids.shape[1] :]
    assert len(free) == 6 and EOP not in free[:2].tolist()
    stop_at = int(free[1])  # pretend the second generated token is the end-of-piece token
    stopped = model.generate(ids, eos_token_id=stop_at, **GREEDY)[0, ids.shape[1] :]
    assert stopped.tolist() == free[: free.tolist().index(stop_at) + 1].tolist()


class StubTokenizer:
    """Enough of a tokenizer for chat()/stream_chat()/TextIteratorStreamer: one id per whitespace-separated word
    of the prompt, then `[gMASK] <sop>` (ChatGLM style); decode writes each id as a word."""

    def __init__(self):
        self.prompts: list[str] = []

    def __call__(self, texts: list[str], return_tensors: str = "pt"):
        self.prompts.extend(texts)
        rows = [[5 + sum(map(ord, word)) % 90 for word in text.split()] + [GMASK, SOP] for text in texts]
        ids, mask = left_pad(rows)
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids, skip_special_tokens: bool = False, **kwargs) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in (PAD, EOP, SOP, GMASK)]
        return "".join(f"w{i} " for i in ids)


def test_text_iterator_streamer_streams_the_generated_text():
    from threading import Thread

    model = tiny_model()
    tokenizer = StubTokenizer()
    inputs = tokenizer(["hello"])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **GREEDY))
    thread.start()
    pieces = list(streamer)
    thread.join()
    expected = model.generate(**inputs, **GREEDY)[0, inputs["input_ids"].shape[1] :]
    assert len([p for p in pieces if p]) > 1
    assert "".join(pieces) == tokenizer.decode(expected, skip_special_tokens=True)


def test_chat_builds_chatglm_prompts_and_returns_history():
    model = tiny_model()
    tokenizer = StubTokenizer()
    response, history = model.chat(tokenizer, "q0", history=None, do_sample=False, max_length=10)
    assert tokenizer.prompts[-1] == "q0"
    assert history == [("q0", response)]
    inputs = tokenizer(["q0"])
    expected = model.generate(**inputs, do_sample=False, max_length=10)[0, inputs["input_ids"].shape[1] :]
    assert response == tokenizer.decode(expected, skip_special_tokens=True).strip()

    response2, history2 = model.chat(tokenizer, "q1", history=history, do_sample=False, max_length=40)
    assert tokenizer.prompts[-1] == f"[Round 0]\n问：q0\n答：{response}\n[Round 1]\n问：q1\n答："
    assert history2 == [("q0", response), ("q1", response2)]
    assert history == [("q0", response)]  # the caller's history is not mutated


def test_stream_chat_yields_growing_responses_ending_with_chats_answer():
    model = tiny_model()
    tokenizer = StubTokenizer()
    history = [("a", "b")]
    final, _ = model.chat(tokenizer, "q", history=history, do_sample=False, max_length=40)
    steps = list(model.stream_chat(tokenizer, "q", history=history, do_sample=False, max_length=40))
    assert len(steps) > 1
    assert all(len(a[0]) <= len(b[0]) for a, b in zip(steps, steps[1:]))
    assert steps[-1] == (final, history + [("q", final)])


def test_stream_chat_reraises_generation_errors():
    model = tiny_model()
    with pytest.raises(ValueError):  # generate() refuses a streamer with beam search, in the worker thread
        list(model.stream_chat(StubTokenizer(), "q", num_beams=2, max_length=40))


@pytest.mark.parametrize(
    "query,history,name",
    [
        (["hi"], None, "query"),
        ("hi", "hello", "history"),
        ("hi", ["q", "a"], r"history\[0\]"),
        ("hi", [("q", "a", "b")], r"history\[0\]"),
        ("hi", [{"role": "user", "content": "q"}], r"history\[0\]"),
        ("hi", [("q", None)], r"history\[0\]"),
    ],
)
def test_chat_refuses_a_history_of_another_shape(query, history, name):
    model = tiny_model()
    with pytest.raises(TypeError, match=rf"^{name}"):
        model.chat(StubTokenizer(), query, history, max_length=40)
    with pytest.raises(TypeError, match=rf"^{name}"):
        next(model.stream_chat(StubTokenizer(), query, history, max_length=40))


def test_process_response_matches_chatglm():
    process = repo_module("glm_generation").process_response
    assert process("  你好,世界!  ") == "你好，世界！"
    assert process("a, b! c: d; e?") == "a, b! c: d; e?"
    assert process("今天是[[训练时间]]吗?") == "今天是2023年吗？"


def test_invalid_scores_are_replaced():
    processor = repo_module("glm_generation").InvalidScoreLogitsProcessor()
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    fixed = processor(None, scores)
    assert fixed.argmax().item() == 5 and torch.isfinite(fixed).all()
    masked = torch.tensor([[0.0, float("-inf"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    assert torch.equal(processor(None, masked), masked)
