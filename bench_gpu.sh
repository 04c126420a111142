#!/usr/bin/env bash
# The GPU checks of BENCHMARKS.md in one run (~12 min on an H100/H200; random weights, nothing downloaded):
#   1. batched bf16 decode of a 7B-shaped LLaMA at batch 1/8/32/64 (tokens/s; the batch-1 rate x 13.5 GB of
#      weights / the card's bandwidth is the fraction of memory bandwidth used)
#   1b. LLaVA-1.5-7B-shaped (random weights): time to first token with one 336 px image, batch 1 and 8 decode
#   1c. LLaVA-1.6-7B-shaped (ViT-L/14-336 + a 7B LLaMA, random weights, anyres): time to first token of a 672x672
#       image (5 tower passes, 2,928 image tokens) against transformers' LlavaNextForConditionalGeneration, which
#       loads the folder formats.export_hf writes (14 GB in bf16: this line gets 3x the time limit)
#   2. a stage-2 step of a 1.1B LLM + ViT-L/14-336 at 2048 tokens: gradient checkpointing off/on, compile off/on:
#      tokens/s, MFU, peak memory
#   3. the ViT-L/14-336 tower alone, bf16, batch 64 (images/s)
# Usage: bash bench_gpu.sh [timeout per command in seconds, default 150]
set -uo pipefail
cd "$(dirname "$0")"
limit=${1:-150}
run() {  # one bench.py command, its output without progress bars; a failure is reported and the script goes on
    echo "\$ python bench.py $*"
    timeout "$limit" python bench.py "$@" 2>&1 | grep -v "^Loading" || echo "  (failed or timed out)"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
run generate --preset vicuna-7b --dtype bfloat16 --batches 1,8,32,64 --new-tokens 64 --repeats 2 --no-reference --no-int8
run generate --preset vicuna-7b --llava --tower vit-l-14-336 --dtype bfloat16 --batches 1,8 --new-tokens 32 --repeats 2 --no-int8
limit=$((limit * 3)) run anyres --preset vicuna-7b --tower vit-l-14-336 --image 672x672 --dtype bfloat16 --repeats 5
train="train --preset tinyllama-336 --stage 2 --batch 8 --seq-len 2048 --steps 5"
run $train
run $train --grad-checkpointing
run $train --compile
run $train --grad-checkpointing --compile
run clip --preset vit-l-14-336 --batch 64 --dtype bfloat16
