"""GLM decoding on a GPU against transformers' native GlmForCausalLM (GLM-4), for a ChatGLM-6B-shaped model.

    python scripts/benchmarks/gpu.py [--out DIR]          # on a CUDA machine: the 6.2B ChatGLM-6B shape, bf16
    python scripts/benchmarks/gpu.py --tiny --device cpu  # a dry run of every case on a tiny model

Both models are built on the device from a config with random weights (no download): ours with ChatGLM-6B's sizes
(hidden 4096, 28 layers, 32 heads, MLP 16384, vocabulary 130528: 6.17B parameters), native GLM-4 with a gated MLP
narrowed to hold as many weights. Cases, per-token decode time with the prefill excluded (as in glm.py), batch 1
and 16, prompt 128:
- ours eager `generate()`; ours after `model.compile_decode_step()` (on a GPU: a static cache, one graph of fixed
  shapes, CUDA graphs); ours with `cache_implementation="static"` (transformers' default auto-compile; compile
  time reported);
- native eager; native with `cache_implementation="static"` (the same auto-compile);
- prefill: one forward over a 2048-token prompt (ms per call);
- recompiles: the graphs the compiled decode step holds after prompts of 37 to 500 tokens (`graphs_per_prompt_length`);
- peak memory of each, and the fraction of the copy bandwidth (measured in the same run) that batch-1 decoding
  reaches: weight bytes / (ms per token * bandwidth).
Writes `gpu.json` into --out (default benchmarks/results/). The README's GPU table is written from it by hand.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import REPO_ROOT, decode_ms_per_token, summary, timed_ms
from bandwidth import copy_bandwidth
from glm import EOP, PAD, build_native, build_ours, generator_for, params, prompt

CHATGLM_6B = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384)
TINY = dict(vocab_size=32000, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)


def static_generator_for(model, ids):
    """As glm.generator_for, with transformers' static cache (and so its own compiled decoding step)."""
    import torch

    def make(n: int):
        kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOP)
        mask = torch.ones_like(ids)
        return lambda: model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static", **kwargs)

    return make


def graphs_per_prompt_length(model, device: str) -> dict:
    """After the compiled model has decoded a 128-token prompt: how many graphs torch.compile has added after each
    of a sweep of prompt lengths (8 new tokens each; generate()'s static cache comes in sizes 256, 512, ...: lengths up
    to 247 share the first graph, 300 and 500 take the 512-slot one), and the seconds each call took."""
    import torch
    from torch._dynamo.utils import counters

    sweep, before = {}, counters["stats"]["unique_graphs"]
    for length in (37, 100, 200, 247, 300, 500):
        start = time.time()
        generator_for(model, prompt(1, length, device))(8)()
        if device == "cuda":
            torch.cuda.synchronize()
        sweep[length] = dict(new_graphs=counters["stats"]["unique_graphs"] - before, s=round(time.time() - start, 2))
    return dict(case="recompiles b=1", model="ours compile_decode_step", after_prompt_length=sweep)


def peak_mib(fn, device: str) -> float:
    import torch

    if device != "cuda":
        fn()
        return float("nan")
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**20


def run(sizes: dict, device: str, new_tokens: int, repeats: int, batches: tuple[int, ...]) -> dict:
    import torch

    dtype = torch.bfloat16
    rows, started = [], time.time()
    ours = build_ours("chatglm", dtype, device, sizes)
    # GLM-4's gated MLP holds 3 matrices where ours holds 2: 2/3 of the width gives as many weights
    native = build_native(dtype, device, mlp_width=2 * sizes["inner_hidden_size"] // 3, sizes=sizes)
    weight_bytes = params(ours) * 2
    bandwidth = copy_bandwidth(device, nbytes=1 << (30 if device == "cuda" else 26))
    with torch.no_grad():
        for batch in batches:
            ids = prompt(batch, 128, device)
            cases = {"ours eager": generator_for(ours, ids), "native eager": generator_for(native, ids)}
            cases["native static+compile"] = static_generator_for(native, ids)
            start = time.time()
            static_generator_for(ours, ids)(4)()  # compiles the decode step (on CUDA)
            static_compile_s = time.time() - start
            cases["ours static+compile"] = static_generator_for(ours, ids)
            ms = decode_ms_per_token(cases, new_tokens, repeats, device)
            compiled = build_ours("chatglm", dtype, device, sizes)
            compiled.load_state_dict(ours.state_dict())
            compiled.compile_decode_step()
            start = time.time()
            generator_for(compiled, ids)(4)()  # compiles
            compile_s = time.time() - start
            ms.update(decode_ms_per_token({"ours compile_decode_step": generator_for(compiled, ids)}, new_tokens,
                                          repeats, device))  # fmt: skip
            if batch == 1:
                rows.append(graphs_per_prompt_length(compiled, device))
            del compiled
            for name, (median, spread) in ms.items():
                row = dict(case=f"decode b={batch}", model=name, ms_per_token=round(median, 3), spread=round(spread, 3),
                           tokens_per_s=round(batch * 1000 / median, 1))  # fmt: skip
                if batch == 1:
                    row["bandwidth_fraction"] = round(weight_bytes / (median / 1000) / bandwidth, 3)
                if name in ("ours compile_decode_step", "ours static+compile"):
                    row["compile_s"] = round(compile_s if name == "ours compile_decode_step" else static_compile_s, 1)
                rows.append(row)
        ids = prompt(1, 2048 if device == "cuda" else 256, device)
        for name, model in (("ours", ours), ("native", native)):
            times = [timed_ms(lambda m=model: m(ids), device) for _ in range(repeats + 1)][1:]
            rows.append(dict(case=f"prefill {ids.shape[1]}", model=name, ms=round(summary(times)[0], 3),
                             peak_mib=round(peak_mib(lambda m=model: m(ids), device), 1)))  # fmt: skip
    return dict(
        machine=dict(device=device, torch=torch.__version__, gpu=torch.cuda.get_device_name() if device == "cuda" else ""),
        sizes=sizes, params_ours=params(ours), params_native=params(native), copy_gb_s=round(bandwidth / 1e9, 1),
        rows=rows, elapsed_s=round(time.time() - started, 1),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of every case")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else CHATGLM_6B
    result = run(sizes, args.device, new_tokens=8 if args.tiny else 64, repeats=2 if args.tiny else 3,
                 batches=(1, 2) if args.tiny else (1, 16))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
