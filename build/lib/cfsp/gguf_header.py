"""Read one metadata value from a GGUF file's header, without touching its tensors.

gguf's own GGUFReader parses every metadata array element by element; a 262k-token vocabulary
(Gemma 3) takes it tens of seconds, so `cfsp.models` reads just the key/value section here and
stops at the key it wants (llama.cpp writes `general.architecture` first).

Layout (little-endian, GGUF v2/v3): magic "GGUF", version u32, tensor count u64, kv count u64,
then per key: key (u64 length + utf-8), value type u32, value. A string is u64 length + bytes;
an array is element type u32, count u64, elements.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

# value type -> struct format of the scalar (8 = string, 9 = array are handled apart)
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def _read(handle: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = handle.read(size)
    if len(data) != size:
        raise ValueError("file ends inside its metadata")
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    length = _read(handle, "<Q")
    data = handle.read(length)
    if len(data) != length:
        raise ValueError("file ends inside its metadata")
    return data.decode("utf-8", errors="replace")


def _skip(handle: BinaryIO, value_type: int) -> None:
    if value_type == _STRING:
        handle.seek(_read(handle, "<Q"), 1)
    elif value_type == _ARRAY:
        element_type, count = _read(handle, "<I"), _read(handle, "<Q")
        if element_type in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[element_type]) * count, 1)
        else:
            for _ in range(count):
                _skip(handle, element_type)
    elif value_type in _SCALARS:
        handle.seek(struct.calcsize(_SCALARS[value_type]), 1)
    else:
        raise ValueError(f"unknown metadata value type {value_type}")


def read_string(path: str | Path, key: str) -> str | None:
    """The string value of `key` in the GGUF metadata of `path`, or None if it is absent.

    Raises ValueError if the file is not a GGUF file or its metadata is malformed.
    """
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError("no GGUF magic at the start of the file")
        version = _read(handle, "<I")
        if version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        _read(handle, "<Q")  # tensor count
        for _ in range(_read(handle, "<Q")):
            name = _string(handle)
            value_type = _read(handle, "<I")
            if name == key and value_type == _STRING:
                return _string(handle)
            _skip(handle, value_type)
    return None
