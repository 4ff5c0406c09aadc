#!/bin/bash
# Tokenizer reconstruction (PSNR, SSIM, .npz for rFID) under torchrun; every argument goes to
# tokenizer/reconstruction_vq_ddp.py. Ranks come from the environment: nnodes, nproc_per_node,
# node_rank, master_addr, master_port.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nnodes="${nnodes:-1}" --nproc_per_node="${nproc_per_node:-1}" --node_rank="${node_rank:-0}" \
    --master_addr="${master_addr:-127.0.0.1}" --master_port="${master_port:-12344}" \
    tokenizer/reconstruction_vq_ddp.py "$@"
