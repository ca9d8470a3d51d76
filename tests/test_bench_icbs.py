"""benchmarks/bench_icbs.py builds settings that iCBS accepts (a settings change broke it)."""

import importlib.util
from pathlib import Path

from agentprune import resolve
from agentprune.pruning.icbs.settings import ICBSConfig

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_icbs", ROOT / "benchmarks" / "bench_icbs.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_old_and_new_settings_of_the_icbs_benchmark_are_complete():
    bench = load_bench()
    new = resolve.method_settings(resolve.load_config(ROOT / "config" / "config.yaml"), "icbs")
    old = ICBSConfig.from_dict(bench.old_default_settings(new))
    assert ICBSConfig.from_dict(new).steps != old.steps  # the two contenders differ
    for key, value in {**bench.OLD_SETTINGS, **bench.OLD_BEHAVIOUR}.items():
        assert getattr(old, key) == value
