# Paths, wildcard constraints, target lists and every rule's params: the only Snakemake file with
# functions. A rule's params are the plain form of its step's typed settings, built by one
# function of agentprune.resolve (the same the CLI calls), so Snakemake's params trigger reruns
# exactly the jobs whose settings changed.

import json
import os
import subprocess
import tempfile

from agentprune import resolve
from agentprune.pruning import catalog
from agentprune.settings import plain

RESULTS = config["results"]
DATASET = config["dataset"]["name"]
MODELS = [entry["name"] for entry in config["models"]]

BASE = f"{RESULTS}/{{dataset}}/{{model}}/base"
RUN = f"{RESULTS}/{{dataset}}/{{model}}/{{method}}/r{{ratio}}/s{{seed}}"
LOGS = f"{RESULTS}/logs"
# With batch_seeds, one job of each per-run step serves every seed of a (model, method, ratio),
# and its log and benchmark file sit under JOB_DIR, named for the seeds it ran.
SEEDS = config["seeds"]
BATCH_SEEDS = config["batch_seeds"]
JOB_DIR = "s" + "+".join(str(seed) for seed in SEEDS) if BATCH_SEEDS else "s{seed}"
CELL = f"{RESULTS}/{{dataset}}/{{model}}/{{method}}/r{{ratio}}"
JOB_LOGS = f"{LOGS}/{{dataset}}/{{model}}/{{method}}/r{{ratio}}/{JOB_DIR}"
BENCH_JOB = (
    f"{RESULTS}/benchmarks/{{dataset}}/{{model}}/{{method}}/r{{ratio}}/{JOB_DIR}"
)
STATS = f"{RESULTS}/stats"
PAPER = f"{RESULTS}/paper"
REPORT = f"{RESULTS}/report.html"


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
    # A fraction (0.5), or an N:M sparsity of the lm family (2of4).
    ratio=r"[0-9]*\.?[0-9]+|[0-9]+of[0-9]+",
    seed=r"[0-9]+",


def job_runs(filename):
    """``filename`` of every run that a job of a per-run step serves (plan, prune, finetune,
    evaluate, run card, transcript): all seeds of its (model, method, ratio) with batch_seeds,
    else its own run. Always a list, in the order of job_seeds.
    """
    if BATCH_SEEDS:
        return expand(f"{CELL}/s{{seed}}/{filename}", seed=SEEDS, allow_missing=True)
    return [f"{RUN}/{filename}"]


def job_seeds(wildcards):
    """The seeds a job of a per-run step runs, in the order of its job_runs files."""
    return list(SEEDS) if BATCH_SEEDS else [int(wildcards.seed)]


def job_pages(filename, caption, category):
    """job_runs(filename), each registered in the report under its own run's labels."""
    if BATCH_SEEDS:
        pages = [(f"{CELL}/s{seed}/{filename}", str(seed)) for seed in SEEDS]
    else:
        pages = [(f"{RUN}/{filename}", "{seed}")]
    return [run_page(path, caption, category, seed) for path, seed in pages]


def run_page(path, caption, category, seed):
    """One run's page in the report, under its model, method, ratio and seed."""
    labels = {
        "model": "{model}",
        "method": "{method}",
        "ratio": "{ratio}",
        "seed": seed,
    }
    return report(
        path, caption=caption, category=category, subcategory="{model}", labels=labels
    )


# --- params: each rule's typed settings, in plain form ----------------------------------------


def data_params():
    """The data set (download_data)."""
    return plain(resolve.data(config))


def weights_params(wildcards):
    """What download_weights fetches and checks for a model."""
    return plain(resolve.weights(config, wildcards.model))


def base_model_params(wildcards):
    """A base model's step: its entry, the data set, its training recipe."""
    return plain(resolve.base_model_step(config, wildcards.model))


def profile_params(wildcards):
    """A model's profile step."""
    return plain(resolve.profile_step(config, wildcards.model))


def plan_params(wildcards):
    """One (method, model, ratio)'s plan step: the method's own settings included."""
    return plain(
        resolve.plan_step(config, wildcards.method, wildcards.model, wildcards.ratio)
    )


def prune_params(wildcards):
    """A model's prune step."""
    return plain(resolve.prune_step(config, wildcards.model))


def finetune_params(wildcards):
    """A model's fine-tuning step (its effective recipe)."""
    return plain(resolve.finetune_step(config, wildcards.model))


def evaluate_params(wildcards):
    """A model's evaluate step."""
    return plain(resolve.evaluate_step(config, wildcards.model))


def stats_params():
    """The stats step."""
    return plain(resolve.stats_settings(config))


def paper_params():
    """The paper step."""
    return plain(resolve.paper_settings(config))


# --- the paper's outputs -----------------------------------------------------------------------

TABLE_SUFFIX = {"markdown": "md", "latex": "tex", "html": "html"}


def paper_table(name, fmt):
    """One table file of the paper, registered in the report (category Tables)."""
    return report(
        f"{PAPER}/tables/{name}.{TABLE_SUFFIX[fmt]}",
        caption=f"../workflow/report/table_{name}.rst",
        category="Tables",
        labels={"table": name, "format": fmt},
    )


def paper_figure(name, label):
    """One figure of the paper, registered in the report (category Figures)."""
    return report(
        f"{PAPER}/figures/{name}.png",
        caption=f"../workflow/report/fig_{name}.rst",
        category="Figures",
        labels={"figure": label},
    )


# --- inputs and targets ------------------------------------------------------------------------


def weights_input(wildcards):
    """A pretrained model reads the file download_weights fetched and verified; a model trained
    from scratch needs nothing from the network."""
    if resolve.weights(config, wildcards.model).is_pretrained:
        return [
            f"{RESULTS}/weights/{wildcards.model}.json",
            f"{RESULTS}/weights/{wildcards.model}.weights",
        ]
    return []


def trial_methods():
    """Registered methods whose planner runs trials (planned by rule plan_trials)."""
    return [name for name in catalog.names() if catalog.get(name).runs_trials]


def runs(filename, methods=None, root=RUN):
    """``filename`` under ``root`` (a run-directory pattern) for every run of the grid (each method
    at its own ratios)."""
    return [
        path
        for method in (config["methods"] if methods is None else methods)
        for model in MODELS
        for path in expand(
            f"{root}/{filename}",
            dataset=DATASET,
            model=model,
            method=method,
            ratio=resolve.method_ratios(config, method, model),
            seed=config["seeds"],
        )
    ]


def all_metrics():
    """Every run's metrics.json in the grid."""
    return runs("metrics.json")


def job_files(root, suffix):
    """``{step}.{suffix}`` under ``root`` (BENCH_JOB or JOB_LOGS) of every plan, prune, finetune
    and evaluate job in the grid, each once (a batch_seeds job serves several runs)."""
    from agentprune.benchmarks import STEPS

    return list(
        dict.fromkeys(
            path for step in STEPS for path in runs(f"{step}.{suffix}", root=root)
        )
    )


def run_benchmarks():
    """The benchmark file of every plan, prune, finetune and evaluate job in the grid.

    Base-model jobs are left out on purpose: with `--cache` they may be fetched instead of run, and
    then have no benchmark file.
    """
    return job_files(BENCH_JOB, "tsv")


def run_benchmark_logs():
    """The log of each run_benchmarks() job, in the same order."""
    return job_files(JOB_LOGS, "log")


def report_pages():
    """The report's per-run pages: every run's card (category Runs) and every agent-planned run's
    transcript (category Agents)."""
    agents = [m for m in config["methods"] if catalog.get(m).uses_agents]
    return runs("run.html") + runs("transcript.html", agents)


def render_report(cfg, outputs):
    """Write REPORT with `snakemake --report` after a successful run, when ``outputs`` (what the
    report shows) are newer.

    Runs in the onsuccess handler so that the main command leaves a self-contained report behind. The
    merged config is passed as a file so that --configfile/--config overrides carry over.
    """
    if os.environ.get("AGENTPRUNE_IN_REPORT"):
        return
    paths = [Path(p) for p in outputs]
    if not all(p.exists() for p in paths):
        return
    report_path = Path(REPORT)
    newest = max(p.stat().st_mtime for p in paths)
    if report_path.exists() and report_path.stat().st_mtime >= newest:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(cfg, fh)
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(workflow.main_snakefile),
        "--directory",
        os.getcwd(),
        "--configfile",
        fh.name,
        "--report",
        str(report_path),
        "--quiet",
        "all",
    ]
    print(f"agentprune: writing {report_path}", file=sys.stderr)
    try:
        subprocess.run(cmd, check=True, env={**os.environ, "AGENTPRUNE_IN_REPORT": "1"})
    finally:
        os.unlink(fh.name)
