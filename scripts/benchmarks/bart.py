"""BART-gen against transformers' native BartForConditionalGeneration, the same weights in the same process.

    python scripts/benchmark.py --only bart [--quick]
    python scripts/benchmarks/bart.py [--quick] [--device cpu|cuda]

Model: a bart-base-like shape (d_model 768, 6+6 layers, 12 heads, FFN 3072, vocab 32000; ~140M parameters),
sdpa attention, fp32 and bf16. Cases, each with a 128-token source (every other row of a batch padded by a
quarter):
- `greedy b=N` / `beam4 b=N`: per-token decode time with the KV cache, 128 new tokens forced (`min_new_tokens`),
  measured per round as (time of 1 + N new tokens - time of 1 new token) / N, so the encoder pass and the
  first step are excluded; batch 1, 4 and 16 (beam search, 4 beams, at batch 1 and 8);
- `encode+prefill`: generating one token, ms per call.
Ours and native alternate within every round; medians and the interquartile spread are reported, with `ratio`
= ours / native, and `same_ids` says the two produced identical sequences.
"""

from __future__ import annotations

from _common import alternate, cli, decode_ms_per_token, default_device, ratio_row, repo_module, summary

FULL = dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12, decoder_attention_heads=12,
            encoder_ffn_dim=3072, decoder_ffn_dim=3072, vocab_size=32000)  # fmt: skip
QUICK = dict(d_model=128, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=512, decoder_ffn_dim=512, vocab_size=4000)  # fmt: skip
SOURCE = 128


def build_models(sizes: dict, dtype, device: str):
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    sizes = {**sizes, "max_position_embeddings": 512, "dropout": 0.0}
    torch.manual_seed(0)
    native_config = BartConfig(**sizes)
    native_config._attn_implementation = "sdpa"
    native = BartForConditionalGeneration(native_config).eval()
    config = repo_module("configuration_bart_gen").BartGenConfig(**sizes)
    config._attn_implementation = "sdpa"
    ours = repo_module("modeling_bart_gen").BartGenForConditionalGeneration(config).eval()
    ours.load_state_dict(native.state_dict())
    ours.generation_config = native.generation_config
    return ours.to(device=device, dtype=dtype), native.to(device=device, dtype=dtype)


def source(batch: int, vocab: int, device: str) -> dict:
    import torch

    generator = torch.Generator().manual_seed(batch)
    input_ids = torch.randint(3, vocab, (batch, SOURCE), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1::2, : SOURCE // 4] = 0  # every other row left-padded by a quarter
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def generator_for(model, inputs: dict, num_beams: int):
    def make(n: int):
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, num_beams=num_beams, do_sample=False, early_stopping=False)
        return lambda: model.generate(**inputs, **kwargs)

    return make


def run(quick: bool = False, device: str | None = None, beam_only: bool = False) -> list[dict]:
    """`beam_only`: only the fp32 beam-search cases (what `--beam-only` runs)."""
    import torch

    device = device or default_device()
    sizes = QUICK if quick else FULL
    new_tokens, repeats = (8, 3) if quick else (128, 5)
    dtypes = {"fp32": torch.float32} if quick or beam_only else {"fp32": torch.float32, "bf16": torch.bfloat16}
    cases = [(1, 1), (1, 4), (4, 1)] if quick else [(1, 1), (1, 4), (1, 16), (4, 1), (4, 8)]
    cases = [case for case in cases if case[0] > 1] if beam_only else cases
    rows = []
    with torch.no_grad():
        for dtype_name, dtype in dtypes.items():
            ours, native = build_models(sizes, dtype, device)
            common = dict(dtype=dtype_name, device=device, params=sum(p.numel() for p in ours.parameters()))
            for num_beams, batch in cases:
                inputs = source(batch, sizes["vocab_size"], device)
                ms = decode_ms_per_token(
                    {"ours": generator_for(ours, inputs, num_beams), "native": generator_for(native, inputs, num_beams)},
                    new_tokens, repeats, device,
                )  # fmt: skip
                same = torch.equal(generator_for(ours, inputs, num_beams)(new_tokens)(),
                                   generator_for(native, inputs, num_beams)(new_tokens)())  # fmt: skip
                name = "greedy" if num_beams == 1 else f"beam{num_beams}"
                rows.append(
                    ratio_row("bart", f"{name} b={batch}", ms["ours"], ms["native"], unit="ms/token", same_ids=same,
                              **common)
                )  # fmt: skip
            if beam_only:
                continue
            inputs = source(1, sizes["vocab_size"], device)
            times = alternate(
                {"ours": generator_for(ours, inputs, 1)(1), "native": generator_for(native, inputs, 1)(1)},
                repeats, device,
            )  # fmt: skip
            rows.append(
                ratio_row("bart", "encode+prefill b=1", summary(times["ours"]), summary(times["native"]),
                          unit="ms/call", **common)
            )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv, ("--beam-only", dict(action="store_true", help="only the fp32 beam-search cases")))


if __name__ == "__main__":
    main()
