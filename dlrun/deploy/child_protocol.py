"""The frames between `dlrun.deploy.runtime.isolated_runner` (parent) and `dlrun.deploy.verify_child` (child).

The protocol is frames of a 1-byte tag, an 8-byte little-endian length and the payload:
    child -> parent  b"R" artifact loaded | b"O" an output (torch.save) | b"E" an error (JSON: type, message)
    parent -> child  b"I" an input batch (torch.save); the end of stdin ends the child.
Torch-free, so the parent and the child share it without importing each other.
"""

from __future__ import annotations

import json
import struct
from typing import BinaryIO

READY, OUTPUT, ERROR, INPUT = b"R", b"O", b"E", b"I"
_HEADER = struct.Struct("<cQ")


def send(stream: BinaryIO, tag: bytes, payload: bytes = b"") -> None:
    stream.write(_HEADER.pack(tag, len(payload)) + payload)
    stream.flush()


def receive(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    """The next (tag, payload), or None when the other side closed the stream (or died) before a whole frame."""
    header = stream.read(_HEADER.size)  # a buffered binary read returns short only at end of stream
    if len(header) < _HEADER.size:
        return None
    tag, size = _HEADER.unpack(header)
    payload = stream.read(size)
    return (tag, payload) if len(payload) == size else None


def error_payload(exc: BaseException) -> bytes:
    lines = str(exc).strip().splitlines()
    return json.dumps({"type": type(exc).__name__, "message": lines[0] if lines else type(exc).__name__}).encode()
