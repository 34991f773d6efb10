"""Streaming safetensors reader and writer (one tensor in memory at a time).

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a read touches
stays resident (and counted in the process RSS) until the file is closed, so reading a 5 GB shard
tensor by tensor still grows RSS by 5 GB. Here each tensor is read with one ``os.pread`` into its
own buffer, and a file is written header first, then tensor by tensor, so peak host memory is the
largest single tensor. The format (https://github.com/huggingface/safetensors, "Format"): an
8-byte little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (offsets relative to the end of the
header), then the raw little-endian, C-order bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

import ml_dtypes
import numpy as np

# safetensors dtype code <-> numpy dtype (bfloat16 and float8 through ml_dtypes).
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("qnext_jax.convert.safetensors_io assumes a little-endian host")


class SafetensorsFormatError(ValueError):
    """A file that is not a valid safetensors file (names the file and what is wrong)."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file``, absolute byte range ``[begin, end)``, dtype and shape."""

    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse the header of a safetensors file.

    Returns:
      ({name: TensorInfo}, metadata dict).
    Raises:
      SafetensorsFormatError: truncated file, bad JSON, unknown dtype, or byte ranges that do
        not match the shapes or the file size.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsFormatError(f"{path}: header length {n} exceeds the file size")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsFormatError(f"{path}: header is not valid JSON ({e})") from None
    data_start = 8 + n
    meta = header.pop("__metadata__", None) or {}
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            b, e = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} has a bad header entry {entry!r}") from None
        expect = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if e - b != expect or b < 0:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} byte range [{b}, {e}) of the data does not hold "
                f"shape {shape} of {entry['dtype']} ({expect} bytes)")
        if data_start + e > size:
            raise SafetensorsFormatError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + e} of the file "
                f"(its data starts after the {data_start}-byte header), but the file has "
                f"{size} bytes")
        out[name] = TensorInfo(path, dtype, shape, data_start + b, data_start + e)
    return out, meta


def read_tensor(info: TensorInfo, index: int | None = None) -> np.ndarray:
    """Read a tensor (or, with ``index``, its slice ``[index]`` along the first axis).

    The bytes go straight from the file into a fresh array of exactly that size (``os.pread``),
    so nothing else stays resident.
    """
    shape, begin, nbytes = info.shape, info.begin, info.nbytes
    if index is not None:
        if not 0 <= index < shape[0]:
            raise IndexError(f"index {index} out of range for shape {shape}")
        nbytes //= shape[0]
        begin += index * nbytes
        shape = shape[1:]
    out = np.empty(shape, info.dtype)
    buf = memoryview(out.reshape(-1).view(np.uint8))
    fd = os.open(info.file, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [buf[done:]], begin + done)
            if got <= 0:
                raise SafetensorsFormatError(f"{info.file}: unexpected end of file")
            done += got
    finally:
        os.close(fd)
    return out


class SafetensorsWriter:
    """Write one safetensors file tensor by tensor, in the order of ``specs``.

    The header is computed from ``specs`` (name, dtype, shape) and written first; then each
    :meth:`write` appends one tensor's bytes. :meth:`close` checks that all were written.
    """

    def __init__(self, path: str | Path, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._specs = [(name, np.dtype(dt), tuple(shape)) for name, dt, shape in specs]
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        for name, dt, shape in self._specs:
            if dt not in CODES:
                raise ValueError(f"{name}: dtype {dt} has no safetensors code")
            n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            header[name] = {"dtype": CODES[dt], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._f = open(self.path, "wb")  # noqa: SIM115 (held open across write calls)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        exp_name, dt, shape = self._specs[self._next]
        if name != exp_name or array.dtype != dt or tuple(array.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor {exp_name} {dt} {shape}, got {name} "
                             f"{array.dtype} {tuple(array.shape)}")
        self._f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def close(self) -> None:
        self._f.close()
        if self._next != len(self._specs):
            raise ValueError(f"{self.path}: {len(self._specs) - self._next} tensors not written")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
