"""The typed settings every step receives, and the one way to build them from a config section.

How a value travels from the config to the code that uses it:

1. **Schema.** ``workflow/schemas/config.schema.yaml`` is the one place for defaults. The entry
   point (the Snakefile, or the CLI) checks the merged config and fills every default in once
   (:func:`agentprune.config.prepare`).
2. **Resolve.** :mod:`agentprune.resolve` has one function per step (``plan_step``,
   ``finetune_step``, ...) that reads the filled config and returns that step's settings object
   from this module. It is the only code that reads the whole config. The Snakemake rules call
   them (through ``rules/common.smk``) to build their ``params``; the CLI calls the same functions.
3. **Params.** A rule's ``params`` hold the plain-dict form (:func:`plain`) of the settings, so the
   params Snakemake hashes for its rerun triggers are exactly the data the step reads: changing a
   value reruns the jobs that read it and no others.
4. **Script.** The rule's thin script turns the params back into the settings object (:func:`build`)
   and calls one function of :mod:`agentprune.steps` with it.
5. **Library.** The step hands each part on as a typed object (a method's settings to
   ``Method.plan``, a ``TrainConfig`` to ``train``, a ``DataSettings`` to ``data.load_splits``).

For example ``icbs.block_size``: schema default -> ``resolve.plan_step`` (through
``ICBS.resolve_settings``, into ``PlanStep.method_settings``) -> the plan rule's ``params.step`` ->
``scripts/plan.py`` -> ``steps.plan`` -> ``ICBS.plan``, which writes it into ``plan.json``'s
``pruner`` -> ``steps.prune`` -> ``ICBS.prune`` -> ``icbs_prune(cfg.block_size)``. The ``{ratio}``
wildcard: ``resolve.grid`` spells it -> the rule's wildcard -> ``resolve.plan_step(ratio=...)`` ->
``PlanStep.ratio`` -> ``steps.plan`` -> ``Method.plan``'s target -> ``plan.json`` -> the pruner.

This module imports nothing heavy (no torch): the Snakefile and every script import it.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message is one line naming the offending key."""


def fail(where: str, message: str) -> ConfigError:
    """A one-line :class:`ConfigError` for the key at dotted path ``where``."""
    location = f"at {where!r}" if where else "at top level"
    return ConfigError(" ".join(f"config error {location}: {message}".split()))


def _dataclass_of(hint: Any) -> type | None:
    """The dataclass a type hint names (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return options[0]
    return None


_SIMPLE = {"bool": bool, "int": int, "float": float, "str": str, "list": list, "dict": dict}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether ``value`` fits a simple type hint (``int``, ``float | None``, ``list[str]``,
    ``dict[str, Any]``, ``str | bool``...); anything else (a dataclass, ``Any``) passes."""
    options = (
        typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType)
        else (hint,)
    )
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return True
        if option is Any or dataclasses.is_dataclass(option):
            return True
        if origin is bool and isinstance(value, bool):
            return True
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if origin in (str, list, dict) and isinstance(value, origin):
            return True
    return False


def unknown_keys(keys: Any, known: list[str]) -> str:
    """``unknown key 'x' (did you mean 'y'?)`` for the keys of ``keys`` not in ``known``."""
    parts = []
    for key in [k for k in keys if k not in known]:
        close = difflib.get_close_matches(str(key), known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    noun = "key" if len(parts) == 1 else "keys"
    return f"unknown {noun} {', '.join(parts)}"


def build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """A settings dataclass from a (schema-filled) mapping: the one section -> dataclass helper.

    Every field without a default must be present (the schema filled the defaults in) and no
    other key may be; fields typed as a dataclass (or ``X | None``) are built recursively, and
    every other value must fit its field's type (``int``, ``float | None``, ``list``...).

    Args:
        cls: the dataclass.
        values: the section (a mapping of plain values, e.g. a rule's params).
        where: the section's dotted config path, for error messages.

    Raises:
        ConfigError: one line naming the unknown, missing or mistyped key.
    """
    if not isinstance(values, Mapping):
        raise fail(where, f"expected a mapping, got {type(values).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    if set(values) - set(known):
        raise fail(where, unknown_keys(values, known))
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise fail(f"{where}.{f.name}".strip("."), "missing key")
            continue
        value = values[f.name]
        key = f"{where}.{f.name}".strip(".")
        nested = _dataclass_of(hints[f.name])
        if nested is not None and isinstance(value, Mapping):
            value = build(nested, value, key)
        elif not _accepts(hints[f.name], value):
            raise fail(key, f"{value!r} is not of type {_type_name(hints[f.name])}")
        kwargs[f.name] = value
    return cls(**kwargs)


def _type_name(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def plain(obj: Any) -> dict[str, Any]:
    """The plain-dict form of a settings object (what a rule's params hold: Snakemake hashes
    plain values for its rerun triggers, not objects)."""
    return dataclasses.asdict(obj)


RATIO_DECIMALS = 4
"""Decimals of a ratio derived from a GMACs target (``1 - target / base``): the {ratio} wildcard."""


def fmt_ratio(ratio: float) -> str:
    """The {ratio} wildcard's spelling of a ratio (``0.3 -> '0.3'``, ``0.76471 -> '0.7647'``).

    Ratios are rounded to :data:`RATIO_DECIMALS` decimals first, so that a ratio derived from a
    GMACs target has a short, stable spelling.
    """
    return f"{round(float(ratio), RATIO_DECIMALS):g}"


def target_ratio(target_gmacs: float, base_gmacs: float) -> float:
    """The structured ratio (fraction of base MACs removed) that reaches a GMACs target,
    ``1 - target / base`` rounded to :data:`RATIO_DECIMALS` decimals."""
    return round(1.0 - float(target_gmacs) / float(base_gmacs), RATIO_DECIMALS)


# --- sections --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSettings:
    """The ``dataset`` section: the data set and its deterministic split (see the schema)."""

    name: str
    root: str | None
    img_size: int
    val_fraction: float
    test_fraction: float
    split_seed: int
    synthetic_classes: int
    synthetic_samples: int
    max_val_images: int


@dataclass(frozen=True)
class WeightsEntry:
    """The weights part of a ``models`` entry: which pretrained file is fetched and checked."""

    name: str
    timm: str
    pretrained: bool
    pretrained_file: str | None
    weights_cache: str | None
    sha256: str | None

    @property
    def is_pretrained(self) -> bool:
        """Whether the model starts from pretrained weights (hub or file)."""
        return bool(self.pretrained or self.pretrained_file)


@dataclass(frozen=True)
class ModelEntry(WeightsEntry):
    """The base-model part of a ``models`` entry: the weights and the timm creation overrides."""

    overrides: dict[str, Any]


@dataclass(frozen=True)
class ProfileSettings:
    """The ``profile`` section: the sensitivity analysis and its safety bounds."""

    sensitivity_ratios: list[float]
    calibration_batches: int
    batch_size: int
    max_loss_increase: float
    bound_floor: float
    bound_ceiling: float


@dataclass(frozen=True)
class SearchSettings:
    """How a structured method's MACs search lands (``prune`` section; ``plan.json``'s
    ``search``)."""

    tolerance: float
    gmacs_tolerance: float
    max_steps: int
    mode: str


@dataclass(frozen=True)
class EvaluateSettings:
    """The ``evaluate`` section: accuracy batch size and the speed measurement."""

    batch_size: int
    latency_batch: int
    throughput_batch: int
    warmup: int
    repeats: int


@dataclass(frozen=True)
class TrackingSettings:
    """The ``tracking`` section (see :mod:`agentprune.tracking`)."""

    backend: str
    project: str
    uri: str | None
    mode: str
    tags: dict[str, str]


@dataclass(frozen=True)
class StatsSettings:
    """The ``stats`` section."""

    confidence: float
    alpha: float


@dataclass(frozen=True)
class PaperSettings:
    """What the paper step renders with: the Δ reference, published rows, method -> ablation."""

    reference_method: str
    references: list[dict[str, Any]]
    ablations: dict[str, str]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one training run: a ``finetune`` or ``base_training`` section (the
    schema gives both the same keys; see it for each key's meaning and default).

    ``mixup``/``cutmix`` are the Beta alphas, ``ema`` the EMA decay (None: no EMA), ``drop_path``
    the deepest block's stochastic-depth rate (0: the model as built), ``distill`` holds
    ``enabled``, ``alpha``, ``temperature``, ``kind`` (soft|hard) and ``teacher`` (a timm name;
    None: the base model). ``min_lr_fraction`` and ``grad_clip`` are part of every recipe here and
    not configurable.
    """

    epochs: float
    lr: float
    weight_decay: float
    batch_size: int
    label_smoothing: float
    warmup_fraction: float
    distill: dict[str, Any]
    augment: bool
    mixup: float
    cutmix: float
    mixup_prob: float
    mixup_switch_prob: float
    randaug: str | None
    random_erase: float
    drop_path: float
    ema: float | None
    amp: str | bool
    channels_last: bool | str
    compile: bool
    workers: int
    resume: bool
    min_lr_fraction: float = 0.01
    grad_clip: float | None = 1.0

    @property
    def mixup_enabled(self) -> bool:
        """Whether mixup or cutmix mixes the batches."""
        return (self.mixup > 0 or self.cutmix > 0) and self.mixup_prob > 0

    @property
    def ema_enabled(self) -> bool:
        """Whether an EMA of the weights is kept (and becomes the result)."""
        return self.ema is not None and 0 < self.ema < 1


# --- the steps -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseModelStep:
    """The ``download_model`` step: one base model, trained here or adapted from weights."""

    model: ModelEntry
    data: DataSettings
    training: TrainConfig
    """The model's effective training settings (``base_training`` + ``models[].train``)."""
    seed: int
    """``base_training.seed``: base models are shared by every pruning seed."""
    eval_batch: int


@dataclass(frozen=True)
class ProfileStep:
    """The ``profile`` step."""

    data: DataSettings
    profile: ProfileSettings


@dataclass(frozen=True)
class PlanStep:
    """The ``plan`` step of one (method, model, ratio).

    Attributes:
        method: the registered method.
        dataset: the data set's name (identity in ``plan.json``).
        model: the ``models[].name``.
        timm: its timm name.
        ratio: the ``{ratio}`` wildcard (MACs fraction removed, or sparsity).
        target_gmacs: the target in GMACs when the model's targets were given so, else None.
        method_settings: the method's own settings (the plain form of its settings class; see
            ``Method.resolve_settings``): exactly the config it reads.
        data: the data set (planners that run trials load it).
        calibration_batch_size: images per calibration batch (``prune.batch_size``).
    """

    method: str
    dataset: str
    model: str
    timm: str
    ratio: float
    target_gmacs: float | None
    method_settings: dict[str, Any]
    data: DataSettings
    calibration_batch_size: int


@dataclass(frozen=True)
class PruneStep:
    """The ``prune`` step: the data its calibration batches come from."""

    data: DataSettings
    calibration_batch_size: int


@dataclass(frozen=True)
class FinetuneStep:
    """The ``finetune`` step: the model's effective recipe (``finetune`` + ``models[].finetune``,
    epochs multiplied by ``epochs_scale``)."""

    data: DataSettings
    recipe: TrainConfig


@dataclass(frozen=True)
class EvaluateStep:
    """The ``evaluate`` step."""

    data: DataSettings
    evaluate: EvaluateSettings
    tracking: TrackingSettings
    recipe: TrainConfig
    """The fine-tuning recipe, recorded with the run by the tracker."""
