#!/usr/bin/env bash
# The main job: set up the environment (transformers 5.x) on first use, then load the repository root
# through the Auto classes in a fresh process and fill blanks with the embedded default model.
#   usage: scripts/main.sh [--prompt "The capital of [MASK] is Paris."] [other scripts/demo.py flags]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$(bash "$root/scripts/setup_env.sh" 5 | tail -n 1)"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$venv/bin/python" "$root/scripts/demo.py" "$@"
