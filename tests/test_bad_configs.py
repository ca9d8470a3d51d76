"""Every malformed config under tests/bad_configs/ is refused by `snakemake -n` before any DAG is
built, with one line that names the key, and no traceback.

Each file's first line says what its error must name: ``# expect: <dotted key>`` (or ``top
level``), or ``# expect: FILE`` for a file that is not a YAML mapping at all. Snakemake reads those
itself before the Snakefile runs and refuses them with its own two-line ``WorkflowError`` (which
does not name the file); the CLI's loader, which is ours, names it.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agentprune import resolve
from agentprune.settings import ConfigError
from smoke import ROOT, SMOKE

BAD = Path(__file__).resolve().parent / "bad_configs"
CASES = sorted(BAD.glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ").strip()


def dry_run(path: Path, workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n"]
    cmd += ["--configfile", str(SMOKE), str(path)]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """`snakemake -n` on every case, two at a time."""
    root = tmp_path_factory.mktemp("bad_configs")
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda p: dry_run(p, root / p.stem), CASES)
        return {path.name: result for path, result in zip(CASES, results)}


def test_there_are_at_least_fifty_cases() -> None:
    assert len(CASES) >= 50


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_refused_before_the_dag_with_one_line(
    case: Path, dry_runs: dict[str, subprocess.CompletedProcess]
) -> None:
    result = dry_runs[case.name]
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"{case.name} was accepted"
    assert "Traceback" not in output and "Job stats" not in output and "Building DAG" not in output
    expected = expectation(case)
    if expected == "FILE":
        assert "WorkflowError" in output and "Config file" in output
        with pytest.raises(ConfigError) as err:
            resolve.load_config(ROOT / "config" / "config.yaml", case)
        assert "\n" not in str(err.value) and str(case) in str(err.value)
        return
    errors = [line for line in output.splitlines() if line.startswith("config error")]
    assert len(errors) == 1, output[-2000:]
    where = "at top level" if expected == "top level" else f"at {expected!r}"
    assert errors[0].startswith(f"config error {where}"), errors[0]
