"""GLM (ChatGLM-6B variant) speed against transformers' native GlmForCausalLM (GLM-4) of the same sizes.

    python scripts/benchmark.py --only glm [--quick]
    python scripts/benchmarks/glm.py [--quick] [--device cpu|cuda]

Both models are built in this process with random weights, fp32, sdpa attention: hidden 768, 12 layers, 12 heads
(head_dim 64), MLP width 3072, vocabulary 32000 (~110M parameters for ours; GLM-4's gated MLP makes the native
one ~138M; a third, GLM-4 with MLP width 2048, has as many parameters as ours). Cases:
- `decode b=1`, `decode b=4`: per-token time of greedy generate() with the KV cache after a 128-token prompt,
  measured as (time of 1 + N new tokens - time of 1 new token) / N, so the prefill is excluded;
- `decode b=1, equal params`: the same against the equal-parameter GLM-4 (decode at batch 1 reads every weight
  once per token, so this is the bandwidth-fair comparison);
- `prefill 512`, `prefill 2048`: one forward over the prompt (batch 1), as ms per call.
Ours and native alternate run by run and the medians are reported; `ratio` = ours / native (target for decode:
<= 1.05). Our prompts end with `[gMASK] <sop>` like the tokenizer's; the native model gets the same ids.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
SIZES = dict(vocab_size=32000, hidden_size=768, num_layers=12, num_attention_heads=12, inner_hidden_size=3072)
GMASK, SOP, EOP = 31001, 31004, 31005


def _import_ours():
    """The repository's model files as a package (they use relative imports, as remote code does)."""
    if "glm_repo" not in sys.modules:
        package = types.ModuleType("glm_repo")
        package.__path__ = [str(REPO_ROOT)]
        sys.modules["glm_repo"] = package
    from glm_repo.configuration_glm import GLMConfig
    from glm_repo.modeling_glm import GLMForConditionalGeneration

    return GLMConfig, GLMForConditionalGeneration


def build_models(device: str):
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    GLMConfig, GLMForConditionalGeneration = _import_ours()
    torch.manual_seed(0)
    ours_config = GLMConfig(
        **SIZES, max_sequence_length=4096, mask_token_id=31000, gmask_token_id=GMASK, smask_token_id=31002,
        bos_token_id=SOP, eos_token_id=EOP, pad_token_id=3,
    )  # fmt: skip
    ours_config._attn_implementation = "sdpa"
    ours = GLMForConditionalGeneration(ours_config)
    native_config = GlmConfig(
        vocab_size=SIZES["vocab_size"], hidden_size=SIZES["hidden_size"], intermediate_size=SIZES["inner_hidden_size"],
        num_hidden_layers=SIZES["num_layers"], num_attention_heads=SIZES["num_attention_heads"],
        num_key_value_heads=SIZES["num_attention_heads"], head_dim=SIZES["hidden_size"] // SIZES["num_attention_heads"],
        max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=3, bos_token_id=SOP, eos_token_id=EOP,
    )  # fmt: skip
    native_config._attn_implementation = "sdpa"
    native = GlmForCausalLM(native_config)
    # GLM-4's MLP is gated (gate and up projections): width 2048 holds as many weights as our 3072-wide MLP
    matched_config = GlmConfig(**{**native_config.to_dict(), "intermediate_size": 2 * SIZES["inner_hidden_size"] // 3})
    matched_config._attn_implementation = "sdpa"
    matched = GlmForCausalLM(matched_config)
    return ours.to(device).eval(), native.to(device).eval(), matched.to(device).eval()


def _prompt(batch: int, length: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(length * 31 + batch)
    ids = torch.randint(10, 30000, (batch, length), generator=generator)
    ids[:, -2:] = torch.tensor([GMASK, SOP])
    return ids.to(device)


def _timed(fn, device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def _alternate(cases: dict[str, callable], repeats: int, device: str) -> dict[str, float]:
    """Median ms of each callable, running them in turn (after one warm-up each)."""
    for fn in cases.values():
        fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ours, native, matched = build_models(device)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("ours", ours), ("native", native))}
    matched_params = {"ours": params["ours"], "native": sum(p.numel() for p in matched.parameters())}
    rows = []
    new_tokens = 8 if quick else 32
    repeats = 3 if quick else 7

    def generate(model, ids, n):
        gen = dict(do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=3, eos_token_id=EOP)
        return lambda: model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **gen)

    with torch.no_grad():
        for batch in (1, 4):
            ids = _prompt(batch, 128, device)
            ms = _alternate(
                {
                    "ours_1": generate(ours, ids, 1), "native_1": generate(native, ids, 1),
                    "ours_n": generate(ours, ids, 1 + new_tokens), "native_n": generate(native, ids, 1 + new_tokens),
                },
                repeats, device,
            )  # fmt: skip
            ours_ms = (ms["ours_n"] - ms["ours_1"]) / new_tokens
            native_ms = (ms["native_n"] - ms["native_1"]) / new_tokens
            rows.append(_row(f"decode b={batch}", ours_ms, native_ms, batch, device, params, unit="ms/token"))
        # the weight-bandwidth-fair comparison: a GLM-4 with as many parameters as ours
        ids = _prompt(1, 128, device)
        ms = _alternate(
            {
                "ours_1": generate(ours, ids, 1), "matched_1": generate(matched, ids, 1),
                "ours_n": generate(ours, ids, 1 + new_tokens), "matched_n": generate(matched, ids, 1 + new_tokens),
            },
            repeats, device,
        )  # fmt: skip
        ours_ms = (ms["ours_n"] - ms["ours_1"]) / new_tokens
        matched_ms = (ms["matched_n"] - ms["matched_1"]) / new_tokens
        rows.append(
            _row("decode b=1, equal params", ours_ms, matched_ms, 1, device, matched_params, unit="ms/token",
                 baseline="transformers GlmForCausalLM (GLM-4), MLP width 2048 (equal parameters), fp32, sdpa")
        )  # fmt: skip
        for length in (512,) if quick else (512, 2048):
            ids = _prompt(1, length, device)
            ms = _alternate({"ours": lambda x=ids: ours(x), "native": lambda x=ids: native(x)}, repeats, device)
            rows.append(_row(f"prefill {length}", ms["ours"], ms["native"], length, device, params, unit="ms/call"))
    return rows


def _row(
    case: str,
    ours_ms: float,
    native_ms: float,
    tokens: int,
    device: str,
    params: dict,
    unit: str,
    baseline: str = "transformers GlmForCausalLM (GLM-4), same sizes, random weights, fp32, sdpa",
) -> dict:
    return {
        "family": "glm",
        "case": case,
        "ours_ms": round(ours_ms, 3),
        "native_ms": round(native_ms, 3),
        "ratio": round(ours_ms / native_ms, 3),
        "ours_tokens_per_s": round(tokens * 1000 / ours_ms, 1),
        "native_tokens_per_s": round(tokens * 1000 / native_ms, 1),
        "unit": unit,
        "device": device,
        "params_ours": params["ours"],
        "params_native": params["native"],
        "baseline": baseline,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args(argv)
    for row in run(quick=args.quick, device=args.device):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
