"""The compatibility layer (transformers_compat.py): how transformers' calling conventions reach the models, on
every version the suite runs on (4.57, 5.x before and after 5.24's rename of the cache argument to `cache=`).

- generate() decodes with the KV cache on every version: each step after the prompt receives one token per row and
  a cache holding everything before it (5.24 silently broke this for code reading only `past_key_values`);
- a future rename is simulated (the cache arriving under an unknown name, or not at all): generation refuses
  loudly instead of decoding without history;
- unknown keyword arguments carrying tensors are refused by name, others logged once;
- outputs carry the cache under the running version's name (no deprecation warning);
- the shared loss honours Trainer's `num_items_in_batch`: gradient accumulation 4 x 2 equals one batch of 8 for
  every family, and a batch whose labels are all ignored gives 0, not NaN;
- the version floor and the re-tying of a head loaded as an equal copy.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import subprocess
import sys

import pytest
import torch
import transformers
from fixtures import repo_module
from fixtures.hub_folders import FAMILIES, cpu_training_args, load, training_examples
from helpers import REPO_ROOT, assert_close
from packaging.version import Version
from transformers import GenerationMixin, Trainer
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

compat = repo_module("transformers_compat")


def refused(match: str):
    """pytest.raises for the compatibility error of any copy of the module (each loaded model has its own)."""
    return pytest.raises(RuntimeError, match=match)


def input_key(model) -> str:
    return "decoder_input_ids" if model.config.is_encoder_decoder else "input_ids"


def prompt_batch(name: str):
    model, tokenizer = load(name)
    tokenizer.padding_side = "left"
    inputs = tokenizer(["the cat sat", "a hat"] if name != "glm" else ["27 plus 15 equals", "[MASK] is red."])
    inputs = tokenizer.pad(inputs, return_tensors="pt")
    return model, tokenizer, {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}


def record_steps(model) -> list[tuple[int, int]]:
    """Wrap `model.forward`: every call appends (new tokens per row, cache length before the call)."""
    steps, forward = [], model.forward

    @functools.wraps(forward)  # generate() reads forward's signature
    def recording(*args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        tokens = kwargs.get(input_key(model))
        steps.append((tokens.shape[1], cache.get_seq_length() if cache is not None else -1))
        return forward(*args, **kwargs)

    model.forward = recording
    return steps


# ---------------------------------------------------------------------------------------------------------------
# The cache reaches every decoding step
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_decode_steps_get_one_token_and_the_filled_cache(name, num_beams):
    model, _, inputs = prompt_batch(name)
    steps = record_steps(model)
    new = 5
    model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, num_beams=num_beams, do_sample=False)
    first = 1 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]
    # the prompt step: an empty cache (early 5.x: none yet, the forward creates it), then one token per step
    assert steps[0][0] == first and steps[0][1] in (0, -1), f"first step: {steps[0]}"
    expected = [(1, first + i) for i in range(new - 1)]
    assert steps[1:] == expected, f"transformers {transformers.__version__}: steps {steps}"


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_generation_equals_uncached(name):
    model, _, inputs = prompt_batch(name)
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# ---------------------------------------------------------------------------------------------------------------
# A future rename fails loudly
# ---------------------------------------------------------------------------------------------------------------
def rename_cache(kwargs: dict) -> None:
    """A release that hands the cache to the model under a new name."""
    for old in compat.CACHE_NAMES:
        if old in kwargs:
            kwargs["kv_state"] = kwargs.pop(old)


def drop_cache(kwargs: dict) -> None:
    """A release whose generate() stops passing the cache at all while use_cache=True."""
    for old in compat.CACHE_NAMES:
        kwargs.pop(old, None)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize(
    "change,message",
    [(rename_cache, rf"transformers {transformers.__version__}.*kv_state"), (drop_cache, "no KV cache")],
    ids=["renamed", "dropped"],
)
def test_a_future_change_of_the_cache_argument_is_refused(name, change, message, monkeypatch):
    model, _, inputs = prompt_batch(name)
    prepare = model.prepare_inputs_for_generation

    def changed(*args, **kwargs):
        change(kwargs)
        return prepare(*args, **kwargs)

    monkeypatch.setattr(model, "prepare_inputs_for_generation", changed)
    with refused(message):
        model.generate(**inputs, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("name", FAMILIES)
def test_forward_refuses_unknown_stateful_arguments(name):
    model, _, inputs = prompt_batch(name)
    step = {input_key(model): inputs["input_ids"]}
    if model.config.is_encoder_decoder:
        step["input_ids"] = inputs["input_ids"]
    with refused("kv_state"):
        model(**step, kv_state=DynamicCache())
    with refused("extra_positions"):
        model(**step, extra_positions=torch.zeros(2, 3))


def test_forward_logs_unknown_plain_arguments_once():
    model, _, inputs = prompt_batch(FAMILIES[0])
    library = transformers.utils.logging.get_logger("transformers")
    records = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    for logger in (logging.getLogger(), library):
        logger.addHandler(handler)
    try:
        model(**inputs, some_flag=True)
        model(**inputs, some_flag=True)
    finally:
        for logger in (logging.getLogger(), library):
            logger.removeHandler(handler)
    messages = [r.getMessage() for r in records if "some_flag" in r.getMessage()]
    assert len(messages) == 1 and "ignores unknown argument" in messages[0]


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("cache_name", compat.CACHE_NAMES)
def test_the_cache_is_accepted_under_both_names(name, cache_name):
    model, _, inputs = prompt_batch(name)
    step = dict(inputs)
    cache = DynamicCache()
    if model.config.is_encoder_decoder:
        step["decoder_input_ids"] = inputs["input_ids"][:, :3]
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with torch.no_grad():
        out = model(**step, use_cache=True, **{cache_name: cache})
    assert cache.get_seq_length() == step[input_key(model)].shape[1], "the cache passed was not used"
    assert getattr(out, compat.CACHE_NAME) is cache
    with pytest.raises(ValueError, match="not two different ones"):
        model(**step, past_key_values=DynamicCache(), cache=DynamicCache())


def test_output_classes_and_generate_use_one_cache_name():
    """CACHE_NAME is the field of every output class the models build and generate()'s own argument name."""
    from transformers import modeling_outputs as outputs

    classes = [
        outputs.BaseModelOutputWithPast,
        outputs.CausalLMOutputWithPast,
        outputs.BaseModelOutputWithPastAndCrossAttentions,
        outputs.Seq2SeqModelOutput,
        outputs.Seq2SeqLMOutput,
    ]
    for cls in classes:
        assert compat.CACHE_NAME in cls.__dataclass_fields__, cls.__name__
    assert compat.CACHE_NAME in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    renamed = Version(transformers.__version__) >= Version("5.24")
    assert compat.CACHE_NAME == ("cache" if renamed else "past_key_values")


# ---------------------------------------------------------------------------------------------------------------
# One loss for every family
# ---------------------------------------------------------------------------------------------------------------
def test_loss_with_every_label_ignored_is_zero_with_zero_gradient():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    for shift in (True, False):
        loss = compat.causal_lm_loss(logits, labels, shift=shift)
        loss.backward()
        assert float(loss.detach()) == 0.0 and torch.isfinite(logits.grad).all() and not logits.grad.any()
        logits.grad = None


def test_loss_is_the_mean_over_labels_or_the_sum_over_num_items():
    logits, labels = torch.randn(3, 6, 13), torch.randint(0, 13, (3, 6))
    labels[0, :4] = -100
    flat_logits, flat_labels = logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1)
    mean = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100)
    assert_close(compat.causal_lm_loss(logits, labels), mean, atol=1e-6)
    total = torch.nn.functional.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="sum")
    assert_close(compat.causal_lm_loss(logits, labels, num_items_in_batch=torch.tensor(40)), total / 40, atol=1e-6)


DROPOUTS = {
    "glm": {"embedding_dropout_prob": 0.0, "attention_dropout_prob": 0.0, "output_dropout_prob": 0.0},
    "gpt2_sparse": {"hidden_dropout": 0.0, "attention_dropout": 0.0},
    "bart_gen": {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0},
}


def uneven_examples(name: str, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Eight examples whose label counts differ a lot between micro-batches (a mean of per-batch means would then
    differ from the mean over all labels)."""
    examples = training_examples(name, tokenizer)
    sparse = []
    for example in examples:
        labels = example["labels"].clone()
        keep = (labels != -100).nonzero()[-1:]  # one label left
        labels[:] = -100
        labels[keep] = example["labels"][keep]
        sparse.append({**example, "labels": labels})
    return examples + sparse


def one_update(name: str, batch_size: int, accumulation: int, output_dir) -> dict[str, torch.Tensor]:
    model, tokenizer = load(name, **DROPOUTS[name.split("-")[0]])
    args = cpu_training_args(
        output_dir,
        max_steps=1,
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
    )
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    Trainer(model=model, args=args, train_dataset=uneven_examples(name, tokenizer)).train()
    return {k: v.detach() - before[k] for k, v in model.named_parameters()}


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_accumulation_equals_one_big_batch(name, tmp_path):
    big = one_update(name, batch_size=8, accumulation=1, output_dir=tmp_path / "big")
    accumulated = one_update(name, batch_size=2, accumulation=4, output_dir=tmp_path / "accumulated")
    assert any(bool(delta.abs().max() > 1e-4) for delta in big.values()), "the step changed nothing"
    for key, delta in big.items():
        assert_close(accumulated[key], delta, atol=2e-6, rtol=1e-4, msg=key)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------
def test_a_transformers_below_the_floor_is_refused_by_name():
    code = (
        "import importlib.util, sys, transformers\n"
        "transformers.__version__ = '4.56.2'\n"
        "spec = importlib.util.spec_from_file_location('compat', sys.argv[1])\n"
        "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "transformers_compat.py")], capture_output=True, text=True
    )
    assert run.returncode != 0
    assert re.search(r"ImportError: .*transformers>=4\.57,<6; found 4\.56\.2", run.stderr), run.stderr[-2000:]


def test_an_equal_or_unloaded_untied_head_is_tied_again_and_a_different_one_kept():
    model, _ = load(FAMILIES[0])
    embeddings = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head.weight = torch.nn.Parameter(embeddings.detach().clone())
    compat.retie_lm_head(model)
    assert head.weight is embeddings
    head.weight = torch.nn.Parameter(torch.empty_like(embeddings, device="meta"))  # never loaded (5.3.0)
    compat.retie_lm_head(model)
    assert head.weight is embeddings
    head.weight = torch.nn.Parameter(embeddings.detach() + 1)
    compat.retie_lm_head(model)
    assert head.weight is not embeddings
