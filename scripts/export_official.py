"""Export one of our checkpoints (train_c2i.py or tokenizer/train_vq.py) in its method's official
release layout; the work is done by `autoregressive/export.py`.

    python scripts/export_official.py results/000-GPT-L-raster/checkpoints/0050000.pt --out c2i_L_256.pt
    python scripts/export_official.py results_tokenizer_image/000-VQ-16/checkpoints/0400000.pt --out vq.pt --ema
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.export import build_parser, main  # noqa: E402
from utils.cli import run_cli  # noqa: E402

if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())
