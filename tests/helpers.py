"""Shared test helpers: paths, tensor comparison with readable failures, fresh-process loading.

Loading through the Auto classes must be tested in a fresh Python process: transformers caches
dynamic modules per process, which hides bugs such as a code file missing from a saved folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DATA = Path(__file__).resolve().parent / "data"
# The real tokenizer files (ChatGLM-6B, GLM-Chinese, GPT-2 BPE); tests/data/tokenizers/SOURCES.md says where from.
TOKENIZER_DATA = TEST_DATA / "tokenizers"

sys.path.append(str(REPO_ROOT / "scripts"))  # the converters: what a converted folder holds is decided there
from converters.common import code_files  # noqa: E402,F401  (re-exported: each family's code files)


def assert_close(actual, expected, atol: float = 1e-5, rtol: float = 0.0, msg: str = "") -> None:
    """Assert two tensors agree elementwise; the failure names the max and mean absolute difference."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{msg}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.double(), expected.double()
    diff = (a - e).abs()
    finite = torch.isfinite(a) == torch.isfinite(e)
    ok = finite.all() and bool((diff[torch.isfinite(e)] <= atol + rtol * e.abs()[torch.isfinite(e)]).all())
    if not ok:
        worst = torch.nan_to_num(diff, nan=float("inf")).argmax()
        raise AssertionError(
            f"{msg}: tensors differ (atol={atol}, rtol={rtol}): max abs diff {diff.nan_to_num(float('inf')).max():.3e}"
            f" at flat index {int(worst)}, mean abs diff {diff.nan_to_num(0).mean():.3e}"
        )


def fresh_env(hf_home: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for a fresh process: offline, with its own HF_HOME (so its own module cache)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(hf_home or tempfile.mkdtemp(prefix="hf_home_")),
        TOKENIZERS_PARALLELISM="false",
        PYTHONHASHSEED="0",
    )
    env.pop("HF_MODULES_CACHE", None)
    return env


def run_fresh(code: str, *args: str, timeout: float = 300, cwd: str | os.PathLike | None = None) -> str:
    """Run `code` with this interpreter in a fresh, offline process; return its stdout.

    `args` become sys.argv[1:]. The child's working directory is a scratch folder (not the repo
    root), so nothing is imported from the repository by accident. On a non-zero exit the
    AssertionError carries the child's stderr.
    """
    with tempfile.TemporaryDirectory(prefix="fresh_") as scratch:
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
            cwd=str(cwd or scratch),
            env=fresh_env(Path(scratch) / "hf_home"),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if proc.returncode != 0:
        raise AssertionError(f"fresh process failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    return proc.stdout


def load_in_fresh_process(
    folder, auto_class: str, inputs: dict[str, torch.Tensor], out_file, method: str = "forward", **kwargs
) -> None:
    """Load `folder` with transformers.<auto_class>.from_pretrained(trust_remote_code=True) in a fresh
    process, run it on `inputs` and save the result to `out_file` (safetensors).

    method="forward" stores the logits; method="generate" stores the generated ids (kwargs go to
    generate). Inputs travel through a safetensors file, never pickle.
    """
    from safetensors.torch import save_file

    in_file = Path(out_file).with_suffix(".inputs.safetensors")
    save_file({k: v.contiguous() for k, v in inputs.items()}, str(in_file))
    code = f"""
        import sys, json, torch, transformers
        from safetensors.torch import load_file, save_file
        folder, in_file, out_file, method, kwargs = sys.argv[1:6]
        kwargs = json.loads(kwargs)
        model = getattr(transformers, {auto_class!r}).from_pretrained(folder, trust_remote_code=True)
        model.eval()
        inputs = load_file(in_file)
        with torch.no_grad():
            if method == "forward":
                out = model(**inputs).logits
            else:
                out = model.generate(**inputs, **kwargs)
                out = out.sequences if hasattr(out, "sequences") else out
        save_file({{"out": out.contiguous()}}, out_file)
    """
    import json

    run_fresh(code, str(folder), str(in_file), str(out_file), method, json.dumps(kwargs))


def load_output(out_file) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(out_file))["out"]


def assert_same_tokens_or_near_tie(actual: torch.Tensor, expected: torch.Tensor, logits_fn, msg: str = "") -> None:
    """Token sequences must agree; a divergence is accepted only where the top-2 logits of `expected`'s prefix
    are within 1e-4 (a float tie that either implementation may break either way)."""
    if actual.shape == expected.shape and torch.equal(actual, expected):
        return
    width = min(actual.shape[-1], expected.shape[-1])
    diff = (actual[..., :width] != expected[..., :width]).nonzero()
    assert len(diff) > 0, f"{msg}: lengths differ without a diverging token: {actual} vs {expected}"
    row, col = (int(i) for i in diff[0]) if diff.dim() == 2 else (0, int(diff[0]))
    row_ids = expected[row] if expected.dim() == 2 else expected
    top2 = logits_fn(row_ids[:col].unsqueeze(0))[0, -1].topk(2).values
    gap = float(top2[0] - top2[1])
    assert gap < 1e-4, (
        f"{msg}: tokens diverge at ({row}, {col}) with a top-2 logit gap of {gap:.2e}:\n{actual}\n{expected}"
    )
