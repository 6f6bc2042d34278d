"""A safetensors file's header, read without torch or numpy: names, dtypes, shapes, byte ranges.

- `read_header(path)` -> {name: TensorInfo}; TensorFileError says what is wrong.
The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N, N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data buffer; offsets are relative to the buffer. Checks that every tensor's byte range
matches its dtype and shape and lies inside the file, so a header that lies is refused here.
Knows nothing about soft prompts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

# safetensors dtype codes -> (our dtype name, bytes per element); only the float types a soft
# prompt or its geometry is stored in.
DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F64": ("float64", 8)}
# The safetensors library refuses headers over 100 MB; a soft prompt's header is a few hundred bytes.
MAX_HEADER_BYTES = 100_000_000


class TensorFileError(ValueError):
    """A safetensors file whose header is missing, malformed, or inconsistent with the file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # float32 | bfloat16 | float16 | float64
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorInfo]:
    file = Path(path)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise TensorFileError(f"{file}: not a safetensors file (shorter than 8 bytes)")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise TensorFileError(f"{file}: header length {length} does not fit a {size}-byte file")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorFileError(f"{file}: header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{file}: header is not a JSON object")
    data_start = 8 + length
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        infos[name] = _tensor_info(file, name, entry, data_start, size)
    return infos


def _tensor_info(file: Path, name: str, entry: object, data_start: int, size: int) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise TensorFileError(f"{file}: tensor {name!r} has a malformed header entry")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if code not in DTYPES:
        raise TensorFileError(f"{file}: tensor {name!r} has dtype {code!r}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise TensorFileError(f"{file}: tensor {name!r} has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise TensorFileError(f"{file}: tensor {name!r} has malformed data_offsets {offsets!r}")
    dtype, itemsize = DTYPES[code]
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if not data_start <= begin <= end <= size or end - begin != math.prod(shape) * itemsize:
        raise TensorFileError(
            f"{file}: tensor {name!r} ({dtype} {shape}) has byte range {offsets} that does not match "
            f"its shape or lies outside the file"
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=begin, end=end)
