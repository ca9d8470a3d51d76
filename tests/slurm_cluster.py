"""A throwaway single-node Slurm cluster (munged, slurmctld, slurmd) for system tests.

Everything the daemons write (config, state, spool, pid and log files, the munge key and socket)
lives under one directory, and the daemons listen on free ports, so the cluster never touches a
Slurm or MUNGE installation already configured on the machine. It must run as root: slurmd starts
jobs as the submitting user.

Usage::

    with SlurmCluster(tmp_path / "slurm", gpus=2) as cluster:
        subprocess.run(["sbatch", "--wrap", "true"], env=cluster.env())
        jobs = cluster.jobs()
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

DAEMONS = ("munged", "slurmctld", "slurmd")
# Linux's limit on a unix socket path (sun_path is 108 bytes, NUL included).
MAX_SOCKET_PATH = 107


class SlurmError(RuntimeError):
    """A Slurm command failed; the message is one line that says why."""


class SlurmStartError(SlurmError):
    """The cluster could not be started; the message is one line that says why."""


@dataclass(frozen=True)
class SlurmJob:
    """What a test checks about one Slurm job, as ``squeue --json`` reports it."""

    job_id: int
    name: str
    partition: str
    state: str
    comment: str
    tres_per_job: str
    tres_per_node: str
    exit_code: int | None
    tres_req: str = ""
    """What the job asked for, e.g. ``cpu=1,mem=2000M,node=1,billing=1,gres/gpu=1``."""

    @property
    def cpus(self) -> int:
        """CPUs the job requested."""
        match = re.search(r"(?:^|,)cpu=(\d+)", self.tres_req)
        return int(match[1]) if match else 0

    @property
    def mem_mb(self) -> float:
        """Memory the job requested, in MB."""
        match = re.search(r"(?:^|,)mem=([\d.]+)([KMGT]?)", self.tres_req)
        if not match:
            return 0.0
        scale = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024 * 1024}[match[2]]
        return float(match[1]) * scale

    @property
    def rule(self) -> str | None:
        """The Snakemake rule of a job submitted by snakemake-executor-plugin-slurm, else None.

        The plugin writes ``rule_<rule>`` or ``rule_<rule>_wildcards_<wildcards>`` into the job's
        comment; rule names may themselves contain underscores.
        """
        if not self.comment.startswith("rule_"):
            return None
        return self.comment.removeprefix("rule_").split("_wildcards_", 1)[0]


class SlurmCluster:
    """A single-node Slurm cluster whose files all live under ``root``.

    The node declares the machine's real CPUs (from ``slurmd -C``), so jobs run as many at a time
    as there are cores, and stand-in GPUs (GRES backed by /dev/null and /dev/zero) so that
    ``--gpus`` requests are scheduled without a GPU. Each partition holds the same node; the
    first one is the default.

    Args:
        root: Directory for every file the cluster writes (created; should be empty).
        partitions: Partition names; the first is ``Default=YES``.
        gpus: GPUs the node declares (``Gres=gpu:N``); at most two, see ``_gres_conf``.
        memory_mb: RealMemory the node declares. None: the machine's, from ``slurmd -C``. A
            larger value is declared through ``SlurmdParameters=config_overrides``.
        min_job_age: Seconds finished jobs stay visible to ``squeue`` and ``scontrol``.
    """

    def __init__(
        self,
        root: Path,
        partitions: Sequence[str] = ("debug", "gpu"),
        gpus: int = 1,
        memory_mb: int | None = None,
        min_job_age: int = 3600,
    ) -> None:
        if not partitions:
            raise ValueError("at least one partition is needed")
        if not 0 <= gpus <= 2:
            raise ValueError("the node can declare 0, 1 or 2 GPUs")
        self.root = Path(root).resolve()
        self.partitions = tuple(partitions)
        self.gpus = gpus
        self.memory_mb = memory_mb
        self.min_job_age = min_job_age
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.log_dir = self.root / "log"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.bin_dir = self.root / "bin"
        self._procs: dict[str, subprocess.Popen] = {}

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment in which Slurm commands, and jobs' own ``srun``, use this cluster.

        Inherited ``SLURM_*`` variables are dropped: inside a CI job that itself runs under
        Slurm they would describe the outer allocation and mislead sbatch and the executor.
        ``PATH`` starts with the cluster's ``bin``, whose ``srun`` sets ``SLURM_CONF`` itself:
        snakemake-executor-plugin-slurm-jobstep removes every ``SLURM_*`` variable but the job's
        identity before the ``srun`` that runs a job's step, and without ``SLURM_CONF`` srun
        looks for a config at the default path or through DNS, where this cluster has none.

        Args:
            base: Environment to start from; default ``os.environ``.

        Returns:
            ``base`` without ``SLURM_*``, with ``SLURM_CONF`` set to this cluster's config and
            the cluster's ``bin`` first on ``PATH``.
        """
        source = os.environ if base is None else base
        env = {k: v for k, v in source.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([str(self.bin_dir), env.get("PATH", os.defpath)])
        return env

    def start(self, timeout: float = 60.0) -> None:
        """Start munged, slurmctld and slurmd, and wait until the node is idle.

        Args:
            timeout: Seconds to wait for the node to become idle.

        Raises:
            SlurmStartError: Not root, a daemon is missing or exited, or the node did not become
                idle in time. Whatever was started has been stopped again.
        """
        if os.geteuid() != 0:
            raise SlurmStartError("a Slurm cluster needs root (slurmd runs jobs as their user)")
        missing = [
            cmd for cmd in (*DAEMONS, "sbatch", "srun", "sinfo", "squeue") if not shutil.which(cmd)
        ]
        if missing:
            raise SlurmStartError(f"not on PATH: {', '.join(missing)}")
        if len(os.fsencode(self.munge_socket)) > MAX_SOCKET_PATH:
            raise SlurmStartError(f"path too long for a unix socket: {self.munge_socket}")
        try:
            self._write_files()
            self._start_munged()
            self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
            self._wait_idle(timeout)
        except SlurmError as err:
            self.stop()
            raise SlurmStartError(str(err)) from err
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel every job, then stop the daemons (slurmd, slurmctld, munged).

        Safe to call more than once and after a partial start; never raises for a daemon that
        is already gone.

        Args:
            timeout: Seconds to wait for cancelled jobs to end and for each daemon to exit.
        """
        if self._alive("slurmctld"):
            self._cancel_all(timeout)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def jobs(self) -> list[SlurmJob]:
        """Every job slurmctld still knows, finished ones included (up to ``min_job_age``).

        Returns:
            The jobs in submission order.

        Raises:
            SlurmError: ``squeue`` failed, e.g. because slurmctld is not running.
        """
        out = self._run(["squeue", "--json"]).stdout
        jobs = []
        for raw in json.loads(out)["jobs"]:
            state = raw["job_state"]
            # 22.05 reports a string; 23.02 and later a list of flags, the base state first.
            state = state if isinstance(state, str) else state[0]
            exit_code = raw.get("exit_code")
            if isinstance(exit_code, dict):  # 23.02+: {"status": [...], "return_code": ...}
                exit_code = exit_code.get("return_code")
                exit_code = exit_code.get("number") if isinstance(exit_code, dict) else exit_code
            jobs.append(
                SlurmJob(
                    job_id=int(raw["job_id"]),
                    name=raw.get("name") or "",
                    partition=raw.get("partition") or "",
                    state=state,
                    comment=raw.get("comment") or "",
                    tres_per_job=raw.get("tres_per_job") or "",
                    tres_per_node=raw.get("tres_per_node") or "",
                    exit_code=exit_code,
                    tres_req=raw.get("tres_req_str") or "",
                )
            )
        return sorted(jobs, key=lambda job: job.job_id)

    def log_tails(self, lines: int = 20) -> str:
        """The last lines of each daemon's log, for a failure message."""
        parts = []
        for name in DAEMONS:
            # In the foreground slurmctld and slurmd log the same lines to .out as to .log.
            candidates = [self.log_dir / f"{name}.log", self.log_dir / f"{name}.out"]
            path = next((p for p in candidates if p.exists() and p.stat().st_size), None)
            if path is not None:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    def _write_files(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        ctld_port, slurmd_port = _free_ports(2)
        node = self._node_hardware()
        config_overrides = False
        if self.memory_mb is not None:
            config_overrides = self.memory_mb > int(node.get("RealMemory", "0"))
            node["RealMemory"] = str(self.memory_mb)
        node_line = " ".join(f"{k}={v}" for k, v in node.items())
        if self.gpus:
            node_line += f" Gres=gpu:{self.gpus}"
        lines = [
            "ClusterName=agentprune-test",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # Our own munged: a socket in root keeps a system munged (if any) out of it.
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.log_dir / 'slurmctld.log'}",
            f"SlurmdLogFile={self.log_dir / 'slurmd.log'}",
            # No cgroups: they need a systemd-style hierarchy that containers rarely delegate.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SelectType=select/cons_tres",
            # Cores are consumable, memory is not: jobs still need --mem <= RealMemory.
            "SelectTypeParameters=CR_Core",
            # Finished jobs stay in slurmctld for squeue-based status checks and the test's own.
            f"MinJobAge={self.min_job_age}",
            "ReturnToService=2",
        ]
        if config_overrides:
            # slurmd would otherwise register the machine's smaller memory and the node would be
            # drained as "Low RealMemory". Memory is not consumable, so nothing is overcommitted.
            lines.append("SlurmdParameters=config_overrides")
        if self.gpus:
            lines.append("GresTypes=gpu")
        lines.append(f"{node_line} NodeAddr=127.0.0.1 State=UNKNOWN")
        for i, part in enumerate(self.partitions):
            default = "YES" if i == 0 else "NO"
            lines.append(
                f"PartitionName={part} Nodes={self.node} Default={default} "
                "MaxTime=INFINITE State=UP"
            )
        self.conf.write_text("\n".join(lines) + "\n")
        (self.root / "gres.conf").write_text(self._gres_conf())
        self._write_srun_shim()

    def _write_srun_shim(self) -> None:
        """``bin/srun``: the real srun with ``SLURM_CONF`` pointing here (see :meth:`env`)."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        real = shutil.which("srun")
        if real is None:
            raise SlurmStartError("srun not on PATH")
        shim = self.bin_dir / "srun"
        shim.write_text(
            f'#!/bin/sh\nSLURM_CONF={shlex.quote(str(self.conf))} exec {shlex.quote(real)} "$@"\n'
        )
        shim.chmod(0o755)

    def _gres_conf(self) -> str:
        # A count-only GPU (Count=N without File) registers as 0 GPUs in 22.05 and the node is
        # marked INVAL; each GPU needs a character device, and with task/none nothing opens it.
        devices = ["/dev/null", "/dev/zero"][: self.gpus]
        return "".join(f"Name=gpu File={dev}\n" for dev in devices)

    def _node_hardware(self) -> dict[str, str]:
        """The node's line from ``slurmd -C`` as ordered key/value pairs (NodeName first)."""
        out = self._run(["slurmd", "-C"]).stdout
        first = next((line for line in out.splitlines() if line.startswith("NodeName=")), "")
        if not first:
            raise SlurmStartError(f"slurmd -C printed no NodeName line: {out.strip()[:200]}")
        pairs = dict(item.split("=", 1) for item in first.split() if "=" in item)
        pairs["NodeName"] = self.node
        return pairs

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        # A fresh key: the cluster's munged, daemons and clients are the only ones that use it.
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        cmd = [
            "munged",
            "--foreground",
            # munged refuses a socket whose directory others cannot traverse, as in a private
            # temp dir; only root's own daemons and commands use this one.
            "--force",
            f"--socket={self.munge_socket}",
            f"--key-file={key}",
            f"--pid-file={self.root / 'munge' / 'munged.pid'}",
            f"--seed-file={self.root / 'munge' / 'munged.seed'}",
        ]
        self._spawn("munged", cmd)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            self._check_alive("munged")
            if time.monotonic() > deadline:
                raise SlurmStartError(f"munged created no socket at {self.munge_socket}")
            time.sleep(0.1)

    def _spawn(self, name: str, cmd: list[str]) -> None:
        # Output goes to a file (a pipe nobody reads would fill up and block the daemon); the
        # daemons' own log files are <name>.log, this <name>.out catches what comes before them.
        with (self.log_dir / f"{name}.out").open("ab") as out:
            self._procs[name] = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env(), start_new_session=True
            )

    def _alive(self, name: str) -> bool:
        proc = self._procs.get(name)
        return proc is not None and proc.poll() is None

    def _check_alive(self, name: str) -> None:
        if not self._alive(name):
            lines = []
            for log in (self.log_dir / f"{name}.out", self.log_dir / f"{name}.log"):
                if log.exists():
                    lines += log.read_text(errors="replace").strip().splitlines()
            errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
            raise SlurmStartError(f"{name} exited: {errors[-1].strip()}")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = "unknown"
        while True:
            for name in DAEMONS:
                self._check_alive(name)
            result = self._run(["sinfo", "-h", "-N", "-n", self.node, "-o", "%T"], check=False)
            states = set(result.stdout.split())
            if states == {"idle"}:
                return
            state = ",".join(sorted(states)) or result.stderr.strip() or "not listed"
            if states & {"inval", "drained", "draining", "drain"}:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        reason = self._run(["sinfo", "-h", "-n", self.node, "-o", "%E"], check=False).stdout
        raise SlurmStartError(
            f"node {self.node} is {state}, not idle (reason: {reason.strip() or 'none'})"
        )

    def _cancel_all(self, timeout: float) -> None:
        self._run(["scancel", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            active = self._run(
                ["squeue", "-h", "-o", "%i", "--states=PENDING,RUNNING,COMPLETING,SUSPENDED"],
                check=False,
            )
            if active.returncode != 0 or not active.stdout.strip():
                return
            time.sleep(0.5)

    def _run(self, cmd: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SlurmError(f"{' '.join(cmd)} failed: {detail[0]}")
        return result


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()
