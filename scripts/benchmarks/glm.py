"""GLM speed against transformers' native GlmForCausalLM (GLM-4) of the same sizes.

    python scripts/benchmark.py --only glm [--quick]
    python scripts/benchmarks/glm.py [--quick] [--device cpu|cuda] [--beam-only]

Models are built in this process with random weights and sdpa attention: hidden 768, 12 layers, 12 heads
(head_dim 64), MLP width 3072, vocabulary 32000 (~110M parameters for ours; GLM-4's gated MLP makes the native
one ~138M). Both of our variants are measured: `chatglm` (ChatGLM-6B: 2-D rotary positions) and `glm` (GLM-10B
family: learned 2-D position embeddings), each in fp32 and bf16. Cases:
- `decode b=N`: per-token time of greedy generate() with the KV cache after a 128-token prompt, 128 new tokens
  forced (`min_new_tokens`), measured per round as (time of 1 + N new tokens - time of 1 new token) / N so the
  prefill is excluded; batch 1, 4 and 16;
- `decode b=1, equal params`: batch 1 against a GLM-4 with MLP width 2048, which holds as many weights as ours
  (decode at batch 1 reads every weight once per token, so this is the bandwidth-fair comparison);
- `decode b=1 after 1024` (ChatGLM variant): batch 1 after a 1024-token prompt, 64 new tokens;
- `prefill N`: one forward over an N-token prompt (batch 1), ms per call;
- with `--beam-only`, instead: `beam4 b=N` (fp32, 4 beams, batch 1 and 8, ChatGLM variant) against native, and
  `beam4 b=N vs greedy b=4N` against our own greedy decoding of as many rows (and `native beam4 b=N vs greedy
  b=4N`, the same for GLM-4: what transformers' beam bookkeeping itself costs over greedy decoding).
Ours and native alternate within every round; medians and the interquartile spread are reported, with
`ratio` = ours / native (below 1.0: ours is faster). Our prompts end with `[gMASK] <sop>` as the tokenizer's do;
the native model gets the same ids.
"""

from __future__ import annotations

from functools import partial

from _common import alternate, cli, decode_ms_per_token, default_device, ratio_row, repo_module, summary

SIZES = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_attention_heads=12, inner_hidden_size=3072)
MASK, GMASK, SMASK, SOP, EOP, PAD = 31000, 31001, 31002, 31004, 31005, 3
PROMPT = 128
LONG_PROMPT = 1024


def build_ours(variant: str, dtype, device: str, sizes: dict = SIZES):
    """Our GLM of the given sizes, or None when this checkout does not implement `variant`."""
    import torch

    GLMConfig = repo_module("configuration_glm").GLMConfig
    modeling = repo_module("modeling_glm")
    config = GLMConfig(
        **sizes, variant=variant, max_sequence_length=4096, mask_token_id=MASK, gmask_token_id=GMASK,
        smask_token_id=SMASK, bos_token_id=SOP, eos_token_id=EOP, pad_token_id=PAD,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    try:
        model = modeling.GLMForConditionalGeneration(config)
    except NotImplementedError:
        return None
    return model.to(device=device, dtype=dtype).eval()


def build_native(dtype, device: str, mlp_width: int | None = None, sizes: dict = SIZES):
    """transformers' GlmForCausalLM with our sizes (MLP width `mlp_width` if given)."""
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    config = GlmConfig(
        vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"],
        intermediate_size=mlp_width or sizes["inner_hidden_size"], num_hidden_layers=sizes["num_layers"],
        num_attention_heads=sizes["num_attention_heads"], num_key_value_heads=sizes["num_attention_heads"],
        head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
        max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=SOP, eos_token_id=EOP,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return GlmForCausalLM(config).to(device=device, dtype=dtype).eval()


def prompt(batch: int, length: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(length * 31 + batch)
    ids = torch.randint(10, 30000, (batch, length), generator=generator)
    ids[:, -2:] = torch.tensor([GMASK, SOP])
    return ids.to(device)


def generator_for(model, ids, num_beams: int = 1):
    """`make(n)` -> a callable that generates exactly n tokens after `ids` (greedy, or beam search)."""
    import torch

    def make(n: int):
        kwargs = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=PAD, eos_token_id=EOP)
        if num_beams > 1:
            kwargs.update(num_beams=num_beams, early_stopping=False)
        return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    return make


def run_beams(device: str, new_tokens: int, repeats: int, batches: tuple[int, ...] = (1, 8)) -> list[dict]:
    """fp32 beam search (4 beams) of the ChatGLM variant: ours against native at batch N (`beam4 b=N`), and ours
    against our own greedy decoding of the 4N rows the beams amount to (`beam4 b=N vs greedy b=4N`, ratio below
    1.0: a beam row costs no more than a greedy row; the beam bookkeeping and cache reorder are the difference), and
    native's beam against native's greedy for comparison."""
    import torch

    rows, native, ours = [], build_native(torch.float32, device), build_ours("chatglm", torch.float32, device)
    common = dict(variant="chatglm", dtype="fp32", device=device, unit="ms/token")
    for batch in batches:
        ids = prompt(batch, PROMPT, device)
        ms = decode_ms_per_token(
            {"ours": generator_for(ours, ids, 4), "native": generator_for(native, ids, 4),
             "ours greedy": generator_for(ours, ids.repeat_interleave(4, dim=0)),
             "native greedy": generator_for(native, ids.repeat_interleave(4, dim=0))},
            new_tokens, repeats, device,
        )  # fmt: skip
        rows.append(ratio_row("glm", f"beam4 b={batch}", ms["ours"], ms["native"], **common))
        for who, beam, greedy in (("", "ours", "ours greedy"), ("native ", "native", "native greedy")):
            row = ratio_row("glm", f"{who}beam4 b={batch} vs greedy b={4 * batch}", ms[beam], ms[greedy], **common)
            row["beam_ms"], row["spread_beam"] = row.pop("ours_ms"), row.pop("spread_ours")
            row["greedy_ms"], row["spread_greedy"] = row.pop("native_ms"), row.pop("spread_native")
            rows.append(row)
    return rows


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def run(quick: bool = False, device: str | None = None, beam_only: bool = False) -> list[dict]:
    """`beam_only`: only the fp32 beam-search cases (what `--beam-only` runs)."""
    import torch

    device = device or default_device()
    new_tokens, repeats = (8, 3) if quick else (128, 5)
    if beam_only:
        return run_beams(device, new_tokens, repeats, (1, 2) if quick else (1, 8))
    batches = (1, 4) if quick else (1, 4, 16)
    dtypes = {"fp32": torch.float32} if quick else {"fp32": torch.float32, "bf16": torch.bfloat16}
    rows = []
    with torch.no_grad():
        for dtype_name, dtype in dtypes.items():
            native = build_native(dtype, device)
            for variant in ("chatglm", "glm"):
                ours = build_ours(variant, dtype, device)
                if ours is None:
                    rows.append({"family": "glm", "case": f"{variant} (not implemented in this checkout)"})
                    continue
                common = dict(variant=variant, dtype=dtype_name, device=device, params_ours=params(ours),
                              params_native=params(native))  # fmt: skip
                for batch in batches:
                    ids = prompt(batch, PROMPT, device)
                    ms = decode_ms_per_token(
                        {"ours": generator_for(ours, ids), "native": generator_for(native, ids)},
                        new_tokens, repeats, device,
                    )  # fmt: skip
                    rows.append(
                        ratio_row("glm", f"decode b={batch}", ms["ours"], ms["native"], unit="ms/token",
                                  ours_tokens_per_s=round(batch * 1000 / ms["ours"][0], 1), **common)
                    )  # fmt: skip
                for length in (512,) if quick else (512, 2048):
                    ids = prompt(1, length, device)
                    times = alternate({"ours": partial(ours, ids), "native": partial(native, ids)}, repeats, device)
                    rows.append(
                        ratio_row("glm", f"prefill {length}", summary(times["ours"]), summary(times["native"]),
                                  unit="ms/call", **common)
                    )  # fmt: skip
                del ours
            del native
            if quick:
                continue
            # the weight-bandwidth-fair comparison: a GLM-4 whose gated MLP holds as many weights as ours
            matched = build_native(dtype, device, mlp_width=2 * SIZES["inner_hidden_size"] // 3)
            ours = build_ours("chatglm", dtype, device)
            ids = prompt(1, PROMPT, device)
            ms = decode_ms_per_token(
                {"ours": generator_for(ours, ids), "native": generator_for(matched, ids)}, new_tokens, repeats, device
            )
            rows.append(
                ratio_row("glm", "decode b=1, equal params", ms["ours"], ms["native"], unit="ms/token",
                          variant="chatglm", dtype=dtype_name, device=device, params_ours=params(ours),
                          params_native=params(matched))
            )  # fmt: skip
            # decoding after a long prompt, where the attention over the cache weighs more (one_token_attention)
            native = build_native(dtype, device)
            ids = prompt(1, LONG_PROMPT, device)
            ms = decode_ms_per_token(
                {"ours": generator_for(ours, ids), "native": generator_for(native, ids)}, new_tokens // 2, repeats,
                device,
            )  # fmt: skip
            rows.append(
                ratio_row("glm", f"decode b=1 after {LONG_PROMPT}", ms["ours"], ms["native"], unit="ms/token",
                          variant="chatglm", dtype=dtype_name, device=device, params_ours=params(ours),
                          params_native=params(native))
            )  # fmt: skip
            del matched, ours, native
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv, ("--beam-only", dict(action="store_true", help="only the fp32 beam-search cases")))


if __name__ == "__main__":
    main()
