"""Unit tests for agentprune.config: the schema, the semantic checks, defaults and loading."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from agentprune import config as configuration
from agentprune.config import SCHEMA_PATH, ConfigError, merge, with_defaults
from agentprune.pruning import catalog
from agentprune.resolve import load_config

ROOT = Path(__file__).resolve().parents[1]


def check_config(config: dict) -> None:
    """The config check with the registered methods, as the entry points run it."""
    configuration.check_config(config, catalog.REGISTRY)


CONFIG = ROOT / "config" / "config.yaml"
SMOKE = ROOT / "config" / "smoke.yaml"


def _yaml(path: Path) -> dict:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module")
def base() -> dict:
    """config/config.yaml as a plain dict (no defaults filled in)."""
    return _yaml(CONFIG)


# --- (a) the shipped configs are valid ---------------------------------------------------------


def test_default_config_passes(base: dict) -> None:
    check_config(base)


def test_smoke_config_passes(base: dict) -> None:
    merged = merge(base, _yaml(SMOKE))
    check_config(merged)
    assert merged["finetune"]["epochs"] == 1
    assert merged["finetune"]["lr"] == base["finetune"]["lr"]  # dicts deep-merge
    assert [m["name"] for m in merged["models"]] == ["vit"]  # lists replace


def test_load_config_merges_in_order() -> None:
    cfg = load_config(CONFIG, SMOKE, overrides={"finetune": {"epochs": 2}})
    assert cfg["finetune"]["epochs"] == 2
    assert cfg["methods"][:3] == ["multi_agent", "agents_heuristic", "isomorphic"]
    assert cfg["agents"]["backend"] == "llamacpp" and cfg["agents"]["timeout_s"] == 60
    assert cfg["evaluate"]["repeats"] == 3
    assert cfg["evaluate"]["batch_size"] == 256
    assert cfg["models"][0]["pretrained_file"] is None  # item defaults filled


def test_load_config_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml") as info:
        load_config(CONFIG, missing)
    assert "\n" not in str(info.value)


def test_load_config_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="list.yaml") as info:
        load_config(CONFIG, bad)
    assert "\n" not in str(info.value)


def test_load_config_rejects_invalid_override() -> None:
    with pytest.raises(ConfigError, match="'finetune.epochs'"):
        load_config(CONFIG, overrides={"finetune": {"epochs": -1}})


# --- (b) defaults -------------------------------------------------------------------------------


def test_with_defaults_fills_missing_nested_key(base: dict) -> None:
    cfg = copy.deepcopy(base)
    del cfg["finetune"]["distill"]
    filled = with_defaults(cfg)
    assert filled["finetune"]["distill"] == {
        "enabled": True,
        "alpha": 0.5,
        "temperature": 2.0,
        "kind": "soft",
        "teacher": None,
    }
    assert "distill" not in cfg["finetune"]  # the input is not modified


def test_with_defaults_fills_whole_sections(base: dict) -> None:
    cfg = copy.deepcopy(base)
    del cfg["prune"]
    assert with_defaults(cfg)["prune"] == base["prune"]


def test_with_defaults_fills_array_items_but_not_train_overrides() -> None:
    cfg = {"models": [{"name": "tiny", "timm": "resnet18"}]}
    model = with_defaults(cfg)["models"][0]
    assert model == {
        "name": "tiny",
        "timm": "resnet18",
        "pretrained": False,
        "pretrained_file": None,
        "overrides": {},
        "train": {},  # train keys inherit base_training, so none are filled in
        "targets_gmacs": [],
        "base_gmacs": None,
        "finetune": {},  # finetune keys inherit the finetune section, so none are filled in
        "weights_cache": None,
        "sha256": None,
        "family": "vision",  # the lm family's keys, unused by a vision model
        "source": None,
        "gguf_file": None,
        "dtype": "float32",
    }


def test_schema_defaults_mirror_config_yaml(base: dict) -> None:
    """Every key of config.yaml has a schema default equal to its value there."""
    assert with_defaults({}) == with_defaults(base)


def test_empty_config_is_valid() -> None:
    check_config({})


# --- (c) bad configs -----------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(cfg: dict) -> None:
        *parents, last = path.split(".")
        node: Any = cfg
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return edit


def _drop_timm(cfg: dict) -> None:
    del cfg["models"][0]["timm"]


def _duplicate_model(cfg: dict) -> None:
    cfg["models"][1]["name"] = cfg["models"][0]["name"]


BAD = {
    "negative_finetune_epochs": (_set("finetune.epochs", -1), "'finetune.epochs'"),
    "typo_in_prune": (_set("prune.tolerence", 0.01), "'prune'"),
    "ratio_above_one": (_set("ratios", [0.3, 1.5]), "'ratios.1'"),
    "unknown_dataset": (_set("dataset.name", "mnist"), "'dataset.name'"),
    "model_without_timm": (_drop_timm, "'models.0'"),
    "unknown_method": (_set("methods", ["isomorphic", "foo"]), "'methods.1'"),
    "settings_for_absent_method": (
        _set("method_settings", {"no_such": {"calibration_batches": 2}}),
        "'method_settings.no_such'",
    ),
    "duplicate_model_names": (_duplicate_model, "'models.1.name'"),
    "unknown_top_level_key": (_set("ratio", [0.3]), "top level"),
    "fractions_sum_to_one": (_set("dataset.test_fraction", 0.9), "'dataset.val_fraction'"),
    "distill_alpha_above_one": (_set("finetune.distill.alpha", 2), "'finetune.distill.alpha'"),
    "string_number": (_set("finetune.lr", "1e-3"), "'finetune.lr'"),
    "no_methods": (_set("methods", []), "'methods'"),
    "base_url_not_a_url": (_set("agents.base_url", "ht!tp:/ /not a url"), "'agents.base_url'"),
    "base_url_file_scheme": (_set("agents.base_url", "file:///etc/passwd"), "'agents.base_url'"),
    "base_url_with_space": (_set("agents.base_url", "http://llm node/v1"), "'agents.base_url'"),
    "multi_agent_without_llm": (_set("agents.backend", "heuristic"), "'agents.backend'"),
    "fallback_share_above_one": (_set("agents.max_fallback_share", 1.5), "'agents"),
}


@pytest.mark.parametrize(("edit", "key"), list(BAD.values()), ids=list(BAD))
def test_bad_config_raises_one_line(base: dict, edit: Callable[[dict], None], key: str) -> None:
    cfg = copy.deepcopy(base)
    edit(cfg)
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config error ")
    assert key in message


@pytest.mark.parametrize(
    "url", ["http://localhost:8000/v1", "https://api.example.com/v1", "http://[::1]:8080", ""]
)
def test_http_base_urls_pass(base: dict, url: str) -> None:
    cfg = merge(base, {"agents": {"backend": "openai", "model": "m", "base_url": url}})
    check_config(cfg)


def test_an_llm_method_needs_an_llm_unless_fallback_is_opted_in(
    base: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    heuristic = merge(base, {"agents": {"backend": "heuristic"}})
    with pytest.raises(ConfigError, match="agents_heuristic") as info:
        check_config(heuristic)
    assert "multi_agent" in str(info.value) and "allow_fallback" in str(info.value)
    check_config(merge(heuristic, {"agents": {"allow_fallback": True}}))
    # The no-LLM ablation alone needs no LLM.
    check_config({**heuristic, "methods": ["agents_heuristic", "isomorphic"]})
    # auto on a machine without llama-cpp-python is the default policy in disguise too.
    from agentprune.agents import llm_settings

    monkeypatch.setattr(llm_settings, "llama_cpp_available", lambda: False)
    with pytest.raises(ConfigError, match="auto finds no local LLM"):
        check_config(merge(base, {"agents": {"backend": "auto"}}))


def test_unknown_key_is_named(base: dict) -> None:
    cfg = copy.deepcopy(base)
    cfg["prune"]["tolerence"] = 0.01
    with pytest.raises(
        ConfigError, match=r"unknown key 'tolerence' \(did you mean 'tolerance'\?\)"
    ):
        check_config(cfg)


def test_unknown_method_is_named(base: dict) -> None:
    cfg = copy.deepcopy(base)
    cfg["methods"] = ["foo"]
    with pytest.raises(ConfigError, match="unknown method 'foo'"):
        check_config(cfg)


def test_config_error_is_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


# --- (d) Snakemake's validate accepts the same schema --------------------------------------------


@pytest.mark.parametrize("files", [[CONFIG], [CONFIG, SMOKE]], ids=["default", "smoke"])
def test_snakemake_validate_accepts_config(files: list[Path]) -> None:
    from snakemake.utils import validate

    raw: dict = {}
    for path in files:
        raw = merge(raw, _yaml(path))
    cfg = copy.deepcopy(raw)
    validate(cfg, str(SCHEMA_PATH))
    assert cfg == with_defaults(raw)  # Snakemake fills the same defaults as with_defaults


def test_snakemake_validate_rejects_typo(base: dict) -> None:
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    cfg = copy.deepcopy(base)
    cfg["prune"]["tolerence"] = 0.01
    with pytest.raises(WorkflowError):
        validate(cfg, str(SCHEMA_PATH))


# --- the schema itself ---------------------------------------------------------------------------

# Keys without a default on purpose: required keys, and keys whose absence means "inherit".
NO_DEFAULT = {"models.*.name", "models.*.timm", "models.*.train.*", "paper.references.*.model"}
NO_DEFAULT |= {"paper.references.*.label", "paper.references.*.dataset"}
NO_DEFAULT |= {"agents.bounds.*.match", "agents.bounds.*.max_ratio", "agents.bounds.*.max_ratio.*"}
NO_DEFAULT |= {"tracking.tags.*"}  # a tag value has no sensible default
# Free-form objects (checked elsewhere or by later issues).
FREE_FORM = {"models.*.overrides", "method_settings", "method_settings.*"}
# Checked by check_config against the finetune section it overrides.
FREE_FORM |= {"models.*.finetune"}
FREE_FORM |= {"agents.bounds.*.max_ratio", "tracking.tags"}


def _properties(schema: dict, path: str = "") -> list[tuple[str, dict]]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        here = f"{path}.{key}" if path else key
        out.append((here, sub))
        out.extend(_properties(sub, here))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out.append((f"{path}.*", extra))
        out.extend(_properties(extra, f"{path}.*"))
    if isinstance(schema.get("items"), dict):
        out.extend(_properties(schema["items"], f"{path}.*"))
    return out


def test_schema_is_valid_and_complete() -> None:
    from jsonschema import Draft202012Validator

    schema = _yaml(SCHEMA_PATH)
    Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    props = _properties(schema)
    assert props
    for path, sub in props:
        if path.endswith(".*") and path in FREE_FORM:
            continue
        assert sub.get("description"), f"{path} has no description"
        generic = path.split(".")
        starred = ".".join(generic[:-1] + ["*"])
        if path not in NO_DEFAULT and starred not in NO_DEFAULT:
            assert "default" in sub, f"{path} has no default"
        if sub.get("type") == "object" and path not in FREE_FORM:
            assert sub.get("additionalProperties") is False, f"{path} allows unknown keys"
