"""Validation stays off the decode hot path: no host synchronisation inside `forward()` on decode steps.

On a GPU, reading a tensor's value on the host (`.item()`, `.tolist()`, `bool(t)`, `int(t)`, `.cpu()`, `nonzero`)
waits for every queued kernel: one such read per decoded token stalls the pipeline once per token. The model files
validate their inputs where the data enters (the prompt, the training batch, an empty cache) and skip the
data-dependent checks when generate() continues a filled cache with ids it produced itself.

This test counts those calls on the CPU: during every forward() call of generate() after the first, the Python
entry points of host reads are wrapped with counters. The first call (the prompt) may read values; the rest must
not. What `prepare_inputs_for_generation` reads between the forward calls is not counted (outside forward()).
The counters can fail: `test_counter_sees_a_sync` proves that a `.item()` inside forward() is counted.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from fixtures import (
    BART_IDS,
    GLM_PROMPT,
    SPARSE_IDS,
    bart_config,
    glm_class,
    glm_config,
    repo_module,
    sparse_config,
)

# Tensor methods and torch functions that copy device data to the host (each a sync on a GPU).
TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
TORCH_READS = ("nonzero", "is_nonzero")


@contextlib.contextmanager
def counting_host_reads(counts: dict[str, int], active: list[bool]):
    """Wrap the host-read entry points; while `active[0]`, each call adds one to `counts[name]`."""
    originals = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in TENSOR_READS]
    originals += [(torch, name, getattr(torch, name)) for name in TORCH_READS]

    def wrap(name, original):
        def counted(*args, **kwargs):
            if active[0]:
                counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        return counted

    try:
        for owner, name, original in originals:
            setattr(owner, name, wrap(name, original))
        yield
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)


def decode_step_reads(model: torch.nn.Module, generate_kwargs: dict) -> tuple[dict[str, int], int]:
    """Host reads counted inside the forward() calls of generate() after the first, and the number of such calls."""
    counts: dict[str, int] = {}
    active = [False]
    calls = [0]

    def before(module, args):
        calls[0] += 1
        active[0] = calls[0] > 1

    def after(module, args, output):
        active[0] = False

    handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    try:
        with counting_host_reads(counts, active), torch.no_grad():
            model.generate(**generate_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return counts, calls[0] - 1


def glm(variant: str):
    torch.manual_seed(0)
    model = glm_class()(glm_config(variant=variant)).eval()
    ids = torch.tensor([[3, 4] + GLM_PROMPT, [0, 0] + GLM_PROMPT])
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    return model, {"input_ids": ids, "attention_mask": mask}


def sparse(mode: int):
    torch.manual_seed(0)
    model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(sparse_config(is_sparse=mode)).eval()
    ids = SPARSE_IDS.repeat(2, 1)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def bart():
    torch.manual_seed(0)
    model = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(bart_config()).eval()
    ids = BART_IDS.repeat(2, 1)
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


FAMILIES = {
    "glm-chatglm": lambda: glm("chatglm"),
    "glm-glm": lambda: glm("glm"),
    "gpt2_sparse-0": lambda: sparse(0),
    "gpt2_sparse-2": lambda: sparse(2),
    "bart_gen": bart,
}


@pytest.mark.parametrize("num_beams", [1, 2], ids=["greedy", "beam"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_host_sync_in_decode_steps(family, num_beams):
    model, inputs = FAMILIES[family]()
    kwargs = dict(inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=num_beams)
    counts, steps = decode_step_reads(model, kwargs)
    assert steps >= 5, f"expected decode steps after the prompt, saw {steps}"
    assert counts == {}, f"{family}: host reads in forward() on {steps} decode steps: {counts}"


def test_counter_sees_a_sync():
    """A `.item()` inside forward() (here in the body's pre-hook) is counted once per decode step."""
    model, inputs = FAMILIES["gpt2_sparse-0"]()

    def read_a_value(module, args):
        torch.zeros(1).item()

    model.model.register_forward_pre_hook(read_a_value)
    counts, steps = decode_step_reads(model, dict(inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False))
    assert counts.get("item") == steps == 2


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_host_sync_in_static_cache_decode_steps(family):
    """With `cache_implementation="static"` the step's slots come as `cache_position`: the forward reads nothing
    (a fixed-size cache's length lives on the device, and reading it would be a sync per token)."""
    model, inputs = FAMILIES[family]()
    kwargs = dict(inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
    counts, steps = decode_step_reads(model, kwargs)
    assert steps >= 5, f"expected decode steps after the prompt, saw {steps}"
    assert counts == {}, f"{family} static cache: host reads in forward() on {steps} decode steps: {counts}"
