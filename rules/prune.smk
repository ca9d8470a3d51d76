# plan + prune: the method's planner writes plan.json; the pruner carries it out to the target.


rule plan:
    input:
        profile=RESULTS + "/{dataset}/{model}/profile.json",
    output:
        RUN + "/plan.json",
    params:
        settings=lambda wc: config["method_settings"].get(wc.method, {}),
        prune=config["prune"],
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/plan.log",
    benchmark:
        BENCH + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/plan.tsv"
    threads: 1
    script:
        "../scripts/plan.py"


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
        BENCH + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/prune.tsv"
    threads: 1
    script:
        "../scripts/prune.py"
