# plan + prune: the method's planner writes plan.json; the pruner carries it out to the target.
#
# Planning comes in two weights. A fixed recipe (rule plan) only writes settings: a few seconds on one
# CPU. A planner that runs trials (rule plan_trials, e.g. multi_agent) prunes, fine-tunes and
# evaluates trial models, so on a cluster it needs a GPU like prune and finetune. The two rules share
# one body; the registry decides which methods take the heavy one, and profiles give each its
# resources by rule name.


rule plan:
    input:
        profile=f"{RESULTS}/{{dataset}}/{{model}}/profile.json",
        # Read only by planners that run trials (the agents); the recipes ignore it.
        weights=f"{BASE}/model.safetensors",
        structure=f"{BASE}/model.json",
    output:
        job_runs("plan.json"),
    log:
        f"{JOB_LOGS}/plan.log",
    benchmark:
        f"{BENCH_JOB}/plan.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        # The method's own settings (only the config it reads) and the seeds of its runs.
        step=plan_params,
        seeds=job_seeds,
    script:
        "../scripts/plan.py"


use rule plan as plan_trials with:
    wildcard_constraints:
        method="|".join(trial_methods()),
    # The longest jobs of a study (an LLM plan takes a median 7.5 s per run on 2 laptop cores):
    # started first, they overlap with everything else instead of running alone at the end.
    priority: 10
    # The local LLM backend (llama-cpp-python + the bundled SmolLM2) on top of the torch stack.
    conda:
        "../envs/llm.yaml"


ruleorder: plan_trials > plan


# Every per-run rule (plan, prune, transcript here) serves the runs of job_runs: every seed of a
# (model, method, ratio) with batch_seeds, one after another in one process, else one run.
rule prune:
    input:
        plan=job_runs("plan.json"),
        weights=f"{BASE}/model.safetensors",
        structure=f"{BASE}/model.json",
    output:
        weights=job_runs("pruned.safetensors"),
        structure=job_runs("pruned.json"),
        report=job_runs("prune_report.json"),
    log:
        f"{JOB_LOGS}/prune.log",
    benchmark:
        f"{BENCH_JOB}/prune.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        step=prune_params,
        seeds=job_seeds,
    script:
        "../scripts/prune.py"


rule transcript:
    input:
        plan=job_runs("plan.json"),
    output:
        job_pages("transcript.html", "../workflow/report/transcript.rst", "Agents"),
    log:
        f"{JOB_LOGS}/transcript.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/transcript.py"
