"""Small file utilities shared by every stage: atomic writes and stale-temp cleanup.

A file at its final path is complete: writers produce a temp file beside it and rename it into
place, so a killed run leaves only `*.tmp-*` files, which no reader trusts and reruns delete.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Iterator

TMP_MARK = ".tmp-"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    The temp name keeps the real suffix last (``x.tmp-<id>.h5``) so libraries that pick a format
    from the extension (Pillow, tifffile) still do.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.stem}{TMP_MARK}{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            # A full disk fails in write()/close(), which name no file: name the output.
            raise OSError(exc.errno, exc.strerror, str(final)) from exc
        raise
    finally:
        # Never let a failing clean-up (read-only folder) hide the error that got us here.
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def write_csv_atomic(path: str | os.PathLike, header: list[str], rows: list[list]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            writer.writerows(rows)


def remove_stale_temps(folder: str | os.PathLike) -> int:
    """Delete temp files a killed run left behind in `folder`; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [p for p in folder.iterdir() if TMP_MARK in p.name and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


# Errors of the file system a run writes to, not of the data: one line says which file and why.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                            errno.ENAMETOOLONG})


def describe_os_error(exc: OSError) -> str:
    """'No space left on device: RUN/tiles/x.coords.h5' — the reason and the file, one line. A
    temp file is named by the output it was for, which is what the user knows."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    names = list(dict.fromkeys(_output_name(n) for n in (exc.filename, exc.filename2) if n))
    return f"{reason}: {' -> '.join(names)}" if names else reason


def _output_name(path) -> str:
    """`x.tmp-<id>.h5` -> `x.h5` (the final path an atomic writer's temp stands for)."""
    path = Path(os.fsdecode(path))
    if TMP_MARK not in path.name:
        return str(path)
    return str(path.with_name(path.name.split(TMP_MARK)[0] + path.suffix))


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()
