"""Sparse GPT-2 (CogView) attention: sparse training (is_sparse=1) and sparse inference (is_sparse=2) against
dense attention (is_sparse=0, sdpa and eager) on long sequences.

    python scripts/benchmark.py --only gpt2_sparse [--quick]
    python scripts/benchmarks/gpt2_sparse.py [--quick] [--sizes 1024,2048] [--plot out.png]

Model: hidden 256, 4 layers, 4 heads, w=64, t=4, P=256 (CogView's text2image settings), vocab 1024 with the
first 32 tokens of each row text and the rest image tokens, fp32, batch 1. Each case runs in its own
subprocess so its peak resident memory can be read (ru_maxrss minus the resident size after building the model
and inputs, i.e. the activations and temporaries of the step), measured in a second process with
MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the resident set (see _run_case). Times are medians over the repeats,
after one warm-up step. Rows: `train` = forward + backward of the LM loss, `infer` = forward under no_grad.
Targets (at the largest size): mode-1 step <= 0.6x dense sdpa, mode-1 peak <= dense sdpa and <= 0.5x dense
eager, log-log time slope of mode 1 <= 1.3 between the two largest sizes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
FULL_SIZES = (1024, 2048, 4096, 8192)
QUICK_SIZES = (1024, 2048, 4096)
EAGER_LIMIT = 8192  # eager keeps 4 layers of [heads, s, s] fp32 probabilities for backward: 4 GiB at 8192


def _import_model():
    """Import the repository's model files as a package (they use relative imports, as remote code does)."""
    if "gpt2_sparse_repo" not in sys.modules:
        pkg = types.ModuleType("gpt2_sparse_repo")
        pkg.__path__ = [str(REPO_ROOT)]
        sys.modules["gpt2_sparse_repo"] = pkg
    from gpt2_sparse_repo.configuration_gpt2_sparse import GPT2SparseConfig
    from gpt2_sparse_repo.modeling_gpt2_sparse import GPT2SparseLMHeadModel

    return GPT2SparseConfig, GPT2SparseLMHeadModel


def _measure(case: dict) -> dict:
    """Run one case in this process: {'mode', 'attn', 'kind', 's', 'repeats'} -> {'ms', 'peak_mib'}."""
    import resource
    import statistics
    import time

    import torch

    def rss_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    GPT2SparseConfig, GPT2SparseLMHeadModel = _import_model()
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    s = case["s"]
    config = GPT2SparseConfig(
        vocab_size=1024,
        hidden_size=256,
        num_layers=4,
        num_attention_heads=4,
        max_position_embeddings=max(s, 1024),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        query_window=64,
        key_window_times=4,
        num_pivot=256,
        num_image_tokens=960,
        attn_implementation=case["attn"],
    )
    model = GPT2SparseLMHeadModel(config)
    ids = torch.randint(0, 960, (1, s))
    ids[:, :32] = torch.randint(960, 1024, (1, 32))
    gen = torch.Generator().manual_seed(0)
    training = case["kind"] == "train"
    model.train(training)

    def step():
        if training:
            out = model(ids, labels=ids, is_sparse=case["mode"], generator=gen, use_cache=False)
            out.loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(ids, is_sparse=case["mode"], generator=gen, use_cache=False, logits_to_keep=1)

    base = rss_mib()
    step()  # warm-up
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {"ms": statistics.median(times) if times else float("nan"), "peak_mib": peak - base}


def _subprocess(case: dict, env: dict) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from benchmarks.gpt2_sparse import _measure; print(json.dumps(_measure(json.loads(sys.argv[2]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(REPO_ROOT / "scripts"), json.dumps(case)],
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_case(case: dict) -> dict:
    """Time in one fresh process, peak memory in another: the memory run sends every allocation above 64 KiB
    through mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set and ru_maxrss tracks live
    tensors rather than glibc's heap high-water mark; that setting slows allocation-heavy code, hence two runs."""
    timed = _subprocess(case, dict(os.environ))
    if "error" in timed:
        return timed
    memory = _subprocess(dict(case, repeats=0), dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"))
    return {"ms": timed["ms"], "peak_mib": memory.get("peak_mib", float("nan"))}


PLOT = "benchmarks/results/gpt2_sparse.png"  # next to scripts/benchmark.py's default results folder


def run(
    quick: bool = False, sizes: tuple[int, ...] | None = None, plot: str | None = PLOT, threads: int | None = None
) -> list[dict]:
    """threads: torch intra-op threads per case (default: torch's); 1 gives steadier numbers on a shared machine,
    where the many small kernels of the sparse path suffer most from descheduled worker threads."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    repeats = 1 if quick else 3
    rows = []
    for s in sizes:
        train = {
            name: _run_case(
                {"mode": mode, "attn": attn, "kind": "train", "s": s, "repeats": repeats, "threads": threads}
            )
            for name, mode, attn in (("sparse1", 1, "sdpa"), ("dense_sdpa", 0, "sdpa"), ("dense_eager", 0, "eager"))
            if name != "dense_eager" or s <= EAGER_LIMIT
        }
        infer = {
            name: _run_case(
                {"mode": mode, "attn": "sdpa", "kind": "infer", "s": s, "repeats": repeats, "threads": threads}
            )
            for name, mode in (("sparse2", 2), ("dense_sdpa", 0))
        }
        row = {"case": f"train s={s}", "s": s}
        for name, res in train.items():
            for key, value in res.items():
                row[f"{name}_{key}"] = value
        if "ms" in train["sparse1"] and "ms" in train["dense_sdpa"]:
            row["ratio"] = train["sparse1"]["ms"] / train["dense_sdpa"]["ms"]
            row["mem_vs_sdpa"] = train["sparse1"]["peak_mib"] / max(train["dense_sdpa"]["peak_mib"], 1e-9)
        if "ms" in train.get("dense_eager", {}) and "ms" in train["sparse1"]:
            row["mem_vs_eager"] = train["sparse1"]["peak_mib"] / max(train["dense_eager"]["peak_mib"], 1e-9)
        rows.append(row)
        row = {"case": f"infer s={s}", "s": s}
        for name, res in infer.items():
            for key, value in res.items():
                row[f"{name}_{key}"] = value
        if "ms" in infer["sparse2"] and "ms" in infer["dense_sdpa"]:
            row["ratio"] = infer["sparse2"]["ms"] / infer["dense_sdpa"]["ms"]
        rows.append(row)

    train_rows = [r for r in rows if r["case"].startswith("train") and "sparse1_ms" in r]
    if len(train_rows) >= 2:
        a, b = train_rows[-2], train_rows[-1]
        slope = math.log(b["sparse1_ms"] / a["sparse1_ms"]) / math.log(b["s"] / a["s"])
        rows.append({"case": f"mode-1 log-log time slope s={a['s']}..{b['s']}", "slope": slope})
    if plot:
        _plot(rows, plot)
    return rows


def _plot(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gpt2_sparse benchmark: matplotlib is not installed, skipping the plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, names in (("train", ("sparse1", "dense_sdpa", "dense_eager")), ("infer", ("sparse2", "dense_sdpa"))):
        sel = [r for r in rows if r["case"].startswith(kind)]
        for name in names:
            pts = [(r["s"], r[f"{name}_ms"]) for r in sel if f"{name}_ms" in r]
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=f"{kind} {name}")
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms per step")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"gpt2_sparse benchmark: plot written to {path}", file=sys.stderr)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="sparse GPT-2 attention benchmark")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sizes", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per case (default: torch's)")
    parser.add_argument("--plot", default=PLOT, help="PNG path (written only if matplotlib is installed)")
    args = parser.parse_args()
    chosen = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    for result in run(quick=args.quick, sizes=chosen, plot=args.plot, threads=args.threads):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
