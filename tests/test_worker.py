"""The warm worker (agentprune.worker): a script handed to it runs in a forked child exactly as in
its own interpreter, and a killed job takes its child with it."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from agentprune import worker

CLIENT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from agentprune import worker
    folder, script, log = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    sys.exit(worker.run_in_worker(script, argv=[script, "an-argument"], log=log, folder=folder))
    """
)


@pytest.fixture
def folder():
    """A private socket folder (short: socket paths are limited); its workers stop afterwards."""
    path = Path(tempfile.mkdtemp(prefix="apw", dir="/tmp"))
    yield path
    for log in path.glob("*.log"):
        for pid in re.findall(r"^worker (\d+):", log.read_text(), re.M):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)
    shutil.rmtree(path, ignore_errors=True)


def client(folder: Path, script: Path, tmp_path: Path, **env: str) -> subprocess.Popen:
    """A client process handing ``script`` to the worker in ``folder``."""
    (tmp_path / "client.py").write_text(CLIENT)
    return subprocess.Popen(
        [
            sys.executable,
            str(tmp_path / "client.py"),
            str(folder),
            str(script),
            str(tmp_path / "log"),
        ],
        cwd=tmp_path,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_auto_hands_off_on_linux_outside_slurm_and_off_never():
    assert worker.wanted("auto", {}) == (
        sys.platform.startswith("linux"),
        worker.wanted("auto", {})[1],
    )
    assert worker.wanted("auto", {"SLURM_JOB_ID": "7"}) == (False, "inside a SLURM job")
    assert worker.wanted("off", {}) == (False, "worker: off")
    with pytest.raises(ValueError, match="worker: 'on' is not one of auto, off"):
        worker.wanted("on", {})


def test_the_key_follows_the_environment_but_not_the_per_job_thread_counts():
    base = {"HF_HOME": "/a", "OMP_NUM_THREADS": "1"}
    key = worker.server_key(base)
    assert worker.server_key({**base, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}) == key
    assert worker.server_key({**base, "HF_HOME": "/b"}) != key


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks on Linux")
def test_a_script_runs_in_a_forked_child_with_the_clients_cwd_env_argv_and_streams(
    folder, tmp_path
):
    script = tmp_path / "job.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys
            import torch
            print("cwd", os.getcwd(), "colour", os.environ["COLOUR"], "argv", sys.argv[1:])
            print("threads", torch.get_num_threads(), "pid", os.getpid(), "ppid", os.getppid())
            print("an error line", file=sys.stderr)
            sys.exit(3)
            """
        )
    )
    first = client(folder, script, tmp_path, COLOUR="teal", OMP_NUM_THREADS="1")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 3, err
    assert f"cwd {tmp_path} colour teal argv ['an-argument']" in out
    assert "threads 1 " in out
    assert "an error line" in err
    pid, ppid = map(int, re.search(r"pid (\d+) ppid (\d+)", out).groups())
    assert pid != first.pid and ppid != first.pid  # a child of the worker, not of the client
    assert re.search(
        rf"worker: job ran in forked process {pid}: .* exit status 3",
        (tmp_path / "log").read_text(),
    )

    second = client(folder, script, tmp_path, COLOUR="teal", OMP_NUM_THREADS="2")
    out, _ = second.communicate(timeout=300)
    assert "threads 2 " in out  # the job's thread count, not the first job's
    assert int(re.search(r"ppid (\d+)", out).group(1)) == ppid  # the same warm worker


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks on Linux")
def test_an_exception_is_status_1_with_its_traceback_on_the_clients_stderr(folder, tmp_path):
    script = tmp_path / "job.py"
    script.write_text("raise KeyError('no such run')\n")
    proc = client(folder, script, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in err and "KeyError: 'no such run'" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the worker forks on Linux")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_killing_the_client_kills_its_job(folder, tmp_path, signum):
    script = tmp_path / "job.py"
    marker = tmp_path / "child.pid"
    script.write_text(
        f"import os, time\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\ntime.sleep(300)\n"
    )
    proc = client(folder, script, tmp_path)
    deadline = time.monotonic() + 300
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(marker.read_text())
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert proc.returncode in (128 + signum, -signum)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the job's process outlived its client"


def test_a_socket_folder_others_can_enter_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(worker.WorkerUnavailable, match="is not a folder private to this user"):
        worker.connect("somekey", shared)


def test_hand_off_outside_a_snakemake_script_returns_at_once():
    class Job:  # what a test or a plain `python scripts/x.py` has instead of Snakemake's object
        config = {"worker": "auto"}
        log = []

    assert worker.hand_off(Job()) is None  # no __real_file__ in __main__: nothing to hand off
