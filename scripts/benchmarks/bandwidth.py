"""How close batch-1 decoding gets to the machine's memory bandwidth, the physical limit of decoding.

    python scripts/benchmark.py --only bandwidth [--quick]
    python scripts/benchmarks/bandwidth.py [--quick] [--device cpu|cuda]

Decoding one token at batch 1 reads every weight once (the tied LM head reads the embedding matrix) plus the KV
cache, and does little arithmetic per byte, so its floor is bytes read / memory bandwidth. This module measures,
in the same run:
- the bandwidth: median of timed copies of a 1 GiB tensor into another (bytes read + bytes written per second);
- the per-token decode time of our GLM (ChatGLM-6B variant, ~110M parameters: hidden 768, 12 layers, vocab
  32000) in bf16 and fp32 after a 128-token prompt, the same way as the `glm` benchmark, with native GLM-4 of the
  same sizes alongside;
and reports achieved bandwidth = (weight bytes + mean KV-cache bytes) / time per token, as a fraction of the
measured copy bandwidth (target: >= 0.6 for bf16). Each model is timed two ways:
- `decode`: generate() as the `glm` benchmark runs it (greedy, 128 new tokens forced with `min_new_tokens`), which
  includes generate()'s own per-token work (logits processors, stopping criteria, input bookkeeping: the same
  code for ours and native);
- `model step`: the model alone, a plain greedy loop of one-token forwards with the cache (`argmax` of the last
  logits fed back, our 2-D positions advanced by hand), which is what the memory-bandwidth limit applies to;
- `compiled step` (bf16, ours, not with --quick): the same loop after `model.compile_decode_step()`, which removes
  the per-layer Python and dispatch cost (the first call's compilation, ~40 s here, is excluded).
"""

from __future__ import annotations

import copy
import statistics

from _common import cli, decode_ms_per_token, default_device, timed_ms
from glm import PROMPT, build_native, build_ours, generator_for, prompt

COPY_BYTES = 1 << 30


def copy_bandwidth(device: str, nbytes: int = COPY_BYTES, repeats: int = 9) -> float:
    """Bytes per second moved by `dst.copy_(src)` (read + write), median over repeats."""
    import torch

    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = [timed_ms(lambda: dst.copy_(src), device) for _ in range(repeats)]
    return 2 * nbytes / (statistics.median(ms) / 1000)


def decode_bytes(model, dtype, batch: int, kv_tokens: float) -> float:
    """Bytes one decode step reads: every parameter once (tied weights once) plus the K/V cache."""
    import torch

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    config = model.config
    layers = getattr(config, "num_layers", None) or config.num_hidden_layers
    kv = 2 * layers * config.hidden_size * kv_tokens * batch * torch.tensor([], dtype=dtype).element_size()
    return weights + kv


def stepper_for(model, ids, positions=None):
    """`make(n)` -> a callable running the prefill and then n one-token greedy steps with the cache, no generate().
    `positions`: our GLM's [B, 2, S] position ids of `ids` (each step advances the block position by one);
    None for a model that finds positions from the cache itself."""
    import torch

    def make(n: int):
        def run_steps():
            out = model(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens = [token]
            step_positions = positions[..., -1:] if positions is not None else None
            for _ in range(n - 1):
                kwargs = {}
                if step_positions is not None:
                    step_positions = step_positions + torch.tensor([0, 1], device=ids.device)[:, None]
                    kwargs["position_ids"] = step_positions
                out = model(input_ids=token, past_key_values=cache, use_cache=True, **kwargs)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
                tokens.append(token)
            return torch.cat(tokens, dim=1)  # the n greedy tokens, for checking against generate()

        return run_steps

    return make


def run(quick: bool = False, device: str | None = None) -> list[dict]:
    import torch

    device = device or default_device()
    new_tokens, repeats = (8, 3) if quick else (64, 5)
    bandwidth = copy_bandwidth(device, nbytes=COPY_BYTES // 4 if quick else COPY_BYTES)
    rows = [{"family": "bandwidth", "case": "tensor copy", "gb_per_s": round(bandwidth / 1e9, 2), "device": device}]
    dtypes = {"bf16": torch.bfloat16} if quick else {"bf16": torch.bfloat16, "fp32": torch.float32}
    with torch.no_grad():
        for name, dtype in dtypes.items():
            ours = build_ours("chatglm", dtype, device)
            native = build_native(dtype, device)
            ids = prompt(1, PROMPT, device)
            positions = ours.transformer.get_position_ids(ids)
            contenders = {
                "ours": generator_for(ours, ids),
                "native": generator_for(native, ids),
                "ours step": stepper_for(ours, ids, positions),
                "native step": stepper_for(native, ids),
            }
            if name == "bf16" and not quick:
                compiled = copy.deepcopy(ours)
                compiled.compile_decode_step()
                contenders["ours compiled step"] = stepper_for(compiled, ids, positions)
                contenders["ours compiled step"](2)()  # compile outside the timed rounds
            ms = decode_ms_per_token(contenders, new_tokens, repeats, device)
            kv_tokens = PROMPT + 1 + new_tokens / 2
            for who in contenders:
                model = ours if who.startswith("ours") else native
                nbytes = decode_bytes(model, dtype, 1, kv_tokens)
                achieved = nbytes / (ms[who][0] / 1000)
                timing = "compiled step" if "compiled" in who else "model step" if who.endswith("step") else "decode"
                side = who.split()[0]
                rows.append(
                    {
                        "family": "bandwidth",
                        "case": f"{timing} b=1 {name} {side}",
                        "ms_per_token": round(ms[who][0], 3),
                        "spread": round(ms[who][1], 3),
                        "mb_per_token": round(nbytes / 1e6, 1),
                        "gb_per_s": round(achieved / 1e9, 2),
                        "fraction_of_copy_bandwidth": round(achieved / bandwidth, 3),
                        "params": sum(p.numel() for p in model.parameters()),
                        "device": device,
                    }
                )
            del ours, native, contenders
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv)


if __name__ == "__main__":
    main()
