"""One function per pipeline step. Snakemake's thin scripts and the ``agentprune`` CLI both call
these.

The bodies here are the vision family's; a step whose settings belong to another model family
(:mod:`agentprune.families`: they carry a ``family`` field) is handed on, first thing, to that
family's function of the same name (:mod:`agentprune.lm.steps`).

Each step reads its inputs from paths, writes its outputs to paths, and seeds everything from its
seed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agentprune import families
from agentprune.pruning import catalog
from agentprune.pruning.registry import PlanContext
from agentprune.settings import (
    BaseModelStep,
    DataSettings,
    EvaluateStep,
    FinetuneStep,
    PlanStep,
    ProfileStep,
    PruneStep,
    WeightsEntry,
    build,
    plain,
)

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
    """Send stdout/stderr (tqdm included) to ``log`` and pin torch's thread count.

    A step that has not imported torch yet gets the count through ``OMP_NUM_THREADS`` (torch reads
    it when it is imported), so a step that never needs torch (an lm finetune, which only links
    files) does not pay for importing it.
    """
    if threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(int(threads))
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(int(threads))
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


def _num_classes(settings: DataSettings) -> int:
    from agentprune import data

    return data.num_classes(settings)


def _print(msg: str) -> None:
    print(msg, flush=True)


def prepare_dataset(settings: DataSettings, out_json: str | Path) -> dict[str, Any]:
    """The download step for data: fetch (where the data set is downloadable) and describe the
    splits.

    The only step that downloads data (CIFAR): the ``download_data`` rule is local (the login node
    has the internet), and every other step reads what it left. It is also the first job of a
    study, so a missing or malformed data set fails here, before any training.
    """
    if (family := families.for_dataset(settings.name).steps()) is not None:
        return family.prepare_dataset(settings, out_json)
    from agentprune import data

    splits = data.load_splits(settings, download=True)
    desc = data.describe(settings, splits)
    write_json(out_json, desc)
    return desc


def download_weights(
    entry: WeightsEntry, out_json: str | Path, link: str | Path | None = None
) -> dict[str, Any]:
    """The download step for pretrained weights: fetch into the cache, verify, write a manifest.

    Runs on the login node (a local rule); ``base_model`` then reads only the manifest's file, so
    compute jobs never touch the network. Honours ``HF_HUB_OFFLINE=1`` (cache only). ``link``,
    when given, becomes a symbolic link to the verified file (the workflow's record of it, whose
    size the cluster profile sizes the base-model job by).
    """
    if (family := families.of_step(entry)) is not None:
        return family.download_weights(entry, out_json, link)
    from agentprune import models

    manifest = models.pretrained_weights(entry)
    if link is not None:
        link = Path(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(Path(manifest["file"]).resolve())
    write_json(out_json, manifest)
    _print(f"weights {entry.name}: {manifest['source']} sha256 {manifest['sha256']}")
    return manifest


def base_model(
    step: BaseModelStep,
    out_stem: str | Path,
    metrics_json: str | Path,
    weights_json: str | Path | None = None,
) -> dict[str, Any]:
    """The base model of a study: pretrained weights, or training from scratch.

    Pretrained models (``pretrained: true`` or a ``pretrained_file``) load the verified file of
    ``weights_json`` (written by :func:`download_weights`; without it the weights are fetched
    here). When the data set's class count equals the weights' classifier width, the model is
    used as is: no training, weights bit-identical to the file. Otherwise timm re-initialises the
    classifier and the whole model is fine-tuned with the model's training settings. Models
    without pretrained weights are trained from scratch with the same settings.

    Writes ``<out_stem>.safetensors``/``.json`` (the structure's ``extra`` holds the weights
    manifest and, for pretrained models, timm's data config) and the base ``metrics.json`` (test
    accuracy, MACs, ``pretrained_sha256``, ``head``).
    """
    if (family := families.of_step(step)) is not None:
        return family.base_model(step, out_stem, metrics_json, weights_json)
    from agentprune import data, models, train
    from agentprune import evaluate as ev

    entry = step.model
    weights_info: dict[str, Any] | None = None
    if entry.is_pretrained:
        if weights_json is not None:
            weights_info = read_json(weights_json)
            models.check_weights(weights_info)
        else:
            weights_info = models.pretrained_weights(entry)
    # Counted from the data itself (an ImageFolder's class folders), never from a constant.
    num_classes = _num_classes(step.data)
    # Weight initialisation draws from torch's global generator: seed before creating the model.
    train.seed_everything(step.seed)
    start = time.perf_counter()
    model = models.create(
        entry.timm,
        num_classes,
        entry.overrides,
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
    dcfg = models.data_config(model, step.data.img_size) if entry.is_pretrained else None
    splits = data.load_splits(step.data, data_config=dcfg)
    report: dict[str, Any] = {"pretrained": entry.is_pretrained, "head": head}
    base_checkpoints = Path(str(out_stem) + ".ckpt")
    if head != "pretrained":
        if step.training.epochs > 0:  # epochs 0: keep the initial weights (structural runs)
            # Per-epoch checkpoints next to the outputs: a base training killed by the cluster
            # (time limit, preemption) resumes from its last epoch on the retry.
            report["train"] = train.train(
                model,
                splits.train,
                step.training,
                seed=step.seed,
                log=_print,
                checkpoint_dir=base_checkpoints,
            )
        report["hyperparameters"] = {"seed": step.seed, **plain(step.training)}
    seconds = time.perf_counter() - start
    extra = None
    if entry.is_pretrained:
        extra = {"pretrained_weights": weights_info, "data_config": dcfg}
    weights, _ = models.save(model, out_stem, entry.timm, num_classes, entry.overrides, extra=extra)
    shutil.rmtree(base_checkpoints, ignore_errors=True)
    metrics = ev.accuracy(model, splits.test, step.eval_batch)
    macs, params = ev.macs_params(model, splits.img_size)
    val = ev.accuracy(model, splits.val, step.eval_batch)
    out = {
        "dataset": step.data.name,
        "model": entry.name,
        "timm": entry.timm,
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
    _print(f"base {entry.name}: top1 {metrics['top1']:.2f}% macs {macs} params {params}")
    return out


def profile(step: ProfileStep, base_stem: str | Path, out_json: str | Path) -> dict[str, Any]:
    """The profile step: MACs breakdown, groups, sensitivity and safety bounds of the base model."""
    if (family := families.of_step(step)) is not None:
        return family.profile(step, base_stem, out_json)
    from agentprune import data, models, profiling

    model, desc = models.load(base_stem)
    # The base model's own transforms (a pretrained model's crop and mean/std): the same images it
    # was measured on in the base step.
    splits = data.load_splits(step.data, data_config=models.data_config_of(desc))
    cfg = step.profile
    batches = data.calibration_batches(splits.val, cfg.calibration_batches, cfg.batch_size, seed=0)
    result = profiling.profile_model(model, data.example_inputs(splits.img_size), batches, cfg)
    write_json(out_json, result)
    return result


def plan(
    step: PlanStep,
    seed: int,
    profile_json: str | Path,
    out_json: str | Path,
    base_stem: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The plan step: ask the method's planner for a decision and write ``plan.json``.

    ``base_stem`` and ``threads`` serve planners that run trials on the base model (the agents);
    the fixed recipes read neither and stay torch-free.
    """
    if (family := families.of_step(step)) is not None:
        return family.plan(step, seed, profile_json, out_json, base_stem, threads)
    strategy = catalog.get(step.method)
    context = PlanContext(
        dataset=step.dataset,
        model=step.model,
        timm=step.timm,
        seed=int(seed),
        target_gmacs=step.target_gmacs,
        base_stem=None if base_stem is None else str(base_stem),
        threads=threads,
        data=step.data,
        calibration_batch_size=step.calibration_batch_size,
    )
    settings = strategy.load_settings(step.method_settings)
    result = strategy.plan(step.ratio, read_json(profile_json), settings, context)
    write_json(out_json, result)
    return result


def prune(
    step: PruneStep,
    plan_json: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
) -> dict[str, Any]:
    """The prune step: carry ``plan.json`` out on the base model, check it, save it pickle-free."""
    if (family := families.of_step(step)) is not None:
        return family.prune(step, plan_json, base_stem, out_stem, report_json)
    from agentprune import data, models, train

    plan_doc = read_json(plan_json)
    seed = int(plan_doc["seed"])
    train.seed_everything(seed)
    strategy = catalog.get(plan_doc["method"])
    base, desc = models.load(base_stem)
    splits = data.load_splits(step.data, data_config=models.data_config_of(desc))
    n_batches = int(plan_doc["pruner"]["calibration_batches"])
    calibration = data.calibration_batches(
        splits.train, max(1, n_batches), step.calibration_batch_size, seed
    )
    start = time.perf_counter()
    pruned, report = strategy.prune(
        base, plan_doc, data.example_inputs(splits.img_size), calibration, seed
    )
    report["seconds"] = time.perf_counter() - start
    # Block removal changes the architecture's depth: the pruned model is rebuilt with it.
    overrides = {**desc["overrides"], **report.get("overrides", {})}
    models.save(pruned, out_stem, desc["timm_name"], desc["num_classes"], overrides)
    report["method"] = plan_doc["method"]
    write_json(report_json, report)
    _print(
        f"pruned {plan_doc['method']} to {report['achieved']:.4f} "
        f"(target {plan_doc['target']['value']}) in {report['seconds']:.1f}s"
    )
    return report


def finetune(
    step: FinetuneStep,
    plan_json: str | Path,
    pruned_stem: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
    processes: int = 1,
    on_epoch_end: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """The finetune step: recovery training with the model's recipe, optionally distilled.

    Every epoch is checkpointed into ``<out_stem>.ckpt/`` (not a declared output, so it survives
    a failed or killed job); a rerun resumes from the last completed epoch and ends with the same
    weights and report as an uninterrupted run. The directory is removed once the outputs exist.

    Args:
        step: the data set and the model's effective recipe.
        plan_json: the run's plan (its seed and method).
        pruned_stem: the pruned model.
        base_stem: the unpruned model (the default distillation teacher).
        out_stem: where the fine-tuned model goes.
        report_json: where the training report goes.
        processes: training processes; above 1 (one per GPU), the step re-runs itself under
            torchrun with DDP (:func:`finetune_worker`), and rank 0 writes the outputs.
        on_epoch_end: called after each epoch's checkpoint (see ``train.train``).

    Returns:
        The training report.
    """
    if (family := families.of_step(step)) is not None:
        paths = (plan_json, pruned_stem, base_stem, out_stem, report_json)
        return family.finetune(step, *paths, processes, on_epoch_end)
    from agentprune import data, distributed, models, train

    info = distributed.env_info()
    paths = [plan_json, pruned_stem, base_stem, out_stem, report_json]
    if processes > 1 and not info.enabled:
        payload = {"step": plain(step), "paths": [str(p) for p in paths]}
        distributed.launch("agentprune.steps:finetune_worker", payload, processes)
        return read_json(report_json)
    plan_doc = read_json(plan_json)
    seed = int(plan_doc["seed"])
    strategy = catalog.get(plan_doc["method"])
    model, desc = models.load(pruned_stem)
    cfg = step.recipe
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
    splits = data.load_splits(step.data, data_config=models.data_config_of(base_desc))
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
        fingerprint_extra={"teacher": teacher_id, "dataset": plain(step.data)},
        on_epoch_end=on_epoch_end,
    )
    if info.is_main:
        models.save(model, out_stem, desc["timm_name"], desc["num_classes"], desc["overrides"])
        write_json(report_json, report)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    distributed.barrier(info)
    return report


def finetune_worker(
    step: dict[str, Any], paths: list[str], on_epoch_end: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """One worker of :func:`finetune` (the torchrun entry point): the step from its plain form."""
    return finetune(build(FinetuneStep, step, "finetune"), *paths, on_epoch_end=on_epoch_end)


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
    step: EvaluateStep,
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
    if (family := families.of_step(step)) is not None:
        paths = (plan_json, base_metrics_json, prune_report_json, finetune_report_json)
        return family.evaluate(step, identity, *paths, pruned_stem, finetuned_stem, out_json)
    from agentprune import data, models, tracking
    from agentprune import evaluate as ev

    start = time.perf_counter()
    tracking.check(step.tracking)  # a missing tracker package fails before any work
    plan_doc = read_json(plan_json)
    base = read_json(base_metrics_json)
    prune_report = read_json(prune_report_json)
    ft_report = read_json(finetune_report_json)
    splits = data.load_splits(step.data, data_config=base.get("data_config"))
    cfg = step.evaluate
    pruned, _ = models.load(pruned_stem)
    before = ev.accuracy(pruned, splits.test, cfg.batch_size)
    del pruned
    finetuned, _ = models.load(finetuned_stem)
    known = (
        (int(prune_report["macs"]), int(prune_report["params"]))
        if "macs" in prune_report and "params" in prune_report
        else None
    )
    after = ev.evaluate_model(finetuned, splits.test, splits.img_size, cfg, known)
    strategy = catalog.get(plan_doc["method"])
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
        step.tracking,
        metrics,
        params=tracking.flat_params(
            {
                "target": plan_doc["target"]["value"],
                "pruner": plan_doc.get("pruner") or {},
                "finetune": plain(step.recipe),
            }
        ),
        curves={"finetune/loss": list(ft_report.get("epoch_loss", []))},
        log=_print,
    )
    return metrics
