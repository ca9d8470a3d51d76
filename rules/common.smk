# Config access, wildcard constraints, target lists and path helpers shared by every rule file.

import json
import os
import subprocess
import tempfile


RESULTS = config["results"]
DATASET = config["dataset"]["name"]
MODELS = [entry["name"] for entry in config["models"]]


from agentprune.config import finetune_settings, fmt_ratio, structured_ratios

# fmt_ratio: the {ratio} wildcard's spelling of a ratio (0.3 -> '0.3', 0.76471 -> '0.7647').
SPARSITIES = [fmt_ratio(r) for r in config["sparsities"]]

BASE = RESULTS + "/{dataset}/{model}/base"
RUN = RESULTS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}"
LOGS = RESULTS + "/logs"
BENCH = RESULTS + "/benchmarks"
BENCH_RUN = BENCH + "/{dataset}/{model}/{method}/r{ratio}/s{seed}"
STATS = RESULTS + "/stats"
PAPER = RESULTS + "/paper"
REPORT = RESULTS + "/report.html"


# Run on the submitting node under a cluster executor: the downloads (data set, pretrained weights)
# need the login node's internet, the rest only read JSON/CSV and write tables, figures and HTML in
# seconds. download_model is not local: it trains a base model from scratch, or adapts a pretrained
# one, from files the download rules already fetched.
localrules:
    all,
    download_data,
    download_weights,
    stats,
    paper,
    transcript,
    run_card,


wildcard_constraints:
    dataset=r"[A-Za-z0-9_]+",
    model=r"[A-Za-z0-9_.\-]+",
    method=r"[A-Za-z0-9_]+",
    ratio=r"[0-9]*\.?[0-9]+",
    seed=r"[0-9]+",


# Keys of a config.models entry that belong to the study (what the pruned models are fine-tuned and
# targeted with), not to the base model: left out of the base-model rules' params, so that changing
# them reruns no download, training or profile and keeps the between-workflow cache key.
STUDY_KEYS = ("targets_gmacs", "base_gmacs", "finetune")


def model_entry(name):
    """The config.models entry for a {model} wildcard, without its STUDY_KEYS."""
    for entry in config["models"]:
        if entry["name"] == name:
            return {key: value for key, value in entry.items() if key not in STUDY_KEYS}
    raise ValueError(f"model {name!r} is not in config.models")


def method_info(name):
    """The registered method called name (its family, sections and flags come from the registry,
    so no rule branches on a method's name)."""
    from agentprune.pruning import methods

    return methods.get(name)


def trial_methods():
    """Registered methods whose planner runs trials (planned by rule plan_trials)."""
    from agentprune.pruning import methods

    return [name for name in methods.names() if methods.get(name).runs_trials]


def ablation_pairs():
    """Method -> its registered ablation, for the methods of the study whose ablation is in the
    study too (the results table pairs them)."""
    return {
        name: method_info(name).ablation
        for name in config["methods"]
        if method_info(name).ablation in config["methods"]
    }


def model_ratios(model):
    """The structured {ratio} values of a model: from its targets_gmacs, else the global ratios."""
    return [fmt_ratio(r) for r in structured_ratios(config, model)]


def method_ratios(name, model):
    """The {ratio} values of a method on a model: MACs fractions removed for structured methods
    (per model), sparsities otherwise."""
    return model_ratios(model) if method_info(name).family == "structured" else SPARSITIES


def method_section(name):
    """The config section a method's planner reads ({} for none): a params trigger."""
    section = method_info(name).config_section
    return config.get(section, {}) if section else {}


def runs(filename, methods=None, root=RUN):
    """``filename`` under ``root`` (a run-directory pattern) for every run of the grid (each method
    at its own ratios)."""
    return [
        path
        for method in (config["methods"] if methods is None else methods)
        for model in MODELS
        for path in expand(
            root + "/" + filename,
            dataset=DATASET,
            model=model,
            method=method,
            ratio=method_ratios(method, model),
            seed=config["seeds"],
        )
    ]


def all_metrics():
    """Every run's metrics.json in the grid."""
    return runs("metrics.json")


def run_benchmarks():
    """The benchmark file of every per-run job (plan, prune, finetune, evaluate) in the grid.

    Base-model jobs are left out on purpose: with `--cache` they may be fetched instead of run, and
    then have no benchmark file.
    """
    from agentprune.benchmarks import STEPS

    return [path for step in STEPS for path in runs(f"{step}.tsv", root=BENCH_RUN)]


def run_cards():
    """The HTML card of every run (category Runs of the report)."""
    return runs("run.html")


def transcripts():
    """The HTML transcript of every agent-planned run (category Agents of the report)."""
    return runs("transcript.html", [m for m in config["methods"] if method_info(m).uses_agents])


def paper_outputs():
    """The final rule's outputs (tables and figures)."""
    return [
        PAPER + "/tables/results.md",
        PAPER + "/tables/results.tex",
        PAPER + "/tables/results.html",
        PAPER + "/tables/comparisons.md",
        PAPER + "/tables/comparisons.html",
        PAPER + "/tables/unstructured.md",
        PAPER + "/tables/unstructured.tex",
        PAPER + "/tables/unstructured.html",
        PAPER + "/figures/accuracy_vs_macs.png",
        PAPER + "/figures/accuracy_vs_sparsity.png",
        PAPER + "/figures/method_comparison.png",
        PAPER + "/figures/time_per_step.png",
        PAPER + "/figures/time_memory_per_step.png",
    ]


def report_outputs():
    """Everything the HTML report shows: tables, figures, agent transcripts and run cards."""
    return paper_outputs() + transcripts() + run_cards()


def render_report(cfg):
    """Write REPORT with `snakemake --report` after a successful run, when its inputs are newer.

    Runs in the onsuccess handler so that the main command leaves a self-contained report behind. The
    merged config is passed as a file so that --configfile/--config overrides carry over.
    """
    if os.environ.get("AGENTPRUNE_IN_REPORT"):
        return
    outputs = [Path(p) for p in report_outputs()]
    if not all(p.exists() for p in outputs):
        return
    report_path = Path(REPORT)
    newest = max(p.stat().st_mtime for p in outputs)
    if report_path.exists() and report_path.stat().st_mtime >= newest:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg, fh)
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(workflow.main_snakefile),
        "--directory", os.getcwd(),
        "--configfile", fh.name,
        "--report", str(report_path),
        "--quiet", "all",
    ]
    print(f"agentprune: writing {report_path}", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True, env={**os.environ, "AGENTPRUNE_IN_REPORT": "1"})
    finally:
        os.unlink(fh.name)
