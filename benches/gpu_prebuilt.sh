#!/usr/bin/env bash
# The GPU check for a machine that cannot build: the `device` tool's H200 has no network, so no
# cargo registry. Build the release wgpu binaries here, carry them there compressed, run there.
#
#   bash benches/gpu_prebuilt.sh build   # here: test and bench binaries, gzipped into .gpu/
#   bash benches/gpu_prebuilt.sh run     # there, with .gpu/ and .gl/ (the Vulkan loader) carried
#
# `run` writes device.txt, one tests_<name>.txt per test binary, bench_paired.txt,
# bench_transformer.txt and ratios.md under $OUT (default target/gpu). The device's working tree
# plus what it carries must stay under 64 MiB: the four archives built here (about 15 MB each)
# fit. The tests run every device the build has: flex, ndarray and wgpu (the GPU). The benches
# run on wgpu (`BURN_DEVICE=wgpu`): `paired` times the fused LoRA linear against plain `Linear`
# and the composed path in interleaved rounds, `transformer` the stack.
set -euo pipefail
cd "$(dirname "$0")/.."

# Four binaries (with the two benches) fit the 64 MiB the device takes: the fused kernel's tests
# and QLoRA's, whose base layers take the same operation.
TESTS=(fused qlora)

build() {
    export CARGO_TARGET_DIR="${GPU_TARGET_DIR:-target-gpu}"
    export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_BENCH_DEBUG=false
    local args=()
    for test in "${TESTS[@]}"; do args+=(--test "$test"); done
    local executables
    executables=$( {
        cargo test --release --features wgpu --no-run "${args[@]}" --message-format=json
        cargo bench --features wgpu --bench transformer --bench paired --no-run --message-format=json
    } | python3 -c '
import json, sys
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message.get("executable"):
        print(message["target"]["name"], message["executable"])
')
    rm -rf .gpu && mkdir -p .gpu
    while read -r name path; do
        strip -o ".gpu/$name" "$path"
        gzip -9 ".gpu/$name"
    done <<< "$executables"
    ls -l .gpu
}

run() {
    local out="${OUT:-target/gpu}" bin=/tmp/burn_lora_gpu
    mkdir -p "$out" "$bin"
    if compgen -G ".gl/*.deb" > /dev/null; then
        for deb in .gl/*.deb; do dpkg -x "$deb" /; done
        ldconfig
    fi
    for archive in .gpu/*.gz; do
        gzip -dc "$archive" > "$bin/$(basename "$archive" .gz)"
        chmod +x "$bin/$(basename "$archive" .gz)"
    done
    {
        echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
        nproc
    } > "$out/device.txt" 2>&1
    local failed=0 test
    # The test binaries that came along (the carry limit may leave some behind).
    for archive in .gpu/*.gz; do
        test=$(basename "$archive" .gz)
        [ "$test" = transformer ] || [ "$test" = paired ] && continue
        "$bin/$test" 2>&1 | tee "$out/tests_$test.txt" | grep -E "test result|FAILED|panicked" || true
        grep -q "test result: ok" "$out/tests_$test.txt" || failed=1
    done
    BURN_DEVICE=wgpu PAIRED_ROUNDS="${PAIRED_ROUNDS:-15}" CARGO_TARGET_DIR="$bin/target" \
        "$bin/paired" --bench 2>&1 | tee "$out/bench_paired.txt" | grep -E "^\|" || true
    BURN_DEVICE=wgpu CARGO_TARGET_DIR="$bin/target" "$bin/transformer" --bench \
        --warm-up-time 1 --measurement-time 3 --sample-size 10 2>&1 |
        tee "$out/bench_transformer.txt" | grep -E "^[a-z_0-9]+/|time:" || true
    CARGO_TARGET_DIR="$bin/target" python3 benches/ratios.py > "$out/ratios.md" || true
    return "$failed"
}

case "${1:-}" in
    build) build ;;
    run) run ;;
    *) echo "usage: $0 build|run" >&2; exit 2 ;;
esac
