#!/usr/bin/env bash
# Sample 50 images per class with any --strategy and pack the ADM .npz (torchrun DDP).
# One process unless nproc_per_node says otherwise (one per GPU; on a CPU machine keep 1):
#   nproc_per_node=8 bash scripts/autoregressive/sample_c2i.sh ...
#   bash scripts/autoregressive/sample_c2i.sh --strategy raster --gpt-model GPT-XL --gpt-ckpt pretrained_models/c2i_XL_384.pt \
#        --vq-ckpt pretrained_models/vq_ds16_c2i.pt --image-size 384 --image-size-eval 256 --cfg-scale 1.75
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes="${nnodes:-1}" --nproc_per_node="${nproc_per_node:-1}" --node_rank="${node_rank:-0}" \
  --master_addr="${master_addr:-127.0.0.1}" --master_port="${master_port:-12346}" \
  autoregressive/sample/sample_c2i_ddp.py "$@"
