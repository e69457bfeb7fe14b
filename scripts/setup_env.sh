#!/usr/bin/env bash
# Create (or reuse) the project-local virtual environment for one transformers major version.
#   usage: scripts/setup_env.sh 5|4      -> prints the environment's path on its last line
# The environment lives in .venv/tf5 or .venv/tf4 and is rebuilt only when pyproject.toml or the
# pin file changes. Torch: the CPU build is installed first (pip resolves `torch==2.13.0` to the local
# CPU wheel on this kind of machine; elsewhere it comes from PyTorch's CPU index if TORCH_INDEX_URL is
# set). GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and TORCH_INDEX_URL to the CUDA index.
set -euo pipefail
major="${1:?usage: setup_env.sh 5|4}"
root="$(cd "$(dirname "$0")/.." && pwd)"
pin="$root/requirements/tf${major}.txt"
[ -f "$pin" ] || { echo "setup_env.sh: no pin file $pin (expected major version 4 or 5)" >&2; exit 2; }
venv="$root/.venv/tf${major}"
stamp="$venv/.installed"
want="$(cat "$root/pyproject.toml" "$pin" "$0" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then echo "$venv"; exit 0; fi
py="${PYTHON:-python3}"
echo "setting up $venv (transformers from $pin) ..." >&2
rm -rf "$venv"
"$py" -m venv "$venv"
log="$root/.venv/setup-tf${major}.log"
: > "$log"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
trap 'echo "setup_env.sh: installing into $venv failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" "$torch_spec" --index-url "$TORCH_INDEX_URL" >>"$log" 2>&1
else
  "${pip[@]}" "$torch_spec" >>"$log" 2>&1
fi
# Everything else from pyproject.toml (dependencies + test extras), with transformers pinned.
deps="$("$venv/bin/python" - "$root/pyproject.toml" <<'PY'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["test"] if not d.startswith("torch")))
PY
)"
mapfile -t deps_arr <<<"$deps"
"${pip[@]}" "${deps_arr[@]}" -r "$pin" >>"$log" 2>&1
echo "$want" > "$stamp"
echo "$venv"
