#!/usr/bin/env bash
# The README's second quickstart command: install (CPU torch first, so pip never pulls CUDA wheels)
# and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -m pytest -n 2 --dist loadfile "$@"
