"""Tests specific to the GLM-10B family variant (`variant="glm"`): GLM's input conventions, the classification and
multiple-choice heads, GLM's English tokenizer feeding the model, and fine-tuning the blank-infilling objective.

The invariants shared with the ChatGLM variant (cache, batching, beams, backends) run for both variants in
test_glm_model.py and test_glm_generation.py; parity with GLM's own code is test_glm_variant_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from fixtures import GMASK, MASK, PAD, SOP, glm_class, left_pad, prompt, repo_module
from fixtures import glm_config as tiny_config
from fixtures import spread_glm as tiny_model
from helpers import REPO_ROOT, TOKENIZER_DATA, assert_close, run_fresh

GLM = dict(variant="glm")


# ---------------------------------------------------------------------------------------------------------------
# GLM's input conventions
# ---------------------------------------------------------------------------------------------------------------
def test_glm_generation_inputs_expanded_by_any_transformers_version_come_back_to_one_row_each():
    """5.x repeats 3-D position_ids along dim 1 for beams / num_return_sequences; 4.57 along dim 0; a caller may
    pass them unexpanded. All three give the same [B * k, 2, L]."""
    to_batch = repo_module("glm_generation").to_batch
    positions = torch.arange(2 * 2 * 5).view(2, 2, 5)  # [B=2, 2, L=5], rows differ
    expected = positions.repeat_interleave(3, dim=0)
    assert torch.equal(to_batch(positions.repeat_interleave(3, dim=1), 6, "position_ids"), expected)  # 5.x
    assert torch.equal(to_batch(expected, 6, "position_ids"), expected)  # 4.57
    assert torch.equal(to_batch(positions, 6, "position_ids"), expected)  # unexpanded
    mask = torch.ones(2, 1, 5, 5)
    assert to_batch(mask, 6, "generation_attention_mask").shape == (6, 1, 5, 5)
    with pytest.raises(ValueError, match="does not divide"):
        to_batch(positions, 5, "position_ids")
    with pytest.raises(ValueError, match=r"\[batch, 2, seq\]"):
        to_batch(torch.zeros(6, 3, 5), 6, "position_ids")


def test_sep_convention_is_the_prefix_mask_it_describes():
    """GLM's `sep`: keys before sep[b] are seen by all, the rest causally; an int, a 1-element or a [B] tensor."""
    model = tiny_model(**GLM)
    ids = torch.tensor([prompt([5, 6, 7]) + [8, 9], prompt([10, 11, 12, 13]) + [14]])  # no padding
    positions = model.transformer.get_position_ids(ids)
    seps = torch.tensor([3, 6])
    n = ids.shape[1]
    explicit = torch.tensor([[[[j <= i or j < s for j in range(n)] for i in range(n)]] for s in seps.tolist()])
    expected = model(ids, position_ids=positions, attention_mask=explicit).logits
    assert_close(model(ids, position_ids=positions, attention_mask=seps).logits, expected, atol=1e-4, msg="[B] sep")
    one = model(ids[:1], position_ids=positions[:1], attention_mask=3).logits
    assert_close(one, expected[:1], atol=1e-4, msg="int sep")
    assert_close(model(ids, position_ids=positions, attention_mask=torch.tensor([6])).logits[1], expected[1],
                 atol=1e-4, msg="1-element sep")  # fmt: skip
    # sep = context length (the <sop> index) is the mask the model builds from the tokens
    sop = torch.tensor([row.index(SOP) for row in ids.tolist()])
    assert_close(model(ids, attention_mask=sop).logits, model(ids).logits, atol=1e-4, msg="sep = context length")
    with pytest.raises(ValueError, match="prefix length per row: expected 1 or batch = 2 values, got 3"):
        model(ids, attention_mask=torch.tensor([1, 2, 3]))


def test_glm_rows_without_sop_are_all_context_but_chatglm_needs_a_span():
    ids = torch.tensor([[5, 6, MASK, 7, 8]])  # a classification-style input: no <sop>
    glm = tiny_model(**GLM)
    everything = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    positions = torch.stack((torch.arange(5), torch.zeros(5, dtype=torch.long)))[None]
    expected = glm(ids, position_ids=positions, attention_mask=everything).logits
    assert_close(glm(ids).logits, expected, atol=1e-4, msg="no <sop>: bidirectional, positions 0..S-1")
    with pytest.raises(ValueError, match=r"no <sop>"):
        tiny_model()(ids)
    with pytest.raises(ValueError, match=r"no <sop>"):  # generation still needs the span opener
        glm.generate(ids, max_new_tokens=2)


def test_explicit_masks_with_fully_masked_rows_stay_finite_under_sdpa():
    """GLM's right-padded multiple-choice masks have all-zero padding rows; they must not turn into NaN."""
    for impl in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=impl, **GLM)
        ids = torch.tensor([prompt([5, 6, 7]) + [PAD, PAD]])
        mask = torch.zeros(1, 1, 7, 7, dtype=torch.long)  # the prompt's prefix-LM mask; padding rows see nothing
        mask[..., :5, :4] = 1
        mask[..., 4, 4] = 1
        logits = model(ids, attention_mask=mask).logits
        assert torch.isfinite(logits).all(), impl
        assert_close(logits[:, :5], model(ids[:, :5]).logits, atol=1e-5, msg=f"{impl}: real rows unaffected")


BAD = [
    ("position past the table", dict(position_ids=torch.full((1, 2, 5), 65)), r"position_ids must lie in \[0, "),
    ("GLM's mems", dict(mems=[torch.zeros(1, 1, 32)]), "mems .* not supported"),
    ("bool mask", dict(attention_mask=True), "must be a tensor or GLM's prefix length"),
]


@pytest.mark.parametrize("case,kwargs,message", BAD, ids=[b[0] for b in BAD])
def test_bad_glm_inputs_raise_clear_errors(case, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**GLM)(torch.tensor([prompt([5, 6, 7])]), **kwargs)


def test_generating_past_glms_max_gen_length_is_explained():
    model = tiny_model(**GLM)
    ids = torch.tensor([prompt([5, MASK, 7], blank=GMASK)])
    length, gen = ids.shape[1], 3
    positions = torch.tensor(
        [[list(range(length - 1)) + [1] * (gen + 1), [0] * (length - 1) + list(range(1, gen + 2))]]
    )
    mask = torch.ones(1, 1, length + gen, length + gen, dtype=torch.long).tril()
    mask[..., : length - 1] = 1
    inputs = dict(input_ids=ids, position_ids=positions, generation_attention_mask=mask, do_sample=False)
    assert model.generate(**inputs, max_new_tokens=gen + 1, min_new_tokens=gen + 1).shape[1] == length + gen + 1
    with pytest.raises(ValueError, match="max_gen_length >= max_new_tokens"):
        model.generate(**inputs, max_new_tokens=gen + 3, min_new_tokens=gen + 3)


# ---------------------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------------------
def _classifier(num_labels: int = 3, **overrides):
    torch.manual_seed(0)
    return glm_class("GLMForSequenceClassification")(tiny_config(num_labels=num_labels, **GLM, **overrides)).eval()


def test_classification_pools_the_first_real_token_of_left_padded_rows():
    model = _classifier()
    rows = [[5, 6, MASK, 7, 8], [9, 10, MASK], [11, MASK, 12, 13]]
    ids, mask = left_pad(rows)
    batched = model(ids, attention_mask=mask, labels=torch.tensor([0, 2, 1]))
    for b, row in enumerate(rows):
        assert_close(batched.logits[b], model(torch.tensor([row])).logits[0], atol=1e-5, msg=f"row {b}")
    expected_loss = torch.nn.functional.cross_entropy(batched.logits, torch.tensor([0, 2, 1]))
    assert_close(batched.loss, expected_loss, atol=1e-6, msg="cross-entropy")
    # GLM's [B, C, S] form: C choices per example, one score each (num_labels = 1)
    scorer = _classifier(num_labels=1)
    choices = torch.tensor([[[5, 6, MASK, 7], [5, 6, MASK, 8]], [[9, MASK, 10, 11], [9, MASK, 12, 11]]])
    scores = scorer(choices, labels=torch.tensor([1, 0]))
    assert scores.logits.shape == (2, 2)
    flat = scorer(choices.flatten(0, 1)).logits.view(2, 2)
    assert_close(scores.logits, flat, atol=1e-6, msg="choices scored one by one")
    regression = scorer(ids, attention_mask=mask, labels=torch.tensor([0.5, -1.0, 2.0]))
    assert regression.loss.shape == () and scorer.config.problem_type == "regression"


def test_classifier_dropout_defaults_to_output_dropout():
    assert _classifier(output_dropout_prob=0.2).dropout.p == 0.2
    assert _classifier(output_dropout_prob=0.2, classifier_dropout=0.05).dropout.p == 0.05


def _tokenizer_and_model(vocab_size: int, **tokenizer_kwargs):
    """A GLM tokenizer and a tiny GLM-variant model whose config carries that tokenizer's special-token ids."""
    tok = repo_module("tokenization_glm").GLMTokenizer(**tokenizer_kwargs)
    ids = dict(bos_token_id=tok.sop_token_id, eos_token_id=tok.eop_token_id, pad_token_id=tok.pad_token_id,
               mask_token_id=tok.mask_token_id, gmask_token_id=tok.gmask_token_id, smask_token_id=tok.smask_token_id)  # fmt: skip
    return tok, tiny_model(vocab_size=vocab_size, max_sequence_length=128, **ids, **GLM)


@pytest.fixture(scope="module")
def english():
    """GLM's English tokenizer and a tiny GLM-variant model over its 50304-row vocabulary (glm-10b's layout)."""
    files = dict(bpe_vocab_file=TOKENIZER_DATA / "gpt2-vocab.json", merges_file=TOKENIZER_DATA / "gpt2-merges.txt")
    return _tokenizer_and_model(50304, flavour="glm-english", **{k: str(v) for k, v in files.items()})


def test_multiple_choice_scores_are_the_choices_log_probabilities(english):
    """Tokenizer -> GLMForMultipleChoice in one pass == each choice teacher-forced on its own, summed log-probs."""
    tok, lm = english
    mc = glm_class("GLMForMultipleChoice")(lm.config).eval()
    mc.load_state_dict(lm.state_dict())
    contexts = ["The Eiffel Tower is in [MASK].", "Water boils at [MASK] degrees Celsius at sea level."]
    choices = [["Paris", "New York City", "Rome"], ["one hundred", "fifty", "zero"]]
    inputs = tok.build_inputs_for_multiple_choice(tok(contexts, padding=True, return_tensors="pt"), choices)
    with torch.no_grad():
        out = mc(**inputs, labels=torch.tensor([0, 0]))
        for b, (context, row) in enumerate(zip(contexts, choices)):
            for c, choice in enumerate(row):
                context_ids = tok(context)["input_ids"] + [tok.sop_token_id]
                choice_ids = tok.encode(choice, add_special_tokens=False)
                ids = torch.tensor([context_ids + choice_ids[:-1]])
                log_probs = torch.log_softmax(lm(ids).logits[0, len(context_ids) - 1 :], dim=-1)
                expected = sum(log_probs[i, t] for i, t in enumerate(choice_ids))
                assert_close(out.logits[b, c], expected, atol=1e-4, msg=f"example {b} choice {c}")
    assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 0])), atol=1e-6, msg="loss")


# ---------------------------------------------------------------------------------------------------------------
# Fine-tuning the blank-infilling objective (THUDM/GLM#79's format) with Trainer, then reloading
# ---------------------------------------------------------------------------------------------------------------
PAIRS = [
    ("Tsinghua University is located in [MASK].", "Beijing"),
    ("The capital of [MASK] is Paris.", "France"),
    ("[MASK] wrote Hamlet.", "Shakespeare"),
    ("Water freezes at [MASK] degrees.", "zero"),
]

RELOAD = """
    import sys, json, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    prompts = json.loads(sys.argv[2])
    inputs = tok.build_inputs_for_generation(tok(prompts, padding=True, return_tensors="pt"), max_gen_length=8)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=tok.eop_token_id)
    print(json.dumps(out[:, inputs["input_ids"].shape[1]:].tolist()))
"""


def test_trainer_learns_blank_infilling_and_the_saved_model_reloads_in_a_fresh_process(tmp_path):
    """The embedded default tokenizer (1024 pieces) keeps this fast; GLM's English one is the same code path."""
    import json

    from transformers import Trainer, TrainingArguments

    tok, model = _tokenizer_and_model(1024, vocab_file=str(REPO_ROOT / "tokenizer.model"), flavour="chatglm")
    enc = tok([p for p, _ in PAIRS], padding=True, return_tensors="pt")
    train = tok.build_inputs_for_generation(enc, max_gen_length=8, targets=[t for _, t in PAIRS])
    dataset = [{k: v[i] for k, v in train.items()} for i in range(len(PAIRS))]

    def mean_loss() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(**train).loss)

    before = mean_loss()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=30, learning_rate=1e-2,
        report_to="none", save_strategy="no", use_cpu=True, logging_steps=100,
    )  # fmt: skip
    Trainer(model=model.train(), args=args, train_dataset=dataset).train()
    after = mean_loss()
    assert math.isfinite(after) and after < 0.5 * before, (before, after)

    folder = tmp_path / "finetuned"
    model.save_pretrained(folder)
    type(tok).register_for_auto_class("AutoTokenizer")
    tok.save_pretrained(folder)
    prompts = [p for p, _ in PAIRS]
    inputs = tok.build_inputs_for_generation(tok(prompts, padding=True, return_tensors="pt"), max_gen_length=8)
    with torch.no_grad():
        here = model.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=tok.eop_token_id)
    here = here[:, inputs["input_ids"].shape[1] :].tolist()
    there = json.loads(run_fresh(RELOAD, str(folder), json.dumps(prompts)).splitlines()[-1])
    assert there == here
    learned = sum(row[: len(tok.encode(t, add_special_tokens=False))] == tok.encode(t, add_special_tokens=False)
                  for row, (_, t) in zip(here, PAIRS))  # fmt: skip
    assert learned >= 3, f"the fine-tuned model fills few blanks with their targets: {here}"
