#!/usr/bin/env bash
# Reproduce a published row from its released checkpoint: download, sample 50 per class (a tokenizer:
# reconstruct the validation set), evaluate, and print the published and the measured numbers side by
# side (rows: pretrained_models/presets.json).
#   bash scripts/reproduce.sh llamagen GPT-L-384
#   bash scripts/reproduce.sh llamagen GPT-B-256 --nproc-per-node 1 --dry-run
#   bash scripts/reproduce.sh vq VQ-16 --data-path /data/imagenet/val
#   bash scripts/reproduce.sh --list
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m autoregressive.reproduce "$@"
