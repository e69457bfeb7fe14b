#!/usr/bin/env bash
# Issue 22 on a GPU machine, in one command (at most about 5 minutes on an H200: tests <= 150 s, benchmark <= 140 s):
#   1. the python/torch/transformers versions;
#   2. the GPU tests of sparse_attention.py (pytest -m gpu: FlexAttention against the dense reference in fp32 and
#      the kernel in bf16, no recompiles, the whole model flex vs kernel), output in $OUT/gpu_tests.txt;
#   3. scripts/benchmarks/gpt2_sparse.py --device cuda: modes 1 and 2 against dense sdpa at s = 4k..64k, attention
#      alone and the whole model, time and peak memory, into $OUT/gpt2_sparse_cuda.json (rewritten after every size).
# Works with whatever is installed: without pytest the tests are skipped (the benchmark still compares flex with
# the kernel, "check" in the json); without transformers the model parts are skipped. Nothing is downloaded.
#   OUT=/some/folder bash scripts/benchmarks/gpu_sparse.sh        (default OUT: benchmarks/results)
set -u
cd "$(dirname "$0")/../.."
OUT="${OUT:-benchmarks/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
began=$(date +%s)
{
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")'
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)' 2>/dev/null ||
    echo "transformers: not installed (the model test and the whole-model benchmark are skipped)"
  "$PY" -c 'import pytest; print("pytest", pytest.__version__)' 2>/dev/null || echo "pytest: not installed (tests skipped)"
} 2>&1 | tee "$OUT/gpu_env.txt"

if "$PY" -c 'import pytest' 2>/dev/null; then
  echo "== pytest -m gpu tests/test_sparse_attention.py (limit ${TEST_LIMIT_S:-150} s)"
  timeout "${TEST_LIMIT_S:-150}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs --durations=20 tests/test_sparse_attention.py \
    >"$OUT/gpu_tests.txt" 2>&1
  echo "pytest exit $? after $(($(date +%s) - began)) s"
  tail -25 "$OUT/gpu_tests.txt"
fi

echo "== benchmark (budget ${BENCH_BUDGET_S:-110} s)"
timeout $((${BENCH_BUDGET_S:-110} + 30)) "$PY" scripts/benchmarks/gpt2_sparse.py --device cuda \
  --budget-s "${BENCH_BUDGET_S:-110}" --out "$OUT" 2>&1 | tail -30
echo "benchmark exit ${PIPESTATUS[0]}; total $(($(date +%s) - began)) s; files in $OUT:"
ls -la "$OUT"
"$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(json.dumps({k: r.get(k) for k in ("check", "targets", "slopes", "skipped", "notes", "compiled_graphs", "elapsed_s")}, indent=1))' \
  "$OUT/gpt2_sparse_cuda.json" 2>/dev/null || true
