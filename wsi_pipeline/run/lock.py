"""One `wsi-pipeline run` per run folder.

Two runs on one RUN (say, for two cohorts) would start the same jobs twice and overwrite each other's
outputs, and Snakemake does not always notice. `wsi-pipeline run` therefore holds RUN/.wsi-pipeline.lock
for its whole duration: created atomically (O_CREAT|O_EXCL), a JSON record of its holder (pid, host,
start time, command), removed at the end, also on Ctrl-C or an error. A second run exits with code 1
naming the holder. A lock whose holder is provably gone (same machine, pid not alive; e.g. after
kill -9) is taken over with a warning; one from another machine is never taken over (its pid cannot
be checked there): the message says to delete the file once that run is known to be over.

Snakemake's own lock (RUN/.snakemake/locks/) outlives a killed run too, and the next run then stops
on a LockException. Once we hold our lock no other `wsi-pipeline run` works in RUN, so a leftover
Snakemake lock is removed with a warning, unless a Snakemake process still works in RUN (a run's
orphaned Snakemake, or one started by hand): then the run stops and names it. Dry runs take no lock.
The single-stage commands (tile, extract, …) take no lock either: the workflow's own jobs are those
commands, run while `run` holds the lock.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import secrets
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from ..io import HOST_TAG, pid_alive

log = logging.getLogger("wsi_pipeline")

LOCK_NAME = ".wsi-pipeline.lock"
SNAKEMAKE_LOCKS = Path(".snakemake") / "locks"
# A lock file with no readable record is one being written right now, unless it is this old: its
# writer died between creating and filling it (a few microseconds).
_UNWRITTEN_LOCK_MAX_AGE_S = 10.0
_TAKEOVER_GUARD_MAX_AGE_S = 60.0


class RunLockHeld(Exception):
    """RUN is in use by another run. Not a PipelineError: nothing is wrong with the inputs (exit 1)."""


@dataclass
class RunLock:
    path: Path
    token: str

    def release(self) -> None:
        """Remove the lock file if it is still ours (someone may have deleted and retaken it)."""
        holder = _read_lock(self.path)[0]
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
        elif self.path.exists():
            log.warning("%s no longer holds this run's record; left in place", self.path)


def describe(holder: dict) -> str:
    """'pid 123 on host node1, started 2026-01-02 03:04:05, command: wsi-pipeline run …'."""
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
            f"{holder.get('started', '?')}, command: {holder.get('command', '?')}")


def acquire(run_dir: str | os.PathLike, command: str) -> RunLock:
    """Take RUN's lock or raise RunLockHeld naming its holder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    token = secrets.token_hex(8)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "host_tag": HOST_TAG,
              "started": datetime.now().astimezone().isoformat(timespec="seconds"),
              "command": command, "token": token}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(record, indent=2) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            return RunLock(path, token)
        holder, text = _read_lock(path)
        if text is None:
            continue  # released between our attempt and the read: try again
        if not _holder_is_gone(holder, path):
            raise RunLockHeld(_held_message(run_dir, path, holder))
        log.warning("%s: taking over the lock of a run that is no longer running (%s)", run_dir,
                    describe(holder) if holder else "unreadable lock file")
        if not _remove_if_unchanged(path, text):
            time.sleep(0.05)  # another run is taking it over right now: see who won
    raise RunLockHeld(f"{run_dir}: another run is starting in this folder right now; try again")


def _read_lock(path: Path) -> tuple[dict | None, str | None]:
    """(record or None if unreadable, raw text or None if the file is gone)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except OSError as exc:  # e.g. another user's lock: held, by someone we cannot name
        return {"command": f"(lock file unreadable: {exc.strerror})"}, ""
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return None, text
    return (record if isinstance(record, dict) else None), text


def _holder_is_gone(holder: dict | None, path: Path) -> bool:
    if holder is None:
        try:
            return time.time() - path.stat().st_mtime > _UNWRITTEN_LOCK_MAX_AGE_S
        except FileNotFoundError:
            return False
    pid = holder.get("pid")
    if holder.get("host_tag") != HOST_TAG or not isinstance(pid, int) or pid <= 0:
        return False  # another machine's run: its pid means nothing here
    return not pid_alive(pid)


def _held_message(run_dir: Path, path: Path, holder: dict | None) -> str:
    if holder is None:
        return f"{run_dir} is in use: {path} is being written by another run starting now"
    message = (f"{run_dir} is in use by another `wsi-pipeline run`: {describe(holder)}. Wait for it to "
               f"finish or stop it")
    if holder.get("host_tag") != HOST_TAG:
        message += (f". It runs on another machine, where this one cannot check it: once it is over, "
                    f"delete {path}")
    else:
        message += " (a lock left by a run that is no longer running is taken over by itself)"
    return message


def _remove_if_unchanged(path: Path, stale_text: str) -> bool:
    """Delete the stale lock, unless another run replaced it meanwhile. Two runs may both find the
    same stale lock: a guard file lets one of them check-and-delete at a time."""
    guard = path.with_name(path.name + ".takeover")
    try:
        fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            if time.time() - guard.stat().st_mtime > _TAKEOVER_GUARD_MAX_AGE_S:
                guard.unlink()  # left by a process killed inside this function
        return False
    os.close(fd)
    try:
        if _read_lock(path)[1] == stale_text:
            path.unlink(missing_ok=True)
    finally:
        guard.unlink(missing_ok=True)
    return True


# --------------------------------------------------------------------------------------------
# Snakemake's lock
# --------------------------------------------------------------------------------------------


def live_snakemake_pids(run_dir: Path) -> list[int] | None:
    """Pids of Snakemake processes on this machine working in `run_dir` (by their --directory or
    working folder); None where that cannot be known (no /proc)."""
    proc = Path("/proc")
    if not (proc / "self" / "cmdline").exists():
        return None
    run_dir = run_dir.resolve()
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue
        if any("snakemake" in a for a in argv) and _works_in(entry, argv, run_dir):
            found.append(int(entry.name))
    return sorted(found)


def _works_in(entry: Path, argv: list[str], run_dir: Path) -> bool:
    try:
        cwd = Path(os.readlink(entry / "cwd"))
    except OSError:
        cwd = None  # another user's process: only an absolute --directory can name RUN
    directory = None
    for i, a in enumerate(argv):
        if a in ("--directory", "-d") and i + 1 < len(argv):
            directory = argv[i + 1]
        elif a.startswith("--directory="):
            directory = a.split("=", 1)[1]
    if directory is None:
        return cwd is not None and cwd == run_dir
    target = Path(directory)
    if not target.is_absolute():
        if cwd is None:
            return False
        target = cwd / target
    return Path(os.path.normpath(target)) == run_dir


def clear_stale_snakemake_locks(run_dir: str | os.PathLike) -> list[Path]:
    """Remove RUN/.snakemake/locks/* left by a killed run; call only while holding RUN's lock.
    Raises RunLockHeld if a Snakemake process still works in RUN."""
    run_dir = Path(run_dir)
    lock_dir = run_dir / SNAKEMAKE_LOCKS
    locks = sorted(p for p in lock_dir.glob("*.lock")) if lock_dir.is_dir() else []
    if not locks:
        return []
    live = live_snakemake_pids(run_dir)
    if live is None:
        log.warning("%s holds Snakemake locks and this system cannot show whether a Snakemake still runs "
                    "there; if none does, rerun with `-- --unlock` once, then again", lock_dir)
        return []
    if live:
        raise RunLockHeld(f"{run_dir}: Snakemake (pid {', '.join(map(str, live))}) still works in this folder, "
                          f"perhaps left by a run that was killed; wait for it to end or stop it")
    for p in locks:
        p.unlink(missing_ok=True)
    log.warning("%s: removed Snakemake's lock left by a run that was killed (%s)", run_dir,
                ", ".join(p.name for p in locks))
    return locks


def one_run_per_folder(cli):
    """Wrap `wsi-pipeline run`'s cli(args): hold RUN's lock around it (not for a dry run) and clear
    Snakemake's stale lock; a folder in use is exit code 1 with its holder named."""

    @functools.wraps(cli)
    def locked_cli(args) -> int:
        if getattr(args, "dry_run", False):
            return cli(args)
        run_dir = Path(args.out).resolve()
        created = not run_dir.exists()
        command = shlex.join(["wsi-pipeline", *sys.argv[1:]])
        try:
            lock = acquire(run_dir, command)
        except RunLockHeld as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        try:
            try:
                clear_stale_snakemake_locks(run_dir)
            except RunLockHeld as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            return cli(args)
        finally:
            lock.release()
            if created:  # a run stopped by a bad manifest or config leaves no empty RUN behind
                with contextlib.suppress(OSError):
                    run_dir.rmdir()

    return locked_cli
