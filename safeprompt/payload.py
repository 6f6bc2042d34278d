"""vLLM's prompt_embeds payload (the bytes of `torch.save(tensor)`), checked without torch.

- `check_payload(data, dtype=, shape=, where=)`: PayloadError unless `data` is exactly one
  contiguous CPU tensor of that dtype and [rows, hidden] shape, little-endian, with finite values.
vLLM decodes prompt_embeds with `torch.load(weights_only=True)` and trusts the tensor it gets;
the gateway sends payloads the trainer wrote into the artifact. So before one is served it is
inspected here as the zip archive and pickle it is, never unpickled: the pickle may name only
the three globals a saved tensor needs and may hold no other opcodes, its integers must spell the
expected storage size, offset, shape and strides, and the one data record must hold exactly the
expected bytes, none of them NaN or Inf.
Knows nothing about artifacts or HTTP.
"""

from __future__ import annotations

import io
import math
import pickletools
import zipfile
from array import array

# dtype -> (torch storage class, bytes per element, exponent mask of one element's bits)
STORAGES = {
    "float32": ("FloatStorage", 4, 0x7F800000),
    "bfloat16": ("BFloat16Storage", 2, 0x7F80),
    "float16": ("HalfStorage", 2, 0x7C00),
}
# array typecodes of unsigned integers of 4 and 2 bytes (checked at import: "I" is 4 bytes on the
# platforms vLLM runs on).
_UINT = {4: "I", 2: "H"}
assert array("I").itemsize == 4 and array("H").itemsize == 2

_ALLOWED_OPCODES = frozenset(
    "PROTO FRAME GLOBAL STACK_GLOBAL BINPUT LONG_BINPUT MEMOIZE BINGET LONG_BINGET MARK BINUNICODE "
    "SHORT_BINUNICODE BININT BININT1 BININT2 LONG1 TUPLE TUPLE1 TUPLE2 TUPLE3 EMPTY_TUPLE BINPERSID "
    "NEWFALSE NEWTRUE REDUCE STOP".split()
)
_INT_OPCODES = frozenset({"BININT", "BININT1", "BININT2", "LONG1"})
_STRING_OPCODES = frozenset({"BINUNICODE", "SHORT_BINUNICODE"})


class PayloadError(ValueError):
    """A prompt_embeds payload that is not exactly the expected tensor."""


def check_payload(data: bytes, *, dtype: str, shape: tuple[int, int], where: str) -> None:
    if dtype not in STORAGES:
        raise PayloadError(f"{where}: dtype {dtype!r} is not one of {sorted(STORAGES)}")
    storage, itemsize, mask = STORAGES[dtype]
    rows, hidden = shape
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except zipfile.BadZipFile as exc:
        raise PayloadError(f"{where}: not a torch.save archive: {exc}") from None
    prefixes = {name.split("/", 1)[0] for name in names}
    if len(prefixes) != 1 or any("/" not in name for name in names):
        raise PayloadError(f"{where}: archive entries {names} are not under one folder")
    prefix = prefixes.pop()
    data_records = [name for name in names if name.startswith(f"{prefix}/data/")]
    if data_records != [f"{prefix}/data/0"]:
        raise PayloadError(f"{where}: expected exactly one data record {prefix}/data/0, found {data_records}")
    try:
        byteorder = archive.read(f"{prefix}/byteorder")
        pickled = archive.read(f"{prefix}/data.pkl")
        storage_bytes = archive.read(f"{prefix}/data/0")
    except (KeyError, zipfile.BadZipFile, ValueError) as exc:
        raise PayloadError(f"{where}: incomplete torch.save archive: {exc}") from None
    if byteorder != b"little":
        raise PayloadError(f"{where}: byte order {byteorder!r}, expected little-endian")
    _check_pickle(pickled, storage=storage, shape=shape, where=where)
    if len(storage_bytes) != rows * hidden * itemsize:
        raise PayloadError(
            f"{where}: data record holds {len(storage_bytes)} bytes, expected {rows}x{hidden} {dtype} "
            f"= {rows * hidden * itemsize}"
        )
    values = array(_UINT[itemsize])
    values.frombytes(storage_bytes)
    if any(value & mask == mask for value in values):
        raise PayloadError(f"{where}: the tensor contains NaN or Inf")


def _check_pickle(pickled: bytes, *, storage: str, shape: tuple[int, int], where: str) -> None:
    """The pickle of `torch._utils._rebuild_tensor_v2(storage, 0, shape, (hidden, 1), False, OrderedDict())`."""
    rows, hidden = shape
    allowed_globals = {"torch._utils _rebuild_tensor_v2", f"torch {storage}", "collections OrderedDict"}
    integers: list[int] = []
    strings: list[str] = []
    globals_seen: set[str] = set()
    try:
        for opcode, argument, _ in pickletools.genops(pickled):
            if opcode.name not in _ALLOWED_OPCODES:
                raise PayloadError(f"{where}: the pickle uses opcode {opcode.name}, not allowed in a saved tensor")
            if opcode.name == "GLOBAL":
                globals_seen.add(str(argument))
            elif opcode.name == "STACK_GLOBAL":
                globals_seen.add(" ".join(strings[-2:]))
            elif opcode.name in _INT_OPCODES:
                integers.append(int(argument))  # type: ignore[arg-type]
            elif opcode.name in _STRING_OPCODES:
                strings.append(str(argument))
    except (ValueError, EOFError) as exc:  # pickletools' errors for truncated or invalid pickles
        raise PayloadError(f"{where}: invalid pickle: {exc}") from None
    if globals_seen != allowed_globals:
        raise PayloadError(f"{where}: the pickle names {sorted(globals_seen)}, expected {sorted(allowed_globals)}")
    # The persistent id (..., numel) then the rebuild arguments: offset 0, shape, contiguous strides.
    expected = [math.prod(shape), 0, rows, hidden, hidden, 1]
    if integers != expected:
        raise PayloadError(
            f"{where}: the tensor is not a contiguous [{rows}, {hidden}] tensor at offset 0 "
            f"(its integers are {integers}, expected {expected})"
        )
    if "cpu" not in strings:
        raise PayloadError(f"{where}: the tensor's storage is not on the CPU")
