#!/usr/bin/env bash
# The GPU checks, for the device machine (CUDA 13 driver, torch + transformers installed, no
# Rust), with medr1-cuda.gz carried (benches/reference/build_cuda.sh). One part per call, each
# well under the 10-minute limit of a call (first runs of each shape compile kernels):
#   parity     medr1 verify on CUDA in f32 and in bf16 (about 2 min)
#   bench      medr1 bench, 2B config, bf16, the issue's shapes: 2 prompts x 4 generations
#              (8 rows), 358-token prompt (256 image tokens), 256 new tokens: GRPO steps
#              group-shared and unshared, rollout tokens/s, peak memory, --json
#   reference  transformers on the same shapes, the TRL way (pure bf16, then bf16 autocast
#              with f32 weights)
#   grpo       two GRPO steps of Med-R1's 2B recipe (random weights, synthetic 616x616 images:
#              484 image tokens, near max_pixels' 512), peak device memory sampled by nvidia-smi
#   devices    data-parallel GRPO (--devices) on the tiny demo: two workers on GPU 0, and on
#              GPUs 0 and 1 when the machine has two (a few seconds each after compilation)
# Usage: benches/reference/device_check.sh PART [PART...]; results under $OUT (or /tmp).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib
OUT=${OUT:-/tmp/medr1-device}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
if [ ! -x /tmp/medr1 ]; then
    gunzip -c medr1-cuda.gz > /tmp/medr1 && chmod +x /tmp/medr1
fi
CONFIG=tests/fixtures/qwen2_vl_2b_instruct_config.json
SHAPES=(--batch 2 --num-generations 4 --prompt-len 100 --image-size 448 --new-tokens 256)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"

run() { # name timeout command...
    local name=$1 limit=$2
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    echo "$name exit $?" | tee -a "$OUT/$name.txt"
    tail -n 4 "$OUT/$name.txt"
}

for part in "$@"; do
    case $part in
    parity)
        run verify-f32 200 /tmp/medr1 verify tests/fixtures/qwen2vl-tiny-seed0 --device cuda
        run verify-bf16 200 /tmp/medr1 verify tests/fixtures/qwen2vl-tiny-seed0 --device cuda --bf16
        ;;
    bench)
        run medr1-bench 420 /tmp/medr1 bench --model-config "$CONFIG" --device cuda --bf16 \
            "${SHAPES[@]}" --steps 1 --json
        ;;
    reference)
        for p in bf16 amp; do
            run "transformers-$p" 200 python3 benches/reference/transformers_bench.py \
                --model-config "$CONFIG" "${SHAPES[@]}" --steps 2 --precision "$p" \
                --json "$OUT/transformers-$p.json"
        done
        ;;
    grpo)
        (while true; do
            nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0
            sleep 0.2
        done) > "$OUT/grpo-memory-mib.txt" 2>&1 &
        poller=$!
        run grpo-2b 540 /tmp/medr1 train --config configs/med-r1-2b.toml \
            --set 'model.checkpoint=""' --set "model.random_config=\"$CONFIG\"" \
            --set 'model.tokenizer="tests/fixtures/qwen-chat/tokenizer.json"' \
            --set 'data.source="synthetic"' --set data.synthetic.image_size=616 \
            --set data.synthetic.n=40 --set grpo.steps=2 --set eval.before=false \
            --set eval.after=false --set checkpoint.every=1000 --set checkpoint.keep=1 \
            --set "runs_dir=\"$OUT/runs\""
        kill "$poller"
        echo "peak device memory during the GRPO run: $(sort -n "$OUT/grpo-memory-mib.txt" | tail -1) MiB" \
            | tee -a "$OUT/grpo-2b.txt"
        rm -rf "$OUT/runs"/*/grpo/checkpoint "$OUT/runs"/*/final
        ;;
    devices)
        TINY=(--set grpo.steps=3 --set grpo.prompts_per_step=2 --set sft.steps=5
            --set eval.before=false --set eval.after=false)
        run devices-one-gpu 280 /tmp/medr1 train --devices cuda:0,cuda:0 "${TINY[@]}" \
            --set "runs_dir=\"$OUT/runs-one\""
        if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
            run devices-two-gpus 280 /tmp/medr1 train --devices cuda:0,cuda:1 "${TINY[@]}" \
                --set "runs_dir=\"$OUT/runs-two\""
        fi
        ;;
    *)
        echo "unknown part $part (parity, bench, reference, grpo, devices)" >&2
        exit 2
        ;;
    esac
done
