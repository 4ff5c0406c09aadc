"""Download official checkpoints and evaluation assets by name (see pretrained_models/README.md).

    python scripts/download_models.py vq_ds16_c2i.pt c2i_L_384.pt     # into pretrained_models/
    python scripts/download_models.py --method par                    # every PAR release
    python scripts/download_models.py --list [--method lpd]           # names, sizes, URLs
    python scripts/download_models.py --markdown                      # the README table

Hub files go through huggingface_hub (resumable); other files resume from `<file>.part`. The
published checksum is checked where there is one. Exit status 1 when a download fails (for
example when the network is unreachable), with the reason on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.download import DownloadError, download_checkpoint, list_checkpoints, registry_markdown  # noqa: E402
from utils.cli import run_cli  # noqa: E402


def main(args: argparse.Namespace) -> int:
    if args.markdown:
        print(registry_markdown(), end="")
        return 0
    entries = list_checkpoints(args.method)
    if args.method is not None and not entries:
        methods = sorted({e["method"] for e in list_checkpoints()})
        raise ValueError(f"no checkpoints for --method {args.method}; methods: {', '.join(methods)}")
    if args.list:
        for e in entries:
            print(f"{e['name']:<42} {e['method']:<13} {e['model']:<34} {e['url']}")
        return 0
    names = args.names or ([e["name"] for e in entries] if args.method else [])
    if not names:
        raise ValueError("name the files to download, or pass --method or --list")
    known = {e["name"] for e in list_checkpoints()}
    unknown = [n for n in names if n not in known]
    if unknown:  # every name is checked before anything is downloaded
        raise ValueError(f"unknown file(s) {', '.join(unknown)}: see --list for the registry names")
    failed = 0
    for name in names:
        try:
            path = download_checkpoint(name, args.dest)
        except (DownloadError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{name}: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="registry names (see --list)")
    parser.add_argument("--method", default=None,
                        help="only this method (llamagen_vq, llamagen_gpt, par, npp, arpg, lpd, var_vqvae, "
                             "var, aux) or family (llamagen, var)")
    parser.add_argument("--dest", default="pretrained_models", help="folder the files go to")
    parser.add_argument("--list", action="store_true", help="list the known files and exit")
    parser.add_argument("--markdown", action="store_true", help="print the README table and exit")
    sys.exit(run_cli(main, parser.parse_args()))
