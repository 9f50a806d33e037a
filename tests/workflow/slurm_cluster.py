"""A throwaway one-node SLURM cluster for tests (recipe: Debian's slurm 22.05 + munge, run as root, no
systemd; see `make slurm-deps`).

`OneNodeCluster(folder).start()` writes slurm.conf into `folder`, links it at /etc/slurm/slurm.conf,
starts munged (unless one already runs), slurmctld and slurmd in the foreground as child processes,
and waits until the node is idle. `stop()` cancels what is left in the queue and stops exactly the
processes it started (SIGTERM, a bounded wait, then SIGKILL), and removes the link it made.

The node mirrors the slurm profile's partitions (`cpu` and `gpu`, both on this one node) so that
`--profile slurm` runs unchanged: it declares more CPUs and memory than a CI box has
(`SlurmdParameters=config_overrides`, meant for tests) and four stand-in GPUs (empty files as
devices), because the profile asks for 8 CPUs, 32 GB and a GPU per extract/train job. Nothing
enforces those numbers (no cgroups); the jobs run on the CPU, as a test run passes no `--gpu`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Global on a machine: the path every SLURM client reads (the jobstep plugin strips SLURM_CONF before
# its inner srun), and the daemons' ports. Hence one test cluster at a time.
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")
PORTS = (6817, 6818)
PROGRAMS = ("slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel", "srun", "munged", "runuser")
MUNGE_SOCKET_DIR = Path("/run/munge")
N_GPUS = 4  # so that a few slides' extract jobs (one GPU each in the profile) run side by side

CONF = """\
ClusterName=wsitest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# The profile reads job states with squeue: a finished job must stay listed well beyond
# 3 x slurm-init-seconds-before-status-checks, or the plugin falls back to sacct.
MinJobAge=300
NodeName={host} CPUs=32 RealMemory=256000 Gres=gpu:{n_gpus} State=UNKNOWN
PartitionName=cpu Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
"""


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if shutil.which(p) is None and not Path("/usr/sbin", p).exists()]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def why_not_here() -> str | None:
    """None when a test cluster can start on this machine, else the reason it cannot."""
    missing = missing_programs()
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}): run `make slurm-deps` as root "
                "(apt-get install --no-install-recommends slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        return "the test SLURM cluster runs its daemons as root and links /etc/slurm/slurm.conf: not root"
    if SYSTEM_CONF.is_symlink() and not SYSTEM_CONF.exists() and not any(port_in_use(p) for p in PORTS) \
            and os.readlink(SYSTEM_CONF).startswith(tempfile.gettempdir() + os.sep):
        # A link into a temporary test folder that is gone (a test killed before its teardown), and
        # no daemon listening: nothing live owns it.
        SYSTEM_CONF.unlink()
    if SYSTEM_CONF.exists() or SYSTEM_CONF.is_symlink():
        return f"{SYSTEM_CONF} exists: another SLURM cluster is configured on this machine"
    busy = [p for p in PORTS if port_in_use(p)]
    if busy:
        return f"SLURM ports {busy} are in use: another SLURM cluster is running on this machine"
    return None


def _stop(proc: subprocess.Popen | None, wait_s: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=wait_s)


class ClusterUnavailable(RuntimeError):
    """Another cluster took the machine-wide config path between the check and the start."""


class OneNodeCluster:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.host = socket.gethostname().split(".")[0]  # NodeName must equal `hostname -s`
        self.conf = self.folder / "slurm.conf"
        self.ctld: subprocess.Popen | None = None
        self.slurmd: subprocess.Popen | None = None
        self.munged_pid: int | None = None  # set only when this cluster started munged
        self.linked = False

    def log(self, name: str) -> str:
        path = self.folder / "log" / name
        return path.read_text(errors="replace")[-3000:] if path.is_file() else ""

    def start(self, timeout_s: float = 30.0) -> None:
        d = self.folder
        for sub in ("state", "log", f"spool/{self.host}"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(CONF.format(host=self.host, d=d, n_gpus=N_GPUS))
        # Stand-in GPUs: slurmd counts a GPU per device file named in gres.conf, which it reads beside the
        # slurm.conf it was started with (SLURM_CONF below). Nothing opens them: the jobs run on CPU.
        for i in range(N_GPUS):
            (d / f"fake-gpu{i}").touch()
        (d / "gres.conf").write_text(f"NodeName={self.host} Name=gpu File={d}/fake-gpu[0-{N_GPUS - 1}]\n")
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.symlink(self.conf, SYSTEM_CONF)
        except FileExistsError:
            raise ClusterUnavailable(f"{SYSTEM_CONF} appeared: another SLURM cluster is starting here") from None
        self.linked = True
        try:
            self._start_munge()
            env = {**os.environ, "SLURM_CONF": str(self.conf)}
            with open(d / "log" / "daemons.out", "ab") as out:
                self.ctld = subprocess.Popen(["slurmctld", "-D", "-i"], stdout=out, stderr=out,
                                             stdin=subprocess.DEVNULL, env=env)
                self.slurmd = subprocess.Popen(["slurmd", "-D"], stdout=out, stderr=out,
                                               stdin=subprocess.DEVNULL, env=env)
            self._wait_idle(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _start_munge(self) -> None:
        if (MUNGE_SOCKET_DIR / "munge.socket.2").exists() and \
                subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a working munged is already there: use it, and leave it running
        MUNGE_SOCKET_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET_DIR, "munge", "munge")
        # munged refuses to run as root; it daemonizes and writes its pid file.
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"], check=True,
                       capture_output=True, timeout=30)
        pidfile = MUNGE_SOCKET_DIR / "munged.pid"
        deadline = time.monotonic() + 10
        while not pidfile.is_file() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.munged_pid = int(pidfile.read_text().strip())

    def _wait_idle(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        states = ""
        while time.monotonic() < deadline:
            for name, proc in (("slurmctld", self.ctld), ("slurmd", self.slurmd)):
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name + '.log')}"
                                       f"\n{self.log('daemons.out')}")
            r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
            states = r.stdout.split()
            if states and all(s == "idle" for s in states):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the SLURM node is not idle after {timeout_s:.0f} s (sinfo: {states}):\n"
                           f"{self.log('slurmctld.log')}\n{self.log('slurmd.log')}")

    def stop(self, wait_s: float = 10.0) -> None:
        # Jobs first: their steps outlive slurmd under proctrack/linuxproc.
        if self.ctld is not None and self.ctld.poll() is None:
            subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True, timeout=10)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                r = subprocess.run(["squeue", "-h", "-t", "PD,R,CG,CF,S"], capture_output=True, text=True,
                                   timeout=10)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.2)
        _stop(self.slurmd, wait_s)
        _stop(self.ctld, wait_s)
        if self.munged_pid is not None:
            _kill_pid(self.munged_pid, wait_s)
            self.munged_pid = None
        if self.linked and SYSTEM_CONF.is_symlink() and os.readlink(SYSTEM_CONF) == str(self.conf):
            SYSTEM_CONF.unlink()
        self.linked = False


def _kill_pid(pid: int, wait_s: float) -> None:
    """SIGTERM, a bounded wait, then SIGKILL for a process this module started (not a child)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
