"""Sparse GPT-2 (CogView) attention on long sequences: sparse training (is_sparse=1) and sparse inference
(is_sparse=2) against dense attention (is_sparse=0, sdpa and eager), s = 1024 .. 8192.

    python scripts/benchmark.py --only gpt2_sparse [--quick]
    python scripts/benchmarks/gpt2_sparse.py [--quick] [--sizes 1024,2048] [--threads N] [--out DIR]

Model: hidden 256, 4 layers, 4 heads, w=64, t=4, P=256 (CogView's text2image settings), vocab 1024 with the
first 32 tokens of each row text and the rest image tokens, fp32, batch 1, no dropout; the sdpa and eager models
hold the same weights. Rows: `train s=N` = forward + backward of the LM loss (mode 1 against mode 0), `infer s=N`
= forward under no_grad (mode 2 against mode 0).

Time: one fresh process runs every case of every size in turn within each round, after one warm-up step each,
so that machine load hits all cases and sizes alike (the ratios and the slope compare steps timed seconds apart,
not minutes); medians over 5 rounds. Peak memory: one fresh process per case; after a warm-up step on 512 tokens
(library initialisation, code pages and allocator pools are not activations), the peak resident set during one
step minus the resident set before it, with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the resident
set and the peak tracks live tensors rather than glibc's heap high-water mark. On a shared machine pass
`--threads 1`: with more torch threads than free cores, every kernel waits for descheduled worker threads, which
costs the sparse modes (hundreds of mid-sized kernels per layer) far more than sdpa's one fused kernel.

Targets at the largest size (issue 7): mode-1 step <= 0.6x dense sdpa; mode-1 peak memory <= dense sdpa's and
<= 0.5x dense eager's; mode-1 time growing about linearly (log-log slope <= 1.3 between the two largest sizes).
A full run writes gpt2_sparse_scaling.json (numbers, slope, PASS/FAIL per target, machine) and
gpt2_sparse_scaling.png (time and peak memory against s, log-log) into benchmarks/results/ (or --out); a quick
run (1024..4096, one round) writes them only when --out is given, so it never replaces the full sweep's files.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, alternate, repo_module, timed_ms

FULL_SIZES = (1024, 2048, 4096, 8192)
QUICK_SIZES = (1024, 2048, 4096)
WARMUP_TOKENS = 512
RESULTS = REPO_ROOT / "benchmarks" / "results"
STEM = "gpt2_sparse_scaling"
# name: (is_sparse, attention implementation)
TRAIN = {"sparse1": (1, "sdpa"), "dense_sdpa": (0, "sdpa"), "dense_eager": (0, "eager")}
INFER = {"sparse2": (2, "sdpa"), "dense_sdpa": (0, "sdpa")}
LIMITS = {"time_vs_sdpa": 0.6, "memory_vs_sdpa": 1.0, "memory_vs_eager": 0.5, "time_slope": 1.3}


def _model(s: int, attn: str):
    import torch

    config_class = repo_module("configuration_gpt2_sparse").GPT2SparseConfig
    model_class = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel
    config = config_class(
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
        attn_implementation=attn,
    )
    torch.manual_seed(0)
    return model_class(config)


def _tokens(s: int):
    import torch

    generator = torch.Generator().manual_seed(s)
    ids = torch.randint(0, 960, (1, s), generator=generator)
    ids[:, :32] = torch.randint(960, 1024, (1, 32), generator=generator)  # text tokens: always pivots
    return ids


def _step(model, ids, mode: int, kind: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    model.train(kind == "train")

    def train():
        out = model(ids, labels=ids, is_sparse=mode, generator=generator, use_cache=False)
        out.loss.backward()
        model.zero_grad(set_to_none=True)

    def infer():
        with torch.no_grad():
            model(ids, is_sparse=mode, generator=generator, use_cache=False, logits_to_keep=1)

    return train if kind == "train" else infer


def time_all(args: dict) -> dict:
    """In a fresh process: {'<s>/train/<name>': [ms, ...], '<s>/infer/<name>': [...]} for every size of
    args['sizes'], all cases alternating within each round."""
    import torch

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    cases = {}
    for s in args["sizes"]:
        models = {attn: _model(s, attn) for attn in ("sdpa", "eager")}
        ids = _tokens(s)
        for kind, table in (("train", TRAIN), ("infer", INFER)):
            for name, (mode, attn) in table.items():
                cases[f"{s}/{kind}/{name}"] = _step(models[attn], ids, mode, kind)
    return alternate(cases, args["repeats"], "cpu")


def peak_case(args: dict) -> dict:
    """In a fresh process: the peak resident memory (MiB) of one step of one case, above the resident set after a
    warm-up step on WARMUP_TOKENS tokens."""
    import resource

    import torch

    def resident_mib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    if args.get("threads"):
        torch.set_num_threads(args["threads"])
    mode, attn = (TRAIN if args["kind"] == "train" else INFER)[args["name"]]
    model = _model(args["s"], attn)
    _step(model, _tokens(WARMUP_TOKENS), mode, args["kind"])()
    step = _step(model, _tokens(args["s"]), mode, args["kind"])
    base = resident_mib()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"peak_mib": peak - base}


def _in_subprocess(function: str, args: dict, env: dict | None = None) -> dict:
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); import gpt2_sparse; "
        f"print(json.dumps(gpt2_sparse.{function}(json.loads(sys.argv[2]))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(Path(__file__).resolve().parent), json.dumps(args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(values: list[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def size_rows(s: int, times: dict, threads: int | None) -> list[dict]:
    """The train and infer rows of one sequence length: times from time_all, peak memory measured here."""
    rows = []
    for kind, table, sparse in (("train", TRAIN, "sparse1"), ("infer", INFER, "sparse2")):
        row: dict = {"case": f"{kind} s={s}", "s": s}
        for name in table:
            if "error" in times:
                row[f"{name}_error"] = times["error"]
            else:
                row[f"{name}_ms"] = _median(times[f"{s}/{kind}/{name}"])
            memory = _in_subprocess(
                "peak_case",
                {"s": s, "kind": kind, "name": name, "threads": threads},
                {"MALLOC_MMAP_THRESHOLD_": "65536"},
            )
            row[f"{name}_peak_mib"] = memory.get("peak_mib", float("nan"))
            if "error" in memory:
                row[f"{name}_error"] = memory["error"]
        if f"{sparse}_ms" in row and "dense_sdpa_ms" in row:
            row["ratio"] = row[f"{sparse}_ms"] / row["dense_sdpa_ms"]
        row["mem_vs_sdpa"] = row[f"{sparse}_peak_mib"] / row["dense_sdpa_peak_mib"]
        if kind == "train":
            row["mem_vs_eager"] = row["sparse1_peak_mib"] / row["dense_eager_peak_mib"]
        rows.append(row)
    return rows


def verdict(rows: list[dict]) -> tuple[float | None, list[dict]]:
    """(mode-1 slope between the two largest sizes, the issue's targets checked at the largest size)."""
    train = [r for r in rows if r["case"].startswith("train") and "sparse1_ms" in r]
    if not train:
        return None, []
    slope = None
    if len(train) >= 2:
        a, b = train[-2], train[-1]
        slope = math.log(b["sparse1_ms"] / a["sparse1_ms"]) / math.log(b["s"] / a["s"])
    last = train[-1]
    values = {
        "time_vs_sdpa": last.get("ratio"),
        "memory_vs_sdpa": last.get("mem_vs_sdpa"),
        "memory_vs_eager": last.get("mem_vs_eager"),
        "time_slope": slope,
    }
    targets = []
    for name, value in values.items():
        ok = value is not None and not math.isnan(value) and value <= LIMITS[name]
        targets.append({"target": name, "at": last["s"], "value": value, "limit": LIMITS[name], "pass": ok})
    return slope, targets


def machine(threads: int | None) -> dict:
    import torch
    import transformers

    cpu = platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def run(
    quick: bool = False, sizes: tuple[int, ...] | None = None, threads: int | None = None, out: Path | None = None
) -> list[dict]:
    """Rows for scripts/benchmark.py; a full run (or one given `out`) also writes the json and the plot."""
    sizes = sizes or (QUICK_SIZES if quick else FULL_SIZES)
    repeats = 1 if quick else 5
    load_before = os.getloadavg()
    times = _in_subprocess("time_all", {"sizes": list(sizes), "repeats": repeats, "threads": threads})
    rows = [row for s in sizes for row in size_rows(s, times, threads)]
    slope, targets = verdict(rows)
    summary = list(rows)
    if slope is not None:
        summary.append({"case": f"mode-1 time slope s={sizes[-2]}..{sizes[-1]} (log-log)", "slope": slope})
    summary += [
        {"case": f"target {t['target']} at s={t['at']}", "value": t["value"], "limit": t["limit"], "pass": t["pass"]}
        for t in targets
    ]
    if out is None and not quick:
        out = RESULTS
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": machine(threads),
            "load_average_before_after": [load_before, os.getloadavg()],
            "setup": __doc__.split("\n\n")[2].replace("\n", " "),
            "repeats": repeats,
            "rows": rows,
            "slope": slope,
            "targets": targets,
        }
        (out / f"{STEM}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(rows, targets, out / f"{STEM}.png", result["machine"])
    return summary


def plot(rows: list[dict], targets: list[dict], path: Path, machine: dict | None = None) -> bool:
    """Time and peak memory against s, log-log. False (and nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("gpt2_sparse benchmark: matplotlib is not installed, no plot", file=sys.stderr)
        return False
    lines = (
        ("train", "sparse1", "mode 1 (sparse), fwd+bwd", "tab:green", "-", "s"),
        ("train", "dense_sdpa", "mode 0 sdpa, fwd+bwd", "tab:blue", "-", "o"),
        ("train", "dense_eager", "mode 0 eager, fwd+bwd", "tab:red", "-", "o"),
        ("infer", "sparse2", "mode 2 (sparse), fwd", "tab:green", "--", "s"),
        ("infer", "dense_sdpa", "mode 0 sdpa, fwd", "tab:blue", "--", "o"),
    )
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, ylabel in ((axes[0], "ms", "ms per step"), (axes[1], "peak_mib", "peak memory of a step (MiB)")):
        for kind, name, label, color, style, marker in lines:
            points = [
                (r["s"], r[f"{name}_{key}"])
                for r in rows
                if r["case"].startswith(kind) and isinstance(r.get(f"{name}_{key}"), float)
            ]
            if points:
                size = 8 if marker == "s" else 5  # squares under circles where the lines coincide (memory)
                ax.loglog(*zip(*points), marker=marker, markersize=size, color=color, linestyle=style, label=label)
        sizes = sorted({r["s"] for r in rows})
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("sequence length s")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    status = ", ".join(
        f"{t['target']} {t['value']:.2f} {'PASS' if t['pass'] else 'FAIL'}" for t in targets if t["value"]
    )
    where = f"{machine['cpu']}, {machine['torch_threads']} thread(s), torch {machine['torch']}" if machine else "CPU"
    fig.suptitle(f"Sparse GPT-2: hidden 256, 4 layers, w=64, t=4, P=256, fp32; {where}\n{status}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------------------------
# CUDA (issue 22): the FlexAttention path against dense sdpa (flash), attention alone and the whole model.
# ---------------------------------------------------------------------------------------------------------------
CUDA_SIZES = (4096, 8192, 16384, 32768, 65536)
CUDA_STEM = "gpt2_sparse_cuda"
# (what, sequence length, value, limit): the targets
CUDA_LIMITS = (
    ("attention mode 1 fwd+bwd / dense", 16384, 0.6),
    ("attention mode 1 fwd+bwd / dense", 32768, 0.35),
    ("model mode 1 fwd+bwd / dense", 32768, 0.75),
    ("model mode 1 fwd+bwd / dense", 65536, 0.5),
    ("model mode 2 fwd / dense", 32768, 0.75),
    ("model mode 2 fwd / dense", 65536, 0.5),
)


def _cuda_setup(tiny: bool) -> dict:
    """The issue's shapes (40 heads x 64, hidden 2560, 4 layers, w=64, t=4, P=256, bf16), or a tiny dry run."""
    if tiny:
        return dict(heads=2, head_dim=16, layers=2, w=16, t=2, pivots=32, dtype="float32", sizes=(256, 512))
    return dict(heads=40, head_dim=64, layers=4, w=64, t=4, pivots=256, dtype="bfloat16", sizes=CUDA_SIZES)


def _pivots(s: int, n: int, device):
    """n sorted pivot positions: the 32 text tokens at the start plus random image positions (seeded)."""
    import torch

    generator = torch.Generator().manual_seed(s)
    rest = 32 + torch.randperm(s - 32, generator=generator)[: n - 32]
    return torch.cat([torch.arange(32), rest]).sort().values[None].to(device)


def _measure(cases: dict, rounds: int, device: str) -> dict:
    """{name: (median ms, peak MiB above the memory in use before the call)}; one warm-up (and compile) call each,
    then `rounds` rounds running the cases in turn."""
    import torch

    def once(fn):
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ms = timed_ms(fn, device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
        return ms, peak

    for fn in cases.values():
        once(fn)
    samples = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(once(fn))
    peak = {name: [p for _, p in v if p is not None] for name, v in samples.items()}
    return {name: (_median([m for m, _ in v]), max(peak[name], default=None)) for name, v in samples.items()}


def _attention_cases(s: int, setup: dict, device: str) -> dict:
    """Attention alone, [1, heads, s, head_dim]: dense causal sdpa against modes 1 and 2 (what one layer costs,
    its plan built beforehand), and the plan of each mode (window and pivot parts, block masks) on its own."""
    import torch
    import torch.nn.functional as F

    sa = repo_module("sparse_attention")
    dtype = getattr(torch, setup["dtype"])
    heads, head_dim, w, t, n = setup["heads"], setup["head_dim"], setup["w"], setup["t"], setup["pivots"]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, head_dim, generator=generator).to(device, dtype) for _ in range(3))
    grad = torch.randn(1, s, heads, head_dim, generator=generator).to(device, dtype)
    pivots, pos = _pivots(s, n, device), torch.arange(s, device=device)
    plans = {
        1: ((pos // w - (t - 1)) * w, w, t * w, math.log(s // n)),
        2: (pos - (t * w - 1), w, -(-(t * w + w - 1) // w) * w, 0.0),
    }
    scaling = head_dim**-0.5

    # The plan (both parts' block masks) is built once per mode by the warm-up call and reused, as the model
    # builds it once per forward for all its layers (mode 1's sampled pivots: the pivot part once per layer); what
    # building it costs is timed on its own ("mode N plan").
    block_masks = {1: {}, 2: {}}

    def sparse(mode, q, k, v):
        start, block, span, bias = plans[mode]
        return sa.sparse_window_attention(
            q, k, v, start, block, span, pivots, bias, None, scaling, block_masks=block_masks[mode]
        )

    def plan(mode):
        def step():
            parts = sa._FlexParts.get({}, q, k, plans[mode][0], pivots, None)
            parts.window.block_mask()
            if parts.pivots is not None:
                parts.pivots.block_mask()

        return step

    def dense(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def train(fn):
        def step():
            x = [a.detach().requires_grad_() for a in (q, k, v)]
            torch.autograd.grad(fn(*x), x, grad)

        return step

    def infer(fn):
        def step():
            with torch.no_grad():
                fn(q, k, v)

        return step

    return {
        "dense fwd+bwd": train(dense),
        "mode 1 fwd+bwd": train(lambda *x: sparse(1, *x)),
        "dense fwd": infer(dense),
        "mode 2 fwd": infer(lambda *x: sparse(2, *x)),
        "mode 1 plan": plan(1),
        "mode 2 plan": plan(2),
    }


def _model_cases(s: int, setup: dict, device: str, model) -> dict:
    """The whole model (vocab 1024, 32 text tokens then image tokens): dense (sdpa) against modes 1 and 2. Mode 1
    samples num_pivot=P pivots per layer, as training does; mode 2 gets P pivots (pivot_idx) shared by the layers."""
    import torch

    ids = _tokens(s).to(device)
    pivots = _pivots(s, setup["pivots"], device)

    def train(mode):
        def step():
            out = model(
                ids, labels=ids, is_sparse=mode, use_cache=False, generator=torch.Generator(device).manual_seed(0)
            )
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    def infer(mode):
        def step():
            with torch.no_grad():
                model(ids, is_sparse=mode, use_cache=False, logits_to_keep=1, pivot_idx=pivots if mode else None)

        return step

    return {"dense fwd+bwd": train(0), "mode 1 fwd+bwd": train(1), "dense fwd": infer(0), "mode 2 fwd": infer(2)}


def _check_flex(setup: dict, device: str) -> dict:
    """Largest |flex - kernel| of the attention output (modes 1 and 2, s=2048, the benchmark's shapes), relative to
    the largest |output|: a correctness sign that needs no pytest."""
    import torch

    sa = repo_module("sparse_attention")
    s, w, t, n = 2048, setup["w"], setup["t"], min(setup["pivots"], 256)
    dtype = getattr(torch, setup["dtype"])
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, s, setup["head_dim"], generator=generator).to(device, dtype) for _ in range(3))
    pivots, pos = _pivots(s, n, device), torch.arange(s, device=device)
    result = {}
    with torch.no_grad():
        for mode, start, span, bias in (
            (1, (pos // w - (t - 1)) * w, t * w, math.log(s // n)),
            (2, pos - (t * w - 1), -(-(t * w + w - 1) // w) * w, 0.0),
        ):
            outs = [
                sa.sparse_window_attention(
                    q, k, v, start, w, span, pivots, bias, None, 0.125, block_masks={}, backend=b
                )
                for b in ("flex" if device == "cuda" else "kernel", "kernel")
            ]
            result[f"mode {mode} max |flex - kernel| / max |kernel|"] = float(
                (outs[0].float() - outs[1].float()).abs().max() / outs[1].float().abs().max()
            )
    return result


def cuda_all(args: dict) -> dict:
    """In a fresh process: attention alone, then the whole model (when transformers imports), size by size while
    the time budget lasts; the results file is rewritten after every size, so a killed run keeps what it measured."""
    import torch

    start_time = time.perf_counter()
    device, setup = args["device"], _cuda_setup(args["tiny"])
    sizes = args.get("sizes") or setup["sizes"]
    for name in ("recompile_limit", "cache_size_limit"):  # the flex kernel may see several shapes
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    result = {"machine": _cuda_machine(device), "setup": setup, "rows": [], "skipped": [], "notes": []}
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)

    def save():
        result["elapsed_s"] = round(time.perf_counter() - start_time, 1)
        result["targets"] = _cuda_targets(result["rows"])
        result["slopes"] = _cuda_slopes(result["rows"])
        try:
            from torch._dynamo.utils import counters

            result["compiled_graphs"] = int(counters["stats"]["unique_graphs"])
        except Exception:  # noqa: BLE001 - a diagnostic only
            pass
        (out / f"{CUDA_STEM}.json").write_text(json.dumps(result, indent=2) + "\n")

    try:
        result["check"] = _check_flex(setup, device)
    except Exception as error:  # noqa: BLE001 - recorded, and the timings still run
        result["check"] = {"error": f"{type(error).__name__}: {error}"[:2000]}
    save()
    sections = [("attention", lambda s: _attention_cases(s, setup, device))]
    try:
        import transformers  # noqa: F401

        sections.append(("model", None))
    except ImportError:
        result["notes"].append("transformers is not installed: the whole-model benchmark is skipped")
    for section, make in sections:
        model, last_s, last_took = None, None, 0.0
        for s in sizes:
            # the step costs at most ~4x per doubling (dense attention): stop before the budget runs out
            elapsed = time.perf_counter() - start_time
            if last_s and elapsed + last_took * (s / last_s) ** 2 > args["budget_s"]:
                result["skipped"].append(f"{section} s={s}: time budget")
                continue
            began = time.perf_counter()
            try:
                if section == "model":
                    model = model or _cuda_model(max(sizes), setup, device)
                    cases = _model_cases(s, setup, device, model)
                else:
                    cases = make(s)
                measured = _measure(cases, args["rounds"], device)
            except Exception as error:  # noqa: BLE001 - recorded; the next section still runs
                result["rows"].append({"section": section, "s": s, "error": f"{type(error).__name__}: {error}"[:2000]})
                save()
                break
            row = {"section": section, "s": s}
            for name, (ms, peak) in measured.items():
                row[f"{name} ms"], row[f"{name} peak MiB"] = round(ms, 3), peak and round(peak, 1)
            row["mode 1 fwd+bwd / dense"] = round(row["mode 1 fwd+bwd ms"] / row["dense fwd+bwd ms"], 3)
            row["mode 2 fwd / dense"] = round(row["mode 2 fwd ms"] / row["dense fwd ms"], 3)
            row["took_s"] = round(time.perf_counter() - began, 1)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            last_s, last_took = s, time.perf_counter() - began
            save()
            del cases
            if device == "cuda":
                torch.cuda.empty_cache()
        model = None
    save()
    return {"written": str(out / f"{CUDA_STEM}.json"), "elapsed_s": result["elapsed_s"]}


def _cuda_model(max_s: int, setup: dict, device: str):
    import torch

    config_class = repo_module("configuration_gpt2_sparse").GPT2SparseConfig
    model_class = repo_module("modeling_gpt2_sparse").GPT2SparseLMHeadModel
    config = config_class(
        vocab_size=1024,
        hidden_size=setup["heads"] * setup["head_dim"],
        num_layers=setup["layers"],
        num_attention_heads=setup["heads"],
        max_position_embeddings=max_s,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        query_window=setup["w"],
        key_window_times=setup["t"],
        num_pivot=setup["pivots"],
        num_image_tokens=960,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return model_class(config).to(device=device, dtype=getattr(torch, setup["dtype"])).train()


def _cuda_targets(rows: list[dict]) -> list[dict]:
    targets = []
    for what, s, limit in CUDA_LIMITS:
        section, ratio = what.split(" ", 1)[0], what.split(" ", 1)[1]
        row = next((r for r in rows if r["section"] == section and r["s"] == s and ratio in r), None)
        value = row[ratio] if row else None
        targets.append(
            {"target": f"{what} at s={s}", "value": value, "limit": limit, "pass": value is not None and value <= limit}
        )
    for section in ("attention", "model"):
        for r in rows:
            if r["section"] == section and r.get("dense fwd+bwd peak MiB") is not None:
                for mode, dense in (("mode 1 fwd+bwd", "dense fwd+bwd"), ("mode 2 fwd", "dense fwd")):
                    ok = r[f"{mode} peak MiB"] <= r[f"{dense} peak MiB"]
                    targets.append(
                        {
                            "target": f"{section} {mode} peak memory <= dense at s={r['s']}",
                            "value": r[f"{mode} peak MiB"],
                            "limit": r[f"{dense} peak MiB"],
                            "pass": ok,
                        }
                    )
    return targets


def _cuda_slopes(rows: list[dict]) -> dict:
    """Log-log slope of each sparse case's time between the sizes 16384 and 65536 (or the largest measured)."""
    slopes = {}
    for section in ("attention", "model"):
        measured = {r["s"]: r for r in rows if r["section"] == section and "mode 1 fwd+bwd ms" in r}
        low = 16384 if 16384 in measured else min(measured, default=None)
        high = max(measured, default=None)
        if low is None or high == low:
            continue
        for case in ("mode 1 fwd+bwd", "mode 2 fwd", "dense fwd+bwd"):
            a, b = measured[low][f"{case} ms"], measured[high][f"{case} ms"]
            slopes[f"{section} {case} s={low}..{high} (limit 1.2 for the sparse cases)"] = round(
                math.log(b / a) / math.log(high / low), 3
            )
    return slopes


def _cuda_machine(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    return info


def run_cuda(device: str, tiny: bool, sizes, out: Path, budget_s: float, rounds: int) -> dict:
    args = {
        "device": device,
        "tiny": tiny,
        "sizes": list(sizes) if sizes else None,
        "out": str(out),
        "budget_s": budget_s,
        "rounds": rounds,
    }
    return _in_subprocess("cuda_all", args)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="sparse GPT-2 attention scaling benchmark")
    parser.add_argument("--quick", action="store_true", help="s = 1024..4096, one round, no files unless --out")
    parser.add_argument("--sizes", default=None, help="comma-separated sequence lengths")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help=f"folder for {STEM}.json/.png (default {RESULTS})")
    parser.add_argument("--device", default="cpu", help="cpu (the CPU sweep above) or cuda (issue 22's sweep)")
    parser.add_argument("--tiny", action="store_true", help="with --device: tiny shapes, a dry run of the sweep")
    parser.add_argument("--budget-s", type=float, default=280, help="with --device: stop starting sizes after this")
    parser.add_argument("--rounds", type=int, default=2, help="with --device: timed rounds per case")
    args = parser.parse_args()
    chosen = tuple(int(x) for x in args.sizes.split(",")) if args.sizes else None
    if args.device != "cpu" or args.tiny:
        out = args.out or Path(os.environ.get("OUT") or RESULTS)
        print(json.dumps(run_cuda(args.device, args.tiny, chosen, out, args.budget_s, args.rounds)))
        sys.exit(0)
    for result in run(quick=args.quick, sizes=chosen, threads=args.threads, out=args.out):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}))
