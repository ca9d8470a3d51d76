"""The study grids of config/paper.yaml (Isomorphic Pruning on ImageNet) and config/icbs.yaml.

Checks that a dry run lists the whole grid (jobs per rule from Snakemake's job stats), that the
recorded ``base_gmacs`` match a fresh count, that the published reference rows reach the paper
table, the per-model targets and fine-tuning settings, that every published row has its
Isomorphic-Pruning recipe and the plan step finds it, and, structurally, that the CLI prunes a
random-init DeiT-B and ConvNeXt-B to their GMACs targets within 0.5 % whatever prune.tolerance
allows. Nothing needs ImageNet: the dry runs point ``$AGENTPRUNE_IMAGENET`` at an empty ImageFolder
skeleton, and the structural runs use the synthetic data set.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from agentprune import paper, resolve
from agentprune.config import IMAGENET_ENV, check_config, merge
from agentprune.pruning import catalog
from agentprune.resolve import finetune_recipe, load_config, structured_ratios
from agentprune.settings import ConfigError, fmt_ratio, plain, target_ratio

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "config" / "config.yaml"
PAPER = ROOT / "config" / "paper.yaml"
ICBS = ROOT / "config" / "icbs.yaml"
TEMPLATES = ROOT / "workflow" / "templates"

# The published Isomorphic Pruning grid: model -> the {ratio} wildcards of its GMACs targets.
PAPER_RATIOS = {
    "deit_base": ["0.7647", "0.8524"],  # 4.16 and 2.61 of 17.6791 GMACs
    "deit_small": ["0.739"],  # 1.21 of 4.6353
    "deit_tiny": ["0.5105"],  # 0.62 of 1.2666
    "convnext_base": ["0.4479", "0.7272"],  # 8.48 and 4.19 of 15.3603
}
PAPER_METHODS = [
    "multi_agent",
    "agents_heuristic",
    "isomorphic",
    "magnitude_l2",
    "taylor",
    "random",
]
ICBS_MODELS = ["deit_small", "deit_tiny"]
ICBS_SPARSITIES = ["0.5", "0.6", "0.7", "0.8"]
ICBS_METHODS = ["icbs", "wanda", "magnitude"]
SEEDS = [0, 1, 2]
# Per-run rules: one job per run (transcript: per agent-planned run).
PER_RUN = ("prune", "finetune", "evaluate", "run_card")


def _yaml(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture()
def imagenet_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ImageFolder skeleton (train/, val/) named by $AGENTPRUNE_IMAGENET."""
    root = tmp_path / "imagenet"
    (root / "train").mkdir(parents=True)
    (root / "val").mkdir()
    monkeypatch.setenv(IMAGENET_ENV, str(root))
    return root


def _dry_run(configfile: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    """``snakemake -n --configfile FILE`` in ``workdir`` (the environment passes through)."""
    cmd = [sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--snakefile"]
    cmd += [str(ROOT / "Snakefile"), "--directory", str(workdir), "--configfile", str(configfile)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=os.environ.copy())


def _job_stats(output: str) -> Counter:
    """Jobs per rule from the first "Job stats" table of a dry run."""
    lines = output.splitlines()
    start = lines.index("Job stats:") + 3  # the title, the header and the dashes
    jobs: Counter = Counter()
    for line in lines[start:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def _evaluate_runs(output: str) -> set[tuple[str, str, str, str]]:
    """(model, method, ratio, seed) of every evaluate job of a dry run."""
    pattern = re.compile(
        r"rule evaluate:.*?wildcards: dataset=\w+, model=(\S+), method=(\w+), "
        r"ratio=([0-9.]+), seed=(\d+)",
        re.S,
    )
    return set(pattern.findall(output))


def _expected_jobs(runs: int, agent_runs: int, models: int, pretrained: int) -> dict[str, int]:
    """Jobs per rule of a grid of ``runs`` runs, ``agent_runs`` of them planned by agents, on
    ``models`` models (``pretrained`` of them from downloaded weights)."""
    jobs = {"download_data": 1, "download_model": models, "profile": models}
    jobs |= {"download_weights": pretrained}
    jobs |= {"plan": runs - agent_runs, "plan_trials": agent_runs, "transcript": agent_runs}
    jobs |= dict.fromkeys(PER_RUN, runs)
    jobs |= {"stats": 1, "paper": 1, "all": 1}
    return {rule: n for rule, n in jobs.items() if n}


# --------------------------------------------------------------------------- dry runs


def test_paper_dry_run_lists_the_whole_grid(imagenet_root: Path, tmp_path: Path) -> None:
    result = _dry_run(PAPER, tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    targets = sum(len(ratios) for ratios in PAPER_RATIOS.values())  # 6 (model, target) pairs
    runs = targets * len(PAPER_METHODS) * len(SEEDS)  # 108
    agent_runs = targets * len(SEEDS) * 2  # multi_agent and its ablation agents_heuristic
    models = len(PAPER_RATIOS)  # all pretrained
    assert dict(_job_stats(output)) == _expected_jobs(runs, agent_runs, models, models)
    expected = {
        (model, method, ratio, str(seed))
        for model, ratios in PAPER_RATIOS.items()
        for ratio in ratios
        for method in PAPER_METHODS
        for seed in SEEDS
    }
    assert _evaluate_runs(output) == expected


def test_icbs_dry_run_lists_the_whole_grid(imagenet_root: Path, tmp_path: Path) -> None:
    result = _dry_run(ICBS, tmp_path / "work")
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    runs = len(ICBS_MODELS) * len(ICBS_SPARSITIES) * len(ICBS_METHODS) * len(SEEDS)  # 72
    assert dict(_job_stats(output)) == _expected_jobs(runs, 0, len(ICBS_MODELS), len(ICBS_MODELS))
    expected = {
        (model, method, sparsity, str(seed))
        for model in ICBS_MODELS
        for sparsity in ICBS_SPARSITIES
        for method in ICBS_METHODS
        for seed in SEEDS
    }
    assert _evaluate_runs(output) == expected


def test_missing_imagenet_root_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(IMAGENET_ENV, str(tmp_path / "nowhere"))
    result = _dry_run(PAPER, tmp_path / "work")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("config error")]
    missing = tmp_path / "nowhere"
    assert errors == [f"config error at 'dataset.root': '{missing}' is not a directory"]
    monkeypatch.delenv(IMAGENET_ENV)
    with pytest.raises(ConfigError, match=r"set dataset\.root or \$AGENTPRUNE_IMAGENET"):
        load_config(CONFIG, PAPER)


def test_explicit_root_wins_over_the_environment(imagenet_root: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    (other / "train").mkdir(parents=True)
    (other / "val").mkdir()
    cfg = load_config(CONFIG, PAPER)
    assert cfg["dataset"]["root"] == str(imagenet_root)
    cfg = load_config(CONFIG, PAPER, overrides={"dataset": {"root": str(other)}})
    assert cfg["dataset"]["root"] == str(other)
    (other / "val").rmdir()
    with pytest.raises(ConfigError, match="'dataset.root'.*val' is not a directory"):
        load_config(CONFIG, PAPER, overrides={"dataset": {"root": str(other)}})


# --------------------------------------------------------------------------- targets and GMACs


def test_paper_ratios_derive_from_the_gmacs_targets(imagenet_root: Path) -> None:
    cfg = load_config(CONFIG, PAPER)
    for entry in cfg["models"]:
        ratios = structured_ratios(cfg, entry["name"])
        assert [fmt_ratio(r) for r in ratios] == PAPER_RATIOS[entry["name"]]
        for target, ratio in zip(entry["targets_gmacs"], ratios, strict=True):
            # 4 decimals of the ratio keep the MACs target within 1e-4 of the base MACs.
            assert abs(entry["base_gmacs"] * (1 - ratio) - target) <= 5e-5 * entry["base_gmacs"]


def test_default_config_keeps_global_ratios() -> None:
    cfg = load_config(CONFIG)
    assert all(structured_ratios(cfg, m["name"]) == [0.5, 0.75] for m in cfg["models"])
    assert fmt_ratio(0.3) == "0.3" and fmt_ratio(0.764693) == "0.7647"
    assert target_ratio(4.16, 17.6791) == 0.7647


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"targets_gmacs": [20.0], "base_gmacs": 17.6}, "'models.0.targets_gmacs.0': target 20"),
        ({"targets_gmacs": [4.0]}, "'models.0.base_gmacs': targets_gmacs needs"),
        ({"targets_gmacs": [4.0, 4.00001], "base_gmacs": 8.0}, "the same ratio 0.5"),
        ({"finetune": {"lrr": 0.1}}, "'models.0.finetune': unknown key 'lrr'"),
        ({"finetune": {"epochs": -1}}, "'models.0.finetune.epochs'"),
    ],
)
def test_bad_model_entries_are_one_line(entry: dict[str, Any], message: str) -> None:
    cfg = {"models": [{"name": "m", "timm": "resnet18", **entry}]}
    with pytest.raises(ConfigError) as info:
        check_config(cfg, catalog.REGISTRY)
    assert message in str(info.value) and "\n" not in str(info.value)


def _fresh_gmacs(timm_name: str, img_size: int) -> float:
    """GMACs of a random-init timm model at batch 1, counted like the pipeline counts them."""
    import timm
    import torch
    import torch_pruning as tp

    model = timm.create_model(timm_name, pretrained=False).eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, torch.randn(1, 3, img_size, img_size))
    return macs / 1e9


@pytest.mark.parametrize("name", list(PAPER_RATIOS))
def test_recorded_base_gmacs_match_a_fresh_count(name: str) -> None:
    entry = next(m for m in _yaml(PAPER)["models"] if m["name"] == name)
    img_size = _yaml(PAPER)["dataset"]["img_size"]
    fresh = _fresh_gmacs(entry["timm"], img_size)
    assert entry["base_gmacs"] == pytest.approx(fresh, rel=1e-3), (name, fresh)


# --------------------------------------------------------------------------- fine-tuning


# TrainConfig fields that are part of every recipe and no config section (not configurable).
FIXED_RECIPE_KEYS = {"min_lr_fraction", "grad_clip"}


def test_finetune_recipe_merges_per_model_and_scales_epochs(imagenet_root: Path) -> None:
    cfg = load_config(CONFIG, PAPER, overrides={"finetune": {"epochs_scale": 0.1}})
    deit = plain(finetune_recipe(cfg, "deit_base"))
    assert deit["epochs"] == pytest.approx(30.0) and "epochs_scale" not in deit
    assert (deit["lr"], deit["mixup"], deit["cutmix"]) == (0.0005, 0.8, 1.0)
    assert deit["distill"]["kind"] == "hard"
    assert deit["distill"]["teacher"] == "regnety_160.deit_in1k"
    assert deit["distill"]["alpha"] == cfg["finetune"]["distill"]["alpha"]  # merged key by key
    convnext = plain(finetune_recipe(cfg, "convnext_base"))
    assert (convnext["lr"], convnext["ema"], convnext["mixup"]) == (0.002, 0.9999, 0.2)
    assert convnext["distill"]["enabled"] is False
    assert plain(finetune_recipe(cfg, "deit_tiny")) == deit  # the same recipe (a YAML anchor)


def test_finetune_recipe_of_the_default_config_is_the_section() -> None:
    cfg = load_config(CONFIG)
    section = {k: v for k, v in cfg["finetune"].items() if k != "epochs_scale"}
    for entry in cfg["models"]:
        recipe = plain(finetune_recipe(cfg, entry["name"]))
        assert set(recipe) - set(section) == FIXED_RECIPE_KEYS
        assert {k: recipe[k] for k in section} == section
    scaled = merge(cfg, {"finetune": {"epochs_scale": 2.0}})
    assert finetune_recipe(scaled, "vit").epochs == 2.0 * cfg["finetune"]["epochs"]


# --------------------------------------------------------------------------- reference rows


def _fake_summary(cfg: dict[str, Any]) -> pd.DataFrame:
    """A summary.csv with one row per (model, ratio, method) of the paper grid, two methods."""
    rows = []
    for entry in cfg["models"]:
        base = entry["base_gmacs"] * 1e9
        for ratio in structured_ratios(cfg, entry["name"]):
            for method, top1 in (("isomorphic", 80.0), ("magnitude_l2", 78.0)):
                rows.append(
                    {
                        "dataset": "imagenet",
                        "model": entry["name"],
                        "method": method,
                        "family": "structured",
                        "ratio": ratio,
                        "n": 3,
                        "top1_mean": top1,
                        "top1_ci_half": 0.2,
                        "top1_base_mean": 83.0,
                        "top1_pruned_mean": 1.0,
                        "macs_mean": base * (1 - ratio),
                        "macs_base_mean": base,
                        "params_mean": 20e6,
                        "params_base_mean": 80e6,
                    }
                )
    return pd.DataFrame(rows)


def test_paper_table_shows_the_published_rows(imagenet_root: Path, tmp_path: Path) -> None:
    cfg = load_config(CONFIG, PAPER)
    references = cfg["paper"]["references"]
    assert len(references) == 6
    assert {ref["model"] for ref in references} == set(PAPER_RATIOS)
    summary = _fake_summary(cfg)
    rows = paper.table_rows(summary, "isomorphic", copy.deepcopy(references))
    flagged = [row for row in rows if row["reference"]]
    assert [row["label"] for row in flagged] == [ref["label"] for ref in references]
    # Each published row sits in its model's block: after that model's rows, before the next's.
    for ref in references:
        at = next(i for i, row in enumerate(rows) if row["label"] == ref["label"])
        block = [row["model"] for row in rows[:at] if row["kind"] == "base"]
        assert block[-1] == ref["model"]
        row = rows[at]
        assert row["macs"] == f"{ref['macs_g']:.3f}" and row["top1"] == f"{ref['top1']:.2f}"
        assert row["params"] == f"{ref['params_m']:.3f}"
    paths = paper.table_paths(tmp_path, "results")
    md, tex, html = paper.render_tables(summary, paths, TEMPLATES, "isomorphic", references)
    for ref in references:
        assert ref["label"] in md.read_text()
        assert paper.tex_escape(ref["label"]) in tex.read_text()
        assert ref["label"] in html.read_text()
    assert "82.41" in md.read_text() and "47.360" in md.read_text()


# --------------------------------------------------------------------------- published recipes


def test_every_published_row_has_its_isomorphic_recipe() -> None:
    """paper.references and method_settings.isomorphic.published pair up one to one."""
    from agentprune.pruning import methods
    from agentprune.pruning.settings import PrunerSettings

    paper_cfg = _yaml(PAPER)
    rows = paper_cfg["method_settings"]["isomorphic"]["published"]
    model_of = {methods.architecture(m["timm"]): m["name"] for m in paper_cfg["models"]}
    recipes = {(model_of[methods.architecture(r["timm"])], r["target_gmacs"]) for r in rows}
    references = {(r["model"], r["macs_g"]) for r in paper_cfg["paper"]["references"]}
    assert recipes == references and len(rows) == len(references) == 6
    targets = {(m["name"], t) for m in paper_cfg["models"] for t in m["targets_gmacs"]}
    assert recipes == targets
    for row in rows:  # each row is a valid recipe
        PrunerSettings.from_dict(
            {**methods.Isomorphic.recipe, **methods.published_settings(row)[0]}
        )
    assert paper_cfg["method_settings"]["isomorphic"]["mode"] == "macs_targeted"


@pytest.mark.parametrize(
    ("model", "ratio", "gmacs", "script"),
    [
        ("deit_base", "0.7647", 4.16, "scripts/pruning/deit_4.2G.sh"),
        ("deit_base", "0.8524", 2.61, "scripts/pruning/deit_2.6G.sh"),
        ("convnext_base", "0.7272", 4.19, "scripts/pruning/convnext_4.2G.sh"),
    ],
)
def test_plan_step_finds_the_published_recipe_of_a_ratio(
    imagenet_root: Path, tmp_path: Path, model: str, ratio: str, gmacs: float, script: str
) -> None:
    """The workflow's plan step turns the {ratio} wildcard back into its GMACs target and the
    recipe of that target (torch-free: the fixed recipes only write settings)."""
    from agentprune import steps

    cfg = load_config(CONFIG, PAPER)
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    step = resolve.plan_step(cfg, "isomorphic", model, float(ratio))
    plan = steps.plan(step, 0, profile, tmp_path / "plan.json")
    target = {"metric": "macs_fraction_removed", "value": float(ratio), "gmacs": gmacs}
    assert plan["target"] == target
    assert plan["search"]["gmacs_tolerance"] == 0.005 and plan["search"]["mode"] == "macs_targeted"
    assert plan["provenance"]["recipe"]["published_row"]["script"] == script
    assert plan["pruner"]["calibration_batches"] == 50  # --taylor-batchs 50


# --------------------------------------------------------------------------- structural CLI runs


@pytest.mark.parametrize(
    ("timm_name", "target"),
    [("deit_base_distilled_patch16_224", 4.16), ("convnext_base.fb_in1k", 8.48)],
    ids=["deit_base-4.16G", "convnext_base-8.48G"],
)
def test_cli_prunes_to_the_paper_target(timm_name: str, target: float, tmp_path: Path) -> None:
    """A random-init model pruned to a published GMACs target lands within 0.5 % of it although
    prune.tolerance would allow 5 % of the base MACs (about 35-55 s each on 2 CPU cores).
    magnitude_l2 on ConvNeXt-B at 8.48 G landed at 8.525 G (+0.53 %) under the old window."""
    from agentprune.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"prune": {"tolerance": 0.05}}))
    out = tmp_path / "run"
    args = ["prune", "--model", timm_name, "--method", "magnitude_l2", "--target-gmacs"]
    args += [str(target), "--dataset", "synthetic", "--no-pretrained", "--config", str(config)]
    assert main([*args, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["macs"] / 1e9 == pytest.approx(target, rel=5e-3), metrics["macs"]
    assert metrics["macs"] < metrics["macs_base"]
    entry = next(m for m in _yaml(PAPER)["models"] if m["timm"] == timm_name)
    assert metrics["macs_base"] / 1e9 == pytest.approx(entry["base_gmacs"], rel=1e-3)
