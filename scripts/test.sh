#!/usr/bin/env bash
# The tests on every line of the supported transformers range (pyproject.toml: transformers>=4.57,<6), plus ruff.
#   usage: scripts/test.sh [--all-versions] [extra pytest arguments]
# - the whole suite on transformers 4.57.6 (.venv/tf4), on the pinned newest known-good 5.x (.venv/tf5,
#   requirements/tf5.txt) and on the newest 5.x on PyPI at the time it runs (asked through pip, not pinned);
# - the compatibility subset (`pytest -m compat`, tests/test_compat_matrix.py) on the first 5.x release, every
#   fifth minor line and the three newest minor lines (--all-versions: every 5.x minor line), newest patch of each.
# scripts/transformers_versions.py picks the versions; scripts/setup_env.sh builds and caches one environment per
# version (the extra ones layered over .venv/tf5, sharing its torch). Prints one line per version and, last, a
# combined "N passed, N failed, N skipped" line; exits non-zero if lint or any test fails on any version, or if
# the package index cannot be asked which versions exist.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers="${TEST_WORKERS:-2}"
all_versions=()
pytest_args=()
for arg in "$@"; do
  if [ "$arg" = "--all-versions" ]; then all_versions=(--all-versions); else pytest_args+=("$arg"); fi
done
status=0
summary=()
broken=()
total_passed=0; total_failed=0; total_skipped=0
reports="$(mktemp -d)"
started=$(date +%s)
pin_of() { sed -n 's/^transformers==//p' "requirements/tf$1.txt"; }
pin4="$(pin_of 4)"; pin5="$(pin_of 5)"

# The pinned environments first: the cross-version tests (a checkpoint saved under one transformers version
# loaded under the other) need .venv/tf4 and .venv/tf5 whichever version runs.
declare -A venvs
for major in 5 4; do
  venvs[$(pin_of "$major")]="$(bash scripts/setup_env.sh "$major" | tail -n 1)" || venvs[$(pin_of "$major")]=""
done
if [ -z "${venvs[$pin5]}" ]; then
  echo "scripts/test.sh: .venv/tf5 could not be set up (see the message above); nothing tested" >&2
  echo "0 passed, 1 failed, 0 skipped"
  exit 1
fi

echo "== which transformers versions (asking the package index through pip)"
plan="$("${venvs[$pin5]}/bin/python" scripts/transformers_versions.py --pins "$pin4" "$pin5" "${all_versions[@]}")"
if [ $? -ne 0 ] || [ -z "$plan" ]; then
  summary+=("transformers versions: FAILED to ask the package index which releases exist (message above);"
    "only the pinned $pin4 and $pin5 were tested, so a new release that breaks us would go unseen")
  status=1
  plan="$(printf 'full %s\nfull %s\n' "$pin4" "$pin5")"
fi
newest="$(awk '$1 == "full" { v = $2 } END { print v }' <<<"$plan")"
grep '^note ' <<<"$plan" | sed 's/^note /NOTE: /'

echo "== ruff (lint + format check)"
if "${venvs[$pin5]}/bin/ruff" check . && "${venvs[$pin5]}/bin/ruff" format --check --quiet .; then
  summary+=("ruff: clean")
else
  summary+=("ruff: FAILED"); status=1
fi

# run_pytest KIND VERSION LABEL [pytest arguments]: one pytest run and its summary line.
run_pytest() {
  local kind="$1" version="$2" label="$3"; shift 3
  local venv="${venvs[$version]:-}"
  if [ -z "$venv" ]; then
    venv="$(bash scripts/setup_env.sh "$version" | tail -n 1)" || venv=""
    venvs[$version]="$venv"
  fi
  if [ -z "$venv" ]; then
    summary+=("transformers $version ($label): environment set-up FAILED")
    broken+=("$version"); status=1; total_failed=$((total_failed + 1)); return
  fi
  local got
  got="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  echo "== pytest ($label) on transformers $got"
  local start rc secs p f s
  start=$(date +%s)
  "$venv/bin/python" -m pytest -p no:cacheprovider -n "$workers" --dist loadgroup -q \
    --junitxml="$reports/$kind-$version.xml" "$@"
  rc=$?
  secs=$(($(date +%s) - start))
  read -r p f s < <("$venv/bin/python" - "$reports/$kind-$version.xml" <<'PY'
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
  if [ "$rc" -eq 5 ] && [ "$kind" = compat ]; then  # the extra pytest arguments selected no compat test
    summary+=("transformers $got ($label): no test selected"); return
  fi
  total_passed=$((total_passed + p)); total_failed=$((total_failed + f)); total_skipped=$((total_skipped + s))
  if [ "$rc" -eq 0 ] && [ "$got" = "$version" ]; then
    summary+=("transformers $got ($label): $p passed, $f failed, $s skipped in ${secs}s")
  else
    [ "$got" = "$version" ] || got="$got, expected $version"
    summary+=("transformers $got ($label): FAILED (pytest exit $rc): $p passed, $f failed, $s skipped in ${secs}s")
    broken+=("$version"); status=1
  fi
}

while read -r kind version; do
  case "$kind" in
    full)
      label="whole suite"
      if [ "$version" = "$pin4" ] || [ "$version" = "$pin5" ]; then label="$label, pinned"; fi
      if [ "$version" = "$newest" ]; then label="$label, newest on PyPI"; fi
      run_pytest full "$version" "$label" "${pytest_args[@]}"
      ;;
    compat) run_pytest compat "$version" "compat subset" "${pytest_args[@]}" -m compat tests/test_compat_matrix.py ;;
  esac
done <<<"$plan"
rm -rf "$reports"

echo
echo "== summary ($(($(date +%s) - started))s)"
printf '  %s\n' "${summary[@]}"
if [ "$status" -eq 0 ]; then
  echo "  all green on every transformers version tested"
elif [ "${#broken[@]}" -gt 0 ]; then
  echo "  SOME CHECKS FAILED; transformers versions that fail: ${broken[*]}"
else
  echo "  SOME CHECKS FAILED"
fi
echo "${total_passed} passed, ${total_failed} failed, ${total_skipped} skipped"
exit "$status"
