"""Pipelines and streaming with every family (issue 9): `pipeline("text-generation", ...)` for GLM and sparse GPT-2,
`pipeline("text2text-generation", ...)` for BART-gen on transformers 4.57 and 5.x, `TextStreamer` /
`TextIteratorStreamer` with `generate()`, and GLM's `stream_chat` ending with `chat`'s answer.

Pipelines load from a folder, so they run in a fresh process (one for all families); the expected ids and texts
come from `generate()` on the same folder loaded in this process, without any pipeline machinery.
"""

from __future__ import annotations

import json
from threading import Thread

import pytest
import torch
import transformers
from fixtures.hub_folders import FAMILIES, folder, load, run_fresh_here
from transformers import TextIteratorStreamer, TextStreamer

IS_V5 = int(transformers.__version__.split(".")[0]) >= 5
CAUSAL = [name for name in FAMILIES if name != "bart_gen"]
NEW_TOKENS = 6

PIPELINES = """
    import json, sys, torch, transformers
    from transformers import pipeline
    folders, new_tokens = json.loads(sys.argv[1]), int(sys.argv[2])
    out = {}
    for name, info in folders.items():
        if name == "bart_gen":
            pipe = pipeline("text2text-generation", model=info["path"], trust_remote_code=True)
            texts = [r["generated_text"] for r in pipe(info["prompts"], max_new_tokens=new_tokens)]
            inferred = pipeline(model=info["path"], trust_remote_code=True)  # the task comes from config.json
            out[name] = dict(texts=texts, pipeline=type(pipe).__name__, inferred_task=inferred.task)
        else:
            pipe = pipeline("text-generation", model=info["path"], trust_remote_code=True)
            kwargs = dict(max_new_tokens=new_tokens, do_sample=False)
            ids = [r[0]["generated_token_ids"] for r in pipe(info["prompts"], return_tensors=True, **kwargs)]
            texts = [r[0]["generated_text"] for r in pipe(info["prompts"], **kwargs)]
            new = [r[0]["generated_text"] for r in pipe(info["prompts"], return_full_text=False, **kwargs)]
            out[name] = dict(ids=[torch.as_tensor(i).tolist() for i in ids], texts=texts, new_texts=new,
                             model=type(pipe.model).__name__)
    print(json.dumps(out))
"""


def expected_generation(name: str) -> list[dict]:
    """Per prompt: the ids generate() returns for it alone (greedy), the decoded new text, the model class."""
    model, tokenizer = load(name)
    rows = []
    for prompt in folder(name).prompts:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0]
        start = 0 if name == "bart_gen" else inputs["input_ids"].shape[1]
        new_text = tokenizer.decode(ids[start:], skip_special_tokens=True)
        rows.append(dict(ids=ids.tolist(), new_text=new_text, model=type(model).__name__))
    return rows


@pytest.fixture(scope="module")
def piped() -> dict:
    folders = {name: dict(path=str(folder(name).path), prompts=folder(name).prompts) for name in FAMILIES}
    return json.loads(run_fresh_here(PIPELINES, json.dumps(folders), str(NEW_TOKENS)).splitlines()[-1])


@pytest.mark.parametrize("name", CAUSAL)
def test_text_generation_pipeline_equals_generate(piped, name):
    result, expected = piped[name], expected_generation(name)
    assert result["model"] == expected[0]["model"]
    assert result["ids"] == [row["ids"] for row in expected]
    assert result["new_texts"] == [row["new_text"] for row in expected]
    for prompt, text, row in zip(folder(name).prompts, result["texts"], expected):
        assert text == prompt + row["new_text"]  # return_full_text (the default) prepends the prompt


@pytest.mark.skipif("bart_gen" not in FAMILIES, reason="BART-gen is not among ECOSYSTEM_FAMILIES")
def test_text2text_pipeline_served_on_both_versions(piped):
    """BART-gen's config.json names the repository's pipeline class under `custom_pipelines`: the 4.57 task name
    works on 5.x too (which removed the native task), with the same output as generate()."""
    result = piped["bart_gen"]
    assert result["pipeline"] == "BartGenText2TextPipeline" and result["inferred_task"] == "text2text-generation"
    assert result["texts"] == [row["new_text"] for row in expected_generation("bart_gen")]


def test_text2text_native_task_removed_in_v5_and_equal_to_ours_in_v4():
    model, tokenizer = load("bart_gen")
    prompts = folder("bart_gen").prompts
    if IS_V5:  # a model object (no config.json to read custom_pipelines from) meets 5.x's own task table
        with pytest.raises(KeyError, match="removed"):
            transformers.pipeline("text2text-generation", model=model, tokenizer=tokenizer)
        return
    native = transformers.pipeline("text2text-generation", model=model, tokenizer=tokenizer)
    assert type(native).__name__ == "Text2TextGenerationPipeline"
    texts = [r["generated_text"] for r in native(prompts, max_new_tokens=NEW_TOKENS, num_beams=1)]
    assert texts == [row["new_text"] for row in expected_generation("bart_gen")]


@pytest.mark.parametrize("name", FAMILIES)
def test_streamers_stream_the_generated_text(name, capsys):
    model, tokenizer = load(name)
    inputs = tokenizer(folder(name).prompts[:1], return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        ids = model.generate(**inputs, **kwargs)[0]
    start = 1 if name == "bart_gen" else inputs["input_ids"].shape[1]  # skip_prompt skips BART's start token
    expected = tokenizer.decode(ids[start:], skip_special_tokens=True)
    assert expected.strip(), "the tiny model generated nothing visible; the comparison would be empty"

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    thread = Thread(target=model.generate, kwargs=dict(**inputs, streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join()
    assert "".join(pieces) == expected

    capsys.readouterr()
    model.generate(**inputs, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **kwargs)
    assert capsys.readouterr().out == expected + "\n"


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampled"])
def test_stream_chat_ends_with_chats_answer(sampling):
    model, tokenizer = load("glm")
    history = [("Hello", "Hi, how can I help?")]
    kwargs = dict(max_length=96, do_sample=sampling)  # sampled: ChatGLM's defaults (top_p 0.7, temperature 0.95)
    torch.manual_seed(7)
    response, new_history = model.chat(tokenizer, "The capital of France is", history=history, **kwargs)
    torch.manual_seed(7)
    steps = list(model.stream_chat(tokenizer, "The capital of France is", history=history, **kwargs))
    assert new_history == history + [("The capital of France is", response)]
    assert steps[-1] == (response, new_history)
    assert all(len(a[0]) <= len(b[0]) for a, b in zip(steps, steps[1:])), "stream_chat's responses must grow"
    assert len(steps) > 1
