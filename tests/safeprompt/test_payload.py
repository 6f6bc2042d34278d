"""vLLM's prompt_embeds payload checked as bytes, without unpickling (safeprompt/payload.py)."""

from __future__ import annotations

import io
import pickle
import zipfile

import pytest
import torch

from safeprompt.payload import PayloadError, check_payload
from safeprompt.torch_payload import TORCH_DTYPES, payload_bytes


@pytest.mark.parametrize("dtype", sorted(TORCH_DTYPES))
def test_a_saved_tensor_passes_and_round_trips(dtype: str) -> None:
    tensor = torch.randn(5, 24)
    data = payload_bytes(tensor, dtype)
    check_payload(data, dtype=dtype, shape=(5, 24), where="p")
    loaded = torch.load(io.BytesIO(data), weights_only=True)
    assert loaded.dtype == TORCH_DTYPES[dtype] and torch.equal(loaded, tensor.to(TORCH_DTYPES[dtype]))


@pytest.mark.parametrize(("dtype", "shape", "message"), [
    ("bfloat16", (5, 24), "expected.*BFloat16Storage"),  # a float32 payload is not a bf16 one
    ("float32", (24, 5), "not a contiguous \\[24, 5\\]"),
    ("float32", (4, 24), "not a contiguous \\[4, 24\\]"),
])
def test_a_payload_of_another_dtype_or_shape_is_refused(dtype: str, shape: tuple[int, int], message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        check_payload(payload_bytes(torch.randn(5, 24), "float32"), dtype=dtype, shape=shape, where="p")


def test_a_view_with_a_larger_storage_is_refused() -> None:
    big = torch.randn(10, 8)
    buffer = io.BytesIO()
    torch.save(big[2:4], buffer)  # torch.save writes the whole storage and an offset
    with pytest.raises(PayloadError, match="not a contiguous"):
        check_payload(buffer.getvalue(), dtype="float32", shape=(2, 8), where="p")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    tensor = torch.randn(3, 8)
    tensor[1, 5] = value
    for dtype in TORCH_DTYPES:
        with pytest.raises(PayloadError, match="NaN or Inf"):
            check_payload(payload_bytes(tensor, dtype), dtype=dtype, shape=(3, 8), where="p")


def _archive(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _entries(tensor: torch.Tensor) -> dict[str, bytes]:
    archive = zipfile.ZipFile(io.BytesIO(payload_bytes(tensor, "float32")))
    return {name: archive.read(name) for name in archive.namelist()}


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("true",))


def test_a_pickle_naming_any_other_global_is_refused() -> None:
    entries = _entries(torch.randn(2, 4))
    entries["archive/data.pkl"] = pickle.dumps(_Exploit(), protocol=2)
    with pytest.raises(PayloadError, match="posix system|os system"):
        check_payload(_archive(entries), dtype="float32", shape=(2, 4), where="p")


def test_a_dict_of_tensors_is_not_a_tensor() -> None:
    buffer = io.BytesIO()
    torch.save({"soft": torch.randn(2, 4)}, buffer)
    with pytest.raises(PayloadError):
        check_payload(buffer.getvalue(), dtype="float32", shape=(2, 4), where="p")


@pytest.mark.parametrize("damage", ["truncate", "big-endian", "second-record", "short-record", "not-zip"])
def test_damaged_archives_are_refused(damage: str) -> None:
    entries = _entries(torch.randn(2, 4))
    if damage == "truncate":
        data = payload_bytes(torch.randn(2, 4), "float32")[:300]
    elif damage == "not-zip":
        data = b"\x80\x02}q\x00."
    else:
        if damage == "big-endian":
            entries["archive/byteorder"] = b"big"
        elif damage == "second-record":
            entries["archive/data/1"] = b"\0" * 32
        else:
            entries["archive/data/0"] = entries["archive/data/0"][:-4]
        data = _archive(entries)
    with pytest.raises(PayloadError):
        check_payload(data, dtype="float32", shape=(2, 4), where="p")
