#!/usr/bin/env bash
# The embedded demo: tokenizer, codes, one small GPT per strategy, samples, table and plot on the
# digits, on 2 CPU cores in a few minutes. Everything lands in --out (default demo_output/); a rerun
# reuses the finished stages. See autoregressive/demo.py.
#   bash scripts/demo.sh                 # full demo
#   bash scripts/demo.sh --quick --out /tmp/demo_quick
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
exec python -m autoregressive.demo "$@"
