"""Read the constants of a frozen TensorFlow GraphDef (`.pb`) without TensorFlow.

The converter needs only the `Const` nodes of `classify_image_graph_def.pb` (conv kernels,
batch-norm statistics, softmax weights). Their encoding is small and stable (tensorflow/core/
framework/{graph,node_def,attr_value,tensor,tensor_shape}.proto), so a few lines of protobuf
wire-format decoding read them, and a user can convert the graph on a machine without TensorFlow.

Fields used: GraphDef.node = 1; NodeDef.name = 1, op = 2, attr = 5 (map entry: key = 1, value = 2);
AttrValue.tensor = 8; TensorProto.dtype = 1, tensor_shape = 2, tensor_content = 4, float_val = 5,
double_val = 6, int_val = 7, int64_val = 10, half_val = 13; TensorShapeProto.dim = 2; Dim.size = 1.
"""
from __future__ import annotations

import struct

import numpy as np

# tensorflow/core/framework/types.proto
_DTYPES = {1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
           9: np.int64, 19: np.float16}


class GraphDefError(ValueError):
    """A file that is not a readable frozen GraphDef."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise GraphDefError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise GraphDefError("varint too long")


def _fields(buf: bytes):
    """Yield (field number, wire type, value) of one message; value is int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i: i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i: i + n], i + n
        elif wire == 5:
            value, i = buf[i: i + 4], i + 4
        else:
            raise GraphDefError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise GraphDefError("truncated message")
        yield field, wire, value


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for f, _, v in _fields(buf):
        if f == 2:
            size = next((s for ff, _, s in _fields(v) if ff == 1), 0)
            dims.append(size)
    return tuple(dims)


def _tensor(buf: bytes) -> np.ndarray:
    dtype_enum, shape, content, vals = 0, (), None, []
    for f, wire, v in _fields(buf):
        if f == 1:
            dtype_enum = v
        elif f == 2:
            shape = _shape(v)
        elif f == 4:
            content = v
        elif f in (5, 6, 7, 10, 13):
            vals.append((f, wire, v))
    if dtype_enum not in _DTYPES:
        raise GraphDefError(f"unsupported tensor dtype enum {dtype_enum}")
    dtype = np.dtype(_DTYPES[dtype_enum])
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        return np.frombuffer(content, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape).copy()
    flat: list = []
    for f, wire, v in vals:
        if f == 5:
            flat.extend(struct.unpack(f"<{len(v) // 4}f", v))
        elif f == 6:
            flat.extend(struct.unpack(f"<{len(v) // 8}d", v))
        elif wire == 2:  # packed varints (int_val, int64_val, half_val)
            j = 0
            while j < len(v):
                x, j = _varint(v, j)
                flat.append(x)
        else:
            flat.append(v)
    if dtype == np.float16:  # half_val holds the raw 16-bit patterns
        flat = list(np.array(flat, dtype=np.uint16).view(np.float16))
    arr = np.array(flat, dtype=dtype)
    if arr.size == count:
        return arr.reshape(shape)
    if arr.size == 0:
        return np.zeros(shape, dtype=dtype)
    # TensorFlow repeats the last value to fill the shape.
    return np.concatenate([arr, np.full(count - arr.size, arr[-1], dtype=dtype)]).reshape(shape)


def read_constants(data: bytes) -> dict[str, np.ndarray]:
    """{node name: value} of every `Const` node in a serialized GraphDef (bytes)."""
    out: dict[str, np.ndarray] = {}
    data = memoryview(data)  # slices below are views, not copies of a 95 MB buffer
    try:
        for field, _, node in _fields(data):
            if field != 1:
                continue
            name = op = None
            tensor = None
            for f, _, v in _fields(node):
                if f == 1:
                    name = bytes(v).decode()
                elif f == 2:
                    op = bytes(v).decode()
                elif f == 5:
                    entry = dict((ff, vv) for ff, _, vv in _fields(v))
                    if bytes(entry.get(1, b"")) == b"value" and 2 in entry:
                        tensor = next((vv for ff, _, vv in _fields(entry[2]) if ff == 8), None)
            if op == "Const" and name is not None and tensor is not None:
                out[name] = _tensor(tensor)
    except (GraphDefError, UnicodeDecodeError, ValueError, struct.error) as e:
        raise GraphDefError(f"not a readable GraphDef: {e}") from e
    return out
