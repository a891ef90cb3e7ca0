#!/usr/bin/env bash
# The figures of the engine-core and benchmark issues, on the default model, this CPU:
# for float32 and bfloat16,
#  - single-request decode: latency of one request, 128-token prompt, 128 new tokens
#    (decode tokens/s = 1000 / TPOT ms), fastinfer beside transformers and torch-naive;
#  - throughput: 32 mixed requests (16-512 prompt tokens, 16-256 new tokens, seed 0),
#    fastinfer beside transformers (one at a time), transformers-batched and torch-naive.
# All systems run in the same process, on the same workload. Results go to $OUT (JSON,
# Markdown, PNG).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
THREADS="${THREADS:-2}"
mkdir -p "$OUT"
export OMP_NUM_THREADS="$THREADS"
for dtype in float32 bfloat16; do
  .venv/bin/fastinfer bench latency --dtype "$dtype" --batch-size 1 --input-len 128 --output-len 128 \
      --num-iters 3 --baseline transformers torch-naive \
      --json "$OUT/latency-$dtype.json" --markdown "$OUT/latency-$dtype.md"
  .venv/bin/fastinfer bench throughput --dtype "$dtype" --num-prompts 32 --input-len 16:512 \
      --output-len 16:256 --seed 0 --baseline transformers transformers-batched torch-naive \
      --json "$OUT/throughput-$dtype.json" --markdown "$OUT/throughput-$dtype.md" \
      --plot "$OUT/throughput-$dtype.png"
done
