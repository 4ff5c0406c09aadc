#!/usr/bin/env bash
# One command to check a GPU (about 8 minutes on one H100/H200):
#   1. every GPU-only test: real CUDA graphs, inductor, bf16 agreement, no host synchronisation,
#      the fast path's fallback on a real capture;
#   2. bench_sample.py at the released sizes in bf16, eager vs the fast path, batch 1 and 64, with
#      the attention kernel each strategy runs: GPT-L raster, ARPG-L (64 steps), LPD-L (20 steps),
#      VAR-d16 at 256 px, and PAR-XL-4x at 384 px (24x24 tokens);
#   3. bench_train.py at GPT-L in bf16, eager vs torch.compile (tokens/s);
# then appends one dated section, with the device name and every step's output, to bench/RESULTS.md.
# Without a CUDA device (or with --dry-run) it prints what it would run and exits 0.
#
#   bash bench/gpu_check.sh [--dry-run] [--results FILE]
set -uo pipefail
cd "$(dirname "$0")/.."

RESULTS=bench/RESULTS.md
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --results)
      if [ $# -lt 2 ]; then echo "gpu_check.sh: error: --results needs a file name" >&2; exit 2; fi
      RESULTS="$2"; shift ;;
    *) echo "gpu_check.sh: error: unknown argument $1 (known: --dry-run, --results FILE)" >&2; exit 2 ;;
  esac
  shift
done
PY="${PYTHON:-python}"

STEPS=(
  "$PY -m pytest -q -rs tests/test_fast_decode.py tests/test_fast_path_fallback.py tests/test_attention_kernels.py"
  "$PY bench/bench_sample.py --device cuda --size L --cases raster arpg-64 lpd-20 var --image-size 256 --batch-sizes 1 64 --decode-paths eager compiled --warmup 1 --iters 2 --kernel-report"
  "$PY bench/bench_sample.py --device cuda --size XL --cases par-4x --image-size 384 --batch-sizes 1 64 --decode-paths eager compiled --warmup 1 --iters 1 --kernel-report"
  "$PY bench/bench_train.py --device cuda --gpt-model GPT-L --precision bf16 --batch-size 32 --patch-level 1 --warmup 3 --iters 10"
  "$PY bench/bench_train.py --device cuda --gpt-model GPT-L --precision bf16 --batch-size 32 --patch-level 1 --warmup 3 --iters 10 --compile"
)

has_gpu() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }

if [ "$DRY" = 1 ] || ! has_gpu; then
  [ "$DRY" = 1 ] || echo "gpu_check.sh: no CUDA device here; nothing was run. On a GPU machine it runs:"
  [ "$DRY" = 0 ] || echo "gpu_check.sh --dry-run: it would run:"
  for s in "${STEPS[@]}"; do echo "  $s"; done
  echo "and append one dated section with the device name and every step's output to $RESULTS"
  exit 0
fi

DEVICE="$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB')")"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
LOGDIR="$(mktemp -d)"
trap 'rm -rf "$LOGDIR"' EXIT
echo "gpu_check.sh on $DEVICE (commit $COMMIT)"
START=$SECONDS
FAILED=0
for i in "${!STEPS[@]}"; do
  echo "== ${STEPS[$i]}"
  t0=$SECONDS
  bash -c "${STEPS[$i]}" 2>&1 | tee "$LOGDIR/$i.log"
  rc=${PIPESTATUS[0]}
  echo "$rc $((SECONDS - t0))" > "$LOGDIR/$i.rc"
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
done

{
  echo
  echo "## $(date +%Y-%m-%d) — GPU check on $DEVICE (bench/gpu_check.sh, commit $COMMIT)"
  echo
  echo "$((SECONDS - START)) s in all; $FAILED step(s) failed. Each step: its command, exit status, seconds, and output"
  echo "(progress bars removed)."
  for i in "${!STEPS[@]}"; do
    read -r rc secs < "$LOGDIR/$i.rc"
    echo
    echo '```sh'
    echo "${STEPS[$i]}"
    echo '```'
    echo
    echo "exit status $rc, ${secs} s:"
    echo
    echo '```'
    tr '\r' '\n' < "$LOGDIR/$i.log" | grep -v -E '[0-9]+%\|' | grep -v '^\s*$' | tail -n 80
    echo '```'
  done
} >> "$RESULTS"
echo "appended the GPU section to $RESULTS ($FAILED step(s) failed)"
[ "$FAILED" = 0 ]
