#!/usr/bin/env bash
# The test suite at pyproject's dependency floors, in a separate virtual environment (CI runs it after
# the README's test command): the floors are only true while something checks them.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${RPO_FLOORS_VENV:-${TMPDIR:-/tmp}/rpo-diffusers-floors-venv}"
python -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
python scripts/floor_constraints.py > "$constraints"
"$venv/bin/python" -m pip install --quiet -c "$constraints" -e ".[test]"
"$venv/bin/python" -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|transformers|peft|accelerate|safetensors|huggingface.hub|pillow|numpy|matplotlib) ' || true
"$venv/bin/python" -m pytest -n 2 --dist loadfile -p no:cacheprovider "$@"
