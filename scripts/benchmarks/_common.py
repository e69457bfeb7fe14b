"""What every benchmark module shares: importing the repository's model files, timing runs that alternate
between ours and theirs, and per-token decode time.

Not a benchmark itself (the leading underscore keeps it out of `scripts/benchmark.py --only`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
_PACKAGE = "repo_code_for_benchmarks"


def repo_module(name: str):
    """A root module of the repository (e.g. "modeling_glm"), imported as part of a package because the
    model files use relative imports, as remote code does."""
    if _PACKAGE not in sys.modules:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [str(REPO_ROOT)]
        sys.modules[_PACKAGE] = package
    return importlib.import_module(f"{_PACKAGE}.{name}")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed_ms(fn: Callable[[], object], device: str) -> float:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def alternate(cases: dict[str, Callable[[], object]], repeats: int, device: str) -> dict[str, list[float]]:
    """Milliseconds of each callable over `repeats` rounds, running them in turn within each round (after one
    warm-up each), so that machine load hits every case alike."""
    for fn in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name].append(timed_ms(fn, device))
    return times


def summary(samples: list[float]) -> tuple[float, float]:
    """(median, spread) where spread is the interquartile range relative to the median."""
    median = statistics.median(samples)
    if len(samples) < 4:
        return median, (max(samples) - min(samples)) / median
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return median, (q3 - q1) / median


def decode_ms_per_token(
    generators: dict[str, Callable[[int], Callable[[], object]]], new_tokens: int, repeats: int, device: str
) -> dict[str, tuple[float, float]]:
    """Per-token decode time of each model, prefill excluded: in each round, time generating 1 token and
    1 + `new_tokens` tokens; per round the difference divided by `new_tokens`. `generators[name](n)` returns a
    callable generating n tokens. Returns {name: (median ms/token, relative spread)}."""
    cases = {}
    for name, make in generators.items():
        cases[f"{name}/1"] = make(1)
        cases[f"{name}/n"] = make(1 + new_tokens)
    times = alternate(cases, repeats, device)
    out = {}
    for name in generators:
        per_round = [(n - one) / new_tokens for one, n in zip(times[f"{name}/1"], times[f"{name}/n"])]
        out[name] = summary(per_round)
    return out


def ratio_row(family: str, case: str, ours: tuple[float, float], theirs: tuple[float, float], **extra) -> dict:
    """One results row: medians, spreads and ours / theirs (below 1.0: we are faster)."""
    return {
        "family": family,
        "case": case,
        "ours_ms": round(ours[0], 3),
        "native_ms": round(theirs[0], 3),
        "ratio": round(ours[0] / theirs[0], 3),
        "spread_ours": round(ours[1], 3),
        "spread_native": round(theirs[1], 3),
        **extra,
    }


def cli(run: Callable[..., list[dict]], doc: str, argv: list[str] | None = None, *flags: tuple[str, dict]) -> None:
    """The command line of a benchmark module: `--quick`, `--device` and the module's own `flags` (name, argparse
    keywords), passed to `run` by name; prints its rows as JSON lines."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    for name, options in flags:
        parser.add_argument(name, **options)
    for row in run(**vars(parser.parse_args(argv))):
        print(json.dumps(row))
