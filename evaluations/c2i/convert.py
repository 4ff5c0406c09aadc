"""Weights of the Inception backends: where they come from, how to get them, how to convert them.

Two files serve the two backends:

- `classify_image_graph_def.pb`, the ADM Inception graph for the `tf` backend, published at
  `INCEPTION_GRAPH_URL` (no checksum published; a downloaded graph is checked by reading it);
- a PyTorch state dict with torchvision key names for the `torch` backend: either converted from
  that graph by this module (`python -m evaluations.c2i.convert GRAPH.pb OUT.pth`), or the
  pytorch-fid file `pt_inception-2015-12-05-6726825d.pth` (`PYTORCH_FID_URL`, SHA-256 prefix
  `6726825d` by the torch.hub naming convention), converted from the same graph by its authors.

Downloads go through `utils.download.download_url` (resumable, checksum-checked, clear
`DownloadError` without network). Loading is strict: a missing, truncated or foreign file raises
`InceptionWeightsError` saying what to do.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):  # `python evaluations/c2i/convert.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluations.c2i.graphdef import GraphDefError, read_constants  # noqa: E402
from evaluations.c2i.inception_torch import InceptionV3ADM, tf_scope_table  # noqa: E402
from utils.checkpoint import CheckpointError, check_state_dict, load_checkpoint, save_checkpoint  # noqa: E402
from utils.cli import UserError, run_cli  # noqa: E402
from utils.download import download_url  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_DIR = ROOT / "pretrained_models"

INCEPTION_GRAPH_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
                       "classify_image_graph_def.pb")
INCEPTION_GRAPH_PATH = WEIGHTS_DIR / "classify_image_graph_def.pb"
PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
PYTORCH_FID_SHA256_PREFIX = "6726825d"
PYTORCH_FID_PATH = WEIGHTS_DIR / "pt_inception-2015-12-05-6726825d.pth"
CONVERTED_PATH = WEIGHTS_DIR / "inception-2015-12-05-adm.pth"  # what `convert` writes by default

# Keys some published state dicts carry that the graph has no tensor for (torchvision's
# BatchNorm2d step counter); dropped by name, everything else must match exactly.
IGNORED_SUFFIXES = (".num_batches_tracked",)


class InceptionWeightsError(UserError, RuntimeError):
    """Inception weights that are missing, corrupt or of another network; says what to do."""


def _how_to_get(path: Path) -> str:
    return (f"Put the converted weights at {path}: download the ADM graph ({INCEPTION_GRAPH_URL}) "
            f"and run `python -m evaluations.c2i.convert classify_image_graph_def.pb {path}`, or "
            f"download the pytorch-fid port ({PYTORCH_FID_URL}) and pass it with --weights.")


# ------------------------------------------------------------------------------------------------
# Graph -> state dict
# ------------------------------------------------------------------------------------------------

def expected_shapes() -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in InceptionV3ADM().state_dict().items()}


def convert_constants(consts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Map the graph's constants to our (torchvision) key names.

    conv `<scope>/conv2d_params` HWIO -> `<module>.conv.weight` OIHW; batch norm `<scope>/batchnorm/
    {gamma, beta, moving_mean, moving_variance}` -> `.bn.{weight, bias, running_mean, running_var}`;
    `softmax/weights` [2048, 1008] -> `fc.weight` [1008, 2048]; `softmax/biases` -> `fc.bias`.
    """
    table = tf_scope_table(InceptionV3ADM())
    missing = []

    def take(name: str) -> np.ndarray | None:
        if name not in consts:
            missing.append(name)
            return None
        return consts[name]

    sd: dict[str, torch.Tensor] = {}
    pairs = [("fc.weight", "softmax/weights", lambda a: a.T), ("fc.bias", "softmax/biases", None)]
    for module, scope in table.items():
        pairs.append((f"{module}.conv.weight", f"{scope}/conv2d_params", lambda a: a.transpose(3, 2, 0, 1)))
        for ours, theirs in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
            pairs.append((f"{module}.bn.{ours}", f"{scope}/batchnorm/{theirs}", None))
    for key, tf_name, fn in pairs:
        a = take(tf_name)
        if a is not None:
            sd[key] = torch.from_numpy(np.ascontiguousarray(fn(a) if fn else a, dtype=np.float32))
    if missing:
        raise InceptionWeightsError(
            f"the graph lacks {len(missing)} constants of the 2015 Inception network (first: "
            f"{missing[:5]}); is it classify_image_graph_def.pb from inception-2015-12-05?")
    try:
        check_state_dict(sd, expected_shapes(), "converted Inception graph")
    except CheckpointError as e:
        raise InceptionWeightsError(str(e)) from e
    return sd


def convert_graph(pb_path: str | Path) -> dict[str, torch.Tensor]:
    """Read `classify_image_graph_def.pb` and return the `torch` backend's state dict."""
    pb_path = Path(pb_path)
    if not pb_path.is_file():
        raise InceptionWeightsError(f"no Inception graph at {pb_path}. Download it from "
                                    f"{INCEPTION_GRAPH_URL} (see `ensure_inception_graph`).")
    try:
        consts = read_constants(pb_path.read_bytes())
    except GraphDefError as e:
        raise InceptionWeightsError(f"{pb_path} is not a readable TensorFlow graph ({e}); the file is "
                                    f"corrupt or truncated: delete it and download it again") from e
    return convert_constants(consts)


def convert(pb_path: str | Path, out_path: str | Path = CONVERTED_PATH) -> Path:
    """Convert the graph and save the state dict atomically at `out_path`."""
    return save_checkpoint(convert_graph(pb_path), out_path)


# ------------------------------------------------------------------------------------------------
# Getting and loading the files
# ------------------------------------------------------------------------------------------------

def ensure_inception_graph(path: str | Path = INCEPTION_GRAPH_PATH, progress: bool = True) -> Path:
    """The ADM graph at `path`, downloaded (resumable) from the published URL if absent."""
    return download_url(INCEPTION_GRAPH_URL, path, progress=progress)


def ensure_pytorch_fid_weights(path: str | Path = PYTORCH_FID_PATH, progress: bool = True) -> Path:
    """The pytorch-fid port of the graph at `path`, downloaded and checked (SHA-256 prefix)."""
    return download_url(PYTORCH_FID_URL, path, sha256=PYTORCH_FID_SHA256_PREFIX, progress=progress)


def load_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A strict, safe load (`weights_only=True`) of a torch Inception state dict."""
    path = Path(path)
    if not path.is_file():
        raise InceptionWeightsError(f"no Inception weights at {path}. {_how_to_get(path)}")
    try:
        sd = load_checkpoint(path)
    except CheckpointError as e:
        raise InceptionWeightsError(f"{e}. The file is corrupt or not a state dict: delete it. "
                                    f"{_how_to_get(path)}") from e
    if not isinstance(sd, dict):
        raise InceptionWeightsError(f"{path}: expected a state dict, got {type(sd).__name__}")
    sd = {k: v for k, v in sd.items() if not k.endswith(IGNORED_SUFFIXES)}
    try:
        check_state_dict(sd, expected_shapes(), f"Inception weights {path}")
    except CheckpointError as e:
        raise InceptionWeightsError(str(e)) from e
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise InceptionWeightsError(f"{path}: non-finite values in {bad[:5]}; the file is corrupt")
    return {k: v.float() for k, v in sd.items()}


def build_inception(path: str | Path) -> InceptionV3ADM:
    """`InceptionV3ADM` in eval mode with the weights at `path`."""
    model = InceptionV3ADM()
    model.load_state_dict(load_inception_weights(path), strict=True)
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert classify_image_graph_def.pb to the torch "
                                                 "backend's weights (no TensorFlow needed).")
    parser.add_argument("graph", nargs="?", default=str(INCEPTION_GRAPH_PATH),
                        help="path of classify_image_graph_def.pb (downloaded here if absent)")
    parser.add_argument("out", nargs="?", default=str(CONVERTED_PATH), help="output .pth")
    args = parser.parse_args(argv)
    graph = Path(args.graph)
    if not graph.is_file():
        ensure_inception_graph(graph)
    out = convert(graph, args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_cli(main)
