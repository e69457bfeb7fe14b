#!/usr/bin/env bash
# The whole test suite on transformers 4.57.6 and on the newest 5.x, each in its own virtual
# environment (.venv/tf4, .venv/tf5, created on first use by scripts/setup_env.sh), plus ruff.
#   usage: scripts/test.sh [extra pytest arguments]
# Prints each version's result and a combined "N passed, N failed" line; exits non-zero if lint or
# any test fails on either version.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers="${TEST_WORKERS:-2}"
status=0
summary=()
total_passed=0; total_failed=0; total_skipped=0
reports="$(mktemp -d)"
# Build both environments first: the cross-version tests (a checkpoint saved under one transformers
# version loaded under the other) need the other version's venv, whichever runs first.
declare -A venvs
for major in 5 4; do
  venvs[$major]="$(bash scripts/setup_env.sh "$major" | tail -n 1)" || venvs[$major]=""
done
for major in 5 4; do
  venv="${venvs[$major]}"
  if [ -z "$venv" ]; then
    summary+=("transformers ${major}.x: environment set-up FAILED"); status=1; continue
  fi
  version="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  if [ "$major" = 5 ]; then
    echo "== ruff (lint + format check)"
    if "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check --quiet .; then
      summary+=("ruff: clean")
    else
      summary+=("ruff: FAILED"); status=1
    fi
  fi
  echo "== pytest on transformers $version"
  start=$(date +%s)
  "$venv/bin/python" -m pytest -p no:cacheprovider -n "$workers" -q --junitxml="$reports/tf$major.xml" "$@"
  rc=$?
  secs=$(( $(date +%s) - start ))
  read -r p f s < <("$venv/bin/python" - "$reports/tf$major.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print(0, 1, 0); raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
t = sum(int(x.get("tests", 0)) for x in suites); f = sum(int(x.get("failures", 0)) + int(x.get("errors", 0)) for x in suites)
s = sum(int(x.get("skipped", 0)) for x in suites)
print(t - f - s, f, s)
PY
)
  total_passed=$((total_passed + p)); total_failed=$((total_failed + f)); total_skipped=$((total_skipped + s))
  if [ "$rc" -eq 0 ]; then
    summary+=("transformers $version: $p passed, $f failed, $s skipped in ${secs}s")
  else
    summary+=("transformers $version: FAILED (pytest exit $rc): $p passed, $f failed, $s skipped in ${secs}s"); status=1
  fi
done
rm -rf "$reports"
echo
echo "== summary"
printf '  %s\n' "${summary[@]}"
[ "$status" -eq 0 ] && echo "  all green on both transformers versions" || echo "  SOME CHECKS FAILED"
echo "${total_passed} passed, ${total_failed} failed, ${total_skipped} skipped"
exit "$status"
