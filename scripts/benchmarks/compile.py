"""torch.compile of the decoding step, per family: the speed-up of compiled over eager greedy decoding.

    python scripts/benchmark.py --only compile [--quick]
    python scripts/benchmarks/compile.py [--quick] [--device cpu|cuda]

`model.compile_decode_step()` (fast_decoding.py) compiles the model's forward for the one-token decoding steps
(`torch.compile`, `dynamic=True` so the growing cache does not recompile, `fullgraph=True` so the step is one graph)
and leaves the prompt's forward eager; `generate()` then runs as usual. (transformers 5.x's own `generate(compile_config=...)`
compiles only with static caches, which these models do not use: their masks are sized to the DynamicCache.)

Each family gets a random model of a few million parameters (quick: tiny), batch 1, a 32-token prompt; the per-token
decode time (prefill excluded: (time of 1 + N tokens - time of 1 token) / N) of the eager and the compiled model,
alternating within every round; `speedup` = eager / compiled, `compile_s` = the first compiled call's extra time,
`same_ids` = the compiled model generates the eager model's greedy ids.
"""

from __future__ import annotations

import copy
import time

from _common import decode_ms_per_token, default_device, repo_module

FULL = dict(vocab=8000, hidden=256, layers=4, heads=4, new_tokens=64, repeats=5)
QUICK = dict(vocab=1000, hidden=64, layers=2, heads=4, new_tokens=8, repeats=3)
PROMPT = 32


def build(family: str, sizes: dict, device: str):
    """A random model of `family` and a batch-1 prompt for it."""
    import torch

    torch.manual_seed(0)
    vocab, hidden, layers, heads = sizes["vocab"], sizes["hidden"], sizes["layers"], sizes["heads"]
    if family == "glm":
        config = repo_module("configuration_glm").GLMConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
            inner_hidden_size=4 * hidden, max_sequence_length=512, pad_token_id=0, mask_token_id=vocab - 5,
            gmask_token_id=vocab - 4, smask_token_id=vocab - 3, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
        )  # fmt: skip
        model = repo_module("modeling_glm").GLMForConditionalGeneration(config)
        context = torch.randint(5, vocab - 5, (1, PROMPT - 2))
        ids = torch.cat([context, torch.tensor([[vocab - 4, vocab - 2]])], dim=1)  # ... [gMASK] <sop>
        inputs = {"input_ids": ids}
    elif family == "gpt2_sparse":
        config = repo_module("configuration_gpt2_sparse").GPT2SparseConfig(
            vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
            max_position_embeddings=512, num_image_tokens=0, hidden_dropout=0.0, attention_dropout=0.0,
            pad_token_id=0, eos_token_id=vocab - 1,
        )  # fmt: skip
        model = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel(config)
        inputs = {"input_ids": torch.randint(1, vocab - 1, (1, PROMPT))}
    else:
        config = repo_module("configuration_bart_gen").BartGenConfig(
            vocab_size=vocab, d_model=hidden, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * hidden,
            decoder_ffn_dim=4 * hidden, max_position_embeddings=512, dropout=0.0,
        )  # fmt: skip
        model = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(config)
        inputs = {"input_ids": torch.randint(3, vocab, (1, PROMPT))}
    model = model.eval().to(device)
    return model, {k: v.to(device) for k, v in inputs.items()}


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    import torch

    device = device or default_device()
    sizes = QUICK if quick else FULL
    rows = []
    with torch.no_grad():
        for family in ("glm", "gpt2_sparse", "bart_gen"):
            torch._dynamo.reset()
            eager, inputs = build(family, sizes, device)
            compiled = copy.deepcopy(eager)
            compiled.compile_decode_step()

            def make(model, inputs=inputs):
                def generate_n(n: int):
                    kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n)
                    return lambda: model.generate(**inputs, **kwargs)

                return generate_n

            new_tokens = sizes["new_tokens"]
            start = time.perf_counter()
            expected = make(eager)(new_tokens)()
            eager_s = time.perf_counter() - start
            start = time.perf_counter()
            got = make(compiled)(new_tokens)()  # the first call compiles
            compile_s = time.perf_counter() - start - eager_s
            timings = decode_ms_per_token(
                {"eager": make(eager), "compiled": make(compiled)}, new_tokens, sizes["repeats"], device
            )
            params = sum(p.numel() for p in eager.parameters())
            rows.append(
                {
                    "family": "compile",
                    "case": f"{family} decode b=1",
                    "params_m": round(params / 1e6, 2),
                    "eager_ms": round(timings["eager"][0], 3),
                    "compiled_ms": round(timings["compiled"][0], 3),
                    "speedup": round(timings["eager"][0] / timings["compiled"][0], 2),
                    "compile_s": round(compile_s, 1),
                    "same_ids": bool(torch.equal(got, expected)),
                    "spread_eager": round(timings["eager"][1], 3),
                    "spread_compiled": round(timings["compiled"][1], 3),
                }
            )
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    for row in run(args.quick, args.device):
        print(json.dumps(row))
