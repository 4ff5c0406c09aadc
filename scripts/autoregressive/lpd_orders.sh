#!/usr/bin/env bash
# Write LPD locality-aware generation orders for sampling (seeded, reproducible), e.g. the
# official evaluation settings:
#   bash scripts/autoregressive/lpd_orders.sh --grid 16 --steps 20 --num-orders 50000 --out orders/res256_steps20.json
#   bash scripts/autoregressive/lpd_orders.sh --grid 32 --steps 48 --num-orders 50000 --out orders/res512_steps48.json
# Then sample with: --strategy lpd --order orders/res256_steps20.json --steps 20
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m autoregressive.sample.lpd_orders "$@"
