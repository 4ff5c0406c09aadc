#!/usr/bin/env bash
# Train a class-conditional GPT with any --strategy on extracted codes (torchrun DDP).
#   bash scripts/autoregressive/train_c2i.sh --strategy raster --code-path codes/imagenet_code_c2i_flip_ten_crop \
#        --image-size 384 --gpt-model GPT-B
# Multi-node: nnodes=2 node_rank=0 master_addr=host0 nproc_per_node=8 bash scripts/autoregressive/train_c2i.sh ...
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes="${nnodes:-1}" --nproc_per_node="${nproc_per_node:-1}" --node_rank="${node_rank:-0}" \
  --master_addr="${master_addr:-127.0.0.1}" --master_port="${master_port:-12345}" \
  autoregressive/train/train_c2i.py "$@"
