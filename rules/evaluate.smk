# evaluate: test-split accuracy before and after fine-tuning, size, sparsity and speed -> metrics.json.


rule evaluate:
    input:
        plan=job_runs("plan.json"),
        base_metrics=f"{BASE}/metrics.json",
        prune_report=job_runs("prune_report.json"),
        finetune_report=job_runs("finetune_report.json"),
        pruned=job_runs("pruned.safetensors"),
        pruned_structure=job_runs("pruned.json"),
        finetuned=job_runs("finetuned.safetensors"),
        finetuned_structure=job_runs("finetuned.json"),
    output:
        metrics=job_runs("metrics.json"),
    log:
        f"{JOB_LOGS}/evaluate.log",
    benchmark:
        f"{BENCH_JOB}/evaluate.tsv"
    conda:
        "../envs/torch.yaml"
    threads: 1
    params:
        step=evaluate_params,
        seeds=job_seeds,
    script:
        "../scripts/evaluate.py"


rule run_card:
    input:
        metrics=job_runs("metrics.json"),
        plan=job_runs("plan.json"),
    output:
        job_pages("run.html", "../workflow/report/run_card.rst", "Runs"),
    log:
        f"{JOB_LOGS}/run_card.log",
    conda:
        "../envs/report.yaml"
    script:
        "../scripts/run_card.py"
