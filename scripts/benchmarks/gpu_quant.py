"""Quantized decoding of a ChatGLM-6B-shaped GLM on a GPU: bf16 against torchao int8 and int4 weight-only.

    python scripts/benchmarks/gpu_quant.py [--out DIR]          # on a CUDA machine: the 6.2B ChatGLM-6B shape
    python scripts/benchmarks/gpu_quant.py --tiny --device cpu  # a dry run on a tiny model (int8 only: no int4 on CPU)

One model is built directly on the device in bf16 from a config with random weights (no download; gpu.py's
sizes); each quantized copy is that model after `torchao.quantization.quantize_` with `Int8WeightOnlyConfig()` or
`Int4WeightOnlyConfig(group_size=128)` (CUDA only), the transform `from_pretrained(..., quantization_config=
TorchAoConfig(...))` applies, every linear layer but the tied LM head (as transformers leaves it). Per scheme:
- the weight bytes as stored, and the peak device memory of a 128-token prompt plus 64 new tokens;
- batch-1 per-token decode time (prefill excluded, as in glm.py) of eager `generate()` and after
  `model.compile_decode_step()` (on a GPU: a static cache and CUDA graphs; compile time reported), contenders
  alternating within each round;
- the greedy ids' agreement with bf16's over those 64 tokens (random weights: a rough sign, not an accuracy).
Writes `gpu_quant.json` into --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from pathlib import Path

from _common import REPO_ROOT, decode_ms_per_token
from glm import build_ours, generator_for, prompt
from gpu import CHATGLM_6B, TINY, built_on, peak_mib
from quant import weight_bytes


def quantized(model, scheme: str):
    """A copy of `model` with torchao's weight-only `scheme` ("int8" or "int4") on every linear but the head."""
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    config = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
    copied = copy.deepcopy(model)
    quantize_(copied, config, filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head")
    return copied


def run(sizes: dict, device: str, new_tokens: int, repeats: int) -> dict:
    import torch

    started = time.time()
    with built_on(device, torch.bfloat16):
        bf16 = build_ours("chatglm", torch.bfloat16, device, sizes)
    models = {"bf16": bf16}
    skipped = {}
    for scheme in ("int8", "int4"):
        if scheme == "int4" and device != "cuda":
            skipped[scheme] = "torchao's int4 weight-only kernels need CUDA"
            continue
        models[scheme] = quantized(bf16, scheme)
    ids = prompt(1, 128, device)
    rows = []
    with torch.no_grad():
        reference = generator_for(bf16, ids)(new_tokens)()
        for name, model in models.items():
            tokens = generator_for(model, ids)(new_tokens)()
            rows.append(dict(case="weights and memory", scheme=name, weight_mib=round(weight_bytes(model) / 2**20, 1),
                             peak_mib=round(peak_mib(generator_for(model, ids)(new_tokens), device), 1),
                             ids_equal_to_bf16=round(float((tokens == reference).float().mean()), 3)))  # fmt: skip
        eager = decode_ms_per_token({name: generator_for(m, ids) for name, m in models.items()}, new_tokens, repeats,
                                    device)  # fmt: skip
        compile_s = {}
        for name, model in models.items():
            model.compile_decode_step()
            start = time.time()
            generator_for(model, ids)(4)()  # compiles
            compile_s[name] = time.time() - start
        compiled = decode_ms_per_token({name: generator_for(m, ids) for name, m in models.items()}, new_tokens,
                                       repeats, device)  # fmt: skip
    for case, times in (("decode b=1, generate()", eager), ("decode b=1, compile_decode_step()", compiled)):
        for name, (median, spread) in times.items():
            row = dict(case=case, scheme=name, ms_per_token=round(median, 3), spread=round(spread, 3),
                       tokens_per_s=round(1000 / median, 1), speedup_vs_bf16=round(times["bf16"][0] / median, 3))  # fmt: skip
            if "compile" in case:
                row["compile_s"] = round(compile_s[name], 1)
            rows.append(row)
    rows += [dict(case="skipped", scheme=scheme, reason=reason) for scheme, reason in skipped.items()]
    del models, bf16
    gc.collect()
    return dict(
        machine=dict(device=device, torch=torch.__version__, gpu=torch.cuda.get_device_name() if device == "cuda" else ""),
        sizes=sizes, rows=rows, elapsed_s=round(time.time() - started, 1),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of every case")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    result = run(TINY if args.tiny else CHATGLM_6B, args.device, new_tokens=8 if args.tiny else 64,
                 repeats=2 if args.tiny else 3)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_quant.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["rows"], indent=1))


if __name__ == "__main__":
    main()
