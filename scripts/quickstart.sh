#!/usr/bin/env bash
# Sets everything up, then runs the main job: generate text with the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/fastinfer generate "Write a haiku about GPUs" --max-tokens 64
