"""One function per pipeline step. Snakemake's thin scripts and the ``agentprune`` CLI both call
these.

Each step reads its inputs from paths, writes its outputs to paths, and seeds everything from its
seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agentprune.pruning import methods

# torch, timm and the data sets are imported inside the steps that use them: the plan step and the
# Snakefile's config check then start in a fraction of a second.


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON artifact, with a one-line error naming the file if it is malformed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read JSON artifact ({err})") from err


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (a partial file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=float))
    os.replace(tmp, path)


@contextlib.contextmanager
def logged(log: str | Path | None, threads: int | None = None) -> Iterator[None]:
    """Send stdout/stderr (tqdm included) to ``log`` and pin torch's thread count."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    if not log:
        yield
        return
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with (
        open(log, "w") as fh,
        contextlib.redirect_stdout(fh),
        contextlib.redirect_stderr(fh),
    ):
        try:
            yield
        except BaseException:
            # Snakemake shows the rule's log on failure: put the traceback where it looks.
            traceback.print_exc(file=fh)
            raise


def model_config(config: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``models`` entry called ``name``."""
    for entry in config["models"]:
        if entry["name"] == name:
            return entry
    raise KeyError(f"model {name!r} is not in config.models")


def _num_classes(config: dict[str, Any]) -> int:
    from agentprune import data

    return data.num_classes(config["dataset"])


def _print(msg: str) -> None:
    print(msg, flush=True)


def prepare_dataset(config: dict[str, Any], out_json: str | Path) -> dict[str, Any]:
    """The download step for data: fetch (where the data set is downloadable) and describe the
    splits.

    The only step that downloads data (CIFAR): the ``download_data`` rule is local (the login node
    has the internet), and every other step reads what it left. It is also the first job of a
    study, so a missing or malformed data set fails here, before any training.
    """
    from agentprune import data

    splits = data.load_splits(config["dataset"], download=True)
    desc = data.describe(config["dataset"], splits)
    write_json(out_json, desc)
    return desc


def download_weights(
    config: dict[str, Any], model_name: str, out_json: str | Path
) -> dict[str, Any]:
    """The download step for pretrained weights: fetch into the cache, verify, write a manifest.

    Runs on the login node (a local rule); ``base_model`` then reads only the manifest's file, so
    compute jobs never touch the network. Honours ``HF_HUB_OFFLINE=1`` (cache only).
    """
    from agentprune import models

    manifest = models.pretrained_weights(model_config(config, model_name))
    write_json(out_json, manifest)
    _print(f"weights {model_name}: {manifest['source']} sha256 {manifest['sha256']}")
    return manifest


def base_model(
    config: dict[str, Any],
    model_name: str,
    out_stem: str | Path,
    metrics_json: str | Path,
    weights_json: str | Path | None = None,
) -> dict[str, Any]:
    """The base model of a study: pretrained weights, or training from scratch.

    Pretrained models (``pretrained: true`` or a ``pretrained_file``) load the verified file of
    ``weights_json`` (written by :func:`download_weights`; without it the weights are fetched
    here). When the data set's class count equals the weights' classifier width, the model is
    used as is: no training, weights bit-identical to the file. Otherwise timm re-initialises the
    classifier and the whole model is fine-tuned with the model's training settings
    (``base_training`` + ``models[].train``). Models without pretrained weights are trained from
    scratch with the same settings.

    Writes ``<out_stem>.safetensors``/``.json`` (the structure's ``extra`` holds the weights
    manifest and, for pretrained models, timm's data config) and the base ``metrics.json`` (test
    accuracy, MACs, ``pretrained_sha256``, ``head``).
    """
    from agentprune import data, models, train
    from agentprune import evaluate as ev

    entry = model_config(config, model_name)
    pretrained = bool(entry.get("pretrained") or entry.get("pretrained_file"))
    weights_info: dict[str, Any] | None = None
    if pretrained:
        if weights_json is not None:
            weights_info = read_json(weights_json)
            models.check_weights(weights_info)
        else:
            weights_info = models.pretrained_weights(entry)
    # Counted from the data itself (an ImageFolder's class folders), never from a constant.
    num_classes = _num_classes(config)
    hp = {**config["base_training"], **(entry.get("train") or {})}
    # Weight initialisation draws from torch's global generator: seed before creating the model.
    train.seed_everything(int(hp.get("seed", 0)))
    start = time.perf_counter()
    model = models.create(
        entry["timm"],
        num_classes,
        entry.get("overrides"),
        pretrained_file=weights_info["file"] if weights_info else None,
        pretrained_num_classes=(
            weights_info["num_classes"] if weights_info and weights_info["user_file"] else None
        ),
    )
    head = "scratch"
    if weights_info is not None:
        head = "pretrained" if weights_info["num_classes"] == num_classes else "reset"
    # Pretrained weights come with timm's eval transform (interpolation, crop, mean/std); models
    # trained here use the data set's default so that every step of their runs sees the same.
    dcfg = models.data_config(model, int(config["dataset"]["img_size"])) if pretrained else None
    splits = data.load_splits(config["dataset"], data_config=dcfg)
    report: dict[str, Any] = {"pretrained": pretrained, "head": head}
    base_checkpoints = Path(str(out_stem) + ".ckpt")
    if head != "pretrained":
        cfg = train.TrainConfig.from_config(hp)
        if cfg.epochs > 0:  # epochs 0: keep the initial weights (structural runs)
            # Per-epoch checkpoints next to the outputs: a base training killed by the cluster
            # (time limit, preemption) resumes from its last epoch on the retry.
            report["train"] = train.train(
                model,
                splits.train,
                cfg,
                seed=int(hp.get("seed", 0)),
                log=_print,
                checkpoint_dir=base_checkpoints,
            )
        report["hyperparameters"] = hp
    seconds = time.perf_counter() - start
    extra = {"pretrained_weights": weights_info, "data_config": dcfg} if pretrained else None
    weights, _ = models.save(
        model, out_stem, entry["timm"], num_classes, entry.get("overrides"), extra=extra
    )
    shutil.rmtree(base_checkpoints, ignore_errors=True)
    metrics = ev.accuracy(model, splits.test, int(config["evaluate"]["batch_size"]))
    macs, params = ev.macs_params(model, splits.img_size)
    val = ev.accuracy(model, splits.val, int(config["evaluate"]["batch_size"]))
    out = {
        "dataset": config["dataset"]["name"],
        "model": model_name,
        "timm": entry["timm"],
        **metrics,
        "val_top1": val["top1"],
        "macs": macs,
        "params": params,
        "num_classes": num_classes,
        "sha256": models.sha256(weights),
        "seconds": seconds,
        **report,
    }
    if weights_info is not None:
        out["pretrained_sha256"] = weights_info["sha256"]
        out["pretrained_source"] = weights_info["source"]
        out["data_config"] = dcfg
    write_json(metrics_json, out)
    _print(f"base {model_name}: top1 {metrics['top1']:.2f}% macs {macs} params {params}")
    return out


def profile(config: dict[str, Any], base_stem: str | Path, out_json: str | Path) -> dict[str, Any]:
    """The profile step: MACs breakdown, groups, sensitivity and safety bounds of the base model."""
    from agentprune import data, models, profiling

    model, desc = models.load(base_stem)
    # The base model's own transforms (a pretrained model's crop and mean/std): the same images it
    # was measured on in the base step.
    splits = data.load_splits(config["dataset"], data_config=models.data_config_of(desc))
    cfg = config["profile"]
    batches = data.calibration_batches(
        splits.val, int(cfg["calibration_batches"]), int(cfg["batch_size"]), seed=0
    )
    result = profiling.profile_model(model, data.example_inputs(splits.img_size), batches, cfg)
    write_json(out_json, result)
    return result


def plan(
    config: dict[str, Any],
    method: str,
    model_name: str,
    ratio: float,
    seed: int,
    profile_json: str | Path,
    out_json: str | Path,
    base_stem: str | Path | None = None,
    threads: int | None = None,
    target_gmacs: float | None = None,
) -> dict[str, Any]:
    """The plan step: ask the method's planner for a decision and write ``plan.json``.

    ``base_stem`` and ``threads`` serve planners that run trials on the base model (the agents);
    the fixed recipes read neither and stay torch-free. ``target_gmacs`` is the target in GMACs
    behind ``ratio`` (default: the model's ``targets_gmacs`` entry of that ratio, if any); the
    planner sees it as ``context["target_gmacs"]``.
    """
    from agentprune.pruning.settings import gmacs_target

    strategy = methods.get(method)
    if target_gmacs is None:
        entry = next((m for m in config.get("models", []) if m["name"] == model_name), {})
        target_gmacs = gmacs_target(entry, float(ratio))
    result = strategy.plan(
        float(ratio),
        read_json(profile_json),
        dict(config.get("method_settings", {}).get(method, {})),
        {
            "dataset": config["dataset"]["name"],
            "model": model_name,
            "seed": int(seed),
            "config": config,
            "base_stem": None if base_stem is None else str(base_stem),
            "threads": threads,
            "target_gmacs": target_gmacs,
        },
    )
    write_json(out_json, result)
    return result


def prune(
    config: dict[str, Any],
    plan_json: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
) -> dict[str, Any]:
    """The prune step: carry ``plan.json`` out on the base model, check it, save it pickle-free."""
    from agentprune import data, models, train

    plan_doc = read_json(plan_json)
    seed = int(plan_doc["seed"])
    train.seed_everything(seed)
    strategy = methods.get(plan_doc["method"])
    base, desc = models.load(base_stem)
    splits = data.load_splits(config["dataset"], data_config=models.data_config_of(desc))
    batch = int(config["prune"]["batch_size"])
    n_batches = int(plan_doc.get("pruner", {}).get("calibration_batches", 1))
    calibration = data.calibration_batches(splits.train, max(1, n_batches), batch, seed)
    start = time.perf_counter()
    pruned, report = strategy.prune(
        base,
        plan_doc,
        data.example_inputs(splits.img_size),
        calibration,
        seed,
        config["prune"],
    )
    report["seconds"] = time.perf_counter() - start
    # Block removal changes the architecture's depth: the pruned model is rebuilt with it.
    overrides = {**desc["overrides"], **report.get("overrides", {})}
    models.save(pruned, out_stem, desc["timm_name"], desc["num_classes"], overrides)
    report["method"] = plan_doc["method"]
    write_json(report_json, report)
    _print(
        f"pruned {plan_doc['method']} to {report.get('achieved', float('nan')):.4f} "
        f"(target {plan_doc['target']['value']}) in {report['seconds']:.1f}s"
    )
    return report


def finetune(
    config: dict[str, Any],
    plan_json: str | Path,
    pruned_stem: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
    settings: dict[str, Any] | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """The finetune step: recovery training with the model's recipe, optionally distilled.

    Every epoch is checkpointed into ``<out_stem>.ckpt/`` (not a declared output, so it survives
    a failed or killed job); a rerun resumes from the last completed epoch and ends with the same
    weights and report as an uninterrupted run. The directory is removed once the outputs exist.

    Args:
        config: the whole configuration.
        plan_json: the run's plan (its seed and method).
        pruned_stem: the pruned model.
        base_stem: the unpruned model (the default distillation teacher).
        out_stem: where the fine-tuned model goes.
        report_json: where the training report goes.
        settings: the model's effective ``finetune`` section (the rule's params); None: derived
            from ``config`` for the plan's model.
        processes: training processes; above 1 (one per GPU), the step re-runs itself under
            torchrun with DDP, and rank 0 writes the outputs.

    Returns:
        The training report.
    """
    import shutil

    from agentprune import data, distributed, models, train
    from agentprune.config import finetune_settings

    info = distributed.env_info()
    if processes > 1 and not info.enabled:
        distributed.launch(
            "finetune",
            {
                "config": config,
                "plan_json": str(plan_json),
                "pruned_stem": str(pruned_stem),
                "base_stem": str(base_stem),
                "out_stem": str(out_stem),
                "report_json": str(report_json),
                "settings": settings,
            },
            processes,
        )
        return read_json(report_json)
    plan_doc = read_json(plan_json)
    seed = int(plan_doc["seed"])
    strategy = methods.get(plan_doc["method"])
    if settings is None:
        names = {entry["name"] for entry in config.get("models", [])}
        if plan_doc.get("model") in names:
            settings = finetune_settings(config, plan_doc["model"])
        else:  # a model outside config.models (CLI): the section itself, scaled like the rest
            settings = dict(config["finetune"])
            settings["epochs"] = float(settings["epochs"]) * float(
                settings.pop("epochs_scale", 1.0)
            )
    model, desc = models.load(pruned_stem)
    cfg = train.TrainConfig.from_config(settings)
    teacher = None
    teacher_id: str | None = None
    if cfg.distill.get("enabled"):
        if cfg.distill.get("teacher"):
            # A named teacher (e.g. DeiT's regnety_160) comes pretrained from the hub.
            teacher_id = str(cfg.distill["teacher"])
            teacher = models.create(teacher_id, desc["num_classes"], pretrained=True)
        else:
            teacher = models.load(base_stem)[0]
            teacher_id = models.sha256(Path(base_stem).with_suffix(".safetensors"))
    base_desc = read_json(Path(base_stem).with_suffix(".json"))
    splits = data.load_splits(config["dataset"], data_config=models.data_config_of(base_desc))
    ckpt_dir = Path(str(out_stem) + ".ckpt")
    report = train.train(
        model,
        splits.train,
        cfg,
        seed=seed,
        teacher=teacher,
        masks=strategy.masks(model),
        log=_print,
        checkpoint_dir=ckpt_dir,
        fingerprint_extra={"teacher": teacher_id, "dataset": config["dataset"]},
    )
    if info.is_main:
        models.save(model, out_stem, desc["timm_name"], desc["num_classes"], desc["overrides"])
        write_json(report_json, report)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    distributed.barrier(info)
    return report


def planning_cost(
    provenance: dict[str, Any], agents: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What planning cost a run and, for agent plans, what the LLM contributed.

    Real LLM calls (cache replays and the default policy are not calls), their tokens, trial
    prunes, seconds and fallbacks; with the plan's ``agents`` section also its ``influence``
    (see :func:`agentprune.agents.influence.influence`) and whether the plan was allowed to fall
    back on the default policy.
    """
    calls = [
        e
        for e in provenance.get("exchanges", [])
        if not e.get("cached") and e.get("backend") not in (None, "heuristic")
    ]
    cost = {
        "backend": provenance.get("backend"),
        "llm_calls": len(calls),
        "prompt_tokens": sum(int(e.get("prompt_tokens") or 0) for e in calls),
        "completion_tokens": sum(int(e.get("completion_tokens") or 0) for e in calls),
        "trials": len(provenance.get("trials", [])),
        "seconds": float(provenance.get("planning_seconds", 0.0)),
        "fallbacks": len(provenance.get("fallbacks", [])),
    }
    if agents and "influence" in agents:
        cost["influence"] = agents["influence"]
        cost["allow_fallback"] = bool(provenance.get("allow_fallback", False))
    return cost


def evaluate(
    config: dict[str, Any],
    identity: dict[str, Any],
    plan_json: str | Path,
    base_metrics_json: str | Path,
    prune_report_json: str | Path,
    finetune_report_json: str | Path,
    pruned_stem: str | Path,
    finetuned_stem: str | Path,
    out_json: str | Path,
) -> dict[str, Any]:
    """The evaluate step: test-split accuracy before and after fine-tuning, size, speed ->
    metrics.json."""
    from agentprune import data, models, tracking
    from agentprune import evaluate as ev
    from agentprune.config import finetune_settings

    start = time.perf_counter()
    tracking.check(config.get("tracking"))  # a missing tracker package fails before any work
    plan_doc = read_json(plan_json)
    base = read_json(base_metrics_json)
    prune_report = read_json(prune_report_json)
    ft_report = read_json(finetune_report_json)
    splits = data.load_splits(config["dataset"], data_config=base.get("data_config"))
    cfg = config["evaluate"]
    pruned, _ = models.load(pruned_stem)
    before = ev.accuracy(pruned, splits.test, int(cfg["batch_size"]))
    del pruned
    finetuned, _ = models.load(finetuned_stem)
    known = (
        (int(prune_report["macs"]), int(prune_report["params"]))
        if "macs" in prune_report and "params" in prune_report
        else None
    )
    after = ev.evaluate_model(finetuned, splits.test, splits.img_size, cfg, known)
    strategy = methods.get(plan_doc["method"])
    provenance = plan_doc.get("provenance", {})
    achieved = (
        1 - after["macs"] / base["macs"] if strategy.family == "structured" else after["sparsity"]
    )
    metrics = {
        "dataset": identity["dataset"],
        "model": identity["model"],
        "method": plan_doc["method"],
        "family": strategy.family,
        "ratio": float(identity["ratio"]),
        "seed": int(identity["seed"]),
        "target": float(plan_doc["target"]["value"]),
        "achieved": achieved,
        "macs_base": int(base["macs"]),
        "macs": after["macs"],
        "params_base": int(base["params"]),
        "params": after["params"],
        "sparsity": after["sparsity"],
        "sparsity_overall": after["sparsity_overall"],
        "top1": after["top1"],
        "top5": after["top5"],
        "loss": after["loss"],
        "top1_pruned": before["top1"],
        "top5_pruned": before["top5"],
        "loss_pruned": before["loss"],
        "top1_base": base["top1"],
        "top5_base": base["top5"],
        "loss_base": base["loss"],
        "latency_ms": after["latency_ms"],
        "throughput": after["throughput"],
        "seconds": {
            "plan": float(provenance.get("planning_seconds", 0.0)),
            "prune": float(prune_report.get("seconds", float("nan"))),
            "finetune": float(ft_report.get("seconds", float("nan"))),
            "evaluate": time.perf_counter() - start,
        },
        "planning": planning_cost(provenance, plan_doc.get("agents")),
        # How the structured search landed (a top-up stage is marked in the tables).
        "search": prune_report.get("search"),
    }
    write_json(out_json, metrics)
    _print(
        f"{metrics['model']}/{metrics['method']}/r{metrics['ratio']}/s{metrics['seed']}: "
        f"top1 {before['top1']:.2f} -> {after['top1']:.2f} (base {base['top1']:.2f})"
    )
    tracking.log_run(
        config.get("tracking"),
        metrics,
        params=tracking.flat_params(
            {
                "target": plan_doc["target"]["value"],
                "pruner": plan_doc.get("pruner") or {},
                "finetune": finetune_settings(config, metrics["model"]),
            }
        ),
        curves={"finetune/loss": list(ft_report.get("epoch_loss", []))},
        log=_print,
    )
    return metrics
