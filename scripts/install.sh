#!/usr/bin/env bash
# Creates .venv and installs sparsecraft into it: torch first, pinned by constraints.txt
# (the CPU build that ships on these machines), then the package (editable).
# Usage: bash scripts/install.sh [--dev]     (always with the [hf] extra; --dev adds the test tools)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt torch==2.13.0
extra="[hf]"
[ "${1:-}" = "--dev" ] && extra="[hf,dev]"
.venv/bin/python -m pip install -q -c constraints.txt -e ".${extra}"
