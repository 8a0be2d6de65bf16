#!/usr/bin/env bash
# The GPU check of the performance issue, as one prepared script for a machine with a GPU
# (the `device` tool's H200, or any Vulkan/Metal GPU):
#
#   bash benches/gpu.sh            # results under ${OUT:-target/gpu}
#
# 1. correctness on the GPU: the numerical tests that compare the fast, merged and mixed paths
#    with their references;
# 2. the wgpu benches: layer forward and train step (plain, merged, unmerged, Burn's apply_lora,
#    full fine-tuning), mixed batches with 1/4/8 adapters, and the transformer stack;
# 3. the ratios against their targets, as markdown, with the device and the date.
#
# Measurement times are shortened from the CPU settings (a GPU call is milliseconds), so the
# whole script fits in about ten minutes including the release build on 16 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-target/gpu}"
mkdir -p "$OUT"
export BURN_DEVICE=wgpu
export CARGO_TERM_COLOR=never
criterion_args=(--warm-up-time 1 --measurement-time 3 --sample-size 10)

{
    echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    command -v vulkaninfo >/dev/null && vulkaninfo --summary 2>/dev/null | grep -E "deviceName|driverName" || true
    nproc
} > "$OUT/device.txt" 2>&1

cargo test --release --features wgpu --test math --test mixed_batch --test nn_blocks 2>&1 | tee "$OUT/tests.txt" | grep -E "test result|FAILED|panicked"

for bench in linear adapters transformer; do
    cargo bench --features wgpu --bench "$bench" -- "${criterion_args[@]}" 2>&1 | tee "$OUT/bench_$bench.txt" | grep -E "^[a-z_0-9]+/|time:"
done

CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}" python3 benches/ratios.py | tee "$OUT/ratios.md"
