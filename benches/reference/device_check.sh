#!/usr/bin/env bash
# One call on the GPU machine (CUDA 13 driver, torch + transformers installed, no Rust), with
# medr1-cuda.gz carried (benches/reference/build_cuda.sh). Writes everything under $OUT:
#   1. medr1 verify on CUDA in f32 (parity with transformers' fixtures);
#   2. medr1 bench, 2B config, bf16, the issue's shapes (batch 8, 358-token prompt with 256
#      image tokens, 256 new tokens): rollout tokens/s, update time, peak device memory;
#   3. transformers on the same shapes in the same call (pure bf16, then bf16 autocast).
# Each part has its own time limit so that one slow part still leaves the others' results.
set -uo pipefail
export LD_LIBRARY_PATH=/usr/lib:/usr/local/cuda-13.0/targets/x86_64-linux/lib
OUT=${OUT:-/tmp/medr1-device}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
gunzip -c medr1-cuda.gz > /tmp/medr1 && chmod +x /tmp/medr1
CONFIG=benches/reference/qwen2_vl_2b_instruct_config.json
SHAPES=(--batch 8 --prompt-len 100 --image-size 448 --new-tokens 256)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 120 /tmp/medr1 verify tests/fixtures/qwen2vl-tiny-seed0 --device cuda \
    > "$OUT/verify.txt" 2>&1; echo "verify exit $?" | tee -a "$OUT/verify.txt"
timeout 240 /tmp/medr1 bench --model-config "$CONFIG" --device cuda --bf16 "${SHAPES[@]}" \
    --steps 2 > "$OUT/medr1-bench.txt" 2>&1; echo "bench exit $?" | tee -a "$OUT/medr1-bench.txt"
for p in bf16 amp; do
    timeout 150 python3 benches/reference/transformers_bench.py --model-config "$CONFIG" \
        "${SHAPES[@]}" --steps 2 --precision "$p" --json "$OUT/transformers-$p.json" \
        > "$OUT/transformers-$p.txt" 2>&1
    echo "transformers $p exit $?" | tee -a "$OUT/transformers-$p.txt"
done
tail -n 5 "$OUT"/*.txt
