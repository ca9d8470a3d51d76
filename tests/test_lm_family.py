"""The lm family's wiring, without running a model: config checks, the {ratio} wildcards, the
step settings a rule's params rebuild into, the method registry, stats and the lm table."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
from agentprune import families, paper, resolve, stats
from agentprune.lm import settings as lm_settings
from agentprune.lm import strategies
from agentprune.pruning import catalog
from agentprune.settings import ConfigError, StatsSettings, plain

ROOT = Path(__file__).resolve().parents[1]
CONFIG, LM, LM_PAPER = (ROOT / "config" / n for n in ("config.yaml", "lm.yaml", "lm_paper.yaml"))


@pytest.fixture(scope="module")
def lm_config() -> dict:
    return resolve.load_config(CONFIG, LM)


def test_lm_configs_pass_and_spell_2of4(lm_config: dict) -> None:
    assert resolve.method_ratios(lm_config, "sparsegpt", "smollm2") == ["0.5", "0.6", "2of4"]
    cfg = resolve.load_config(CONFIG, LM_PAPER)
    assert resolve.method_ratios(cfg, "wanda", "llama2_7b") == ["0.5", "2of4"]
    labels = {(r["label"], r["sparsity"]): r["perplexity"] for r in cfg["paper"]["references"]}
    assert labels[("Wanda (Wanda README)", "0.5")] == 6.42
    assert labels[("SparseGPT (Wanda README)", "2:4")] == 10.17


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"methods": ["sparsegpt", "isomorphic"]}, "'methods.0'"),  # sparsegpt on vision models
        ({"sparsities": [0.5, "2:4"]}, "'sparsities.1'"),  # N:M on vision models
        ({"dataset": {"name": "pydoc"}}, "'dataset.name'"),  # a text corpus for vision models
    ],
)
def test_vision_study_refuses_lm_only_parts(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve.load_config(CONFIG, overrides=overrides)
    assert key in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"models": [{"name": "m", "family": "lm"}]}, "'models.0.source'"),
        ({"methods": ["isomorphic"], "paper": {"reference_method": "isomorphic"}}, "'methods.0'"),
        ({"dataset": {"name": "digits"}}, "'dataset.name'"),
        ({"method_settings": {"sparsegpt": {"blocksize": 64}}}, "'method_settings.sparsegpt'"),
        ({"lm": {"sparsegpt": {"selection": "rows"}}}, "'lm.sparsegpt.selection'"),
        ({"sparsities": ["4:2"]}, "'sparsities.0'"),
        ({"sparsities": ["2:4", "2:4"]}, "'sparsities'"),
    ],
)
def test_lm_study_refuses_bad_parts(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve.load_config(CONFIG, LM, overrides=overrides)
    assert key in str(info.value) and "\n" not in str(info.value)


def test_every_lm_method_has_a_strategy() -> None:
    lm_methods = {n for n in catalog.names() if "lm" in catalog.get(n).families}
    assert lm_methods == set(strategies.STRATEGIES) == {"magnitude", "wanda", "sparsegpt", "icbs"}
    assert catalog.get("sparsegpt").families == ("lm",)


def test_step_settings_round_trip_through_params(lm_config: dict) -> None:
    steps = {
        "weights": resolve.weights(lm_config, "smollm2"),
        "download_model": resolve.base_model_step(lm_config, "smollm2"),
        "profile": resolve.profile_step(lm_config, "smollm2"),
        "plan": resolve.plan_step(lm_config, "icbs", "smollm2", "2of4"),
        "prune": resolve.prune_step(lm_config, "smollm2"),
        "finetune": resolve.finetune_step(lm_config, "smollm2"),
        "evaluate": resolve.evaluate_step(lm_config, "smollm2"),
    }
    for kind, step in steps.items():
        params = json.loads(json.dumps(plain(step)))  # what Snakemake hands the script
        assert families.build_step(kind, params, kind) == step
        assert families.of_step(step).__name__ == "agentprune.lm.steps"
    plan = steps["plan"]
    assert plan.method_settings["row_fraction"] == lm_config["lm"]["icbs"]["row_fraction"]
    assert lm_settings.Sparsity.parse(plan.ratio).label() == "2:4"
    vision = resolve.load_config(CONFIG)
    prune = resolve.prune_step(vision, "vit")
    assert families.build_step("prune", plain(prune), "prune") == prune
    assert families.of_step(prune) is None  # agentprune.steps' own bodies


def _lm_metrics(method: str, label: str, seed: int, ppl: float) -> dict:
    sparsity = lm_settings.Sparsity.parse(label)
    return {
        "dataset": "pydoc",
        "model": "smollm2",
        "method": method,
        "family": "semi_structured" if sparsity.is_n_m else "unstructured",
        "model_family": "lm",
        "ratio": sparsity.target,
        "sparsity_label": sparsity.label(),
        "seed": seed,
        "perplexity": ppl,
        "perplexity_base": 18.0,
        "seconds": {"prune": 1.0},
        "peak_memory_mb": {"prune": 1500.0},
    }


def test_stats_and_lm_table_take_lm_runs(tmp_path: Path) -> None:
    values = {("wanda", "0.5"): 30.0, ("wanda", "2:4"): 90.0, ("magnitude", "0.5"): 60.0}
    paths = []
    for (method, label), ppl in values.items():
        for seed in (0, 1):
            record = _lm_metrics(method, label, seed, ppl + seed)
            wildcard = resolve.sparsity_wildcard(label if ":" in label else float(label))
            path = tmp_path / method / f"r{wildcard}" / f"s{seed}" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps(record))
            paths.append(path)
    out = {name: tmp_path / f"{name}.csv" for name in ("runs", "summary", "comparisons")}
    stats.write_stats(paths, out, StatsSettings(confidence=0.95, alpha=0.05))
    summary = pd.read_csv(out["summary"])
    assert len(summary) == 3 and set(summary["family"]) == {"unstructured", "semi_structured"}
    comparisons = pd.read_csv(out["comparisons"])
    assert set(comparisons["metric"]) == {"perplexity"}
    runs = pd.read_csv(out["runs"])
    refs = [
        {"model": "smollm2", "label": "Wanda (published)", "sparsity": "0.5", "perplexity": 7.0},
        {"model": "smollm2", "label": "Wanda (published)", "sparsity": "2:4", "perplexity": 9.0},
        {"model": "other", "label": "Dense (published)", "sparsity": "dense", "perplexity": 5.1},
    ]
    table = paper.lm_table(runs, refs)
    assert table["columns"] == ["0.5", "2:4"]
    rows = {r["label"]: r["cells"] for r in table["blocks"][0]["rows"]}
    assert list(rows) == ["Dense", "magnitude", "wanda", "Wanda (published)"]
    assert rows["Dense"] == ["18.00", "18.00"]
    assert rows["wanda"] == ["30.50", "90.50"] and rows["magnitude"] == ["60.50", ""]
    assert rows["Wanda (published)"] == ["7.00", "9.00"]
    assert table["blocks"][1]["model"] == "other"
    # The vision tables leave the lm runs out; with no lm runs the lm table is a note.
    assert paper.lm_frame(runs, lm=False).empty
    empty = paper.lm_table(runs.iloc[0:0], [])
    assert empty["blocks"] == [] and "no causal LM" in paper._lm_caption(empty, runs.iloc[0:0])


def test_benchmark_paths_read_an_n_m_ratio(tmp_path: Path) -> None:
    from agentprune import benchmarks

    path = tmp_path / "pydoc" / "smollm2" / "wanda" / "r2of4" / "s0" / "prune.tsv"
    assert benchmarks._identity(path)["ratio"] == 0.5


def test_vision_params_are_unchanged_by_the_family_field() -> None:
    """The vision steps' params carry no family field, so existing results are not rerun."""
    vision = resolve.load_config(CONFIG)
    for step in (
        resolve.prune_step(vision, "vit"),
        resolve.profile_step(vision, "vit"),
        resolve.plan_step(vision, "wanda", "vit", "0.7"),
    ):
        assert "family" not in plain(step)
    assert plain(resolve.prune_step(vision)) == plain(resolve.prune_step(vision, "vit"))
    cfg = copy.deepcopy(vision)
    assert resolve.model(cfg, "vit").timm == "deit_tiny_patch16_224"
