"""Text files users hand us (training data, texts to classify): UTF-8, or a clear error.

Kept free of torch so that commands which need none (``predict`` on an ONNX bundle) can
read their input without it.
"""

from __future__ import annotations

from pathlib import Path

from savepoints.errors import DataFileError


def decode_utf8(data: bytes, path: Path) -> str:
    """``data`` as text (a UTF-8 byte order mark is dropped), or a :class:`DataFileError`
    naming the line of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataFileError(
            path,
            f"it is not UTF-8 text (byte 0x{data[e.start]:02x} cannot be decoded)",
            "Save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > NEW_FILE, with "
            "the encoding it is in now instead of latin1).",
            line=data.count(b"\n", 0, e.start) + 1,
        ) from None


def non_blank_lines(data: bytes, source: Path) -> list[str]:
    """The lines of ``data`` that hold more than white space."""
    return [line for line in decode_utf8(data, source).splitlines() if line.strip()]
