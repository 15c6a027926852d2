"""A real single-node Slurm on localhost for tests, from Debian's slurm-wlm and munge.

Installs nothing: `make test` installs the packages. State, spool, logs, pid files and
the munge socket live under one folder; the daemons run in the foreground as our
children and are torn down by pid. Facts measured on these machines: the daemons are up
in well under a second; proctrack/linuxproc with task/none needs no cgroups; a 2-CPU
node pends a 9-task job forever (PartitionConfig) unless it is declared with more CPUs
(SlurmdParameters=config_overrides).

    python tests/e2e/slurm_cluster.py DIR   # start one by hand; Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

DAEMONS = ("munged", "slurmctld", "slurmd")


def missing_tools() -> list[str]:
    return [t for t in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
            if shutil.which(t) is None and not os.path.exists(f"/usr/sbin/{t}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    def __init__(self, folder: str, cpus: int = 16):
        self.folder = os.path.abspath(folder)
        self.cpus = cpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = os.path.join(self.folder, "slurm.conf")
        # munged runs as the munge user, which cannot enter root's 0700 pytest folders:
        # its files go to a folder of its own under /tmp.
        self.munge_dir = tempfile.mkdtemp(prefix="pilot-munge-")
        self.munge_socket = os.path.join(self.munge_dir, "munge.socket")
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """Environment for sbatch/srun/scontrol (and the jobs they start)."""
        return dict(os.environ, SLURM_CONF=self.conf)

    def write_config(self) -> None:
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        d = self.folder
        lines = [
            "ClusterName=pilottest", f"SlurmctldHost={self.host}", "SlurmUser=root", "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}", "AuthType=auth/munge",
            # cred_expire also sets how long a requeued job waits before it may start again
            # (slurm.conf(5): default 120 s); the requeue test needs no such wait.
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log", f"SlurmdLogFile={d}/log/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=1",
            # The node claims more CPUs than the 2 it has, so 9-rank jobs can start.
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none",
            "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none",
            "KillWait=5", "InactiveLimit=0", "MinJobAge=600",
            # Job ids unique across test sessions on this machine: MPICH names its /dev/shm
            # segment after the PMI job id ("5.0"), and a segment left by a killed job of an
            # earlier session with the same id would hang the new job's MPI_Init.
            f"FirstJobId={1000 + (os.getpid() * 7919 + int(time.time())) % 4_000_000}",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN",
            f"PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        with open(self.conf, "w") as fh:
            fh.write("\n".join(lines) + "\n")

    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        self.write_config()
        log = open(os.path.join(self.folder, "log", "daemons.out"), "ab")
        # munged as the munge user (it refuses root), with its socket in our folder.
        os.chown(self.munge_dir, *_munge_ids())
        m = self.munge_dir
        self.procs["munged"] = subprocess.Popen(
            ["runuser", "-u", "munge", "--", _tool("munged"), "-F", f"--socket={self.munge_socket}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed", "--force"],
            stdout=log, stderr=log)
        _wait_for(lambda: os.path.exists(self.munge_socket), timeout, "munged socket")
        self.procs["slurmctld"] = subprocess.Popen([_tool("slurmctld"), "-D", "-i", "-f", self.conf],
                                                   stdout=log, stderr=log, env=self.env)
        self.procs["slurmd"] = subprocess.Popen([_tool("slurmd"), "-D", "-f", self.conf], stdout=log, stderr=log,
                                                env=self.env)
        _wait_for(self.node_idle, timeout, "the Slurm node to become idle", self)
        return self

    def node_idle(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}; see {self.folder}/log")
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=self.env)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def stop(self) -> None:
        # Let running jobs end while slurmd can still hear from their slurmstepd.
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--partition=debug"], env=self.env, capture_output=True, timeout=30)
            _wait_for(self.queue_empty, 30, "the queue to drain", raise_on_timeout=False)
        for name in reversed(DAEMONS):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self._kill_orphan_stepds()
        # runuser does not always pass SIGTERM on to munged: end it by its own pid file.
        try:
            with open(os.path.join(self.munge_dir, "munged.pid")) as fh:
                os.kill(int(fh.read().strip()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def queue_empty(self) -> bool:
        out = subprocess.run(["squeue", "-h"], capture_output=True, text=True, env=self.env)
        return out.returncode == 0 and not out.stdout.strip()

    def _kill_orphan_stepds(self) -> None:
        """slurmstepd processes of this cluster (they carry our SLURM_CONF) outlive slurmd."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    if not fh.read().startswith(b"slurmstepd"):
                        continue
                with open(f"/proc/{pid}/environ", "rb") as fh:
                    if marker not in fh.read().split(b"\0"):
                        continue
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "daemons.out"):
            path = os.path.join(self.folder, "log", name)
            if os.path.exists(path):
                with open(path, errors="replace") as fh:
                    out.append(f"--- {name}\n" + fh.read()[-3000:])
        return "\n".join(out)


def _munge_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("munge")
    return entry.pw_uid, entry.pw_gid


def _wait_for(check, timeout: float, what: str, cluster: LocalSlurm | None = None,
              raise_on_timeout: bool = True) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return
        time.sleep(0.2)
    if not raise_on_timeout:
        return
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}" +
                       (f"\n{cluster.logs()}" if cluster else ""))


if __name__ == "__main__":
    cluster = LocalSlurm(sys.argv[1] if len(sys.argv) > 1 else "/tmp/pilot-slurm").start()
    print(f"Slurm up: export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that `kill` tears the daemons down too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
