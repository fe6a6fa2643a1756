"""Decoding TF.js weight shards into numpy arrays, exactly as tfjs-core's ``io_utils.decodeWeights`` does.

Each weight group's shards are joined in manifest order into one buffer; its weights are read from that buffer
one after another (running offset). Dtypes: float32, int32, bool (one byte), string (per element a uint32
little-endian byte length, then the bytes), complex64 (real/imag float32 pairs). Quantized weights
(``quantization.dtype``): uint8/uint16 hold ``q``, the value is ``q * scale + min`` (rounded when the weight
is int32); float16 is cast to float32. Weights in the ``optimizer`` group are optimizer state and are skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...errors import ModelLoadError, UnsupportedError
from .manifest import GZIP_MAGIC, WeightEntry, WeightGroup, decompress_if_gzip

DTYPE_BYTES = {"float32": 4, "int32": 4, "bool": 1, "complex64": 8}
QUANT_BYTES = {"uint8": 1, "uint16": 2, "float16": 2}
STRING = "string"


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def entry_nbytes(w: WeightEntry, where: str) -> int | None:
    """Bytes the entry occupies in its group buffer; None for strings (length-prefixed, known only by reading)."""
    check_entry(w, where)
    if w.quantization is not None:
        return _count(w.shape) * QUANT_BYTES[w.quantization["dtype"]]
    if w.dtype == STRING:
        return None
    return _count(w.shape) * DTYPE_BYTES[w.dtype]


def check_entry(w: WeightEntry, where: str) -> None:
    """Refuse dtypes and quantizations TF.js itself doesn't define, naming the weight."""
    if w.dtype not in DTYPE_BYTES and w.dtype != STRING:
        raise UnsupportedError(f"{where}: weight {w.name!r} has unknown dtype {w.dtype!r}; TF.js weights are "
                               f"float32, int32, bool, string or complex64")
    q = w.quantization
    if q is None:
        return
    qd = q.get("dtype")
    if qd not in QUANT_BYTES:
        raise UnsupportedError(f"{where}: weight {w.name!r} has unknown quantization dtype {qd!r}; TF.js "
                               f"quantizes to uint8, uint16 or float16")
    if qd in ("uint8", "uint16"):
        if w.dtype not in ("float32", "int32"):
            raise UnsupportedError(f"{where}: weight {w.name!r} is {w.dtype} quantized to {qd}; TF.js dequantizes "
                                   f"only float32 and int32 weights")
        for k in ("scale", "min"):
            if not isinstance(q.get(k), (int, float)) or isinstance(q.get(k), bool):
                raise ModelLoadError(f"{where}: weight {w.name!r} is quantized to {qd} but its quantization has no "
                                     f"numeric {k!r}")
    elif w.dtype != "float32":
        raise UnsupportedError(f"{where}: weight {w.name!r} is {w.dtype} quantized to float16; TF.js allows "
                               f"float16 quantization only for float32 weights")


def decode_entry(w: WeightEntry, buf: memoryview, offset: int, where: str) -> tuple[np.ndarray | None, int]:
    """Decode one weight at ``offset``; return (array, new offset). Arrays are float32/int32/bool/object/complex64."""
    n = _count(w.shape)
    q = w.quantization
    if q is not None:
        qd = q["dtype"]
        size = n * QUANT_BYTES[qd]
        raw = _take(buf, offset, size, w, where)
        if qd == "float16":
            arr = np.frombuffer(raw, "<f2").astype(np.float32)
        else:
            qv = np.frombuffer(raw, "<u1" if qd == "uint8" else "<u2").astype(np.float64)
            val = qv * float(q["scale"]) + float(q["min"])  # double, like JS; then stored as the weight's dtype
            arr = val.astype(np.float32) if w.dtype == "float32" else _js_round(val).astype(np.int32)
        return arr.reshape(w.shape), offset + size
    if w.dtype == STRING:
        items = []
        for _ in range(n):
            head = _take(buf, offset, 4, w, where)
            length = int(np.frombuffer(head, "<u4")[0])
            offset += 4
            items.append(bytes(_take(buf, offset, length, w, where)))
            offset += length
        arr = np.empty(n, dtype=object)
        arr[:] = items
        return arr.reshape(w.shape), offset
    size = n * DTYPE_BYTES[w.dtype]
    raw = _take(buf, offset, size, w, where)
    if w.dtype == "float32":
        arr = np.frombuffer(raw, "<f4").astype(np.float32)
    elif w.dtype == "int32":
        arr = np.frombuffer(raw, "<i4").astype(np.int32)
    elif w.dtype == "bool":
        arr = np.frombuffer(raw, "<u1") != 0
    else:  # complex64: interleaved real, imag
        pairs = np.frombuffer(raw, "<f4").reshape(-1, 2)
        arr = (pairs[:, 0] + 1j * pairs[:, 1]).astype(np.complex64)
    return arr.reshape(w.shape), offset + size


def _js_round(v: np.ndarray) -> np.ndarray:
    """JavaScript Math.round: halves round up (towards +inf), unlike numpy's round-half-even."""
    return np.floor(v + 0.5)


def _take(buf: memoryview, offset: int, size: int, w: WeightEntry, where: str) -> memoryview:
    if offset + size > len(buf):
        raise ModelLoadError(f"{where}: the shards end inside weight {w.name!r} (needs bytes {offset}..{offset + size}, "
                             f"have {len(buf)}); a shard is truncated or missing data")
    return buf[offset:offset + size]


def decode_group(group: WeightGroup, shards: Sequence[bytes], where: str,
                 skip_optimizer: bool = True) -> dict[str, np.ndarray]:
    """Join a group's shards and decode every weight; the byte counts must match the manifest exactly."""
    for w in group.weights:
        check_entry(w, where)
    sizes = [entry_nbytes(w, where) for w in group.weights]
    data = _join(group, shards, sizes, where)
    if all(s is not None for s in sizes) and len(data) != sum(sizes):  # type: ignore[arg-type]
        raise ModelLoadError(_size_message(group, where, len(data), sum(sizes)))  # type: ignore[arg-type]
    buf = memoryview(data)
    out: dict[str, np.ndarray] = {}
    offset = 0
    for w, size in zip(group.weights, sizes):
        if skip_optimizer and w.group == "optimizer" and size is not None:
            _take(buf, offset, size, w, where)
            offset += size
            continue
        arr, offset = decode_entry(w, buf, offset, where)
        if skip_optimizer and w.group == "optimizer":
            continue
        if w.name in out:
            raise ModelLoadError(f"{where}: weight {w.name!r} appears twice in the weights manifest")
        out[w.name] = arr
    if offset != len(buf):
        raise ModelLoadError(_size_message(group, where, len(buf), offset))
    return out


def _join(group: WeightGroup, shards: Sequence[bytes], sizes: Sequence[int | None], where: str) -> bytes:
    """Concatenate shards; gunzip shards that are gzip streams when that is what makes the sizes add up."""
    data = b"".join(shards)
    if any(s is None for s in sizes):  # strings: can't know the size up front
        if any(s.startswith(GZIP_MAGIC) for s in shards):
            try:
                return b"".join(decompress_if_gzip(s, where) for s in shards)
            except ModelLoadError:
                return data
        return data
    expected = sum(sizes)  # type: ignore[arg-type]
    if len(data) == expected or not any(s.startswith(GZIP_MAGIC) for s in shards):
        return data
    try:
        unzipped = b"".join(decompress_if_gzip(s, where) for s in shards)
    except ModelLoadError:
        return data
    return unzipped if len(unzipped) == expected else data


def _size_message(group: WeightGroup, where: str, have: int, need: int) -> str:
    names = ", ".join(group.paths[:4]) + (", ..." if len(group.paths) > 4 else "")
    how = "shorter" if have < need else "longer"
    return (f"{where}: shard(s) {names} hold {have} bytes but the manifest's {len(group.weights)} weights need "
            f"{need}; a shard is {how} than the manifest says (truncated, or from another model)")


def read_all_weights(groups: Sequence[WeightGroup], read_shard: Callable[[str], bytes],
                     where: str) -> dict[str, np.ndarray]:
    """Decode every group; ``read_shard(path)`` returns a shard's bytes (and enforces path safety)."""
    weights: dict[str, np.ndarray] = {}
    for gi, group in enumerate(groups, 1):
        for w in group.weights:  # fail on unknown dtypes before any shard is read
            check_entry(w, where)
        if not group.weights:
            continue
        shards = [read_shard(p) for p in group.paths]
        decoded = decode_group(group, shards, f"{where} (weight group {gi})")
        dup = sorted(set(decoded) & set(weights))
        if dup:
            raise ModelLoadError(f"{where}: weight(s) {', '.join(dup[:5])} appear in more than one weight group")
        weights.update(decoded)
    return weights
