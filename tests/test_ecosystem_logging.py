"""Warnings only when the user can act on them (issue 9): the everyday flows of every family (load through the Auto
classes, generate greedy / beam / sampled / batched, a pipeline, a training step with gradient checkpointing, save
and reload) log no warning, neither from this repository's modules nor from transformers about how they are used,
and raise no Python warning except transformers' notices about its own renamed APIs.

The repository's modules log through `transformers.utils.logging.get_logger(__name__)` and never print (the static
scan is tests/test_repo_hygiene.py); bad input raises a ValueError / TypeError naming the argument and the expected
form (the table of cases is tests/test_robustness_inputs.py).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import transformers
from fixtures.hub_folders import FAMILIES, folder, load, training_examples

# transformers' own messages about the machine, not about the model or how it is called
ALLOWED = ("Device set to use cpu",)


class Recorder(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.parametrize("name", FAMILIES)
def test_everyday_flows_log_no_warnings(name, tmp_path):
    recorder = Recorder()
    library = transformers.utils.logging.get_logger("transformers")  # does not propagate to the root logger
    loggers = (logging.getLogger(), library)  # the root logger sees this repository's modules
    for logger in loggers:
        logger.addHandler(recorder)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_everyday_flows(name, tmp_path)
    finally:
        for logger in loggers:
            logger.removeHandler(recorder)
    logged = [f"{r.name}: {r.getMessage()}" for r in recorder.records if not r.getMessage().startswith(ALLOWED)]
    assert logged == [], "\n".join(logged)
    python_warnings = [
        f"{w.category.__name__} {w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if not (issubclass(w.category, (FutureWarning, DeprecationWarning)) and "/transformers/" in w.filename)
    ]
    assert python_warnings == [], "\n".join(python_warnings)


def run_everyday_flows(name: str, tmp_path) -> None:
    family = folder(name)
    model, tokenizer = load(name)
    inputs = tokenizer(family.prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
        model.generate(**inputs, max_new_tokens=4, num_beams=2, num_return_sequences=2)
        model.generate(**inputs, max_new_tokens=4, do_sample=True, top_k=10)
        model.generate(**tokenizer(family.prompts[:1], return_tensors="pt"), max_new_tokens=4)
    task = "text2text-generation" if family.is_seq2seq else "text-generation"
    pipe = transformers.pipeline(task, model=str(family.path), trust_remote_code=True)
    pipe(family.prompts[0], max_new_tokens=4)

    examples = training_examples(name, tokenizer)
    batch = {key: torch.stack([example[key] for example in examples]) for key in examples[0]}
    model.train()
    model.gradient_checkpointing_enable()
    model(**batch).loss.backward()
    model.gradient_checkpointing_disable()
    model.eval()

    model.save_pretrained(tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    reloaded = getattr(transformers, family.auto_lm).from_pretrained(tmp_path / "saved", trust_remote_code=True)
    with torch.no_grad():
        reloaded(**{k: v for k, v in batch.items() if k != "labels"})
