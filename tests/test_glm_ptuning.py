"""P-tuning v2 (pre_seq_len / prefix_projection) tests of the GLM model, ChatGLM-6B variant."""

from __future__ import annotations

import pytest
import torch
from fixtures import EOP, glm_class, left_pad, prompt, random_prompt
from fixtures import GLM_TINY as TINY
from fixtures import spread_glm as tiny_model
from helpers import assert_close
from transformers import DynamicCache

PREFIX = 3


def ptuned(projection: bool = False, seed: int = 1):
    return tiny_model(seed=seed, pre_seq_len=PREFIX, prefix_projection=projection)


@pytest.mark.parametrize("projection", [False, True])
def test_only_the_prefix_encoder_trains(projection):
    model = ptuned(projection).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable), trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([prompt([5, 6, 7]) + [8, 9, EOP]] * 2)
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        losses.append(loss.detach().item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param.detach(), before[name])
        assert changed == (name in trainable), name


def test_prefix_layout_is_thudms():
    """THUDM views the prefix encoder output as [B, P, 2 * layers, heads, head_dim] and uses index 2l as layer
    l's keys and 2l + 1 as its values. Rebuild that by hand into a cache of the plain model and compare."""
    tuned = ptuned().eval()
    plain = glm_class()(tuned.config.__class__(**{**TINY})).eval()
    plain.load_state_dict({k: v for k, v in tuned.state_dict().items() if "prefix_encoder" not in k})
    ids = torch.tensor([prompt([5, 6, 7, 8]) + [9]])
    table = tuned.transformer.prefix_encoder.embedding.weight.detach()  # [P, layers * 2 * hidden]
    heads, head_dim = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    table = table.view(PREFIX, 2 * TINY["num_layers"], heads, head_dim)
    cache = DynamicCache()
    for layer in range(TINY["num_layers"]):
        key = table[:, 2 * layer].permute(1, 0, 2)[None]  # [1, H, P, D]
        value = table[:, 2 * layer + 1].permute(1, 0, 2)[None]
        cache.update(key, value, layer)
    expected = plain(
        ids,
        past_key_values=cache,
        attention_mask=torch.ones(1, PREFIX + ids.shape[1]),  # prefix keys visible to every query
        position_ids=plain.transformer.get_position_ids(ids),
    ).logits
    assert_close(tuned(ids).logits, expected, atol=1e-5, msg="prefix as cached keys/values")
    assert not torch.allclose(plain(ids).logits, expected, atol=1e-3), "the prefix should change the logits"


def test_prefix_cached_and_batched_invariants():
    model = ptuned(projection=True)
    g = torch.Generator().manual_seed(2)
    rows = [random_prompt(g, n) + [9, 10] for n in (2, 6)]
    ids, mask = left_pad(rows)
    full = model(ids, attention_mask=mask, use_cache=False).logits
    split = ids.shape[1] - 2
    first = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True)
    assert first.past_key_values.get_seq_length() == PREFIX + split
    positions = model.transformer.get_position_ids(ids, mask)
    step = model(ids[:, split:], attention_mask=mask, position_ids=positions[..., split:],
                 past_key_values=first.past_key_values)  # fmt: skip
    assert_close(step.logits, full[:, split:], atol=1e-4, msg="cached vs uncached with a prefix")
    for b, row in enumerate(rows):
        assert_close(full[b, -len(row) :], model(torch.tensor([row])).logits[0], atol=1e-4, msg=f"row {b}")

    gen = dict(do_sample=False, max_new_tokens=5)
    cached = model.generate(input_ids=ids, attention_mask=mask, **gen)
    uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **gen)
    assert torch.equal(cached, uncached)
    beams = model.generate(input_ids=ids, attention_mask=mask, num_beams=2, num_return_sequences=2, **gen)
    assert beams.shape[0] == 4


def test_prefix_weights_load_onto_a_base_checkpoint(tmp_path):
    """ChatGLM-6B's P-tuning workflow: load the base model with pre_seq_len set, then the trained prefix."""
    tuned = ptuned(projection=True)
    base_folder = tmp_path / "base"
    base = glm_class()(tuned.config.__class__(**TINY))
    base.load_state_dict({k: v for k, v in tuned.state_dict().items() if "prefix_encoder" not in k})
    base.save_pretrained(base_folder)
    model = glm_class().from_pretrained(base_folder, pre_seq_len=PREFIX, prefix_projection=True).eval()
    prefix_state = {
        k.removeprefix("transformer.prefix_encoder."): v
        for k, v in tuned.state_dict().items()
        if k.startswith("transformer.prefix_encoder.")
    }
    model.transformer.prefix_encoder.load_state_dict(prefix_state)
    ids = torch.tensor([prompt([5, 6, 7])])
    assert_close(model(ids).logits, tuned(ids).logits, atol=1e-6, msg="base + prefix")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prefix_encoder" not in n)


def test_prefix_gets_gradients_under_gradient_checkpointing():
    model = ptuned(projection=True).train()
    model.transformer.prefix_dropout.p = 0.0  # same dropout-free loss with and without checkpointing
    ids = torch.tensor([prompt([5, 6, 7]) + [8, 9, EOP]])
    model(ids, labels=ids).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids, use_cache=True).loss.backward()
    for name, grad in expected.items():
        assert grad.abs().sum() > 0
        assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, msg=name)
