"""Batch-1 decode of the ~110M GLM (the `glm` / `bandwidth` benchmarks' model) in torchao int8 weight-only vs bf16.

    python scripts/benchmark.py --only quant [--quick]
    python scripts/benchmarks/quant.py [--quick] [--device cpu|cuda]

Both models are built once from the same weights; the int8 one is the bf16 model with `torchao.quantization.quantize_(
model, Int8WeightOnlyConfig())`, the transform `from_pretrained(..., quantization_config=TorchAoConfig(
Int8WeightOnlyConfig()))` applies (the tied LM head is left in bf16, as transformers leaves it). Per-token decode
time after a 128-token prompt: generate(), the plain cached step loop, and (not with --quick) that loop after
`model.compile_decode_step()`, under which inductor runs torchao's int8 linears through torch's int8
matrix-vector kernel (eager torchao makes a bf16 copy of each weight per call); rounds alternate between the
contenders (scripts/benchmarks/_common.py), so load on a shared machine hits all alike; the spread is reported.
Also the weight bytes of each. Skipped (one row saying so) when torchao is not installed.
"""

from __future__ import annotations

import copy

from _common import cli, decode_ms_per_token, default_device
from bandwidth import stepper_for
from glm import PROMPT, build_ours, generator_for, prompt


def weight_bytes(model) -> int:
    """Bytes of the parameters as stored (a torchao int8 weight: its int8 data plus its scales)."""
    total = 0
    for p in model.parameters():
        inner = getattr(p, "qdata", None)
        if inner is not None:
            total += inner.numel() * inner.element_size() + p.scale.numel() * p.scale.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    import torch

    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return [{"family": "quant", "case": "skipped", "reason": "torchao is not installed"}]
    device = device or default_device()
    new_tokens, repeats = (8, 3) if quick else (32, 7)
    with torch.no_grad():
        bf16 = build_ours("chatglm", torch.bfloat16, device)
        int8 = copy.deepcopy(bf16)
        quantize_(
            int8, Int8WeightOnlyConfig(), filter_fn=lambda m, name: isinstance(m, torch.nn.Linear) and name != "lm_head"
        )
        ids = prompt(1, PROMPT, device)
        positions = bf16.transformer.get_position_ids(ids)
        contenders = {
            "bf16": generator_for(bf16, ids),
            "int8": generator_for(int8, ids),
            "bf16 step": stepper_for(bf16, ids, positions),
            "int8 step": stepper_for(int8, ids, positions),
        }
        cases = ["", " step"]
        if not quick:
            for name, model in (("bf16", bf16), ("int8", int8)):
                compiled = copy.deepcopy(model)
                compiled.compile_decode_step()
                contenders[f"{name} compiled step"] = stepper_for(compiled, ids, positions)
                contenders[f"{name} compiled step"](3)()  # compile outside the timed rounds
            cases.append(" compiled step")
        times = decode_ms_per_token(contenders, new_tokens, repeats, device)
    rows = []
    for case in cases:
        b, q = times[f"bf16{case}"], times[f"int8{case}"]
        rows.append({
            "family": "quant", "case": f"decode{case or ' (generate)'} batch 1, 110M GLM, {device}",
            "bf16_ms": round(b[0], 3), "bf16_spread": round(b[1], 3), "int8_ms": round(q[0], 3),
            "int8_spread": round(q[1], 3), "speedup": round(b[0] / q[0], 3),
            "bf16_weight_mb": round(weight_bytes(bf16) / 2**20, 1), "int8_weight_mb": round(weight_bytes(int8) / 2**20, 1),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
