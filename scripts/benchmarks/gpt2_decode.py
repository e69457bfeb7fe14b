"""Sparse GPT-2 in dense mode (is_sparse=0) against transformers' native GPT2LMHeadModel with the same weights.

    python scripts/benchmark.py --only gpt2_decode [--quick]
    python scripts/benchmarks/gpt2_decode.py [--quick] [--device cpu|cuda]

The native model (GPT-2 small shape: hidden 768, 12 layers, 12 heads, vocab 50257, 2048 positions; ~125M
parameters) is built with random weights, saved, and converted with this repository's `--arch gpt2`
converter, so both hold identical weights; sdpa attention, fp32 and bf16. Cases: `decode b=N` (per-token time of
greedy generate() with the KV cache after a 128-token prompt, 128 new tokens forced, prefill excluded as
(time of 1 + N tokens - time of 1 token) / N), batch 1, 4 and 16; `beam4 b=N`, the same with beam search (4
beams, `early_stopping=False`), batch 1 and 8; `prefill N` (one forward, batch 1). Ours and
native alternate within every round; medians and interquartile spreads, `ratio` = ours / native.
(The sparse modes' scaling on long sequences is `gpt2_sparse`.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path

from _common import REPO_ROOT, alternate, cli, decode_ms_per_token, default_device, ratio_row, repo_module, summary

FULL = dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=2048)
QUICK = dict(n_embd=128, n_layer=2, n_head=4, vocab_size=4000, n_positions=1024)
PROMPT = 128


def build_models(sizes: dict, dtype, device: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from converters.gpt2_sparse import convert_gpt2

    torch.manual_seed(0)
    last = sizes["vocab_size"] - 1
    config = GPT2Config(**sizes, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=last, eos_token_id=last)
    config._attn_implementation = "sdpa"
    native = GPT2LMHeadModel(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        native.save_pretrained(Path(tmp) / "native")
        (Path(tmp) / "ours").mkdir()
        convert_gpt2(Path(tmp) / "native", Path(tmp) / "ours", None, argparse.Namespace())
        model_class = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel
        ours = model_class.from_pretrained(Path(tmp) / "ours", attn_implementation="sdpa").eval()
    return ours.to(device=device, dtype=dtype), native.to(device=device, dtype=dtype)


def prompt(batch: int, length: int, vocab: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(length * 31 + batch)
    return torch.randint(0, vocab - 1, (batch, length), generator=generator).to(device)


def generator_for(model, ids, num_beams: int = 1):
    import torch

    def make(n: int):
        kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, num_beams=num_beams)
        if num_beams > 1:
            kwargs["early_stopping"] = False
        return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    return make


def run(quick: bool = False, device: str | None = None, beam_only: bool = False) -> list[dict]:
    """`beam_only`: only the fp32 beam-search cases (what `--beam-only` runs)."""
    import torch

    device = device or default_device()
    sizes = QUICK if quick else FULL
    new_tokens, repeats = (8, 3) if quick else (128, 5)
    cases = [(1, 1), (1, 4), (4, 1)] if quick else [(1, 1), (1, 4), (1, 16), (4, 1), (4, 8)]  # (beams, batch)
    cases = [case for case in cases if case[0] > 1] if beam_only else cases
    dtypes = {"fp32": torch.float32} if quick or beam_only else {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    with torch.no_grad():
        for dtype_name, dtype in dtypes.items():
            ours, native = build_models(sizes, dtype, device)
            common = dict(dtype=dtype_name, device=device, params=sum(p.numel() for p in ours.parameters()))
            for beams, batch in cases:
                ids = prompt(batch, PROMPT, sizes["vocab_size"], device)
                ms = decode_ms_per_token(
                    {"ours": generator_for(ours, ids, beams), "native": generator_for(native, ids, beams)},
                    new_tokens,
                    repeats,
                    device,
                )
                same = torch.equal(generator_for(ours, ids, beams)(new_tokens)(),
                                   generator_for(native, ids, beams)(new_tokens)())  # fmt: skip
                name = "decode" if beams == 1 else f"beam{beams}"
                rows.append(
                    ratio_row("gpt2_decode", f"{name} b={batch}", ms["ours"], ms["native"], unit="ms/token",
                              same_ids=same, **common)
                )  # fmt: skip
            for length in () if beam_only else (512,) if quick else (512, 2048):
                ids = prompt(1, length, sizes["vocab_size"], device)
                times = alternate({"ours": partial(ours, ids), "native": partial(native, ids)}, repeats, device)
                rows.append(
                    ratio_row("gpt2_decode", f"prefill {length}", summary(times["ours"]), summary(times["native"]),
                              unit="ms/call", **common)
                )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv, ("--beam-only", dict(action="store_true", help="only the fp32 beam-search cases")))


if __name__ == "__main__":
    main()
