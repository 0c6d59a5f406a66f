#!/usr/bin/env bash
# diffwgpu's CPU backend against PyTorch on the same cores, side by side in one run: for each
# preset, `diffwgpu bench` (training step, DDIM sampling) and right after it
# tools/torch_baseline.py with the same preset, batch and step counts.
#
# Set-up: cargo build --release
#         python3 -m venv .venv && .venv/bin/pip install torch diffusers safetensors
# Usage:  tools/cpu_report.sh [diffwgpu binary]     (default target/release/diffwgpu)
# Env:    RUNS="tiny:8:20:20 mnist:64:3:10 mnist:16:1:50"   preset:batch:train steps:DDIM steps
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/diffwgpu}
py=${PYTHON:-.venv/bin/python}
threads=$(nproc)
for run in ${RUNS:-tiny:8:20:20 mnist:64:3:10 mnist:16:1:50}; do
    IFS=: read -r preset batch steps sample_steps <<<"$run"
    echo "== $preset batch $batch: $steps training steps, DDIM $sample_steps steps"
    "$bin" bench --preset "$preset" --batch-size "$batch" --device cpu \
        --steps "$steps" --sample-steps "$sample_steps" | grep -E '^(training|sampling)'
    OMP_NUM_THREADS=$threads "$py" tools/torch_baseline.py "$preset" "$batch" "$steps" cpu "$sample_steps"
done
