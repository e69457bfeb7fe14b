#!/usr/bin/env python
"""Measure this repository's models against what a user would pick instead, in the same run.

    python scripts/benchmark.py [--quick] [--only glm,bart,...] [--out benchmarks/results]

Every module in scripts/benchmarks/ defines `run(quick: bool) -> list[dict]`; each row names its
`family` and `case` and usually carries `ours_ms`, `native_ms` (or `reference_ms`) and `ratio`
(ours / theirs: below 1.0 means we are faster). Times are medians over alternating runs of ours and
theirs, so machine noise hits both sides alike. Results go to results.json and results.md, headed
by the machine (CPU model, cores, torch and transformers versions), since absolute times only mean
something on a named machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def to_markdown(info: dict, rows: list[dict]) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
        f"transformers {info['transformers']}, {info['date']}",
        "",
    ]
    by_family: dict[str, list[dict]] = {}
    for row in rows:
        by_family.setdefault(row["family"], []).append(row)
    for family, family_rows in by_family.items():
        keys = [k for k in family_rows[0] if k != "family"]
        for row in family_rows[1:]:
            keys += [k for k in row if k not in keys and k != "family"]
        lines += [f"### {family}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in family_rows:
            cells = []
            for k in keys:
                v = row.get(k, "")
                cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def label(row: dict) -> str:
    extras = [str(row[k]) for k in ("variant", "dtype") if row.get(k)]
    return f"{row['family']}: {row['case']}" + (f" ({', '.join(extras)})" if extras else "")


def plot_ratios(rows: list[dict], path: Path) -> bool:
    """A bar per compared case, ours / theirs (below the line at 1.0: ours is faster). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    compared = [row for row in rows if isinstance(row.get("ratio"), float)]
    if not compared:
        return False
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(compared) + 1.2))
    colors = ["tab:green" if row["ratio"] <= 1.0 else "tab:red" for row in compared]
    ax.barh([label(row) for row in compared], [row["ratio"] for row in compared], color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    limit = 2.0  # the tokenizer's ratios to raw SentencePiece (a floor, not a rival) reach 20: print those instead
    ax.set_xlim(0, limit)
    for y, row in enumerate(compared):
        if row["ratio"] > limit:
            ax.text(limit * 0.98, y, f"{row['ratio']:.1f}", ha="right", va="center", fontsize=7, color="white")
    ax.invert_yaxis()
    ax.set_xlabel("time ours / time of the native transformers model (lower is better)")
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    import benchmarks

    available = [m.name for m in pkgutil.iter_modules(benchmarks.__path__) if not m.name.startswith("_")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    parser.add_argument("--only", default=",".join(available), help=f"comma-separated subset of {available}")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default benchmarks/results, or "
        "benchmarks/results/quick for --quick, so a smoke run never replaces the measured results)",
    )
    args = parser.parse_args()
    if args.out is None:
        args.out = Path("benchmarks/results") / ("quick" if args.quick else "")
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {unknown}; available: {available}")
    info, rows = machine(), []
    for name in wanted:
        module = importlib.import_module(name)  # scripts/benchmarks/ is on sys.path
        print(f"== {name}", flush=True)
        for row in module.run(quick=args.quick):
            row.setdefault("family", name)
            print("  ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.json"
    if results.is_file() and not args.quick:
        # a partial run (--only) replaces its own families' rows and keeps the others
        previous = json.loads(results.read_text())
        kept = [row for row in previous["rows"] if row["family"] not in {row["family"] for row in rows} | set(wanted)]
        rows = kept + rows
        info = {**previous.get("machine", {}), **info}
    results.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    (args.out / "results.md").write_text(to_markdown(info, rows))
    written = [results, args.out / "results.md"]
    if plot_ratios(rows, args.out / "ratios.png"):
        written.append(args.out / "ratios.png")
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
