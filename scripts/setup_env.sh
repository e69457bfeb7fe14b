#!/usr/bin/env bash
# Create (or reuse) a project-local virtual environment for one transformers version.
#   usage: scripts/setup_env.sh 5|4       -> .venv/tf5 or .venv/tf4, a full environment pinned by requirements/tfN.txt
#          scripts/setup_env.sh X.Y.Z     -> .venv/tf-X.Y.Z, transformers X.Y.Z layered over .venv/tf5
# Prints the environment's path on its last line.
#
# Full environments are rebuilt only when the dependency list in pyproject.toml, the pin file or this
# script changes. Torch: the CPU build is installed first (pip resolves `torch==2.13.0` to the local
# CPU wheel on this kind of machine; elsewhere it comes from PyTorch's CPU index if TORCH_INDEX_URL is
# set). GPU users: set TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0") and TORCH_INDEX_URL to the CUDA index.
#
# A layered environment (the version matrix of scripts/test.sh) holds only transformers X.Y.Z and the
# huggingface_hub / tokenizers versions it needs where .venv/tf5's do not fit; everything else (torch,
# accelerate, pytest, ...) it sees in .venv/tf5 through a .pth file, so torch is installed once. Its own
# site-packages come first on sys.path, so its transformers shadows .venv/tf5's. pip never uninstalls
# outside the environment it runs in; the script still checks that .venv/tf5 is unchanged afterwards.
set -euo pipefail
target="${1:?usage: setup_env.sh 5|4|X.Y.Z}"
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
pip_flags=(install --quiet --disable-pip-version-check)

# The dependencies (+ test extras) of pyproject.toml, torch excluded (it is installed first, see above).
project_deps() {
  "$1" - "$root/pyproject.toml" <<'PY'
import re, sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
# the torch requirement only (torchao and other torch* packages are ordinary dependencies)
print("\n".join(d for d in p["dependencies"] + p["optional-dependencies"]["test"] if re.match(r"[\w.-]+", d)[0] != "torch"))
PY
}

site_packages() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }

if [[ "$target" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]]; then
  base="$(bash "$0" 5 | tail -n 1)"
  venv="$root/.venv/tf-$target"
  stamp="$venv/.installed"
  want="$( { cat "$base/.installed"; echo "$target"; cat "$0"; } | sha256sum | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then echo "$venv"; exit 0; fi
  echo "setting up $venv (transformers $target over $base) ..." >&2
  rm -rf "$venv"
  "$base/bin/python" -m venv "$venv"
  base_site="$(site_packages "$base/bin/python")"
  echo "$base_site" > "$(site_packages "$venv/bin/python")/_project_base_env.pth"
  log="$root/.venv/setup-tf-$target.log"
  : > "$log"
  before="$(cd "$base_site" && find . -maxdepth 1 | sort | sha256sum)"
  trap 'echo "setup_env.sh: installing transformers $target into $venv failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR
  "$venv/bin/python" -m pip "${pip_flags[@]}" "transformers==$target" >>"$log" 2>&1
  trap - ERR
  after="$(cd "$base_site" && find . -maxdepth 1 | sort | sha256sum)"
  if [ "$before" != "$after" ]; then
    echo "setup_env.sh: installing transformers $target changed the base environment $base; rebuild it with" \
      "'rm -rf $base' and report this" >&2
    exit 1
  fi
  got="$("$venv/bin/python" -c 'import transformers; print(transformers.__version__)')"
  if [ "$got" != "$target" ]; then
    echo "setup_env.sh: $venv imports transformers $got, expected $target" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
  echo "$venv"
  exit 0
fi

pin="$root/requirements/tf${target}.txt"
[ -f "$pin" ] || { echo "setup_env.sh: no pin file $pin (expected 4, 5 or a version such as 5.10.4)" >&2; exit 2; }
venv="$root/.venv/tf${target}"
stamp="$venv/.installed"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
want="$( { project_deps "$py"; cat "$pin" "$0"; echo "$torch_spec ${TORCH_INDEX_URL:-}"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then echo "$venv"; exit 0; fi
echo "setting up $venv (transformers from $pin) ..." >&2
rm -rf "$venv"
"$py" -m venv "$venv"
log="$root/.venv/setup-tf${target}.log"
: > "$log"
pip=("$venv/bin/python" -m pip "${pip_flags[@]}")
trap 'echo "setup_env.sh: installing into $venv failed; last lines of $log:" >&2; tail -n 30 "$log" >&2' ERR
if [ -n "${TORCH_INDEX_URL:-}" ]; then
  "${pip[@]}" "$torch_spec" --index-url "$TORCH_INDEX_URL" >>"$log" 2>&1
else
  "${pip[@]}" "$torch_spec" >>"$log" 2>&1
fi
# Everything else from pyproject.toml (dependencies + test extras), with transformers pinned.
mapfile -t deps_arr < <(project_deps "$venv/bin/python")
"${pip[@]}" "${deps_arr[@]}" -r "$pin" >>"$log" 2>&1
echo "$want" > "$stamp"
echo "$venv"
