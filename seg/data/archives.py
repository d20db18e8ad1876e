"""Zip extraction for ``seg.data.prepare``, also from a download that stopped part way.

:func:`extract_zip` reads a complete archive through its central directory. An archive cut short (an interrupted
download) has none; it is then read member by member from the local headers at the front, and every member
that arrived whole (CRC checked) is extracted: a partial download is used as far as it goes.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Extracted", "extract_zip", "first_member", "safe_target"]

_LOCAL = b"PK\x03\x04"  # local file header signature
_DESCRIPTOR = b"PK\x07\x08"  # optional data-descriptor signature
_HEADER = struct.Struct("<4sHHHHHIIIHH")  # signature, version, flags, method, time, date, crc, sizes, name, extra
_CHUNK = 1 << 20


@dataclass
class Extracted:
    """What :func:`extract_zip` did: files written or kept, and whether the archive was cut short."""

    written: int = 0
    kept: int = 0  # already there with the same size
    truncated: bool = False
    top_level: tuple[str, ...] = ()  # top-level folders of the archive


def safe_target(out: Path, member: str) -> Path | None:
    """Where a zip member goes under ``out``, or None for macOS metadata; refuses paths leaving ``out``."""
    if member.startswith("__MACOSX/") or Path(member).name == ".DS_Store":
        return None
    target = (out / member).resolve()
    if not target.is_relative_to(out.resolve()):
        raise ValueError(f"zip member {member!r} would be written outside {out}: refusing to extract")
    return target


def _write(target: Path, chunks: Iterator[bytes]) -> None:
    """Write ``chunks`` to ``target`` through a temporary file, so an interruption leaves no half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with open(partial, "wb") as dst:
        for chunk in chunks:
            dst.write(chunk)
    partial.replace(target)


def extract_zip(zip_path: Path, out: Path, progress_every: int = 5000) -> Extracted:
    """Extract ``zip_path`` into ``out`` (files already there with the same size are kept).

    Raises:
        ValueError: the file is not a zip archive at all, or a member would leave ``out``.
    """
    result = Extracted()
    out.mkdir(parents=True, exist_ok=True)
    try:
        archive = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile:
        archive = None
    if archive is None:
        _extract_salvaged(zip_path, out, result)
    else:
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            print(f"extracting {len(members)} files from {zip_path} into {out}")
            for i, member in enumerate(members):
                target = safe_target(out, member.filename)
                if target is None:
                    continue
                if target.is_file() and target.stat().st_size == member.file_size:
                    result.kept += 1
                else:
                    with archive.open(member) as src:
                        _write(target, iter(lambda: src.read(_CHUNK), b""))
                    result.written += 1
                if (i + 1) % progress_every == 0:
                    print(f"  {i + 1}/{len(members)}")
            names = [m.filename for m in members]
        result.top_level = _tops(names)
    return result


def _tops(names: list[str]) -> tuple[str, ...]:
    return tuple(sorted({n.split("/")[0] for n in names if "/" in n} - {"__MACOSX"}))


def first_member(zip_path: Path) -> str | None:
    """The name of the first member of a zip archive, complete or cut short; None when it holds none."""
    with open(zip_path, "rb") as f:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:4] != _LOCAL:
            return None
        name_len = _HEADER.unpack(header)[9]
        return f.read(name_len).decode("utf-8", "replace")


def _extract_salvaged(zip_path: Path, out: Path, result: Extracted) -> None:
    """Extract the whole members at the front of an archive without a central directory."""
    with open(zip_path, "rb") as f:
        if f.read(4) != _LOCAL:
            raise ValueError(f"{zip_path} is not a zip file (no zip header at its start)")
        f.seek(0)
        print(f"warning: {zip_path} has no central directory (a download cut short?): extracting the members "
              "that arrived whole")
        names: list[str] = []
        for name, data in _local_members(f):
            names.append(name)
            if data is None or name.endswith("/"):
                continue
            target = safe_target(out, name)
            if target is None:
                continue
            if target.is_file() and target.stat().st_size == len(data):
                result.kept += 1
            else:
                _write(target, iter([data]))
                result.written += 1
    result.truncated = True
    result.top_level = _tops(names)
    print(f"  {result.written + result.kept} whole files found in {zip_path} before its end")


def _local_members(f: BinaryIO) -> Iterator[tuple[str, bytes | None]]:
    """(name, content) of each member from the local headers on, until the data ends or stops making sense;
    content None for a member whose method is not stored / deflated."""
    while True:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size or header[:4] != _LOCAL:
            return  # the central directory, or the end of what arrived
        _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len = _HEADER.unpack(header)
        name = f.read(name_len).decode("utf-8" if flags & 0x800 else "cp437")
        f.read(extra_len)
        streamed = bool(flags & 0x08)  # sizes follow the data in a descriptor
        if method == zipfile.ZIP_DEFLATED and streamed:
            data = _inflate_stream(f)
            if data is None:
                return
            crc = _read_descriptor(f)
            if crc is None:
                return
        elif streamed or method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            if streamed:
                return  # a stored member of unknown length: nothing after it can be found
            f.seek(csize, 1)
            yield name, None
            continue
        else:
            raw = f.read(csize)
            if len(raw) < csize:
                return  # cut inside this member
            try:
                data = raw if method == zipfile.ZIP_STORED else zlib.decompress(raw, -15)
            except zlib.error:
                return
            if len(data) != usize:
                return
        if zlib.crc32(data) != crc:
            return
        yield name, data


def _inflate_stream(f: BinaryIO) -> bytes | None:
    """Inflate one raw deflate stream from ``f``, leaving ``f`` just after it; None when it is cut short."""
    inflater = zlib.decompressobj(-15)
    parts: list[bytes] = []
    while not inflater.eof:
        chunk = f.read(64 * 1024)
        if not chunk:
            return None
        try:
            parts.append(inflater.decompress(chunk))
        except zlib.error:
            return None
    f.seek(-len(inflater.unused_data), 1)
    return b"".join(parts)


def _read_descriptor(f: BinaryIO) -> int | None:
    """The CRC of a data descriptor (with or without its signature; 32-bit sizes), or None when cut short."""
    first = f.read(4)
    if len(first) < 4:
        return None
    if first == _DESCRIPTOR:
        first = f.read(4)
    rest = f.read(8)
    if len(first) < 4 or len(rest) < 8:
        return None
    return struct.unpack("<I", first)[0]

