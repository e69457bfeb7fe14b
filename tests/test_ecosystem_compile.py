"""torch.compile of the decoding step, per family (issue 9): the one-token forward compiles without a graph break
(`fullgraph=True`: none from input checks, masks or the cache) and without a recompilation per new token
(`dynamic=True`), and greedy generation gives the eager model's ids on a padded batch.

Compiling with inductor needs a C++ compiler and takes seconds to minutes on a small CPU, hence `slow`. The
helper is the models' own `compile_decode_step()` (fast_decoding.py), which `scripts/benchmarks/compile.py` times
(the speed-up is reported there, not asserted here).
"""

from __future__ import annotations

import pytest
import torch
from fixtures.hub_folders import FAMILIES, build_model, folder, load


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_compiled_decode_step_generates_the_eager_ids(name):
    from torch._dynamo.utils import counters

    _, tokenizer = load(name)
    model = build_model(name, tokenizer, layers=1)  # one block: half the kernels to generate and compile
    inputs = tokenizer(folder(name).prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    try:
        with torch.no_grad():
            expected = model.generate(**inputs, **kwargs)
            model.compile_decode_step()
            first = model.generate(**inputs, **kwargs)
            graphs = counters["stats"]["unique_graphs"]
            longer = model.generate(**inputs, **{**kwargs, "max_new_tokens": 12, "min_new_tokens": 12})
        assert torch.equal(first, expected)
        assert torch.equal(longer[:, : expected.shape[1]], expected)
        # The first generation may compile a few graphs (BART: the step that projects the encoder's keys, a cache
        # of length 1, which dynamo always specialises, then the general one); later steps and longer generations
        # reuse them: no recompilation per token.
        assert 1 <= graphs <= 3, dict(counters["stats"])
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
