"""The `tf` backend: the original ADM Inception graph run by TensorFlow (compat.v1 session).

As the official evaluator (openai/guided-diffusion `evaluations/evaluator.py`) does: the float32
image batch is bound to the graph's `ExpandDims:0` through `input_map`; `pool_3:0` and
`mixed_6/conv:0[..., :7]` are fetched; the graph is imported a second time and the second input of
`softmax/logits/MatMul` (the [2048, K] weight) multiplies a pool placeholder, softmax without
`softmax/biases`. The session allows soft placement and GPU memory growth. The TTUR batch-1 shape
hack (`_update_shapes`) only relaxes static shapes on the Python side; the outputs here are
reshaped with numpy, so it is not needed.

TensorFlow is imported when the backend is built, never at module import, so everything else runs
without it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from evaluations.c2i.convert import INCEPTION_GRAPH_PATH, ensure_inception_graph

FID_POOL_NAME = "pool_3:0"
FID_SPATIAL_NAME = "mixed_6/conv:0"
INPUT_NAME = "ExpandDims:0"
SOFTMAX_MATMUL = "softmax/logits/MatMul"
SPATIAL_CHANNELS = 7


def import_tensorflow():
    """`tensorflow.compat.v1`, or ImportError saying how to install it.

    torch's compiler stack (triton, via `torch._dynamo`) is loaded first: loading triton's native
    library after TensorFlow's crashes the process (a symbol clash between their LLVM builds), and
    torchvision imports it lazily, so any later torchvision import would segfault.
    """
    import torch._dynamo  # noqa: F401, PLC0415 - import order matters, see above

    try:
        import tensorflow.compat.v1 as tf  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise ImportError("the tf backend needs TensorFlow: `pip install tensorflow-cpu` (or "
                          "`tensorflow` for a GPU), or use --backend torch") from e
    return tf


class TFInceptionBackend:
    """Features and bias-free softmax from `classify_image_graph_def.pb` (or a graph with its names)."""

    def __init__(self, graph_path: str | Path | None = None, batch_size: int = 64,
                 softmax_batch_size: int = 512, download: bool = True):
        tf = import_tensorflow()
        path = Path(graph_path) if graph_path is not None else INCEPTION_GRAPH_PATH
        if not path.is_file() and download:
            ensure_inception_graph(path)
        if not path.is_file():
            raise FileNotFoundError(f"no Inception graph at {path}")
        graph_def = tf.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError
            raise ValueError(f"{path} is not a readable TensorFlow graph ({e}); the file is corrupt "
                             f"or truncated: delete it and download it again") from e
        self.name = f"tf ({path.name})"
        self.batch_size = batch_size
        self.softmax_batch_size = softmax_batch_size
        self.graph = tf.Graph()
        with self.graph.as_default():
            self.image_input = tf.placeholder(tf.float32, shape=[None, None, None, 3])
            self.softmax_input = tf.placeholder(tf.float32, shape=[None, None])
            pool3, spatial = tf.import_graph_def(
                graph_def, input_map={INPUT_NAME: self.image_input},
                return_elements=[FID_POOL_NAME, FID_SPATIAL_NAME], name="features")
            self.pool_features = pool3
            self.spatial_features = spatial[..., :SPATIAL_CHANNELS]
            (matmul,) = tf.import_graph_def(graph_def, return_elements=[SOFTMAX_MATMUL], name="softmax")
            self.softmax = tf.nn.softmax(tf.matmul(self.softmax_input, matmul.inputs[1]))
        config = tf.ConfigProto(allow_soft_placement=True)  # DecodeJpeg has no GPU kernel
        config.gpu_options.allow_growth = True
        self.session = tf.Session(graph=self.graph, config=config)

    def warmup(self) -> None:
        """One batch of 8 zero images of 64x64, like the official `warmup`."""
        self(np.zeros([8, 64, 64, 3], dtype=np.uint8))

    def features(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pool, spatial = self.session.run([self.pool_features, self.spatial_features],
                                         {self.image_input: images.astype(np.float32)})
        return pool.reshape(len(images), -1), spatial.reshape(len(images), -1)

    def probabilities(self, pool: np.ndarray) -> np.ndarray:
        out = [self.session.run(self.softmax, {self.softmax_input: pool[i: i + self.softmax_batch_size]})
               for i in range(0, len(pool), self.softmax_batch_size)]
        return np.concatenate(out, axis=0)

    def __call__(self, images: np.ndarray):
        pool, spatial = self.features(images)
        return pool, spatial, self.probabilities(pool)

    def close(self) -> None:
        self.session.close()
