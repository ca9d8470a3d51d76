"""Every malformed config under tests/bad_configs/ is refused before any DAG is built, with one
line that names the key, and no traceback.

Each file's first line says what its error must name: ``# expect: <dotted key>`` (or ``top
level``), or ``# expect: FILE`` for a file that is not a YAML mapping at all. Snakemake reads those
itself before the Snakefile runs and refuses them with its own two-line ``WorkflowError`` (which
does not name the file); the CLI's loader, which is ours, names it.

Every case goes through :func:`agentprune.resolve.load_config`, which merges the files as
Snakemake does and calls the same ``prepare`` the Snakefile calls first. A sample of the cases,
one of each kind of check, also goes through a real ``snakemake -n``: that the Snakefile turns
the error into one line and an exit before the DAG. (Running all of them there costs a Snakemake
start-up each, minutes of CI for no extra coverage.)
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
DEFAULT = ROOT / "config" / "config.yaml"

THROUGH_SNAKEMAKE = (
    "03_ratios_merge_into_one_wildcard",  # a wildcard check
    "18_model_name_dotdot",  # a name pattern
    "25_model_unknown_override",  # a model entry built on the meta device
    "36_method_settings_unknown_key",  # a method's own settings
    "53_base_url_not_a_url",  # a cross-key check
    "75_unknown_top_level_key",  # the schema
    "not_a_mapping",  # Snakemake's own reader
    "yaml_syntax_error",
)
"""One case of each kind of check, also refused through a real ``snakemake -n``."""


def expectation(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), path
    return first.removeprefix("# expect: ").strip()


def assert_names_the_key(message: str, expected: str) -> None:
    where = "at top level" if expected == "top level" else f"at {expected!r}"
    assert message.startswith(f"config error {where}"), message


def dry_run(path: Path, workdir: Path) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-n"]
    cmd += ["--configfile", str(SMOKE), str(path)]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """`snakemake -n` on the sampled cases, two at a time."""
    root = tmp_path_factory.mktemp("bad_configs")
    sample = [BAD / f"{name}.yaml" for name in THROUGH_SNAKEMAKE]
    with ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda p: dry_run(p, root / p.stem), sample)
        return {path.stem: result for path, result in zip(sample, results)}


def test_there_are_at_least_fifty_cases() -> None:
    assert len(CASES) >= 50
    assert all((BAD / f"{name}.yaml").exists() for name in THROUGH_SNAKEMAKE)


@pytest.mark.parametrize("case", CASES, ids=[p.stem for p in CASES])
def test_refused_with_one_line_naming_the_key(case: Path) -> None:
    with pytest.raises(ConfigError) as err:
        resolve.load_config(DEFAULT, SMOKE, case)
    message = str(err.value)
    assert "\n" not in message, message
    expected = expectation(case)
    if expected == "FILE":
        assert str(case) in message
    else:
        assert_names_the_key(message, expected)


@pytest.mark.parametrize("name", THROUGH_SNAKEMAKE)
def test_snakemake_refuses_before_the_dag(
    name: str, dry_runs: dict[str, subprocess.CompletedProcess]
) -> None:
    result = dry_runs[name]
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"{name} was accepted"
    assert "Traceback" not in output and "Job stats" not in output and "Building DAG" not in output
    expected = expectation(BAD / f"{name}.yaml")
    if expected == "FILE":
        assert "WorkflowError" in output and "Config file" in output
        return
    errors = [line for line in output.splitlines() if line.startswith("config error")]
    assert len(errors) == 1, output[-2000:]
    assert_names_the_key(errors[0], expected)
