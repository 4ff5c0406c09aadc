"""The two Inception backends and the converter, without the real (non-downloadable) weights.

- TF1 bilinear resize: ours equals `tf.compat.v1.image.resize_bilinear` bit for bit;
- `tf` backend: a stand-in graph with the real tensor names (`ExpandDims`, `mixed_6/conv`,
  `pool_3`, `softmax/logits/MatMul`), built here from the golden fixture's constants and written
  as a `.pb`, reproduces the official outputs stored in `activations.pt` and agrees with the
  `torch` backend on the same stand-in;
- converter: random weights of the full network written as a GraphDef (by a protobuf encoder
  here, and by TensorFlow) come back identical through `convert_graph`;
- real weights: checked only when present under `pretrained_models/`, skipped with the reason.
"""
from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from evaluations.c2i import convert as conv
from evaluations.c2i.features import TorchInceptionBackend, compute_activations
from evaluations.c2i.graphdef import GraphDefError, read_constants
from evaluations.c2i.inception_torch import InceptionV3ADM, resize_bilinear_tf1, tf_scope_table
from tests.golden import fixture_cases, get_case, golden_dir
from tests.test_parity_adm_eval import StandInInception
from utils.checkpoint import save_checkpoint

try:
    from evaluations.c2i.inception_tf import import_tensorflow

    tf = import_tensorflow()  # loads triton before TensorFlow (see import_tensorflow)
except ImportError:  # the tf backend is optional
    tf = None

needs_tf = pytest.mark.skipif(tf is None, reason="TensorFlow is not installed (pip install tensorflow-cpu)")
ACTIVATIONS = golden_dir() / "adm_eval" / "activations.pt"
needs_fixture = pytest.mark.skipif(not ACTIVATIONS.is_file(), reason=f"no fixture {ACTIVATIONS}")


# ------------------------------------------------------------------------------------------------
# A protobuf encoder for GraphDefs of constants (the inverse of graphdef.read_constants)
# ------------------------------------------------------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(num << 3) + _varint(payload)
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def encode_const_graph(consts: dict[str, np.ndarray], packed_floats: tuple[str, ...] = ()) -> bytes:
    """A serialized GraphDef with one `Const` node per array (float32 `tensor_content`, or the
    repeated `float_val` field for the names in `packed_floats`)."""
    nodes = b""
    for name, a in consts.items():
        a = np.ascontiguousarray(a, dtype=np.float32)
        shape = b"".join(_field(2, _field(1, d)) for d in a.shape)
        body = (_field(5, struct.pack(f"<{a.size}f", *a.ravel())) if name in packed_floats
                else _field(4, a.tobytes()))
        tensor = _field(1, 1) + _field(2, shape) + body
        attr_value = _field(5, _field(1, b"value") + _field(2, _field(8, tensor)))
        attr_dtype = _field(5, _field(1, b"dtype") + _field(2, _field(6, 1)))
        nodes += _field(1, _field(1, name.encode()) + _field(2, b"Const") + attr_dtype + attr_value)
    return nodes


def random_graph_constants(seed: int = 0) -> dict[str, np.ndarray]:
    """Random constants named as in classify_image_graph_def.pb, shaped like the real network."""
    rng = np.random.default_rng(seed)
    model = InceptionV3ADM()
    consts = {"softmax/weights": rng.standard_normal((2048, 1008), dtype=np.float32),
              "softmax/biases": rng.standard_normal(1008, dtype=np.float32)}
    for module, scope in tf_scope_table(model).items():
        o, i, kh, kw = model.get_submodule(module).conv.weight.shape
        consts[f"{scope}/conv2d_params"] = rng.standard_normal((kh, kw, i, o), dtype=np.float32) * 0.1
        for p in ("gamma", "beta", "moving_mean"):
            consts[f"{scope}/batchnorm/{p}"] = rng.standard_normal(o, dtype=np.float32)
        consts[f"{scope}/batchnorm/moving_variance"] = rng.uniform(0.5, 2, o).astype(np.float32)
    return consts


# ------------------------------------------------------------------------------------------------
# Converter
# ------------------------------------------------------------------------------------------------

def check_converted(sd: dict[str, torch.Tensor], consts: dict[str, np.ndarray]) -> None:
    model = InceptionV3ADM()
    assert set(sd) == set(model.state_dict())
    np.testing.assert_array_equal(sd["fc.weight"].numpy(), consts["softmax/weights"].T)
    np.testing.assert_array_equal(sd["fc.bias"].numpy(), consts["softmax/biases"])
    for module, scope in tf_scope_table(model).items():
        np.testing.assert_array_equal(sd[f"{module}.conv.weight"].numpy(),
                                      consts[f"{scope}/conv2d_params"].transpose(3, 2, 0, 1))
        np.testing.assert_array_equal(sd[f"{module}.bn.running_var"].numpy(),
                                      consts[f"{scope}/batchnorm/moving_variance"])
        np.testing.assert_array_equal(sd[f"{module}.bn.weight"].numpy(), consts[f"{scope}/batchnorm/gamma"])
        np.testing.assert_array_equal(sd[f"{module}.bn.bias"].numpy(), consts[f"{scope}/batchnorm/beta"])


def test_scope_table_is_the_graph_layout():
    table = tf_scope_table(InceptionV3ADM())
    assert len(table) == 94  # the graph's 94 Conv2D ops
    assert len(set(table.values())) == 94
    assert table["Mixed_6d.branch1x1"] == "mixed_6/conv"  # the sFID tensor
    assert table["Mixed_7c.branch3x3dbl_3b"] == "mixed_10/tower_1/mixed/conv_1"
    assert table["Mixed_6a.branch3x3"] == "mixed_3/conv"


def test_converter_round_trip(tmp_path):
    consts = random_graph_constants()
    pb = tmp_path / "classify_image_graph_def.pb"
    pb.write_bytes(encode_const_graph(consts, packed_floats=("softmax/biases",)))
    out = conv.convert(pb, tmp_path / "inception.pth")
    sd = conv.load_inception_weights(out)
    check_converted(sd, consts)
    model = conv.build_inception(out)  # strict load into the network
    assert torch.equal(model.Mixed_6d.branch1x1.conv.weight, sd["Mixed_6d.branch1x1.conv.weight"])


def test_converter_refuses_incomplete_or_corrupt_graph(tmp_path):
    consts = random_graph_constants()
    del consts["mixed_6/conv/batchnorm/gamma"]
    pb = tmp_path / "partial.pb"
    pb.write_bytes(encode_const_graph(consts))
    with pytest.raises(conv.InceptionWeightsError, match="lacks 1 constants.*mixed_6/conv/batchnorm/gamma"):
        conv.convert_graph(pb)
    bad = tmp_path / "corrupt.pb"
    bad.write_bytes(encode_const_graph({"a": np.ones(3)})[:-5])
    with pytest.raises(conv.InceptionWeightsError, match="corrupt or truncated"):
        conv.convert_graph(bad)
    with pytest.raises(conv.InceptionWeightsError, match="no Inception graph"):
        conv.convert_graph(tmp_path / "absent.pb")


def test_weights_loader_errors(tmp_path):
    with pytest.raises(conv.InceptionWeightsError, match="no Inception weights.*evaluations.c2i.convert"):
        conv.load_inception_weights(tmp_path / "absent.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(conv.InceptionWeightsError, match="corrupt"):
        conv.load_inception_weights(corrupt)
    sd = InceptionV3ADM().state_dict()
    sd.pop("fc.bias")
    foreign = save_checkpoint(sd, tmp_path / "foreign.pth")
    with pytest.raises(conv.InceptionWeightsError, match="missing keys"):
        conv.load_inception_weights(foreign)


@needs_tf
def test_graphdef_reader_matches_tensorflow_serialization():
    consts = {"softmax/weights": np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32),
              "filled": np.full((2, 3), 0.5, np.float32), "scalar": np.float32(3.25)}
    g = tf.Graph()
    with g.as_default():
        for k, v in consts.items():
            tf.constant(v, name=k)
    got = read_constants(g.as_graph_def().SerializeToString())
    assert set(got) == set(consts)
    for k, v in consts.items():
        np.testing.assert_array_equal(got[k], v)


def test_graphdef_reader_rejects_garbage():
    with pytest.raises(GraphDefError):
        read_constants(b"\x0a\xff\xff\xff\xff\x0f")


# ------------------------------------------------------------------------------------------------
# TF1 resize and the tf backend on the stand-in graph
# ------------------------------------------------------------------------------------------------

@needs_tf
@pytest.mark.parametrize("hw", [(32, 32), (256, 256), (17, 40), (300, 299)])
def test_resize_matches_tensorflow(hw):
    rng = np.random.default_rng(hw[0])
    img = rng.integers(0, 256, (2, *hw, 3)).astype(np.float32)
    with tf.Graph().as_default(), tf.Session() as sess:
        want = sess.run(tf.image.resize_bilinear(img, [299, 299], align_corners=False,
                                                 half_pixel_centers=False))
    got = resize_bilinear_tf1(torch.from_numpy(img).permute(0, 3, 1, 2), (299, 299)).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(got.numpy(), want)


def write_standin_graph(sd: dict[str, torch.Tensor], path) -> None:
    """The fixture's stand-in graph (README `activations.pt`) with TensorFlow, as a frozen `.pb`."""
    c = {k: v.numpy() for k, v in sd.items()}
    g = tf.Graph()
    with g.as_default():
        x = tf.placeholder(tf.float32, [None, None, None, 3], name="ExpandDims")
        r = tf.image.resize_bilinear(x, [299, 299], align_corners=False, half_pixel_centers=False,
                                     name="ResizeBilinear")
        m = tf.multiply(tf.subtract(r, 128.0, name="Sub"), 0.0078125, name="Mul")
        stem = tf.nn.avg_pool(m, [1, 17, 17, 1], [1, 17, 17, 1], "VALID", name="stem/AvgPool")
        w1 = tf.constant(c["mixed_6/conv/conv2d_params"], name="mixed_6/conv/conv2d_params")
        b1 = tf.constant(c["mixed_6/conv/biases"], name="mixed_6/conv/biases")
        m6 = tf.nn.relu(tf.nn.conv2d(stem, w1, [1, 1, 1, 1], "VALID") + b1, name="mixed_6/conv")
        w2 = tf.constant(c["pool_3/conv/conv2d_params"], name="pool_3/conv/conv2d_params")
        b2 = tf.constant(c["pool_3/conv/biases"], name="pool_3/conv/biases")
        p3 = tf.nn.relu(tf.nn.conv2d(m6, w2, [1, 1, 1, 1], "VALID") + b2, name="pool_3/conv/Relu")
        pool = tf.nn.avg_pool(p3, [1, 17, 17, 1], [1, 17, 17, 1], "VALID", name="pool_3")
        flat = tf.reshape(pool, [-1, 2048], name="pool_3/_reshape")
        ws = tf.constant(c["softmax/weights"], name="softmax/weights")
        logits = tf.nn.bias_add(tf.matmul(flat, ws, name="softmax/logits/MatMul"),
                                tf.constant(c["softmax/biases"], name="softmax/biases"), name="softmax/logits")
        tf.nn.softmax(logits, name="softmax")
    path.write_bytes(g.as_graph_def().SerializeToString())


@needs_tf
@needs_fixture
def test_tf_backend_on_standin_graph_matches_official_and_torch(tmp_path):
    from evaluations.c2i.inception_tf import TFInceptionBackend

    (path, name), = [p.values for p in fixture_cases("adm_eval") if "standin" in p.values[1]]
    fx, case = get_case(path, name)
    tol, images, out = fx["tolerance"], case["inputs"]["images"].numpy(), case["outputs"]
    pb = tmp_path / "classify_image_graph_def.pb"
    write_standin_graph(fx["state_dict"], pb)
    tf_backend = TFInceptionBackend(pb, download=False)
    tf_backend.warmup()
    batches = (images[i: i + 64] for i in range(0, len(images), 64))
    got = compute_activations(tf_backend, batches, len(images), show_progress=False)
    tf_backend.close()
    for key, arr in (("pool_features", got.pool), ("spatial_features", got.spatial), ("softmax", got.probs)):
        np.testing.assert_allclose(arr, out[key].numpy(), atol=tol["atol"], rtol=tol["rtol"], err_msg=key)
    torch_backend = TorchInceptionBackend(StandInInception(fx["state_dict"]), device="cpu")
    ref = compute_activations(torch_backend, iter([images]), len(images), show_progress=False)
    np.testing.assert_allclose(ref.pool, got.pool, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ref.spatial, got.spatial, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(ref.probs, got.probs, atol=1e-6, rtol=1e-5)
    # The graph's constants read back by our reader (the converter's input) are the fixture's.
    consts = read_constants(pb.read_bytes())
    for k, v in fx["state_dict"].items():
        np.testing.assert_array_equal(consts[k], v.numpy())


def test_tf_backend_reports_missing_tensorflow_or_graph(tmp_path):
    from evaluations.c2i.inception_tf import TFInceptionBackend

    if tf is None:
        with pytest.raises(ImportError, match="pip install tensorflow-cpu"):
            TFInceptionBackend(tmp_path / "g.pb", download=False)
        return
    with pytest.raises(FileNotFoundError, match="no Inception graph"):
        TFInceptionBackend(tmp_path / "absent.pb", download=False)
    bad = tmp_path / "corrupt.pb"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        TFInceptionBackend(bad, download=False)


# ------------------------------------------------------------------------------------------------
# Real weights (never downloadable on these machines)
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(tf is None or not conv.INCEPTION_GRAPH_PATH.is_file(),
                    reason=f"needs TensorFlow and the real graph at {conv.INCEPTION_GRAPH_PATH} "
                           f"(from {conv.INCEPTION_GRAPH_URL}; not downloadable here)")
def test_real_graph_tf_and_torch_agree(tmp_path):
    from evaluations.c2i.inception_tf import TFInceptionBackend

    images = np.random.default_rng(0).integers(0, 256, (4, 256, 256, 3), dtype=np.uint8)
    pth = conv.convert(conv.INCEPTION_GRAPH_PATH, tmp_path / "inception.pth")
    t = TorchInceptionBackend(conv.build_inception(pth), device="cpu")(images)
    g = TFInceptionBackend(conv.INCEPTION_GRAPH_PATH, download=False)(images)
    for a, b, what in zip(t, g, ("pool", "spatial", "probs")):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3, err_msg=what)


@pytest.mark.slow
@pytest.mark.skipif(not conv.PYTORCH_FID_PATH.is_file(),
                    reason=f"the pytorch-fid weights are not at {conv.PYTORCH_FID_PATH} "
                           f"(from {conv.PYTORCH_FID_URL}; not downloadable here)")
def test_real_pytorch_fid_weights_load_and_classify():
    model = conv.build_inception(conv.PYTORCH_FID_PATH)
    images = np.full((2, 64, 64, 3), 128, dtype=np.uint8)
    pool, spatial, probs = TorchInceptionBackend(model, device="cpu")(images)
    assert pool.shape == (2, 2048) and spatial.shape == (2, 2023) and probs.shape == (2, 1008)
    assert np.isfinite(pool).all() and (pool >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
