"""Decode-time benchmark: BART-gen against transformers' native BartForConditionalGeneration.

Both models hold the same random weights and run in the same process; runs alternate (ours, native, ours,
...) so that machine load hits both alike, and each case reports the median. Cases: greedy and 4-beam
search, batch 1 and 8 (padded inputs), 64 new tokens forced (`min_new_tokens`), sdpa attention, fp32 on CPU.
The model is a bart-base-like shape (d_model 512, 6+6 layers, vocab 32k) so a full run stays within a few
minutes on 2 CPU cores; `quick=True` shrinks it for a smoke run.

    python scripts/benchmarks/bart.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import types
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def _repo_modules():
    name = "_bart_gen_bench_code"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[name] = package
    return (
        importlib.import_module(f"{name}.configuration_bart_gen"),
        importlib.import_module(f"{name}.modeling_bart_gen"),
    )


def build_models(quick: bool):
    from transformers import BartConfig, BartForConditionalGeneration

    configuration, modeling = _repo_modules()
    if quick:
        sizes = dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=512, decoder_ffn_dim=512, vocab_size=4000)  # fmt: skip
    else:
        sizes = dict(d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                     decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048, vocab_size=32000)  # fmt: skip
    sizes.update(max_position_embeddings=256, dropout=0.0)
    torch.manual_seed(0)
    native_config = BartConfig(**sizes)
    native_config._attn_implementation = "sdpa"
    native = BartForConditionalGeneration(native_config).eval()
    config = configuration.BartGenConfig(**sizes)
    config._attn_implementation = "sdpa"
    ours = modeling.BartGenForConditionalGeneration(config).eval()
    ours.load_state_dict(native.state_dict())
    ours.generation_config = native.generation_config
    return ours, native, sizes


def _inputs(batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(3, vocab, (batch, length), generator=g)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch, 2):  # every other row padded by a quarter
        attention_mask[row, : length // 4] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def _time_generate(model, inputs: dict, **kwargs) -> tuple[float, float, torch.Tensor]:
    """(wall ms, process CPU ms, ids). CPU time is the steadier number on a machine shared with other jobs."""
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    synchronize()
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = model.generate(**inputs, **kwargs)
    synchronize()
    return (time.perf_counter() - start) * 1000.0, (time.process_time() - start_cpu) * 1000.0, out


def run(quick: bool = False, threads: int | None = None, device: str | None = None) -> list[dict]:
    if threads is not None:
        torch.set_num_threads(threads)
    device = device or "cpu"
    ours, native, sizes = build_models(quick)
    ours, native = ours.to(device), native.to(device)
    new_tokens = 16 if quick else 64
    repeats = 3 if quick else 3
    length = 32 if quick else 64
    rows = []
    for num_beams in (1, 4):
        for batch in (1, 8):
            inputs = {k: v.to(device) for k, v in _inputs(batch, length, sizes["vocab_size"]).items()}
            kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=num_beams, do_sample=False)
            _time_generate(ours, inputs, **kwargs)  # warm-up (allocator, lazy imports) for both
            _time_generate(native, inputs, **kwargs)
            ours_ms, native_ms, ours_cpu, native_cpu = [], [], [], []
            for _ in range(repeats):
                t, cpu, ids_ours = _time_generate(ours, inputs, **kwargs)
                ours_ms.append(t)
                ours_cpu.append(cpu)
                t, cpu, ids_native = _time_generate(native, inputs, **kwargs)
                native_ms.append(t)
                native_cpu.append(cpu)
            ours_median, native_median = statistics.median(ours_ms), statistics.median(native_ms)
            rows.append(
                {
                    "family": "bart",
                    "case": f"{'greedy' if num_beams == 1 else f'beam{num_beams}'}_batch{batch}",
                    "ours_ms": round(ours_median, 1),
                    "native_ms": round(native_median, 1),
                    "ratio": round(ours_median / native_median, 3),
                    "ours_cpu_ms": round(statistics.median(ours_cpu), 1),
                    "native_cpu_ms": round(statistics.median(native_cpu), 1),
                    "ratio_cpu": round(statistics.median(ours_cpu) / statistics.median(native_cpu), 3),
                    "same_ids": bool(torch.equal(ids_ours, ids_native)),
                    "new_tokens": new_tokens,
                    "input_length": length,
                    "repeats": repeats,
                    "model": f"d{sizes['d_model']} L{sizes['encoder_layers']}+{sizes['decoder_layers']} "
                    f"V{sizes['vocab_size']} fp32 sdpa, {device}, {torch.get_num_threads()} threads",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model, 16 tokens, one repeat")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default=None, help="cpu (default) or cuda")
    args = parser.parse_args()
    for row in run(quick=args.quick, threads=args.threads, device=args.device):
        print(row)


if __name__ == "__main__":
    main()
