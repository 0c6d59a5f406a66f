#!/usr/bin/env bash
# The GPU report: what diffwgpu does on a real GPU, beside PyTorch on the same card.
#
#   tools/gpu_report.sh build [DIR]   where cargo is: builds the release binary, the GPU test
#                                     binaries and the op benches into DIR (default
#                                     target/gpu-report), stripped, and packs them as
#                                     DIR.tar.xz (about 16 MB) to copy to the GPU machine
#   tools/gpu_report.sh run [DIR] [OUT]
#                                     on the GPU machine, from the repository root: unpacks
#                                     DIR.tar.xz when DIR is not there, runs the binaries and
#                                     writes OUT (default gpu-report-out)/report.txt with
#                                     every figure, plus the raw JSON and logs
#
# `run` needs no Rust toolchain: only a Vulkan driver (or Metal, DX12) for the binaries and,
# for the PyTorch side, python3 with torch (CUDA) and diffusers; without them that part is
# skipped and says so. It is sized to finish in under 8 minutes on an H100-class card:
#   1. `diffwgpu info`: the adapter and its limits;
#   2. the GPU parity tests (every op, forward and backward, against the CPU reference; whole
#      training steps; the command stream's edge cases), CI=true so that a missing adapter
#      fails them instead of skipping;
#   3. `diffwgpu bench` for tiny/8, mnist/64 and cifar10/128: ms per training step, images/s,
#      TFLOP/s, dispatches and submits per step, host recording time, peak GPU memory, and a
#      50-step DDIM sampling run;
#   4. the per-op GFLOP/s benches (conv2d, linear, attention), short criterion runs;
#   5. tools/torch_baseline.py for the same presets on CUDA (fp32 eager, TF32 off);
#   6. a side-by-side table of training step times and their ratio.
set -uo pipefail
cd "$(dirname "$0")/.."

mode=${1:-}
dir=${2:-target/gpu-report}

# Test binaries that hold GPU tests and read no fixture files (paths of the build machine).
TESTS="parity_attention parity_conv2d parity_diffusion parity_elementwise parity_embedding
parity_grads parity_group_norm parity_layout parity_linear parity_optim parity_random
parity_reduce gpu_dispatch gpu_memory train sample"
BENCHES=${BENCHES-"conv2d linear"}
# preset, batch, timed training steps (a smoke run: PRESETS="tiny 2 1" BENCHES= ... run)
PRESETS=${PRESETS:-"tiny 8 20
mnist 64 10
cifar10 128 5"}

build() {
    set -e
    mkdir -p "$dir/tests" "$dir/benches"
    cargo build --release --bin diffwgpu
    cp target/release/diffwgpu "$dir/"
    local t b exe
    for t in $TESTS; do
        exe=$(cargo test --release --no-run --test "$t" --message-format=json 2>/dev/null |
            sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep "/deps/$t-")
        cp "$exe" "$dir/tests/$t"
    done
    for b in $BENCHES; do
        exe=$(cargo bench --no-run --bench "$b" --message-format=json 2>/dev/null |
            sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | grep "/deps/$b-")
        cp "$exe" "$dir/benches/$b"
    done
    find "$dir" -type f -exec strip {} +
    tar -cJf "$dir.tar.xz" -C "$(dirname "$dir")" "$(basename "$dir")"
    echo "built into $dir and $dir.tar.xz ($(du -h "$dir.tar.xz" | cut -f1)); on the GPU" \
        "machine: tools/gpu_report.sh run $dir"
}

# The value of "key": in a one-line JSON object, numbers rounded to 3 significant digits
# (null and a missing file as empty).
json_field() {
    sed -n "s/.*\"$2\":\"\{0,1\}\([^,\"}]*\).*/\1/p" "$1" 2>/dev/null |
        sed 's/^null$//' | awk '/^[0-9.eE+-]+$/ { printf "%.3g\n", $1; next } { print }'
}

run() {
    local out=${3:-gpu-report-out}
    if [ ! -d "$dir" ] && [ -f "$dir.tar.xz" ]; then
        tar -xJf "$dir.tar.xz" -C "$(dirname "$dir")"
    fi
    mkdir -p "$out"
    local report="$out/report.txt"
    : >"$report"
    say() { echo "$@" | tee -a "$report"; }
    local start=$SECONDS failed=0

    say "# diffwgpu GPU report, $(date -u '+%Y-%m-%d %H:%M UTC')"
    say "## diffwgpu info"
    "$dir/diffwgpu" info 2>&1 | tee -a "$report"
    command -v nvidia-smi >/dev/null &&
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$report"

    say "## GPU parity tests"
    local t
    for t in $TESTS; do
        if CI=true timeout 300 "$dir/tests/$t" --test-threads 4 >"$out/test-$t.log" 2>&1; then
            say "$t: $(grep -E '^test result' "$out/test-$t.log" | tail -n 1)"
        else
            failed=1
            say "$t: FAILED (see test-$t.log)"
            grep -E 'FAILED|panicked' "$out/test-$t.log" | head -n 5 | tee -a "$report"
        fi
    done

    say "## diffwgpu bench (GPU)"
    local preset batch steps
    while read -r preset batch steps; do
        timeout 180 "$dir/diffwgpu" bench --preset "$preset" --batch-size "$batch" --device gpu \
            --steps "$steps" --sample-steps 50 --json >"$out/bench-$preset.json" 2>"$out/bench-$preset.log" ||
            say "bench $preset/$batch failed: $(tail -n 1 "$out/bench-$preset.log")"
        cat "$out/bench-$preset.json" | tee -a "$report"
    done <<<"$PRESETS"

    say "## per-op benches (GPU, GFLOP/s as criterion's Gelem/s)"
    local b
    for b in $BENCHES; do
        timeout 120 "$dir/benches/$b" --bench gpu --warm-up-time 1 --measurement-time 2 \
            >"$out/op-$b.log" 2>&1 || say "op bench $b failed"
        grep -E '/gpu|time:|thrpt:' "$out/op-$b.log" | tee -a "$report"
    done

    say "## PyTorch (CUDA, fp32, TF32 off)"
    if python3 -c 'import torch, diffusers; assert torch.cuda.is_available()' 2>/dev/null; then
        while read -r preset batch steps; do
            PYTHONUNBUFFERED=1 timeout 180 python3 tools/torch_baseline.py "$preset" "$batch" \
                "$steps" cuda 50 >"$out/torch-$preset.txt" 2>"$out/torch-$preset.log" ||
                say "torch $preset failed: $(tail -n 1 "$out/torch-$preset.log")"
            cat "$out/torch-$preset.txt" | tee -a "$report"
        done <<<"$PRESETS"
    else
        say "skipped: python3 with torch (CUDA) and diffusers is not available"
    fi

    say "## side by side: training step (ms) and DDIM-50 sampling (images/s)"
    say "preset/batch  diffwgpu_ms  torch_ms  ratio  diffwgpu_TFLOP/s  dispatches  diffwgpu_img/s  torch_img/s"
    local ours theirs ratio tflops disp ours_s theirs_s
    while read -r preset batch steps; do
        ours=$(json_field "$out/bench-$preset.json" train_ms_per_step)
        tflops=$(json_field "$out/bench-$preset.json" train_tflops)
        disp=$(json_field "$out/bench-$preset.json" dispatches_per_step)
        ours_s=$(json_field "$out/bench-$preset.json" sample_images_per_s)
        theirs=$(sed -n 's/.*train_step_s=\([0-9.]*\).*/\1/p' "$out/torch-$preset.txt" 2>/dev/null)
        theirs_s=$(sed -n 's/.*sample_img_per_s=\([0-9.]*\).*/\1/p' "$out/torch-$preset.txt" 2>/dev/null)
        ratio=-
        if [ -n "$ours" ] && [ -n "$theirs" ]; then
            theirs=$(awk -v s="$theirs" 'BEGIN { printf "%.2f", s * 1000 }')
            ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2fx", a / b }')
        fi
        say "$preset/$batch  ${ours:--}  ${theirs:--}  $ratio  ${tflops:--}  ${disp:--}  ${ours_s:--}  ${theirs_s:--}"
    done <<<"$PRESETS"
    say "(ratio: diffwgpu's step time over PyTorch's; below 1 is faster)"
    say "report took $((SECONDS - start)) s"
    return $failed
}

case "$mode" in
build) build ;;
run) run "$@" ;;
*)
    sed -n '2,13p' "$0"
    exit 2
    ;;
esac
