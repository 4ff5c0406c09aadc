#!/usr/bin/env bash
# Zero-shot inpainting / outpainting / class-conditional editing of one image (one process).
#   bash scripts/autoregressive/edit_c2i.sh --strategy arpg --gpt-model ARPG-L --gpt-ckpt pretrained_models/arpg_300m.pt \
#        --vq-ckpt pretrained_models/vq_ds16_c2i.pt --image-size 256 --image dog.jpg --box 64,64,192,192 \
#        --class-id 207 --cfg-scale 4.0 --out edit.png
#   (or --mask mask.png with white = regenerate, or --outpaint-border 3)
set -euo pipefail
cd "$(dirname "$0")/../.."
python autoregressive/sample/edit.py "$@"
