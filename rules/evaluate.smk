# evaluate: test-split accuracy before and after fine-tuning, size, sparsity and speed -> metrics.json.


rule evaluate:
    input:
        plan=RUN + "/plan.json",
        base_metrics=BASE + "/metrics.json",
        prune_report=RUN + "/prune_report.json",
        finetune_report=RUN + "/finetune_report.json",
        pruned=RUN + "/pruned.safetensors",
        pruned_structure=RUN + "/pruned.json",
        finetuned=RUN + "/finetuned.safetensors",
        finetuned_structure=RUN + "/finetuned.json",
    output:
        RUN + "/metrics.json",
    params:
        evaluate=config["evaluate"],
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/evaluate.log",
    benchmark:
        BENCH_RUN + "/evaluate.tsv"
    threads: 1
    conda:
        "../envs/torch.yaml"
    script:
        "../scripts/evaluate.py"


rule run_card:
    input:
        metrics=RUN + "/metrics.json",
        plan=RUN + "/plan.json",
    output:
        report(
            RUN + "/run.html",
            caption="../workflow/report/run_card.rst",
            category="Runs",
            subcategory="{model}",
            labels={"model": "{model}", "method": "{method}", "ratio": "{ratio}", "seed": "{seed}"},
        ),
    log:
        LOGS + "/{dataset}/{model}/{method}/r{ratio}/s{seed}/run_card.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/run_card.py"
