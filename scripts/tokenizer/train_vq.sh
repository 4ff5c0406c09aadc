#!/bin/bash
# Tokenizer training under torchrun; every argument goes to tokenizer/train_vq.py.
# Nodes and ranks come from the environment: nnodes, nproc_per_node, node_rank, master_addr, master_port.
# VAR's multi-scale VQVAE at the release's size: --vq-model MSVQ-16 --codebook-size 4096 --codebook-embed-dim 32
#   --image-size 256 (patch_nums 1_2_3_4_5_6_8_10_13_16 from the image size, or --v-patch-nums).
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes="${nnodes:-1}" --nproc_per_node="${nproc_per_node:-1}" --node_rank="${node_rank:-0}" \
    --master_addr="${master_addr:-127.0.0.1}" --master_port="${master_port:-12345}" \
    tokenizer/train_vq.py "$@"
