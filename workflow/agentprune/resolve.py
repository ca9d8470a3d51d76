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
from agentprune.lm import settings as lm_settings
from agentprune.lm import strategies as lm_strategies
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

LM_KEYS = ("family", "source", "gguf_file", "dtype")
"""Keys of a ``models`` entry that only an lm model reads (its family and where it comes from)."""


def model_entry(config: Config, name: str) -> Mapping[str, Any]:
    """The ``models`` entry called ``name``."""
    for entry in config["models"]:
        if entry["name"] == name:
            return entry
    raise KeyError(f"model {name!r} is not in config.models")


def family(config: Config, name: str) -> str:
    """A model's family (``models[].family``: ``vision`` or ``lm``)."""
    return str(model_entry(config, name)["family"])


def is_lm(config: Config, name: str | None) -> bool:
    """Whether model ``name`` is a causal LM (its steps get the lm family's settings)."""
    return name is not None and family(config, name) == lm_settings.FAMILY


def lm_source(config: Config, name: str) -> lm_settings.ModelSource:
    """Where an lm model comes from (``models[].source``, ``gguf_file``, ``dtype``)."""
    entry = model_entry(config, name)
    return lm_settings.ModelSource(
        name=str(entry["source"]), gguf_file=entry["gguf_file"], dtype=str(entry["dtype"])
    )


def lm_text(config: Config) -> lm_settings.LMText:
    """The text of an lm study: the corpus (``dataset.name``, ``dataset.root``) and the
    windows (``lm``)."""
    lm = config["lm"]
    return lm_settings.LMText(
        corpus=config["dataset"]["name"],
        root=config["dataset"]["root"],
        seq_len=int(lm["seq_len"]),
        calibration_sequences=int(lm["calibration_sequences"]),
        evaluation_sequences=lm["evaluation_sequences"],
    )


def lm_engine(config: Config) -> lm_settings.EngineSettings:
    """The layer-wise engine of an lm study (``lm.engine``, on ``lm.device``)."""
    engine = config["lm"]["engine"]
    return lm_settings.EngineSettings(
        sequential=bool(engine["sequential"]),
        batch_size=int(engine["batch_size"]),
        device=str(config["lm"]["device"]),
    )


def weights(config: Config, name: str) -> WeightsEntry | lm_settings.LMWeights:
    """A model's weights part (what ``download_weights`` fetches and checks)."""
    if is_lm(config, name):
        return lm_settings.LMWeights(
            family=lm_settings.FAMILY, name=name, source=lm_source(config, name)
        )
    entry = model_entry(config, name)
    keys = WeightsEntry.__dataclass_fields__
    return build(WeightsEntry, {k: entry[k] for k in keys}, f"models.{name}")


def data(config: Config) -> DataSettings:
    """The data set."""
    return build(DataSettings, config["dataset"], "dataset")


def model(config: Config, name: str) -> ModelEntry:
    """A model's base-model part (what ``download_weights`` and ``download_model`` read)."""
    entry = model_entry(config, name)
    keys = STUDY_KEYS + LM_KEYS
    return build(ModelEntry, {k: v for k, v in entry.items() if k not in keys}, f"models.{name}")


def train_config(section: Mapping[str, Any], where: str) -> TrainConfig:
    """A training section (``finetune``-shaped) as a :class:`TrainConfig`."""
    return build(TrainConfig, section, where)


def merged(section: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``section`` with ``override`` merged over it, dicts key by key (``distill``)."""
    out = dict(section)
    for key, value in override.items():
        out[key] = {**out[key], **value} if isinstance(value, Mapping) else value
    return out


def base_model_step(config: Config, name: str) -> BaseModelStep | lm_settings.LMBaseStep:
    """The ``download_model`` step of one model: ``base_training`` + ``models[].train`` (an lm
    model: its source, the text and where its dense perplexity is measured)."""
    if is_lm(config, name):
        return lm_settings.LMBaseStep(
            family=lm_settings.FAMILY,
            dataset=config["dataset"]["name"],
            model=name,
            source=lm_source(config, name),
            text=lm_text(config),
            batch_size=int(config["lm"]["batch_size"]),
            device=str(config["lm"]["device"]),
        )
    hp = merged(config["base_training"], model_entry(config, name)["train"])
    seed = int(hp.pop("seed"))
    return BaseModelStep(
        model=model(config, name),
        data=data(config),
        training=train_config(hp, f"models.{name}.train"),
        seed=seed,
        eval_batch=int(config["evaluate"]["batch_size"]),
    )


def profile_step(
    config: Config, name: str | None = None
) -> ProfileStep | lm_settings.LMProfileStep:
    """The ``profile`` step (of model ``name``: an lm model's profile reads no data)."""
    if is_lm(config, name):
        return lm_settings.LMProfileStep(family=lm_settings.FAMILY)
    return ProfileStep(data(config), build(ProfileSettings, config["profile"], "profile"))


def structured_ratios(config: Config, name: str) -> list[float]:
    """A model's structured ratios: from its ``targets_gmacs`` when it has any, else
    ``ratios``."""
    entry = model_entry(config, name)
    if entry["targets_gmacs"]:
        return [target_ratio(t, entry["base_gmacs"]) for t in entry["targets_gmacs"]]
    return [float(r) for r in config["ratios"]]


def sparsity_wildcard(value: float | str) -> str:
    """The ``{ratio}`` wildcard of a ``sparsities`` entry: ``0.5 -> '0.5'``, ``'2:4' -> '2of4'``."""
    if isinstance(value, str):
        return lm_settings.sparsity_wildcard(value)
    return fmt_ratio(value)


def method_ratios(config: Config, method: str, name: str) -> list[str]:
    """The ``{ratio}`` wildcards of a method on a model: MACs fractions for structured methods
    (per model), sparsities otherwise (an N:M sparsity such as ``2:4`` is spelled ``2of4``)."""
    if registry.get(method).family == "structured":
        return [fmt_ratio(r) for r in structured_ratios(config, name)]
    return [sparsity_wildcard(r) for r in config["sparsities"]]


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


def lm_method_settings(config: Config, method: str) -> dict[str, Any]:
    """A method's settings on an lm model in plain form: its part of the ``lm`` section with its
    ``method_settings`` entry merged over it (see ``LMStrategy.resolve``)."""
    overrides = config["method_settings"].get(method, {})
    return lm_strategies.get(method).resolve(config["lm"], overrides)


def plan_step(
    config: Config, method: str, name: str, ratio: float | str
) -> PlanStep | lm_settings.LMPlanStep:
    """The ``plan`` step of one (method, model, ratio); ``ratio`` is the ``{ratio}`` wildcard."""
    if is_lm(config, name):
        return lm_settings.LMPlanStep(
            family=lm_settings.FAMILY,
            method=method,
            dataset=config["dataset"]["name"],
            model=name,
            ratio=str(ratio),
            method_settings=lm_method_settings(config, method),
            engine=lm_engine(config),
        )
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


def prune_step(config: Config, name: str | None = None) -> PruneStep | lm_settings.LMPruneStep:
    """The ``prune`` step (of model ``name``: an lm model's calibration text)."""
    if is_lm(config, name):
        return lm_settings.LMPruneStep(
            family=lm_settings.FAMILY,
            text=lm_text(config),
            batch_size=int(config["lm"]["batch_size"]),
            device=str(config["lm"]["device"]),
        )
    return PruneStep(data(config), int(config["prune"]["batch_size"]))


def finetune_recipe(config: Config, name: str) -> TrainConfig:
    """A model's fine-tuning recipe: ``finetune`` with ``models[].finetune`` merged over it, and
    ``epochs`` multiplied by ``epochs_scale``."""
    section = merged(config["finetune"], model_entry(config, name)["finetune"])
    scale = float(section.pop("epochs_scale"))
    if scale != 1.0:
        section["epochs"] = float(section["epochs"]) * scale
    return train_config(section, f"models.{name}.finetune")


def finetune_step(config: Config, name: str) -> FinetuneStep | lm_settings.LMFinetuneStep:
    """The ``finetune`` step of a model's runs (an lm model's pruned model passes through)."""
    if is_lm(config, name):
        return lm_settings.LMFinetuneStep(family=lm_settings.FAMILY)
    return FinetuneStep(data(config), finetune_recipe(config, name))


def evaluate_step(config: Config, name: str) -> EvaluateStep | lm_settings.LMEvaluateStep:
    """The ``evaluate`` step of a model's runs (an lm model: perplexity)."""
    if is_lm(config, name):
        return lm_settings.LMEvaluateStep(
            family=lm_settings.FAMILY,
            text=lm_text(config),
            batch_size=int(config["lm"]["batch_size"]),
            device=str(config["lm"]["device"]),
        )
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
