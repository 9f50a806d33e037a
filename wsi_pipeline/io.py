"""Small file utilities shared by every stage: atomic writes and stale-temp cleanup.

A file at its final path is complete: writers produce a temp file beside it and rename it into
place, so a killed run leaves only `*.tmp-*` files, which no reader trusts and reruns delete.

Temps belong to their writer. Jobs run in parallel in one folder (Snakemake, SLURM, two runs), so a
temp's name says who writes it: ``x.tmp-<host8>-<pid>-<rand8>.suffix`` (host8: a hash of this
machine and its pid namespace). `remove_stale_temps` deletes a temp only when its writer is
provably gone: same machine and that pid is not alive. A temp from another machine (shared file
system) or in a name we cannot parse (an older version's ``x.tmp-<rand8>.suffix``) cannot be
checked: it is left alone until it is older than `FOREIGN_TEMP_MAX_AGE_S` (24 h; a write never takes
that long, its mtime moves while it is written). A name in neither format is not a temp and is kept.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat as stat_module
import time
from pathlib import Path
from typing import Iterable, Iterator

TMP_MARK = ".tmp-"
FOREIGN_TEMP_MAX_AGE_S = 24 * 3600

# <host8>-<pid>-<rand8>; the pid part is bounded so a crafted name cannot overflow os.kill.
_TOKEN = r"(?P<host>[0-9a-f]{8})-(?P<pid>[1-9][0-9]{0,9})-[0-9a-f]{8}"
# What older versions wrote: <rand8> (atomic_path) and old-<rand8> (top-k folders moved aside).
_LEGACY_TOKEN = r"(?:old-)?[0-9a-f]{8}"
# A temp's whole name: stem, mark, token, then at most the one suffix Path.suffix gives. Names that
# do not fit (e.g. an output of a slide whose id merely contains ".tmp-") are not temps.
_TEMP_NAME = re.compile(r".+?" + re.escape(TMP_MARK) + f"(?:{_TOKEN}|{_LEGACY_TOKEN})" + r"(?:\.[^.]*)?$")


def _host_tag() -> str:
    """8 hex chars naming this machine and pid namespace: two containers that share a hostname
    but not their pids must not judge each other's pids."""
    ident = socket.gethostname()
    with contextlib.suppress(OSError):
        ident += "|" + os.readlink("/proc/self/ns/pid")
    return hashlib.sha256(ident.encode()).hexdigest()[:8]


HOST_TAG = _host_tag()


def writer_token() -> str:
    """`<host8>-<pid>-<rand8>`: who writes a temp (this process), plus randomness so that two
    temps of one writer never collide."""
    return f"{HOST_TAG}-{os.getpid()}-{secrets.token_hex(4)}"


def temp_path(final: str | os.PathLike) -> Path:
    """A fresh temp name beside `final`, owned by this process: ``stem.tmp-<token>.suffix``.

    The real suffix stays last (``x.coords.tmp-….h5``) so libraries that pick a format from the
    extension (Pillow, tifffile, h5py) still do. Also used for temp folders (top-k exports)."""
    final = Path(final)
    return final.with_name(f"{final.stem}{TMP_MARK}{writer_token()}{final.suffix}")


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process on this machine (a zombie counts as live: conservative)."""
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) is no probe on Windows: assume alive
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (OverflowError, ValueError, OSError):
        return True
    return True


def writer_is_gone(path: Path, now: float | None = None) -> bool:
    """Whether the process that writes temp `path` is provably gone (see the module docstring)."""
    match = _TEMP_NAME.fullmatch(path.name)
    if match is None:
        return False  # not a temp name at all
    if match.group("host") == HOST_TAG:
        return not pid_alive(int(match.group("pid")))
    # Another machine's temp, or an older version's without a writer: only age can tell.
    try:
        age_s = (time.time() if now is None else now) - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    return age_s > FOREIGN_TEMP_MAX_AGE_S


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        _give_default_mode(tmp)
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


def _umask() -> int:
    """The process umask, read without changing it where /proc says it (Linux), else by the
    set-and-restore idiom."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _give_default_mode(tmp: Path) -> None:
    """An output gets the mode any file created here gets (0666 less the umask: 0644 under umask
    022). Some writers make their file private (safetensors writes model.safetensors 0600), so
    group members could not read the models beside outputs they can read. A file the writer made
    *more* open (an executable) is left as it is."""
    with contextlib.suppress(OSError):
        st = os.stat(tmp)
        if not stat_module.S_ISREG(st.st_mode):
            return
        mode, want = st.st_mode & 0o777, 0o666 & ~_umask()
        if mode != want and mode & ~want == 0:
            os.chmod(tmp, want)


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


def _temp_names_of(final: Path) -> re.Pattern:
    """Exactly the temp names `temp_path(final)` makes (and older versions made) for `final`."""
    return re.compile(re.escape(final.stem + TMP_MARK) + f"(?:{_TOKEN}|{_LEGACY_TOKEN})"
                      + re.escape(final.suffix))


def remove_stale_temps(folder: str | os.PathLike, outputs: Iterable[str | os.PathLike] | None = None) -> int:
    """Delete temp files and folders in `folder` whose writer is gone; returns how many.

    Every stage calls this at start-up to clear what a killed run left. A live writer's temp is
    never touched, whichever job or run it belongs to. With `outputs` (final paths or names in
    `folder`), only the temps of exactly those outputs are considered: a per-slide clean-up of
    slide ``X`` never matches slide ``X.done``'s files."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    if outputs is None:
        wanted = [_TEMP_NAME]
    else:
        wanted = [_temp_names_of(folder / Path(o).name) for o in outputs]
    now = time.time()
    removed = 0
    for p in folder.iterdir():
        if TMP_MARK not in p.name or not any(w.fullmatch(p.name) for w in wanted):
            continue
        if not writer_is_gone(p, now):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed += 1
    return removed


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
