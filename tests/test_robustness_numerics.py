"""Numerical safety in float16: long prompts give finite logits and fp32's tokens, or a clear error.

ChatGLM-6B users' most common crash is an fp16 overflow ("probability tensor contains inf/nan", reference-notes §d).
THUDM's guard divides the query by (layer_id + 1) before the fp16 score matmul and multiplies it back in fp32; our
eager path does the same. The sdpa path passes fp16 tensors to torch's fused kernels, which accumulate Q K^T in fp32
and never hold the scores in fp16 (CPU flash kernel here; CUDA flash / memory-efficient kernels likewise), so it
needs no guard: the first test shows both paths stay finite on scores far past fp16's range. Where a checkpoint
cannot run in fp16 at all (activations overflow elsewhere), the forward of a prompt (BART: of a source) raises a
FloatingPointError naming float16 and the fix, in every family, instead of NaN logits that greedy search would
silently turn into token 0.
"""

from __future__ import annotations

import pytest
import torch
from fixtures import (
    BART_IDS,
    GLM_PROMPT,
    SPARSE_IDS,
    bart_config,
    glm_config,
    repo_module,
    sparse_config,
)
from helpers import REPO_ROOT, assert_close


class _Layer(torch.nn.Module):
    def __init__(self, layer_scaling: int):
        super().__init__()
        self.layer_scaling, self.is_causal, self.num_key_value_groups = layer_scaling, False, 1


def test_fp16_attention_survives_scores_past_the_fp16_range():
    modeling = repo_module("modeling_glm")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 12, 32, generator=g) * 120
    k = torch.randn(1, 2, 12, 32, generator=g) * 120
    v = torch.randn(1, 2, 12, 32, generator=g)
    mask = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    scaling = 32**-0.5
    logits = (q @ k.transpose(-1, -2) * scaling).abs().max()
    assert 65504 < logits < 4 * 65504, "the scores must overflow fp16 but fit the 4x guard of layer 3"
    naive = (q.half() @ k.half().transpose(-1, -2)) * scaling
    assert not torch.isfinite(naive).all(), "without a guard the fp16 scores overflow"

    reference, _ = modeling.eager_attention_forward(_Layer(1), q, k, v, mask, scaling)
    eager, _ = modeling.eager_attention_forward(_Layer(4), q.half(), k.half(), v.half(), mask, scaling)
    sdpa, _ = sdpa_attention_forward(_Layer(4), q.half(), k.half(), v.half(), mask, scaling=scaling)
    assert_close(eager.float(), reference, atol=5e-3, msg="eager fp16 with THUDM's layer scaling")
    assert_close(sdpa.float(), reference, atol=5e-3, msg="sdpa fp16 (fp32 accumulation inside the kernel)")


@pytest.fixture(scope="module")
def default_model_and_tokenizer():
    modeling, tokenization = repo_module("modeling_glm"), repo_module("tokenization_glm")
    model = modeling.GLMForConditionalGeneration.from_pretrained(REPO_ROOT, dtype=torch.float32).eval()
    return model, tokenization.GLMTokenizer.from_pretrained(REPO_ROOT)


@pytest.mark.slow
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_fp16_generation_on_a_long_prompt_is_finite_and_matches_fp32(default_model_and_tokenizer, attn_implementation):
    """The embedded default model, a ~300-token prompt and a short one left-padded in one batch: fp16 logits are
    finite and close to fp32's, and greedy decoding gives fp32's tokens."""
    model, tok = default_model_and_tokenizer
    words = "the capital of france is paris and the river is long one plus two is three".split()
    g = torch.Generator().manual_seed(0)
    long_text = " ".join(words[i] for i in torch.randint(0, len(words), (100,), generator=g).tolist())
    batch = tok([long_text + " [MASK] is", "one plus [MASK] is three"], return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > 250
    half = type(model).from_pretrained(REPO_ROOT, dtype=torch.float16, attn_implementation=attn_implementation).eval()
    with torch.no_grad():
        logits16 = half(**batch).logits
        logits32 = model(**batch).logits
        assert torch.isfinite(logits16).all()
        assert_close(logits16.float(), logits32, atol=0.1, msg=f"{attn_implementation} fp16 logits")
        greedy = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(half.generate(**batch, **greedy), model.generate(**batch, **greedy))


def overflowing_model(family: str, dtype: torch.dtype):
    """A tiny model of `family` whose first MLP's activations exceed fp16's range (but not bf16's), and its input."""
    torch.manual_seed(0)
    if family == "glm":
        model = repo_module("modeling_glm").GLMForConditionalGeneration(glm_config())
        mlp = model.transformer.layers[0].mlp
        first, second, ids = mlp.dense_h_to_4h, mlp.dense_4h_to_h, GLM_PROMPT
    elif family == "bart":  # in the encoder: every decoder step reads its output
        model = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(bart_config())
        first, second, ids = model.model.encoder.layers[0].fc1, model.model.encoder.layers[0].fc2, BART_IDS[0].tolist()
    else:
        model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(sparse_config())
        mlp = model.model.layers[0].mlp
        first, second, ids = mlp.dense_h_to_4h, mlp.dense_4h_to_h, SPARSE_IDS[0].tolist()
    with torch.no_grad():  # ~300 after the first projection, ~1e5 after the second
        first.weight.normal_(std=50.0)
        second.weight.normal_(std=50.0)
    return model.eval().to(dtype), torch.tensor([ids])


@pytest.mark.parametrize("family", ["glm", "bart", "sparse"])
def test_a_checkpoint_that_overflows_in_fp16_fails_clearly(family):
    with torch.no_grad():
        model, ids = overflowing_model(family, torch.float32)
        assert torch.isfinite(model(ids).logits).all()
        model, ids = overflowing_model(family, torch.bfloat16)
        assert torch.isfinite(model(ids).logits).all()
        half, ids = overflowing_model(family, torch.float16)
        with pytest.raises(FloatingPointError, match=r"float16 overflow.*dtype=torch.bfloat16"):
            half(ids)
        with pytest.raises(FloatingPointError, match=r"float16 overflow"):
            half.generate(ids, max_new_tokens=2, do_sample=False)


# --------------------------------------------------------------------------------- every label ignored (-100)
def _fresh(family: str, variant: str = "chatglm"):
    """A new tiny model in train mode (not the shared fixture: backward() writes .grad)."""
    torch.manual_seed(0)
    if family == "glm":
        from fixtures import glm_class

        return glm_class()(glm_config(variant=variant, hidden_dropout_prob=0.0)).train()
    if family == "sparse":
        return repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(sparse_config()).train()
    return repo_module("modeling_bart_gen").BartGenForConditionalGeneration(bart_config()).train()


@pytest.mark.parametrize(
    "family,variant", [("glm", "chatglm"), ("glm", "glm"), ("sparse", None), ("bart", None)], ids=str
)
def test_a_batch_whose_labels_are_all_ignored_gives_loss_0_and_zero_gradients(family, variant):
    """A batch with every label -100 (e.g. a prompt-only row after masking) has nothing to learn from: the loss is
    exactly 0 (not NaN from 0/0, which would poison the weights through the optimizer) and every gradient is 0."""
    model = _fresh(family, variant or "chatglm")
    if family == "glm":
        ids = torch.tensor([GLM_PROMPT, GLM_PROMPT])
        batch = dict(input_ids=ids, labels=torch.full_like(ids, -100))
    elif family == "sparse":
        batch = dict(input_ids=SPARSE_IDS, labels=torch.full_like(SPARSE_IDS, -100))
    else:
        batch = dict(input_ids=BART_IDS, decoder_input_ids=BART_IDS, labels=torch.full_like(BART_IDS, -100))
    loss = model(**batch).loss
    assert loss is not None and bool(torch.isfinite(loss)) and loss.item() == 0.0, loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is None or not bool(g.any()) for g in grads), "an all-ignored batch moved the weights"
    assert any(g is not None for g in grads), "the loss is not connected to the model (the test would prove nothing)"
