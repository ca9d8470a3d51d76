"""From the filled config to each step's typed settings: one function per step.

This is the only module below the entry points that reads the whole config: the Snakemake rules
(through ``rules/common.smk``) and the CLI call these functions, and every step receives only what
they return (see :mod:`agentprune.settings` for the whole road of a value). The config must have
been prepared by :func:`agentprune.config.prepare` (checked, every schema default filled in).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agentprune import config as configuration
from agentprune.pruning import catalog, registry
from agentprune.settings import (
    BaseModelStep,
    DataSettings,
    EvaluateSettings,
    EvaluateStep,
    FinetuneStep,
    ModelEntry,
    PaperSettings,
    PlanStep,
    ProfileSettings,
    ProfileStep,
    PruneStep,
    StatsSettings,
    TrackingSettings,
    TrainConfig,
    WeightsEntry,
    build,
    fmt_ratio,
    plain,
    target_ratio,
)

Config = Mapping[str, Any]


def prepare(config: dict) -> dict:
    """The entry points' preparation of a merged config, in place: checked against the schema
    and the registered methods, every default filled in (see :func:`agentprune.config.prepare`)."""
    return configuration.prepare(config, catalog.REGISTRY)


def load_config(*paths: Any, overrides: dict | None = None) -> dict:
    """Load, merge and prepare config files (see :func:`agentprune.config.load_config`)."""
    return configuration.load_config(*paths, methods=catalog.REGISTRY, overrides=overrides)


STUDY_KEYS = ("targets_gmacs", "base_gmacs", "finetune", "train")
"""Keys of a ``models`` entry that are not the base model's structure or weights."""


def model_entry(config: Config, name: str) -> Mapping[str, Any]:
    """The ``models`` entry called ``name``."""
    for entry in config["models"]:
        if entry["name"] == name:
            return entry
    raise KeyError(f"model {name!r} is not in config.models")


def weights(config: Config, name: str) -> WeightsEntry:
    """A model's weights part (what ``download_weights`` fetches and checks)."""
    entry = model_entry(config, name)
    keys = WeightsEntry.__dataclass_fields__
    return build(WeightsEntry, {k: entry[k] for k in keys}, f"models.{name}")


def data(config: Config) -> DataSettings:
    """The data set."""
    return build(DataSettings, config["dataset"], "dataset")


def model(config: Config, name: str) -> ModelEntry:
    """A model's base-model part (what ``download_weights`` and ``download_model`` read)."""
    entry = model_entry(config, name)
    return build(
        ModelEntry, {k: v for k, v in entry.items() if k not in STUDY_KEYS}, f"models.{name}"
    )


def train_config(section: Mapping[str, Any], where: str) -> TrainConfig:
    """A training section (``finetune``-shaped) as a :class:`TrainConfig`."""
    return build(TrainConfig, section, where)


def merged(section: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` with ``override`` merged over it, dicts key by key (``distill``)."""
    out = dict(section)
    for key, value in override.items():
        out[key] = {**out[key], **value} if isinstance(value, Mapping) else value
    return out


def base_model_step(config: Config, name: str) -> BaseModelStep:
    """The ``download_model`` step of one model: ``base_training`` + ``models[].train``."""
    hp = merged(config["base_training"], model_entry(config, name)["train"])
    seed = int(hp.pop("seed"))
    return BaseModelStep(
        model=model(config, name),
        data=data(config),
        training=train_config(hp, f"models.{name}.train"),
        seed=seed,
        eval_batch=int(config["evaluate"]["batch_size"]),
    )


def profile_step(config: Config) -> ProfileStep:
    """The ``profile`` step."""
    return ProfileStep(data(config), build(ProfileSettings, config["profile"], "profile"))


def structured_ratios(config: Config, name: str) -> list[float]:
    """A model's structured ratios: from its ``targets_gmacs`` when it has any, else
    ``ratios``."""
    entry = model_entry(config, name)
    if entry["targets_gmacs"]:
        return [target_ratio(t, entry["base_gmacs"]) for t in entry["targets_gmacs"]]
    return [float(r) for r in config["ratios"]]


def method_ratios(config: Config, method: str, name: str) -> list[str]:
    """The ``{ratio}`` wildcards of a method on a model: MACs fractions for structured methods
    (per model), sparsities otherwise."""
    if registry.get(method).family == "structured":
        return [fmt_ratio(r) for r in structured_ratios(config, name)]
    return [fmt_ratio(r) for r in config["sparsities"]]


def target_gmacs(config: Config, name: str, ratio: float) -> float | None:
    """The GMACs target behind a structured ratio of a model (None when the ratio was not given
    in GMACs): a GMACs target is searched within ``prune.gmacs_tolerance`` of itself."""
    entry = model_entry(config, name)
    for target in entry["targets_gmacs"]:
        if fmt_ratio(target_ratio(target, entry["base_gmacs"])) == fmt_ratio(ratio):
            return float(target)
    return None


def method_settings(config: Config, method: str) -> dict[str, Any]:
    """A method's own settings in plain form: the config sections it declares plus its
    ``method_settings`` overrides, resolved by the method (see ``Method.resolve_settings``)."""
    strategy = registry.get(method)
    sections = {name: config[name] for name in strategy.sections}
    overrides = config["method_settings"].get(method, {})
    return plain(strategy.resolve_settings(sections, overrides))


def plan_step(config: Config, method: str, name: str, ratio: float) -> PlanStep:
    """The ``plan`` step of one (method, model, ratio)."""
    strategy = registry.get(method)
    gmacs = target_gmacs(config, name, ratio) if strategy.family == "structured" else None
    return PlanStep(
        method=method,
        dataset=config["dataset"]["name"],
        model=name,
        timm=model_entry(config, name)["timm"],
        ratio=float(ratio),
        target_gmacs=gmacs,
        method_settings=method_settings(config, method),
        data=data(config),
        calibration_batch_size=int(config["prune"]["batch_size"]),
    )


def prune_step(config: Config) -> PruneStep:
    """The ``prune`` step."""
    return PruneStep(data(config), int(config["prune"]["batch_size"]))


def finetune_recipe(config: Config, name: str) -> TrainConfig:
    """A model's fine-tuning recipe: ``finetune`` with ``models[].finetune`` merged over it, and
    ``epochs`` multiplied by ``epochs_scale``."""
    section = merged(config["finetune"], model_entry(config, name)["finetune"])
    scale = float(section.pop("epochs_scale"))
    if scale != 1.0:
        section["epochs"] = float(section["epochs"]) * scale
    return train_config(section, f"models.{name}.finetune")


def finetune_step(config: Config, name: str) -> FinetuneStep:
    """The ``finetune`` step of a model's runs."""
    return FinetuneStep(data(config), finetune_recipe(config, name))


def evaluate_step(config: Config, name: str) -> EvaluateStep:
    """The ``evaluate`` step of a model's runs."""
    return EvaluateStep(
        data=data(config),
        evaluate=build(EvaluateSettings, config["evaluate"], "evaluate"),
        tracking=build(TrackingSettings, config["tracking"], "tracking"),
        recipe=finetune_recipe(config, name),
    )


def stats_settings(config: Config) -> StatsSettings:
    """The ``stats`` step."""
    return build(StatsSettings, config["stats"], "stats")


def ablations(config: Config) -> dict[str, str]:
    """Method -> its registered ablation, for the study's methods whose ablation is in the study
    too (the results table pairs them)."""
    methods = list(config["methods"])
    pairs = {name: registry.get(name).ablation for name in methods}
    return {name: ablation for name, ablation in pairs.items() if ablation in methods}


def paper_settings(config: Config) -> PaperSettings:
    """The ``paper`` step."""
    paper = config["paper"]
    return PaperSettings(
        reference_method=paper["reference_method"],
        references=list(paper["references"]),
        ablations=ablations(config),
    )
