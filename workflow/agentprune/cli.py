"""The ``agentprune`` command line: one pruning run outside Snakemake.

``agentprune prune`` runs the pipeline steps of :mod:`agentprune.steps` for one model, one method
and one target into a single output directory::

    agentprune prune --model deit_base_distilled_patch16_224 --method magnitude_l2 \\
        --target-gmacs 4.16 --dataset synthetic --no-pretrained --out /tmp/deitb

A target in GMACs is met within ``prune.gmacs_tolerance`` (0.5 %) of itself. ``--method isomorphic``
finds its published recipe for the model and target in ``config/paper.yaml``;
``--method-setting mode=as_published`` prunes once at the published ratios instead of searching.

The output directory receives the same artifacts as a workflow run: ``dataset.json``,
``base/model.{safetensors,json}``, ``base/metrics.json``, ``profile.json``, ``plan.json``,
``pruned.*``, ``prune_report.json``, ``finetuned.*``, ``finetune_report.json``, ``metrics.json``,
plus the effective ``config.json``.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from pathlib import Path
from typing import Any

REPO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "config.yaml"
# The paper grid's config: its method_settings.<method>.published rows (the published recipes per
# architecture and GMACs target) serve every run whose config has none.
PAPER_CONFIG = REPO_CONFIG.with_name("paper.yaml")
DEFAULT_IMG_SIZE = 224
DEFAULT_NUM_CLASSES = 1000
# Settings of --dataset synthetic: structural runs (MACs targets) that must stay cheap on a CPU.
SYNTHETIC_SAMPLES = 16
SYNTHETIC_EVALUATE = {"batch_size": 16, "throughput_batch": 8, "warmup": 1, "repeats": 2}
SYNTHETIC_PRUNE = {"calibration_batches": 1, "batch_size": 4}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``agentprune`` command.

    Returns:
        A parser with one sub-command, ``prune``.
    """
    from agentprune import data

    parser = argparse.ArgumentParser(
        prog="agentprune", description="Structured pruning runs outside the Snakemake workflow."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    prune = sub.add_parser(
        "prune",
        help="prune one model with one method to one target",
        description=(
            "Create (or download) a base model, prune it with METHOD to a MACs target, fine-tune "
            "and evaluate it; every artifact is written to --out."
        ),
    )
    prune.add_argument(
        "--model",
        required=True,
        metavar="M",
        help="a config.models name, or any timm model name (e.g. deit_tiny_patch16_224)",
    )
    prune.add_argument("--method", required=True, help="a registered pruning method")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--ratio", type=float, metavar="R", help="fraction of the base MACs to remove, in (0, 1)"
    )
    target.add_argument(
        "--target-gmacs",
        type=float,
        metavar="G",
        help="MACs of the pruned model in G (1e9); the ratio is 1 - G / base GMACs",
    )
    prune.add_argument(
        "--dataset",
        choices=data.DATASETS,
        help="data set (default: the config's dataset.name); synthetic is for structural runs",
    )
    prune.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="start from the timm hub weights instead of a random initialisation",
    )
    prune.add_argument(
        "--config",
        metavar="FILE",
        help=f"YAML config (default: {REPO_CONFIG} if it exists, else the schema defaults)",
    )
    prune.add_argument("--out", required=True, metavar="DIR", help="output directory")
    prune.add_argument("--seed", type=int, default=0, help="seed of the pruning run (default 0)")
    prune.add_argument(
        "--finetune-epochs",
        type=float,
        metavar="N",
        help="fine-tuning epochs (default: the config's, or 0 with --dataset synthetic)",
    )
    prune.add_argument(
        "--img-size",
        type=int,
        metavar="N",
        help="input side in pixels (default: the config's for digits, else the model's default)",
    )
    prune.add_argument("--data-root", metavar="PATH", help="directory holding the data set")
    prune.add_argument(
        "--method-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=(
            "set method_settings.<METHOD>.KEY to VALUE (read as YAML), e.g. mode=as_published or "
            "round_to=4; repeatable. Published recipes (method_settings.<METHOD>.published) come "
            f"from the config, else from {PAPER_CONFIG.name}"
        ),
    )
    prune.set_defaults(command_parser=prune)  # argument errors show the sub-command's usage
    return parser


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad arguments early with a one-line ``parser.error`` (exit status 2)."""
    from agentprune.pruning import catalog

    if args.ratio is not None and not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be in (0, 1), got {args.ratio:g}")
    if args.target_gmacs is not None and not (
        math.isfinite(args.target_gmacs) and args.target_gmacs > 0
    ):
        parser.error(f"--target-gmacs must be > 0, got {args.target_gmacs:g}")
    if args.method not in catalog.names():
        parser.error(f"unknown method {args.method!r} (registered: {', '.join(catalog.names())})")
    if args.config is not None and not Path(args.config).is_file():
        parser.error(f"--config file {args.config!r} not found")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.finetune_epochs is not None and not (
        math.isfinite(args.finetune_epochs) and args.finetune_epochs >= 0
    ):
        parser.error(f"--finetune-epochs must be >= 0, got {args.finetune_epochs:g}")
    if args.img_size is not None and args.img_size < 1:
        parser.error(f"--img-size must be >= 1, got {args.img_size}")
    try:
        parse_method_settings(args.method_setting)
    except ValueError as err:
        parser.error(str(err))


def parse_method_settings(items: list[str]) -> dict[str, Any]:
    """``--method-setting KEY=VALUE`` items as a dict, each VALUE read as YAML.

    Raises:
        ValueError: naming the first item that is not ``KEY=VALUE`` or whose value is not YAML.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-setting {item!r} is not KEY=VALUE")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            first = str(err).splitlines()[0]
            raise ValueError(f"--method-setting {item!r}: VALUE is not YAML ({first})") from err
    return out


def paper_published(method: str) -> list[dict[str, Any]] | None:
    """``method_settings.<method>.published`` of :data:`PAPER_CONFIG` (None if it has none)."""
    import yaml

    if not PAPER_CONFIG.is_file():
        return None
    paper = yaml.safe_load(PAPER_CONFIG.read_text(encoding="utf-8")) or {}
    settings = (paper.get("method_settings") or {}).get(method) or {}
    return settings.get("published") or None


def _timm_cfg_value(timm_name: str, key: str) -> Any:
    """A value of the pretrained cfg of ``timm_name`` (None if the cfg does not set it).

    Raises:
        ValueError: if ``timm_name`` is not a timm model name.
    """
    import timm

    try:
        return timm.get_pretrained_cfg_value(timm_name, key)
    except RuntimeError as err:
        raise ValueError(f"model {timm_name!r} is not a timm model name") from err


def _default_img_size(timm_name: str) -> int:
    """The side of the model's default input (``pretrained_cfg['input_size']``), else 224."""
    size = _timm_cfg_value(timm_name, "input_size")
    return int(size[-1]) if size else DEFAULT_IMG_SIZE


def _model_entry(config: dict[str, Any], model: str, pretrained: bool) -> dict[str, Any]:
    """The ``models`` entry for ``--model``: the config's entry whose name or timm name matches,
    else a fresh entry for the timm model; ``pretrained`` comes from the flag."""
    for entry in config["models"]:
        if model in (entry["name"], entry["timm"]):
            entry = copy.deepcopy(entry)
            break
    else:
        entry = {
            "name": re.sub(r"[^A-Za-z0-9_.-]+", "_", model),
            "timm": model,
            "overrides": {},
            "train": {},
        }
    entry["pretrained"] = pretrained
    if not pretrained:
        entry["pretrained_file"] = None  # --no-pretrained: a random initialisation, always
    return entry


def _load_config(path: str | None) -> dict[str, Any]:
    """``--config FILE``, else the repository's ``config/config.yaml``, else the schema defaults."""
    from agentprune.resolve import load_config

    if path is not None:
        return load_config(path)
    if REPO_CONFIG.is_file():
        return load_config(REPO_CONFIG)
    return load_config()


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The effective configuration of one ``prune`` run.

    The loaded config is overridden by the arguments: ``dataset`` (name, root, image size),
    ``models`` (exactly the one model), ``method_settings`` (the method's only, with the published
    recipes of :data:`PAPER_CONFIG` if the config has none, and ``--method-setting`` on top), and,
    for ``--dataset synthetic``, the cheap settings of a structural run (no base training, no
    fine-tuning unless asked, tiny evaluation and calibration).
    The result is not validated again: ``base_training.epochs = 0`` is deliberate here.

    Args:
        args: parsed ``prune`` arguments.

    Returns:
        The configuration (a fresh dict).

    Raises:
        ConfigError: if the config file is invalid.
        ValueError: if ``--model`` is neither a config model nor a timm model.
    """
    config = _load_config(args.config)
    dataset = config["dataset"]
    if args.dataset is not None:
        dataset["name"] = args.dataset
    if args.data_root is not None:
        dataset["root"] = args.data_root
    entry = _model_entry(config, args.model, bool(args.pretrained))
    timm_name = entry["timm"]
    default_size = _default_img_size(timm_name)
    overrides = entry["overrides"]
    if args.img_size is not None:
        img_size = args.img_size
    elif dataset["name"] == "digits":
        img_size = int(dataset["img_size"])
    elif isinstance(overrides.get("img_size"), int):
        img_size = int(overrides["img_size"])  # the config shrank this model's input already
    else:
        img_size = default_size
    dataset["img_size"] = img_size
    # Models with a fixed input size (ViTs) must be created at the data's size.
    fixed = bool(_timm_cfg_value(timm_name, "fixed_input_size"))
    if "img_size" in overrides or (fixed and img_size != default_size):
        overrides["img_size"] = img_size
    config["models"] = [entry]
    if dataset["name"] == "synthetic":
        classes = _timm_cfg_value(timm_name, "num_classes")
        dataset["synthetic_classes"] = int(classes) if classes else DEFAULT_NUM_CLASSES
        dataset["synthetic_samples"] = SYNTHETIC_SAMPLES
        config["base_training"]["epochs"] = 0
        entry["train"].pop("epochs", None)
        config["finetune"]["epochs"] = args.finetune_epochs or 0
        config["evaluate"].update(SYNTHETIC_EVALUATE)
        config["prune"].update(SYNTHETIC_PRUNE)
    elif args.finetune_epochs is not None:
        config["finetune"]["epochs"] = args.finetune_epochs
    config["methods"] = [args.method]
    config["paper"]["reference_method"] = args.method  # the one method is its own reference
    settings = dict(config["method_settings"].get(args.method, {}))
    if "published" not in settings and paper_published(args.method):
        settings["published"] = paper_published(args.method)
    settings.update(parse_method_settings(args.method_setting))
    config["method_settings"] = {args.method: settings} if settings else {}
    config["seeds"] = [args.seed]
    from agentprune import resolve
    from agentprune.config import with_defaults

    # The CLI is an entry point: the one fill of the schema's defaults (a fresh models entry).
    config = with_defaults(config)
    # The method's settings now, before any data set, model or profile is built.
    resolve.method_settings(config, args.method)
    return config


def run_prune(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    """Run the pipeline steps of one pruning run into ``args.out``.

    Args:
        args: parsed ``prune`` arguments.
        config: the effective configuration from :func:`build_config`.

    Returns:
        The run's ``metrics.json`` content.

    Raises:
        ValueError: if ``--target-gmacs`` is not below the base model's MACs.
    """
    import dataclasses

    from agentprune import resolve, steps
    from agentprune.pruning import catalog

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_name = config["models"][0]["name"]
    steps.write_json(out / "config.json", config)
    steps.prepare_dataset(resolve.data(config), out / "dataset.json")
    base_stem = out / "base" / "model"
    base = steps.base_model(
        resolve.base_model_step(config, model_name), base_stem, out / "base" / "metrics.json"
    )
    if args.target_gmacs is not None:
        ratio = 1.0 - args.target_gmacs * 1e9 / base["macs"]
        if not 0.0 < ratio < 1.0:
            raise ValueError(
                f"--target-gmacs {args.target_gmacs:g} must be below the base model's "
                f"{base['macs'] / 1e9:.4g} GMACs"
            )
    else:
        ratio = float(args.ratio)
    strategy = catalog.get(args.method)
    profile_json = out / "profile.json"
    if strategy.needs_profile:
        steps.profile(resolve.profile_step(config, model_name), base_stem, profile_json)
    else:
        steps.write_json(profile_json, {})
    plan_json = out / "plan.json"
    plan_step = resolve.plan_step(config, args.method, model_name, ratio)
    if args.target_gmacs is not None:  # the CLI's own target, not one of the config's
        plan_step = dataclasses.replace(plan_step, target_gmacs=args.target_gmacs)
    steps.plan(plan_step, args.seed, profile_json, plan_json, base_stem)
    pruned_stem, finetuned_stem = out / "pruned", out / "finetuned"
    steps.prune(
        resolve.prune_step(config, model_name),
        plan_json,
        base_stem,
        pruned_stem,
        out / "prune_report.json",
    )
    steps.finetune(
        resolve.finetune_step(config, model_name),
        plan_json,
        pruned_stem,
        base_stem,
        finetuned_stem,
        out / "finetune_report.json",
    )
    identity = {
        "dataset": config["dataset"]["name"],
        "model": model_name,
        "ratio": ratio,
        "seed": args.seed,
    }
    return steps.evaluate(
        resolve.evaluate_step(config, model_name),
        identity,
        plan_json,
        out / "base" / "metrics.json",
        out / "prune_report.json",
        out / "finetune_report.json",
        pruned_stem,
        finetuned_stem,
        out / "metrics.json",
    )


def summary(metrics: dict[str, Any], target_gmacs: float | None = None) -> str:
    """The one-line summary of a run: method, target, achieved, MACs, params, top-1.

    Args:
        metrics: a ``metrics.json`` dict.
        target_gmacs: the ``--target-gmacs`` value, if the target was given in GMACs.

    Returns:
        One line of text.
    """
    target = f"target {metrics['target']:.4f}"
    if target_gmacs is not None:
        target += f" ({target_gmacs:g} GMACs)"
    return (
        f"{metrics['model']}/{metrics['method']}: {target}, achieved {metrics['achieved']:.4f} "
        f"of MACs removed | GMACs {metrics['macs_base'] / 1e9:.4f} -> {metrics['macs'] / 1e9:.4f} "
        f"| params {metrics['params_base'] / 1e6:.2f}M -> {metrics['params'] / 1e6:.2f}M "
        f"| top1 {metrics['top1_pruned']:.2f}% -> {metrics['top1']:.2f}% after fine-tuning "
        f"(base {metrics['top1_base']:.2f}%)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``agentprune`` console script.

    Args:
        argv: the arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input (a one-line ``agentprune: error:`` message on
        stderr). Argument errors exit through ``SystemExit(2)`` from argparse.
    """
    from agentprune.data import DataError
    from agentprune.models import CheckpointError
    from agentprune.pruning.registry import UnknownMethodError
    from agentprune.pruning.structured import PruningError
    from agentprune.settings import ConfigError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prune":
        _validate(args.command_parser, args)
    try:
        config = build_config(args)
        metrics = run_prune(args, config)
    except (
        CheckpointError,
        DataError,
        UnknownMethodError,
        ConfigError,
        PruningError,
        ValueError,
        OSError,
    ) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"agentprune: error: {message}", file=sys.stderr)
        return 2
    print(summary(metrics, args.target_gmacs), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
