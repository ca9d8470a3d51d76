# evaluate: test-split accuracy before and after fine-tuning, size, sparsity and speed -> metrics.json.


rule evaluate:
    input:
        plan=f"{RUN}/plan.json",
        base_metrics=f"{BASE}/metrics.json",
        prune_report=f"{RUN}/prune_report.json",
        finetune_report=f"{RUN}/finetune_report.json",
        pruned=f"{RUN}/pruned.safetensors",
        pruned_structure=f"{RUN}/pruned.json",
        finetuned=f"{RUN}/finetuned.safetensors",
        finetuned_structure=f"{RUN}/finetuned.json",
    output:
        f"{RUN}/metrics.json",
    log:
        f"{RUN_LOGS}/evaluate.log",
    benchmark:
        f"{BENCH_RUN}/evaluate.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        step=evaluate_params,
    script:
        "../scripts/evaluate.py"


rule run_card:
    input:
        metrics=f"{RUN}/metrics.json",
        plan=f"{RUN}/plan.json",
    output:
        report(
            f"{RUN}/run.html",
            caption="../workflow/report/run_card.rst",
            category="Runs",
            subcategory="{model}",
            labels={
                "model": "{model}",
                "method": "{method}",
                "ratio": "{ratio}",
                "seed": "{seed}",
            },
        ),
    log:
        f"{RUN_LOGS}/run_card.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/run_card.py"
