"""Python overhead per decoded token: the part of a decode step spent outside torch's kernels.

    python scripts/benchmark.py --only overhead [--quick]
    python scripts/benchmarks/overhead.py [--quick] [--sort N]

Greedy generate() of 32 tokens after a 128-token prompt at batch 1 runs under torch.profiler (CPU activities).
Per decoded token we report:
- `wall_ms`: the step's wall time (measured without the profiler, as in the `glm` benchmark);
- from the profiled run, the self time of the matrix-multiply and attention kernels (mm, addmm, bmm, sdpa) and
  of every torch operator, giving `outside_ops_fraction` = 1 - operators / profiled wall: the share spent in
  Python, transformers' generation loop and dispatch around the operators;
- `matmul_ms`, `outside_ops_ms`, `outside_matmul_ms` (wall - matmul: everything that is not the arithmetic the
  model must do): the profiled split scaled onto the unprofiled wall time (the profiler's own cost inflates
  both sides; the fractions are the robust numbers).
Two model sizes: the ~110M benchmark GLM (hidden 768, 12 layers) and a tiny one (hidden 64, 2 layers) where
almost everything is overhead. Ours and native GLM-4 of the same sizes, fp32, in the same run. `--sort N`
prints the top N operators by self time, for profiling.
"""

from __future__ import annotations

from _common import cli, decode_ms_per_token, default_device
from glm import PROMPT, SIZES, build_native, build_ours, generator_for, prompt

MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product", "aten::_flash")
TINY = dict(vocab_size=32000, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)


def profiled_ms(fn, new_tokens: int, sort: int = 0) -> tuple[float, float, float]:
    """(wall, matmul self, all-operator self) ms per token of a profiled run of `fn(n)()`, a generate call: the
    1 + `new_tokens` call minus the 1-token call, so the prefill drops out. Wall time and operator times are taken
    from the same profiled run, so the profiler's own cost is in both."""
    import time

    from torch.profiler import ProfilerActivity, profile

    totals = []
    for n in (1, 1 + new_tokens):
        call = fn(n)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            call()
            wall = (time.perf_counter() - start) * 1000
        events = prof.key_averages()
        matmul = sum(e.self_cpu_time_total for e in events if e.key.startswith(MATMUL_OPS)) / 1000
        ops = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::")) / 1000
        totals.append((wall, matmul, ops))
        if sort and n > 1:
            print(events.table(sort_by="self_cpu_time_total", row_limit=sort))
    (w1, m1, o1), (wn, mn, on) = totals
    return (wn - w1) / new_tokens, (mn - m1) / new_tokens, (on - o1) / new_tokens


def run(quick: bool = False, device: str | None = None, sort: int = 0) -> list[dict]:
    import torch

    device = device or default_device()
    new_tokens, repeats = (8, 3) if quick else (32, 5)
    sizes = {"tiny": TINY} if quick else {"110M": SIZES, "tiny": TINY}
    rows = []
    with torch.no_grad():
        for size_name, size in sizes.items():
            models = {
                "ours": build_ours("chatglm", torch.float32, device, sizes=size),
                "native": build_native(torch.float32, device, sizes=size),
            }
            ids = prompt(1, PROMPT, device)
            makers = {who: generator_for(model, ids) for who, model in models.items()}
            wall = decode_ms_per_token(makers, new_tokens, repeats, device)
            for who, make in makers.items():
                profiled_wall, matmul, ops = profiled_ms(make, new_tokens, sort)
                # the profiler slows everything down; scale its split of the step onto the unprofiled wall time
                scale = wall[who][0] / profiled_wall
                rows.append(
                    {
                        "family": "overhead",
                        "case": f"decode b=1 {size_name} {who}",
                        "wall_ms": round(wall[who][0], 3),
                        "profiled_wall_ms": round(profiled_wall, 3),
                        "matmul_ms": round(matmul * scale, 3),
                        "outside_ops_ms": round((profiled_wall - ops) * scale, 3),
                        "outside_matmul_ms": round((profiled_wall - matmul) * scale, 3),
                        "outside_ops_fraction": round(1 - ops / profiled_wall, 3),
                        "device": device,
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> None:
    cli(run, __doc__, argv, ("--sort", dict(type=int, default=0, help="print the top N operators by self time")))


if __name__ == "__main__":
    main()
