"""Which slide file an output was made from, so a rerun can tell an unchanged slide from a replaced one.

`SlideIdentity` is recorded in coords.h5 (and copied into features.h5) as attributes:

  slide_size_bytes        file size in bytes
  slide_mtime_ns          modification time (ns), for the record: not compared (see below)
  slide_fingerprint       "sha256-ht1m:<hex>": sha256 over the decimal size, a newline, the first
                          1 MiB and the last 1 MiB of the file (the whole file when it is <= 2 MiB)
  slide_level_dimensions  (L, 2) int64, (width, height) of every level in pixels

Two identities match when size, fingerprint and level dimensions are equal. The mtime is left out:
a copy, `touch` or a restore from backup changes it without changing a pixel, and redoing every
slide after a move would be costly for nothing. The fingerprint reads 2 MiB whatever the slide's
size: TIFF-family slides keep their directory (tile offsets, sizes, dimensions) in the first or last
bytes and a re-scan changes them, so a replaced slide is caught without reading gigabytes.
What it cannot see: an edit in place in the middle of the file that keeps the size and both ends
(no scanner or converter does this), and, for formats with companion files (MRXS data folders),
changes outside the file the manifest names.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FINGERPRINT_SCHEME = "sha256-ht1m"
_END_BYTES = 1 << 20  # 1 MiB from each end
ATTR_KEYS = ("slide_size_bytes", "slide_mtime_ns", "slide_fingerprint", "slide_level_dimensions")


@dataclass(frozen=True)
class SlideIdentity:
    size_bytes: int
    mtime_ns: int
    fingerprint: str
    level_dimensions: tuple[tuple[int, int], ...]

    def matches(self, other: "SlideIdentity") -> bool:
        """Same content as far as we can tell cheaply; mtime is not compared (module docstring)."""
        return (self.size_bytes == other.size_bytes and self.fingerprint == other.fingerprint
                and self.level_dimensions == other.level_dimensions)

    def difference(self, recorded: "SlideIdentity") -> str:
        """What differs from `recorded`, in words ('' when they match)."""
        parts = []
        if self.size_bytes != recorded.size_bytes:
            parts.append(f"size {recorded.size_bytes} -> {self.size_bytes} bytes")
        if self.level_dimensions != recorded.level_dimensions:
            parts.append(f"levels {_dims(recorded.level_dimensions)} -> {_dims(self.level_dimensions)}")
        if self.fingerprint != recorded.fingerprint and not parts:
            parts.append("content fingerprint differs")
        return ", ".join(parts)

    def to_attrs(self) -> dict:
        return {"slide_size_bytes": int(self.size_bytes), "slide_mtime_ns": int(self.mtime_ns),
                "slide_fingerprint": self.fingerprint,
                "slide_level_dimensions": np.asarray(self.level_dimensions, dtype=np.int64).reshape(-1, 2)}

    @classmethod
    def from_attrs(cls, attrs) -> "SlideIdentity | None":
        """The identity stored in HDF5 attrs, or None when the file predates it (or it is damaged)."""
        try:
            dims = np.asarray(attrs["slide_level_dimensions"], dtype=np.int64).reshape(-1, 2)
            fingerprint = attrs["slide_fingerprint"]
            if isinstance(fingerprint, bytes):
                fingerprint = fingerprint.decode()
            return cls(int(attrs["slide_size_bytes"]), int(attrs["slide_mtime_ns"]), str(fingerprint),
                       tuple((int(w), int(h)) for w, h in dims))
        except (KeyError, TypeError, ValueError):
            return None


def file_fingerprint(path: str | os.PathLike, size_bytes: int) -> str:
    """'sha256-ht1m:<hex>' of (size, first 1 MiB, last 1 MiB); reads at most 2 MiB."""
    digest = hashlib.sha256(f"{int(size_bytes)}\n".encode())
    with open(path, "rb") as fh:
        head = fh.read(min(size_bytes, _END_BYTES))
        digest.update(head)
        tail_start = max(len(head), size_bytes - _END_BYTES)  # no byte counted twice in small files
        if tail_start < size_bytes:
            fh.seek(tail_start)
            digest.update(fh.read(size_bytes - tail_start))
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def slide_identity(path: str | os.PathLike, level_dimensions) -> SlideIdentity:
    """Identity of the slide file at `path`, whose levels (as an open `Slide` reports them) are
    `level_dimensions`: ((width, height) px per level)."""
    stat = Path(path).stat()
    return SlideIdentity(stat.st_size, stat.st_mtime_ns, file_fingerprint(path, stat.st_size),
                         tuple((int(w), int(h)) for w, h in level_dimensions))


def _dims(level_dimensions) -> str:
    return "[" + ", ".join(f"{w}x{h}" for w, h in level_dimensions) + "]"
