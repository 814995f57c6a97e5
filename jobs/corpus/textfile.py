"""What the csv and jsonl formats share: reading a text file's lines (refusing a file that is
no UTF-8 text, by its first bytes), the block pyarrow infers types from, and what staging does
with a file pyarrow cannot read whole. Nothing here logs or raises with note text."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from .values import redact

INFER_BLOCK_BYTES = 16 << 20  # csv/jsonl block size; types are inferred from the first block
LINE_BYTES_MAX = 256 << 20  # a longer line (no line end) is refused: not a text file
_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32", b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16",
}  # fmt: skip


# What a file that is no text file starts with (after the decompression its extension asks
# for), and what to do about it.
_MAGIC = {
    b"PK\x03\x04": "a zip archive (an .xlsx workbook is one too): unzip it or export it as CSV",
    b"\x1f\x8b": "gzip data: name it ...gz so it is decompressed",
    b"\x28\xb5\x2f\xfd": "zstd data: name it ...zst so it is decompressed",
    b"BZh": "bzip2 data: name it ...bz2 so it is decompressed",
    b"\xfd7zXZ\x00": "xz data, which is not read: recompress it as .gz or .zst",
    b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive: extract it",
    b"PAR1": "a Parquet file: set corpus.format: parquet",
    b"\xd0\xcf\x11\xe0": "an old Excel/Office file: export it as CSV",
}


def lines(stream: Any, path: str) -> Iterator[bytes]:
    """A text file's lines (without line ends; a UTF-8 byte-order mark dropped), read as they
    are needed. ValueError for a UTF-16/32 file (named by its byte-order mark), for a file
    that is an archive, compressed or Parquet (by its first bytes, `_MAGIC`), and for a line
    longer than LINE_BYTES_MAX."""
    chunk = b""
    while len(chunk) < 8 and (more := stream.read(64 << 10)):
        chunk += more
    for bom, encoding in _BOMS.items():
        if chunk.startswith(bom):
            raise ValueError(
                f"{path}: the file is {encoding} (its byte-order mark says so), not UTF-8: "
                f"convert it, e.g. iconv -f {encoding} -t UTF-8"
            )
    for magic, what in _MAGIC.items():
        bzip2 = magic == b"BZh" and chunk[3:4].isdigit()  # "BZh" + block size digit
        if chunk.startswith(magic) and (magic != b"BZh" or bzip2):
            raise ValueError(f"{path}: not a text file but {what}")
    chunk = chunk.removeprefix(b"\xef\xbb\xbf")
    line = bytearray()
    while chunk:
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            line += chunk[start:end]
            yield bytes(line).rstrip(b"\r")
            line.clear()
            start = end + 1
        line += chunk[start:]
        if len(line) > LINE_BYTES_MAX:
            raise ValueError(f"{path}: a line longer than {LINE_BYTES_MAX >> 20} MiB")
        chunk = stream.read(64 << 10)
    if line:
        yield bytes(line).rstrip(b"\r")


class StartOver(ValueError):
    """A file pyarrow cannot read whole (a JSONL line that is not JSON, a CSV row of more or
    fewer fields than the header): a format's `batches` raises it, with the message that
    refuses the file and `batches`, the file read again with each such row an error row.
    Staging drops what it wrote of the file and writes those instead."""

    def __init__(self, message: str, batches: Iterator[pa.RecordBatch]):
        super().__init__(message)
        self.batches = batches


def unreadable(path: str, fmt: str, error: Exception) -> ValueError:
    """The error for a file pyarrow cannot read as `fmt`, without pyarrow's quote of its data
    (raise it `from None`: pyarrow's own message may quote the row, i.e. note text)."""
    hint = ""
    if "conversion error" in str(error):
        hint = " (types are inferred from the first 16 MiB: pin them with corpus.csv.column_types)"
    return ValueError(f"{path}: cannot read as {fmt}: {redact(error)}{hint}")
