"""A warm worker for the workflow's scripts: torch, timm and Torch-Pruning imported once, each
job forked from that process.

Why: on a laptop CPU a fresh interpreter spends about 7 s importing torch, timm and the
``torch._dynamo`` that torchvision pulls in, before a step that often computes for 1-3 s. A study
runs some 200 such jobs.

How: the first statement of a per-run step's script (``scripts/`` except the two study-wide ones,
stats and paper, whose imports the worker does not share) is :func:`hand_off`. Inside a Snakemake
job on a local machine it connects to the worker of this environment (starting it when there is
none), hands it the job's temporary script, working directory, environment and stdin/stdout/stderr,
and waits. The worker forks; the child runs the same script file, from Snakemake's preamble on,
exactly as ``python script.py`` would, and its exit status becomes the job's. Nothing about a job's
inputs or outputs changes, only who pays the imports.

Safety:

* The worker is keyed by everything an import may read: the interpreter, ``sys.path`` and the
  modification times of its site-packages folders (an install changes them), the agentprune
  sources, and the environment (less the thread-count variables Snakemake sets per job, which the
  child applies before any computation). Edit the code and the next job starts a new worker;
  the old one exits after :data:`IDLE_SECONDS` idle.
* The worker never computes, so it holds no OpenMP pool or CUDA context when it forks, and it
  serves only when its imports started no Python thread (a fork copies one thread).
* Killing the job kills its child: the client forwards SIGTERM/SIGINT/SIGHUP to the child's
  process group, and the worker kills the child when the client's connection closes (a SIGKILL).
* Only where it can help: ``worker: auto`` (the default) hands off on Linux outside SLURM jobs
  (a cluster job's worker would run the next job inside the previous job's allocation); ``off``
  never. A worker that cannot start is reported on stderr and the job runs in its own process.

What Snakemake's ``benchmark:`` files then measure: ``s`` (wall seconds) is the job's; the CPU and
memory columns are the waiting client's. The child's own CPU seconds and peak RSS are appended to
the job's log as a ``worker:`` line.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PRELOAD = (
    "torch",
    "torchvision",
    "timm",
    "torch_pruning",
    "agentprune.steps",
    "agentprune.families",
    "snakemake.logging",
    "snakemake.iocontainers",
)
"""What the worker imports once: the expensive imports every step shares (those installed)."""

THREAD_VARS = frozenset(
    {
        "OMP_NUM_THREADS",
        "GOTO_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "VECLIB_MAXIMUM_THREADS",
        "NUMEXPR_NUM_THREADS",
    }
)
"""Set by Snakemake per job to its threads; applied by the child, so not in the key."""

VOLATILE_VARS = THREAD_VARS | {"PYTEST_CURRENT_TEST"}
"""Environment variables left out of the worker's key (pytest renames the test in every phase)."""

MODES = ("auto", "off")
IDLE_SECONDS = 120.0
START_TIMEOUT_S = 300.0
KILL_GRACE_S = 20.0

_in_child = False
"""True in a job forked by the worker: :func:`hand_off` then lets the script run on."""


class WorkerUnavailable(RuntimeError):
    """The worker could not be reached or started."""


# --------------------------------------------------------------------------------------------
# the client side: what a script calls


def wanted(mode: str, environ: dict[str, str] | os._Environ = os.environ) -> tuple[bool, str]:
    """Whether a job should hand off under ``worker: mode``, and why not."""
    if mode not in MODES:
        raise ValueError(f"worker: {mode!r} is not one of {', '.join(MODES)}")
    if mode == "off":
        return False, "worker: off"
    if not sys.platform.startswith("linux"):
        return False, f"the worker needs Linux (this is {sys.platform})"
    if environ.get("SLURM_JOB_ID"):
        return False, "inside a SLURM job"
    return True, ""


def hand_off(snakemake: Any) -> None:
    """Run this Snakemake script in the warm worker and exit with its status.

    Returns at once (the script runs on in this process) in the worker's child, outside a
    Snakemake script, with no ``worker`` key in the config, or where :func:`wanted` says no.
    When the worker cannot start it says why on stderr and returns.
    """
    main = sys.modules.get("__main__")
    script = getattr(main, "__real_file__", None)  # set by Snakemake's script preamble
    if _in_child or script is None:
        return
    mode = (getattr(snakemake, "config", None) or {}).get("worker")  # the schema fills it in
    if mode is None or not wanted(str(mode))[0]:
        return
    log = next(iter(getattr(snakemake, "log", []) or []), None)
    try:
        status = run_in_worker(str(script), log=log)
    except WorkerUnavailable as err:
        print(f"agentprune worker unavailable, running in this process: {err}", file=sys.stderr)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # the child ran the script's atexit work; none is left here


def run_in_worker(
    script: str, argv: list[str] | None = None, log: str | None = None, folder: Path | None = None
) -> int:
    """Run ``script`` in the worker of this environment; its exit status (128+N for signal N).

    Args:
        script: a Python file, run as ``__main__`` with this process's cwd, environment,
            ``sys.path``, arguments and standard streams.
        argv: the child's ``sys.argv`` (default: this process's, with ``script`` first).
        log: a file to append the child's resource usage to.
        folder: where the worker's socket lives (default :func:`socket_folder`).
    """
    key = server_key(os.environ)
    sock = connect(key, folder or socket_folder())
    request = {
        "script": script,
        "argv": argv or [script, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "path": list(sys.path),
    }
    started = time.perf_counter()
    with sock:
        _send(sock, request, fds=[0, 1, 2])
        reader = sock.makefile("rb")
        pid = json.loads(reader.readline() or b"{}").get("pid")
        if not pid:
            raise WorkerUnavailable("the worker closed the connection before forking")
        with _forwarding_signals(pid):
            line = reader.readline()
        if not line:  # the worker died under us; its child, in its own group, would outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            print(
                "agentprune worker: connection lost; the job's process was killed", file=sys.stderr
            )
            return 1
        result = json.loads(line)
    if log:
        _append_usage(log, pid, result, time.perf_counter() - started)
    return int(result["status"])


@contextlib.contextmanager
def _forwarding_signals(pid: int):
    """Pass SIGTERM/SIGINT/SIGHUP on to the child's process group while waiting for it."""

    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signum)
        signal.signal(signal.SIGALRM, lambda *_: _kill(pid))
        signal.alarm(int(KILL_GRACE_S))

    handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        yield
    finally:
        signal.alarm(0)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _append_usage(log: str, pid: int, result: dict[str, Any], seconds: float) -> None:
    with contextlib.suppress(OSError), open(log, "a+b") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell():  # a progress bar may have left the last line open
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        line = (
            f"worker: job ran in forked process {pid}: {seconds:.1f} s wall, "
            f"{result['utime']:.1f} s user, {result['stime']:.1f} s system, "
            f"max RSS {result['maxrss_kb'] / 1024:.0f} MiB, exit status {result['status']}\n"
        )
        fh.write(line.encode())


USAGE_LINE = re.compile(
    r"^worker: job ran in forked process (?P<pid>\d+): (?P<wall>[\d.]+) s wall, "
    r"(?P<user>[\d.]+) s user, (?P<system>[\d.]+) s system, max RSS (?P<rss>\d+) MiB",
    re.M,
)


def logged_usage(log: str | Path) -> dict[str, float] | None:
    """The child's figures from the ``worker:`` line of a job's log (None: it ran in its own
    process): wall, user and system seconds and peak RSS in MiB."""
    try:
        matches = list(USAGE_LINE.finditer(Path(log).read_text(errors="replace")))
    except OSError:
        return None
    if not matches:
        return None
    last = matches[-1]
    return {k: float(last[k]) for k in ("wall", "user", "system", "rss")}


def socket_folder() -> Path:
    """This user's folder for worker sockets (private; a short path, as sockets need)."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 60:
        base = Path("/tmp")
    return base / f"agentprune-worker-{os.getuid()}"


def server_key(environ: dict[str, str] | os._Environ) -> str:
    """What decides whether a running worker may serve this job (see the module docstring)."""
    h = hashlib.sha256()
    h.update(f"{sys.executable}\0{sys.version}\0".encode())
    for entry in sys.path:
        h.update(f"{entry}\0".encode())
        if Path(entry).name in ("site-packages", "dist-packages"):  # changed by every install
            with contextlib.suppress(OSError):
                h.update(f"{os.stat(entry).st_mtime_ns}\0".encode())
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        stat = source.stat()
        h.update(f"{source.relative_to(package)}\0{stat.st_mtime_ns}\0{stat.st_size}\0".encode())
    env = sorted((k, v) for k, v in environ.items() if k not in VOLATILE_VARS)
    h.update(json.dumps(env).encode())
    return h.hexdigest()[:24]


def _private_folder(folder: Path) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    stat = folder.stat()
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        raise WorkerUnavailable(f"{folder} is not a folder private to this user")
    return folder


def connect(key: str, folder: Path) -> socket.socket:
    """A connection to the worker ``key`` in ``folder``, started first when none runs."""
    folder = _private_folder(folder)
    path = folder / f"{key}.sock"
    sock = _try_connect(path)
    if sock:
        return sock
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one starter per key; the others wait and connect
        sock = _try_connect(path)
        if sock:
            return sock
        server = _start(path, folder / f"{key}.log")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            sock = _try_connect(path)
            if sock:
                return sock
            if server.poll() is not None:
                tail = _tail(folder / f"{key}.log")
                raise WorkerUnavailable(
                    f"the worker exited with status {server.returncode}: {tail}"
                )
            time.sleep(0.05)
        server.kill()
        raise WorkerUnavailable(f"the worker did not start within {START_TIMEOUT_S:.0f} s")


def _try_connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        return None
    return sock


def _start(path: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agentprune.worker", str(path), json.dumps(sys.path)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd="/",
        )


def _tail(log: Path, lines: int = 3) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no log)"


# --------------------------------------------------------------------------------------------
# the wire: a length-prefixed JSON request with the standard streams attached


def _send(sock: socket.socket, message: dict[str, Any], fds: list[int]) -> None:
    body = json.dumps(message).encode()
    socket.send_fds(sock, [struct.pack("!I", len(body)) + body], fds)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    if len(data) < 4:
        raise ConnectionError("short request")
    (size,) = struct.unpack("!I", data[:4])
    body = data[4:]
    while len(body) < size:
        chunk = conn.recv(size - len(body))
        if not chunk:
            raise ConnectionError("truncated request")
        body += chunk
    return json.loads(body), fds


# --------------------------------------------------------------------------------------------
# the worker


class Server:
    """The worker: one listening socket, one forked child per request."""

    def __init__(self, path: Path, idle_s: float = IDLE_SECONDS) -> None:
        self.path = path
        self.idle_s = idle_s
        self.children: dict[int, socket.socket] = {}
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        staging = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        self.listener.bind(str(staging))
        self.listener.listen(64)
        os.replace(staging, path)  # clients see the socket only once it accepts
        self.inode = path.stat().st_ino

    def serve(self) -> None:
        """Serve until idle for ``idle_s`` or until the socket file is no longer ours."""
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        idle_since = time.monotonic()
        try:
            while True:
                for key, _ in self.selector.select(timeout=1.0):
                    if key.data == "accept":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(BlockingIOError):
                            os.read(self.wake_r, 4096)
                    else:
                        self._client_event(key.data)
                self._reap()
                if self.children:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > self.idle_s or not self._owns_socket():
                    return
        finally:
            if self._owns_socket():
                self.path.unlink()

    def _owns_socket(self) -> bool:
        try:
            return self.path.stat().st_ino == self.inode
        except OSError:
            return False

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(10.0)
        try:
            request, fds = _receive(conn)
        except (OSError, ValueError, ConnectionError) as err:
            print(f"bad request: {err}", flush=True)
            conn.close()
            return
        if len(fds) != 3:
            for fd in fds:
                os.close(fd)
            conn.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self._become_job(conn, request, fds)  # never returns
        with contextlib.suppress(OSError):  # also done by the child: whichever runs first
            os.setpgid(pid, pid)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        try:
            conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        except OSError:  # the client is already gone
            _kill(pid)
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, pid)

    def _client_event(self, pid: int) -> None:
        """The client wrote or hung up: either way it no longer waits, so its job dies."""
        conn = self.children.get(pid)
        if conn is not None:
            self.selector.unregister(conn)
            _kill(pid)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            result = {
                "status": code if code >= 0 else 128 - code,
                "utime": usage.ru_utime,
                "stime": usage.ru_stime,
                "maxrss_kb": usage.ru_maxrss,
            }
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn)
            with contextlib.suppress(OSError):
                conn.setblocking(True)
                conn.sendall(json.dumps(result).encode() + b"\n")
            conn.close()

    def _become_job(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """In the forked child: take the client's place and run its script; never returns."""
        global _in_child
        code = 1
        try:
            os.setpgid(0, 0)
            signal.set_wakeup_fd(-1)
            for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            for other in [self.listener, conn, *self.children.values()]:
                other.close()
            self.selector.close()
            os.close(self.wake_r)
            os.close(self.wake_w)
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.path[:] = request["path"]
            sys.argv[:] = request["argv"]
            _apply_thread_count()
            _in_child = True
            code = _run_script(request["script"])
        except BaseException:  # noqa: BLE001 - the child must always reach os._exit
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)


def _apply_thread_count() -> None:
    """Give the child the thread count a fresh process would read from its environment.

    OpenMP and torch read ``OMP_NUM_THREADS`` when they load, which in the worker was before
    this job's environment existed.
    """
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(int(value))


def _run_script(script: str) -> int:
    """Run ``script`` as ``__main__`` the way the interpreter would; its exit status."""
    import atexit
    import runpy
    import traceback

    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None:
            code = 0
        elif isinstance(exit_.code, int):
            code = exit_.code
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported as the interpreter would
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what interpreter shutdown would run (tracking flushes, llama)
    return code


def main(argv: list[str]) -> None:
    """``python -m agentprune.worker SOCKET SYS_PATH_JSON``: import, then serve."""
    import importlib

    path, search = Path(argv[0]), json.loads(argv[1])
    sys.path[:] = search
    started = time.perf_counter()
    for module in PRELOAD:
        try:
            importlib.import_module(module)
        except ImportError as err:  # an environment without it (a conda env of a light rule)
            print(f"not preloaded: {module} ({err})", flush=True)
    import threading

    if threading.active_count() != 1:
        raise SystemExit(f"the preloaded modules started threads: {threading.enumerate()}")
    print(f"worker {os.getpid()}: imported in {time.perf_counter() - started:.1f} s", flush=True)
    Server(path).serve()


if __name__ == "__main__":
    # Serve from the importable module, not from __main__: the jobs' hand_off() reads the
    # agentprune.worker module's state, which a second copy of this file would not set.
    from agentprune import worker

    worker.main(sys.argv[1:])
