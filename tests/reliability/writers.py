"""Other jobs' writers for concurrency tests: a live one holding its temp, and a dead one's leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# Writer A: the real atomic_path, stopped between writing its temp and renaming it (a slow rename)
# until the test lets it go. It prints its temp's path once the temp is on disk.
_HELD_WRITER = """
import sys
from pathlib import Path
from wsi_pipeline.io import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(b"written by another job")
    print(tmp, flush=True)
    sys.stdin.readline()
print("renamed", flush=True)
"""


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))


class HeldWriter:
    """Another process writing `final` atomically, holding its temp until `finish()`."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.proc = subprocess.Popen([sys.executable, "-c", _HELD_WRITER, str(self.final)], cwd=REPO_ROOT,
                                     env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if not line:
            raise RuntimeError(f"held writer did not start: {self.proc.stderr.read()}")
        self.tmp = Path(line)
        assert self.tmp.exists() and self.tmp.parent == self.final.parent

    def finish(self) -> tuple[int, str]:
        """Let the writer rename; returns (exit code, stderr)."""
        out, err = self.proc.communicate("go\n", timeout=60)
        return self.proc.returncode, err

    def assert_finished(self) -> None:
        code, err = self.finish()
        assert code == 0, f"the other job's write failed:\n{err}"
        assert self.final.read_bytes() == b"written by another job"
        assert not self.tmp.exists()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def temp_name_of(final: Path, pid: int, host_tag: str | None = None, rand: str = "deadbeef") -> Path:
    """The temp name writer `pid` on `host_tag` (default: this machine) gives `final`."""
    from wsi_pipeline import io

    # (getattr: so that these tests also run, and fail on behaviour, against code without HOST_TAG)
    final = Path(final)
    host_tag = host_tag or getattr(io, "HOST_TAG", "00000000")
    return final.with_name(f"{final.stem}.tmp-{host_tag}-{pid}-{rand}{final.suffix}")


def leave_dead_temp(final: Path, *, directory: bool = False) -> Path:
    """What a killed writer of `final` leaves: its temp file (or temp folder), the pid gone."""
    tmp = temp_name_of(final, dead_pid())
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if directory:
        tmp.mkdir()
        (tmp / "partial.png").write_bytes(b"partial")
    else:
        tmp.write_bytes(b"partial")
    return tmp
