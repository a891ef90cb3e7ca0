#!/usr/bin/env bash
# Sets everything up (idempotent), checks the layer contracts of DESIGN.md (import-linter, from
# pyproject.toml), then runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/lint-imports --no-cache
exec .venv/bin/python -m pytest -q "$@"
