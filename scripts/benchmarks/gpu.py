"""GLM decoding on a GPU against transformers' native GlmForCausalLM (GLM-4), for a ChatGLM-6B-shaped model.

    python scripts/benchmarks/gpu.py [--glm-10b] [--out DIR]  # on a CUDA machine: the 6.2B ChatGLM-6B shape, bf16
    python scripts/benchmarks/gpu.py --tiny --device cpu       # a dry run of every case on a tiny model

Both models are built directly on the device in bf16 from a config with random weights (no download): ours with
ChatGLM-6B's sizes (hidden 4096, 28 layers, 32 heads, MLP 16384, vocabulary 130528: 6.17B parameters), native GLM-4
with a gated MLP narrowed to hold as many weights; with `--glm-10b`, then also GLM-10B's (GLM variant: hidden 4096,
48 layers, 64 heads, vocabulary 50048: 9.9B), if ours and native fit side by side. Cases, per-token decode time
with the prefill excluded (as in glm.py), batch 1 and 16, prompt 128:
- ours eager `generate()`; ours with `cache_implementation="static"` (transformers' default auto-compile; compile
  time reported); native eager; native with `cache_implementation="static"` (the same auto-compile);
- prefill: one forward over a 2048-token prompt (ms per call, peak memory);
- then ours after `model.compile_decode_step()` (on a GPU: a static cache in buckets, one graph of fixed shapes,
  CUDA graphs; compile time reported), and the graphs its decode step adds over prompts of 37 to 500 tokens
  (`graphs_per_prompt_length`);
- the fraction of the copy bandwidth (measured in the same run) that batch-1 decoding reaches: weight bytes /
  (ms per token * bandwidth).
Writes `gpu.json` into --out (default benchmarks/results/). The README's GPU table is written from it by hand.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

from _common import REPO_ROOT, decode_ms_per_token, summary, timed_ms
from bandwidth import copy_bandwidth
from glm import EOP, PAD, build_native, build_ours, generator_for, params, prompt

CHATGLM_6B = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384)
GLM_10B = dict(vocab_size=50048, hidden_size=4096, num_layers=48, num_attention_heads=64, inner_hidden_size=16384)
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
    """After the compiled model has decoded 128-token prompts: how many graphs torch.compile has added after each
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


@contextmanager
def built_on(device: str, dtype):
    """Construct modules directly on `device` in `dtype` (no full-precision copy on the host first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def run(sizes: dict, variant: str, device: str, new_tokens: int, repeats: int, batches: tuple[int, ...]) -> dict:
    import torch

    dtype = torch.bfloat16
    rows, started = [], time.time()
    with built_on(device, dtype):
        ours = build_ours(variant, dtype, device, sizes)
        # GLM-4's gated MLP holds 3 matrices where ours holds 2: 2/3 of the width gives as many weights
        native = build_native(dtype, device, mlp_width=2 * sizes["inner_hidden_size"] // 3, sizes=sizes)
    weight_bytes = params(ours) * 2
    bandwidth = copy_bandwidth(device, nbytes=1 << (30 if device == "cuda" else 26))

    def add_rows(batch: int, ms: dict, compile_s: dict) -> None:
        for name, (median, spread) in ms.items():
            row = dict(case=f"decode b={batch}", model=name, ms_per_token=round(median, 3), spread=round(spread, 3),
                       tokens_per_s=round(batch * 1000 / median, 1))  # fmt: skip
            if batch == 1:
                row["bandwidth_fraction"] = round(weight_bytes / (median / 1000) / bandwidth, 3)
            if name in compile_s:
                row["compile_s"] = round(compile_s[name], 1)
            rows.append(row)

    with torch.no_grad():
        for batch in batches:  # eager, and transformers' static cache with its default auto-compile
            ids = prompt(batch, 128, device)
            cases = {"ours eager": generator_for(ours, ids), "native eager": generator_for(native, ids)}
            cases["native static+compile"] = static_generator_for(native, ids)
            start = time.time()
            static_generator_for(ours, ids)(4)()  # compiles the decode step (on CUDA)
            compile_s = {"ours static+compile": time.time() - start}
            cases["ours static+compile"] = static_generator_for(ours, ids)
            add_rows(batch, decode_ms_per_token(cases, new_tokens, repeats, device), compile_s)
        ids = prompt(1, 2048 if device == "cuda" else 256, device)
        for name, model in (("ours", ours), ("native", native)):
            times = [timed_ms(lambda m=model: m(ids), device) for _ in range(repeats + 1)][1:]
            rows.append(dict(case=f"prefill {ids.shape[1]}", model=name, ms=round(summary(times)[0], 3),
                             peak_mib=round(peak_mib(lambda m=model: m(ids), device), 1)))  # fmt: skip
        del native
        ours.compile_decode_step()  # from here on every decode step of `ours` runs compiled
        for batch in batches:
            ids = prompt(batch, 128, device)
            start = time.time()
            generator_for(ours, ids)(4)()  # compiles
            compile_s = {"ours compile_decode_step": time.time() - start}
            ms = decode_ms_per_token(
                {"ours compile_decode_step": generator_for(ours, ids)}, new_tokens, repeats, device
            )
            add_rows(batch, ms, compile_s)
        rows.append(graphs_per_prompt_length(ours, device))  # last: transformers 5.x keeps the largest cache size
    return dict(
        machine=dict(device=device, torch=torch.__version__, gpu=torch.cuda.get_device_name() if device == "cuda" else ""),
        sizes=sizes, variant=variant, params_ours=params(ours), copy_gb_s=round(bandwidth / 1e9, 1), rows=rows,
        elapsed_s=round(time.time() - started, 1),
    )  # fmt: skip


def fits(sizes: dict, device: str) -> bool:
    """Whether two bf16 models of these sizes (ours and native) and their caches fit in the free device memory."""
    import torch

    if device != "cuda":
        return True
    weights = 2 * (12 * sizes["hidden_size"] ** 2 * sizes["num_layers"] + sizes["vocab_size"] * sizes["hidden_size"])
    return torch.cuda.mem_get_info()[0] > 2.5 * weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of every case")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--glm-10b", action="store_true", help="also a GLM-10B-shaped model (GLM variant)")
    args = parser.parse_args(argv)
    shapes = {"chatglm-6b": ("chatglm", TINY if args.tiny else CHATGLM_6B)}
    if args.glm_10b:
        shapes["glm-10b"] = ("glm", TINY if args.tiny else GLM_10B)
    results = {}
    for name, (variant, sizes) in shapes.items():
        if not fits(sizes, args.device):
            results[name] = dict(skipped="not enough free device memory for ours and native side by side")
            continue
        results[name] = run(sizes, variant, args.device, new_tokens=8 if args.tiny else 64,
                            repeats=2 if args.tiny else 3, batches=(1, 2) if args.tiny else (1, 16))  # fmt: skip
        gc.collect()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps({name: result.get("rows", result) for name, result in results.items()}, indent=1))


if __name__ == "__main__":
    main()
