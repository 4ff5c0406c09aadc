#!/usr/bin/env bash
# Extract VQ codes of a class-folder data set (torchrun DDP): packed shards by default, the official
# per-image files with --layout official.
#   bash scripts/autoregressive/extract_codes_c2i.sh --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
#        --data-path imagenet/train --code-path codes/imagenet_code_c2i_flip_ten_crop --ten-crop --crop-range 1.1 \
#        --image-size 384
# Eight GPUs: nproc_per_node=8 bash scripts/autoregressive/extract_codes_c2i.sh ...
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes="${nnodes:-1}" --nproc_per_node="${nproc_per_node:-1}" --node_rank="${node_rank:-0}" \
  --master_addr="${master_addr:-127.0.0.1}" --master_port="${master_port:-12345}" \
  autoregressive/train/extract_codes_c2i.py "$@"
