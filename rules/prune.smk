# plan + prune: the method's planner writes plan.json; the pruner carries it out to the target.
#
# Planning comes in two weights. A fixed recipe (rule plan) only writes settings: a few seconds on one
# CPU. A planner that runs trials (rule plan_trials, e.g. multi_agent) prunes, fine-tunes and
# evaluates trial models, so on a cluster it needs a GPU like prune and finetune. The two rules share
# one body; the registry decides which methods take the heavy one, and profiles give each its
# resources by rule name.


rule plan:
    input:
        profile=RESULTS + "/{dataset}/{model}/profile.json",
        # Read only by planners that run trials (the agents); the recipes ignore it.
        weights=BASE + "/model.safetensors",
        structure=BASE + "/model.json",
    output:
        RUN + "/plan.json",
    params:
        settings=lambda wc: config["method_settings"].get(wc.method, {}),
        prune=config["prune"],
        section=lambda wc: method_section(wc.method),
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/plan.log",
    benchmark:
        BENCH_RUN + "/plan.tsv"
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/plan.py"


use rule plan as plan_trials with:
    wildcard_constraints:
        method="|".join(trial_methods()),
    # The local LLM backend (llama-cpp-python + the bundled SmolLM2) on top of the torch stack.
    conda:
        "../envs/llm.yaml"


ruleorder: plan_trials > plan


rule prune:
    input:
        plan=RUN + "/plan.json",
        weights=BASE + "/model.safetensors",
        structure=BASE + "/model.json",
    output:
        weights=RUN + "/pruned.safetensors",
        structure=RUN + "/pruned.json",
        report=RUN + "/prune_report.json",
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/prune.log",
    benchmark:
        BENCH_RUN + "/prune.tsv"
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/prune.py"


rule transcript:
    input:
        plan=RUN + "/plan.json",
    output:
        report(
            RUN + "/transcript.html",
            caption="../workflow/report/transcript.rst",
            category="Agents",
            subcategory="{model}",
            labels={"model": "{model}", "method": "{method}", "ratio": "{ratio}", "seed": "{seed}"},
        ),
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/transcript.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/transcript.py"
