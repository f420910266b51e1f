"""A real SLURM cluster on localhost for the launcher tests: munged + slurmctld + N slurmd (node1..nodeN).

No systemd: the daemons run in the background from one temp dir and are stopped by the PIDs in their pid files.
Several slurmd on one host emulate a multi-node cluster; the node names do not resolve, so jobs that need
MASTER_ADDR use 127.0.0.1. Facts behind the settings: ../shared/docs/SLURM.md.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def missing_binaries() -> List[str]:
    return [b for b in DAEMONS if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]


def _free_ports(n: int) -> List[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """Start with ``start()``, stop with ``stop()``; ``env`` is what every Slurm client call needs."""

    def __init__(self, nodes: int = 2, cpus: int = 2):
        self.nodes, self.cpus = nodes, cpus
        self.dir = tempfile.mkdtemp(prefix="slurm-test-")
        os.chmod(self.dir, 0o755)  # slurmd's job steps (root) and munged check their paths
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=self.conf)
        self.pid_files: List[str] = []

    # ---- lifecycle ----
    def start(self, timeout: float = 30.0) -> None:
        try:
            self._start_munge()
            self._write_conf()
            self._daemon([_exe("slurmctld")], "slurmctld.pid")
            for i in range(1, self.nodes + 1):
                self._daemon([_exe("slurmd"), "-N", f"node{i}"], f"slurmd-node{i}.pid")
            self._wait_idle(timeout)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        # read every pid first: daemons delete their pid file as they exit
        pids = [pid for pid in (self._pid(p) for p in reversed(self.pid_files)) if pid]
        for pid in pids:  # slurmd, slurmctld, then munged
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.time() + 10
            while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
                time.sleep(0.05)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- client helpers ----
    def run(self, *cmd: str, check: bool = True) -> str:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def job(self, job_id: str) -> Dict[str, str]:
        """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, NodeList, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_state(self, job_id: str, states, timeout: float) -> Dict[str, str]:
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.5)

    def wait_done(self, job_id: str, timeout: float) -> Dict[str, str]:
        return self.wait_state(job_id, FINAL_STATES, timeout)

    def log_tail(self, n: int = 2000) -> str:
        text = ""
        for name in sorted(os.listdir(self.dir)):
            if name.endswith(".log"):
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    text += f"\n--- {name}\n" + f.read()[-n:]
        return text

    # ---- internals ----
    def _start_munge(self) -> None:
        key = os.path.join(self.dir, "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o400)
        self.munge_socket = os.path.join(self.dir, "munge.sock")
        self._daemon([_exe("munged"), f"--key-file={key}", f"--socket={self.munge_socket}",
                      f"--pid-file={self._path('munged.pid')}", f"--log-file={self._path('munged.log')}",
                      f"--seed-file={self._path('munged.seed')}", "--force"], "munged.pid", own_pid_flag=True)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        host = socket.gethostname().split(".")[0]
        d = self.dir
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(d, sub), exist_ok=True)
        lines = [
            "ClusterName=pipelinetest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log",
            f"SlurmdLogFile={d}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SlurmdParameters=config_overrides",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={d}/jobcomp.txt",
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "CommunicationParameters=NoCtldInAddrAny,NoInAddrAny",
            "ReturnToService=2",
            "MinJobAge=600",
            "KillWait=5",
            "InactiveLimit=0",
        ]
        for i, port in enumerate(node_ports, 1):
            lines.append(f"NodeName=node{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
                         "RealMemory=1024 State=UNKNOWN")
        lines.append(f"PartitionName=test Nodes=node[1-{self.nodes}] Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    def _daemon(self, cmd: List[str], pid_file: str, own_pid_flag: bool = False) -> None:
        """Start a daemon that forks into the background and writes its own pid file; wait for that file."""
        path = self._path(pid_file)
        self.pid_files.append(path)
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30)
        if done.returncode:
            raise RuntimeError(f"{cmd[0]} failed to start: {done.stderr.strip()}{self.log_tail()}")
        deadline = time.time() + 10
        while not self._pid(path):
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[0]} wrote no pid file {path}{self.log_tail()}")
            time.sleep(0.05)

    @staticmethod
    def _pid(path: str) -> Optional[int]:
        try:
            with open(path) as f:
                text = f.read().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == self.nodes and all(s == "idle" for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"nodes not idle after {timeout:.0f} s: {out!r}{self.log_tail()}")
